//! Transfer learning: the EfficientNet-Lite ImageNet weights (from `scripts/setup --train`)
//! give the reference logits of an independent implementation; a pretrained Lite0 is
//! fine-tuned on a tiny HuSHeM subset with every recipe option, killed and resumed to the same
//! result as an uninterrupted run; and its ONNX export passes the readers' checks and gives
//! burn's logits through ONNX Runtime.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "train")]

mod common;

use std::path::{Path, PathBuf};

use burn::prelude::*;
use spermscope::offline::train::efficientnet::{
    EfficientNetLite, EfficientNetLiteConfig, Variant, find_weights,
};

const SETUP: &str = "the ImageNet weights are missing: run `scripts/setup --train` first";

fn fixture() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/efficientnet-lite/lite0-reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("reference fixture")).expect("json")
}

/// The fixture's input: `x[0][c][y][x] = sin(0.05 x + 0.07 y + 1.3 c)`.
fn fixture_input(n: usize, device: &Device) -> Tensor<4> {
    let mut v = Vec::with_capacity(3 * n * n);
    for c in 0..3 {
        for y in 0..n {
            for x in 0..n {
                v.push((0.05 * x as f32 + 0.07 * y as f32 + 1.3 * c as f32).sin());
            }
        }
    }
    Tensor::<4>::from_data(TensorData::new(v, [1, 3, n, n]), device)
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn top5(v: &[f32]) -> Vec<u64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
    idx.into_iter().take(5).map(|i| i as u64).collect()
}

fn imagenet(v: Variant, device: &Device) -> EfficientNetLite {
    let path = find_weights(v, None).expect(SETUP);
    let mut net = EfficientNetLiteConfig::variant(v).init(device);
    net.load_pytorch(&path).expect("weights load");
    net
}

#[test]
fn lite0_imagenet_logits_match_the_reference_implementation() {
    let device = Device::flex();
    let reference = fixture();
    let net = imagenet(Variant::Lite0, &device);
    for exportable in [false, true] {
        let net = net.clone().exportable(exportable);
        for size in [224usize, 128] {
            let r = &reference["outputs"][size.to_string()];
            let logits: Vec<f32> = net
                .logits(fixture_input(size, &device))
                .expect("classifier")
                .into_data()
                .iter::<f32>()
                .collect();
            let want = floats(&r["logits"]);
            assert_eq!(logits.len(), 1000);
            let worst = logits
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            println!(
                "{size} px, exportable ReLU6 {exportable}: largest logit difference {worst:.2e}"
            );
            assert!(worst <= 1e-4, "{size} px: logits differ by {worst}");
            let want_top5: Vec<u64> = r["top5"]
                .as_array()
                .expect("top5")
                .iter()
                .map(|x| x.as_u64().expect("class"))
                .collect();
            assert_eq!(top5(&logits), want_top5, "{size} px");
            let feats: Vec<f32> = net
                .features(fixture_input(size, &device))
                .into_data()
                .iter::<f32>()
                .collect();
            for (a, b) in feats.iter().zip(floats(&r["features_first8"])) {
                assert!(
                    (a - b).abs() <= 1e-4,
                    "{size} px: pooled feature {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn larger_variants_load_and_a_wrong_checkpoint_is_refused() {
    let device = Device::flex();
    for v in [Variant::Lite1, Variant::Lite2] {
        let net = imagenet(v, &device);
        let logits: Vec<f32> = net
            .logits(fixture_input(64, &device))
            .expect("classifier")
            .into_data()
            .iter::<f32>()
            .collect();
        assert!(logits.iter().all(|x| x.is_finite()), "{v:?}");
    }
    // Lite1's tensors do not fit Lite0's layers: an error, never a silent partial load.
    let mut lite0 = EfficientNetLiteConfig::variant(Variant::Lite0).init(&device);
    let lite1 = find_weights(Variant::Lite1, None).expect(SETUP);
    assert!(lite0.load_pytorch(&lite1).is_err());
}

fn experiment(dir: &Path) -> PathBuf {
    let hushem = common::datasets().join("hushem");
    let text = format!(
        r#"
name = "lite"
[data]
dataset = "{}"
normal_class = "normal"
[crop]
pose = "upright"
window_px = 96.0
size_px = 32
[model]
backbone = "efficientnet-lite0"
pretrained = true
dropout = 0.2
features = true
feature_hidden = 8
[train]
epochs = 4
batch_size = 8
lr = 0.001
warmup_epochs = 1
val_fraction = 0.0
checkpoint = true
[finetune]
head_epochs = 1
head_lr = 0.003
unfreeze_every = 1
backbone_lr_mult = 0.5
layer_lr_decay = 0.7
bn = "train"
[cv]
folds = 2
seeds = [4]
"#,
        hushem.display()
    );
    let p = dir.join("lite.toml");
    std::fs::write(&p, text).expect("write experiment");
    p
}

/// Runs the trainer on 24 HuSHeM images (2 folds and the final model); `Err` with its stderr
/// when the run stops (as `--stop-after` makes it).
fn train(cfg: &Path, out: &Path, extra: &[&str]) -> Result<serde_json::Value, String> {
    let mut args = vec!["--folds", "--limit", "24", "-q"];
    args.extend_from_slice(extra);
    common::train(env!("CARGO_BIN_EXE_spermscope-train"), cfg, out, &args)
}

#[test]
fn finetuned_lite0_resumes_to_the_same_weights_and_exports_with_parity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = experiment(dir.path());
    let whole = train(&cfg, &dir.path().join("whole"), &[]).expect("uninterrupted run");

    // Killed in the first fold, then again in the second, then run to the end.
    let out = dir.path().join("resumed");
    let err = train(&cfg, &out, &["--stop-after", "2"]).expect_err("stops");
    assert!(err.contains("--resume"), "{err}");
    let err = train(&cfg, &out, &[]).expect_err("an earlier run's checkpoints");
    assert!(err.contains("add --resume"), "{err}");
    train(&cfg, &out, &["--resume", "--stop-after", "3"]).expect_err("stops again");
    let resumed = train(&cfg, &out, &["--resume"]).expect("resumed run");
    assert_eq!(whole["cv"]["fold_accuracy"], resumed["cv"]["fold_accuracy"]);
    assert_eq!(whole["cv"]["pooled"], resumed["cv"]["pooled"]);
    let (a, b) = (&whole["final_model"], &resumed["final_model"]);
    assert_eq!(a["parity_logits"], b["parity_logits"]);
    assert_eq!(a["spec"], b["spec"]);
    // Every epoch's history (head epoch, then one more group each epoch) survives the kills.
    let losses = |r: &serde_json::Value| -> Vec<f64> {
        r["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|h| h["train_loss"].as_f64().expect("loss"))
            .collect()
    };
    assert_eq!(losses(a), losses(b));
    assert_eq!(losses(a).len(), 4);
    // The head epoch trains the classifier and feature branch only: no backbone gradients.
    let layers = |epoch: usize| -> Vec<String> {
        a["history"][epoch]["grad_norms"]
            .as_array()
            .expect("norms")
            .iter()
            .map(|n| n["layer"].as_str().expect("layer").to_string())
            .collect()
    };
    assert!(
        layers(0).iter().all(|l| !l.starts_with("backbone")),
        "{:?}",
        layers(0)
    );
    assert!(layers(1).iter().any(|l| l.starts_with("backbone.head")));
    assert!(layers(3).len() > layers(1).len());
    // The pretrained input normalisation, not one fitted on the data.
    let mean = a["spec"]["input"]["mean"][0].as_f64().expect("mean");
    assert!((mean - 127.0 / 255.0).abs() < 1e-6, "{mean}");

    let exported = dir.path().join("whole").join("lite.onnx");
    common::onnx_parity(&exported, &whole);

    // The exported model starts another run (--init): every weight finds its place, and the
    // graph's own constants (ReLU6's bounds) are not taken for weights.
    let init = exported.to_str().expect("utf8");
    let again = train(
        &cfg,
        &dir.path().join("again"),
        &["--init", init, "--epochs", "1", "--no-final"],
    )
    .expect("a run started from the exported Lite0");
    assert_eq!(
        again["cv"]["fold_accuracy"].as_array().map(Vec::len),
        Some(2)
    );
}
