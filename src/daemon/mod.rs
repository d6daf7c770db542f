//! The streaming daemon: frame sources, head finding, classification, publishing, the report,
//! telemetry, the service glue, and the pipeline that wires them. It builds on `core` only.

pub mod calibrate;
pub mod check;
pub mod classify;
pub mod config;
pub mod crops;
pub mod exit;
pub mod frame;
pub mod host;
pub mod mqtt;
pub mod pipeline;
pub mod publish;
pub mod report;
pub mod segment;
pub mod service;
pub mod share;
pub mod source;
pub mod supervisor;
pub mod telemetry;
pub mod track;
pub mod view;
