//! Synthetic fields for tests and benchmarks: labelled crops pasted onto a plain background at
//! random positions and angles, with the ground truth kept so the whole pipeline can be scored.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::core::dataset::{self, Dataset};
use crate::core::imageio;
use crate::daemon::source::{FrameSource, Pull, SourceError};

/// Field size and crowding.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub width_px: u32,
    pub height_px: u32,
    pub cells_per_frame: usize,
    pub seed: u64,
}

/// One crop placed in a field.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Placed {
    pub crop: PathBuf,
    pub class: String,
    /// Where the crop's centre landed.
    pub centre: (f32, f32),
    /// Counter-clockwise rotation applied to the crop on screen, degrees.
    pub angle_deg: f32,
    /// Radius of the pasted disc.
    pub radius: f32,
}

/// A crop dataset ready to paste from.
pub struct Montage {
    ds: Dataset,
    layout: Layout,
    background: Rgb<u8>,
}

impl Montage {
    pub fn open(root: &Path, layout: Layout) -> Result<Montage, SourceError> {
        let err = |reason: String| SourceError::Montage {
            path: root.to_path_buf(),
            reason,
        };
        let ds = dataset::read_class_folders(root).map_err(|e| err(e.to_string()))?;
        if ds.samples.is_empty() {
            return Err(err("holds no crops".into()));
        }
        // Background: the median border colour of a spread of crops.
        let mut border: [Vec<u8>; 3] = Default::default();
        let step = (ds.samples.len() / 64).max(1);
        for s in ds.samples.iter().step_by(step) {
            let Ok(img) = imageio::load_rgb(&s.path) else {
                continue;
            };
            let (w, h) = img.dimensions();
            for (x, y, p) in img.enumerate_pixels() {
                if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
                    for c in 0..3 {
                        border[c].push(p[c]);
                    }
                }
            }
        }
        if border[0].is_empty() {
            return Err(err("no crop could be decoded".into()));
        }
        let mut bg = [0u8; 3];
        for c in 0..3 {
            border[c].sort_unstable();
            bg[c] = border[c][border[c].len() / 2];
        }
        Ok(Montage {
            ds,
            layout,
            background: Rgb(bg),
        })
    }

    /// Field number `index` (the same for the same seed) and what was pasted where.
    pub fn field(&self, index: u64) -> (RgbImage, Vec<Placed>) {
        let l = self.layout;
        let mut rng =
            ChaCha8Rng::seed_from_u64(l.seed.wrapping_mul(0x9E37_79B9).wrapping_add(index));
        let mut img = RgbImage::from_pixel(l.width_px, l.height_px, self.background);
        let mut placed: Vec<Placed> = Vec::new();
        for _ in 0..l.cells_per_frame {
            let s = &self.ds.samples[rng.random_range(0..self.ds.samples.len())];
            let Ok(crop) = imageio::load_rgb(&s.path) else {
                continue;
            };
            let radius = crop.width().min(crop.height()) as f32 / 2.0;
            let (w, h) = (l.width_px as f32, l.height_px as f32);
            if w < 2.0 * radius + 2.0 || h < 2.0 * radius + 2.0 {
                continue;
            }
            let mut spot = None;
            for _ in 0..200 {
                let c = (
                    rng.random_range(radius + 1.0..w - radius - 1.0),
                    rng.random_range(radius + 1.0..h - radius - 1.0),
                );
                let free = placed.iter().all(|p| {
                    let d = ((p.centre.0 - c.0).powi(2) + (p.centre.1 - c.1).powi(2)).sqrt();
                    d > p.radius + radius + 4.0
                });
                if free {
                    spot = Some(c);
                    break;
                }
            }
            let Some(centre) = spot else {
                break;
            };
            let angle_deg = rng.random_range(0.0..360.0f32);
            paste(&mut img, &crop, centre, angle_deg, radius, self.background);
            placed.push(Placed {
                crop: s.path.clone(),
                class: self.ds.classes[s.label].clone(),
                centre,
                angle_deg,
                radius,
            });
        }
        (img, placed)
    }
}

/// Paste `crop` rotated by `angle_deg` inside a disc of `radius` around `centre`, feathered
/// into the background over its outer fifth.
fn paste(
    img: &mut RgbImage,
    crop: &RgbImage,
    centre: (f32, f32),
    angle_deg: f32,
    radius: f32,
    bg: Rgb<u8>,
) {
    let (sin, cos) = angle_deg.to_radians().sin_cos();
    let (ccx, ccy) = (crop.width() as f32 / 2.0, crop.height() as f32 / 2.0);
    let x0 = (centre.0 - radius).floor().max(0.0) as u32;
    let y0 = (centre.1 - radius).floor().max(0.0) as u32;
    let x1 = ((centre.0 + radius).ceil() as u32).min(img.width() - 1);
    let y1 = ((centre.1 + radius).ceil() as u32).min(img.height() - 1);
    let inner = radius * 0.8;
    for y in y0..=y1 {
        for x in x0..=x1 {
            let (dx, dy) = (x as f32 + 0.5 - centre.0, y as f32 + 0.5 - centre.1);
            let r = (dx * dx + dy * dy).sqrt();
            if r >= radius {
                continue;
            }
            // Screen rotation by +angle (counter-clockwise on screen, y down): sample the
            // crop at the inverse rotation.
            let sx = cos * dx - sin * dy + ccx - 0.5;
            let sy = sin * dx + cos * dy + ccy - 0.5;
            let Some(v) = bilinear(crop, sx, sy) else {
                continue;
            };
            let w = if r <= inner {
                1.0
            } else {
                let t = (radius - r) / (radius - inner);
                t * t * (3.0 - 2.0 * t)
            };
            let out = img.get_pixel_mut(x, y);
            for c in 0..3 {
                out[c] = (w * v[c] + (1.0 - w) * bg[c] as f32)
                    .round()
                    .clamp(0.0, 255.0) as u8;
            }
        }
    }
}

fn bilinear(img: &RgbImage, x: f32, y: f32) -> Option<[f32; 3]> {
    let (w, h) = img.dimensions();
    if x < 0.0 || y < 0.0 || x > (w - 1) as f32 || y > (h - 1) as f32 {
        return None;
    }
    let (xi, yi) = (x.floor() as u32, y.floor() as u32);
    let (fx, fy) = (x - xi as f32, y - yi as f32);
    let (xj, yj) = ((xi + 1).min(w - 1), (yi + 1).min(h - 1));
    let mut out = [0f32; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let a = img.get_pixel(xi, yi)[c] as f32;
        let b = img.get_pixel(xj, yi)[c] as f32;
        let d = img.get_pixel(xi, yj)[c] as f32;
        let e = img.get_pixel(xj, yj)[c] as f32;
        *o = (a * (1.0 - fx) + b * fx) * (1.0 - fy) + (d * (1.0 - fx) + e * fx) * fy;
    }
    Some(out)
}

/// Montage fields as a frame source.
/// A field as a drifting stage shows it: moved by `shift` px, the uncovered border filled with
/// the field's mean colour (live-like sequences for tests and benchmarks).
pub fn drifted(field: &RgbImage, shift: (i64, i64)) -> RgbImage {
    let n = f64::from(field.width() * field.height()).max(1.0);
    let mean: [f64; 3] =
        std::array::from_fn(|c| field.pixels().map(|p| f64::from(p[c])).sum::<f64>() / n);
    let mut out = RgbImage::from_pixel(field.width(), field.height(), Rgb(mean.map(|v| v as u8)));
    image::imageops::overlay(&mut out, field, shift.0, shift.1);
    out
}

pub struct MontageSource {
    montage: Montage,
    frames: u64,
    next: u64,
}

impl MontageSource {
    pub fn open(root: &Path, layout: Layout, frames: usize) -> Result<Self, SourceError> {
        Ok(Self {
            montage: Montage::open(root, layout)?,
            frames: frames as u64,
            next: 0,
        })
    }
}

impl FrameSource for MontageSource {
    fn describe(&self) -> String {
        format!(
            "montage of {} ({} fields, {} classes)",
            self.montage.ds.root.display(),
            self.frames,
            self.montage.ds.classes.len()
        )
    }

    fn pull(&mut self) -> Pull {
        if self.next >= self.frames {
            return Pull::End;
        }
        self.next += 1;
        let (image, _) = self.montage.field(self.next);
        Pull::Frame {
            name: format!("montage_{:05}", self.next),
            image: std::sync::Arc::new(image),
            decode_ms: 0.0,
        }
    }
}
