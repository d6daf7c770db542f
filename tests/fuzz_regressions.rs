//! Every input that once crashed a fuzz target (`fuzz/regressions/<target>/`) goes through the
//! target's own entry point (`spermscope::fuzz`) and must come back as a clean result or error;
//! every target is wired to its entry point in `fuzz/` (`fuzz/run` replays them under
//! AddressSanitizer too).

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

/// `fuzz/` is its own workspace, built only by `fuzz/run`: each target of `spermscope::fuzz`
/// must have its file calling that entry point, its binary in `fuzz/Cargo.toml` and its place in
/// `fuzz/run`'s list, and there must be no other target.
#[test]
fn every_fuzz_target_is_wired_to_its_entry_point() {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(fuzz_dir.join("Cargo.toml")).unwrap();
    let script = std::fs::read_to_string(fuzz_dir.join("run")).unwrap();
    let listed = script
        .lines()
        .find_map(|l| l.strip_prefix("all=("))
        .and_then(|l| l.strip_suffix(')'))
        .expect("fuzz/run lists its targets as all=(...)");
    let mut files: Vec<String> = std::fs::read_dir(fuzz_dir.join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut want: Vec<String> = fuzz::TARGETS
        .iter()
        .map(|(t, _)| format!("{t}.rs"))
        .collect();
    want.sort();
    assert_eq!(
        files, want,
        "fuzz/fuzz_targets against spermscope::fuzz::TARGETS"
    );
    for (t, _) in fuzz::TARGETS {
        let src = std::fs::read_to_string(fuzz_dir.join(format!("fuzz_targets/{t}.rs"))).unwrap();
        assert!(
            src.contains(&format!("spermscope::fuzz::{t}(data)")),
            "fuzz_targets/{t}.rs does not call spermscope::fuzz::{t}"
        );
        assert!(
            manifest.contains(&format!("name = \"{t}\"\npath = \"fuzz_targets/{t}.rs\"")),
            "fuzz/Cargo.toml has no binary {t}"
        );
        assert!(
            listed.split_whitespace().any(|x| x == t),
            "fuzz/run does not list {t}"
        );
    }
}
