//! Models that must be refused at load time, each with an error that names the problem:
//! no metadata, metadata that disagrees with the graph, a file that is not ONNX, no file, and
//! no runtime library.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "train")]

mod common;

use std::process::Command;

use burn::prelude::*;
use spermscope::core::model::{Model, ModelError, RuntimeOptions};
use spermscope::core::pose::Contrast;
use spermscope::core::spec::{
    CropSpec, InputSpec, METADATA_KEY, ModelSpec, PoseMode, SPEC_FORMAT, embed_metadata,
};
use spermscope::offline::train::config::NetConfig;
use spermscope::offline::train::{export, net::Net};

fn spec(classes: usize) -> ModelSpec {
    ModelSpec {
        format: SPEC_FORMAT,
        name: "refusal".into(),
        classes: (0..classes).map(|i| format!("c{i}")).collect(),
        normal_class: None,
        input: InputSpec {
            size_px: 32,
            channels: 3,
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
        },
        crop: CropSpec {
            pose: PoseMode::Upright,
            contrast: Contrast::Dark,
            window_px: 64.0,
            um_per_px: None,
        },
        features: None,
        temperature: 1.0,
        test_time_mirror: true,
    }
}

fn net(classes: usize) -> Net {
    let cfg = NetConfig {
        widths: vec![4, 8],
        convs_per_block: 1,
        features: false,
        ..NetConfig::default()
    };
    Net::new(&Device::flex(), &cfg, 3, 0, classes).valid()
}

#[test]
fn bad_models_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = RuntimeOptions::default();

    let bare = dir.path().join("bare.onnx");
    std::fs::write(&bare, export::graph_only(net(3), &spec(3)).expect("export")).expect("write");
    let e = Model::load(&bare, &opts).unwrap_err();
    assert!(matches!(e, ModelError::NoMetadata { .. }), "{e}");
    assert!(e.to_string().contains("no spermscope metadata"), "{e}");

    // Metadata promising 4 classes on a graph with 3 outputs.
    let lying = dir.path().join("lying.onnx");
    let mut bytes = export::graph_only(net(3), &spec(3)).expect("export");
    embed_metadata(&mut bytes, METADATA_KEY, &spec(4).to_json());
    std::fs::write(&lying, bytes).expect("write");
    let e = Model::load(&lying, &opts).unwrap_err();
    assert!(matches!(e, ModelError::GraphMismatch { .. }), "{e}");
    assert!(e.to_string().contains("4 classes"), "{e}");

    let mut bytes = export::graph_only(net(3), &spec(3)).expect("export");
    embed_metadata(&mut bytes, METADATA_KEY, "{\"format\": 1}");
    let junk_meta = dir.path().join("junk_meta.onnx");
    std::fs::write(&junk_meta, bytes).expect("write");
    assert!(matches!(
        Model::load(&junk_meta, &opts).unwrap_err(),
        ModelError::BadSpec { .. }
    ));

    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not a protobuf").expect("write");
    assert!(matches!(
        Model::load(&garbage, &opts).unwrap_err(),
        ModelError::Session { .. }
    ));

    let missing = dir.path().join("missing.onnx");
    let e = Model::load(&missing, &opts).unwrap_err();
    assert!(
        matches!(e, ModelError::Read { .. }) && e.to_string().contains("missing.onnx"),
        "{e}"
    );

    // A good one loads.
    let good = dir.path().join("good.onnx");
    std::fs::write(&good, export::to_onnx(net(3), &spec(3)).expect("export")).expect("write");
    let m = Model::load(&good, &opts).expect("good model loads");
    assert_eq!(m.spec.classes.len(), 3);
    assert_eq!(m.sha256.len(), 64);
}

#[test]
fn missing_runtime_says_what_to_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("m.onnx");
    std::fs::write(&model, b"not reached").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_spermscope-eval"))
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1.31.1")
        .arg("--model")
        .arg(&model)
        .output()
        .expect("run eval");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("scripts/setup") && err.contains("/nonexistent/"),
        "{err}"
    );
}

#[test]
fn corrupt_images_are_reported_and_skipped() {
    // A two-class dataset with one truncated PNG: the evaluator names it and scores the rest.
    let dir = tempfile::tempdir().expect("tempdir");
    let hushem = common::dataset("hushem");
    for (cls, src) in [
        ("01_normal", "01_normal/image_001.png"),
        ("04_amorphous", "04_amorphous/image_001.png"),
    ] {
        std::fs::create_dir_all(dir.path().join(cls)).expect("mkdir");
        std::fs::copy(hushem.join(src), dir.path().join(cls).join("a.png")).expect("copy");
    }
    let bytes = std::fs::read(hushem.join("01_normal/image_002.png")).expect("read");
    std::fs::write(
        dir.path().join("01_normal/broken.png"),
        &bytes[..bytes.len() / 3],
    )
    .expect("write");
    let model_dir = tempfile::tempdir().expect("tempdir");
    let model = model_dir.path().join("m.onnx");
    let mut s = spec(4);
    s.classes = ["normal", "tapered", "pyriform", "amorphous"]
        .iter()
        .map(|c| c.to_string())
        .collect();
    std::fs::write(&model, export::to_onnx(net(4), &s).expect("export")).expect("write");
    let out = common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_spermscope-eval"))
            .arg("--json")
            .arg("--model")
            .arg(&model)
            .arg("--dataset")
            .arg(dir.path()),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["n"].as_u64(), Some(2));
    let skipped = v["skipped"].as_array().expect("skipped list");
    assert_eq!(skipped.len(), 1);
    assert!(
        skipped[0].as_str().unwrap_or("").contains("broken.png"),
        "{skipped:?}"
    );
}
