//! Fuzz target: the tuner's trial log, read when a search resumes (`spermscope::fuzz::tune_log`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spermscope::fuzz::tune_log(data));
