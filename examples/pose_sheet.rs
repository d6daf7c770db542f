//! Draws a contact sheet of crops and their upright windows, to look at pose correction.
//! `cargo run --release --example pose_sheet -- DATASET OUT.png [N] [WINDOW_PX] [dark|any]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use image::{Rgb, RgbImage, imageops};
use spermscope::core::dataset;
use spermscope::core::imageio;
use spermscope::core::pose::{self, Contrast, Cut, Jitter};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(
        args.get(1)
            .map_or("../shared/datasets/hushem", String::as_str),
    );
    let out = PathBuf::from(args.get(2).map_or("pose_sheet.png", String::as_str));
    let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(24);
    let window: f32 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(96.0);
    let contrast = match args.get(5).map(String::as_str) {
        None | Some("dark") => Contrast::Dark,
        Some("any") => Contrast::Any,
        Some(other) => anyhow::bail!("contrast must be dark or any, not {other}"),
    };
    let ds = dataset::open(&root, "head", None)?;
    let step = (ds.samples.len() / n).max(1);
    let cell = 96u32;
    let cols = 6u32;
    let rows = (n as u32).div_ceil(cols);
    let mut sheet = RgbImage::from_pixel(cols * cell * 2, rows * cell, Rgb([255, 255, 255]));
    for (k, s) in ds.samples.iter().step_by(step).take(n).enumerate() {
        let img = imageio::load_rgb(&s.path)?;
        let (x, y) = ((k as u32 % cols) * cell * 2, (k as u32 / cols) * cell);
        let small = imageops::resize(&img, cell, cell, imageops::FilterType::Triangle);
        imageops::overlay(&mut sheet, &small, x as i64, y as i64);
        if let Ok(head) = pose::find_head_in_crop(&img, contrast) {
            let up = pose::cut_window(&img, &Cut::upright(&head, window), cell, &Jitter::default());
            imageops::overlay(&mut sheet, &up, (x + cell) as i64, y as i64);
            println!(
                "{} {:?} angle {:.0} major {:.0} minor {:.0}",
                s.path.display(),
                head.polarity,
                head.angle_deg(),
                head.major_px,
                head.minor_px
            );
        }
    }
    sheet.save(&out)?;
    Ok(())
}
