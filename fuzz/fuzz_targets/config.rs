//! Fuzz target: a config file's text, parsed and resolved (`spermscope::fuzz::config`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spermscope::fuzz::config(data));
