//! Crowded fields for the throughput benchmark: `sperm-parsing` val frames with their own cells
//! painted out, then whole cells (the head and the midpiece and tail near it) cut from
//! `sperm-parsing/train` frames pasted at jittered grid places, so a field holds a chosen number
//! of real heads at the real scale. Written as JPEG (quality 92) like the recorded fields.
//! `cargo run --release --example dense_fields -- OUT_DIR HEADS_PER_FRAME FRAMES [SEED]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::{GrayImage, Rgb, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use spermscope::core::imageio;

/// Part labels in `parts/`: 4 midpiece, 5 tail (vacuole, acrosome and nucleus make the head).
const MIDPIECE: u8 = 4;
const TAIL: u8 = 5;
/// How far around a head's box its midpiece and tail are taken, px.
const MARGIN: u32 = 40;

/// One head of a training frame: its frame, instance id and box.
struct Donor {
    frame: String,
    instance: u8,
    bbox: [u32; 4],
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: dense_fields OUT_DIR HEADS_PER_FRAME FRAMES [SEED]");
        std::process::exit(2);
    }
    let out = PathBuf::from(&args[1]);
    let per_frame: usize = args[2].parse().expect("HEADS_PER_FRAME");
    let frames: usize = args[3].parse().expect("FRAMES");
    let seed: u64 = args.get(4).map_or(1, |s| s.parse().expect("SEED"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/sperm-parsing");
    std::fs::create_dir_all(&out).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);

    let mut donors: Vec<Donor> = Vec::new();
    let csv = std::fs::read_to_string(root.join("heads.csv")).unwrap();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f[0] != "train" {
            continue;
        }
        let n = |i: usize| f[i].parse::<u32>().unwrap();
        donors.push(Donor {
            frame: f[1].to_string(),
            instance: f[2].parse().unwrap(),
            bbox: [n(4), n(5), n(6), n(7)],
        });
    }
    donors.shuffle(&mut rng);
    let backgrounds = imageio::list_files(&root.join("val/frames")).unwrap();
    let mut cache: HashMap<String, (RgbImage, GrayImage, GrayImage)> = HashMap::new();
    let mut next = 0;
    for index in 0..frames {
        let bg_path = &backgrounds[index % backgrounds.len()];
        let mut field = painted_out(&root, bg_path);
        let (w, h) = field.dimensions();
        // A jittered grid with at least `per_frame` places, in random order.
        let cols = ((per_frame as f32 * w as f32 / h as f32).sqrt().ceil() as u32).max(1);
        let rows = (per_frame as u32).div_ceil(cols);
        let (cw, ch) = (w / cols, h / rows);
        let mut places: Vec<(u32, u32)> = (0..rows)
            .flat_map(|r| (0..cols).map(move |c| (c, r)))
            .collect();
        places.shuffle(&mut rng);
        for &(c, r) in places.iter().take(per_frame) {
            let d = &donors[next % donors.len()];
            next += 1;
            let (img, heads, parts) = cache.entry(d.frame.clone()).or_insert_with(|| {
                let stem = d.frame.trim_end_matches(".jpg");
                (
                    imageio::load_rgb(&root.join("train/frames").join(&d.frame)).unwrap(),
                    image::open(root.join(format!("train/heads/{stem}.png")))
                        .unwrap()
                        .to_luma8(),
                    image::open(root.join(format!("train/parts/{stem}.png")))
                        .unwrap()
                        .to_luma8(),
                )
            });
            let [x0, y0, x1, y1] = d.bbox;
            let (sx0, sy0) = (x0.saturating_sub(MARGIN), y0.saturating_sub(MARGIN));
            let (sx1, sy1) = (
                (x1 + MARGIN).min(img.width() - 1),
                (y1 + MARGIN).min(img.height() - 1),
            );
            // The head's centre lands at a random point of its grid cell, away from the edge.
            let (hx, hy) = ((x0 + x1) / 2, (y0 + y1) / 2);
            let jx = rng.random_range(0..cw.saturating_sub(2 * 60).max(1));
            let jy = rng.random_range(0..ch.saturating_sub(2 * 60).max(1));
            let (tx, ty) = (
                (c * cw + 60 + jx) as i64 - hx as i64,
                (r * ch + 60 + jy) as i64 - hy as i64,
            );
            for y in sy0..=sy1 {
                for x in sx0..=sx1 {
                    let own_head = heads.get_pixel(x, y)[0] == d.instance;
                    let part = parts.get_pixel(x, y)[0];
                    if !(own_head || part == MIDPIECE || part == TAIL) {
                        continue;
                    }
                    let (dx, dy) = (x as i64 + tx, y as i64 + ty);
                    if (1..w as i64 - 1).contains(&dx) && (1..h as i64 - 1).contains(&dy) {
                        field.put_pixel(dx as u32, dy as u32, *img.get_pixel(x, y));
                    }
                }
            }
        }
        let path = out.join(format!("dense{per_frame:02}-{index:03}.jpg"));
        let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        JpegEncoder::new_with_quality(&mut file, 92)
            .encode_image(&field)
            .unwrap();
    }
    eprintln!(
        "{frames} fields with {per_frame} pasted heads each in {}",
        out.display()
    );
}

/// A val frame with every cell (any labelled part, grown by 4 px) painted in the median colour
/// of the rest: its texture and debris stay, its heads go.
fn painted_out(root: &Path, frame: &Path) -> RgbImage {
    let mut img = imageio::load_rgb(frame).unwrap();
    let stem = frame.file_stem().unwrap().to_string_lossy();
    let parts = image::open(root.join(format!("val/parts/{stem}.png")))
        .unwrap()
        .to_luma8();
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
    img
}
