//! The frame scale from the heads: `spermscope calibrate` on fields shown at other scales finds
//! their scale, and a daemon run at a wrong scale says so (WARN, counter, suggestion).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The project's scale for the sperm-parsing fields (README: heads of about 3800 px at
/// about 10.5 µm²).
const PARSING_UM_PER_PX: f64 = 0.053;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_spermscope"));
    c.env("RUST_LOG", "warn");
    c
}

/// The first `n` val fields resized by `factor` (a factor of 0.5 is a lens of half the
/// magnification: twice the µm per pixel).
fn fields_at(factor: f32, n: usize, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let frames =
        spermscope::core::imageio::list_files(&common::dataset("sperm-parsing/val/frames"))
            .unwrap();
    for f in frames.iter().take(n) {
        let img = image::open(f).unwrap().to_rgb8();
        let (w, h) = img.dimensions();
        let (nw, nh) = ((w as f32 * factor) as u32, (h as f32 * factor) as u32);
        let out = image::imageops::resize(&img, nw, nh, image::imageops::FilterType::Triangle);
        out.save(dir.join(f.file_name().unwrap()).with_extension("png"))
            .unwrap();
    }
}

#[test]
fn calibrate_finds_the_scale_of_fields_shown_at_other_magnifications() {
    let dir = tempfile::tempdir().unwrap();
    for factor in [1.0f32, 0.5, 1.5] {
        let frames = dir.path().join(format!("x{factor}"));
        fields_at(factor, 16, &frames);
        let picture = dir.path().join(format!("x{factor}.png"));
        let out = common::run_ok(
            bin()
                .arg("calibrate")
                .arg(&frames)
                .arg("--json")
                .arg("--picture")
                .arg(&picture),
        );
        let e: Value = serde_json::from_slice(&out.stdout).unwrap();
        let got = e["um_per_px"].as_f64().unwrap();
        let want = PARSING_UM_PER_PX / f64::from(factor);
        println!(
            "calibrate at x{factor}: suggested {got:.4} µm/px, true {want:.4} ({} heads)",
            e["heads"]
        );
        assert!(
            (got / want - 1.0).abs() <= 0.15,
            "x{factor}: {got} vs {want}"
        );
        assert!(e["heads"].as_u64().unwrap() >= 20);
        assert!(image::open(&picture).unwrap().width() > 100);
    }
}

fn replay_at(um_per_px: f64, dir: &Path) -> (Value, String) {
    let cfg = dir.join(format!("at-{um_per_px}.toml"));
    std::fs::write(
        &cfg,
        format!("[source]\num_per_px = {um_per_px}\n[report]\nprint = false\n"),
    )
    .unwrap();
    let summary = dir.join(format!("summary-{um_per_px}.json"));
    let out = common::run_ok(
        bin()
            .arg("replay")
            .arg(common::dataset("sperm-parsing/val/frames"))
            .arg("--config")
            .arg(&cfg)
            .arg("--records")
            .arg(dir.join(format!("r-{um_per_px}.jsonl")))
            .arg("--summary")
            .arg(&summary),
    );
    let s: Value = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    (s, String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn a_wrong_scale_is_warned_once_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let (wrong, log) = replay_at(0.1, dir.path());
    let c = &wrong["counts"];
    assert_eq!(c["scale_warnings_total"], 1, "{c}");
    let suggested = c["suggested_um_per_px"].as_f64().unwrap();
    assert!(
        (suggested / PARSING_UM_PER_PX - 1.0).abs() <= 0.15,
        "{suggested}"
    );
    assert_eq!(
        log.matches("head sizes disagree with source.um_per_px = 0.1")
            .count(),
        1,
        "{log}"
    );
    let (right, log) = replay_at(PARSING_UM_PER_PX, dir.path());
    assert_eq!(right["counts"]["scale_warnings_total"], 0, "{log}");
    assert!(!log.contains("head sizes disagree"));
}
