//! Every input that once crashed a fuzz target (`fuzz/regressions/<target>/`) goes through the
//! target's own entry point (`spermscope::fuzz`) and must come back as a clean result or error. The fuzz
//! smoke run in CI replays them too, with debug assertions and AddressSanitizer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use spermscope::core::model::{Model, RuntimeOptions};
use spermscope::core::spec::{self, SpecError};
use spermscope::fuzz;

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
fn every_input_that_crashed_a_target_runs_cleanly_through_it() {
    for (target, run) in fuzz::TARGETS {
        for (_, bytes) in regressions(target) {
            run(&bytes);
        }
    }
}
