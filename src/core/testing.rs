//! Synthetic images for the library's unit tests: a stained sperm (dark head, lighter
//! acrosome, thin tail) at any angle, and full fields with several of them.

use image::{Rgb, RgbImage};

/// A dark ellipse (head) with a thin dark line (tail) leaving it at `tail_deg`, centred in a
/// square crop of `size` px.
pub(crate) fn synthetic_sperm(size: u32, tail_deg: f32) -> RgbImage {
    let mut img = RgbImage::from_pixel(size, size, Rgb([225, 215, 220]));
    let c = size as f32 / 2.0;
    let t = tail_deg.to_radians();
    let (ux, uy) = (t.cos(), t.sin());
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (x as f32 - c, y as f32 - c);
            let a = dx * ux + dy * uy;
            let b = -dx * uy + dy * ux;
            if (a / 20.0).powi(2) + (b / 13.0).powi(2) <= 1.0 {
                // Front (a < 0) lighter: an acrosome.
                let v = if a < 0.0 { 120 } else { 70 };
                img.put_pixel(x, y, Rgb([v, v / 2, v]));
            } else if a > 0.0 && a < 60.0 && b.abs() < 1.5 {
                img.put_pixel(x, y, Rgb([90, 60, 100]));
            }
        }
    }
    img
}

/// A `width` x `height` field with a synthetic sperm centred at each of `at` (x, y, tail
/// angle in degrees); the crops are 131 px, so keep centres at least 66 px from the border.
pub(crate) fn synthetic_field(width: u32, height: u32, at: &[(u32, u32, f32)]) -> RgbImage {
    let mut field = RgbImage::from_pixel(width, height, Rgb([225, 215, 220]));
    for &(cx, cy, deg) in at {
        let crop = synthetic_sperm(131, deg);
        image::imageops::overlay(&mut field, &crop, i64::from(cx) - 65, i64::from(cy) - 65);
    }
    field
}
