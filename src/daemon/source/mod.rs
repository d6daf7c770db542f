//! Frame sources: the trait every source implements (replay, montage, the V4L2 and GenICam
//! cameras) so that live and recorded input take one code path through the pipeline.

pub mod camera;
pub mod genicam;
pub mod montage;
pub mod replay;
pub mod v4l;

use std::path::PathBuf;
use std::sync::Arc;

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::core::imageio::{ListError, list_files};
use crate::core::stack::{TiffStack, file_is_tiff};
use crate::daemon::check::{Base, ConfigError, invalid, positive};
use camera::{CameraRequest, CameraSelector, PixelFormat};
use genicam::{GenicamSettings, RawGenicam};

/// The frame scale the defaults assume, µm/px: it fits the sperm-parsing fields (heads of
/// about 3800 px at about 10.5 µm²).
pub const DEFAULT_UM_PER_PX: f32 = 0.053;

/// Which kind of frame source feeds the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// Recorded frames from a folder or glob.
    #[default]
    Replay,
    /// Synthetic fields pasted from a labelled crop dataset (tests and benchmarks).
    Montage,
    /// A live V4L2 camera.
    Camera,
    /// A live GenICam camera (GigE Vision, USB3 Vision) through Aravis.
    Genicam,
}

/// `[source]`: where frames come from, and the optics they were taken with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSource {
    /// `replay`, `montage`, `camera` (V4L2) or `genicam`.
    pub kind: SourceKind,
    /// Size of one frame pixel in micrometres (calibrate with a stage micrometer). Unset: the
    /// `PhysicalSizeX` of a replayed OME-TIFF stack, else 0.053, which fits the sperm-parsing
    /// fields (heads of about 3800 px at about 10.5 µm²).
    pub um_per_px: Option<f32>,
    /// Behave as a live camera: when the pipeline is behind, drop the oldest queued frame and
    /// count it, instead of waiting.
    pub live: bool,
    pub replay: RawReplay,
    pub montage: RawMontage,
    pub camera: RawCamera,
    pub genicam: RawGenicam,
    /// The scale a replayed stack's OME metadata gives, and its file (`settle_scale`).
    #[serde(skip)]
    pub metadata_scale: Option<(f32, PathBuf)>,
}

impl Default for RawSource {
    fn default() -> Self {
        Self {
            kind: SourceKind::Replay,
            um_per_px: None,
            live: false,
            replay: RawReplay::default(),
            montage: RawMontage::default(),
            camera: RawCamera::default(),
            genicam: RawGenicam::default(),
            metadata_scale: None,
        }
    }
}

/// `[source.replay]`: recorded frames.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReplay {
    /// A folder (every file in it, in name order) or a glob pattern such as `run1/*.png`.
    pub path: Option<PathBuf>,
    /// Frames per second to pace the replay at; 0 replays as fast as the pipeline takes them.
    pub fps: f32,
    /// Start again from the first frame after the last one.
    pub repeat: bool,
    /// Decode every frame before the run starts (benchmarks without decoding).
    pub preload: bool,
}

/// `[source.montage]`: synthetic montage fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMontage {
    /// Class-per-folder crop dataset to paste from.
    pub dataset: Option<PathBuf>,
    /// Number of fields to make.
    pub frames: usize,
    /// Crops pasted per field.
    pub cells_per_frame: usize,
    /// Field width, px.
    pub width_px: u32,
    /// Field height, px.
    pub height_px: u32,
    /// Seed of the placement.
    pub seed: u64,
}

impl Default for RawMontage {
    fn default() -> Self {
        Self {
            dataset: None,
            frames: 50,
            cells_per_frame: 8,
            width_px: 1280,
            height_px: 1024,
            seed: 1,
        }
    }
}

/// `[source.camera]`: a live camera (V4L2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCamera {
    /// Device index (`/dev/videoN`); ignored when `name` is set.
    pub index: u32,
    /// Open the first device whose name contains this text instead (see `spermscope cameras`).
    pub name: Option<String>,
    /// Requested frame width; the device's closest offer is used.
    pub width_px: u32,
    /// Requested frame height.
    pub height_px: u32,
    /// Requested frame rate.
    pub fps: u32,
    /// `mjpeg`, `yuyv` or `grey`.
    pub pixel_format: PixelFormat,
}

impl Default for RawCamera {
    fn default() -> Self {
        Self {
            index: 0,
            name: None,
            width_px: 1280,
            height_px: 1024,
            fps: 30,
            pixel_format: PixelFormat::Mjpeg,
        }
    }
}

/// What the source reads, after validation.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Input {
    Replay {
        path: PathBuf,
        fps: f32,
        repeat: bool,
        preload: bool,
    },
    Montage {
        dataset: PathBuf,
        frames: usize,
        cells_per_frame: usize,
        width_px: u32,
        height_px: u32,
        seed: u64,
    },
    Camera(CameraRequest),
    Genicam(GenicamSettings),
}

/// Where the frame scale came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleOrigin {
    /// `source.um_per_px`, with what a replayed stack's OME metadata said if it said anything.
    Config { metadata_um_per_px: Option<f32> },
    /// The OME metadata (`PhysicalSizeX`) of this stack.
    Metadata { file: PathBuf },
    /// Neither: the default.
    Default,
}

/// The source's resolved settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceSettings {
    pub input: Input,
    /// Scale of the frames, µm/px.
    pub um_per_px: f32,
    /// Where `um_per_px` came from (logged when the source opens).
    pub scale_origin: ScaleOrigin,
    /// Drop the oldest queued frame instead of waiting when the pipeline is behind.
    pub live: bool,
}

impl RawSource {
    /// Check every value (no I/O).
    pub fn resolve(&self, base: Base<'_>) -> Result<SourceSettings, ConfigError> {
        if let Some(um) = self.um_per_px {
            positive("source.um_per_px", um)?;
        }
        let input = match self.kind {
            SourceKind::Replay => self.replay.resolve(base)?,
            SourceKind::Montage => self.montage.resolve(base)?,
            SourceKind::Camera => Input::Camera(self.camera.resolve()?),
            SourceKind::Genicam => Input::Genicam(self.genicam.resolve()?),
        };
        let metadata = self
            .metadata_scale
            .as_ref()
            .filter(|_| self.kind == SourceKind::Replay);
        let (um_per_px, scale_origin) = match (self.um_per_px, metadata) {
            (Some(um), m) => (
                um,
                ScaleOrigin::Config {
                    metadata_um_per_px: m.map(|m| m.0),
                },
            ),
            (None, Some((um, file))) => (*um, ScaleOrigin::Metadata { file: file.clone() }),
            (None, None) => (DEFAULT_UM_PER_PX, ScaleOrigin::Default),
        };
        Ok(SourceSettings {
            input,
            um_per_px,
            scale_origin,
            live: self.live,
        })
    }

    /// Read the frame scale a replayed OME-TIFF stack carries (the first file's OME-XML
    /// `PhysicalSizeX`), for `resolve` to use when `um_per_px` is not set. This is the one step
    /// of reading a config that opens a frame file; it reads the file's first directory only.
    pub fn settle_scale(&mut self, base: Base<'_>) {
        self.metadata_scale = None;
        let Some(path) = self
            .replay
            .path
            .as_ref()
            .filter(|_| self.kind == SourceKind::Replay)
        else {
            return;
        };
        let Some(first) = list_files(&base.path(path))
            .ok()
            .and_then(|f| f.into_iter().next())
        else {
            return;
        };
        if !file_is_tiff(&first) {
            return;
        }
        let scale = TiffStack::open(&first)
            .ok()
            .and_then(|s| s.ome())
            .and_then(|o| o.physical_size_x_um);
        self.metadata_scale = scale.map(|um| (um, first));
    }
}

impl RawReplay {
    fn resolve(&self, base: Base<'_>) -> Result<Input, ConfigError> {
        let Some(path) = &self.path else {
            return Err(invalid(
                "source.replay.path",
                "is required when source.kind = \"replay\"",
            ));
        };
        if !(self.fps.is_finite() && self.fps >= 0.0) {
            return Err(invalid("source.replay.fps", "must be 0 or more"));
        }
        Ok(Input::Replay {
            path: base.path(path),
            fps: self.fps,
            repeat: self.repeat,
            preload: self.preload,
        })
    }
}

impl RawMontage {
    fn resolve(&self, base: Base<'_>) -> Result<Input, ConfigError> {
        let Some(dataset) = &self.dataset else {
            return Err(invalid(
                "source.montage.dataset",
                "is required when source.kind = \"montage\"",
            ));
        };
        if self.frames == 0 {
            return Err(invalid("source.montage.frames", "must be at least 1"));
        }
        if self.width_px < 64 || self.height_px < 64 {
            return Err(invalid(
                "source.montage.width_px",
                "fields must be at least 64x64 px",
            ));
        }
        Ok(Input::Montage {
            dataset: base.path(dataset),
            frames: self.frames,
            cells_per_frame: self.cells_per_frame,
            width_px: self.width_px,
            height_px: self.height_px,
            seed: self.seed,
        })
    }
}

impl RawCamera {
    fn resolve(&self) -> Result<CameraRequest, ConfigError> {
        let side = 16..=16384;
        if !side.contains(&self.width_px) || !side.contains(&self.height_px) {
            return Err(invalid(
                "source.camera.width_px",
                "frame size must lie in 16..=16384 px a side",
            ));
        }
        if self.fps == 0 || self.fps > 1000 {
            return Err(invalid("source.camera.fps", "must lie in 1..=1000"));
        }
        let device = match &self.name {
            Some(n) if n.trim().is_empty() => {
                return Err(invalid("source.camera.name", "must not be empty"));
            }
            Some(n) => CameraSelector::Name(n.clone()),
            None => CameraSelector::Index(self.index),
        };
        Ok(CameraRequest {
            device,
            width_px: self.width_px,
            height_px: self.height_px,
            fps: self.fps,
            format: self.pixel_format,
        })
    }
}

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
    /// A frame that arrived with parts missing (lost packets); counted and skipped.
    Incomplete { name: String, reason: String },
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
    // The message carries the cause; no `source`, so an error chain does not print it twice.
    #[error("replay {0}")]
    List(ListError),
    #[error("montage dataset {path}: {reason}")]
    Montage { path: PathBuf, reason: String },
    #[error(transparent)]
    Camera(#[from] camera::CameraError),
}

impl From<ListError> for SourceError {
    fn from(e: ListError) -> Self {
        SourceError::List(e)
    }
}

/// Open the source the settings describe, and say which frame scale it runs at.
pub fn open(settings: &SourceSettings) -> Result<Box<dyn FrameSource>, SourceError> {
    let um = settings.um_per_px;
    match &settings.scale_origin {
        ScaleOrigin::Config {
            metadata_um_per_px: Some(m),
        } => tracing::info!(
            um_per_px = um,
            "frame scale {um} µm/px from source.um_per_px (the stack's OME metadata says {m} µm/px; the config wins)"
        ),
        ScaleOrigin::Config { .. } => {
            tracing::info!(
                um_per_px = um,
                "frame scale {um} µm/px from source.um_per_px"
            )
        }
        ScaleOrigin::Metadata { file } => tracing::info!(
            um_per_px = um,
            "frame scale {um} µm/px from the OME metadata (PhysicalSizeX) of {}",
            file.display()
        ),
        ScaleOrigin::Default => tracing::info!(
            um_per_px = um,
            "frame scale {um} µm/px: the default (set source.um_per_px from a stage micrometer)"
        ),
    }
    match &settings.input {
        Input::Replay {
            path,
            fps,
            repeat,
            preload,
        } => Ok(Box::new(replay::Replay::open(
            path, *fps, *repeat, *preload,
        )?)),
        Input::Montage {
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
        Input::Camera(request) => Ok(Box::new(camera::CameraSource::open(
            v4l::V4lCamera::new(request.device.clone()),
            request.clone(),
        )?)),
        Input::Genicam(g) => Ok(Box::new(camera::CameraSource::open(
            genicam::GenicamCamera::new(g.clone()),
            g.request(),
        )?)),
    }
}
