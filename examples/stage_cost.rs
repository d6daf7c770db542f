//! Where a frame's and a head's CPU goes, one stage at a time on one thread (the profile in
//! `scripts/profile` shows functions; this shows the daemon's stages and the parts of a head's
//! crop path). Runs the bundled verifier and SMIDS model with one ONNX Runtime thread, and
//! keeps one frame's heads on one thread (`share::in_two` told a frame is waiting). Per item:
//! a verifier candidate, a classified head.
//! `cargo run --release --example stage_cost -- [FRAMES_DIR] [FRAMES]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use spermscope::core::imageio;
use spermscope::core::model::{Model, RuntimeOptions};
use spermscope::core::pose::{self, Cut, Jitter, StainMap};
use spermscope::core::preprocess::{CROP_CONTEXT, head_patch};
use spermscope::daemon::segment::{SegmentSettings, Verifier, find_heads_on};
use spermscope::daemon::share;

/// The sperm-parsing fields' scale, the daemon's default.
const UM_PER_PX: f32 = 0.053;

#[derive(Default)]
struct Clock(Vec<(&'static str, Duration, usize)>);

impl Clock {
    fn time<T>(&mut self, name: &'static str, n: usize, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        let d = t.elapsed();
        match self.0.iter_mut().find(|(k, _, _)| *k == name) {
            Some(e) => {
                e.1 += d;
                e.2 += n;
            }
            None => self.0.push((name, d, n)),
        }
        out
    }
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::args().nth(1).map_or_else(
        || root.join("../shared/datasets/sperm-parsing/val/frames"),
        PathBuf::from,
    );
    let limit: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let mut files = imageio::list_files(&dir).unwrap();
    files.truncate(limit);
    let opts = RuntimeOptions {
        threads: 1,
        ..RuntimeOptions::default()
    };
    let load = |name: &str| Model::load(&root.join("models").join(name), &opts).unwrap();
    let mut verifier = Verifier::new(load("head-verifier.onnx"), 0.2).unwrap();
    let mut classifier = load("smids-3class.onnx");
    let pre = classifier.preprocessor();
    let settings = SegmentSettings::default();
    share::frame_waiting(true);
    let mut clock = Clock::default();
    let (mut candidates, mut heads) = (0, 0);
    for f in &files {
        let frame = clock.time("frame: decode", 0, || imageio::load_rgb(f).unwrap());
        let stain = clock.time("frame: stain map", 0, || {
            StainMap::new(&frame, settings.contrast)
        });
        let mut found = clock.time("frame: head finding", 0, || {
            find_heads_on(&stain, &settings)
        });
        candidates += found.len();
        let all: Vec<_> = found.iter().collect();
        let vpre = verifier.model().preprocessor();
        crop_path_parts(&mut clock, &frame, &stain, &all, &vpre, VERIFIER_PARTS);
        clock.time("head: verifier (crop path + network)", found.len(), || {
            verifier
                .retain(&frame, Some(&stain), &mut found, UM_PER_PX)
                .unwrap()
        });
        let kept: Vec<_> = found.iter().filter(|h| !h.at_edge && !h.touching).collect();
        heads += kept.len();
        let n = kept.len();
        let inputs: Vec<_> = clock.time("head: classifier crop path", n, || {
            kept.iter()
                .map(|h| pre.head_in(&frame, Some(&stain), &h.head, Some(UM_PER_PX)))
                .collect()
        });
        clock.time("head: classifier network", n, || {
            classifier.logits(&inputs).unwrap()
        });
        crop_path_parts(&mut clock, &frame, &stain, &kept, &pre, CLASSIFIER_PARTS);
    }
    println!(
        "{} frames from {}: {candidates} candidates, {heads} heads classified",
        files.len(),
        dir.display()
    );
    for (name, d, n) in &clock.0 {
        let ms = d.as_secs_f64() * 1e3;
        let per = if name.starts_with("head") || name.starts_with("  ") {
            format!("{:.3} ms each", ms / (*n).max(1) as f64)
        } else {
            String::new()
        };
        println!(
            "{name:<40} {:>7.2} ms a frame  {per}",
            ms / files.len().max(1) as f64
        );
    }
}

/// Names of the crop-path parts timed for each model.
type Parts = [&'static str; 5];
const VERIFIER_PARTS: Parts = [
    "  verifier part: patch cut",
    "  verifier part: patch stain map cut",
    "  verifier part: head found again",
    "  verifier part: window cut",
    "  verifier part: shape features",
];
const CLASSIFIER_PARTS: Parts = [
    "  classifier part: patch cut",
    "  classifier part: patch stain map cut",
    "  classifier part: head found again",
    "  classifier part: window cut",
    "  classifier part: shape features",
];

/// A model's crop path again, in its parts (not through `Preprocessor`, so with the
/// patch map smoothed afresh).
fn crop_path_parts(
    clock: &mut Clock,
    frame: &image::RgbImage,
    stain: &StainMap,
    kept: &[&spermscope::daemon::segment::FoundHead],
    pre: &spermscope::core::preprocess::Preprocessor,
    names: Parts,
) {
    let spec = pre.spec();
    let scale = spec.crop.um_per_px.map_or(1.0, |t| t / UM_PER_PX);
    let window = spec.crop.window_px * scale;
    for h in kept {
        let (patch, local, (x0, y0)) = clock.time(names[0], 1, || {
            head_patch(frame, &h.head, window * CROP_CONTEXT)
        });
        let (w, hgt) = patch.dimensions();
        let map = clock.time(names[1], 1, || {
            stain.cut(spec.crop.contrast, x0, y0, w, hgt).unwrap()
        });
        let found = clock.time(names[2], 1, || pose::find_head_in_stain(&map).ok());
        let head = found.unwrap_or(local);
        clock.time(names[3], 1, || {
            pose::cut_window(
                &patch,
                &Cut::upright(&head, window),
                spec.input.size_px,
                &Jitter::default(),
            )
        });
        clock.time(names[4], 1, || {
            spermscope::core::morphometry::shape_features(&map, &head, window)
        });
    }
}
