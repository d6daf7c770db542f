//! On-the-fly augmentation: geometric jitter applied through the shared upright cut, then
//! stain, colour, blur, noise and cutout on the window. Never applied to validation or test
//! data. An augmentation whose probability is 0 draws no random number, so adding one leaves
//! the recipes without it exactly as they were.

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

/// Stain jitter, colour jitter (brightness, contrast, hue rotation), saturation, grey, blur,
/// noise and cutout, in place.
pub fn photometric(img: &mut RgbImage, cfg: &AugmentConfig, rng: &mut impl Rng) {
    if drawn(cfg.stain_prob, rng) {
        let scale: [f32; 3] =
            std::array::from_fn(|_| 1.0 + rng.random_range(-1.0..=1.0) * cfg.stain_scale);
        let shift: [f32; 3] =
            std::array::from_fn(|_| rng.random_range(-1.0..=1.0) * cfg.stain_shift);
        stain_jitter(img, scale, shift);
    }
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
    if drawn(cfg.saturation_prob, rng) {
        saturate(img, 1.0 + rng.random_range(-1.0..=1.0) * cfg.saturation);
    }
    if drawn(cfg.grayscale_prob, rng) {
        saturate(img, 0.0);
    }
    if drawn(cfg.blur_prob, rng) {
        let sigma = rng.random_range(0.0..=1.0) * cfg.blur_max_sigma;
        if sigma > 0.2 {
            *img = imageproc::filter::gaussian_blur_f32(img, sigma);
        }
    }
    if drawn(cfg.noise_prob, rng) {
        let std = rng.random_range(0.0..=1.0) * cfg.noise_max_std;
        for p in img.pixels_mut() {
            for ch in 0..3 {
                let x = p[ch] as f32 + normal(rng) as f32 * std;
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

/// Whether an augmentation of probability `p` applies; with `p` = 0 no number is drawn.
fn drawn(p: f32, rng: &mut impl Rng) -> bool {
    p > 0.0 && rng.random::<f32>() < p
}

/// Scale and shift each channel's optical density, -ln((v + 1) / 256): a stain that takes
/// more or less, or a lamp of another colour. White stays near white (its density is near 0).
fn stain_jitter(img: &mut RgbImage, scale: [f32; 3], shift: [f32; 3]) {
    let lut: [[u8; 256]; 3] = std::array::from_fn(|ch| {
        std::array::from_fn(|v| {
            let od = -((v as f32 + 1.0) / 256.0).ln();
            let od = (od * scale[ch] + shift[ch]).max(0.0);
            (256.0 * (-od).exp() - 1.0).round().clamp(0.0, 255.0) as u8
        })
    });
    for p in img.pixels_mut() {
        for ch in 0..3 {
            p[ch] = lut[ch][p[ch] as usize];
        }
    }
}

/// Move each pixel toward (factor < 1) or away from (factor > 1) its luminance; 0 gives grey.
fn saturate(img: &mut RgbImage, factor: f32) {
    for p in img.pixels_mut() {
        let l = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
        for ch in 0..3 {
            p[ch] = (l + (p[ch] as f32 - l) * factor).round().clamp(0.0, 255.0) as u8;
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
        assert_eq!(
            [
                cfg.stain_prob,
                cfg.saturation_prob,
                cfg.grayscale_prob,
                cfg.blur_prob,
                cfg.noise_prob
            ],
            [0.0; 5],
            "acquisition augmentations are off unless a recipe asks"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (j, v) = draw_jitter(&cfg, &mut rng);
        assert!(!v && !j.mirror && j.rotate_deg == 0.0 && j.scale == 1.0);
        let orig = RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 10, y as u8 * 10, 50]));
        let mut img = orig.clone();
        photometric(&mut img, &cfg, &mut rng);
        assert_eq!(img, orig);
    }

    #[test]
    fn acquisition_augmentations_change_the_window_as_described() {
        let orig = RgbImage::from_fn(24, 24, |x, y| {
            if (x as i32 - 12).pow(2) + (y as i32 - 12).pow(2) < 36 {
                image::Rgb([90, 40, 120])
            } else {
                image::Rgb([235, 225, 230])
            }
        });
        let stain = orig.get_pixel(12, 12).0;
        // Optical density scaled by 1.5 in red only: the stain gets darker in red, white stays
        // almost white, the other channels do not move.
        let mut img = orig.clone();
        stain_jitter(&mut img, [1.5, 1.0, 1.0], [0.0; 3]);
        let p = img.get_pixel(12, 12).0;
        let want = (256.0 * ((stain[0] as f32 + 1.0) / 256.0).powf(1.5) - 1.0).round() as u8;
        assert!(
            p[0].abs_diff(want) <= 1 && p[0] < stain[0],
            "{p:?} vs {want}"
        );
        assert_eq!((p[1], p[2]), (stain[1], stain[2]));
        let bg = img.get_pixel(0, 0)[0];
        assert!(bg < 235 && 235 - bg < stain[0] - p[0], "{bg}");
        let mut white = RgbImage::from_pixel(2, 2, image::Rgb([255; 3]));
        stain_jitter(&mut white, [1.5, 0.7, 1.2], [0.0; 3]);
        assert!(white.pixels().all(|p| p.0 == [255; 3]));
        // Unit scale and no shift change nothing.
        let mut same = orig.clone();
        stain_jitter(&mut same, [1.0; 3], [0.0; 3]);
        assert_eq!(same, orig);
        // Grey: equal channels; saturation 1: unchanged.
        let mut grey = orig.clone();
        saturate(&mut grey, 0.0);
        assert!(grey.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
        let mut one = orig.clone();
        saturate(&mut one, 1.0);
        assert_eq!(one, orig);
        // Every augmentation on at once keeps the size and changes the pixels; with their
        // probabilities at 0 the random stream is the one the recipes without them draw.
        let all = AugmentConfig {
            stain_prob: 1.0,
            saturation_prob: 1.0,
            grayscale_prob: 0.0,
            blur_prob: 1.0,
            noise_prob: 1.0,
            ..AugmentConfig::default()
        };
        let mut img = orig.clone();
        photometric(&mut img, &all, &mut ChaCha8Rng::seed_from_u64(5));
        assert_eq!(img.dimensions(), orig.dimensions());
        assert_ne!(img, orig);
        let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(6), ChaCha8Rng::seed_from_u64(6));
        let (mut x, mut y) = (orig.clone(), orig.clone());
        photometric(&mut x, &AugmentConfig::default(), &mut a);
        photometric(
            &mut y,
            &AugmentConfig {
                stain_scale: 0.9,
                blur_max_sigma: 5.0,
                ..AugmentConfig::default()
            },
            &mut b,
        );
        assert_eq!(x, y);
        assert_eq!(a.random::<u64>(), b.random::<u64>());
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
