//! One sperm, one count: the `sperm-parsing/val` fields each seen by a "camera" for several
//! frames (a few pixels of stage drift a frame, every frame JPEG re-encoded) must give one
//! cell per head, as the same fields seen once do, and each head must keep one track id
//! across its frames (checked against the head masks).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use image::GrayImage;
use serde_json::Value;
use spermscope::daemon::source::montage::drifted;

const FIELDS: usize = 48;
const REPEATS: i64 = 5;

/// Stage drift at the `k`th frame of a field, px.
fn drift(k: i64) -> (i64, i64) {
    (3 * k, -2 * k)
}

fn replay(frames: &Path, out: &Path) -> (Vec<Value>, Value) {
    let (rec, rep) = (out.join("records.jsonl"), out.join("report.json"));
    let o = Command::new(env!("CARGO_BIN_EXE_spermscope"))
        .env("RUST_LOG", "warn")
        .arg("replay")
        .arg(frames)
        .arg("--records")
        .arg(&rec)
        .arg("--report")
        .arg(&rep)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let records = std::fs::read_to_string(&rec)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let report = serde_json::from_str(&std::fs::read_to_string(&rep).unwrap()).unwrap();
    (records, report)
}

#[test]
fn a_field_seen_in_many_frames_counts_each_head_once() {
    let root = common::dataset("sperm-parsing/val");
    let dir = tempfile::tempdir().unwrap();
    let (still, live) = (dir.path().join("still"), dir.path().join("live"));
    std::fs::create_dir_all(&still).unwrap();
    std::fs::create_dir_all(&live).unwrap();
    let mut fields: Vec<PathBuf> = std::fs::read_dir(root.join("frames"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    fields.sort();
    fields.truncate(FIELDS);
    let mut masks: Vec<GrayImage> = Vec::new();
    for (f, path) in fields.iter().enumerate() {
        std::fs::copy(path, still.join(format!("{f:03}.jpg"))).unwrap();
        let img = image::open(path).unwrap().to_rgb8();
        for k in 0..REPEATS {
            let frame = drifted(&img, drift(k));
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
                .encode_image(&frame)
                .unwrap();
            std::fs::write(live.join(format!("{f:03}-{k}.jpg")), jpeg).unwrap();
        }
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        masks.push(
            image::open(root.join("heads").join(format!("{stem}.png")))
                .unwrap()
                .to_luma8(),
        );
    }
    std::fs::create_dir_all(dir.path().join("live-out")).unwrap();
    std::fs::create_dir_all(dir.path().join("still-out")).unwrap();
    let (_, still_report) = replay(&still, &dir.path().join("still-out"));
    let (records, report) = replay(&live, &dir.path().join("live-out"));
    let truth: usize = masks
        .iter()
        .map(|m| {
            m.pixels()
                .map(|p| p[0])
                .filter(|&v| v > 0)
                .collect::<BTreeSet<u8>>()
                .len()
        })
        .sum();

    // Each true head's track ids over its frames (a detection belongs to the head whose
    // drifted mask holds its centroid).
    let mut ids: BTreeMap<(usize, u8), BTreeSet<u64>> = BTreeMap::new();
    for r in records.iter().filter(|r| r["kind"] == "detection") {
        let name = r["frame"]["name"].as_str().unwrap();
        let (f, k) = name.trim_end_matches(".jpg").split_once('-').unwrap();
        let (f, k): (usize, i64) = (f.parse().unwrap(), k.parse().unwrap());
        let (dx, dy) = drift(k);
        let (x, y) = (
            r["centroid"][0].as_f64().unwrap() as i64 - dx,
            r["centroid"][1].as_f64().unwrap() as i64 - dy,
        );
        let m = &masks[f];
        if x < 0 || y < 0 || x >= i64::from(m.width()) || y >= i64::from(m.height()) {
            continue;
        }
        let id = m.get_pixel(x as u32, y as u32)[0];
        if id > 0 {
            ids.entry((f, id))
                .or_default()
                .insert(r["track"].as_u64().unwrap());
        }
    }
    let one_id = ids.values().filter(|t| t.len() == 1).count();
    let cells = report["cells_recorded"].as_u64().unwrap() as f64;
    let once = still_report["cells_recorded"].as_u64().unwrap() as f64;
    println!(
        "tracking: {FIELDS} fields x {REPEATS} frames: {} detections, {cells} cells (each field once: {once}; true heads {truth}); {one_id} of {} heads found kept one track id",
        report["detections"],
        ids.len()
    );
    // Without tracking this would be five times as many.
    assert!(
        (cells - once).abs() <= 0.03 * once,
        "{cells} cells vs {once} seen once"
    );
    // The cells include what head finding takes for heads and is not (precision 0.96 on val):
    // 254 cells against 245 true heads on 2026-11-30, when a head with its midpiece left on it
    // was first found (252 before), so 5% either way.
    assert!(
        (cells - truth as f64).abs() <= 0.05 * truth as f64,
        "{cells} cells vs {truth} true heads"
    );
    assert!(
        ids.len() * 100 >= truth * 93,
        "{} of {truth} heads found",
        ids.len()
    );
    assert!(
        one_id * 100 >= ids.len() * 97,
        "{one_id} of {} heads kept one id",
        ids.len()
    );
    assert!(report["detections"].as_u64().unwrap() as f64 > 4.5 * once);
}
