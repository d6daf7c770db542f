//! Scores full-field head finding on sperm-parsing `val`: a detection counts when its centroid
//! lies inside a true head and their IoU is at least 0.5.
//! `cargo run --release --example segment_score -- [FRAMES]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use spermscope::dataset;
use spermscope::segment::{SegmentSettings, find_heads};

fn main() {
    let root =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/sperm-parsing/val");
    let limit: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let mut frames: Vec<_> = std::fs::read_dir(root.join("frames"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    frames.sort();
    frames.truncate(limit);
    let mut s = SegmentSettings::default();
    if let Some(v) = std::env::var("NUC").ok().and_then(|v| v.parse().ok()) {
        s.nucleus_margin = v;
    }
    let (mut tp, mut fp, mut n_true, mut edge) = (0usize, 0usize, 0usize, 0usize);
    let t0 = std::time::Instant::now();
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
        let mut used = std::collections::HashSet::new();
        for d in find_heads(&img, &s) {
            if d.at_edge {
                edge += 1;
            }
            let (cx, cy) = (d.head.centroid.0 as u32, d.head.centroid.1 as u32);
            let id = truth.get_pixel(cx.min(truth.width() - 1), cy.min(truth.height() - 1))[0];
            let inter = d
                .head
                .pixels
                .iter()
                .filter(|&&(x, y)| truth.get_pixel(x, y)[0] == id)
                .count();
            let iou = if id > 0 {
                inter as f64 / (d.head.area_px() + area[&id] - inter) as f64
            } else {
                0.0
            };
            if id > 0 && iou >= 0.5 && used.insert(id) {
                tp += 1;
            } else {
                fp += 1;
                if std::env::var("VERBOSE").is_ok() {
                    println!(
                        "fp {stem} id {id} iou {iou:.2} area {} elong {:.2} solid {:.2} edge {} at {:?}",
                        d.head.area_px(),
                        d.head.major_px / d.head.minor_px,
                        d.solidity,
                        d.at_edge,
                        d.head.centroid
                    );
                }
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} frames: {} true heads, {} found ({} at edge): precision {:.3} recall {:.3}; {:.1} frames/s (decode + segment)",
        frames.len(),
        n_true,
        tp + fp,
        edge,
        tp as f64 / (tp + fp).max(1) as f64,
        tp as f64 / n_true.max(1) as f64,
        frames.len() as f64 / secs
    );
}
