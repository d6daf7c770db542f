//! Fuzz target: a replayed or dropped-in image file or TIFF stack (`spermscope::fuzz::frame_file`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spermscope::fuzz::frame_file(data));
