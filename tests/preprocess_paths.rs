//! One crop → tensor path: the same crops through the daemon's classifier, the evaluator and the
//! trainer give identical tensors, and a head in a field gives the tensors of the crop the daemon
//! cuts around it.
#![cfg(feature = "train")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use spermscope::core::dataset;
use spermscope::core::imageio;
use spermscope::core::model::{Model, RuntimeOptions};
use spermscope::core::pose::{Contrast, StainMap};
use spermscope::core::preprocess::{CROP_CONTEXT, head_patch};
use spermscope::daemon::classify::{Classifier, Classify};
use spermscope::daemon::config::RawConfig;
use spermscope::daemon::segment::{SegmentSettings, find_heads};
use spermscope::offline::eval;
use spermscope::offline::train::fit;

fn bundled(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

#[test]
fn daemon_evaluator_and_trainer_give_identical_tensors() {
    // The daemon's classifier, loaded as start-up loads it (its spec gains the config's
    // overrides), for the bundled SMIDS model.
    let text = format!(
        "[source.replay]\npath = \"x\"\n[classify]\nmodel = \"{}\"\n",
        bundled("smids-3class.onnx").display()
    );
    let settings = RawConfig::parse(&text, Path::new("t.toml"))
        .unwrap()
        .resolve(None)
        .unwrap();
    let r = &settings.reload;
    let classifier = Classifier::load(&r.classify, None, &settings.runtime()).unwrap();
    let model = Model::load(&bundled("smids-3class.onnx"), &RuntimeOptions::default()).unwrap();
    let spec = (*model.spec).clone();
    // 40 SMIDS crops spread over the dataset: all three classes, non-sperm among them.
    let mut ds = dataset::open(&common::dataset("smids"), "head", None).unwrap();
    ds.spread(40);
    let paths: Vec<&Path> = ds.samples.iter().map(|s| s.path.as_path()).collect();
    let evaluator: Vec<_> = eval::crop_inputs(&model, &paths)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let (items, skipped) = fit::load_items(&ds, &spec, &ProgressBar::hidden());
    assert!(skipped.is_empty());
    let idx: Vec<usize> = (0..items.len()).collect();
    let (px, fs) = fit::inputs(&items, &idx, &spec, None);
    let daemon = classifier.preprocessor();
    let (per_px, per_f) = (px.len() / items.len(), fs.len() / items.len());
    let mut without_head = 0;
    for (i, p) in paths.iter().enumerate() {
        let d = daemon.crop(&imageio::load_rgb(p).unwrap());
        let e = &evaluator[i];
        assert_eq!(
            d.pixels,
            e.pixels,
            "{}: daemon vs evaluator pixels",
            p.display()
        );
        assert_eq!(d.features, e.features, "{}: features", p.display());
        assert_eq!(
            d.pixels,
            px[i * per_px..(i + 1) * per_px],
            "{}: trainer pixels",
            p.display()
        );
        assert_eq!(
            d.features,
            fs[i * per_f..(i + 1) * per_f],
            "{}: trainer features",
            p.display()
        );
        without_head += usize::from(d.head.is_none());
    }
    assert_eq!(items.len(), 40);
    assert!(per_f > 0, "the SMIDS model takes morphometric features");
    eprintln!(
        "40 SMIDS crops, identical tensors on all three paths ({without_head} without a head)"
    );
}

#[test]
fn a_field_head_gives_the_tensors_of_the_crop_cut_around_it() {
    let model = Model::load(&bundled("smids-3class.onnx"), &RuntimeOptions::default()).unwrap();
    let pre = model.preprocessor();
    let window = pre.spec().crop.window_px;
    let frames = imageio::list_files(&common::dataset("sperm-parsing/val/frames")).unwrap();
    let (mut same, mut heads, mut cut_from_frame) = (0, 0, 0);
    for f in frames.iter().take(12) {
        let frame = imageio::load_rgb(f).unwrap();
        let stain = StainMap::new(&frame, Contrast::Dark);
        for found in find_heads(&frame, &SegmentSettings::default()) {
            if found.at_edge {
                continue;
            }
            heads += 1;
            // The field path at the training scale (no resizing) ...
            let field = pre.head(&frame, &found.head, None);
            // ... the same, with each patch's stain map cut out of the frame's (the daemon's
            // way): identical in every value ...
            let shared = pre.head_in(&frame, Some(&stain), &found.head, None);
            assert_eq!(shared.pixels, field.pixels);
            assert_eq!(shared.features, field.features);
            assert_eq!(
                shared.head.as_ref().map(|h| &h.pixels),
                field.head.as_ref().map(|h| &h.pixels)
            );
            cut_from_frame += 1;
            // ... against the crop path on the patch the daemon cuts around the head.
            let (patch, _, _) = head_patch(&frame, &found.head, window * CROP_CONTEXT);
            let crop = pre.crop(&patch);
            same += usize::from(field.pixels == crop.pixels && field.features == crop.features);
        }
    }
    // They differ only where the crop path picks another region of the patch than the
    // segmenter's head (a neighbour); then the field path keeps the segmenter's head.
    assert!(heads > 40, "{heads} heads");
    assert_eq!(cut_from_frame, heads);
    assert_eq!(
        pre.spec().crop.contrast,
        Contrast::Dark,
        "the stain map is cut, not remade"
    );
    assert!(same * 10 >= heads * 9, "{same} of {heads} identical");
    eprintln!("{same} of {heads} field heads: tensors identical to the crop path's");
}
