//! The lab adaptation loop's tools: `spermscope crops` cuts one upright crop per recorded cell,
//! most uncertain first, and `spermscope-eval --agreement` scores a model against an expert's
//! labels with Cohen's kappa.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use serde_json::Value;

#[test]
fn crops_are_one_per_cell_most_uncertain_first() {
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    let all = spermscope::core::imageio::list_files(&common::dataset("sperm-parsing/val/frames"))
        .unwrap();
    for f in all.iter().take(8) {
        std::fs::copy(f, frames.join(f.file_name().unwrap())).unwrap();
    }
    let rec = dir.path().join("r.jsonl");
    common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_spermscope"))
            .env("RUST_LOG", "warn")
            .arg("replay")
            .arg(&frames)
            .arg("--records")
            .arg(&rec),
    );
    let cells = std::fs::read_to_string(&rec)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"cell\""))
        .count();
    let out = dir.path().join("crops");
    common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_spermscope"))
            .arg("crops")
            .arg(&rec)
            .arg("--frames")
            .arg(&frames)
            .arg("--out")
            .arg(&out),
    );
    let index = std::fs::read_to_string(out.join("index.csv")).unwrap();
    let rows: Vec<Vec<&str>> = index
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), cells, "one crop per cell");
    let conf: Vec<f64> = rows.iter().filter_map(|r| r[7].parse().ok()).collect();
    assert!(conf.windows(2).all(|w| w[0] <= w[1]), "{conf:?}");
    // Each crop is the SMIDS model's upright window (140 px) at its own resolution.
    let first = image::open(out.join(rows[0][1])).unwrap();
    assert_eq!((first.width(), first.height()), (140, 140));
}

#[test]
fn agreement_with_an_expert_has_kappa_and_intervals() {
    let out = common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_spermscope-eval"))
            .args(["--model"])
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smids-3class.onnx"))
            .arg("--dataset")
            .arg(common::dataset("smids"))
            .args(["--limit", "150", "--agreement", "--json"]),
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &v["agreement"];
    let (acc, kappa) = (
        a["accuracy"].as_f64().unwrap(),
        a["kappa"].as_f64().unwrap(),
    );
    assert_eq!(a["n"], 150);
    assert!((acc - v["accuracy"].as_f64().unwrap()).abs() < 1e-12);
    // Three balanced classes: chance agreement is about a third.
    assert!(kappa > 0.5 && kappa < acc, "{kappa} vs {acc}");
    let ci = a["kappa_ci95"].as_array().unwrap();
    assert!(ci[0].as_f64().unwrap() <= kappa && kappa <= ci[1].as_f64().unwrap());
}
