//! Fuzz target: a records file read back by `spermscope report` (`spermscope::fuzz::records`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spermscope::fuzz::records(data));
