//! Pose correction: find the head in a crop, measure its axis, resolve head from tail and cut
//! an upright window around it. The trainer and the daemon both call this one implementation.

use std::sync::Arc;

use image::{GrayImage, ImageBuffer, Luma, Pixel, RgbImage};

/// How heads differ from the background in an image.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Contrast {
    /// Stained preparations: heads are darker than the background.
    Dark,
    /// Unstained or phase-contrast images: heads differ from the background either way.
    Any,
}

/// Why no head could be found in a crop.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PoseError {
    #[error("image is empty")]
    Empty,
    #[error("image has no contrast to separate a head from the background")]
    NoContrast,
    #[error("no head-sized region found (largest region {largest_px} px)")]
    NoHead { largest_px: usize },
}

/// A segmented head in a crop or frame: its pixels and its second-moment geometry.
#[derive(Debug, Clone)]
pub struct HeadRegion {
    /// Pixel coordinates (x, y) of every head pixel, holes filled.
    pub pixels: Vec<(u32, u32)>,
    /// Centroid in pixels.
    pub centroid: (f32, f32),
    /// Unit vector from the head toward the tail, in image coordinates (y down).
    pub tail_dir: (f32, f32),
    /// Length of the major axis in pixels (4 sigma of the pixel spread along it).
    pub major_px: f32,
    /// Length of the minor axis in pixels.
    pub minor_px: f32,
    /// How the head/tail direction was decided.
    pub polarity: Polarity,
}

/// The evidence used to tell the head's front from its back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Polarity {
    /// Stained midpiece/tail pixels leave the head at this end.
    Tail,
    /// No clear tail: the darker (post-acrosomal) half was taken as the back.
    Intensity,
}

impl HeadRegion {
    /// Moves the region by (`dx`, `dy`) pixels: from a patch's coordinates into those of the
    /// image the patch was cut from at that offset.
    pub fn shift(&mut self, dx: u32, dy: u32) {
        for p in self.pixels.iter_mut() {
            p.0 += dx;
            p.1 += dy;
        }
        self.centroid = (self.centroid.0 + dx as f32, self.centroid.1 + dy as f32);
    }

    /// Direction from the head toward the tail: `atan2(dy, dx)` in image coordinates, degrees in [0, 360).
    pub fn angle_deg(&self) -> f32 {
        let a = self.tail_dir.1.atan2(self.tail_dir.0).to_degrees();
        if a < 0.0 { a + 360.0 } else { a }
    }

    pub fn area_px(&self) -> usize {
        self.pixels.len()
    }
}

/// Stain intensity: 0 for the brightest background, high where the stain absorbs.
pub fn stain_map(img: &RgbImage, contrast: Contrast) -> GrayImage {
    let (w, h) = img.dimensions();
    let mut out = GrayImage::new(w, h);
    match contrast {
        Contrast::Dark => dark_stains(img.as_raw(), &mut out),
        Contrast::Any => {
            // Distance from the median grey level: heads stand out either brighter or darker.
            let mut hist = [0usize; 256];
            let lum: Vec<u8> = img
                .pixels()
                .map(|p| (0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32) as u8)
                .collect();
            for &l in &lum {
                hist[l as usize] += 1;
            }
            let half = lum.len() / 2;
            let mut acc = 0;
            let mut median = 0u8;
            for (v, &c) in hist.iter().enumerate() {
                acc += c;
                if acc > half {
                    median = v as u8;
                    break;
                }
            }
            for (i, l) in lum.iter().enumerate() {
                let d = (*l as i32 - median as i32).unsigned_abs().min(127) * 2;
                out.put_pixel(i as u32 % w, i as u32 / w, Luma([d as u8]));
            }
        }
    }
    out
}

/// `dark_stain` of every pixel of packed RGB `src` into `out`.
fn dark_stains(src: &[u8], out: &mut [u8]) {
    for (o, p) in out.iter_mut().zip(src.chunks_exact(3)) {
        *o = dark_stain(p[0], p[1], p[2]);
    }
}

/// Per channel level, its part of 255 000 less the luma in thousandths (red carries the
/// 255 000), so a pixel's is three table reads and two subtractions.
const LUMA_THOUSANDTHS: [[u32; 256]; 3] = {
    let mut t = [[0u32; 256]; 3];
    let mut v = 0;
    while v < 256 {
        t[0][v] = 255_000 - 299 * v as u32;
        t[1][v] = 587 * v as u32;
        t[2][v] = 114 * v as u32;
        v += 1;
    }
    t
};

/// The stain of one pixel of a stained preparation: 255 less its luma (BT.601), truncated.
/// The luma is 0.299 r + 0.587 g + 0.114 b; in thousandths that is an integer, so the
/// truncation is an integer division, except where the luma is a whole number: there the
/// `f32` sum, which the stain was first defined with, can land a hair above it, and is kept.
/// Every colour gives the same level as that sum (a test checks all 2^24).
#[inline]
fn dark_stain(r: u8, g: u8, b: u8) -> u8 {
    let [tr, tg, tb] = &LUMA_THOUSANDTHS;
    let thousandths = tr[usize::from(r)] - tg[usize::from(g)] - tb[usize::from(b)];
    let level = thousandths / 1000;
    if thousandths - level * 1000 != 0 {
        level as u8
    } else {
        dark_stain_f32(r, g, b)
    }
}

/// The stain level as first defined, in `f32`.
fn dark_stain_f32(r: u8, g: u8, b: u8) -> u8 {
    let l = 0.299 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32;
    (255.0 - l).clamp(0.0, 255.0) as u8
}

/// A frame's stain map (`stain_map`), made once by head finding and read again by the stages
/// after it: the crop path cuts each head's patch map out of it, and the registration shrinks
/// it, instead of going over the frame's pixels again.
#[derive(Debug, Clone)]
pub struct StainMap {
    pub contrast: Contrast,
    pub map: GrayImage,
    /// `map` smoothed as thresholding smooths it (`Thresholded`): head finding thresholds it,
    /// and each patch's smoothed map is cut out of it (`cut_smoothed`).
    pub smoothed: Arc<GrayImage>,
}

impl StainMap {
    pub fn new(img: &RgbImage, contrast: Contrast) -> Self {
        let map = stain_map(img, contrast);
        Self {
            contrast,
            smoothed: Arc::new(blur3(&map)),
            map,
        }
    }

    /// The smoothed map of the patch whose map `raw` is (`cut` with the same arguments gave
    /// it), cut out of this one's: inside the patch each pixel's neighbourhood is the same,
    /// and its border, where the patch's own smoothing sees fewer neighbours, is smoothed
    /// again from `raw`. The same pixels as smoothing `raw` itself.
    pub fn cut_smoothed(&self, x0: u32, y0: u32, raw: &GrayImage) -> GrayImage {
        let mut out = copy_rect(&self.smoothed, x0, y0, raw.width(), raw.height());
        if out.dimensions() != raw.dimensions() {
            return blur3(raw);
        }
        blur3_border(raw, &mut out);
        out
    }

    /// The map `stain_map` makes of the `w` x `h` patch of the image at (`x0`, `y0`) with
    /// `contrast`, cut out of this one, where the two are the same thing: a stained (`Dark`)
    /// map is made pixel by pixel, while an `Any` map depends on the whole image's median.
    pub fn cut(&self, contrast: Contrast, x0: u32, y0: u32, w: u32, h: u32) -> Option<GrayImage> {
        (self.contrast == Contrast::Dark && contrast == Contrast::Dark)
            .then(|| copy_rect(&self.map, x0, y0, w, h))
    }
}

/// The `w` x `h` rectangle of an 8-bit image at (`x0`, `y0`), clipped to the image, copied
/// row by row.
pub fn copy_rect<P: Pixel<Subpixel = u8>>(
    img: &ImageBuffer<P, Vec<u8>>,
    x0: u32,
    y0: u32,
    w: u32,
    h: u32,
) -> ImageBuffer<P, Vec<u8>> {
    let c = usize::from(P::CHANNEL_COUNT);
    let (iw, ih) = img.dimensions();
    let (x0, y0) = (x0.min(iw), y0.min(ih));
    let (w, h) = (w.min(iw - x0), h.min(ih - y0));
    let (stride, from, len) = (iw as usize * c, x0 as usize * c, w as usize * c);
    let mut buf = Vec::with_capacity(len * h as usize);
    if stride > 0 {
        for row in img
            .as_raw()
            .chunks_exact(stride)
            .skip(y0 as usize)
            .take(h as usize)
        {
            buf.extend_from_slice(&row[from..from + len]);
        }
    }
    ImageBuffer::from_raw(w, h, buf).unwrap_or_else(|| ImageBuffer::new(0, 0))
}

/// Box-blur a grey image with a 3x3 kernel (the mean of the neighbours inside the image), to
/// steady the threshold on noisy crops.
fn blur3(img: &GrayImage) -> GrayImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let src = img.as_raw();
    let mut out = GrayImage::new(w as u32, h as u32);
    if w == 0 || h == 0 {
        return out;
    }
    let row_of = |y: usize| &src[y * w..(y + 1) * w];
    // Column sums over the rows y-1..=y+1 inside the image, slid down one row at a time.
    let mut col: Vec<u32> = row_of(0).iter().map(|&v| u32::from(v)).collect();
    if h > 1 {
        for (c, &v) in col.iter_mut().zip(row_of(1)) {
            *c += u32::from(v);
        }
    }
    let dst: &mut [u8] = &mut out;
    for (y, row) in dst.chunks_exact_mut(w).enumerate() {
        if y >= 2 {
            for (c, &v) in col.iter_mut().zip(row_of(y - 2)) {
                *c -= u32::from(v);
            }
        }
        if y >= 1 && y + 1 < h {
            for (c, &v) in col.iter_mut().zip(row_of(y + 1)) {
                *c += u32::from(v);
            }
        }
        let rows = (y.min(1) + 1 + usize::from(y + 1 < h)) as u32;
        if w >= 3 {
            if rows == 3 {
                // s / 9 for s <= 2295, exactly: 7282 / 2^16 is 1/9 less 2.7e-6, and the
                // largest fraction of s / 9 is 8/9.
                for (o, c) in row[1..w - 1].iter_mut().zip(col.windows(3)) {
                    *o = (((c[0] + c[1] + c[2]) * 7282) >> 16) as u8;
                }
            } else {
                for (o, c) in row[1..w - 1].iter_mut().zip(col.windows(3)) {
                    *o = ((c[0] + c[1] + c[2]) / (rows * 3)) as u8;
                }
            }
        }
        for x in [0, w - 1] {
            let (x0, x1) = (x.saturating_sub(1), (x + 1).min(w - 1));
            let s: u32 = col[x0..=x1].iter().sum();
            row[x] = (s / (rows * (x1 - x0 + 1) as u32)) as u8;
        }
    }
    out
}

/// The mean of pixel (`x`, `y`) and its neighbours inside a non-empty image, rounded down:
/// `blur3` at one pixel, the plain way.
fn neighbourhood_mean(img: &GrayImage, x: u32, y: u32) -> Luma<u8> {
    let (w, h) = img.dimensions();
    let (mut sum, mut n) = (0u32, 0u32);
    for yy in y.saturating_sub(1)..=(y + 1).min(h - 1) {
        for xx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
            sum += u32::from(img.get_pixel(xx, yy)[0]);
            n += 1;
        }
    }
    Luma([(sum / n.max(1)) as u8])
}

/// `blur3` of `img` on its one-pixel border only, written into `out` (the same size).
fn blur3_border(img: &GrayImage, out: &mut GrayImage) {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return;
    }
    for x in 0..w {
        out.put_pixel(x, 0, neighbourhood_mean(img, x, 0));
        out.put_pixel(x, h - 1, neighbourhood_mean(img, x, h - 1));
    }
    for y in 0..h {
        out.put_pixel(0, y, neighbourhood_mean(img, 0, y));
        out.put_pixel(w - 1, y, neighbourhood_mean(img, w - 1, y));
    }
}

/// Find the one head in a crop centred on a sperm cell (HuSHeM, SMIDS, MHSMA style).
///
/// Threshold the stain map (Otsu), open it to cut the thin midpiece and tail off, keep the
/// region that is large and near the centre, fill its holes (vacuoles), then measure it.
pub fn find_head_in_crop(img: &RgbImage, contrast: Contrast) -> Result<HeadRegion, PoseError> {
    find_head_in_stain(&stain_map(img, contrast))
}

/// `find_head_in_crop` on the crop's stain map (`stain_map`), for callers that use the map
/// again (the shape features), so it is made once.
pub fn find_head_in_stain(raw_stain: &GrayImage) -> Result<HeadRegion, PoseError> {
    find_head_in_smoothed(blur3(raw_stain))
}

/// `find_head_in_stain` given the stain map already smoothed (`StainMap::cut_smoothed`).
pub fn find_head_in_smoothed(smoothed: GrayImage) -> Result<HeadRegion, PoseError> {
    let (w, h) = smoothed.dimensions();
    if w < 8 || h < 8 {
        return Err(PoseError::Empty);
    }
    let t = Thresholded::from_smoothed(Arc::new(smoothed));
    let (lo, hi) = t.range;
    if hi.saturating_sub(lo) < 12 {
        return Err(PoseError::NoContrast);
    }
    let k = ((w.min(h) as f32 / 45.0).round() as u8).clamp(2, 4);
    let min_area = ((w * h) as f32 * 0.004).max(20.0) as usize;
    // The region left by the opening that is large and near the centre.
    let (cx0, cy0) = (w as f64 / 2.0, h as f64 / 2.0);
    let diag = ((w * w + h * h) as f64).sqrt();
    let score = |n: usize, d: f64| n as f64 / (1.0 + 4.0 * (d / diag)).powi(2);
    let best = crate::core::regions::best_opened_region(
        &t.stain,
        t.head_level,
        k,
        min_area,
        |n, cx, cy| score(n, ((cx - cx0).powi(2) + (cy - cy0).powi(2)).sqrt()),
        |n, (x0, y0, x1, y1)| {
            // The nearest a centroid inside the box can be to the centre (a hair nearer, so
            // rounding never makes the bound smaller than a score).
            let dx = (x0 as f64 - cx0).max(cx0 - x1 as f64).max(0.0);
            let dy = (y0 as f64 - cy0).max(cy0 - y1 as f64).max(0.0);
            score(n, (dx.hypot(dy) - 1e-6).max(0.0)) * (1.0 + 1e-9)
        },
    );
    let region = best.map_err(|largest_px| PoseError::NoHead { largest_px })?;
    let mut mask = GrayImage::new(w, h);
    for &(x, y) in &region {
        mask.put_pixel(x, y, Luma([255]));
    }
    fill_holes(&mut mask);
    Ok(measure(&mask, &t.stain, t.tail_level, (0, 0)))
}

/// Share of the Otsu level (above background) at which head pixels start.
const HEAD_LEVEL: f32 = 0.6;
/// Share of the Otsu level (above background) at which tail pixels start.
const TAIL_LEVEL: f32 = 0.3;

/// The stain map of an image and the levels that cut the head and tail masks from it (pixels
/// strictly above a level belong to it); crops (`find_head_in_crop`) and full fields
/// (`segment`) threshold the same way. The masks are never made whole: what needs one reads
/// the stain map against its level.
pub(crate) struct Thresholded {
    /// Smoothed stain intensity.
    pub stain: Arc<GrayImage>,
    /// Otsu's level of the stain map.
    pub otsu: u8,
    /// Otsu's level above the background level (at least 1).
    pub span: f32,
    /// Head pixels lie above this level.
    pub head_level: u8,
    /// Tail pixels lie above this (lower) level.
    pub tail_level: u8,
    /// The smallest and largest stain level.
    pub range: (u8, u8),
}

impl Thresholded {
    /// Otsu splits the darkest stain (nucleus) from the rest; the acrosome and the tail take up
    /// less stain, so the head is cut at a level between background and Otsu's, and the tail is
    /// looked for at a lower level still. `stain` is the image's `stain_map` smoothed by
    /// `blur3` (as `StainMap` keeps it).
    pub(crate) fn from_smoothed(stain: Arc<GrayImage>) -> Self {
        let hist = histogram(stain.as_raw());
        let otsu = otsu_of(&hist);
        let bg = percentile(&hist, 0.3) as f32;
        let span = (otsu as f32 - bg).max(1.0);
        let lo = hist.iter().position(|&c| c > 0).unwrap_or(0) as u8;
        let hi = hist.iter().rposition(|&c| c > 0).unwrap_or(0) as u8;
        Self {
            stain,
            otsu,
            span,
            head_level: (bg + HEAD_LEVEL * span) as u8,
            tail_level: (bg + TAIL_LEVEL * span) as u8,
            range: (lo, hi),
        }
    }
}

/// How many of `values` have each level. Four partial counts, so that runs of one level (the
/// background) do not wait on the same counter.
pub(crate) fn histogram(values: &[u8]) -> [u32; 256] {
    let mut part = [[0u32; 256]; 4];
    let mut quads = values.chunks_exact(4);
    for q in &mut quads {
        for (p, &v) in part.iter_mut().zip(q) {
            p[usize::from(v)] += 1;
        }
    }
    for &v in quads.remainder() {
        part[0][usize::from(v)] += 1;
    }
    let mut hist = [0u32; 256];
    for p in &part {
        for (h, c) in hist.iter_mut().zip(p) {
            *h += c;
        }
    }
    hist
}

/// Otsu's level from a histogram, as `imageproc::contrast::otsu_level` computes it (the same
/// sums in the same order, the same tie rule), without a second pass over the image.
fn otsu_of(hist: &[u32; 256]) -> u8 {
    let total: u32 = hist.iter().sum();
    let total_sum = hist
        .iter()
        .enumerate()
        .fold(0f64, |s, (t, &h)| s + (t as u32 * h) as f64);
    let (mut bg_sum, mut bg_weight) = (0f64, 0u32);
    let (mut largest, mut best) = (0f64, 0u8);
    for (t, &h) in hist.iter().enumerate() {
        bg_weight += h;
        if bg_weight == 0 {
            continue;
        }
        let fg_weight = total - bg_weight;
        if fg_weight == 0 {
            break;
        }
        bg_sum += (t as u32 * h) as f64;
        let fg_sum = total_sum - bg_sum;
        let diff = bg_sum / bg_weight as f64 - fg_sum / fg_weight as f64;
        let v = bg_weight as f64 * fg_weight as f64 * diff.powi(2);
        if v > largest {
            largest = v;
            best = t as u8;
        }
    }
    best
}

/// The grey level below which `q` of the histogram's pixels lie.
pub(crate) fn percentile(hist: &[u32; 256], q: f32) -> u8 {
    let total: u32 = hist.iter().sum();
    let target = (total as f32 * q) as usize;
    let mut acc = 0usize;
    for (v, &c) in hist.iter().enumerate() {
        acc += c as usize;
        if acc > target {
            return v as u8;
        }
    }
    255
}

/// Binary image of the pixels strictly above `level`.
pub fn threshold_above(img: &GrayImage, level: u8) -> GrayImage {
    let mut out = GrayImage::new(img.width(), img.height());
    for (o, &p) in out.iter_mut().zip(img.as_raw()) {
        *o = if p > level { 255 } else { 0 };
    }
    out
}

/// Fill background regions that do not touch the image border.
pub fn fill_holes(mask: &mut GrayImage) {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    // Holes lie within the mask's bounding box: flood the background inward from the box
    // grown by one pixel (all background, and reached from the image border), not the image.
    let Some((x0, y0, x1, y1)) = mask_box(mask) else {
        return;
    };
    let px: &mut [u8] = mask;
    let (bx0, by0) = (x0.saturating_sub(1), y0.saturating_sub(1));
    let (bx1, by1) = ((x1 + 1).min(w - 1), (y1 + 1).min(h - 1));
    let bw = bx1 - bx0 + 1;
    let at = |x: usize, y: usize| (y - by0) * bw + (x - bx0);
    let mut outside = vec![false; bw * (by1 - by0 + 1)];
    let mut stack: Vec<(usize, usize)> = Vec::new();
    let visit = |x: usize, y: usize, outside: &mut Vec<bool>, stack: &mut Vec<(usize, usize)>| {
        if !outside[at(x, y)] && px[y * w + x] == 0 {
            outside[at(x, y)] = true;
            stack.push((x, y));
        }
    };
    for x in bx0..=bx1 {
        visit(x, by0, &mut outside, &mut stack);
        visit(x, by1, &mut outside, &mut stack);
    }
    for y in by0..=by1 {
        visit(bx0, y, &mut outside, &mut stack);
        visit(bx1, y, &mut outside, &mut stack);
    }
    while let Some((x, y)) = stack.pop() {
        if x > bx0 {
            visit(x - 1, y, &mut outside, &mut stack);
        }
        if y > by0 {
            visit(x, y - 1, &mut outside, &mut stack);
        }
        if x < bx1 {
            visit(x + 1, y, &mut outside, &mut stack);
        }
        if y < by1 {
            visit(x, y + 1, &mut outside, &mut stack);
        }
    }
    for y in by0..=by1 {
        for x in bx0..=bx1 {
            if !outside[at(x, y)] {
                px[y * w + x] = 255;
            }
        }
    }
}

/// The smallest box `(x0, y0, x1, y1)` (inclusive) holding every set pixel of a mask, found a
/// row at a time; `None` for an empty mask.
fn mask_box(mask: &GrayImage) -> Option<(usize, usize, usize, usize)> {
    let w = mask.width() as usize;
    let mut found: Option<(usize, usize, usize, usize)> = None;
    for (y, row) in mask.as_raw().chunks_exact(w.max(1)).enumerate() {
        if row.iter().fold(0, |m, &v| m | v) == 0 {
            continue;
        }
        let a = row.iter().position(|&v| v != 0).unwrap_or(0);
        let b = row.iter().rposition(|&v| v != 0).unwrap_or(0);
        found = Some(match found {
            None => (a, y, b, y),
            Some((x0, y0, x1, _)) => (x0.min(a), y0, x1.max(b), y),
        });
    }
    found
}

/// The set pixels of a mask in raster order, looked for within the mask's box only.
fn mask_pixels(mask: &GrayImage) -> Vec<(u32, u32)> {
    let mut pixels: Vec<(u32, u32)> = Vec::new();
    if let Some((x0, y0, x1, y1)) = mask_box(mask) {
        let w = mask.width() as usize;
        for (y, row) in mask
            .as_raw()
            .chunks_exact(w)
            .enumerate()
            .take(y1 + 1)
            .skip(y0)
        {
            for (x, &v) in row.iter().enumerate().take(x1 + 1).skip(x0) {
                if v != 0 {
                    pixels.push((x as u32, y as u32));
                }
            }
        }
    }
    pixels
}

/// The rows `ys` of a mask, cut to the columns `xs`, with the same pixels of a stain map the
/// mask was cut from at `offset`: (y, stain row, mask row).
fn box_rows<'a>(
    mask: &'a GrayImage,
    stain: &'a GrayImage,
    (ox, oy): (u32, u32),
    xs: std::ops::Range<u32>,
    ys: std::ops::Range<u32>,
) -> impl Iterator<Item = (u32, &'a [u8], &'a [u8])> {
    let (w, sw) = (mask.width(), stain.width());
    ys.filter_map(move |y| {
        let at = |row: u32, width: u32, dx: u32| {
            (row * width + xs.start + dx) as usize..(row * width + xs.end + dx) as usize
        };
        let s = stain.as_raw().get(at(y + oy, sw, ox))?;
        let m = mask.as_raw().get(at(y, w, 0))?;
        Some((y, s, m))
    })
}

/// Second moments of a head mask, and its polarity from the tail (stain above `tail_level`
/// outside the head: the midpiece) or else from the stain asymmetry. `stain` may be a larger
/// map the mask was cut from at `offset` (no copy of it is made).
pub fn measure(
    head: &GrayImage,
    stain: &GrayImage,
    tail_level: u8,
    offset: (u32, u32),
) -> HeadRegion {
    let pixels = mask_pixels(head);
    let n = pixels.len().max(1) as f64;
    let (sx, sy) = pixels
        .iter()
        .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x as f64, b + y as f64));
    let (cx, cy) = (sx / n, sy / n);
    let (mut m20, mut m02, mut m11) = (0.0, 0.0, 0.0);
    for &(x, y) in &pixels {
        let (dx, dy) = (x as f64 - cx, y as f64 - cy);
        m20 += dx * dx;
        m02 += dy * dy;
        m11 += dx * dy;
    }
    m20 /= n;
    m02 /= n;
    m11 /= n;
    let theta = 0.5 * (2.0 * m11).atan2(m20 - m02);
    let common = ((m20 - m02).powi(2) / 4.0 + m11 * m11).sqrt();
    let l1 = ((m20 + m02) / 2.0 + common).max(0.0);
    let l2 = ((m20 + m02) / 2.0 - common).max(0.0);
    let major = 4.0 * l1.sqrt();
    let minor = 4.0 * l2.sqrt();
    let u = (theta.cos(), theta.sin());

    // Evidence 1: stained pixels outside the head, just beyond either end of the major axis
    // (no farther than 1.2 lengths along it and 0.3 across it: only that box is looked at).
    let (w, h) = head.dimensions();
    let half = major / 2.0;
    let reach = (1.2 * major + 0.3 * major.max(4.0)).ceil() + 1.0;
    let span = |c: f64, n: u32| {
        let lo = (c - reach).floor().max(0.0) as u32;
        let hi = ((c + reach).ceil().max(0.0) as u32).min(n);
        lo..hi
    };
    let (mut plus, mut minus) = (0usize, 0usize);
    let xs = span(cx, w);
    let rows = box_rows(head, stain, offset, xs.clone(), span(cy, h));
    let (p_max, t_max) = (0.3 * major.max(4.0), half + 0.7 * major);
    for (y, srow, mrow) in rows {
        // Only the columns of this row that can lie within both bands are looked at.
        let cols = band_columns(y as f64 - cy, u, (p_max, t_max), cx, xs.clone());
        let skip = (cols.start - xs.start) as usize;
        let (srow, mrow) = (&srow[skip..], &mrow[skip..]);
        for ((x, &s), &m) in cols.zip(srow).zip(mrow) {
            if s <= tail_level || m != 0 {
                continue;
            }
            let (dx, dy) = (x as f64 - cx, y as f64 - cy);
            let t = dx * u.0 + dy * u.1;
            let p = (-dx * u.1 + dy * u.0).abs();
            if p > p_max {
                continue;
            }
            // Skip the faint rim around the head (a pale acrosome reaches past the head mask):
            // only stain well clear of the head's ellipse counts as midpiece or tail.
            let r = (t / (major / 2.0).max(1.0)).powi(2) + (p / (minor / 2.0).max(1.0)).powi(2);
            if r < 1.3 * 1.3 {
                continue;
            }
            if t > half * 0.8 && t < half + 0.7 * major {
                plus += 1;
            } else if t < -half * 0.8 && t > -half - 0.7 * major {
                minus += 1;
            }
        }
    }
    let min_tail = (0.01 * n).max(4.0) as usize;
    let tail_sign =
        if plus.max(minus) >= min_tail && plus.max(minus) as f64 >= 2.0 * plus.min(minus) as f64 {
            Some(if plus > minus { 1.0 } else { -1.0 })
        } else {
            None
        };
    let (sign, polarity) = match tail_sign {
        Some(s) => (s, Polarity::Tail),
        None => {
            // Evidence 2: the acrosome (front) takes up less stain than the back of the head.
            let (mut sp, mut np, mut sm, mut nm) = (0.0, 0.0, 0.0, 0.0);
            for &(x, y) in &pixels {
                let t = (x as f64 - cx) * u.0 + (y as f64 - cy) * u.1;
                let s = stain.get_pixel(x + offset.0, y + offset.1)[0] as f64;
                if t > 0.0 {
                    sp += s;
                    np += 1.0;
                } else {
                    sm += s;
                    nm += 1.0;
                }
            }
            let mp = if np > 0.0 { sp / np } else { 0.0 };
            let mm = if nm > 0.0 { sm / nm } else { 0.0 };
            (if mp >= mm { 1.0 } else { -1.0 }, Polarity::Intensity)
        }
    };
    HeadRegion {
        pixels,
        centroid: (cx as f32, cy as f32),
        tail_dir: ((sign * u.0) as f32, (sign * u.1) as f32),
        major_px: major as f32,
        minor_px: minor as f32,
        polarity,
    }
}

/// The columns of `xs` on a row `dy` from the centre `cx` that may hold a pixel within `p_max`
/// of the axis `u` and within `t_max` along it, a pixel wider on each side than the exact
/// slabs (so rounding never drops one); the caller still tests every pixel.
fn band_columns(
    dy: f64,
    u: (f64, f64),
    (p_max, t_max): (f64, f64),
    cx: f64,
    xs: std::ops::Range<u32>,
) -> std::ops::Range<u32> {
    // Across the axis p = -dx·u.1 + dy·u.0, along it t = dx·u.0 + dy·u.1: each bound on |p|
    // and |t| is a slab of dx (or the whole row, or none of it, when the coefficient is 0).
    let slab = |coef: f64, offset: f64, bound: f64| -> Option<(f64, f64)> {
        if coef.abs() < 1e-9 {
            return (offset.abs() <= bound).then_some((f64::NEG_INFINITY, f64::INFINITY));
        }
        let (a, b) = ((-bound - offset) / coef, (bound - offset) / coef);
        Some((a.min(b), a.max(b)))
    };
    let across = slab(-u.1, dy * u.0, p_max);
    let along = slab(u.0, dy * u.1, t_max);
    let (Some(a), Some(b)) = (across, along) else {
        return xs.start..xs.start;
    };
    let (lo, hi) = (a.0.max(b.0) + cx - 1.0, a.1.min(b.1) + cx + 1.0);
    if lo > hi {
        return xs.start..xs.start;
    }
    let clip = |v: f64| v.clamp(xs.start as f64, xs.end as f64) as u32;
    clip(lo.floor())..clip(hi.ceil() + 1.0).max(clip(lo.floor()))
}

/// Small changes to an upright cut, used by training-time augmentation (identity by default).
#[derive(Debug, Clone, Copy)]
pub struct Jitter {
    /// Extra rotation in degrees.
    pub rotate_deg: f32,
    /// Mirror left-right after turning upright (keeps the head up).
    pub mirror: bool,
    /// Magnification factor (>1 zooms in).
    pub scale: f32,
    /// Shift of the window centre, as a fraction of the window.
    pub shift: (f32, f32),
}

impl Default for Jitter {
    fn default() -> Self {
        Self {
            rotate_deg: 0.0,
            mirror: false,
            scale: 1.0,
            shift: (0.0, 0.0),
        }
    }
}

/// Where and how to cut: centre and tail direction in the source, window size in source pixels.
#[derive(Debug, Clone, Copy)]
pub struct Cut {
    pub centre: (f32, f32),
    /// Unit vector from head to tail in the source; it points down in the output.
    pub tail_dir: (f32, f32),
    pub window_px: f32,
}

impl Cut {
    /// A cut that keeps the source orientation (tail direction taken as straight down).
    pub fn unrotated(centre: (f32, f32), window_px: f32) -> Self {
        Self {
            centre,
            tail_dir: (0.0, 1.0),
            window_px,
        }
    }

    pub fn upright(head: &HeadRegion, window_px: f32) -> Self {
        Self {
            centre: head.centroid,
            tail_dir: head.tail_dir,
            window_px,
        }
    }
}

/// Resample a square `out_px` crop: the cut's centre in the middle, its tail direction pointing
/// down, bilinear sampling with edge pixels repeated outside the source.
pub fn cut_window(img: &RgbImage, cut: &Cut, out_px: u32, jitter: &Jitter) -> RgbImage {
    let (sw, sh) = img.dimensions();
    let a = jitter.rotate_deg.to_radians();
    let (ca, sa) = (a.cos(), a.sin());
    let d = cut.tail_dir;
    // Output "down" maps to the tail direction, rotated by the jitter angle.
    let down = (d.0 * ca - d.1 * sa, d.0 * sa + d.1 * ca);
    let mut right = (down.1, -down.0);
    if jitter.mirror {
        right = (-right.0, -right.1);
    }
    let step = cut.window_px / out_px as f32 / jitter.scale.max(1e-3);
    let centre = (
        cut.centre.0 + jitter.shift.0 * cut.window_px,
        cut.centre.1 + jitter.shift.1 * cut.window_px,
    );
    let half = out_px as f32 / 2.0;
    let mut out = RgbImage::new(out_px, out_px);
    if sw == 0 || sh == 0 {
        return out;
    }
    let mut pixels = out.chunks_exact_mut(3);
    for oy in 0..out_px {
        for ox in 0..out_px {
            let u = (ox as f32 + 0.5 - half) * step;
            let v = (oy as f32 + 0.5 - half) * step;
            let sx = centre.0 + u * right.0 + v * down.0 - 0.5;
            let sy = centre.1 + u * right.1 + v * down.1 - 0.5;
            if let Some(o) = pixels.next() {
                o.copy_from_slice(&bilinear(img, sx, sy, sw, sh));
            }
        }
    }
    out
}

/// The colour at (`x`, `y`) of a non-empty `w` x `h` image, bilinear, edges repeated.
fn bilinear(img: &RgbImage, x: f32, y: f32, w: u32, h: u32) -> [u8; 3] {
    let x = x.clamp(0.0, (w - 1) as f32);
    let y = y.clamp(0.0, (h - 1) as f32);
    // Not negative, so truncation is the floor (without a call into libm).
    let (x0, y0) = (x as u32, y as u32);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let raw = img.as_raw();
    let at = |x: u32, y: u32| {
        let i = (y as usize * w as usize + x as usize) * 3;
        raw.get(i..i + 3).unwrap_or(&[0, 0, 0])
    };
    let (p00, p10, p01, p11) = (at(x0, y0), at(x1, y0), at(x0, y1), at(x1, y1));
    let mut o = [0u8; 3];
    for c in 0..3 {
        let top = p00[c] as f32 * (1.0 - fx) + p10[c] as f32 * fx;
        let bot = p01[c] as f32 * (1.0 - fx) + p11[c] as f32 * fx;
        o[c] = round_level(top * (1.0 - fy) + bot * fy);
    }
    o
}

/// `v.round().clamp(0.0, 255.0) as u8` for a blend of levels (`v` in 0..=255, or NaN), without
/// a call into libm: the truncation, plus one from a fraction of a half up.
#[inline]
fn round_level(v: f32) -> u8 {
    let t = v as u8;
    t + u8::from(v - f32::from(t) >= 0.5 && t < 255)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::synthetic_sperm;

    #[test]
    fn the_sliding_blur_is_the_mean_of_each_neighbourhood() {
        let mut state = 7u32;
        for (w, h) in [(1, 1), (1, 5), (5, 1), (2, 2), (3, 3), (17, 9), (64, 48)] {
            let img = GrayImage::from_fn(w, h, |_, _| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                Luma([(state >> 16) as u8])
            });
            let want = GrayImage::from_fn(w, h, |x, y| neighbourhood_mean(&img, x, y));
            assert_eq!(blur3(&img), want, "{w}x{h}");
        }
    }

    #[test]
    fn a_patch_smoothed_map_cut_from_the_frame_is_the_patch_smoothed() {
        let mut state = 11u32;
        let mut next = || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            state >> 16
        };
        let frame = RgbImage::from_fn(97, 61, |_, _| {
            image::Rgb([next() as u8, next() as u8, next() as u8])
        });
        let map = StainMap::new(&frame, Contrast::Dark);
        let rects = [
            (0, 0, 97, 61),
            (0, 0, 1, 1),
            (96, 60, 1, 1),
            (0, 0, 2, 5),
            (95, 10, 2, 30),
            (10, 59, 40, 2),
            (30, 20, 3, 3),
        ];
        let random: Vec<_> = (0..200)
            .map(|_| {
                let (x0, y0) = (next() % 97, next() % 61);
                (x0, y0, 1 + next() % (97 - x0), 1 + next() % (61 - y0))
            })
            .collect();
        for &(x0, y0, w, h) in rects.iter().chain(&random) {
            let raw = map.cut(Contrast::Dark, x0, y0, w, h).unwrap();
            assert_eq!(
                map.cut_smoothed(x0, y0, &raw),
                blur3(&raw),
                "{x0},{y0} {w}x{h}"
            );
        }
    }

    #[test]
    fn band_columns_hold_every_pixel_within_both_bands() {
        let mut state = 5u32;
        let mut next = || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            f64::from(state >> 8) / f64::from(1u32 << 24)
        };
        let mut checked = 0;
        for i in 0..4000 {
            // Axis angles at random and exactly along the rows and columns.
            let a = if i % 10 == 0 {
                f64::from(i % 40 / 10) * std::f64::consts::FRAC_PI_2
            } else {
                next() * std::f64::consts::TAU
            };
            let u = (a.cos(), a.sin());
            let (p_max, t_max) = (1.0 + next() * 30.0, 1.0 + next() * 120.0);
            let cx = next() * 200.0;
            let dy = (next() - 0.5) * 300.0;
            let xs = (next() * 50.0) as u32..(150.0 + next() * 100.0) as u32;
            let cols = band_columns(dy, u, (p_max, t_max), cx, xs.clone());
            assert!(cols.start >= xs.start && cols.end <= xs.end);
            for x in xs {
                let dx = f64::from(x) - cx;
                let t = dx * u.0 + dy * u.1;
                let p = (-dx * u.1 + dy * u.0).abs();
                if p <= p_max && t.abs() < t_max {
                    assert!(
                        cols.contains(&x),
                        "{x} not in {cols:?} (angle {a}, dy {dy})"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 10_000);
    }

    #[test]
    fn round_level_rounds_like_f32_round() {
        let reference = |v: f32| v.round().clamp(0.0, 255.0) as u8;
        let mut checked = 0;
        // Every whole and half level, and the floats just around them.
        for k in -2..=512 {
            let mut v = k as f32 / 2.0;
            for _ in 0..8 {
                v = v.next_down();
            }
            for _ in 0..17 {
                assert_eq!(round_level(v), reference(v), "{v}");
                v = v.next_up();
                checked += 1;
            }
        }
        for v in [f32::NAN, -0.0, 0.0, 1e-30, 255.0, 256.0, 1e9] {
            assert_eq!(round_level(v), reference(v), "{v}");
        }
        // A fine sweep of the range.
        for i in 0..=2_600_000 {
            let v = i as f32 * 1e-4;
            assert_eq!(round_level(v), reference(v), "{v}");
            checked += 1;
        }
        assert!(checked > 2_600_000);
    }

    #[test]
    fn the_stain_of_a_whole_image_is_the_f32_stain_for_every_colour() {
        // Every colour once, in an order that puts each in every lane position over the run,
        // and an odd length so the tail goes through the one-at-a-time path too.
        for r in 0..=255u8 {
            let src: Vec<u8> = (0..=255u8)
                .flat_map(|g| (0..=255u8).flat_map(move |b| [r, g, b]))
                .chain([r, 7, 9])
                .collect();
            let mut out = vec![0u8; src.len() / 3];
            dark_stains(&src, &mut out);
            for (o, p) in out.iter().zip(src.chunks_exact(3)) {
                assert_eq!(*o, dark_stain_f32(p[0], p[1], p[2]), "{p:?}");
            }
        }
    }

    #[test]
    fn the_integer_stain_is_the_f32_stain_for_every_colour() {
        let mut exact_lumas = 0;
        for r in 0..=255u8 {
            for g in 0..=255u8 {
                for b in 0..=255u8 {
                    assert_eq!(dark_stain(r, g, b), dark_stain_f32(r, g, b), "{r} {g} {b}");
                    if (299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b)) % 1000 == 0 {
                        exact_lumas += 1;
                    }
                }
            }
        }
        // The colours whose luma is a whole number, where the two could differ.
        assert_eq!(exact_lumas, 16_774);
    }

    #[test]
    fn finds_head_and_tail_direction_at_every_angle() {
        for deg in (0..360).step_by(15) {
            let img = synthetic_sperm(131, deg as f32);
            let head = find_head_in_crop(&img, Contrast::Dark).expect("head");
            let err = (head.angle_deg() - deg as f32 + 540.0).rem_euclid(360.0) - 180.0;
            assert!(err.abs() < 4.0, "angle {deg}: got {}", head.angle_deg());
            assert!(
                (head.major_px - 40.0).abs() < 4.0,
                "major {}",
                head.major_px
            );
            assert!(
                (head.minor_px - 26.0).abs() < 4.0,
                "minor {}",
                head.minor_px
            );
        }
    }

    #[test]
    fn upright_cut_puts_tail_down() {
        let img = synthetic_sperm(131, 30.0);
        let head = find_head_in_crop(&img, Contrast::Dark).expect("head");
        let up = cut_window(&img, &Cut::upright(&head, 100.0), 100, &Jitter::default());
        let again = find_head_in_crop(&up, Contrast::Dark).expect("head after cut");
        let err = (again.angle_deg() - 90.0).abs();
        assert!(err < 4.0, "upright angle {}", again.angle_deg());
    }

    /// The flood from the whole image's border: the reference for `fill_holes`.
    fn fill_holes_whole(mask: &mut GrayImage) {
        let (w, h) = (mask.width() as usize, mask.height() as usize);
        let mut outside = vec![false; w * h];
        let mut stack: Vec<usize> = (0..w)
            .flat_map(|x| [x, (h - 1) * w + x])
            .chain((0..h).flat_map(|y| [y * w, y * w + w - 1]))
            .collect();
        let px: &mut [u8] = mask;
        while let Some(i) = stack.pop() {
            if outside[i] || px[i] != 0 {
                continue;
            }
            outside[i] = true;
            let (x, y) = (i % w, i / w);
            if x > 0 {
                stack.push(i - 1);
            }
            if y > 0 {
                stack.push(i - w);
            }
            if x + 1 < w {
                stack.push(i + 1);
            }
            if y + 1 < h {
                stack.push(i + w);
            }
        }
        for (p, o) in px.iter_mut().zip(&outside) {
            if !o {
                *p = 255;
            }
        }
    }

    #[test]
    fn holes_are_filled_as_a_flood_from_the_image_border_fills_them() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for case in 0..300 {
            let (w, h) = (rng.random_range(3..40u32), rng.random_range(3..40u32));
            let mut m = GrayImage::new(w, h);
            let density = rng.random_range(0.1..0.9);
            for p in m.pixels_mut() {
                if rng.random_bool(density) {
                    p[0] = 255;
                }
            }
            let mut want = m.clone();
            fill_holes_whole(&mut want);
            fill_holes(&mut m);
            assert_eq!(m, want, "case {case}");
        }
    }

    #[test]
    fn dividing_by_nine_with_a_multiply_is_exact() {
        for s in 0..=9 * 255u32 {
            assert_eq!((s * 7282) >> 16, s / 9, "{s}");
        }
    }

    #[test]
    fn blank_image_is_an_error_not_a_panic() {
        let img = RgbImage::from_pixel(64, 64, image::Rgb([200, 200, 200]));
        assert_eq!(
            find_head_in_crop(&img, Contrast::Dark).unwrap_err(),
            PoseError::NoContrast
        );
        let tiny = RgbImage::new(3, 3);
        assert_eq!(
            find_head_in_crop(&tiny, Contrast::Dark).unwrap_err(),
            PoseError::Empty
        );
    }
}
