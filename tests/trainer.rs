//! The trainer end to end on a small HuSHeM subset: the real binary trains, cross-validates and
//! exports; the ONNX file then goes through ONNX Runtime and must give burn's logits (parity),
//! carry its spec (metadata round trip), and score the same through `spermscope-eval`.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "train")]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn experiment(dir: &Path, features: bool) -> PathBuf {
    let hushem = common::dataset("hushem");
    let text = format!(
        r#"
name = "smoke"
[data]
dataset = "{}"
normal_class = "normal"
[crop]
pose = "upright"
contrast = "dark"
window_px = 96.0
size_px = 32
channels = 3
[model]
widths = [8, 16]
convs_per_block = 1
residual = true
dropout = 0.1
features = {features}
feature_hidden = 8
test_time_mirror = {features}
[train]
epochs = 3
batch_size = 16
val_fraction = 0.2
patience = 0
[cv]
folds = 2
protocol = "stratified"
seeds = [5]
"#,
        hushem.display()
    );
    let p = dir.join("smoke.toml");
    std::fs::write(&p, text).expect("write experiment");
    p
}

fn train(dir: &Path, features: bool) -> serde_json::Value {
    let cfg = experiment(dir, features);
    let out = dir.join("out");
    let run = common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_spermscope-train"))
            .args([
                "--config",
                cfg.to_str().expect("utf8"),
                "--folds",
                "--limit",
                "40",
                "-q",
                "--out",
            ])
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("cross-validation, 2 folds x 1 seeds"),
        "{stdout}"
    );
    for f in [
        "smoke.onnx",
        "smoke.metrics.json",
        "smoke.curves.png",
        "smoke.gradients.png",
        "smoke.confusion.png",
    ] {
        let p = out.join(f);
        assert!(
            p.is_file() && p.metadata().expect("meta").len() > 100,
            "{f} missing"
        );
    }
    let json = std::fs::read_to_string(out.join("smoke.metrics.json")).expect("metrics");
    let report: serde_json::Value = serde_json::from_str(&json).expect("metrics json");
    let fin = &report["final_model"];
    // Every epoch logs a finite, positive gradient norm for each layer, the classifier last.
    for h in fin["history"].as_array().expect("history") {
        let norms = h["grad_norms"].as_array().expect("grad_norms");
        assert!(norms.len() >= 4, "{h}");
        assert_eq!(norms.last().expect("a layer")["layer"], "head");
        for n in norms {
            let (mean, max) = (
                n["mean"].as_f64().expect("mean"),
                n["max"].as_f64().expect("max"),
            );
            assert!(mean > 0.0 && mean <= max && max.is_finite(), "{n}");
        }
    }
    // The temperature is fitted on the validation split and travels in the model's spec.
    let cal = &fin["calibration"];
    assert_eq!(cal["fitted_on"], "validation split", "{cal}");
    assert_eq!(cal["val_images"], fin["val_images"]);
    let t = cal["temperature"].as_f64().expect("temperature");
    assert!((0.05..=20.0).contains(&t), "{t}");
    assert_eq!(fin["spec"]["temperature"].as_f64(), Some(t));
    assert!(stdout.contains("fitted on validation split"), "{stdout}");
    report
}

#[test]
fn trainer_smoke_export_and_parity_with_features() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = train(dir.path(), true);
    common::onnx_parity(&dir.path().join("out/smoke.onnx"), &report);

    // The evaluator goes through the same preprocessing and ONNX Runtime path: on the same
    // images it must reproduce the accuracy burn measured for the final model.
    let eval = common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_spermscope-eval"))
            .args(["--json", "--limit", "40", "--model"])
            .arg(dir.path().join("out/smoke.onnx"))
            .arg("--dataset")
            .arg(common::dataset("hushem")),
    );
    let v: serde_json::Value = serde_json::from_slice(&eval.stdout).expect("one json object");
    let burn_acc = report["final_model"]["all_data"]["accuracy"]
        .as_f64()
        .expect("accuracy");
    let ort_acc = v["accuracy"].as_f64().expect("accuracy");
    assert_eq!(v["n"].as_u64(), Some(40));
    assert!(
        (burn_acc - ort_acc).abs() < 1e-9,
        "burn {burn_acc} vs eval {ort_acc}"
    );
    for key in ["macro_f1", "classes", "confusion", "crops_per_second"] {
        assert!(v.get(key).is_some(), "eval json lacks {key}");
    }
}

#[test]
fn trainer_smoke_export_and_parity_pixels_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = train(dir.path(), false);
    common::onnx_parity(&dir.path().join("out/smoke.onnx"), &report);

    // A fixed seed makes a run repeatable: the same folds, the same weights, the same logits.
    let again = tempfile::tempdir().expect("tempdir");
    let second = train(again.path(), false);
    assert_eq!(report["cv"]["fold_accuracy"], second["cv"]["fold_accuracy"]);
    assert_eq!(
        report["final_model"]["parity_logits"],
        second["final_model"]["parity_logits"]
    );
}

#[test]
fn overfit_batch_and_lr_find_checks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = experiment(dir.path(), true);
    let run = |extra: &[&str]| {
        let out = common::run_ok(
            Command::new(env!("CARGO_BIN_EXE_spermscope-train"))
                .args(["--config", cfg.to_str().expect("utf8"), "-q", "--out"])
                .arg(dir.path().join("out"))
                .args(extra),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Eight images, one batch: a working network drives the loss to about zero.
    let text = run(&["--overfit-batch", "8", "--epochs", "300"]);
    assert!(
        text.contains("8 images, 300 steps") && text.contains("passes"),
        "{text}"
    );
    // The range test draws its curve and suggests a rate inside the range it tried.
    let text = run(&["--lr-find", "--limit", "48"]);
    let lr: f64 = text
        .split("suggested learning rate ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(lr > 1e-7 && lr < 0.1, "{lr}");
    assert!(dir.path().join("out/smoke.lr-find.png").exists());
    // No model was trained or exported by either check.
    assert!(!dir.path().join("out/smoke.onnx").exists());
}

#[test]
fn tuner_runs_nested_and_resumes_from_its_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exp = experiment(dir.path(), false);
    let search = dir.path().join("tiny.toml");
    std::fs::write(
        &search,
        format!(
            "experiment = \"{}\"\nstrategy = \"random\"\ntrials = 3\nouter_folds = 2\nhalving = true\nlimit = 40\n\
             [params.\"train.lr\"]\nkind = \"log_uniform\"\nmin = 1e-3\nmax = 1e-2\n\
             [params.\"train.optimizer\"]\nkind = \"categorical\"\nvalues = [\"adamw\", \"lion\"]\n",
            exp.display()
        ),
    )
    .expect("write search");
    let out = dir.path().join("tune");
    let tune = || {
        let run = common::run_ok(
            Command::new(env!("CARGO_BIN_EXE_spermscope-tune"))
                .args(["--search", search.to_str().expect("utf8"), "-q", "--out"])
                .arg(&out),
        );
        String::from_utf8_lossy(&run.stdout).into_owned()
    };
    let first = tune();
    assert!(first.contains("outer accuracy"), "{first}");
    let log = out.join("tiny.tune.jsonl");
    let lines = |p: &Path| -> Vec<String> {
        std::fs::read_to_string(p)
            .expect("log")
            .lines()
            .map(str::to_string)
            .collect()
    };
    // Per outer fold: 3 trials at the first rung, then the best third (1) at full epochs.
    let full = lines(&log);
    assert_eq!(full.len(), 2 * 4, "{full:?}");
    assert!(out.join("smoke.tune.png").exists());
    let best = std::fs::read_to_string(out.join("smoke.best.toml")).expect("best experiment");
    assert!(best.contains("nested outer accuracy"), "{best}");
    // A kill after three trials: the rerun keeps them and runs only the rest.
    std::fs::write(&log, full[..3].join("\n") + "\n").expect("truncate");
    let again = tune();
    let resumed = lines(&log);
    assert_eq!(resumed.len(), full.len());
    assert_eq!(resumed[..3], full[..3]);
    let tail = |s: &str| s.lines().last().map(str::to_string);
    assert_eq!(
        tail(&first).map(|l| l.split(" (").next().map(str::to_string)),
        tail(&again).map(|l| l.split(" (").next().map(str::to_string)),
        "the resumed search must end where the first one did"
    );
}

/// `--init`: a bundled model's weights read back from its ONNX file give, in burn, the logits
/// ONNX Runtime gives; a network of another shape is refused, naming the weight.
#[test]
fn init_reads_a_bundled_model_back_with_its_logits() {
    use burn::prelude::*;
    use spermscope::core::model::{Model, RuntimeOptions};
    use spermscope::core::spec::ModelFile;
    use spermscope::offline::train::config::NetConfig;
    use spermscope::offline::train::init::FineTune;
    use spermscope::offline::train::net::Net;

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smids-3class.onnx");
    let init = ModelFile::read(&path).expect("read the model");
    let cfg = init
        .net_config(&NetConfig::default())
        .expect("architecture");
    assert_eq!(
        (
            cfg.widths.clone(),
            cfg.convs_per_block,
            cfg.residual,
            cfg.features,
            cfg.feature_hidden
        ),
        (vec![16, 32, 64, 128], 1, true, true, 32)
    );
    let classes = init.spec.classes.clone();
    let same = init.head_mapping(&classes, init.spec.normal_class.as_deref());
    assert!(same.rows.iter().all(|(c, from)| from.as_ref() == Some(c)));
    let n_feat = init.spec.features.as_ref().expect("features").count;
    let device = Device::flex();
    let net = init
        .apply(Net::new(&device, &cfg, 3, n_feat, classes.len()), &same)
        .expect("apply");

    let mut model = Model::load(&path, &RuntimeOptions::default()).expect("load");
    let files: Vec<PathBuf> =
        spermscope::core::imageio::list_files(&common::dataset("smids/normal_sperm"))
            .expect("smids")
            .into_iter()
            .step_by(40)
            .take(12)
            .collect();
    let crops = common::prepared(&model, &files);
    let ort = model.logits(&crops).expect("run");
    let s = init.spec.input.size_px as usize;
    let n = crops.len();
    let pixels: Vec<f32> = crops.iter().flat_map(|c| c.pixels.clone()).collect();
    let feats: Vec<f32> = crops.iter().flat_map(|c| c.features.clone()).collect();
    let x = Tensor::<4>::from_data(TensorData::new(pixels, [n, 3, s, s]), &device);
    let f = Tensor::<4>::from_data(TensorData::new(feats, [n, n_feat, 1, 1]), &device);
    let burn: Vec<f32> = net
        .forward(x.clone(), Some(f.clone()))
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32");
    let worst = ort
        .iter()
        .flatten()
        .zip(&burn)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    println!("init: {n} SMIDS crops, largest |ort - burn| logit difference {worst:.2e}");
    assert!(worst <= 1e-4, "weights read back differ: {worst}");

    // A lab's classes: the normal class starts from the model's normal row, the rest fresh.
    let lab = ["normal".to_string(), "tapered".to_string()];
    let mapping = init.head_mapping(&lab, Some("normal"));
    assert_eq!(
        mapping.rows,
        [
            ("normal".to_string(), Some("normal_sperm".to_string())),
            ("tapered".to_string(), None)
        ]
    );
    let two = init
        .apply(Net::new(&device, &cfg, 3, n_feat, 2), &mapping)
        .expect("apply");
    let logits: Vec<f32> = two
        .forward(x, Some(f))
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32");
    let normal = classes
        .iter()
        .position(|c| c == "normal_sperm")
        .expect("normal");
    for (i, row) in ort.iter().enumerate() {
        assert!((logits[2 * i] - row[normal]).abs() <= 1e-4, "crop {i}");
    }

    // Another network is not this model's.
    let wider = NetConfig {
        widths: vec![16, 32, 64, 96],
        ..cfg
    };
    let err = init
        .apply(Net::new(&device, &wider, 3, n_feat, 3), &same)
        .expect_err("other widths")
        .to_string();
    assert!(err.contains("blocks.3.convs.0.weight"), "{err}");
}

/// `spermscope-train --init MODEL --dataset LAB`: the model's crop, normalisation and features
/// are kept, the lab's classes replace its own, and the export passes the parity check; a file
/// that is not a spermscope model is refused with its name.
#[test]
fn init_fine_tunes_a_model_on_a_labs_classes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let smids = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smids-3class.onnx");
    let run = common::run_ok(
        Command::new(env!("CARGO_BIN_EXE_spermscope-train"))
            .arg("--init")
            .arg(&smids)
            .arg("--dataset")
            .arg(common::dataset("hushem"))
            .args([
                "--limit", "40", "--epochs", "2", "--name", "lab", "-q", "--out",
            ])
            .arg(&out),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("lab: 40 images"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("lab.metrics.json")).expect("json"))
            .expect("metrics json");
    let spec: spermscope::core::spec::ModelSpec =
        serde_json::from_value(report["final_model"]["spec"].clone()).expect("spec");
    let base = spermscope::core::spec::ModelFile::read(&smids)
        .expect("model")
        .spec;
    assert_eq!(spec.crop, base.crop);
    assert_eq!(spec.input, base.input);
    assert_eq!(spec.features, base.features);
    assert_eq!(spec.test_time_mirror, base.test_time_mirror);
    assert_eq!(spec.classes, ["normal", "tapered", "pyriform", "amorphous"]);
    assert_eq!(spec.normal_class.as_deref(), Some("normal"));
    assert_eq!(report["init"].as_str(), smids.to_str());
    common::onnx_parity(&out.join("lab.onnx"), &report);

    let bad = Command::new(env!("CARGO_BIN_EXE_spermscope-train"))
        .arg("--init")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .arg("--dataset")
        .arg(common::dataset("hushem"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("README.md"), "{err}");
}

/// Trains the smoke experiment (2 folds of seed 5 on 40 images) with extra arguments; the run's
/// metrics, or its stderr when it fails.
fn train_with(cfg: &Path, out: &Path, extra: &[&str]) -> Result<serde_json::Value, String> {
    let mut args = vec!["--folds", "--limit", "40", "-q"];
    args.extend_from_slice(extra);
    common::train(env!("CARGO_BIN_EXE_spermscope-train"), cfg, out, &args)
}

#[test]
fn distilled_student_learns_only_from_its_own_folds_teacher() {
    let dir = tempfile::tempdir().expect("tempdir");
    let teacher_cfg = experiment(dir.path(), true);
    let teachers = dir.path().join("teacher");
    let teacher = train_with(&teacher_cfg, &teachers, &["--fold-models"]).expect("teacher");
    // Every fold's model is kept with a record of what it was tested on.
    let folds = teachers.join("smoke.folds");
    let mut digests = Vec::new();
    let mut tested = 0;
    for fit in ["s5-f1", "s5-f2"] {
        assert!(folds.join(format!("{fit}.onnx")).is_file(), "{fit}.onnx");
        let text = std::fs::read_to_string(folds.join(format!("{fit}.json"))).expect("record");
        let record: serde_json::Value = serde_json::from_str(&text).expect("record json");
        assert_eq!(record["fit"], fit);
        tested += record["test_images"].as_u64().expect("test_images");
        digests.push(record["test_sha256"].as_str().expect("digest").to_string());
    }
    assert_eq!(tested, 40);
    assert_ne!(digests[0], digests[1]);

    // The same experiment, learning from those teachers' soft targets alone.
    let student_text = |folds: &Path| {
        let base = std::fs::read_to_string(&teacher_cfg).expect("experiment");
        format!(
            "{}\n[distill]\nteacher = \"{}/{{fit}}.onnx\"\nfinal_teacher = \"{}\"\ntemperature = 3.0\nweight = 1.0\n",
            base.replace("name = \"smoke\"", "name = \"student\""),
            folds.display(),
            teachers.join("smoke.onnx").display()
        )
    };
    let student_cfg = dir.path().join("student.toml");
    std::fs::write(&student_cfg, student_text(&folds)).expect("write student");
    let student =
        train_with(&student_cfg, &dir.path().join("student"), &[]).expect("distilled student");
    // Its metrics name the teacher of every fold and of the final model.
    let teachers = student["cv"]["teachers"].as_array().expect("teachers");
    assert_eq!(teachers.len(), 2);
    assert_eq!(teachers[1]["fit"], "s5-f2");
    assert!(
        teachers[1]["path"]
            .as_str()
            .expect("path")
            .ends_with("s5-f2.onnx")
    );
    assert_eq!(teachers[1]["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(student["final_model"]["teacher"]["fit"], "final");
    assert!(teacher["cv"].get("teachers").is_none());
    let first_loss = |r: &serde_json::Value| r["final_model"]["history"][0]["train_loss"].as_f64();
    assert!(first_loss(&student).is_some());
    assert_ne!(
        first_loss(&student),
        first_loss(&teacher),
        "the soft targets must change the loss"
    );

    // Another seed's folds have no teacher: refused, naming the missing record.
    let err = train_with(&student_cfg, &dir.path().join("s6"), &["--seeds", "6"])
        .expect_err("no teacher for seed 6");
    assert!(
        err.contains("s6-f1") && err.contains("--fold-models"),
        "{err}"
    );

    // Teachers swapped between folds would have seen the student's test images: refused.
    let swapped = dir.path().join("swapped");
    std::fs::create_dir_all(&swapped).expect("mkdir");
    for (from, to) in [("s5-f1", "s5-f2"), ("s5-f2", "s5-f1")] {
        for ext in ["onnx", "json"] {
            std::fs::copy(
                folds.join(format!("{from}.{ext}")),
                swapped.join(format!("{to}.{ext}")),
            )
            .expect("copy");
        }
    }
    std::fs::write(&student_cfg, student_text(&swapped)).expect("write student");
    let err = train_with(&student_cfg, &dir.path().join("sw"), &[]).expect_err("swapped");
    assert!(
        err.contains("tested on other images than fold s5-f1"),
        "{err}"
    );
}

#[test]
fn a_rotation_pretext_model_starts_a_classifier_fitted_on_its_own_statistics() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The pretext learns quarter turns of SMIDS windows, labels ignored; same network as the
    // smoke classifier.
    let smoke = std::fs::read_to_string(experiment(dir.path(), true)).expect("experiment");
    let pretext_text = smoke
        .replace("name = \"smoke\"", "name = \"pretext\"")
        .replace(
            &common::dataset("hushem").display().to_string(),
            &common::dataset("smids").display().to_string(),
        )
        .replace(
            "normal_class = \"normal\"",
            "normal_class = \"normal\"\npretext = \"rotation\"",
        )
        .replace("val_fraction = 0.2", "val_fraction = 0.0")
        .replace("test_time_mirror = true", "test_time_mirror = false");
    let pretext_cfg = dir.path().join("pretext.toml");
    std::fs::write(&pretext_cfg, &pretext_text).expect("write pretext");
    let bin = env!("CARGO_BIN_EXE_spermscope-train");
    let pre_out = dir.path().join("pre");
    let pre =
        common::train(bin, &pretext_cfg, &pre_out, &["--limit", "24", "-q"]).expect("pretext");
    let fin = &pre["final_model"];
    assert_eq!(pre["images"], 24);
    assert_eq!(fin["train_images"], 96, "each image once per turn");
    assert_eq!(
        fin["spec"]["classes"],
        serde_json::json!(["turned-0", "turned-90", "turned-180", "turned-270"])
    );
    assert!(fin["spec"]["normal_class"].is_null());
    assert!(
        fin["calibration"].is_null(),
        "a pretext fits no temperature"
    );
    let per_turn = fin["all_data"]["per_class"].as_array().expect("per class");
    assert!(per_turn.iter().all(|c| c["support"] == 24), "{per_turn:?}");
    common::onnx_parity(&pre_out.join("pretext.onnx"), &pre);
    // Cross-validating a pretext is refused, naming why.
    let err = common::train(bin, &pretext_cfg, &dir.path().join("f"), &["--folds", "-q"])
        .expect_err("--folds");
    assert!(err.contains("pretext") && err.contains("--folds"), "{err}");

    // The classifier from it: HuSHeM's labels, its own normalisation, the pretext's weights.
    let smoke_cfg = dir.path().join("smoke.toml");
    let init = pre_out.join("pretext.onnx");
    let tuned = train_with(
        &smoke_cfg,
        &dir.path().join("tuned"),
        &["--init", init.to_str().expect("utf8")],
    )
    .expect("fine-tune from the pretext");
    let scratch = train_with(&smoke_cfg, &dir.path().join("scratch"), &[]).expect("scratch");
    let spec = |r: &serde_json::Value| r["final_model"]["spec"].clone();
    assert_eq!(
        spec(&tuned)["classes"],
        serde_json::json!(["normal", "tapered", "pyriform", "amorphous"])
    );
    assert_eq!(spec(&tuned)["normal_class"], "normal");
    assert_eq!(
        spec(&tuned)["test_time_mirror"],
        true,
        "the classifier's own reading"
    );
    assert_eq!(spec(&tuned)["input"], spec(&scratch)["input"]);
    assert_eq!(spec(&tuned)["features"], spec(&scratch)["features"]);
    assert_ne!(spec(&tuned)["input"], spec(&pre)["input"]);
    let first_loss = |r: &serde_json::Value| r["final_model"]["history"][0]["train_loss"].as_f64();
    assert_ne!(
        first_loss(&tuned),
        first_loss(&scratch),
        "the weights must differ"
    );
    assert_eq!(
        tuned["cv"]["fold_accuracy"].as_array().map(Vec::len),
        Some(2)
    );
    common::onnx_parity(&dir.path().join("tuned/smoke.onnx"), &tuned);
}
