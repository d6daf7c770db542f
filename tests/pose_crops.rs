//! Pose normalisation of crops scored against ground truth: crops cut around the heads of the
//! sperm-parsing `val` frames, head→tail direction from the part masks (midpiece).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use image::imageops;
use spermscope::core::dataset;
use spermscope::core::imageio;
use spermscope::core::pose::{self, Contrast, Cut, Jitter};

fn angle_error(a: (f32, f32), b: (f32, f32)) -> f32 {
    let dot = (a.0 * b.0 + a.1 * b.1).clamp(-1.0, 1.0);
    dot.acos().to_degrees()
}

#[test]
fn crop_pose_matches_midpiece_direction() {
    let heads = common::parsing_val_heads(40);
    let mut errors = Vec::new();
    let mut missed = 0;
    for h in heads.iter().filter(|h| h.tail_dir.is_some()) {
        let frame = imageio::load_rgb(&h.frame).expect("frame");
        // A 200 px crop centred on the head, like a HuSHeM/SMIDS crop.
        let half = 100i64;
        let x0 = (h.centroid.0 as i64 - half).clamp(0, frame.width() as i64 - 2 * half) as u32;
        let y0 = (h.centroid.1 as i64 - half).clamp(0, frame.height() as i64 - 2 * half) as u32;
        let crop = imageops::crop_imm(&frame, x0, y0, 200, 200).to_image();
        match pose::find_head_in_crop(&crop, Contrast::Dark) {
            Ok(found) => {
                let truth = h.tail_dir.expect("filtered");
                let e = angle_error(found.tail_dir, truth);
                if e > 15.0 && std::env::var("DUMP").is_ok() {
                    let mut c = crop.clone();
                    for t in 0..40 {
                        let (x, y) = (100.0 + truth.0 * t as f32, 100.0 + truth.1 * t as f32);
                        if x >= 0.0 && y >= 0.0 && x < 200.0 && y < 200.0 {
                            c.put_pixel(x as u32, y as u32, image::Rgb([0, 255, 0]));
                        }
                        let (x, y) = (
                            found.centroid.0 + found.tail_dir.0 * t as f32,
                            found.centroid.1 + found.tail_dir.1 * t as f32,
                        );
                        if x >= 0.0 && y >= 0.0 && x < 200.0 && y < 200.0 {
                            c.put_pixel(x as u32, y as u32, image::Rgb([255, 0, 0]));
                        }
                    }
                    c.save(format!(
                        "/tmp/fail_{}_{:.0}_{:?}.png",
                        errors.len(),
                        e,
                        found.polarity
                    ))
                    .ok();
                }
                errors.push(e);
            }
            Err(_) => missed += 1,
        }
    }
    errors.sort_by(f32::total_cmp);
    let n = errors.len();
    assert!(
        n >= 100,
        "only {n} heads with a visible midpiece were scored"
    );
    let median = errors[n / 2];
    let within15 = errors.iter().filter(|&&e| e <= 15.0).count() as f32 / n as f32;
    let within90 = errors.iter().filter(|&&e| e <= 90.0).count() as f32 / n as f32;
    println!(
        "crop pose on sperm-parsing val: n {n}, missed {missed}, median error {median:.1} deg, within 15 deg {:.1}%, polarity right {:.1}%",
        within15 * 100.0,
        within90 * 100.0
    );
    // Floors below the measured figures (see README): the classical pose must not regress.
    assert!(median <= 6.0, "median angle error {median:.1}");
    assert!(
        within90 >= 0.9,
        "head and tail swapped in {:.1}%",
        (1.0 - within90) * 100.0
    );
    assert!(
        within15 >= 0.82,
        "only {:.1}% within 15 degrees",
        within15 * 100.0
    );
    assert!(
        missed as f32 <= 0.05 * n as f32,
        "{missed} crops without a head"
    );
}

#[test]
fn upright_hushem_crops_stay_upright() {
    // Cutting a head upright and finding it again must give a tail straight down (90 deg).
    let ds = dataset::open(&common::dataset("hushem"), "head", None).expect("hushem");
    let mut errs = Vec::new();
    for s in ds.samples.iter().step_by(9) {
        let img = imageio::load_rgb(&s.path).expect("image");
        let head = pose::find_head_in_crop(&img, Contrast::Dark).expect("head");
        let up = pose::cut_window(&img, &Cut::upright(&head, 110.0), 110, &Jitter::default());
        let again = pose::find_head_in_crop(&up, Contrast::Dark).expect("head in upright crop");
        errs.push(angle_error(again.tail_dir, (0.0, 1.0)));
    }
    errs.sort_by(f32::total_cmp);
    let median = errs[errs.len() / 2];
    let flipped = errs.iter().filter(|&&e| e > 90.0).count();
    assert!(median < 6.0, "median {median:.1} deg");
    assert!(
        flipped * 10 <= errs.len(),
        "{flipped} of {} came back upside down",
        errs.len()
    );
}
