//! spermscope: sperm heads found, turned upright and classified with ONNX Runtime. Three
//! layers: `core` (the image and model maths every program shares), `daemon` (the streaming
//! service) and `offline` (datasets, evaluation, training, tuning); `core` imports neither of
//! the others, and `daemon` and `offline` never import each other (ARCHITECTURE.md).

pub mod cli;
pub mod core;
pub mod daemon;
pub mod fuzz;
pub mod offline;
