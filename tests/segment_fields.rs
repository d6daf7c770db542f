//! Full-field head finding scored on the sperm-parsing `val` frames and their head masks: a
//! detection counts when its centroid lies inside a true head and their IoU is at least 0.5.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};

use spermscope::dataset;
use spermscope::segment::{SegmentSettings, find_heads};

#[test]
fn classical_segmentation_finds_heads_in_full_fields() {
    let root = common::datasets().join("sperm-parsing/val");
    let mut frames: Vec<_> = std::fs::read_dir(root.join("frames"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    frames.sort();
    // Every fourth frame keeps the test quick; the example `segment_score` scores all 128.
    let frames: Vec<_> = frames.into_iter().step_by(4).collect();
    let s = SegmentSettings::default();
    let (mut tp, mut found, mut n_true) = (0usize, 0usize, 0usize);
    for f in &frames {
        let img = dataset::load_rgb(f).unwrap();
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let truth = image::open(root.join("heads").join(format!("{stem}.png")))
            .unwrap()
            .to_luma8();
        let mut area: HashMap<u8, usize> = HashMap::new();
        for p in truth.pixels() {
            if p[0] > 0 {
                *area.entry(p[0]).or_default() += 1;
            }
        }
        n_true += area.len();
        let mut used = HashSet::new();
        for d in find_heads(&img, &s) {
            found += 1;
            let (cx, cy) = (d.head.centroid.0 as u32, d.head.centroid.1 as u32);
            let id = truth.get_pixel(cx, cy)[0];
            if id == 0 {
                continue;
            }
            let inter = d
                .head
                .pixels
                .iter()
                .filter(|&&(x, y)| truth.get_pixel(x, y)[0] == id)
                .count();
            let iou = inter as f64 / (d.head.area_px() + area[&id] - inter) as f64;
            if iou >= 0.5 && used.insert(id) {
                tp += 1;
            }
        }
    }
    let precision = tp as f64 / found.max(1) as f64;
    let recall = tp as f64 / n_true.max(1) as f64;
    println!(
        "{} frames, {n_true} heads: precision {precision:.3}, recall {recall:.3}",
        frames.len()
    );
    // Floors under the measured figures (all 128 frames: precision 0.89, recall 0.96).
    assert!(recall >= 0.92, "recall {recall:.3}");
    assert!(precision >= 0.85, "precision {precision:.3}");
}
