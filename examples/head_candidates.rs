//! Builds the training data of the head verifier: every head candidate the classical segmenter
//! finds in `sperm-parsing` frames, cut as a crop-sized patch and filed under `head/` (it
//! matches an annotated head: centroid inside, IoU ≥ 0.5) or `not_head/`.
//! `cargo run --release --example head_candidates -- SPLIT OUT_DIR [NUCLEUS_MARGIN] [SIDE_PX]
//! [FIRST]` takes the first FIRST frames of SPLIT in name order (all by default); SPLIT may also
//! be a folder of frames with their masks in `heads/` (as `dense_fields` writes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use spermscope::core::imageio;
use spermscope::daemon::segment::{MaskMatch, SegmentSettings, find_heads};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let split = args.get(1).map(String::as_str).unwrap_or("train");
    let out = PathBuf::from(
        args.get(2)
            .map(String::as_str)
            .unwrap_or("out/head-candidates"),
    );
    let margin: f32 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0.6);
    let side: u32 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(166);
    let first: usize = args
        .get(5)
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX);
    let root = if std::path::Path::new(split).join("heads").is_dir() {
        PathBuf::from(split)
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/datasets/sperm-parsing")
            .join(split)
    };
    let frame_dir = if root.join("frames").is_dir() {
        root.join("frames")
    } else {
        root.clone()
    };
    let tag = root.file_name().unwrap().to_string_lossy().into_owned();
    for class in ["head", "not_head"] {
        std::fs::create_dir_all(out.join(class)).unwrap();
    }
    let s = SegmentSettings {
        nucleus_margin: margin,
        ..SegmentSettings::default()
    };
    let mut frames = imageio::list_files(&frame_dir).unwrap();
    frames.truncate(first);
    let (mut truth_n, mut heads, mut others) = (0usize, 0usize, 0usize);
    for f in &frames {
        let img = imageio::load_rgb(f).unwrap();
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let truth = image::open(root.join("heads").join(format!("{stem}.png")))
            .unwrap()
            .to_luma8();
        let found = find_heads(&img, &s);
        let (flags, true_heads) = MaskMatch::flags(&found, &truth);
        truth_n += true_heads;
        for (i, (d, &is_head)) in found.iter().zip(&flags).enumerate() {
            if d.at_edge {
                continue;
            }
            let (cx, cy) = d.head.centroid;
            let half = side as f32 / 2.0;
            let x0 = (cx - half).clamp(0.0, (img.width() - side) as f32) as u32;
            let y0 = (cy - half).clamp(0.0, (img.height() - side) as f32) as u32;
            let patch = image::imageops::crop_imm(&img, x0, y0, side, side).to_image();
            let class = if is_head { "head" } else { "not_head" };
            if is_head {
                heads += 1;
            } else {
                others += 1;
            }
            patch
                .save(out.join(class).join(format!("{tag}_{stem}_{i:02}.png")))
                .unwrap();
        }
    }
    println!(
        "{tag}: {} frames, {truth_n} annotated heads; candidates off the border: {heads} heads (recall {:.3}), {others} not heads (precision {:.3})",
        frames.len(),
        heads as f64 / truth_n as f64,
        heads as f64 / (heads + others).max(1) as f64
    );
}
