//! Crowded fields with their true heads, for the throughput benchmark and for scoring head
//! finding where heads crowd and touch: each field is a `sperm-parsing` val frame with its own
//! cells painted out and then pasted back, turned and mirrored (the eight exact quarter turns
//! and flips, no resampling), at jittered grid places until it holds the chosen number of heads.
//! One preparation's cells on its own background: stain, focus and scale stay those of a real
//! field, only the crowding is new. Val frames by default, because no model was trained on
//! them; SPLIT `train` with FRAMES `A..B` takes the train frames A to B-1 in name order (the
//! head verifier trains on 0..384 and chooses its threshold on 384..512).
//! Fields are written as JPEG (quality 92) like the recorded ones, with their true heads in
//! `OUT_DIR/heads/<frame>.png` (instance ids as in `sperm-parsing`; a head partly covered by a
//! later head keeps only its visible pixels; a midpiece or tail pasted over it darkens it, as
//! stained material absorbs light, and leaves it in view).
//! With TOUCH above 0, that share of the heads is placed against the head pasted before it
//! (centres 0.85-1.15 times the sum of the two heads' radii apart: touching, nearly touching
//! or slightly overlapping), the crowding that merges heads in real preparations.
//! `cargo run --release --example dense_fields -- OUT_DIR HEADS_PER_FRAME FRAMES [SEED] [TOUCH]
//! [SPLIT] [A..B]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;

use image::codecs::jpeg::JpegEncoder;
use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use spermscope::core::imageio;

/// Part labels in `parts/`: 4 midpiece, 5 tail (vacuole, acrosome and nucleus make the head).
const MIDPIECE: u8 = 4;
const TAIL: u8 = 5;
/// How far around a head's box its midpiece and tail are taken, px.
const MARGIN: i64 = 40;
/// Distance of a pasted head's centre from the frame border, px.
const INSET: i64 = 60;

/// One head of a frame: its instance id, box and the radius of the circle with its area.
struct Donor {
    instance: u8,
    bbox: [i64; 4],
    radius: f32,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!(
            "usage: dense_fields OUT_DIR HEADS_PER_FRAME FRAMES [SEED] [TOUCH] [SPLIT] [A..B]"
        );
        std::process::exit(2);
    }
    let out = Path::new(&args[1]);
    let per_frame: usize = args[2].parse().expect("HEADS_PER_FRAME");
    let frames: usize = args[3].parse().expect("FRAMES");
    let seed: u64 = args.get(4).map_or(1, |s| s.parse().expect("SEED"));
    let touch: f32 = args.get(5).map_or(0.0, |s| s.parse().expect("TOUCH"));
    let split = args.get(6).map_or("val", String::as_str);
    let (from, to): (usize, usize) = args.get(7).map_or((0, usize::MAX), |s| {
        let (a, b) = s.split_once("..").expect("A..B");
        (a.parse().expect("A"), b.parse().expect("B"))
    });
    assert!(
        per_frame < 255,
        "at most 254 heads a frame (8-bit instance ids)"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/sperm-parsing");
    std::fs::create_dir_all(out.join("heads")).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    let heads_of = whole_heads(&root, split, from..to);
    let mut sources: Vec<String> = heads_of.keys().cloned().collect();
    sources.sort();
    sources.shuffle(&mut rng);
    for index in 0..frames {
        let name = &sources[index % sources.len()];
        let stem = name.trim_end_matches(".jpg");
        let img = imageio::load_rgb(&root.join(split).join("frames").join(name)).unwrap();
        let heads = image::open(root.join(format!("{split}/heads/{stem}.png")))
            .unwrap()
            .to_luma8();
        let parts = image::open(root.join(format!("{split}/parts/{stem}.png")))
            .unwrap()
            .to_luma8();
        let (mut field, background) = painted_out(&img, &parts);
        let (w, h) = (i64::from(field.width()), i64::from(field.height()));
        let mut truth = GrayImage::new(field.width(), field.height());
        let donors = &heads_of[name];
        // A jittered grid with at least `per_frame` places, in random order.
        let cols = ((per_frame as f64 * w as f64 / h as f64).sqrt().ceil() as i64).max(1);
        let rows = (per_frame as i64 + cols - 1) / cols;
        let (cw, ch) = (w / cols, h / rows);
        let mut places: Vec<(i64, i64)> = (0..rows)
            .flat_map(|r| (0..cols).map(move |c| (c, r)))
            .collect();
        places.shuffle(&mut rng);
        // Centre and radius of the head pasted last.
        let mut last: Option<(i64, i64, f32)> = None;
        for (k, (id, &(c, r))) in (1u8..).zip(places.iter().take(per_frame)).enumerate() {
            let d = &donors[k % donors.len()];
            let turn: u8 = rng.random_range(0..8);
            // The head's centre lands at a random point of its grid cell, away from the edge.
            let jx = rng.random_range(0..(cw - 2 * INSET).max(1));
            let jy = rng.random_range(0..(ch - 2 * INSET).max(1));
            let (mut cx, mut cy) = (c * cw + INSET + jx, r * ch + INSET + jy);
            if touch > 0.0
                && let Some((px, py, pr)) = last
                && rng.random::<f32>() < touch
            {
                let angle = rng.random_range(0.0..std::f32::consts::TAU);
                let apart = rng.random_range(0.85..1.15) * (pr + d.radius);
                cx = (px + (apart * angle.cos()) as i64).clamp(INSET, w - INSET);
                cy = (py + (apart * angle.sin()) as i64).clamp(INSET, h - INSET);
            }
            last = Some((cx, cy, d.radius));
            let [x0, y0, x1, y1] = d.bbox;
            let (hx, hy) = ((x0 + x1) / 2, (y0 + y1) / 2);
            for y in (y0 - MARGIN).max(0)..=(y1 + MARGIN).min(h - 1) {
                for x in (x0 - MARGIN).max(0)..=(x1 + MARGIN).min(w - 1) {
                    let (ux, uy) = (x as u32, y as u32);
                    let own_head = heads.get_pixel(ux, uy)[0] == d.instance;
                    let part = parts.get_pixel(ux, uy)[0];
                    if !(own_head || part == MIDPIECE || part == TAIL) {
                        continue;
                    }
                    let (ox, oy) = dihedral(turn, x - hx, y - hy);
                    let (dx, dy) = (cx + ox, cy + oy);
                    if (1..w - 1).contains(&dx) && (1..h - 1).contains(&dy) {
                        let at = (dx as u32, dy as u32);
                        let src = *img.get_pixel(ux, uy);
                        let head = own_head.then_some(id);
                        paste(&mut field, &mut truth, at, src, head, background);
                    }
                }
            }
        }
        write_field(
            out,
            &format!("dense{per_frame:02}-{index:03}"),
            &field,
            &truth,
        );
    }
    eprintln!(
        "{frames} fields with {per_frame} heads each in {}",
        out.display()
    );
}

/// The whole heads of frames `range` (in name order) of `split` (all are 1280 x 1024), by frame
/// name.
fn whole_heads(
    root: &Path,
    split: &str,
    range: std::ops::Range<usize>,
) -> HashMap<String, Vec<Donor>> {
    let mut names: Vec<String> = imageio::list_files(&root.join(split).join("frames"))
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.truncate(range.end);
    names.drain(..range.start.min(names.len()));
    let mut heads_of: HashMap<String, Vec<Donor>> = HashMap::new();
    let csv = std::fs::read_to_string(root.join("heads.csv")).unwrap();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f[0] != split || !names.iter().any(|n| n == f[1]) {
            continue;
        }
        let n = |i: usize| f[i].parse::<i64>().unwrap();
        // Heads cut by the border would be pasted as half heads.
        if n(4) == 0 || n(5) == 0 || n(6) >= 1279 || n(7) >= 1023 {
            continue;
        }
        heads_of.entry(f[1].to_string()).or_default().push(Donor {
            instance: f[2].parse().unwrap(),
            bbox: [n(4), n(5), n(6), n(7)],
            radius: (n(3) as f32 / std::f32::consts::PI).sqrt(),
        });
    }
    heads_of
}

/// One of the eight quarter turns and mirror images of an offset.
fn dihedral(turn: u8, x: i64, y: i64) -> (i64, i64) {
    let (x, y) = if turn & 4 == 0 { (x, y) } else { (-x, y) };
    match turn & 3 {
        0 => (x, y),
        1 => (-y, x),
        2 => (-x, -y),
        _ => (y, -x),
    }
}

/// A field as JPEG (quality 92, like the recorded ones) and its true heads in `heads/`.
fn write_field(out: &Path, stem: &str, field: &RgbImage, truth: &GrayImage) {
    truth
        .save(out.join("heads").join(format!("{stem}.png")))
        .unwrap();
    let path = out.join(format!("{stem}.jpg"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    JpegEncoder::new_with_quality(&mut file, 92)
        .encode_image(field)
        .unwrap();
}

/// One pixel of a pasted cell at `at`. A head pixel (`head`: its instance id) covers what lies
/// beneath: what it covers of an earlier head is no longer that head. A midpiece or tail pixel
/// absorbs light as its stain does: over the background it looks as recorded, over an earlier
/// head it darkens it and leaves it in view (transmittances multiply). Copied, its pale pixels
/// cut a light bar across the head beneath.
fn paste(
    field: &mut RgbImage,
    truth: &mut GrayImage,
    (x, y): (u32, u32),
    src: Rgb<u8>,
    head: Option<u8>,
    background: [u8; 3],
) {
    match head {
        Some(id) => {
            field.put_pixel(x, y, src);
            truth.put_pixel(x, y, Luma([id]));
        }
        None => {
            let under = *field.get_pixel(x, y);
            field.put_pixel(x, y, absorbed(under, src, background));
        }
    }
}

/// `under` seen through a pixel recorded as `src` on a field whose background is `background`:
/// each channel's transmittance (`src / background`, at most 1) multiplies it.
fn absorbed(under: Rgb<u8>, src: Rgb<u8>, background: [u8; 3]) -> Rgb<u8> {
    Rgb(std::array::from_fn(|c| {
        let t = (f32::from(src[c]) / f32::from(background[c].max(1))).min(1.0);
        (f32::from(under[c]) * t).round() as u8
    }))
}

/// The frame with every cell (any labelled part, grown by 4 px) painted in the median colour
/// of the rest (returned too): its texture and debris stay, its cells go.
fn painted_out(img: &RgbImage, parts: &GrayImage) -> (RgbImage, [u8; 3]) {
    let mut img = img.clone();
    let (w, h) = img.dimensions();
    let grow = 4i64;
    let mut cell = vec![false; (w * h) as usize];
    for (x, y, p) in parts.enumerate_pixels() {
        if p[0] == 0 {
            continue;
        }
        for yy in (y as i64 - grow).max(0)..=(y as i64 + grow).min(h as i64 - 1) {
            for xx in (x as i64 - grow).max(0)..=(x as i64 + grow).min(w as i64 - 1) {
                cell[(yy as u32 * w + xx as u32) as usize] = true;
            }
        }
    }
    let mut channels: [Vec<u8>; 3] = Default::default();
    for (i, p) in img.pixels().enumerate() {
        if !cell[i] {
            for c in 0..3 {
                channels[c].push(p[c]);
            }
        }
    }
    let median = channels.map(|mut v| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(200)
    });
    for (i, p) in img.pixels_mut().enumerate() {
        if cell[i] {
            *p = Rgb(median);
        }
    }
    (img, median)
}
