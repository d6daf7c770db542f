//! Frame sources: the trait every source implements (replay, montage, and the camera to come)
//! so that live and recorded input take one code path through the pipeline.

pub mod camera;
pub mod montage;
pub mod replay;
pub mod v4l;

use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;

use crate::config::SourceSettings;

/// What a source hands over on each pull.
#[derive(Debug)]
pub enum Pull {
    Frame {
        name: String,
        /// Shared, so a preloaded or looped frame is not copied on each pull.
        image: Arc<RgbImage>,
        /// Time spent decoding, ms (0 when preloaded or generated).
        decode_ms: f32,
    },
    /// A frame that arrived but cannot be used; counted and skipped.
    Unreadable { name: String, reason: String },
    /// Nothing this time (a live source waiting for its device); the note, if any, says why.
    Idle(Option<SourceNote>),
    /// No more frames.
    End,
}

/// Something a live source reports about its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceNote {
    Disconnected(String),
    Reconnected,
}

/// A supplier of frames. `pull` blocks until the next frame is due (pacing is the source's
/// business), so the pipeline treats a replay exactly like a camera.
pub trait FrameSource: Send {
    /// One line for the log: what this source reads.
    fn describe(&self) -> String;
    /// The next frame, an unreadable one, or the end.
    fn pull(&mut self) -> Pull;
    /// A live source drops frames when the pipeline is behind instead of waiting.
    fn live(&self) -> bool {
        false
    }
}

/// Why a source cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("replay path {0} matches no files")]
    Empty(PathBuf),
    #[error("replay path {path} cannot be read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("replay pattern {pattern} is not a valid glob: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("montage dataset {path}: {reason}")]
    Montage { path: PathBuf, reason: String },
    #[error(transparent)]
    Camera(#[from] camera::CameraError),
}

/// Open the source the settings describe.
pub fn open(settings: &SourceSettings) -> Result<Box<dyn FrameSource>, SourceError> {
    match settings {
        SourceSettings::Replay {
            path,
            fps,
            repeat,
            preload,
        } => Ok(Box::new(replay::Replay::open(
            path, *fps, *repeat, *preload,
        )?)),
        SourceSettings::Montage {
            dataset,
            frames,
            cells_per_frame,
            width_px,
            height_px,
            seed,
        } => {
            let layout = montage::Layout {
                width_px: *width_px,
                height_px: *height_px,
                cells_per_frame: *cells_per_frame,
                seed: *seed,
            };
            Ok(Box::new(montage::MontageSource::open(
                dataset, layout, *frames,
            )?))
        }
        SourceSettings::Camera(request) => Ok(Box::new(camera::CameraSource::open(
            v4l::V4lCamera::new(request.device.clone()),
            request.clone(),
        )?)),
    }
}
