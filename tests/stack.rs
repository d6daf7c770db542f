//! Replay of multi-page TIFF and OME-TIFF stacks through the daemon, with stacks the test
//! writes from sperm-parsing val fields: every page a frame in order, 8-bit RGB and 16-bit
//! grey, and the OME `PhysicalSizeX` setting the frame scale unless the config gives one (the
//! log says which was used).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tiff::encoder::{TiffEncoder, colortype};
use tiff::tags::Tag;

fn frames() -> Vec<PathBuf> {
    let mut f: Vec<PathBuf> = std::fs::read_dir(common::dataset("sperm-parsing/val/frames"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    f.sort();
    f.truncate(3);
    f
}

const OME: &str = r#"<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYZCT" Type="uint8" SizeX="1280" SizeY="1024" SizeZ="3" SizeC="3" SizeT="1" PhysicalSizeX="0.06" PhysicalSizeXUnit="&#181;m" PhysicalSizeY="0.06"/></Image></OME>"#;

/// The frames as one RGB 8-bit stack, the OME-XML on its first page.
fn rgb_stack(path: &Path, ome: bool) {
    let mut enc = TiffEncoder::new(File::create(path).unwrap()).unwrap();
    for (i, f) in frames().iter().enumerate() {
        let img = image::open(f).unwrap().to_rgb8();
        let mut page = enc
            .new_image::<colortype::RGB8>(img.width(), img.height())
            .unwrap();
        if i == 0 && ome {
            page.encoder()
                .write_tag(Tag::ImageDescription, OME)
                .unwrap();
        }
        page.write_data(img.as_raw()).unwrap();
    }
}

fn replay(input: &Path, out: &Path, config: Option<&str>) -> (Vec<Value>, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_spermscope"));
    c.env("RUST_LOG", "info,ort=warn").arg("replay").arg(input);
    let records = out.join("records.jsonl");
    c.arg("--records").arg(&records);
    if let Some(text) = config {
        let cfg = out.join("c.toml");
        std::fs::write(&cfg, text).unwrap();
        c.arg("--config").arg(cfg);
    }
    let o = common::run_ok(&mut c);
    let lines = std::fs::read_to_string(&records)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (lines, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A record without what differs from run to run (time) or by design (the frame's name).
fn core(r: &Value) -> Value {
    let mut r = r.clone();
    let o = r.as_object_mut().unwrap();
    for k in ["timestamp", "latency_ms", "frame"] {
        o.remove(k);
    }
    r
}

#[test]
fn an_ome_tiff_stack_replays_page_by_page_at_its_own_scale() {
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("field.ome.tif");
    rgb_stack(&stack, true);
    let run = |name: &str, input: &Path, config: Option<&str>| {
        let out = dir.path().join(name);
        std::fs::create_dir(&out).unwrap();
        replay(input, &out, config)
    };
    // The stack alone: its pages in order, at the OME scale.
    let (from_stack, log) = run("stack", &stack, None);
    assert!(
        log.contains("frame scale 0.06 µm/px from the OME metadata (PhysicalSizeX)"),
        "{log}"
    );
    let names: Vec<&str> = from_stack
        .iter()
        .filter(|r| r["kind"] == "detection")
        .map(|r| r["frame"]["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"field.ome.tif#1") && names.contains(&"field.ome.tif#3"));
    assert!(names.windows(2).all(|w| w[0] <= w[1]), "{names:?}");
    // The same fields as JPEG files with the scale in the config: the same cells.
    let folder = dir.path().join("jpeg");
    std::fs::create_dir(&folder).unwrap();
    for f in frames() {
        std::fs::copy(&f, folder.join(f.file_name().unwrap())).unwrap();
    }
    let (from_files, log) = run("files", &folder, Some("[source]\num_per_px = 0.06\n"));
    assert!(
        log.contains("frame scale 0.06 µm/px from source.um_per_px"),
        "{log}"
    );
    assert!(!from_stack.is_empty());
    let a: Vec<Value> = from_stack.iter().map(core).collect();
    let b: Vec<Value> = from_files.iter().map(core).collect();
    assert_eq!(a, b);
    // The config wins over the metadata, and the log says both.
    let (_, log) = run("config", &stack, Some("[source]\num_per_px = 0.053\n"));
    assert!(
        log.contains("frame scale 0.053 µm/px from source.um_per_px (the stack's OME metadata says 0.06 µm/px; the config wins)"),
        "{log}"
    );
}

#[test]
fn a_16_bit_grey_stack_replays_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("grey16.tif");
    let mut enc = TiffEncoder::new(File::create(&stack).unwrap()).unwrap();
    for f in frames() {
        let img = image::open(&f).unwrap().to_luma16();
        enc.write_image::<colortype::Gray16>(img.width(), img.height(), img.as_raw())
            .unwrap();
    }
    drop(enc);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let summary = out.join("summary.json");
    let mut c = Command::new(env!("CARGO_BIN_EXE_spermscope"));
    c.env("RUST_LOG", "info,ort=warn")
        .arg("replay")
        .arg(&stack)
        .arg("--summary")
        .arg(&summary)
        .arg("--records")
        .arg(out.join("r.jsonl"));
    let o = common::run_ok(&mut c);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(log.contains("0.053 µm/px: the default"), "{log}");
    let s: Value = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    assert_eq!(s["counts"]["frames_published_total"], 3, "{s}");
    assert!(
        s["counts"]["frames_dropped_total"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{s}"
    );
}
