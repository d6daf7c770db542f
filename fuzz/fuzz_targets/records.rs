//! Fuzz target: a records file (JSON Lines) read back by `spermscope report`, tallied per
//! sample and written as the report's text and JSON.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spermscope::daemon::report;

fuzz_target!(|data: &[u8]| {
    let Ok(records) = report::parse_record_lines(Cursor::new(data), Path::new("fuzz.jsonl")) else {
        return;
    };
    for tally in report::tally_records(&records) {
        let r = tally.report(&[], 200, None);
        let _ = r.text();
        assert!(serde_json::to_string_pretty(&r).is_ok());
    }
});
