//! The layer every program shares: image decoding, head regions, pose, morphometry, the model
//! spec, the one crop → tensor `Preprocessor`, ONNX Runtime and calibration maths. It imports
//! nothing from `daemon` or `offline`.

pub mod calibration;
pub mod dataset;
pub mod draw;
pub mod imageio;
pub mod model;
pub mod morphometry;
pub mod onnx_proto;
pub mod pixels;
pub mod pose;
pub mod preprocess;
pub mod regions;
pub mod register;
pub mod spec;
pub mod stack;
#[cfg(test)]
pub(crate) mod testing;
