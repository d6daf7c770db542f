//! The committed models: each loads through ONNX Runtime with a valid spec, has its card, and
//! the SMIDS model scored by `spermscope-eval` over SMIDS reproduces the accuracy its training
//! run recorded for the same images (this guards the preprocessing path, not generalisation).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use spermscope::core::model::{Model, RuntimeOptions};

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

#[test]
fn committed_models_load_with_their_cards() {
    for (name, classes, channels) in [
        (
            "hushem-4class",
            vec!["normal", "tapered", "pyriform", "amorphous"],
            3,
        ),
        (
            "smids-3class",
            vec!["abnormal_sperm", "non-sperm", "normal_sperm"],
            3,
        ),
        (
            "smids-3class-lite0",
            vec!["abnormal_sperm", "non-sperm", "normal_sperm"],
            3,
        ),
        ("mhsma-head", vec!["normal", "abnormal"], 1),
        ("head-verifier", vec!["head", "not_head"], 3),
    ] {
        let path = models().join(format!("{name}.onnx"));
        let m = Model::load(&path, &RuntimeOptions::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.spec.name, name);
        assert_eq!(m.spec.classes, classes);
        assert_eq!(m.spec.input.channels, channels);
        let card =
            std::fs::read_to_string(models().join(format!("{name}.md"))).expect("model card");
        for must in ["## Data", "## Protocol", "## Reproduce", "## Results"] {
            assert!(card.contains(must), "{name}.md lacks '{must}'");
        }
        // The classifiers carry the temperature their training run fitted on held-out
        // predictions (the verifier's threshold was chosen at T = 1 and keeps it).
        let metrics: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(models().join(format!("{name}.metrics.json")))
                .expect("metrics"),
        )
        .expect("json");
        match metrics["final_model"]["calibration"]["temperature"].as_f64() {
            Some(t) => {
                assert!((f64::from(m.spec.temperature) - t).abs() < 1e-6, "{name}");
                assert!(
                    card.contains("### Calibration"),
                    "{name}.md lacks its calibration"
                );
            }
            None => {
                assert_eq!(name, "head-verifier");
                assert_eq!(m.spec.temperature, 1.0);
            }
        }
    }
}

#[test]
fn eval_reproduces_the_smids_model_accuracy() {
    let recorded: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(models().join("smids-3class.metrics.json")).expect("metrics"),
    )
    .expect("json");
    let want = recorded["final_model"]["all_data"]["accuracy"]
        .as_f64()
        .expect("accuracy");
    let n_want = recorded["final_model"]["all_data"]["n"]
        .as_u64()
        .expect("n");
    let out = common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_spermscope-eval"))
            .arg("--json")
            .arg("--model")
            .arg(models().join("smids-3class.onnx"))
            .arg("--dataset")
            .arg(common::dataset("smids")),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let got = v["accuracy"].as_f64().expect("accuracy");
    println!("smids-3class over SMIDS: eval {got:.4}, recorded at training {want:.4}");
    assert_eq!(v["n"].as_u64(), Some(n_want));
    // Identical up to crops whose top two logits tie within float noise (at most 2 of 2400).
    assert!(
        (got - want).abs() <= 2.0 / n_want as f64,
        "eval {got} vs recorded {want}"
    );
}

/// The shipped teacher gives, through ONNX Runtime on the same SMIDS crops, the logits its
/// training run recorded in burn (16 crops spread over the dataset).
#[test]
fn the_smids_teacher_reproduces_its_training_logits() {
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(models().join("smids-3class-lite0.metrics.json"))
            .expect("metrics"),
    )
    .expect("json");
    common::onnx_parity(&models().join("smids-3class-lite0.onnx"), &report);
}
