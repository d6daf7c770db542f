//! On-the-fly augmentation: geometric jitter applied through the shared upright cut, then
//! colour jitter and cutout on the window. Never applied to validation or test data.

use image::RgbImage;
use rand::Rng;

use super::config::AugmentConfig;
use crate::core::pose::Jitter;

/// Draw the geometric part of an augmentation.
pub fn draw_jitter(cfg: &AugmentConfig, rng: &mut impl Rng) -> (Jitter, bool) {
    let mut j = Jitter::default();
    if rng.random::<f32>() < cfg.rotate_prob {
        j.rotate_deg = rng.random_range(-1.0..=1.0) * cfg.rotate_max_deg;
    }
    j.mirror = rng.random::<f32>() < cfg.mirror_prob;
    if rng.random::<f32>() < cfg.scale_prob {
        j.scale = 1.0 + rng.random_range(-1.0..=1.0) * cfg.scale_range;
    }
    if rng.random::<f32>() < cfg.shift_prob {
        j.shift = (
            rng.random_range(-1.0..=1.0) * cfg.shift_max,
            rng.random_range(-1.0..=1.0) * cfg.shift_max,
        );
    }
    let vflip = rng.random::<f32>() < cfg.flip_vertical_prob;
    if vflip {
        j.rotate_deg += 180.0;
    }
    (j, vflip)
}

/// Colour jitter (brightness, contrast, hue rotation) and cutout, in place.
pub fn photometric(img: &mut RgbImage, cfg: &AugmentConfig, rng: &mut impl Rng) {
    if rng.random::<f32>() < cfg.color_prob {
        let b = 1.0 + rng.random_range(-1.0..=1.0) * cfg.brightness;
        let c = 1.0 + rng.random_range(-1.0..=1.0) * cfg.contrast;
        let h = rng.random_range(-1.0..=1.0) * cfg.hue * std::f32::consts::TAU;
        let mean = mean_rgb(img);
        let m = hue_matrix(h);
        for p in img.pixels_mut() {
            let v = [p[0] as f32, p[1] as f32, p[2] as f32];
            let mut o = [0f32; 3];
            for (r, row) in m.iter().enumerate() {
                o[r] = row[0] * v[0] + row[1] * v[1] + row[2] * v[2];
            }
            for ch in 0..3 {
                let x = ((o[ch] - mean[ch]) * c + mean[ch]) * b;
                p[ch] = x.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    if rng.random::<f32>() < cfg.cutout_prob {
        let (w, h) = img.dimensions();
        let side = ((w.min(h) as f32 * cfg.cutout_frac) as u32).max(1);
        let x0 = rng.random_range(0..=w.saturating_sub(side));
        let y0 = rng.random_range(0..=h.saturating_sub(side));
        let mean = mean_rgb(img);
        let fill = image::Rgb([mean[0] as u8, mean[1] as u8, mean[2] as u8]);
        for y in y0..(y0 + side).min(h) {
            for x in x0..(x0 + side).min(w) {
                img.put_pixel(x, y, fill);
            }
        }
    }
}

fn mean_rgb(img: &RgbImage) -> [f32; 3] {
    let mut s = [0f64; 3];
    for p in img.pixels() {
        for c in 0..3 {
            s[c] += p[c] as f64;
        }
    }
    let n = (img.width() * img.height()).max(1) as f64;
    [(s[0] / n) as f32, (s[1] / n) as f32, (s[2] / n) as f32]
}

/// Rotation of RGB about the grey axis by `angle` radians (a hue shift that keeps luminance
/// roughly constant).
fn hue_matrix(angle: f32) -> [[f32; 3]; 3] {
    let (s, c) = angle.sin_cos();
    let k = (1.0 - c) / 3.0;
    let r = (1.0f32 / 3.0).sqrt() * s;
    [
        [c + k, k - r, k + r],
        [k + r, c + k, k - r],
        [k - r, k + r, c + k],
    ]
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A Gamma(shape, 1) draw (Marsaglia and Tsang; shapes below 1 by the boost u^(1/shape)).
fn gamma(shape: f64, rng: &mut impl Rng) -> f64 {
    if shape < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// The mixup weight: a Beta(alpha, alpha) draw.
pub fn mixup_weight(alpha: f32, rng: &mut impl Rng) -> f32 {
    let a = gamma(f64::from(alpha), rng);
    let b = gamma(f64::from(alpha), rng);
    (a / (a + b).max(f64::MIN_POSITIVE)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn zero_probabilities_leave_the_crop_alone() {
        let cfg = AugmentConfig {
            rotate_prob: 0.0,
            mirror_prob: 0.0,
            flip_vertical_prob: 0.0,
            scale_prob: 0.0,
            shift_prob: 0.0,
            color_prob: 0.0,
            cutout_prob: 0.0,
            ..AugmentConfig::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (j, v) = draw_jitter(&cfg, &mut rng);
        assert!(!v && !j.mirror && j.rotate_deg == 0.0 && j.scale == 1.0);
        let orig = RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 10, y as u8 * 10, 50]));
        let mut img = orig.clone();
        photometric(&mut img, &cfg, &mut rng);
        assert_eq!(img, orig);
    }

    #[test]
    fn hue_rotation_keeps_grey_grey() {
        let m = hue_matrix(1.0);
        let g = [100f32; 3];
        for row in m {
            let v = row[0] * g[0] + row[1] * g[1] + row[2] * g[2];
            assert!((v - 100.0).abs() < 1e-3);
        }
    }

    #[test]
    fn mixup_weights_follow_a_symmetric_beta() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for alpha in [0.2f32, 1.0, 4.0] {
            let w: Vec<f32> = (0..4000).map(|_| mixup_weight(alpha, &mut rng)).collect();
            assert!(w.iter().all(|x| (0.0..=1.0).contains(x)));
            let mean = w.iter().sum::<f32>() / w.len() as f32;
            let var = w.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / w.len() as f32;
            // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
            let want = 1.0 / (4.0 * (2.0 * alpha + 1.0));
            assert!((mean - 0.5).abs() < 0.02, "{alpha}: mean {mean}");
            assert!(
                (var - want).abs() < 0.1 * want + 0.003,
                "{alpha}: var {var} vs {want}"
            );
        }
    }
}
