//! Fuzz target: a model file's bytes: the metadata edit and read, the weights the trainer reads back, ONNX Runtime's session, the spec and its checks (`spermscope::fuzz::model`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spermscope::fuzz::model(data));
