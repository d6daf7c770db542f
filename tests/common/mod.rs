//! Helpers shared by the integration tests: where the shared datasets are, running a binary
//! that must succeed, a fixture loader for the sperm-parsing full fields, and the scoring of
//! montage fields against the crops pasted into them.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// `../shared/datasets` beside the project; a test that needs it fails with one message
/// naming it when it is not there.
pub fn datasets() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets");
    assert!(
        root.is_dir(),
        "the shared datasets are missing: this test reads {} in place (HuSHeM, SMIDS, MHSMA, \
         sperm-parsing, svia-sequence; see its README.md); put them beside the project",
        root.display()
    );
    root
}

/// One dataset (or a folder in it) under `../shared/datasets`, which must exist.
pub fn dataset(rel: &str) -> PathBuf {
    let p = datasets().join(rel);
    assert!(
        p.exists(),
        "the shared dataset {rel} is missing: expected it at {}",
        p.display()
    );
    p
}

/// A loopback TCP port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Run a command to its end; it must exit 0 (its exit code and stderr are shown if not).
pub fn run_ok(c: &mut Command) -> Output {
    let out = c.output().expect("spawn the command");
    assert!(
        out.status.success(),
        "exit {:?}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the trainer (`bin`: `env!("CARGO_BIN_EXE_spermscope-train")`, which exists only with the
/// `train` feature) as `--config CFG --out OUT ARGS...`; the run's metrics JSON
/// (`OUT/<CFG's stem>.metrics.json`, so the experiment's name must be the file's), or its stderr
/// when it fails.
pub fn train(
    bin: &str,
    cfg: &Path,
    out: &Path,
    args: &[&str],
) -> Result<serde_json::Value, String> {
    let run = Command::new(bin)
        .arg("--config")
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .expect("spawn the trainer");
    if !run.status.success() {
        return Err(String::from_utf8_lossy(&run.stderr).into_owned());
    }
    let name = cfg
        .file_stem()
        .expect("stem")
        .to_string_lossy()
        .into_owned();
    let json = std::fs::read_to_string(out.join(format!("{name}.metrics.json"))).expect("metrics");
    Ok(serde_json::from_str(&json).expect("metrics json"))
}

/// Send SIGTERM to a child (the daemon drains, flushes and reports on it); the `kill` must
/// succeed.
pub fn sigterm(child: &Child) {
    signal(child, "-TERM");
}

/// Send a signal (`-HUP`, `-TERM`...) to a child with the shell's own `kill` (no procps
/// needed); the `kill` must succeed.
pub fn signal(child: &Child, sig: &str) {
    let sent = Command::new("sh")
        .arg("-c")
        .arg(format!("kill {sig} {}", child.id()))
        .status()
        .unwrap();
    assert!(sent.success());
}

/// `spermscope run --config cfg` as systemd starts it under a watchdog: `NOTIFY_SOCKET` and
/// `WATCHDOG_USEC` set, and `WATCHDOG_PID` naming the daemon (`exec` keeps the shell's pid).
pub fn spawn_watched(
    bin: &str,
    cfg: &Path,
    notify_socket: &Path,
    watchdog_usec: &str,
    rust_log: &str,
    stderr: Stdio,
) -> Child {
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "WATCHDOG_PID=$$ exec '{bin}' run --config '{}'",
            cfg.display()
        ))
        .env("NOTIFY_SOCKET", notify_socket)
        .env("WATCHDOG_USEC", watchdog_usec)
        .env("RUST_LOG", rust_log)
        .stderr(stderr)
        .spawn()
        .unwrap()
}

/// One head of a sperm-parsing frame with its ground-truth head→tail direction.
pub struct TruthHead {
    pub frame: PathBuf,
    pub centroid: (f32, f32),
    pub bbox: (u32, u32, u32, u32),
    /// Unit vector from the head's centroid toward its midpiece, if the midpiece is visible.
    pub tail_dir: Option<(f32, f32)>,
}

/// Heads of the `val` frames, with the direction to the nearest midpiece pixels (part label 4)
/// that lie closer to this head than to any other.
pub fn parsing_val_heads(max_frames: usize) -> Vec<TruthHead> {
    let root = dataset("sperm-parsing");
    let text = std::fs::read_to_string(root.join("heads.csv")).expect("heads.csv");
    let mut rows: Vec<(String, f32, f32, u32, u32, u32, u32)> = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f[0] != "val" {
            continue;
        }
        let n = |i: usize| f[i].parse::<f32>().expect("number");
        rows.push((
            f[1].to_string(),
            n(8),
            n(9),
            n(4) as u32,
            n(5) as u32,
            n(6) as u32,
            n(7) as u32,
        ));
    }
    let mut frames: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    frames.dedup();
    frames.truncate(max_frames);
    let mut out = Vec::new();
    for frame in frames {
        let stem = frame.trim_end_matches(".jpg");
        let parts = image::open(root.join("val/parts").join(format!("{stem}.png")))
            .expect("parts png")
            .to_luma8();
        let heads: Vec<_> = rows.iter().filter(|r| r.0 == frame).collect();
        for h in &heads {
            let (cx, cy) = (h.1, h.2);
            let reach = ((h.5 - h.3).max(h.6 - h.4) as f32) * 1.2;
            let (mut sx, mut sy, mut n) = (0f32, 0f32, 0f32);
            let x0 = (cx - reach).max(0.0) as u32;
            let y0 = (cy - reach).max(0.0) as u32;
            let x1 = ((cx + reach) as u32).min(parts.width() - 1);
            let y1 = ((cy + reach) as u32).min(parts.height() - 1);
            for y in y0..=y1 {
                for x in x0..=x1 {
                    if parts.get_pixel(x, y)[0] != 4 {
                        continue;
                    }
                    let d = |a: f32, b: f32| (x as f32 - a).powi(2) + (y as f32 - b).powi(2);
                    let mine = d(cx, cy);
                    if mine > reach * reach || heads.iter().any(|o| d(o.1, o.2) < mine) {
                        continue;
                    }
                    sx += x as f32;
                    sy += y as f32;
                    n += 1.0;
                }
            }
            let tail_dir = (n >= 15.0).then(|| {
                let (dx, dy) = (sx / n - cx, sy / n - cy);
                let l = (dx * dx + dy * dy).sqrt().max(1e-6);
                (dx / l, dy / l)
            });
            out.push(TruthHead {
                frame: root.join("val/frames").join(&frame),
                centroid: (cx, cy),
                bbox: (h.3, h.4, h.5, h.6),
                tail_dir,
            });
        }
    }
    out
}

/// The classified detection records of frame `name` whose centroid lies well inside the disc
/// (its inner 80%) of a crop pasted at `centre` with `radius`.
pub fn classified_in_disc<'a>(
    records: &'a [serde_json::Value],
    name: &str,
    centre: (f32, f32),
    radius: f32,
) -> Vec<&'a serde_json::Value> {
    records
        .iter()
        .filter(|r| r["kind"] == "detection" && r["frame"]["name"] == name)
        .filter(|r| !r["class"].is_null())
        .filter(|r| {
            let (x, y) = (
                r["centroid"][0].as_f64().unwrap() as f32,
                r["centroid"][1].as_f64().unwrap() as f32,
            );
            (x - centre.0).hypot(y - centre.1) < radius * 0.8
        })
        .collect()
}

/// The top class a model gives a crop on its own (crop-level classification).
pub fn crop_class(model: &mut spermscope::core::model::Model, crop: &Path) -> String {
    let img = spermscope::core::imageio::load_rgb(crop).unwrap();
    let logits = model.logits(&[model.preprocessor().crop(&img)]).unwrap();
    let best = logits[0]
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    model.spec.classes[best].clone()
}

/// Crop files turned into `model`'s inputs by its own preprocessor.
pub fn prepared(
    model: &spermscope::core::model::Model,
    crops: &[PathBuf],
) -> Vec<spermscope::core::preprocess::Prepared> {
    crops
        .iter()
        .map(|p| {
            model
                .preprocessor()
                .crop(&spermscope::core::imageio::load_rgb(p).expect("image"))
        })
        .collect()
}

/// Replay `frames` through the daemon with `config`, records to `records`, and read them back.
pub fn replay_records(frames: &Path, config: &Path, records: &Path) -> Vec<serde_json::Value> {
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_spermscope"))
            .env("RUST_LOG", "warn")
            .arg("replay")
            .arg(frames)
            .arg("--config")
            .arg(config)
            .arg("--records")
            .arg(records),
    );
    std::fs::read_to_string(records)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The exported model passes the readers' checks (spec present and agreeing with the graph,
/// the spec read back through ONNX Runtime equal to the one trained with) and gives burn's
/// logits through ONNX Runtime on the trainer's parity images, within 1e-4.
pub fn onnx_parity(model_path: &Path, report: &serde_json::Value) {
    use spermscope::core::model::{Model, RuntimeOptions};
    use spermscope::core::spec::ModelSpec;
    let fin = &report["final_model"];
    let mut model = Model::load(model_path, &RuntimeOptions::default()).expect("load");
    let trained: ModelSpec = serde_json::from_value(fin["spec"].clone()).expect("spec");
    assert_eq!(*model.spec, trained);
    let items: Vec<PathBuf> = serde_json::from_value(fin["parity_items"].clone()).expect("items");
    let want: Vec<Vec<f32>> = serde_json::from_value(fin["parity_logits"].clone()).expect("logits");
    assert!(
        items.len() >= 10,
        "parity needs real images, got {}",
        items.len()
    );
    let got = model.logits(&prepared(&model, &items)).expect("run");
    let worst = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    println!(
        "parity: {} crops, largest |ort - burn| logit difference {worst:.2e}",
        items.len()
    );
    assert!(worst <= 1e-4, "ort and burn logits differ by {worst}");
}
