//! Head morphometrics: sizes in µm for records, and the scale-free shape and stain descriptors
//! that the classifiers take beside the pixels.

use image::GrayImage;
use imageproc::contours::{BorderType, find_contours};
use imageproc::geometry::{approximate_polygon_dp, arc_length, convex_hull};
use imageproc::point::Point;

use crate::core::pose::{self, HeadRegion};

/// Number of values `shape_features` returns; stored in model metadata and checked there.
pub const FEATURE_COUNT: usize = 44;
/// Name of the feature set, stored in model metadata so a reader knows what to compute.
pub const FEATURE_SET: &str = "head_shape_v1";

const PROFILE_BINS: usize = 10;
const FOURIER_HARMONICS: usize = 8;

/// Head size in physical units, for records and reports.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, PartialEq)]
pub struct HeadSize {
    pub length_um: f32,
    pub width_um: f32,
    pub area_um2: f32,
    pub perimeter_um: f32,
    /// Length / width.
    pub ellipticity: f32,
}

/// Sizes of a head at `um_per_px`.
pub fn head_size(head: &HeadRegion, um_per_px: f32) -> HeadSize {
    let perim = perimeter_px(head);
    HeadSize {
        length_um: head.major_px * um_per_px,
        width_um: head.minor_px * um_per_px,
        area_um2: head.area_px() as f32 * um_per_px * um_per_px,
        perimeter_um: perim * um_per_px,
        ellipticity: head.major_px / head.minor_px.max(1e-3),
    }
}

/// Length of the head's outline: the outer pixel contour, simplified to within half a pixel
/// (a raw 8-connected chain over-counts a smooth outline by up to 8 %).
fn perimeter_px(head: &HeadRegion) -> f32 {
    if head.pixels.is_empty() {
        return 0.0;
    }
    let (x0, y0, x1, y1) = bbox(head);
    let mut mask = image::GrayImage::new(x1 - x0 + 3, y1 - y0 + 3);
    for &(x, y) in &head.pixels {
        mask.put_pixel(x - x0 + 1, y - y0 + 1, image::Luma([255]));
    }
    find_contours::<i32>(&mask)
        .into_iter()
        .filter(|c| c.border_type == BorderType::Outer)
        .map(|c| {
            let simple = approximate_polygon_dp(&c.points, 0.5, true);
            arc_length(&simple, true) as f32
        })
        .fold(0.0, f32::max)
        .max(1.0)
}

/// Area over convex-hull area (hull through pixel centres, grown by half its perimeter so a
/// filled convex region scores about 1), at most 1.
pub fn solidity(head: &HeadRegion) -> f32 {
    solidity_of(head, &boundary(head))
}

/// `solidity` from the head's `boundary`, for callers that have it.
fn solidity_of(head: &HeadRegion, border: &[(u32, u32)]) -> f32 {
    let hull: Vec<Point<i32>> = convex_hull(
        border
            .iter()
            .map(|&(x, y)| Point::new(x as i32, y as i32))
            .collect::<Vec<_>>(),
    );
    let hull_area = polygon_area(&hull).max(1.0) + perimeter_hull(&hull) / 2.0;
    (head.area_px().max(1) as f32 / hull_area as f32).min(1.0)
}

/// The outline descriptor of feature set `head_shape_v1`: boundary pixels (those with a
/// 4-neighbour outside the head) times 0.95, plus one. Kept as it is so models trained on it
/// keep their meaning; `perimeter_px` is the accurate length for reports.
fn outline_descriptor_px(border: &[(u32, u32)]) -> f32 {
    border.len() as f32 * 0.95 + 1.0
}

fn bbox(head: &HeadRegion) -> (u32, u32, u32, u32) {
    head.pixels
        .iter()
        .fold((u32::MAX, u32::MAX, 0, 0), |(x0, y0, x1, y1), &(x, y)| {
            (x0.min(x), y0.min(y), x1.max(x), y1.max(y))
        })
}

fn boundary(head: &HeadRegion) -> Vec<(u32, u32)> {
    let (x0, y0, x1, y1) = bbox(head);
    let (w, h) = ((x1 - x0 + 3) as usize, (y1 - y0 + 3) as usize);
    let mut grid = vec![false; w * h];
    for &(x, y) in &head.pixels {
        grid[(y - y0 + 1) as usize * w + (x - x0 + 1) as usize] = true;
    }
    head.pixels
        .iter()
        .copied()
        .filter(|&(x, y)| {
            let (gx, gy) = ((x - x0 + 1) as usize, (y - y0 + 1) as usize);
            !(grid[gy * w + gx - 1]
                && grid[gy * w + gx + 1]
                && grid[(gy - 1) * w + gx]
                && grid[(gy + 1) * w + gx])
        })
        .collect()
}

/// Scale-free descriptors of a head (`FEATURE_COUNT` values). Lengths are divided by
/// `window_px`, the physical window the classifier sees, so they mean the same at any
/// magnification once the window is scaled to it.
///
/// Layout: 6 size/shape values, 7 Hu moments (signed log), 8 contour Fourier magnitudes,
/// 10 widths along the head axis (front to back), 10 stain levels along the axis, acrosome
/// share, stain contrast and stain spread. `stain` is the image's `pose::stain_map`, the one
/// the head was found on.
pub fn shape_features(stain: &GrayImage, head: &HeadRegion, window_px: f32) -> Vec<f32> {
    let mut f = Vec::with_capacity(FEATURE_COUNT);
    let n = head.area_px().max(1) as f32;
    let (cx, cy) = head.centroid;
    let (tx, ty) = head.tail_dir;
    let major = head.major_px.max(1.0);
    let minor = head.minor_px.max(1.0);

    // Size and shape.
    let border = boundary(head);
    f.push(n / (window_px * window_px) * 10.0);
    f.push(outline_descriptor_px(&border) / window_px);
    f.push(major / window_px);
    f.push(minor / window_px);
    f.push(minor / major);
    f.push(solidity_of(head, &border));

    // Hu moments of the filled head.
    for h in hu_moments(head) {
        f.push(if h == 0.0 {
            0.0
        } else {
            (-h.signum() * (h.abs().max(1e-30)).log10() / 10.0) as f32
        });
    }

    // Fourier magnitudes of the centroid-distance signature of the outline.
    let mut sig = [0f32; 64];
    let mut cnt = [0u32; 64];
    for &(x, y) in &border {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        // Angle relative to the tail direction, so the signature starts at the back.
        let a = (dy * tx - dx * ty).atan2(dx * tx + dy * ty);
        let b = (((a + std::f32::consts::PI) / std::f32::consts::TAU) * 64.0) as usize % 64;
        let r = (dx * dx + dy * dy).sqrt();
        sig[b] = sig[b].max(r);
        cnt[b] += 1;
    }
    fill_gaps(&mut sig, &cnt);
    let dc = sig.iter().sum::<f32>() / 64.0;
    for k in 1..=FOURIER_HARMONICS {
        let (mut re, mut im) = (0f32, 0f32);
        for (i, &s) in sig.iter().enumerate() {
            let ph = std::f32::consts::TAU * (k * i) as f32 / 64.0;
            re += s * ph.cos();
            im += s * ph.sin();
        }
        f.push((re * re + im * im).sqrt() / 64.0 / dc.max(1e-3));
    }

    // Width and stain profiles along the axis, front (t = -major/2) to back.
    let mut lo = [f32::MAX; PROFILE_BINS];
    let mut hi = [f32::MIN; PROFILE_BINS];
    let mut ssum = [0f32; PROFILE_BINS];
    let mut scnt = [0f32; PROFILE_BINS];
    let mut values = Vec::with_capacity(head.pixels.len());
    for &(x, y) in &head.pixels {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        let t = dx * tx + dy * ty;
        let p = -dx * ty + dy * tx;
        let b = (((t / major) + 0.5) * PROFILE_BINS as f32).floor();
        let b = b.clamp(0.0, PROFILE_BINS as f32 - 1.0) as usize;
        lo[b] = lo[b].min(p);
        hi[b] = hi[b].max(p);
        let s = stain.get_pixel(x, y)[0] as f32;
        ssum[b] += s;
        scnt[b] += 1.0;
        values.push(s);
    }
    for b in 0..PROFILE_BINS {
        f.push(if hi[b] >= lo[b] {
            (hi[b] - lo[b] + 1.0) / minor
        } else {
            0.0
        });
    }
    let mean_stain = values.iter().sum::<f32>() / values.len().max(1) as f32;
    for b in 0..PROFILE_BINS {
        f.push(if scnt[b] > 0.0 {
            ssum[b] / scnt[b] / mean_stain.max(1.0)
        } else {
            0.0
        });
    }

    // Acrosome share: head pixels lighter than the midpoint of the head's stain range.
    let (q05, q95) = quantiles_05_95(&mut values);
    let mid = (q05 + q95) / 2.0;
    let light = values.iter().filter(|&&v| v < mid).count() as f32;
    f.push(light / n);
    // Stain contrast of the head against the background, and its spread inside the head.
    let bg = background_level(stain);
    f.push((mean_stain - bg) / 255.0);
    f.push((q95 - q05) / mean_stain.max(1.0));
    debug_assert_eq!(f.len(), FEATURE_COUNT);
    f
}

/// The values at the 5% and 95% places of `values` in order (0 for none), found by selection
/// rather than a full sort: the same values a sort would put there.
fn quantiles_05_95(values: &mut [f32]) -> (f32, f32) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let last = values.len() as f32 - 1.0;
    let (i05, i95) = ((last * 0.05) as usize, (last * 0.95) as usize);
    let (below, &mut q95, _) = values.select_nth_unstable_by(i95, f32::total_cmp);
    let q05 = if i05 < i95 {
        *below.select_nth_unstable_by(i05, f32::total_cmp).1
    } else {
        q95
    };
    (q05, q95)
}

fn background_level(stain: &GrayImage) -> f32 {
    if stain.as_raw().is_empty() {
        return 0.0;
    }
    // The 25th percentile: most of a crop is background.
    f32::from(pose::percentile(&pose::histogram(stain.as_raw()), 0.25))
}

fn fill_gaps(sig: &mut [f32; 64], cnt: &[u32; 64]) {
    if cnt.iter().all(|&c| c == 0) {
        return;
    }
    for i in 0..64 {
        if cnt[i] > 0 {
            continue;
        }
        let mut l = i;
        while cnt[l] == 0 {
            l = (l + 63) % 64;
        }
        let mut r = i;
        while cnt[r] == 0 {
            r = (r + 1) % 64;
        }
        sig[i] = (sig[l] + sig[r]) / 2.0;
    }
}

fn polygon_area(p: &[Point<i32>]) -> f64 {
    if p.len() < 3 {
        return 0.0;
    }
    let mut a = 0.0;
    for i in 0..p.len() {
        let j = (i + 1) % p.len();
        a += p[i].x as f64 * p[j].y as f64 - p[j].x as f64 * p[i].y as f64;
    }
    a.abs() / 2.0
}

fn perimeter_hull(p: &[Point<i32>]) -> f64 {
    (0..p.len())
        .map(|i| {
            let j = (i + 1) % p.len();
            (((p[i].x - p[j].x).pow(2) + (p[i].y - p[j].y).pow(2)) as f64).sqrt()
        })
        .sum()
}

/// The seven Hu invariant moments of the head's pixel set.
fn hu_moments(head: &HeadRegion) -> [f64; 7] {
    let (cx, cy) = (head.centroid.0 as f64, head.centroid.1 as f64);
    let mut m = [[0f64; 4]; 4];
    for &(x, y) in &head.pixels {
        let (dx, dy) = (x as f64 - cx, y as f64 - cy);
        let mut px = 1.0;
        for row in m.iter_mut() {
            let mut py = 1.0;
            for cell in row.iter_mut() {
                *cell += px * py;
                py *= dy;
            }
            px *= dx;
        }
    }
    let m00 = m[0][0].max(1.0);
    let eta = |p: usize, q: usize| m[p][q] / m00.powf(1.0 + (p + q) as f64 / 2.0);
    let (n20, n02, n11) = (eta(2, 0), eta(0, 2), eta(1, 1));
    let (n30, n03, n21, n12) = (eta(3, 0), eta(0, 3), eta(2, 1), eta(1, 2));
    let a = n30 + n12;
    let b = n21 + n03;
    [
        n20 + n02,
        (n20 - n02).powi(2) + 4.0 * n11 * n11,
        (n30 - 3.0 * n12).powi(2) + (3.0 * n21 - n03).powi(2),
        a * a + b * b,
        (n30 - 3.0 * n12) * a * (a * a - 3.0 * b * b)
            + (3.0 * n21 - n03) * b * (3.0 * a * a - b * b),
        (n20 - n02) * (a * a - b * b) + 4.0 * n11 * a * b,
        (3.0 * n21 - n03) * a * (a * a - 3.0 * b * b)
            - (n30 - 3.0 * n12) * b * (3.0 * a * a - b * b),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::pose::{Contrast, find_head_in_crop, stain_map};
    use image::{Rgb, RgbImage};

    fn ellipse(size: u32, a: f32, b: f32, deg: f32) -> RgbImage {
        let mut img = RgbImage::from_pixel(size, size, Rgb([230, 220, 225]));
        let c = size as f32 / 2.0;
        let (s, co) = deg.to_radians().sin_cos();
        for y in 0..size {
            for x in 0..size {
                let (dx, dy) = (x as f32 - c, y as f32 - c);
                let u = dx * co + dy * s;
                let v = -dx * s + dy * co;
                if (u / a).powi(2) + (v / b).powi(2) <= 1.0 {
                    img.put_pixel(x, y, Rgb([80, 40, 90]));
                }
            }
        }
        img
    }

    #[test]
    fn sizes_scale_with_um_per_px() {
        let img = ellipse(121, 20.0, 12.0, 0.0);
        let head = find_head_in_crop(&img, Contrast::Dark).expect("head");
        let s = head_size(&head, 0.1);
        assert!((s.length_um - 4.0).abs() < 0.3, "{s:?}");
        assert!((s.width_um - 2.4).abs() < 0.3, "{s:?}");
        // A hard-edged synthetic head gains about a pixel of rim through the smoothing before
        // the threshold: area within 12 %, outline (Ramanujan's formula) within 8 %.
        let true_area = std::f32::consts::PI * 2.0 * 1.2;
        assert!((s.area_um2 - true_area).abs() / true_area < 0.12, "{s:?}");
        let (a, b) = (2.0f32, 1.2f32);
        let h = ((a - b) / (a + b)).powi(2);
        let p = std::f32::consts::PI * (a + b) * (1.0 + 3.0 * h / (10.0 + (4.0 - 3.0 * h).sqrt()));
        assert!(
            (s.perimeter_um - p).abs() / p < 0.08,
            "{} vs {p}",
            s.perimeter_um
        );
    }

    #[test]
    fn shape_features_ignore_rotation_and_see_shape() {
        let feats = |img: &RgbImage| {
            let head = find_head_in_crop(img, Contrast::Dark).expect("head");
            shape_features(&stain_map(img, Contrast::Dark), &head, 80.0)
        };
        let a = feats(&ellipse(121, 20.0, 12.0, 0.0));
        let b = feats(&ellipse(121, 20.0, 12.0, 63.0));
        let round = feats(&ellipse(121, 16.0, 15.0, 0.0));
        assert_eq!(a.len(), FEATURE_COUNT);
        assert!(a.iter().all(|v| v.is_finite()));
        // Size/shape block: rotation changes it little, a rounder head changes it a lot.
        for i in 0..6 {
            assert!(
                (a[i] - b[i]).abs() < 0.03 + 0.05 * a[i].abs(),
                "feature {i}: {} vs {}",
                a[i],
                b[i]
            );
        }
        assert!((a[4] - 0.6).abs() < 0.05, "minor/major {}", a[4]);
        assert!(round[4] > 0.85, "minor/major {}", round[4]);
    }
}
