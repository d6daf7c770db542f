//! One entry point per fuzz target (`fuzz/fuzz_targets/`), shared with the replay of the inputs
//! that once crashed them (`tests/fuzz_regressions.rs`), so both run exactly the same calls.
//! Each feeds outside bytes to a parser the programs use and panics only when an invariant
//! the daemon relies on breaks; a parser refusing the bytes is the expected outcome.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use image::{Rgb, RgbImage};

use crate::core::model::{Model, RuntimeOptions};
use crate::core::pixels::Cfa;
use crate::core::preprocess::Preprocessor;
use crate::core::spec::{self, ModelSpec};
use crate::core::{imageio, onnx_proto, stack};
use crate::daemon::config::RawConfig;
use crate::daemon::report;
use crate::daemon::source::camera::{self, PixelFormat, RawFrame};
use crate::offline::tune_log;

/// A fuzz target's name (its binary in `fuzz/` and its folders there) and entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name.
pub const TARGETS: [Target; 7] = [
    ("frame_file", frame_file),
    ("camera_frame", camera_frame),
    ("config", config),
    ("model", model),
    ("spec", spec),
    ("records", records),
    ("tune_log", tune_log),
];

/// A replayed or dropped-in image file (JPEG, PNG, TIFF, BMP, multi-page TIFF and OME-TIFF
/// stacks), decoded the way the replay source decodes it.
pub fn frame_file(data: &[u8]) {
    let _ = imageio::decode_rgb(data);
    if stack::is_tiff(data)
        && let Ok(mut s) = stack::TiffStack::from_reader(Cursor::new(data), Path::new("fuzz.tif"))
    {
        // Every page, as the replay source reads a stack; stop a page chain that loops.
        for _ in 0..64 {
            if s.next_page().is_none() {
                break;
            }
        }
    }
}

/// A camera buffer: a format selector, width and height (u16 each, little-endian), then the
/// bytes; decoded to RGB as the camera source does. A decoded raw buffer must have the size
/// the device claimed (an MJPEG frame has its own).
pub fn camera_frame(data: &[u8]) {
    let [sel, w0, w1, h0, h1, rest @ ..] = data else {
        return;
    };
    let format = match sel % 10 {
        0 => PixelFormat::Mjpeg,
        1 => PixelFormat::Yuyv,
        2 => PixelFormat::Grey,
        3 => PixelFormat::Grey16 { bits: sel / 10 },
        4 => PixelFormat::Rgb24,
        5 => PixelFormat::Bayer8(Cfa::Rg),
        6 => PixelFormat::Bayer8(Cfa::Bg),
        7 => PixelFormat::Bayer8(Cfa::Gb),
        8 => PixelFormat::Bayer8(Cfa::Gr),
        _ => PixelFormat::Grey16 { bits: 16 },
    };
    let raw = RawFrame {
        width: u32::from(u16::from_le_bytes([*w0, *w1])),
        height: u32::from(u16::from_le_bytes([*h0, *h1])),
        format,
        data: rest.to_vec(),
    };
    if let Ok(img) = camera::decode(&raw)
        && raw.format != PixelFormat::Mjpeg
    {
        assert_eq!((img.width(), img.height()), (raw.width, raw.height));
    }
}

/// A config file's text, parsed and resolved (every value checked, no I/O) as `spermscope
/// validate` and start-up do.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(raw) = RawConfig::parse(text, Path::new("fuzz.toml")) {
        let _ = raw.resolve(Some(Path::new("/nonexistent/fuzz")));
    }
}

/// A model file's bytes, as `classify.model` or a SIGHUP reload hands them over: the ONNX
/// metadata edit the trainer and calibration make, then ONNX Runtime's session, the spec read
/// from the metadata and its checks against the graph.
pub fn model(data: &[u8]) {
    let _ = spec::set_metadata(data, "spermscope.fuzz", "1");
    let _ = spec::read_metadata(data, spec::METADATA_KEY);
    // The weights `spermscope-train --init` reads: each holds as many values as its shape says.
    if let Ok(weights) = onnx_proto::float_initializers(data) {
        for w in weights.values() {
            assert_eq!(w.shape.iter().product::<usize>(), w.values.len());
        }
    }
    let opts = RuntimeOptions {
        threads: 1,
        ..RuntimeOptions::default()
    };
    let _ = Model::from_bytes(data, Path::new("fuzz.onnx"), &opts);
}

/// The spec JSON a model carries, read and checked, then used to cut and prepare a crop as the
/// classify stage does; the tensors must have the sizes the spec names.
pub fn spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = ModelSpec::from_json(text) else {
        return;
    };
    let pre = Preprocessor::new(Arc::new(spec));
    // A dark ellipse on a light ground: a head the preprocessor can find.
    let crop = RgbImage::from_fn(48, 40, |x, y| {
        let (dx, dy) = (x as f32 - 24.0, y as f32 - 20.0);
        if (dx / 12.0).powi(2) + (dy / 8.0).powi(2) < 1.0 {
            Rgb([60, 40, 90])
        } else {
            Rgb([220, 215, 225])
        }
    });
    let prepared = pre.crop(&crop);
    let s = pre.spec().input.size_px as usize;
    let c = pre.spec().input.channels as usize;
    assert_eq!(prepared.pixels.len(), c * s * s);
    for view in pre.views(prepared.pixels) {
        assert_eq!(view.len(), c * s * s);
    }
}

/// A records file read back by `spermscope report`, tallied per sample and written as the
/// report's text and JSON.
pub fn records(data: &[u8]) {
    let Ok(records) = report::parse_record_lines(Cursor::new(data), Path::new("fuzz.jsonl")) else {
        return;
    };
    for tally in report::tally_records(&records) {
        let r = tally.report(&[], 200, None);
        let _ = r.text();
        assert!(serde_json::to_string_pretty(&r).is_ok());
    }
}

/// The tuner's trial log, read when a search resumes; it cannot hold more trials than lines.
pub fn tune_log(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(trials) = tune_log::parse_log(text, Path::new("fuzz.jsonl")) {
        assert!(trials.len() <= text.lines().count());
    }
}
