//! The offline tools' library: scoring (metrics), evaluation, pictures and, behind the `train`
//! feature, the trainer and the tuner. It builds on `core` only.

pub mod eval;
pub mod metrics;
#[cfg(feature = "plots")]
pub mod plots;

#[cfg(feature = "train")]
pub mod train;
pub mod tune_log;
