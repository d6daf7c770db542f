//! Head-verifier training data from another acquisition: crops of a labelled crop dataset
//! (SMIDS, HuSHeM) pasted into montage fields, the fields brought to the verifier's scale (the
//! scale `spermscope calibrate` finds for them, resampled to 0.053 µm/px), and every candidate
//! the classical segmenter finds there cut as a patch like `head_candidates` cuts them: `head`
//! when its centroid lies in a pasted sperm crop (the nearest candidate only), `not_head`
//! otherwise (non-sperm crops, fragments, background).
//! `cargo run --release --example montage_candidates -- DATASET OUT_DIR FIELDS SEED [TAG] [SIDE_PX]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use image::imageops::FilterType;
use spermscope::core::pose::Contrast;
use spermscope::daemon::calibrate;
use spermscope::daemon::segment::{SegmentSettings, find_heads};
use spermscope::daemon::source::montage::{Layout, Montage};

/// The scale of the `sperm-parsing` fields, which the verifier was trained at.
const VERIFIER_UM_PER_PX: f32 = 0.053;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dataset = PathBuf::from(&args[1]);
    let out = PathBuf::from(&args[2]);
    let fields: u64 = args[3].parse().unwrap();
    let seed: u64 = args[4].parse().unwrap();
    let tag = args.get(5).cloned().unwrap_or_else(|| "montage".into());
    let side: u32 = args.get(6).and_then(|s| s.parse().ok()).unwrap_or(166);
    for class in ["head", "not_head"] {
        std::fs::create_dir_all(out.join(class)).unwrap();
    }
    let layout = Layout {
        width_px: 1280,
        height_px: 1024,
        cells_per_frame: 8,
        seed,
    };
    let montage = Montage::open(&dataset, layout).unwrap();
    let made: Vec<_> = (1..=fields).map(|i| montage.field(i)).collect();
    let imgs: Vec<_> = made.iter().map(|(img, _)| img.clone()).collect();
    let um = calibrate::estimate(&imgs, Contrast::Dark)
        .unwrap()
        .um_per_px;
    let factor = um / VERIFIER_UM_PER_PX;
    let s = SegmentSettings {
        nucleus_margin: 0.0,
        ..SegmentSettings::default()
    };
    let (mut sperm_n, mut heads, mut others) = (0usize, 0usize, 0usize);
    for (i, (img, placed)) in made.iter().enumerate() {
        let (w, h) = img.dimensions();
        let (nw, nh) = (
            (w as f32 * factor).round() as u32,
            (h as f32 * factor).round() as u32,
        );
        let img = image::imageops::resize(img, nw, nh, FilterType::Triangle);
        let found = find_heads(&img, &s);
        // Each pasted sperm crop is one head: its nearest candidate within the crop's disc.
        let mut label = vec![false; found.len()];
        for p in placed.iter().filter(|p| p.class != "non-sperm") {
            sperm_n += 1;
            let (cx, cy, r) = (p.centre.0 * factor, p.centre.1 * factor, p.radius * factor);
            let nearest = found
                .iter()
                .enumerate()
                .map(|(k, f)| (k, (f.head.centroid.0 - cx).hypot(f.head.centroid.1 - cy)))
                .filter(|&(_, d)| d < 0.8 * r)
                .min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((k, _)) = nearest {
                label[k] = true;
            }
        }
        for (k, f) in found.iter().enumerate() {
            if f.at_edge || nw < side || nh < side {
                continue;
            }
            let (cx, cy) = f.head.centroid;
            let half = side as f32 / 2.0;
            let x0 = (cx - half).clamp(0.0, (nw - side) as f32) as u32;
            let y0 = (cy - half).clamp(0.0, (nh - side) as f32) as u32;
            let patch = image::imageops::crop_imm(&img, x0, y0, side, side).to_image();
            let class = if label[k] { "head" } else { "not_head" };
            if label[k] {
                heads += 1;
            } else {
                others += 1;
            }
            patch
                .save(
                    out.join(class)
                        .join(format!("{tag}_{:03}_{k:02}.png", i + 1)),
                )
                .unwrap();
        }
    }
    println!(
        "{tag}: {fields} fields at {um:.4} µm/px (resampled x{factor:.3}), {sperm_n} sperm pasted; candidates off the border: {heads} heads (recall {:.3}), {others} not heads",
        heads as f64 / sperm_n.max(1) as f64
    );
}
