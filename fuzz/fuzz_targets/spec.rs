//! Fuzz target: the spec JSON a model carries, then a crop prepared with it (`spermscope::fuzz::spec`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spermscope::fuzz::spec(data));
