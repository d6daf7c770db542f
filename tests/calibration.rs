//! `spermscope-eval` as a clinician's check of a model: ROC/AUC and calibration figures, a
//! temperature fitted on the validation split and stored in the model, and the label-free
//! accuracy estimate (CBPE) landing within 5 points of the true accuracy on held-out data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use spermscope::core::model::{Model, RuntimeOptions};

fn eval(args: &[&str]) -> Value {
    let out = common::run_ok(Command::new(env!("CARGO_BIN_EXE_spermscope-eval")).args(args));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn temperature_from_the_validation_split_makes_the_estimate_track_accuracy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/mhsma-head.onnx");
    let mhsma = common::dataset("mhsma");
    let dir = tempfile::tempdir().unwrap();
    let fitted = dir.path().join("mhsma-head.t.onnx");
    // MHSMA's given split: the model was early-stopped on `valid`; fit the temperature there.
    let valid = eval(&[
        "--model",
        model.to_str().unwrap(),
        "--dataset",
        mhsma.to_str().unwrap(),
        "--split",
        "valid",
        "--fit-temperature",
        fitted.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(valid["n"], 240);
    let m = Model::load(&fitted, &RuntimeOptions::default()).unwrap();
    assert!(
        (m.spec.temperature - 1.0).abs() > 0.05,
        "{}",
        m.spec.temperature
    );
    // On the held-out test split, the estimate from confidences alone must land within
    // 5 points of the accuracy the labels give.
    let test = eval(&[
        "--model",
        fitted.to_str().unwrap(),
        "--dataset",
        mhsma.to_str().unwrap(),
        "--split",
        "test",
        "--json",
    ]);
    let acc = test["accuracy"].as_f64().unwrap();
    let est = test["estimated_accuracy"].as_f64().unwrap();
    println!("MHSMA test: accuracy {acc:.3}, label-free estimate {est:.3}");
    assert!(
        (acc - est).abs() <= 0.05,
        "accuracy {acc} vs estimate {est}"
    );
    for (_, auc) in test["auc"].as_object().unwrap() {
        let a = auc.as_f64().unwrap();
        assert!((0.0..=1.0).contains(&a));
    }
    let bins = test["reliability"].as_array().unwrap();
    let n: u64 = bins.iter().map(|b| b["n"].as_u64().unwrap()).sum();
    assert_eq!(n, 300);
    assert!(test["ece"].as_f64().unwrap() < 0.2);
    // The same estimate from unlabelled images.
    let pattern = mhsma.join("test/*");
    let blind = eval(&[
        "--model",
        fitted.to_str().unwrap(),
        "--images",
        pattern.to_str().unwrap(),
        "--estimate",
        "--json",
    ]);
    assert_eq!(blind["n"], 300);
    assert!((blind["estimated_accuracy"].as_f64().unwrap() - est).abs() < 1e-9);
}

#[test]
fn pictures_roc_reliability_and_saliency() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let v = eval(&[
        "--model",
        root.join("models/hushem-4class.onnx").to_str().unwrap(),
        "--dataset",
        common::dataset("hushem").to_str().unwrap(),
        "--limit",
        "40",
        "--plots",
        dir.path().to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(v["auc"].as_object().unwrap().len(), 4);
    for f in [
        "hushem-4class.roc.png",
        "hushem-4class.reliability.png",
        "hushem-4class.saliency-correct-0.png",
    ] {
        let img = image::open(dir.path().join(f)).unwrap();
        assert!(img.width() > 100, "{f}");
    }
}
