//! Fuzz target: a config file's text, parsed and resolved (every value checked, no I/O) as
//! `spermscope validate` and start-up do.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spermscope::daemon::config::RawConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(raw) = RawConfig::parse(text, Path::new("fuzz.toml")) {
        let _ = raw.resolve(Some(Path::new("/nonexistent/fuzz")));
    }
});
