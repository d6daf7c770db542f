//! How far the field moved between two frames, and whether it is the same field at all: phase
//! correlation of small grey copies of the frames. The peak of the correlation surface gives
//! the shift; its height (1 for a pure shift, near 0 for unrelated images) tells a stage drift
//! from a move to a new field.

use std::sync::Arc;

use image::{GrayImage, RgbImage};
use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};

/// Side of the square the frame is shrunk into (a power of two, for the FFT).
const SIDE: usize = 128;

/// A frame's normalised spectrum, ready to be correlated with the next frame's.
#[derive(Clone)]
pub struct Spectrum {
    values: Vec<Complex32>,
    /// Frame pixels per spectrum pixel, per axis.
    scale: (f32, f32),
}

impl std::fmt::Debug for Spectrum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spectrum")
            .field("scale", &self.scale)
            .finish()
    }
}

/// How one frame lies on the previous one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Motion {
    /// Shift of the field from the previous frame to this one, frame pixels.
    pub shift: (f32, f32),
    /// Height of the correlation peak: near 1 for the same field shifted, near 0 for another
    /// field.
    pub peak: f32,
}

/// FFT plans for `SIDE`-long rows, made once per tracker.
pub struct Registrar {
    forward: Arc<dyn Fft<f32>>,
    inverse: Arc<dyn Fft<f32>>,
}

impl Default for Registrar {
    fn default() -> Self {
        let mut planner = FftPlanner::new();
        Self {
            forward: planner.plan_fft_forward(SIDE),
            inverse: planner.plan_fft_inverse(SIDE),
        }
    }
}

impl std::fmt::Debug for Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registrar")
    }
}

/// An image (`channels` bytes a pixel, `w` x `h`) shrunk to `SIDE` x `SIDE` box means of
/// `value`, which sums the pixels of a run of one row; and frame pixels per bin, per axis. The
/// sums are exact integers.
fn shrink(
    raw: &[u8],
    channels: usize,
    w: u32,
    h: u32,
    value: impl Fn(&[u8]) -> u32,
) -> (Vec<f32>, (f32, f32)) {
    let (sx, sy) = (w as f32 / SIDE as f32, h as f32 / SIDE as f32);
    // The bins' first columns: the bin of column x is (x / sx), the last bin takes the rest.
    let bin_of = |x: u32| ((x as f32 / sx) as usize).min(SIDE - 1);
    let mut edges = [w as usize; SIDE + 1];
    for x in (0..w).rev() {
        edges[bin_of(x)] = x as usize;
    }
    for i in (0..SIDE).rev() {
        edges[i] = edges[i].min(edges[i + 1]);
    }
    let mut sums = vec![0u64; SIDE * SIDE];
    let mut rows = [0u32; SIDE];
    let row_len = w as usize * channels;
    for (y, row) in raw
        .chunks_exact(row_len.max(1))
        .take(h as usize)
        .enumerate()
    {
        let j = ((y as f32 / sy) as usize).min(SIDE - 1);
        rows[j] += 1;
        for (i, s) in sums[j * SIDE..(j + 1) * SIDE].iter_mut().enumerate() {
            let run = &row[edges[i] * channels..edges[i + 1] * channels];
            *s += u64::from(value(run));
        }
    }
    let grey = sums
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let (j, i) = (k / SIDE, k % SIDE);
            let n = rows[j] * (edges[i + 1] - edges[i]) as u32;
            (s as f64 / f64::from(n.max(1))) as f32
        })
        .collect();
    (grey, (sx, sy))
}

impl Registrar {
    /// The frame shrunk to `SIDE` x `SIDE` grey (box means of the luma), windowed,
    /// transformed.
    pub fn spectrum(&self, frame: &RgbImage) -> Spectrum {
        let (w, h) = frame.dimensions();
        let (grey, scale) = shrink(frame.as_raw(), 3, w, h, |p| {
            // Integer luma (BT.601 weights scaled by 1024).
            p.chunks_exact(3)
                .map(|p| 306 * u32::from(p[0]) + 601 * u32::from(p[1]) + 117 * u32::from(p[2]))
                .sum()
        });
        self.finish(grey, scale)
    }

    /// The same from a stained frame's stain map (`pose::stain_map` with `Contrast::Dark`,
    /// 255 less the luma, truncated): one byte a pixel to read instead of three, and the map
    /// is made anyway for head finding. Grey is 255 less the stain, on the luma's scale.
    pub fn spectrum_of_stain(&self, stain: &GrayImage) -> Spectrum {
        let (w, h) = stain.dimensions();
        let (grey, scale) = shrink(stain.as_raw(), 1, w, h, |p| {
            let sum: u32 = p.iter().map(|&v| u32::from(v)).sum();
            (255 * p.len() as u32 - sum) * 1024
        });
        self.finish(grey, scale)
    }

    /// Window, transform and normalise a shrunk frame.
    fn finish(&self, grey: Vec<f32>, scale: (f32, f32)) -> Spectrum {
        let mean = grey.iter().sum::<f32>() / grey.len() as f32;
        // A Hann window keeps the image borders from dominating the correlation.
        let hann: Vec<f32> = (0..SIDE)
            .map(|k| 0.5 - 0.5 * (std::f32::consts::TAU * k as f32 / SIDE as f32).cos())
            .collect();
        let mut values: Vec<Complex32> = grey
            .iter()
            .enumerate()
            .map(|(k, g)| Complex32::new((g - mean) * hann[k % SIDE] * hann[k / SIDE], 0.0))
            .collect();
        self.transform(&mut values, false);
        for v in &mut values {
            let n = v.norm();
            *v = if n > 1e-12 {
                *v / n
            } else {
                Complex32::new(0.0, 0.0)
            };
        }
        Spectrum { values, scale }
    }

    /// Where `current` lies on `previous`: the shift and the height of the correlation peak.
    pub fn motion(&self, previous: &Spectrum, current: &Spectrum) -> Motion {
        let mut cross: Vec<Complex32> = current
            .values
            .iter()
            .zip(&previous.values)
            .map(|(c, p)| c * p.conj())
            .collect();
        self.transform(&mut cross, true);
        let n = (SIDE * SIDE) as f32;
        let (best, peak) = cross
            .iter()
            .enumerate()
            .map(|(k, v)| (k, v.re / n))
            .fold((0, f32::MIN), |a, b| if b.1 > a.1 { b } else { a });
        let wrap = |k: usize| {
            if k > SIDE / 2 {
                k as f32 - SIDE as f32
            } else {
                k as f32
            }
        };
        let (dx, dy) = (wrap(best % SIDE), wrap(best / SIDE));
        Motion {
            shift: (dx * current.scale.0, dy * current.scale.1),
            peak,
        }
    }

    /// 2-D FFT in place: every row, then every column.
    fn transform(&self, v: &mut [Complex32], inverse: bool) {
        let fft = if inverse {
            &self.inverse
        } else {
            &self.forward
        };
        for row in v.chunks_mut(SIDE) {
            fft.process(row);
        }
        let mut col = vec![Complex32::new(0.0, 0.0); SIDE];
        for x in 0..SIDE {
            for (y, c) in col.iter_mut().enumerate() {
                *c = v[y * SIDE + x];
            }
            fft.process(&mut col);
            for (y, c) in col.iter().enumerate() {
                v[y * SIDE + x] = *c;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pose::{Contrast, stain_map};
    use crate::core::testing::synthetic_field;

    fn shifted(img: &RgbImage, dx: i64, dy: i64) -> RgbImage {
        let mut out = RgbImage::from_pixel(img.width(), img.height(), image::Rgb([225, 215, 220]));
        image::imageops::overlay(&mut out, img, dx, dy);
        out
    }

    #[test]
    fn a_shifted_field_is_found_and_another_field_is_not() {
        let r = Registrar::default();
        let a = synthetic_field(
            640,
            480,
            &[
                (150, 150, 30.0),
                (420, 200, 200.0),
                (260, 360, 100.0),
                (500, 380, 10.0),
            ],
        );
        let b = shifted(&a, 25, -10);
        let m = r.motion(&r.spectrum(&a), &r.spectrum(&b));
        assert!(
            (m.shift.0 - 25.0).abs() <= 5.0 && (m.shift.1 + 10.0).abs() <= 4.0,
            "{m:?}"
        );
        assert!(m.peak > 0.3, "{m:?}");
        let other = synthetic_field(
            640,
            480,
            &[(100, 300, 80.0), (330, 120, 250.0), (560, 260, 170.0)],
        );
        let m = r.motion(&r.spectrum(&a), &r.spectrum(&other));
        assert!(m.peak < 0.2, "{m:?}");

        // From the stain maps, the same: shift, field change, and the two kinds of spectrum
        // agree with each other (same sign), so a run may switch from one to the other.
        let stain = |img: &RgbImage| stain_map(img, Contrast::Dark);
        let m = r.motion(
            &r.spectrum_of_stain(&stain(&a)),
            &r.spectrum_of_stain(&stain(&b)),
        );
        assert!(
            (m.shift.0 - 25.0).abs() <= 5.0 && (m.shift.1 + 10.0).abs() <= 4.0,
            "{m:?}"
        );
        assert!(m.peak > 0.3, "{m:?}");
        let m = r.motion(
            &r.spectrum_of_stain(&stain(&a)),
            &r.spectrum_of_stain(&stain(&other)),
        );
        assert!(m.peak < 0.2, "{m:?}");
        let m = r.motion(&r.spectrum(&a), &r.spectrum_of_stain(&stain(&a)));
        assert!(
            m.peak > 0.9 && m.shift.0.abs() < 1.0 && m.shift.1.abs() < 1.0,
            "{m:?}"
        );
    }

    #[test]
    fn shrinking_averages_every_pixel_once() {
        // Frames smaller and larger than the shrunk side, and not multiples of it.
        for (w, h) in [(50u32, 40u32), (128, 128), (301, 197)] {
            let raw: Vec<u8> = (0..w * h).map(|i| (i * 7 % 251) as u8).collect();
            let (grey, _) = shrink(&raw, 1, w, h, |p| p.iter().map(|&v| u32::from(v)).sum());
            // Each bin's mean times its pixel count sums back to the image's total.
            let (sx, sy) = (w as f32 / SIDE as f32, h as f32 / SIDE as f32);
            let mut count = vec![0u32; SIDE * SIDE];
            for y in 0..h {
                for x in 0..w {
                    let j = ((y as f32 / sy) as usize).min(SIDE - 1);
                    let i = ((x as f32 / sx) as usize).min(SIDE - 1);
                    count[j * SIDE + i] += 1;
                }
            }
            let total: f64 = grey
                .iter()
                .zip(&count)
                .map(|(g, &n)| f64::from(*g) * f64::from(n))
                .sum();
            let want: f64 = raw.iter().map(|&v| f64::from(v)).sum();
            assert!(
                (total - want).abs() < 1e-3 * want,
                "{w}x{h}: {total} vs {want}"
            );
            assert!(grey.iter().zip(&count).all(|(g, &n)| n > 0 || *g == 0.0));
        }
    }
}
