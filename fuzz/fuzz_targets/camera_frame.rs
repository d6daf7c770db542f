//! Fuzz target: a camera's raw buffer with the size and pixel format the device claims (`spermscope::fuzz::camera_frame`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spermscope::fuzz::camera_frame(data));
