//! Connected regions of a binary mask found from its runs, a morphological opening done only
//! around the regions big enough to matter, and the split of a region made of touching heads
//! at its necks or, where they overlap, between their concavities. Head finding in crops and
//! in full fields both go through it; the regions equal opening and labelling the whole image.

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
    let mut regions: Vec<Vec<(u32, u32)>> = Vec::new();
    for (b, runs) in blobs(img, above) {
        if b.n >= min_area {
            regions.extend(open_blob(img, above, k, &b, &runs));
        }
    }
    regions.sort_by_key(|px| px.first().map(|&(x, y)| (y, x)));
    regions
}

/// The opened region of `img` (as `opened_regions` makes them) with the highest `score`
/// among those of at least `min_area` px, the first in raster order of its first pixel among
/// equals; or, when none is that large, the size of the largest. `score(n, cx, cy)` takes a
/// region's size and centroid; `bound(n, box)` must be at least the score of any region of at
/// most `n` px with its centroid in the box `(x0, y0, x1, y1)`. A blob whose bound falls below
/// the best score found is not opened at all, so the answer is the same as scoring every
/// region while the blobs far from where the score is high cost one pass of labelling.
pub(crate) fn best_opened_region(
    img: &GrayImage,
    above: u8,
    k: u8,
    min_area: usize,
    score: impl Fn(usize, f64, f64) -> f64,
    bound: impl Fn(usize, (u32, u32, u32, u32)) -> f64,
) -> Result<Vec<(u32, u32)>, usize> {
    let mut blobs: Vec<(f64, Blob, Vec<Run>)> = blobs(img, above)
        .into_iter()
        .filter(|(b, _)| b.n >= min_area)
        .map(|(b, runs)| (bound(b.n, (b.x0, b.y0, b.x1, b.y1)), b, runs))
        .collect();
    // Most promising first, so the best score is known early.
    blobs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut best: Option<(f64, Vec<(u32, u32)>)> = None;
    let mut largest = 0;
    for (most, b, runs) in &blobs {
        if best.as_ref().is_some_and(|(s, _)| *most < *s) {
            // Sorted: no later blob can reach the best either.
            break;
        }
        for px in open_blob(img, above, k, b, runs) {
            largest = largest.max(px.len());
            if px.len() < min_area {
                continue;
            }
            let n = px.len() as f64;
            let (sx, sy) = px.iter().fold((0.0f64, 0.0f64), |(a, b), &(x, y)| {
                (a + x as f64, b + y as f64)
            });
            let s = score(px.len(), sx / n, sy / n);
            let first = |p: &[(u32, u32)]| p.first().map(|&(x, y)| (y, x));
            let better = match &best {
                None => true,
                Some((bs, bp)) => s > *bs || (s == *bs && first(&px) < first(bp)),
            };
            if better {
                best = Some((s, px));
            }
        }
    }
    best.map(|(_, px)| px).ok_or(largest)
}

/// The regions opening one blob (given by its box and runs) leaves of it: the blob is opened
/// in a window padded by twice the radius, and only its own pixels are kept (its neighbours
/// have their own turn). Regions in raster order of their first pixel.
fn open_blob(img: &GrayImage, above: u8, k: u8, b: &Blob, runs: &[Run]) -> Vec<Vec<(u32, u32)>> {
    let (w, h) = img.dimensions();
    let pad = 2 * k as u32 + 2;
    let (x0, y0) = (b.x0.saturating_sub(pad), b.y0.saturating_sub(pad));
    let (x1, y1) = ((b.x1 + pad).min(w - 1), (b.y1 + pad).min(h - 1));
    let (lw, lh) = (x1 - x0 + 1, y1 - y0 + 1);
    let mut local = GrayImage::new(lw, lh);
    for (y, row) in local.rows_mut().enumerate() {
        let src = &img.as_raw()[((y0 as usize + y) * w as usize + x0 as usize)..][..lw as usize];
        for (o, &v) in row.zip(src) {
            o[0] = if v > above { 255 } else { 0 };
        }
    }
    let opened = open_disc(&local, k);
    let mut mine = GrayImage::new(lw, lh);
    for r in runs {
        for x in r.x0..=r.x1 {
            if opened.get_pixel(x - x0, r.y - y0)[0] != 0 {
                mine.put_pixel(x - x0, r.y - y0, Luma([255]));
            }
        }
    }
    blobs(&mine, 0)
        .into_iter()
        .map(|(part, runs)| {
            let mut px: Vec<(u32, u32)> = Vec::with_capacity(part.n);
            for r in runs {
                px.extend((r.x0..=r.x1).map(|x| (x + x0, r.y + y0)));
            }
            px
        })
        .collect()
}

/// The 8 neighbours of pixel `p` of an image `w` wide (`p` off the border).
fn around(p: usize, w: usize) -> [usize; 8] {
    [
        p - w - 1,
        p - w,
        p - w + 1,
        p - 1,
        p + 1,
        p + w - 1,
        p + w,
        p + w + 1,
    ]
}

/// Window indices `index` (in raster order) ordered widest first by their squared distance,
/// in raster order within one distance: a counting sort.
fn widest_first(index: &[usize], square: &[u32]) -> Vec<usize> {
    let widest = index.iter().map(|&i| square[i]).max().unwrap_or(0);
    let mut first = vec![0usize; widest as usize + 2];
    for &i in index {
        first[(widest - square[i]) as usize + 1] += 1;
    }
    for k in 1..first.len() {
        first[k] += first[k - 1];
    }
    let mut order = vec![0usize; index.len()];
    for &i in index {
        let slot = &mut first[(widest - square[i]) as usize];
        order[*slot] = i;
        *slot += 1;
    }
    order
}

/// A region's bounding box `(x0, y0, x1, y1)`, inclusive; `None` when it is empty.
fn bounds(px: &[(u32, u32)]) -> Option<(u32, u32, u32, u32)> {
    px.iter().fold(None, |b, &(x, y)| {
        let (a, b, c, d) = b.unwrap_or((x, y, x, y));
        Some((a.min(x), b.min(y), c.max(x), d.max(y)))
    })
}

/// A region in a window of its bounding box with a one-pixel background border, and each
/// window pixel's squared distance to the region's outside: whole numbers, which order and
/// compare without a square root.
struct Distances {
    x0: u32,
    y0: u32,
    w: u32,
    h: u32,
    square: Vec<u32>,
}

impl Distances {
    /// `None` for an empty region.
    fn of(px: &[(u32, u32)]) -> Option<Distances> {
        let (x0, y0, x1, y1) = bounds(px)?;
        let (w, h) = (x1 - x0 + 3, y1 - y0 + 3);
        let mut outside = GrayImage::from_pixel(w, h, Luma([255]));
        for &(x, y) in px {
            outside.put_pixel(x - x0 + 1, y - y0 + 1, Luma([0]));
        }
        let square = imageproc::distance_transform::euclidean_squared_distance_transform(&outside)
            .into_raw()
            .into_iter()
            .map(|v| v as u32)
            .collect();
        Some(Distances {
            x0,
            y0,
            w,
            h,
            square,
        })
    }

    /// The window index of region pixel (`x`, `y`).
    fn index(&self, x: u32, y: u32) -> usize {
        ((y - self.y0 + 1) * self.w + (x - self.x0 + 1)) as usize
    }
}

/// How far below both parts' widest points a neck must lie, px (also the least depth of a
/// notch between overlapping heads).
pub(crate) const MIN_NECK_DEPTH_PX: f32 = 3.0;

/// The pieces of a region that is several touching heads, cut where it narrows: a watershed
/// of the distance to the region's outside, flooded from the widest point down. Where two
/// flooded parts meet, they stay apart when the meeting point's distance is at most
/// `neck_ratio` times the smaller part's widest and at least `MIN_NECK_DEPTH_PX` below it (a
/// neck), else they join (a bump on one head). Parts under `min_piece` px are given to the
/// piece they grow into first. `None` when the region has fewer than two pieces of
/// `min_piece` px; else the pieces in raster order, each in raster order.
pub(crate) fn split_at_necks(
    px: &[(u32, u32)],
    neck_ratio: f32,
    min_piece: usize,
) -> Option<Vec<Vec<(u32, u32)>>> {
    if neck_ratio <= 0.0 || px.len() < 2 * min_piece.max(1) {
        return None;
    }
    let d = Distances::of(px)?;
    let (w, square) = (d.w, &d.square);
    let index: Vec<usize> = px.iter().map(|&(x, y)| d.index(x, y)).collect();
    let order = widest_first(&index, square);
    let neck_square = neck_ratio * neck_ratio;
    let is_neck = |meet: u32, widest: u32| {
        (meet as f32) <= neck_square * widest as f32
            && (widest as f32).sqrt() - (meet as f32).sqrt() >= MIN_NECK_DEPTH_PX
    };
    // Flooding with union-find over window indices; a root's `square` is its part's widest.
    const NONE: usize = usize::MAX;
    let mut parent = vec![NONE; square.len()];
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let wi = w as usize;
    for &p in &order {
        let (mut roots, mut n) = ([0usize; 8], 0);
        // The flooded neighbour highest up: the pixel belongs to the part it comes down from.
        let mut uphill: Option<usize> = None;
        for q in around(p, wi) {
            if parent[q] != NONE {
                let r = root(&mut parent, q);
                if !roots[..n].contains(&r) {
                    roots[n] = r;
                    n += 1;
                }
                if uphill.is_none_or(|u| square[q] > square[u]) {
                    uphill = Some(q);
                }
            }
        }
        let roots = &mut roots[..n];
        roots.sort_unstable_by_key(|&r| (std::cmp::Reverse(square[r]), r));
        let Some(&top) = roots.first() else {
            parent[p] = p;
            continue;
        };
        for &r in &roots[1..] {
            if !is_neck(square[p], square[r]) {
                parent[r] = top;
            }
        }
        parent[p] = uphill.map_or(top, |u| root(&mut parent, u));
    }
    // Pieces big enough to be heads; the rest of the pixels grow into them (8-connected).
    let mut size = vec![0usize; square.len()];
    for &p in &order {
        size[root(&mut parent, p)] += 1;
    }
    let heads: Vec<usize> = (0..size.len()).filter(|&r| size[r] >= min_piece).collect();
    if heads.len() < 2 {
        return None;
    }
    let mut label = vec![NONE; square.len()];
    let mut front = std::collections::VecDeque::new();
    for &p in &order {
        let r = root(&mut parent, p);
        if size[r] >= min_piece {
            label[p] = r;
            front.push_back(p);
        }
    }
    while let Some(p) = front.pop_front() {
        for q in around(p, wi) {
            if parent[q] != NONE && label[q] == NONE {
                label[q] = label[p];
                front.push_back(q);
            }
        }
    }
    // `px` is in raster order, so each piece is too.
    let mut pieces: Vec<Vec<(u32, u32)>> = vec![Vec::new(); heads.len()];
    for (&p, &i) in px.iter().zip(&index) {
        if let Ok(k) = heads.binary_search(&label[i]) {
            pieces[k].push(p);
        }
    }
    pieces.sort_by_key(|v| v.first().map(|&(x, y)| (y, x)));
    Some(pieces)
}

/// Longest cut between two notches, as a multiple of the square root of the smaller piece's
/// area: a cut across two overlapping heads is about one head's width, one along a single
/// tapered head (notched at its neck on both sides) is about its length. Chosen on held-out
/// `sperm-parsing/train` frames and crowded fields made from them (`models/head-verifier.md`).
const MAX_CUT_SHARE: f32 = 1.4;

/// The two pieces of a region that is two overlapping heads, which leave no neck but two
/// notches in the outline: the region is cut along the line through the deepest points of its
/// two deepest concavities (the outline's distance inside its convex hull), when both are at
/// least `min_depth_px` deep and the cut is short next to the pieces (`MAX_CUT_SHARE`).
/// `None` when it has fewer than two such concavities, the cut is too long or a piece is under
/// `min_piece` px; else the two pieces in raster order, each in raster order.
pub(crate) fn split_at_concavities(
    px: &[(u32, u32)],
    min_depth_px: f32,
    min_piece: usize,
) -> Option<Vec<Vec<(u32, u32)>>> {
    use imageproc::contours::{BorderType, find_contours};
    use imageproc::point::Point;

    if px.len() < 2 * min_piece.max(1) {
        return None;
    }
    let (x0, y0, x1, y1) = bounds(px)?;
    let mut mask = GrayImage::new(x1 - x0 + 3, y1 - y0 + 3);
    for &(x, y) in px {
        mask.put_pixel(x - x0 + 1, y - y0 + 1, Luma([255]));
    }
    let outline = find_contours::<i32>(&mask)
        .into_iter()
        .filter(|c| c.border_type == BorderType::Outer)
        .max_by_key(|c| c.points.len())?
        .points;
    let hull = imageproc::geometry::convex_hull(outline.clone());
    if hull.len() < 3 {
        return None;
    }
    // Each outline point's depth: its distance to the nearest hull edge.
    let to_edge = |p: Point<i32>, a: Point<i32>, b: Point<i32>| -> f32 {
        let (dx, dy) = ((b.x - a.x) as f32, (b.y - a.y) as f32);
        let (px, py) = ((p.x - a.x) as f32, (p.y - a.y) as f32);
        let len2 = dx * dx + dy * dy;
        let t = if len2 > 0.0 {
            ((px * dx + py * dy) / len2).clamp(0.0, 1.0)
        } else {
            0.0
        };
        ((px - t * dx).powi(2) + (py - t * dy).powi(2)).sqrt()
    };
    let depth: Vec<f32> = outline
        .iter()
        .map(|&p| {
            (0..hull.len())
                .map(|i| to_edge(p, hull[i], hull[(i + 1) % hull.len()]))
                .fold(f32::INFINITY, f32::min)
        })
        .collect();
    // Concavities: runs of the (closed) outline more than a pixel inside the hull, each
    // represented by its deepest point. Start the walk on the hull.
    let n = outline.len();
    let start = (0..n).find(|&i| depth[i] <= 1.0)?;
    let mut notches: Vec<(f32, usize)> = Vec::new();
    let mut current: Option<(f32, usize)> = None;
    for k in 1..=n {
        let i = (start + k) % n;
        if depth[i] > 1.0 {
            if current.is_none_or(|(d, _)| depth[i] > d) {
                current = Some((depth[i], i));
            }
        } else if let Some(c) = current.take() {
            notches.push(c);
        }
    }
    notches.sort_by(|a, b| b.0.total_cmp(&a.0));
    let [(_, a), (db, b), ..] = notches[..] else {
        return None;
    };
    if db < min_depth_px {
        return None;
    }
    let (a, b) = (outline[a], outline[b]);
    let (dx, dy) = (i64::from(b.x - a.x), i64::from(b.y - a.y));
    let mut pieces: Vec<Vec<(u32, u32)>> = vec![Vec::new(), Vec::new()];
    for &(x, y) in px {
        let (lx, ly) = (i64::from(x - x0 + 1), i64::from(y - y0 + 1));
        let side = dx * (ly - i64::from(a.y)) - dy * (lx - i64::from(a.x));
        pieces[usize::from(side > 0)].push((x, y));
    }
    // A cut across an overlap is short next to the pieces; a long one runs along one head.
    let cut = ((dx * dx + dy * dy) as f32).sqrt();
    let smaller = pieces.iter().map(Vec::len).min().unwrap_or(0);
    if cut > MAX_CUT_SHARE * (smaller as f32).sqrt() {
        return None;
    }
    if pieces.iter().any(|p| p.len() < min_piece) {
        return None;
    }
    pieces.sort_by_key(|v| v.first().map(|&(x, y)| (y, x)));
    Some(pieces)
}

/// The parts of a region as wide as its widest part: the region opened with a disc of `share`
/// of its largest inscribed radius, which takes off what is much narrower (a stained midpiece
/// the field's opening, sized for thin ones, left on a head), as regions of at least
/// `min_area` px in raster order.
pub(crate) fn wide_parts(px: &[(u32, u32)], share: f32, min_area: usize) -> Vec<Vec<(u32, u32)>> {
    let Some(d) = Distances::of(px) else {
        return Vec::new();
    };
    let widest = f64::from(d.square.iter().copied().max().unwrap_or(0)).sqrt();
    let k = (widest as f32 * share).floor().clamp(1.0, 60.0) as u8;
    let (x0, y0) = (d.x0, d.y0);
    // The region alone, with room around it for the opening (which takes the outside of the
    // image as set when eroding).
    let m = 2 * u32::from(k) + 2;
    let mut mask = GrayImage::new(d.w - 2 + 2 * m, d.h - 2 + 2 * m);
    for &(x, y) in px {
        mask.put_pixel(x - x0 + m, y - y0 + m, Luma([255]));
    }
    opened_regions(&mask, 0, k, min_area)
        .into_iter()
        .filter(|part| part.len() >= min_area)
        .map(|part| {
            part.into_iter()
                .map(|(x, y)| (x + x0 - m, y + y0 - m))
                .collect()
        })
        .collect()
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
    fn the_best_region_is_the_one_scoring_every_region_finds() {
        let mut pruned = 0;
        for seed in 0..300u64 {
            let m = random_mask(seed);
            let (w, h) = m.dimensions();
            let mut rng = ChaCha8Rng::seed_from_u64(seed + 1000);
            let (cx0, cy0) = (
                rng.random_range(0.0..w as f64),
                rng.random_range(0.0..h as f64),
            );
            let (k, min_area) = (rng.random_range(1..4u8), rng.random_range(5..120usize));
            let diag = f64::from(w).hypot(f64::from(h));
            let score = |n: usize, d: f64| n as f64 / (1.0 + 4.0 * (d / diag)).powi(2);
            // Every region scored, the first of the best in raster order.
            let all = opened_regions(&m, 0, k, min_area);
            let mut want: Option<(usize, f64)> = None;
            for (i, px) in all.iter().enumerate() {
                if px.len() < min_area {
                    continue;
                }
                let n = px.len() as f64;
                let (sx, sy) = px.iter().fold((0.0, 0.0), |(a, b), &(x, y)| {
                    (a + f64::from(x), b + f64::from(y))
                });
                let s = score(
                    px.len(),
                    ((sx / n - cx0).powi(2) + (sy / n - cy0).powi(2)).sqrt(),
                );
                if want.is_none_or(|(_, b)| s > b) {
                    want = Some((i, s));
                }
            }
            let opened = std::cell::Cell::new(0);
            let got = best_opened_region(
                &m,
                0,
                k,
                min_area,
                |n, cx, cy| {
                    opened.set(opened.get() + 1);
                    score(n, ((cx - cx0).powi(2) + (cy - cy0).powi(2)).sqrt())
                },
                |n, (x0, y0, x1, y1)| {
                    let dx = (f64::from(x0) - cx0).max(cx0 - f64::from(x1)).max(0.0);
                    let dy = (f64::from(y0) - cy0).max(cy0 - f64::from(y1)).max(0.0);
                    score(n, (dx.hypot(dy) - 1e-6).max(0.0)) * (1.0 + 1e-9)
                },
            );
            match (want, got) {
                (Some((i, _)), Ok(px)) => assert_eq!(px, all[i], "seed {seed}"),
                (None, Err(largest)) => assert_eq!(
                    largest,
                    all.iter().map(Vec::len).max().unwrap_or(0),
                    "seed {seed}"
                ),
                (want, got) => panic!("seed {seed}: want {want:?}, got {:?}", got.map(|p| p.len())),
            }
            let big = all.iter().filter(|p| p.len() >= min_area).count();
            pruned += big.saturating_sub(opened.get());
        }
        // The bound must have saved work somewhere, or the test shows nothing about it.
        assert!(pruned > 0);
    }

    /// The pixels of filled discs (x, y, radius), each pixel once, in raster order.
    fn discs(at: &[(f32, f32, f32)]) -> Vec<(u32, u32)> {
        let mut px = Vec::new();
        for y in 0..200u32 {
            for x in 0..200u32 {
                if at
                    .iter()
                    .any(|&(cx, cy, r)| (x as f32 - cx).hypot(y as f32 - cy) <= r)
                {
                    px.push((x, y));
                }
            }
        }
        px
    }

    #[test]
    fn wide_parts_keep_the_head_and_drop_a_narrower_midpiece() {
        // A disc of radius 20 with a bar 12 px wide (inscribed radius 6 < 0.6 x 20) to its right.
        let mut px: Vec<(u32, u32)> = discs(&[(60.0, 60.0, 20.0)]);
        px.extend((80..160).flat_map(|x| (54..66).map(move |y| (x, y))));
        px.sort_by_key(|&(x, y)| (y, x));
        px.dedup();
        let parts = wide_parts(&px, 0.6, 50);
        assert_eq!(parts.len(), 1);
        let part = &parts[0];
        assert!(part.iter().all(|&(x, _)| x < 84), "the bar is gone");
        assert!((1100..=1300).contains(&part.len()), "{}", part.len());
        assert!(
            part.iter().all(|p| px.contains(p)),
            "no pixel outside the region"
        );
        // Two discs of the same size joined by a bar: both stay.
        let mut two = discs(&[(40.0, 40.0, 18.0), (120.0, 40.0, 18.0)]);
        two.extend((55..105).flat_map(|x| (36..44).map(move |y| (x, y))));
        two.sort_by_key(|&(x, y)| (y, x));
        two.dedup();
        assert_eq!(wide_parts(&two, 0.6, 50).len(), 2);
        assert!(wide_parts(&[], 0.6, 1).is_empty());
    }

    #[test]
    fn touching_heads_split_at_the_neck_and_single_ones_stay_whole() {
        // Two discs that overlap by 4 px: a neck about 20 px wide between two 25 px radii.
        let pair = discs(&[(60.0, 80.0, 25.0), (106.0, 80.0, 25.0)]);
        let pieces = split_at_necks(&pair, 0.8, 600).expect("two heads");
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces.iter().map(Vec::len).sum::<usize>(), pair.len());
        for (p, cx) in pieces.iter().zip([60.0, 106.0]) {
            let mean = p.iter().map(|&(x, _)| x as f32).sum::<f32>() / p.len() as f32;
            assert!((mean - cx).abs() < 2.0, "piece centred at {mean}, not {cx}");
            assert!(p.len().abs_diff(pair.len() / 2) < 40, "{}", p.len());
        }
        // Three in a row come apart into three.
        let row = discs(&[(40.0, 80.0, 20.0), (76.0, 80.0, 20.0), (112.0, 80.0, 20.0)]);
        assert_eq!(split_at_necks(&row, 0.8, 600).map(|p| p.len()), Some(3));
        // A head with a bump (a blunt midpiece stump) is one head.
        let bump = discs(&[(80.0, 80.0, 25.0), (104.0, 80.0, 8.0)]);
        assert_eq!(split_at_necks(&bump, 0.8, 600), None);
        // A wide overlap is no neck at this ratio, and is one at a looser one.
        let wide = discs(&[(60.0, 80.0, 25.0), (95.0, 80.0, 25.0)]);
        assert_eq!(split_at_necks(&wide, 0.5, 600), None);
        assert_eq!(split_at_necks(&wide, 0.9, 600).map(|p| p.len()), Some(2));
        // Off, or a piece too small for a head: whole.
        assert_eq!(split_at_necks(&pair, 0.0, 600), None);
        assert_eq!(split_at_necks(&pair, 0.8, 2500), None);
    }

    /// Filled ellipses `(cx, cy, a, b, angle)` in a 240x240 window, in raster order.
    fn ellipses(at: &[(f32, f32, f32, f32, f32)]) -> Vec<(u32, u32)> {
        let inside = |x: f32, y: f32, &(cx, cy, a, b, t): &(f32, f32, f32, f32, f32)| {
            let (dx, dy) = (x - cx, y - cy);
            let (u, v) = (dx * t.cos() + dy * t.sin(), -dx * t.sin() + dy * t.cos());
            (u / a).powi(2) + (v / b).powi(2) <= 1.0
        };
        (0..240u32)
            .flat_map(|y| (0..240u32).map(move |x| (x, y)))
            .filter(|&(x, y)| at.iter().any(|e| inside(x as f32, y as f32, e)))
            .collect()
    }

    #[test]
    fn overlapping_heads_are_cut_between_their_notches() {
        // Two head-sized ellipses overlapping by a third of their width: no neck at 0.8.
        let heads = [
            (100.0, 120.0, 40.0, 26.0, 0.3),
            (100.0, 155.0, 40.0, 26.0, -0.2),
        ];
        let pair = ellipses(&heads);
        assert_eq!(split_at_necks(&pair, 0.8, 600), None);
        let pieces = split_at_concavities(&pair, 4.0, 600).expect("two heads");
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces.iter().map(Vec::len).sum::<usize>(), pair.len());
        // Each piece is mostly one of the two ellipses.
        for (piece, e) in pieces.iter().zip(heads) {
            let own = ellipses(&[e]);
            let shared = piece
                .iter()
                .filter(|p| {
                    own.binary_search_by_key(&(p.1, p.0), |q| (q.1, q.0))
                        .is_ok()
                })
                .count();
            assert!(
                shared * 10 >= piece.len() * 9,
                "{shared} of {} px in its head",
                piece.len()
            );
            let mean_y = piece.iter().map(|&(_, y)| y as f32).sum::<f32>() / piece.len() as f32;
            assert!(
                (mean_y - e.1).abs() < 10.0,
                "piece centred at y {mean_y}, not {}",
                e.1
            );
        }
        // One ellipse, or one with a blunt bump, has no two notches deep enough.
        let one = ellipses(&[heads[0]]);
        assert_eq!(split_at_concavities(&one, 4.0, 600).map(|p| p.len()), None);
        let bump = ellipses(&[heads[0], (140.0, 120.0, 10.0, 6.0, 0.0)]);
        assert_eq!(split_at_concavities(&bump, 4.0, 600).map(|p| p.len()), None);
        // Notches shallower than asked, or a piece too small for a head: whole.
        assert_eq!(
            split_at_concavities(&pair, 30.0, 600).map(|p| p.len()),
            None
        );
        assert_eq!(
            split_at_concavities(&pair, 4.0, 4000).map(|p| p.len()),
            None
        );
        // Two thin heads overlapping by a third of their width along their whole length: the
        // cut would be longer than the pieces are wide, so the region stays whole (the price of
        // not cutting single heads lengthwise). Overlapping less, they are cut.
        let side = |dy: f32| {
            ellipses(&[
                (120.0, 100.0, 60.0, 14.0, 0.0),
                (120.0, 100.0 + dy, 60.0, 14.0, 0.0),
            ])
        };
        let cut = |px: &[(u32, u32)]| split_at_concavities(px, 3.0, 600).map(|p| p.len());
        assert_eq!(cut(&side(24.0)), Some(2));
        assert_eq!(cut(&side(18.0)), None);
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
