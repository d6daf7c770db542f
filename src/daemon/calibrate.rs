//! The frame scale from the heads themselves. Every size in a record, and the area filter of
//! head finding, rests on `source.um_per_px`; a new microscope (other objective, camera or
//! binning) makes all of them wrong by the same factor. A human sperm head is 4.0-5.5 µm long
//! and 2.5-3.5 µm wide (WHO 6th edition), so the heads in view say what a pixel is:
//! `estimate` finds the scale at which head finding and the WHO sizes agree (`spermscope
//! calibrate`), and `ScaleWatch` checks the configured scale while the daemon runs.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::core::draw::digits;
use crate::core::imageio::{ListError, list_files, load_rgb};
use crate::core::pose::Contrast;
use crate::daemon::check::Base;
use crate::daemon::segment::{FoundHead, RawSegment, find_heads};
use crate::daemon::source::{FrameSource, Pull};

/// WHO 6th edition: a normal head's length and width, µm.
pub const WHO_HEAD_LENGTH_UM: (f32, f32) = (4.0, 5.5);
pub const WHO_HEAD_WIDTH_UM: (f32, f32) = (2.5, 3.5);

fn mid((lo, hi): (f32, f32)) -> f32 {
    (lo + hi) / 2.0
}

/// What the heads of some frames say about the scale.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScaleEvidence {
    /// The suggested `source.um_per_px`.
    pub um_per_px: f32,
    /// Heads measured (whole, not touching) at the chosen scale.
    pub heads: usize,
    pub frames: usize,
    pub median_length_px: f32,
    pub median_width_px: f32,
    /// The scale each measurement alone gives (length, width).
    pub from_length_um_per_px: f32,
    pub from_width_um_per_px: f32,
    /// Each head's length, px (for the histogram).
    pub lengths_px: Vec<f32>,
}

/// Why no scale could be estimated.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error("no frames to calibrate on")]
    NoFrames,
    #[error("no head-like regions found at any scale from 0.02 to 0.9 µm/px in {frames} frames")]
    NoHeads { frames: usize },
}

fn median(v: &mut [f32]) -> f32 {
    v.sort_by(f32::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// The whole, untouched heads head finding accepts at `um_per_px`: (length, width) px.
fn heads_at(frames: &[RgbImage], um_per_px: f32, contrast: Contrast) -> Vec<(f32, f32)> {
    let raw = RawSegment {
        contrast,
        verify: false,
        ..RawSegment::default()
    };
    let Ok((settings, _)) = raw.resolve(um_per_px, Base(None)) else {
        return Vec::new();
    };
    frames
        .iter()
        .flat_map(|f| find_heads(f, &settings))
        .filter(|h: &FoundHead| !h.at_edge && !h.touching)
        .map(|h| (h.head.major_px, h.head.minor_px))
        .collect()
}

/// The scale the WHO sizes give for these heads: the geometric mean of what the median length
/// and the median width each say.
fn implied(heads: &[(f32, f32)]) -> (f32, f32, f32, f32) {
    let mut l: Vec<f32> = heads.iter().map(|h| h.0).collect();
    let mut w: Vec<f32> = heads.iter().map(|h| h.1).collect();
    let (ml, mw) = (median(&mut l), median(&mut w));
    let (sl, sw) = (
        mid(WHO_HEAD_LENGTH_UM) / ml.max(1e-3),
        mid(WHO_HEAD_WIDTH_UM) / mw.max(1e-3),
    );
    ((sl * sw).sqrt(), ml, mw, sl)
}

/// Estimate the frames' scale. Head finding filters by area in µm², so it is tried at scales
/// from 0.02 to 0.9 µm/px (a 1.25 step); at each, the heads it accepts imply a scale through
/// the WHO sizes. The answer is where the two agree (within one step) with the most heads,
/// refined once at the implied scale.
pub fn estimate(frames: &[RgbImage], contrast: Contrast) -> Result<ScaleEvidence, CalibrateError> {
    if frames.is_empty() {
        return Err(CalibrateError::NoFrames);
    }
    let step = 1.25f32;
    let mut best: Option<(f32, usize, f32)> = None; // (scale tried, heads, |log ratio|)
    for k in 0..18 {
        let s = 0.02 * step.powi(k);
        let heads = heads_at(frames, s, contrast);
        if heads.len() < 3 {
            continue;
        }
        let off = (implied(&heads).0 / s).ln().abs();
        let better = match best {
            None => true,
            Some((_, n, o)) => {
                let agree = off <= step.ln();
                let agreed = o <= step.ln();
                (agree && !agreed) || (agree == agreed && (heads.len(), -off) > (n, -o))
            }
        };
        if better {
            best = Some((s, heads.len(), off));
        }
    }
    let Some((tried, _, _)) = best else {
        return Err(CalibrateError::NoHeads {
            frames: frames.len(),
        });
    };
    // One more look at the scale the heads implied there.
    let first = implied(&heads_at(frames, tried, contrast)).0;
    let mut heads = heads_at(frames, first, contrast);
    if heads.len() < 3 {
        heads = heads_at(frames, tried, contrast);
    }
    let (um_per_px, ml, mw, sl) = implied(&heads);
    Ok(ScaleEvidence {
        um_per_px,
        heads: heads.len(),
        frames: frames.len(),
        median_length_px: ml,
        median_width_px: mw,
        from_length_um_per_px: sl,
        from_width_um_per_px: mid(WHO_HEAD_WIDTH_UM) / mw.max(1e-3),
        lengths_px: heads.iter().map(|h| h.0).collect(),
    })
}

/// Up to `n` decodable frames spread evenly over the files a folder or glob names.
pub fn frames_from(path: &Path, n: usize) -> Result<Vec<RgbImage>, ListError> {
    let files = list_files(path)?;
    let step = (files.len() as f32 / n.max(1) as f32).max(1.0);
    Ok((0..n.min(files.len()))
        .filter_map(|i| load_rgb(&files[(i as f32 * step) as usize]).ok())
        .collect())
}

/// Up to `n` frames from a source (a camera, a replay), skipping unreadable ones; a live source
/// waiting for its device is given `patience` in all.
pub fn frames_from_source(
    source: &mut dyn FrameSource,
    n: usize,
    patience: std::time::Duration,
) -> Vec<RgbImage> {
    let until = std::time::Instant::now() + patience;
    let mut out = Vec::new();
    while out.len() < n && std::time::Instant::now() < until {
        match source.pull() {
            Pull::Frame { image, .. } => out.push((*image).clone()),
            Pull::Unreadable { .. } | Pull::Incomplete { .. } | Pull::Idle(_) => {}
            Pull::End => break,
        }
    }
    out
}

/// What the scale watch concluded.
#[derive(Debug, Clone, PartialEq)]
pub enum ScaleAlarm {
    /// The heads' median length is outside the WHO range by more than the tolerance.
    Sizes {
        median_length_um: f32,
        heads: usize,
        suggested_um_per_px: f32,
    },
    /// Frames went by and head finding accepted almost nothing.
    NoHeads { frames: u64 },
}

/// Watches the heads the daemon finds, and says once when their sizes disagree with the
/// configured scale.
#[derive(Debug, Default)]
pub struct ScaleWatch {
    lengths_px: Vec<f32>,
    widths_px: Vec<f32>,
    frames: u64,
    raised: bool,
}

/// Heads needed before the sizes are judged.
const MIN_HEADS: usize = 40;
/// Frames without any head before that is judged.
const QUIET_FRAMES: u64 = 30;
/// How far outside the WHO length range the median may lie, as a share of the range's ends.
const TOLERANCE: f32 = 0.2;

impl ScaleWatch {
    /// Count one frame's whole, untouched heads by their (length, width) in px.
    pub fn observe(&mut self, heads: impl IntoIterator<Item = (f32, f32)>) {
        self.frames += 1;
        for (l, w) in heads
            .into_iter()
            .take(1000 - self.lengths_px.len().min(1000))
        {
            self.lengths_px.push(l);
            self.widths_px.push(w);
        }
    }

    /// The alarm, the first time the evidence is enough and disagrees with `um_per_px`.
    pub fn judge(&mut self, um_per_px: f32) -> Option<ScaleAlarm> {
        if self.raised {
            return None;
        }
        let alarm = if self.lengths_px.len() >= MIN_HEADS {
            let heads: Vec<(f32, f32)> = self
                .lengths_px
                .iter()
                .copied()
                .zip(self.widths_px.iter().copied())
                .collect();
            let (suggested, ml, _, _) = implied(&heads);
            let length_um = ml * um_per_px;
            let (lo, hi) = WHO_HEAD_LENGTH_UM;
            let outside = length_um < lo * (1.0 - TOLERANCE) || length_um > hi * (1.0 + TOLERANCE);
            outside.then_some(ScaleAlarm::Sizes {
                median_length_um: length_um,
                heads: heads.len(),
                suggested_um_per_px: suggested,
            })
        } else if self.lengths_px.is_empty() && self.frames >= QUIET_FRAMES {
            Some(ScaleAlarm::NoHeads {
                frames: self.frames,
            })
        } else {
            None
        };
        self.raised |= alarm.is_some();
        alarm
    }
}

/// A histogram of head lengths in µm at the suggested scale (0-10 µm, 0.25 µm bins), the WHO
/// range shaded green, tick marks every µm (every 5 µm labelled).
pub fn histogram_png(e: &ScaleEvidence, path: &Path) -> Result<(), image::ImageError> {
    let (w, h, left, bottom) = (640u32, 320u32, 40u32, 40u32);
    let bins = 40usize;
    let mut counts = vec![0u32; bins];
    for l in &e.lengths_px {
        let um = l * e.um_per_px;
        let b = ((um / 0.25) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let most = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let plot_w = w - left - 20;
    let bin_w = plot_w / bins as u32;
    let x_of = |um: f32| left + (um / 0.25 * bin_w as f32) as u32;
    let top = 20u32;
    let plot_h = h - bottom - top;
    // The WHO range.
    for x in x_of(WHO_HEAD_LENGTH_UM.0)..x_of(WHO_HEAD_LENGTH_UM.1) {
        for y in top..h - bottom {
            img.put_pixel(x, y, Rgb([215, 240, 215]));
        }
    }
    for (b, &c) in counts.iter().enumerate() {
        let bar = c * plot_h / most;
        let x0 = left + b as u32 * bin_w;
        for x in x0 + 1..x0 + bin_w {
            for y in (h - bottom - bar)..(h - bottom) {
                img.put_pixel(x, y, Rgb([60, 80, 170]));
            }
        }
    }
    // Axis, ticks every µm, labels every 5 µm.
    let black = Rgb([0, 0, 0]);
    for x in left..left + plot_w {
        img.put_pixel(x, h - bottom, black);
    }
    for um in 0..=10u32 {
        let x = x_of(um as f32);
        for y in h - bottom..h - bottom + if um % 5 == 0 { 8 } else { 4 } {
            img.put_pixel(x.min(w - 1), y, black);
        }
        if um % 5 == 0 {
            digits(
                &mut img,
                &um.to_string(),
                x.saturating_sub(4),
                h - bottom + 12,
                black,
            );
        }
    }
    img.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_warns_once_with_a_suggestion_when_sizes_disagree() {
        // Heads of 90 x 57 px: 4.8 x 3.0 µm at 0.053 µm/px.
        let heads = vec![(90.0, 57.0); 10];
        let mut right = ScaleWatch::default();
        let mut wrong = ScaleWatch::default();
        for _ in 0..5 {
            right.observe(heads.clone());
            wrong.observe(heads.clone());
        }
        assert_eq!(right.judge(0.053), None);
        match wrong.judge(0.1) {
            Some(ScaleAlarm::Sizes {
                median_length_um,
                suggested_um_per_px,
                ..
            }) => {
                assert!((median_length_um - 9.0).abs() < 0.01);
                assert!(
                    (suggested_um_per_px - 0.0527).abs() < 0.002,
                    "{suggested_um_per_px}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(wrong.judge(0.1), None, "warned once");
        let mut empty = ScaleWatch::default();
        for _ in 0..QUIET_FRAMES {
            empty.observe([]);
        }
        assert_eq!(
            empty.judge(0.053),
            Some(ScaleAlarm::NoHeads {
                frames: QUIET_FRAMES
            })
        );
    }
}
