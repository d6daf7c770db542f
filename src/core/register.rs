//! How far the field moved between two frames, and whether it is the same field at all: phase
//! correlation of small grey copies of the frames. The peak of the correlation surface gives
//! the shift; its height (1 for a pure shift, near 0 for unrelated images) tells a stage drift
//! from a move to a new field.

use std::sync::Arc;

use image::RgbImage;
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

impl Registrar {
    /// The frame shrunk to `SIDE` x `SIDE` grey (box means), windowed, transformed.
    pub fn spectrum(&self, frame: &RgbImage) -> Spectrum {
        let (w, h) = frame.dimensions();
        let (sx, sy) = (w as f32 / SIDE as f32, h as f32 / SIDE as f32);
        // Exact integer sums: per row into the column bins, then into the bin's row.
        let bin_of_x: Vec<usize> = (0..w)
            .map(|x| ((x as f32 / sx) as usize).min(SIDE - 1))
            .collect();
        let mut cols = [0u32; SIDE];
        for &i in &bin_of_x {
            cols[i] += 1;
        }
        let mut sums = vec![0u64; SIDE * SIDE];
        let mut rows = [0u32; SIDE];
        let mut row_sums = [0u32; SIDE];
        let row_len = w as usize * 3;
        for (y, row) in frame.as_raw().chunks_exact(row_len.max(1)).enumerate() {
            let j = ((y as f32 / sy) as usize).min(SIDE - 1);
            rows[j] += 1;
            row_sums.fill(0);
            for (p, &i) in row.chunks_exact(3).zip(&bin_of_x) {
                // Integer luma (BT.601 weights scaled by 1024).
                row_sums[i] +=
                    306 * u32::from(p[0]) + 601 * u32::from(p[1]) + 117 * u32::from(p[2]);
            }
            for (s, &r) in sums[j * SIDE..(j + 1) * SIDE].iter_mut().zip(&row_sums) {
                *s += u64::from(r);
            }
        }
        let grey: Vec<f32> = sums
            .iter()
            .enumerate()
            .map(|(k, &s)| {
                let n = rows[k / SIDE] * cols[k % SIDE];
                (s as f64 / f64::from(n.max(1))) as f32
            })
            .collect();
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
        Spectrum {
            values,
            scale: (sx, sy),
        }
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
    }
}
