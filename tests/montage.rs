//! The whole pipeline on synthetic fields: labelled crops pasted at random positions and
//! angles. Each head the daemon classifies must get the class the model gives the same crop
//! on its own (crop-level classification), for at least 95% of the cells.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use spermscope::core::model::{Model, RuntimeOptions};
use spermscope::daemon::source::montage::{Layout, Montage, Placed};

#[test]
fn montage_cells_agree_with_crop_level_classification() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model_path = root.join("models/hushem-4class.onnx");
    let layout = Layout {
        width_px: 1280,
        height_px: 1024,
        cells_per_frame: 10,
        seed: 7,
    };
    let montage = Montage::open(&common::dataset("hushem"), layout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let frames = dir.path().join("frames");
    std::fs::create_dir(&frames).unwrap();
    let mut truth: Vec<(String, Vec<Placed>)> = Vec::new();
    for i in 1..=12u64 {
        let (img, placed) = montage.field(i);
        let name = format!("field_{i:03}.png");
        img.save(frames.join(&name)).unwrap();
        truth.push((name, placed));
    }
    let cfg = dir.path().join("montage.toml");
    std::fs::write(
        &cfg,
        format!(
            // The head verifier knows sperm-parsing fields, not pasted HuSHeM crops.
            "[segment]\nverify = false\n[classify]\nmodel = \"{}\"\nuncertain_below = 0.0\n[report]\nprint = false\n",
            model_path.display()
        ),
    )
    .unwrap();
    let records = common::replay_records(&frames, &cfg, &dir.path().join("r.jsonl"));

    let mut model = Model::load(&model_path, &RuntimeOptions::default()).unwrap();
    let (mut placed_n, mut matched, mut agree, mut label_agree) = (0, 0, 0, 0);
    for (name, placed) in &truth {
        for p in placed {
            placed_n += 1;
            // The record whose centroid lies in this crop's disc.
            let hits = common::classified_in_disc(&records, name, p.centre, p.radius);
            let [r] = hits.as_slice() else { continue };
            matched += 1;
            let crop_class = common::crop_class(&mut model, &p.crop);
            if r["class"] == crop_class.as_str() {
                agree += 1;
            }
            if r["class"] == p.class.as_str() {
                label_agree += 1;
            }
        }
    }
    let agreement = agree as f64 / matched.max(1) as f64;
    println!(
        "montage: {placed_n} crops pasted, {matched} classified once; field vs crop class agreement {:.1}%; field class = label {:.1}%",
        100.0 * agreement,
        100.0 * label_agree as f64 / matched.max(1) as f64
    );
    assert!(
        matched as f64 >= 0.9 * placed_n as f64,
        "{matched} of {placed_n} found"
    );
    assert!(agreement >= 0.95, "agreement {agreement:.3}");
}
