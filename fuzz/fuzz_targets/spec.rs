//! Fuzz target: the spec JSON a model carries in its metadata, read and checked, then used to
//! cut and prepare a crop, as the classify stage does with every model it loads.
#![no_main]

use std::sync::Arc;

use image::{Rgb, RgbImage};
use libfuzzer_sys::fuzz_target;
use spermscope::core::preprocess::Preprocessor;
use spermscope::core::spec::ModelSpec;

fuzz_target!(|data: &[u8]| {
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
});
