//! Scores full-field head finding on sperm-parsing `val`: a detection counts when its centroid
//! lies inside a true head and their IoU is at least 0.5.
//! `cargo run --release --example segment_score -- [FRAMES]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use spermscope::dataset;
use spermscope::segment::{MaskMatch, SegmentSettings, find_heads};

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
    let s = SegmentSettings::default();
    let mut total = MaskMatch::default();
    let mut edge = 0;
    let t0 = std::time::Instant::now();
    for f in &frames {
        let img = dataset::load_rgb(f).unwrap();
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let truth = image::open(root.join("heads").join(format!("{stem}.png")))
            .unwrap()
            .to_luma8();
        let found = find_heads(&img, &s);
        edge += found.iter().filter(|d| d.at_edge).count();
        total.add(MaskMatch::score(&found, &truth));
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{} frames: {} true heads, {} found ({edge} at edge): precision {:.3} recall {:.3}; {:.1} frames/s (decode + segment)",
        frames.len(),
        total.true_heads,
        total.found,
        total.precision(),
        total.recall(),
        frames.len() as f64 / secs
    );
}
