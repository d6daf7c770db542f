//! Full-field head finding: every head in a stained microscope frame, with the same stain
//! levels and the same measurement as the crop path in `pose`, plus area and shape filters and
//! a flag for heads cut by the frame border.

use std::collections::{HashMap, HashSet};

use image::{GrayImage, Luma, RgbImage};

use crate::model::{Model, ModelError, softmax};
use crate::morphometry;
use crate::pose::{self, Contrast, HeadRegion, Thresholded};
use crate::preprocess::prepare_head;
use crate::regions;

/// Settings of the classical segmenter, in pixels of the frame.
#[derive(Debug, Clone)]
pub struct SegmentSettings {
    pub contrast: Contrast,
    /// Smallest and largest head area accepted.
    pub min_area_px: usize,
    pub max_area_px: usize,
    /// Radius of the opening that removes tails and midpieces.
    pub open_radius_px: u8,
    /// Largest length/width ratio of a head.
    pub max_elongation: f32,
    /// Smallest area/convex-hull share; below it the region is taken as touching heads.
    pub min_solidity: f32,
    /// How far above Otsu's level (as a share of Otsu's level above background) the darkest
    /// fifth of a head's pixels must reach.
    pub nucleus_margin: f32,
}

impl Default for SegmentSettings {
    fn default() -> Self {
        Self {
            contrast: Contrast::Dark,
            min_area_px: 600,
            max_area_px: 16000,
            open_radius_px: 5,
            max_elongation: 3.5,
            min_solidity: 0.8,
            nucleus_margin: 0.6,
        }
    }
}

/// A head found in a frame.
#[derive(Debug, Clone)]
pub struct FoundHead {
    pub head: HeadRegion,
    /// `[x0, y0, x1, y1]` inclusive pixel bounds.
    pub bbox: [u32; 4],
    /// The head touches the frame border: reported, not classified.
    pub at_edge: bool,
    /// Area / convex hull area.
    pub solidity: f32,
    /// The region looks like two or more touching heads.
    pub touching: bool,
}

/// Find every head in a frame, in raster order of their first pixel.
pub fn find_heads(frame: &RgbImage, s: &SegmentSettings) -> Vec<FoundHead> {
    let (w, h) = frame.dimensions();
    if w < 16 || h < 16 {
        return Vec::new();
    }
    let t = Thresholded::new(frame, s.contrast);
    let mut regions = regions::opened_regions(&t.head, s.open_radius_px, s.min_area_px);
    regions.retain(|px| px.len() >= s.min_area_px && px.len() <= s.max_area_px);
    regions
        .into_iter()
        .filter_map(|px| measure_region(px, &t, s, w, h))
        .collect()
}

/// Filter one opened region (nucleus, elongation) and measure it as a head.
fn measure_region(
    px: Vec<(u32, u32)>,
    t: &Thresholded,
    s: &SegmentSettings,
    w: u32,
    h: u32,
) -> Option<FoundHead> {
    // A head holds a dark nucleus: its darker pixels pass Otsu's level. Pale round cells and
    // debris only pass the lower head level.
    let mut vals: Vec<u8> = px
        .iter()
        .map(|&(x, y)| t.stain.get_pixel(x, y)[0])
        .collect();
    vals.sort_unstable();
    let q80 = vals[(vals.len() - 1) * 4 / 5];
    if (q80 as f32) < t.otsu as f32 + s.nucleus_margin * t.span {
        return None;
    }
    let (x0, y0, x1, y1) = px
        .iter()
        .fold((u32::MAX, u32::MAX, 0, 0), |(a, b, c, d), &(x, y)| {
            (a.min(x), b.min(y), c.max(x), d.max(y))
        });
    let at_edge = x0 == 0 || y0 == 0 || x1 == w - 1 || y1 == h - 1;
    // Measure in a local window (head plus room for the tail search), exactly as a crop.
    let side = (x1 - x0).max(y1 - y0) as f32;
    let m = (side * 1.3) as u32 + 4;
    let (lx0, ly0) = (x0.saturating_sub(m), y0.saturating_sub(m));
    let (lx1, ly1) = ((x1 + m).min(w - 1), (y1 + m).min(h - 1));
    let (lw, lh) = (lx1 - lx0 + 1, ly1 - ly0 + 1);
    let mut local = GrayImage::new(lw, lh);
    for &(x, y) in &px {
        local.put_pixel(x - lx0, y - ly0, Luma([255]));
    }
    pose::fill_holes(&mut local);
    let tail_local = image::imageops::crop_imm(&t.tail, lx0, ly0, lw, lh).to_image();
    let stain_local = image::imageops::crop_imm(&t.stain, lx0, ly0, lw, lh).to_image();
    let mut head = pose::measure(&local, &tail_local, &stain_local);
    head.shift(lx0, ly0);
    if head.major_px / head.minor_px.max(1.0) > s.max_elongation {
        return None;
    }
    let solidity = morphometry::solidity(&head);
    Some(FoundHead {
        touching: solidity < s.min_solidity,
        head,
        bbox: [x0, y0, x1, y1],
        at_edge,
        solidity,
    })
}

/// Class a verifier model must have: the candidate is one sperm head.
pub const HEAD_CLASS: &str = "head";

/// A learned second look at each candidate the classical segmenter finds: a small classifier
/// (trained by `spermscope-train` on `sperm-parsing/train` candidates) that keeps heads and
/// rejects round cells, bacteria, debris and merged pairs.
pub struct Verifier {
    model: Model,
    head_index: usize,
    min_prob: f32,
}

impl Verifier {
    /// Wrap a loaded model; it must have a `head` class.
    pub fn new(model: Model, min_prob: f32) -> Result<Verifier, String> {
        let head_index = model
            .spec
            .classes
            .iter()
            .position(|c| c == HEAD_CLASS)
            .ok_or_else(|| {
                format!(
                    "a head verifier needs a '{HEAD_CLASS}' class; this one has {:?}",
                    model.spec.classes
                )
            })?;
        Ok(Verifier {
            model,
            head_index,
            min_prob,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Keep the candidates the model takes for heads (probability at least `min_prob`) and
    /// return how many were rejected. On an error the candidates are left as they were.
    pub fn retain(
        &mut self,
        frame: &RgbImage,
        found: &mut Vec<FoundHead>,
        um_per_px: f32,
    ) -> Result<usize, ModelError> {
        if found.is_empty() {
            return Ok(0);
        }
        let spec = &self.model.spec;
        let inputs: Vec<_> = found
            .iter()
            .map(|f| {
                let mut p = prepare_head(frame, &f.head, spec, Some(um_per_px));
                p.head = None;
                p
            })
            .collect();
        let temperature = spec.temperature;
        let logits = self.model.logits(&inputs)?;
        let mut keep = logits.iter().map(|l| {
            softmax(l, temperature)
                .get(self.head_index)
                .is_some_and(|&p| p >= self.min_prob)
        });
        let before = found.len();
        found.retain(|_| keep.next().unwrap_or(false));
        Ok(before - found.len())
    }
}

/// Detections matched against an instance mask (0 background, 1..n one id per true head): a
/// detection counts when its centroid lies inside a true head and their IoU is at least 0.5,
/// each true head matched at most once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskMatch {
    pub true_heads: usize,
    pub found: usize,
    pub matched: usize,
}

impl MaskMatch {
    pub fn score(found: &[FoundHead], truth: &GrayImage) -> MaskMatch {
        let (flags, true_heads) = Self::flags(found, truth);
        MaskMatch {
            true_heads,
            found: found.len(),
            matched: flags.iter().filter(|&&m| m).count(),
        }
    }

    /// Whether each detection matches a true head (in order, each head at most once), and the
    /// number of true heads.
    pub fn flags(found: &[FoundHead], truth: &GrayImage) -> (Vec<bool>, usize) {
        let mut area: HashMap<u8, usize> = HashMap::new();
        for p in truth.pixels() {
            if p[0] > 0 {
                *area.entry(p[0]).or_default() += 1;
            }
        }
        let mut used = HashSet::new();
        let flags = found
            .iter()
            .map(|d| {
                let (cx, cy) = (d.head.centroid.0 as u32, d.head.centroid.1 as u32);
                let id = truth.get_pixel(cx, cy)[0];
                let Some(&true_area) = area.get(&id) else {
                    return false;
                };
                let inter = d
                    .head
                    .pixels
                    .iter()
                    .filter(|&&(x, y)| truth.get_pixel(x, y)[0] == id)
                    .count();
                let iou = inter as f64 / (d.head.area_px() + true_area - inter) as f64;
                iou >= 0.5 && used.insert(id)
            })
            .collect();
        (flags, area.len())
    }

    pub fn add(&mut self, other: MaskMatch) {
        self.true_heads += other.true_heads;
        self.found += other.found;
        self.matched += other.matched;
    }

    pub fn precision(&self) -> f64 {
        self.matched as f64 / self.found.max(1) as f64
    }

    pub fn recall(&self) -> f64 {
        self.matched as f64 / self.true_heads.max(1) as f64
    }
}
