//! Full-field head finding scored on the sperm-parsing `val` frames and their head masks: a
//! detection counts when its centroid lies inside a true head and their IoU is at least 0.5.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;

use spermscope::core::imageio;
use spermscope::daemon::segment::{MaskMatch, SegmentSettings, find_heads};

/// The `sperm-parsing` val folder and every fourth of its frames in name order (quick; the
/// example `segment_score` scores all 128).
fn every_fourth_val_frame() -> (PathBuf, Vec<PathBuf>) {
    let root = common::dataset("sperm-parsing/val");
    let mut frames: Vec<_> = std::fs::read_dir(root.join("frames"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    frames.sort();
    let frames = frames.into_iter().step_by(4).collect();
    (root, frames)
}

#[test]
fn classical_segmentation_finds_heads_in_full_fields() {
    let (root, frames) = every_fourth_val_frame();
    let s = SegmentSettings::default();
    let mut total = MaskMatch::default();
    for f in &frames {
        let img = imageio::load_rgb(f).unwrap();
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let truth = image::open(root.join("heads").join(format!("{stem}.png")))
            .unwrap()
            .to_luma8();
        total.add(MaskMatch::score(&find_heads(&img, &s), &truth));
    }
    let (precision, recall) = (total.precision(), total.recall());
    println!(
        "{} frames, {} heads: precision {precision:.3}, recall {recall:.3}",
        frames.len(),
        total.true_heads
    );
    // Floors under the measured figures (all 128 frames: precision 0.89, recall 0.96).
    assert!(recall >= 0.92, "recall {recall:.3}");
    assert!(precision >= 0.85, "precision {precision:.3}");
}

/// A real head of each val frame with a copy of it pasted beside it, the two outlines
/// overlapping by 3 px in their widest row: touching heads as crowded preparations have them.
/// Splitting must find both heads of most pairs; without it most pairs are one region.
#[test]
fn touching_real_heads_are_found_as_two() {
    let (root, frames) = every_fourth_val_frame();
    let split = SegmentSettings::default();
    let unsplit = SegmentSettings {
        split_neck_ratio: 0.0,
        split_overlapping: false,
        ..split.clone()
    };
    let (mut pairs, mut both_split, mut both_unsplit) = (0, 0, 0);
    for f in &frames {
        let mut img = imageio::load_rgb(f).unwrap();
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let heads = image::open(root.join("heads").join(format!("{stem}.png")))
            .unwrap()
            .to_luma8();
        let parts = image::open(root.join("parts").join(format!("{stem}.png")))
            .unwrap()
            .to_luma8();
        let (w, h) = heads.dimensions();
        // The frame's first head (by id) that the copy can sit right of on clear background.
        let Some((px, shift)) = (1..=heads.pixels().map(|p| p[0]).max().unwrap_or(0))
            .filter_map(|id| {
                let px: Vec<(u32, u32)> = heads
                    .enumerate_pixels()
                    .filter(|(_, _, p)| p[0] == id)
                    .map(|(x, y, _)| (x, y))
                    .collect();
                // Each row's width; the copy moves right by the widest less the overlap.
                let mut rows: std::collections::HashMap<u32, (u32, u32)> = Default::default();
                for &(x, y) in &px {
                    let r = rows.entry(y).or_insert((x, x));
                    *r = (r.0.min(x), r.1.max(x));
                }
                let widest = rows.values().map(|&(a, b)| b - a + 1).max()?;
                let shift = widest - 3;
                let clear = px.iter().all(|&(x, y)| {
                    let (tx, ty) = (x + shift, y);
                    x > 0
                        && y > 0
                        && y + 1 < h
                        && tx + 1 < w
                        && (parts.get_pixel(tx, ty)[0] == 0 || heads.get_pixel(tx, ty)[0] == id)
                });
                clear.then_some((px, shift))
            })
            .next()
        else {
            continue;
        };
        let mut truth = image::GrayImage::new(w, h);
        for &(x, y) in &px {
            truth.put_pixel(x, y, image::Luma([1]));
        }
        let original = img.clone();
        for &(x, y) in &px {
            img.put_pixel(x + shift, y, *original.get_pixel(x, y));
            truth.put_pixel(x + shift, y, image::Luma([2]));
        }
        let matched = |s: &SegmentSettings| {
            let found = find_heads(&img, s);
            MaskMatch::flags(&found, &truth)
                .0
                .iter()
                .filter(|&&m| m)
                .count()
        };
        pairs += 1;
        both_split += usize::from(matched(&split) == 2);
        both_unsplit += usize::from(matched(&unsplit) == 2);
    }
    println!(
        "{pairs} touching pairs: both heads found in {both_split} with splitting, {both_unsplit} without"
    );
    assert!(pairs >= 20, "{pairs} pairs");
    assert!(both_split * 10 >= pairs * 8, "{both_split} of {pairs}");
    assert!(both_unsplit * 2 < pairs, "{both_unsplit} of {pairs}");
}
