//! spermscope: sperm heads found, turned upright and classified with ONNX Runtime; this crate
//! holds the stages the daemon, the evaluator and the trainers share.

pub mod dataset;
pub mod metrics;
pub mod model;
pub mod morphometry;
pub mod pose;
pub mod preprocess;
pub mod segment;
pub mod spec;

#[cfg(feature = "train")]
pub mod train;
