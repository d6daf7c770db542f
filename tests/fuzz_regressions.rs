//! Every input that once crashed a fuzz target (`fuzz/regressions/<target>/`) goes through the
//! same library calls as its target and must come back as a clean result or error. The fuzz
//! smoke run in CI replays them too, with debug assertions and AddressSanitizer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Cursor;
use std::path::{Path, PathBuf};

use spermscope::core::model::{Model, RuntimeOptions};
use spermscope::core::spec::{self, SpecError};
use spermscope::core::{imageio, stack};
use spermscope::daemon::config::RawConfig;
use spermscope::daemon::report;
use spermscope::offline::tune_log;

fn regressions(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|e| {
            let p = e.unwrap().path();
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn model_inputs_that_crashed_are_refused_cleanly() {
    let found = regressions("model");
    assert!(!found.is_empty(), "fuzz/regressions/model is empty");
    let opts = RuntimeOptions {
        threads: 1,
        ..RuntimeOptions::default()
    };
    for (path, bytes) in found {
        // The metadata edit walks the protobuf itself: a length past the end is an error.
        let edited = spec::set_metadata(&bytes, "spermscope.fuzz", "1");
        assert!(
            matches!(edited, Err(SpecError::Protobuf(_))),
            "{}: {edited:?}",
            path.display()
        );
        assert!(
            Model::from_bytes(&bytes, &path, &opts).is_err(),
            "{}",
            path.display()
        );
    }
}

#[test]
fn a_protobuf_length_near_the_top_of_u64_is_refused() {
    // Field 14 (metadata_props), length-delimited, length 2^64 - 1.
    let mut onnx = vec![(14 << 3) | 2];
    onnx.extend_from_slice(&[0xff; 9]);
    onnx.push(0x01);
    onnx.extend_from_slice(b"rest");
    assert_eq!(
        spec::set_metadata(&onnx, "k", "v").unwrap_err().to_string(),
        SpecError::Protobuf("field runs past the end").to_string()
    );
}

#[test]
fn frame_config_records_and_log_inputs_that_crashed_run_cleanly() {
    for (path, bytes) in regressions("frame_file") {
        let _ = imageio::decode_rgb(&bytes);
        if stack::is_tiff(&bytes)
            && let Ok(mut s) = stack::TiffStack::from_reader(Cursor::new(&bytes), &path)
        {
            for _ in 0..64 {
                if s.next_page().is_none() {
                    break;
                }
            }
        }
    }
    for (path, bytes) in regressions("config") {
        if let Ok(raw) = RawConfig::parse(&String::from_utf8_lossy(&bytes), &path) {
            let _ = raw.resolve(Some(Path::new("/nonexistent/fuzz")));
        }
    }
    for (path, bytes) in regressions("records") {
        if let Ok(records) = report::parse_record_lines(Cursor::new(&bytes), &path) {
            for t in report::tally_records(&records) {
                let _ = t.report(&[], 200, None).text();
            }
        }
    }
    for (path, bytes) in regressions("tune_log") {
        let _ = tune_log::parse_log(&String::from_utf8_lossy(&bytes), &path);
    }
}
