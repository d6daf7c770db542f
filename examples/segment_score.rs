//! Scores full-field head finding on sperm-parsing `val`: a detection counts when its centroid
//! lies inside a true head and their IoU is at least 0.5.
//! With a head verifier model, candidates it rejects are left out.
//! `cargo run --release --example segment_score -- [FRAMES] [VERIFIER.onnx|-] [MIN_PROB] [SPLIT] [SKIP]`
//! scores FRAMES frames of SPLIT (default `val`) after skipping the first SKIP in name order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use spermscope::core::imageio;
use spermscope::core::model::{Model, RuntimeOptions};
use spermscope::daemon::segment::{MaskMatch, SegmentSettings, Verifier, find_heads};

fn main() {
    let split = std::env::args().nth(4).unwrap_or_else(|| "val".into());
    let skip: usize = std::env::args()
        .nth(5)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/datasets/sperm-parsing")
        .join(&split);
    let limit: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let mut frames = imageio::list_files(&root.join("frames")).unwrap();
    frames.drain(..skip.min(frames.len()));
    frames.truncate(limit);
    let mut verifier = std::env::args().nth(2).filter(|p| p != "-").map(|p| {
        let min_prob = std::env::args()
            .nth(3)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.5);
        let model = Model::load(std::path::Path::new(&p), &RuntimeOptions::default()).unwrap();
        Verifier::new(model, min_prob).unwrap()
    });
    let s = SegmentSettings::default();
    let mut total = MaskMatch::default();
    let mut edge = 0;
    let t0 = std::time::Instant::now();
    for f in &frames {
        let img = imageio::load_rgb(f).unwrap();
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let truth = image::open(root.join("heads").join(format!("{stem}.png")))
            .unwrap()
            .to_luma8();
        let mut found = find_heads(&img, &s);
        if let Some(v) = &mut verifier {
            v.retain(&img, None, &mut found, 0.053).unwrap();
        }
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
