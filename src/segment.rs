//! Full-field head finding: every head in a stained microscope frame, with the same stain
//! levels and the same measurement as the crop path in `pose`, plus area and shape filters and
//! a flag for heads cut by the frame border.

use std::collections::{HashMap, HashSet};

use image::{GrayImage, Luma, RgbImage};
use imageproc::distance_transform::Norm;
use imageproc::morphology::open;
use imageproc::region_labelling::{Connectivity, connected_components};

use crate::morphometry;
use crate::pose::{self, Contrast, HeadRegion, Thresholded};

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
///
/// The opening that cuts tails off is the costly step, so it runs only around the stained
/// regions big enough to hold a head, each in a window padded by twice its radius: opening
/// reaches no further than that, so the result is the same as opening the whole frame.
pub fn find_heads(frame: &RgbImage, s: &SegmentSettings) -> Vec<FoundHead> {
    let (w, h) = frame.dimensions();
    if w < 16 || h < 16 {
        return Vec::new();
    }
    let t = Thresholded::new(frame, s.contrast);
    let pad = 2 * s.open_radius_px as u32 + 2;
    let mut regions: Vec<Vec<(u32, u32)>> = Vec::new();
    for (b, runs) in blobs(&t.head) {
        // Opening only shrinks a region: a blob below the smallest head holds none.
        if b.n < s.min_area_px {
            continue;
        }
        let (x0, y0) = (b.x0.saturating_sub(pad), b.y0.saturating_sub(pad));
        let (x1, y1) = ((b.x1 + pad).min(w - 1), (b.y1 + pad).min(h - 1));
        let (lw, lh) = (x1 - x0 + 1, y1 - y0 + 1);
        let local = image::imageops::crop_imm(&t.head, x0, y0, lw, lh).to_image();
        let opened = open(&local, Norm::L2, s.open_radius_px);
        // Keep what the opening left of this blob only (its neighbours have their own turn).
        let mut mine = GrayImage::new(lw, lh);
        for r in &runs {
            for x in r.x0..=r.x1 {
                if opened.get_pixel(x - x0, r.y - y0)[0] != 0 {
                    mine.put_pixel(x - x0, r.y - y0, Luma([255]));
                }
            }
        }
        let opened = mine;
        let parts = connected_components(&opened, Connectivity::Eight, Luma([0u8]));
        let first = regions.len();
        for (x, y, l) in parts.enumerate_pixels() {
            let l = l[0] as usize;
            if l == 0 {
                continue;
            }
            if regions.len() < first + l {
                regions.resize(first + l, Vec::new());
            }
            regions[first + l - 1].push((x + x0, y + y0));
        }
    }
    regions.retain(|px| px.len() >= s.min_area_px && px.len() <= s.max_area_px);
    regions.sort_by_key(|px| px.first().map(|&(x, y)| (y, x)));
    regions
        .into_iter()
        .filter_map(|px| measure_region(px, &t, s, w, h))
        .collect()
}

/// A horizontal run of mask pixels, `x0..=x1` on row `y`.
#[derive(Debug, Clone, Copy)]
struct Run {
    y: u32,
    x0: u32,
    x1: u32,
}

/// 8-connected regions of a mask as runs, with their bounding boxes: one pass over the rows,
/// joining runs that touch a run of the row above (union-find). Much cheaper than a label
/// image on a sparse full field.
fn blobs(mask: &GrayImage) -> Vec<(Blob, Vec<Run>)> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let px = mask.as_raw();
    let mut runs: Vec<Run> = Vec::new();
    let mut parent: Vec<usize> = Vec::new();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut prev = 0..0;
    for y in 0..h {
        let row = &px[y * w..(y + 1) * w];
        let start = runs.len();
        let mut x = 0;
        while x < w {
            if row[x] == 0 {
                x += 1;
                continue;
            }
            let x0 = x;
            while x < w && row[x] != 0 {
                x += 1;
            }
            runs.push(Run {
                y: y as u32,
                x0: x0 as u32,
                x1: (x - 1) as u32,
            });
            parent.push(parent.len());
        }
        let here = start..runs.len();
        // Join with the runs above that touch (diagonals included).
        let mut j = prev.start;
        for i in here.clone() {
            let r = runs[i];
            while j < prev.end && runs[j].x1 + 1 < r.x0 {
                j += 1;
            }
            let mut k = j;
            while k < prev.end && runs[k].x0 <= r.x1 + 1 {
                let (a, b) = (root(&mut parent, i), root(&mut parent, k));
                if a != b {
                    parent[a.max(b)] = a.min(b);
                }
                k += 1;
            }
        }
        prev = here;
    }
    let mut index: Vec<usize> = vec![usize::MAX; runs.len()];
    let mut out: Vec<(Blob, Vec<Run>)> = Vec::new();
    for (i, &run) in runs.iter().enumerate() {
        let r = root(&mut parent, i);
        if index[r] == usize::MAX {
            index[r] = out.len();
            out.push((Blob::default(), Vec::new()));
        }
        let (b, rs) = &mut out[index[r]];
        b.add_run(run);
        rs.push(run);
    }
    out
}

/// Bounding box and size of a stained region.
#[derive(Debug, Clone, Copy)]
struct Blob {
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
    n: usize,
}

impl Default for Blob {
    fn default() -> Self {
        Self {
            x0: u32::MAX,
            y0: u32::MAX,
            x1: 0,
            y1: 0,
            n: 0,
        }
    }
}

impl Blob {
    fn add_run(&mut self, r: Run) {
        self.x0 = self.x0.min(r.x0);
        self.y0 = self.y0.min(r.y);
        self.x1 = self.x1.max(r.x1);
        self.y1 = self.y1.max(r.y);
        self.n += (r.x1 - r.x0 + 1) as usize;
    }
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
    for p in head.pixels.iter_mut() {
        p.0 += lx0;
        p.1 += ly0;
    }
    head.centroid = (head.centroid.0 + lx0 as f32, head.centroid.1 + ly0 as f32);
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
        let mut area: HashMap<u8, usize> = HashMap::new();
        for p in truth.pixels() {
            if p[0] > 0 {
                *area.entry(p[0]).or_default() += 1;
            }
        }
        let mut used = HashSet::new();
        let mut matched = 0;
        for d in found {
            let (cx, cy) = (d.head.centroid.0 as u32, d.head.centroid.1 as u32);
            let id = truth.get_pixel(cx, cy)[0];
            let Some(&true_area) = area.get(&id) else {
                continue;
            };
            let inter = d
                .head
                .pixels
                .iter()
                .filter(|&&(x, y)| truth.get_pixel(x, y)[0] == id)
                .count();
            let iou = inter as f64 / (d.head.area_px() + true_area - inter) as f64;
            if iou >= 0.5 && used.insert(id) {
                matched += 1;
            }
        }
        MaskMatch {
            true_heads: area.len(),
            found: found.len(),
            matched,
        }
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
