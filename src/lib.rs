//! spermscope: sperm heads found, turned upright and classified with ONNX Runtime; this crate
//! holds the daemon's stages and the parts the evaluator and the trainers share.

pub mod calibration;
pub mod classify;
pub mod cli;
pub mod config;
pub mod dataset;
pub mod frame;
pub mod metrics;
pub mod model;
pub mod morphometry;
pub mod pipeline;
#[cfg(feature = "plots")]
pub mod plots;
pub mod pose;
pub mod preprocess;
pub mod publish;
pub mod regions;
pub mod report;
pub mod segment;
pub mod service;
pub mod source;
pub mod spec;
pub mod telemetry;

#[cfg(feature = "train")]
pub mod train;
