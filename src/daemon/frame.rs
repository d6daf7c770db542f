//! The values that travel between pipeline stages: a frame, the cells found in it, and what
//! each stage added. No I/O and no stage logic here.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use image::RgbImage;

use crate::core::model::ModelId;
use crate::core::morphometry::HeadSize;
use crate::core::pose::{HeadRegion, StainMap};
use crate::core::preprocess::Prepared;
use crate::daemon::telemetry::CellDropReason;

/// One image from a source, stamped when the source handed it over.
#[derive(Debug, Clone)]
pub struct Frame {
    /// 1, 2, 3... in the order the source delivered frames (undecodable ones included).
    pub seq: u64,
    /// File name for replay, a generated name for montage and camera frames.
    pub name: String,
    /// Wall-clock capture time.
    pub timestamp: SystemTime,
    /// Monotonic capture time, for latency.
    pub captured: Instant,
    pub image: Arc<RgbImage>,
}

/// Why a cell that was found was not classified (it is still published).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unclassified {
    /// Cut by the frame border.
    AtEdge,
    /// Two or more heads in one region.
    Touching,
    /// Its cell was already classified in `track.classify_max_per_track` frames.
    TrackComplete,
}

/// The classifier's answer for one cell.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// A class of the model, or `uncertain` when the top probability is below the threshold.
    pub class: String,
    /// Whether the top class is the model's normal class (false when uncertain).
    pub normal: bool,
    /// The top probability.
    pub confidence: f32,
    /// One probability per class of the model, in its order.
    pub probs: Vec<f32>,
}

/// A head found in a frame, on its way to a record.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Index of the head within its frame.
    pub index: usize,
    /// The physical cell this head belongs to across frames (set by the track stage).
    pub track: Option<u64>,
    /// The segmented head (the pose stage takes it).
    pub head: Option<HeadRegion>,
    pub bbox: [u32; 4],
    pub centroid: (f32, f32),
    /// Direction from head to tail, degrees in [0, 360), image coordinates.
    pub angle_deg: f32,
    pub size: HeadSize,
    pub unclassified: Option<Unclassified>,
    /// Model inputs (the pose stage fills them for cells that will be classified).
    pub prepared: Option<Prepared>,
    pub verdict: Option<Verdict>,
    /// Set when the cell cannot be published (counted with this reason).
    pub dropped: Option<CellDropReason>,
}

/// Milliseconds each stage spent on a frame.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub decode_ms: f32,
    pub segment_ms: f32,
    pub track_ms: f32,
    pub pose_ms: f32,
    pub classify_ms: f32,
}

/// A frame and everything the stages found in it.
#[derive(Debug, Clone)]
pub struct Work {
    pub frame: Frame,
    pub cells: Vec<Cell>,
    pub times: StageTimes,
    /// Model that classified this frame's cells.
    pub model: Option<Arc<ModelRef>>,
    /// Tracks that ended at this frame (not seen for too long, or the field changed): their
    /// cell records are published after this frame's detections.
    pub ended_tracks: Vec<u64>,
    /// The frame's stain map, from head finding; the registration and the pose stage read it,
    /// and the pose stage lets it go.
    pub stain: Option<Arc<StainMap>>,
}

/// The model a frame went through: its identity, its classes in output order, and the rule
/// that turns probabilities into a class (so a cell's fused vote uses the same rule).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRef {
    pub id: ModelId,
    pub classes: Vec<String>,
    pub normal_class: Option<String>,
    pub uncertain_below: f32,
}
