//! Fuzz target: the tuner's trial log (JSON Lines), read when a search resumes.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spermscope::offline::tune_log;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(trials) = tune_log::parse_log(text, Path::new("fuzz.jsonl")) {
        assert!(trials.len() <= text.lines().count());
    }
});
