//! Full-field head finding scored on the sperm-parsing `val` frames and their head masks: a
//! detection counts when its centroid lies inside a true head and their IoU is at least 0.5.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use spermscope::core::imageio;
use spermscope::daemon::segment::{MaskMatch, SegmentSettings, find_heads};

#[test]
fn classical_segmentation_finds_heads_in_full_fields() {
    let root = common::dataset("sperm-parsing/val");
    let mut frames: Vec<_> = std::fs::read_dir(root.join("frames"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    frames.sort();
    // Every fourth frame keeps the test quick; the example `segment_score` scores all 128.
    let frames: Vec<_> = frames.into_iter().step_by(4).collect();
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
