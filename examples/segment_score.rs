//! Scores full-field head finding on sperm-parsing `val`: a detection counts when its centroid
//! lies inside a true head and their IoU is at least 0.5.
//! With a head verifier model, candidates it rejects are left out.
//! `cargo run --release --example segment_score -- [FRAMES] [VERIFIER.onnx|-] [MIN_PROB] [SPLIT] [SKIP]`
//! scores FRAMES frames of SPLIT (default `val`) after skipping the first SKIP in name order.
//! SPLIT may also be a folder of frames with their masks in `heads/` (as `dense_fields` writes).
//! `SPLIT_NECK_RATIO` in the environment overrides `segment.split_neck_ratio` (0: no splitting),
//! `SPLIT_OVERLAPPING=false` turns `segment.split_overlapping` off.
//! Also prints why the heads not matched were missed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use spermscope::core::imageio;
use spermscope::core::model::{Model, RuntimeOptions};
use spermscope::daemon::segment::{FoundHead, MaskMatch, SegmentSettings, Verifier, find_heads};

fn main() {
    let split = std::env::args().nth(4).unwrap_or_else(|| "val".into());
    let skip: usize = std::env::args()
        .nth(5)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let root = if std::path::Path::new(&split).join("heads").is_dir() {
        PathBuf::from(&split)
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/datasets/sperm-parsing")
            .join(&split)
    };
    let frame_dir = if root.join("frames").is_dir() {
        root.join("frames")
    } else {
        root.clone()
    };
    let limit: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let mut frames = imageio::list_files(&frame_dir).unwrap();
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
    let mut s = SegmentSettings::default();
    if let Ok(v) = std::env::var("SPLIT_NECK_RATIO") {
        s.split_neck_ratio = v.parse().expect("SPLIT_NECK_RATIO");
    }
    if let Ok(v) = std::env::var("SPLIT_OVERLAPPING") {
        s.split_overlapping = v.parse().expect("SPLIT_OVERLAPPING");
    }
    let mut total = MaskMatch::default();
    let mut edge = 0;
    let mut why = Missed::default();
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
        why.add(&found, &truth, s.min_area_px);
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
    println!(
        "missed heads: {} merged with another head, {} found in part (IoU < 0.5), {} not found ({} of them under the smallest head area where visible)",
        why.merged, why.partial, why.unseen, why.small
    );
}

/// Why true heads were not matched.
#[derive(Default)]
struct Missed {
    merged: usize,
    partial: usize,
    unseen: usize,
    small: usize,
}

impl Missed {
    fn add(&mut self, found: &[FoundHead], truth: &image::GrayImage, min_area: usize) {
        let (flags, _) = MaskMatch::flags(found, truth);
        let mut area: HashMap<u8, usize> = HashMap::new();
        for p in truth.pixels().filter(|p| p[0] > 0) {
            *area.entry(p[0]).or_default() += 1;
        }
        let mut matched = HashSet::new();
        // Per detection: how many pixels of each true head it covers.
        let covers: Vec<HashMap<u8, usize>> = found
            .iter()
            .map(|d| {
                let mut c: HashMap<u8, usize> = HashMap::new();
                for &(x, y) in &d.head.pixels {
                    let id = truth.get_pixel(x, y)[0];
                    if id > 0 {
                        *c.entry(id).or_default() += 1;
                    }
                }
                c
            })
            .collect();
        for (d, ok) in found.iter().zip(&flags) {
            if *ok {
                let (cx, cy) = (d.head.centroid.0 as u32, d.head.centroid.1 as u32);
                matched.insert(truth.get_pixel(cx, cy)[0]);
            }
        }
        for (&id, &a) in &area {
            if matched.contains(&id) {
                continue;
            }
            let mut touched = covers.iter().filter(|c| c.contains_key(&id)).peekable();
            if touched.peek().is_none() {
                self.unseen += 1;
                self.small += usize::from(a < min_area);
            } else if touched.any(|c| {
                c.get(&id).is_some_and(|&n| n * 10 >= a * 3)
                    && c.iter().any(|(&o, &n)| o != id && n * 10 >= area[&o] * 3)
            }) {
                self.merged += 1;
            } else {
                self.partial += 1;
            }
        }
    }
}
