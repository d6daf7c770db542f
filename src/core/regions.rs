//! Connected regions of a binary mask found from its runs, and a morphological opening done
//! only around the regions big enough to matter. Head finding in crops and in full fields
//! both go through it; the results equal opening and labelling the whole image.

use image::{GrayImage, Luma};

/// A horizontal run of mask pixels, `x0..=x1` on row `y`.
#[derive(Debug, Clone, Copy)]
struct Run {
    y: u32,
    x0: u32,
    x1: u32,
}

/// 8-connected regions of a mask (the pixels above `above`) as runs, with their bounding
/// boxes: one pass over the rows, joining runs that touch a run of the row above (union-find).
/// Much cheaper than a label image on a sparse full field.
fn blobs(mask: &GrayImage, above: u8) -> Vec<(Blob, Vec<Run>)> {
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
            // Background goes by sixteen pixels at a time (the widest is no brighter).
            if let Some(chunk) = row.get(x..x + 16)
                && chunk.iter().fold(0, |m, &v| m.max(v)) <= above
            {
                x += 16;
                continue;
            }
            if row[x] <= above {
                x += 1;
                continue;
            }
            let x0 = x;
            while x < w && row[x] > above {
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

/// Half-widths of the disc {dx² + dy² <= k²}, row by row from dy = -k to k.
fn disc(k: u8) -> Vec<(i64, i64)> {
    let k = i64::from(k);
    (-k..=k)
        .map(|dy| {
            let mut r = 0;
            while (r + 1) * (r + 1) + dy * dy <= k * k {
                r += 1;
            }
            (dy, r)
        })
        .collect()
}

/// Per pixel of a row, how far the run of set pixels through it reaches to both sides: 0 for
/// an unset pixel, else 1 + the smaller of its set neighbours to the left and to the right
/// (the image's outside counts as set, 255 as far as a disc can reach).
fn run_reach(row: &[u8], out: &mut [u8]) {
    both_ways(
        row,
        out,
        |acc, v| if v != 0 { acc.saturating_add(1) } else { 0 },
    );
}

/// Per pixel of a row, how far the nearest set pixel is along the row (0 on a set pixel; the
/// image's outside counts as unset, 255 as farther than a disc can reach).
fn nearest_set(row: &[u8], out: &mut [u8]) {
    both_ways(
        row,
        out,
        |acc, v| if v != 0 { 0 } else { acc.saturating_add(1) },
    );
}

/// A running value `step(previous, pixel)` along the row from the left and from the right
/// (both starting at 255 outside the image); `out` gets the smaller of the two.
fn both_ways(row: &[u8], out: &mut [u8], step: impl Fn(u8, u8) -> u8) {
    let mut acc = u8::MAX;
    for (o, &v) in out.iter_mut().zip(row) {
        acc = step(acc, v);
        *o = acc;
    }
    acc = u8::MAX;
    for (o, &v) in out.iter_mut().zip(row).rev() {
        acc = step(acc, v);
        *o = (*o).min(acc);
    }
}

/// Fold into each row of `out` the rows of `per_row` (`w` bytes each) at the disc's offsets
/// that lie inside the image, one disc row at a time with its half-width: `f(acc, value, r)`.
fn fold_disc_rows(
    out: &mut [u8],
    per_row: &[u8],
    w: usize,
    disc: &[(i64, u8)],
    f: impl Fn(u8, u8, u8) -> u8,
) {
    let h = out.len() / w;
    for (y, acc) in out.chunks_exact_mut(w).enumerate() {
        for &(dy, r) in disc {
            let yy = y as i64 + dy;
            if !(0..h as i64).contains(&yy) {
                continue;
            }
            let src = &per_row[yy as usize * w..(yy as usize + 1) * w];
            for (a, &v) in acc.iter_mut().zip(src) {
                *a = f(*a, v, r);
            }
        }
    }
}

/// Morphological opening by the L2 disc of radius `k` (the pixels within distance `k`), with
/// imageproc's meaning of `open(_, Norm::L2, k)` at the border: erosion treats the outside as
/// foreground, dilation as background. Each row first gets, per pixel, how far its run of set
/// pixels reaches (erosion) or how far the nearest set pixel is (dilation); a disc row of
/// half-width `r` is then one comparison per pixel, done a whole row at a time, so the cost is
/// the image times the disc's height and the loops vectorise.
pub(crate) fn open_disc(mask: &GrayImage, k: u8) -> GrayImage {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    if w == 0 || h == 0 || k == 0 {
        return mask.clone();
    }
    // Disc rows as (dy, half-width); half-widths are at most `k`, so they fit the counts.
    let d: Vec<(i64, u8)> = disc(k)
        .into_iter()
        .map(|(dy, r)| (dy, u8::try_from(r).unwrap_or(u8::MAX)))
        .collect();
    // Erosion: a pixel stays when, on every disc row inside the image, the run of set pixels
    // through it reaches `r` pixels to both sides (the run on its own row implies it is set).
    let mut reach = vec![0u8; w * h];
    for (row, out) in mask.as_raw().chunks_exact(w).zip(reach.chunks_exact_mut(w)) {
        run_reach(row, out);
    }
    let mut eroded = vec![1u8; w * h];
    fold_disc_rows(&mut eroded, &reach, w, &d, |a, v, r| a & u8::from(v > r));
    // Dilation: a pixel is set when a disc row inside the image has an eroded pixel within
    // `r` of it along the row.
    let mut near = reach;
    for (row, out) in eroded.chunks_exact(w).zip(near.chunks_exact_mut(w)) {
        nearest_set(row, out);
    }
    let mut out = vec![0u8; w * h];
    fold_disc_rows(&mut out, &near, w, &d, |a, v, r| a | u8::from(v <= r));
    for a in &mut out {
        *a = a.wrapping_neg();
    }
    GrayImage::from_raw(w as u32, h as u32, out).unwrap_or_else(|| mask.clone())
}

/// The 8-connected regions left by opening the mask of `img`'s pixels above `above` (a
/// binary mask with `above` = 0, or a stain map with its level) with a disc of radius `k`
/// (L2), keeping only those that come from blobs of at least `min_area` px (an opening only
/// shrinks a region). Each region is its pixel list; regions come in raster order of their
/// first pixel.
///
/// Each blob is opened in a window padded by twice the radius: the opening reaches no
/// further than that, so the result is the same as opening the whole mask.
pub(crate) fn opened_regions(
    img: &GrayImage,
    above: u8,
    k: u8,
    min_area: usize,
) -> Vec<Vec<(u32, u32)>> {
    let (w, h) = img.dimensions();
    let pad = 2 * k as u32 + 2;
    let mut regions: Vec<Vec<(u32, u32)>> = Vec::new();
    for (b, runs) in blobs(img, above) {
        if b.n < min_area {
            continue;
        }
        let (x0, y0) = (b.x0.saturating_sub(pad), b.y0.saturating_sub(pad));
        let (x1, y1) = ((b.x1 + pad).min(w - 1), (b.y1 + pad).min(h - 1));
        let (lw, lh) = (x1 - x0 + 1, y1 - y0 + 1);
        let mut local = GrayImage::new(lw, lh);
        for (y, row) in local.rows_mut().enumerate() {
            let src =
                &img.as_raw()[((y0 as usize + y) * w as usize + x0 as usize)..][..lw as usize];
            for (o, &v) in row.zip(src) {
                o[0] = if v > above { 255 } else { 0 };
            }
        }
        let opened = open_disc(&local, k);
        // Keep what the opening left of this blob only (its neighbours have their own turn).
        let mut mine = GrayImage::new(lw, lh);
        for r in &runs {
            for x in r.x0..=r.x1 {
                if opened.get_pixel(x - x0, r.y - y0)[0] != 0 {
                    mine.put_pixel(x - x0, r.y - y0, Luma([255]));
                }
            }
        }
        for (part, runs) in blobs(&mine, 0) {
            let mut px: Vec<(u32, u32)> = Vec::with_capacity(part.n);
            for r in runs {
                px.extend((r.x0..=r.x1).map(|x| (x + x0, r.y + y0)));
            }
            regions.push(px);
        }
    }
    regions.sort_by_key(|px| px.first().map(|&(x, y)| (y, x)));
    regions
}

#[cfg(test)]
mod tests {
    use super::*;
    use imageproc::region_labelling::{Connectivity, connected_components};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Random blobs: filled ellipses of many sizes, some touching, some thin, near borders.
    fn random_mask(seed: u64) -> GrayImage {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (w, h) = (160u32, 120u32);
        let mut m = GrayImage::new(w, h);
        for _ in 0..rng.random_range(3..14) {
            let (cx, cy) = (
                rng.random_range(0.0..w as f32),
                rng.random_range(0.0..h as f32),
            );
            let (a, b) = (
                rng.random_range(1.5..22.0f32),
                rng.random_range(1.0..12.0f32),
            );
            let t: f32 = rng.random_range(0.0..std::f32::consts::PI);
            let (c, s) = (t.cos(), t.sin());
            for y in 0..h {
                for x in 0..w {
                    let (dx, dy) = (x as f32 - cx, y as f32 - cy);
                    let (u, v) = (dx * c + dy * s, -dx * s + dy * c);
                    if (u / a).powi(2) + (v / b).powi(2) <= 1.0 {
                        m.put_pixel(x, y, Luma([255]));
                    }
                }
            }
        }
        // Salt: single pixels and short lines (tails) that an opening removes.
        for _ in 0..40 {
            let (x, y) = (rng.random_range(0..w), rng.random_range(0..h));
            for d in 0..rng.random_range(1..9) {
                if x + d < w {
                    m.put_pixel(x + d, y, Luma([255]));
                }
            }
        }
        m
    }

    #[test]
    fn the_disc_opening_is_imageprocs_l2_opening() {
        use imageproc::distance_transform::Norm;
        let mut compared = 0;
        for seed in 0..40 {
            let mask = random_mask(seed);
            for k in [1u8, 2, 3, 4, 5, 7] {
                let want = imageproc::morphology::open(&mask, Norm::L2, k);
                assert_eq!(open_disc(&mask, k), want, "seed {seed}, radius {k}");
                compared += 1;
            }
        }
        // Masks touching every border, and empty and full ones.
        let full = GrayImage::from_pixel(9, 7, Luma([255]));
        assert_eq!(open_disc(&full, 3), full);
        let empty = GrayImage::new(9, 7);
        assert_eq!(open_disc(&empty, 3), empty);
        assert_eq!(compared, 240);
    }

    /// The reference: open the whole mask (imageproc), then label it.
    fn whole_image(mask: &GrayImage, k: u8) -> Vec<Vec<(u32, u32)>> {
        let opened = imageproc::morphology::open(mask, imageproc::distance_transform::Norm::L2, k);
        let labels = connected_components(&opened, Connectivity::Eight, Luma([0u8]));
        let mut by: std::collections::BTreeMap<u32, Vec<(u32, u32)>> = Default::default();
        for (x, y, p) in labels.enumerate_pixels() {
            if p[0] > 0 {
                by.entry(p[0]).or_default().push((x, y));
            }
        }
        let mut regions: Vec<Vec<(u32, u32)>> = by
            .into_values()
            .map(|mut px| {
                px.sort_by_key(|&(x, y)| (y, x));
                px
            })
            .collect();
        regions.sort_by_key(|px| px.first().map(|&(x, y)| (y, x)));
        regions
    }

    #[test]
    fn opening_each_region_locally_equals_opening_the_whole_image() {
        let mut compared = 0;
        for seed in 0..24 {
            let mask = random_mask(seed);
            for k in [0u8, 1, 2, 3, 5] {
                let mut local = opened_regions(&mask, 0, k, 0);
                for px in &mut local {
                    px.sort_by_key(|&(x, y)| (y, x));
                }
                let whole = whole_image(&mask, k);
                assert_eq!(local, whole, "seed {seed}, radius {k}");
                compared += whole.len();
            }
        }
        assert!(compared > 200, "only {compared} regions compared");
    }

    #[test]
    fn small_blobs_are_skipped_before_opening() {
        let mask = random_mask(3);
        let all = opened_regions(&mask, 0, 2, 0);
        let big = opened_regions(&mask, 0, 2, 400);
        assert!(big.len() < all.len());
        assert!(big.iter().all(|r| all.contains(r)));
    }
}
