//! Fuzz target: a model file's bytes, as `classify.model` or a SIGHUP reload hands them over:
//! the ONNX metadata edit the trainer and calibration make, then ONNX Runtime's session, the
//! spec read from the metadata and its checks against the graph.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spermscope::core::model::{Model, RuntimeOptions};
use spermscope::core::spec;

fuzz_target!(|data: &[u8]| {
    let _ = spec::set_metadata(data, "spermscope.fuzz", "1");
    let opts = RuntimeOptions {
        threads: 1,
        ..RuntimeOptions::default()
    };
    let _ = Model::from_bytes(data, Path::new("fuzz.onnx"), &opts);
});
