//! The daemon's configuration in two phases: raw TOML structs checked without I/O, then
//! resolved into the settings the pipeline runs on. Startup, `validate` and reload share it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::Provider;
use crate::pose::Contrast;
use crate::segment::SegmentSettings;
use crate::source::camera::{CameraRequest, CameraSelector, PixelFormat};

/// Model the embedded defaults use, relative to the project root.
pub const DEFAULT_MODEL: &str = "models/smids-3class.onnx";
/// Head verifier the embedded defaults use, relative to the project root.
pub const DEFAULT_VERIFIER: &str = "models/head-verifier.onnx";

/// Why a configuration cannot be used. Every variant names the key or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path} cannot be read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config file {path} is not valid: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config key {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The whole file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub sample: RawSample,
    pub source: RawSource,
    pub segment: RawSegment,
    pub classify: RawClassify,
    pub publish: RawPublish,
    pub report: RawReport,
    pub pipeline: RawPipeline,
    pub service: RawService,
    /// Several microscopes on one host: each entry is its own pipeline with its own sample id,
    /// source, records and report; the other sections are shared. When any are listed, the
    /// top-level `[sample]` and `[source]` are not used.
    pub microscopes: Vec<RawMicroscope>,
}

/// One microscope of several.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMicroscope {
    /// Sample id of this microscope's records and report.
    pub sample: String,
    /// Its frame source (the keys of `[source]`).
    #[serde(default)]
    pub source: RawSource,
    /// Append its records to this JSON Lines file.
    pub records_file: Option<PathBuf>,
    /// Serve its records on this socket (`unix:` or `tcp:` loopback).
    pub socket: Option<String>,
    /// Write its sample report as JSON here.
    pub report_file: Option<PathBuf>,
    /// Write its run figures as JSON here.
    pub summary_file: Option<PathBuf>,
}

/// The sample being analysed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSample {
    /// Sample id written into every record and the report.
    pub id: String,
}

impl Default for RawSample {
    fn default() -> Self {
        Self {
            id: "sample".into(),
        }
    }
}

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
}

/// Where frames come from, and the optics they were taken with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSource {
    /// `replay` or `montage`.
    pub kind: SourceKind,
    /// Size of one frame pixel in micrometres (calibrate with a stage micrometer). The default
    /// fits the sperm-parsing fields (heads of about 3800 px at about 10.5 µm²).
    pub um_per_px: f32,
    /// Behave as a live camera: when the pipeline is behind, drop the oldest queued frame and
    /// count it, instead of waiting.
    pub live: bool,
    pub replay: RawReplay,
    pub montage: RawMontage,
    pub camera: RawCamera,
}

impl Default for RawSource {
    fn default() -> Self {
        Self {
            kind: SourceKind::Replay,
            um_per_px: 0.053,
            live: false,
            replay: RawReplay::default(),
            montage: RawMontage::default(),
            camera: RawCamera::default(),
        }
    }
}

/// Recorded frames.
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

/// Synthetic montage fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMontage {
    /// Class-per-folder crop dataset to paste from.
    pub dataset: Option<PathBuf>,
    /// Number of fields to make.
    pub frames: usize,
    /// Crops pasted per field.
    pub cells_per_frame: usize,
    pub width_px: u32,
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

/// A live camera (V4L2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCamera {
    /// Device index (`/dev/videoN`); ignored when `name` is set.
    pub index: u32,
    /// Open the first device whose name contains this text instead (see `spermscope cameras`).
    pub name: Option<String>,
    /// Requested frame size; the device's closest offer is used.
    pub width_px: u32,
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

/// Running as a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawService {
    /// Serve `/metrics` (Prometheus) and `/healthz` here, e.g. "127.0.0.1:9464" (loopback
    /// only). Unset: no endpoint.
    pub metrics_addr: Option<String>,
    /// `/healthz` answers 503 when the source has delivered no frame for this long, seconds.
    pub stall_secs: f32,
}

impl Default for RawService {
    fn default() -> Self {
        Self {
            metrics_addr: None,
            stall_secs: 10.0,
        }
    }
}

/// Full-field head finding.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawSegment {
    /// `dark` for stained preparations (heads darker than the background), `any` for
    /// unstained, grayscale or phase-contrast input.
    pub contrast: Contrast,
    /// Smallest head area accepted, µm².
    pub min_head_area_um2: f32,
    /// Largest head area accepted, µm².
    pub max_head_area_um2: f32,
    /// Radius of the opening that separates heads from midpieces and tails, µm.
    pub open_radius_um: f32,
    /// Largest length/width ratio of a head.
    pub max_elongation: f32,
    /// Smallest area / convex hull share; below it a region is flagged as touching heads.
    pub min_solidity: f32,
    /// How far past Otsu's level (as a share of the stain span) a head's darker fifth must be.
    pub nucleus_margin: f32,
    /// Give every candidate a second look with a learned head verifier, which rejects round
    /// cells, bacteria, debris and merged pairs.
    pub verify: bool,
    /// Verifier model (a `head` / `not_head` classifier from spermscope-train); relative paths
    /// are taken from the config file's folder. Unset: the bundled head verifier.
    pub verifier_model: Option<PathBuf>,
    /// Candidates with a lower head probability than this are rejected.
    pub verifier_min_prob: f32,
}

impl Default for RawSegment {
    fn default() -> Self {
        let px = SegmentSettings::default();
        let um = RawSource::default().um_per_px;
        Self {
            contrast: px.contrast,
            min_head_area_um2: round2(px.min_area_px as f32 * um * um),
            max_head_area_um2: round2(px.max_area_px as f32 * um * um),
            open_radius_um: round2(px.open_radius_px as f32 * um),
            max_elongation: px.max_elongation,
            min_solidity: px.min_solidity,
            nucleus_margin: px.nucleus_margin,
            verify: true,
            verifier_model: None,
            verifier_min_prob: 0.1,
        }
    }
}

fn round2(v: f32) -> f32 {
    (v * 100.0).round() / 100.0
}

/// The classifier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawClassify {
    /// ONNX model exported by spermscope-train; relative paths are taken from the config
    /// file's folder. Default: the bundled SMIDS model.
    pub model: Option<PathBuf>,
    /// Scale (µm per pixel) of the images the model was trained on, when its metadata does not
    /// say; crops are resized from `source.um_per_px` to it. Unset: no resizing.
    pub model_um_per_px: Option<f32>,
    /// Execution provider: `cpu`, `cuda` (start-up fails if CUDA cannot be registered) or
    /// `auto` (CUDA when it registers, else CPU with a warning).
    pub provider: Provider,
    /// ONNX Runtime intra-op threads; 0 lets the runtime choose.
    pub threads: usize,
    /// ONNX Runtime library; unset: `ORT_DYLIB_PATH`, then `.ort/` from `scripts/setup`.
    pub ort_dylib_path: Option<PathBuf>,
    /// Most crops in one inference batch.
    pub max_batch: usize,
    /// How long a batch may wait for the next frame's heads, ms; 0 batches one frame at a time.
    pub batch_wait_ms: u64,
    /// Below this top probability a cell is recorded as `uncertain` (its probabilities are
    /// still written).
    pub uncertain_below: f32,
}

impl Default for RawClassify {
    fn default() -> Self {
        Self {
            model: None,
            model_um_per_px: None,
            provider: Provider::Cpu,
            threads: 1,
            ort_dylib_path: None,
            max_batch: 64,
            batch_wait_ms: 0,
            uncertain_below: 0.5,
        }
    }
}

/// Where records go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPublish {
    /// Write records to standard output.
    pub stdout: bool,
    /// Append records to this JSON Lines file.
    pub file: Option<PathBuf>,
    /// Serve records to any number of subscribers: `unix:/path/to.sock` or
    /// `tcp:127.0.0.1:PORT` (loopback only).
    pub socket: Option<String>,
    /// Records queued per subscriber before a slow one is dropped.
    pub subscriber_queue: usize,
}

impl Default for RawPublish {
    fn default() -> Self {
        Self {
            stdout: false,
            file: None,
            socket: None,
            subscriber_queue: 4096,
        }
    }
}

/// The per-sample report.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReport {
    /// Write the report as JSON here at the end of the run.
    pub file: Option<PathBuf>,
    /// Write the run's figures (frame and cell accounting, drops by reason, stage latency
    /// percentiles, throughput) as JSON here at the end of the run.
    pub summary_file: Option<PathBuf>,
    /// Print the readable report to standard error at the end of the run.
    pub print: bool,
    /// Class counted as a normal form; unset: the model's own normal class.
    pub normal_class: Option<String>,
    /// Classes that are not sperm (kept out of the % normal forms).
    pub exclude_classes: Vec<String>,
    /// Cells needed for a valid assessment (WHO 6th edition: 200).
    pub min_cells: usize,
    /// The model card's accuracy (0-1). When set, the label-free estimate (the classified
    /// cells' mean calibrated confidence) is compared with it and a drift warning is raised
    /// when it falls more than `drift_margin` below.
    pub reference_accuracy: Option<f32>,
    /// How far below `reference_accuracy` the estimate may fall, as a share (0.05: 5 points).
    pub drift_margin: f32,
    /// Classified cells needed before the running estimate is checked for drift (fewer cells
    /// give too noisy a mean).
    pub drift_min_cells: u64,
}

impl Default for RawReport {
    fn default() -> Self {
        Self {
            file: None,
            summary_file: None,
            print: true,
            normal_class: None,
            exclude_classes: vec!["non-sperm".into()],
            min_cells: 200,
            reference_accuracy: None,
            drift_margin: 0.05,
            drift_min_cells: 50,
        }
    }
}

/// Queues between stages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPipeline {
    /// Frames each channel between stages holds.
    pub queue_frames: usize,
    /// Seconds between status lines in the log.
    pub status_interval_secs: f32,
}

impl Default for RawPipeline {
    fn default() -> Self {
        Self {
            queue_frames: 4,
            status_interval_secs: 10.0,
        }
    }
}

/// Where a socket sink listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddrSpec {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// Frame source settings after validation.
#[derive(Debug, Clone)]
pub enum SourceSettings {
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
}

/// Everything the pipeline runs on, resolved from a `RawConfig`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub sample_id: String,
    pub source: SourceSettings,
    pub live: bool,
    pub um_per_px: f32,
    pub segment: SegmentSettings,
    /// Head verifier model and its threshold, when verification is on.
    pub verifier: Option<(PathBuf, f32)>,
    pub model_path: PathBuf,
    pub model_um_per_px: Option<f32>,
    pub provider: Provider,
    pub threads: usize,
    pub ort_dylib_path: Option<PathBuf>,
    pub max_batch: usize,
    pub batch_wait_ms: u64,
    pub uncertain_below: f32,
    pub stdout: bool,
    pub records_file: Option<PathBuf>,
    pub socket: Option<SocketAddrSpec>,
    pub subscriber_queue: usize,
    pub report_file: Option<PathBuf>,
    pub summary_file: Option<PathBuf>,
    pub report_print: bool,
    pub normal_class: Option<String>,
    pub exclude_classes: Vec<String>,
    pub min_cells: usize,
    pub reference_accuracy: Option<f32>,
    pub drift_margin: f32,
    pub drift_min_cells: u64,
    pub queue_frames: usize,
    pub status_interval_secs: f32,
    pub metrics_addr: Option<SocketAddr>,
    pub stall_secs: f32,
}

impl RawConfig {
    /// Parse TOML text; unknown keys and wrong types are refused with their name.
    pub fn parse(text: &str, origin: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            reason: e.to_string().trim().replace('\n', " "),
        })
    }

    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    /// One `Settings` per pipeline: the `[[microscopes]]` entries, or the single top-level
    /// source. Sample ids, record files and sockets must not be shared.
    pub fn resolve_all(&self, base: Option<&Path>) -> Result<Vec<Settings>, ConfigError> {
        if self.microscopes.is_empty() {
            return Ok(vec![self.resolve(base)?]);
        }
        let mut out: Vec<Settings> = Vec::new();
        for m in &self.microscopes {
            let mut one = self.clone();
            one.microscopes.clear();
            one.sample.id = m.sample.clone();
            one.source = m.source.clone();
            one.publish.file = m.records_file.clone();
            one.publish.socket = m.socket.clone();
            one.publish.stdout = false;
            one.report.file = m.report_file.clone();
            one.report.summary_file = m.summary_file.clone();
            let s = one.resolve(base)?;
            let clash = out.iter().any(|o| {
                o.sample_id == s.sample_id
                    || (o.records_file.is_some() && o.records_file == s.records_file)
                    || (o.socket.is_some() && o.socket == s.socket)
                    || (o.report_file.is_some() && o.report_file == s.report_file)
            });
            if clash {
                return Err(invalid(
                    "microscopes",
                    format!(
                        "microscope '{}' shares its sample id, records file, socket or report file with another",
                        m.sample
                    ),
                ));
            }
            out.push(s);
        }
        Ok(out)
    }

    /// Check every value; no I/O. `base` is the folder relative paths are taken from (the
    /// config file's folder); `None` for the embedded defaults.
    pub fn resolve(&self, base: Option<&Path>) -> Result<Settings, ConfigError> {
        let rel = |p: &Path| match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.to_path_buf(),
        };
        if self.sample.id.trim().is_empty() {
            return Err(invalid("sample.id", "must not be empty"));
        }
        if self.sample.id.chars().any(char::is_control) {
            return Err(invalid("sample.id", "must not hold control characters"));
        }
        let s = &self.source;
        positive("source.um_per_px", s.um_per_px)?;
        let source = match s.kind {
            SourceKind::Replay => {
                let r = &s.replay;
                let Some(path) = &r.path else {
                    return Err(invalid(
                        "source.replay.path",
                        "is required when source.kind = \"replay\"",
                    ));
                };
                if !(r.fps.is_finite() && r.fps >= 0.0) {
                    return Err(invalid("source.replay.fps", "must be 0 or more"));
                }
                SourceSettings::Replay {
                    path: rel(path),
                    fps: r.fps,
                    repeat: r.repeat,
                    preload: r.preload,
                }
            }
            SourceKind::Montage => {
                let m = &s.montage;
                let Some(dataset) = &m.dataset else {
                    return Err(invalid(
                        "source.montage.dataset",
                        "is required when source.kind = \"montage\"",
                    ));
                };
                if m.frames == 0 {
                    return Err(invalid("source.montage.frames", "must be at least 1"));
                }
                if m.width_px < 64 || m.height_px < 64 {
                    return Err(invalid(
                        "source.montage.width_px",
                        "fields must be at least 64x64 px",
                    ));
                }
                SourceSettings::Montage {
                    dataset: rel(dataset),
                    frames: m.frames,
                    cells_per_frame: m.cells_per_frame,
                    width_px: m.width_px,
                    height_px: m.height_px,
                    seed: m.seed,
                }
            }
            SourceKind::Camera => {
                let c = &s.camera;
                if c.width_px < 16 || c.height_px < 16 || c.width_px > 16384 || c.height_px > 16384
                {
                    return Err(invalid(
                        "source.camera.width_px",
                        "frame size must lie in 16..=16384 px a side",
                    ));
                }
                if c.fps == 0 || c.fps > 1000 {
                    return Err(invalid("source.camera.fps", "must lie in 1..=1000"));
                }
                SourceSettings::Camera(CameraRequest {
                    device: match &c.name {
                        Some(n) if n.trim().is_empty() => {
                            return Err(invalid("source.camera.name", "must not be empty"));
                        }
                        Some(n) => CameraSelector::Name(n.clone()),
                        None => CameraSelector::Index(c.index),
                    },
                    width_px: c.width_px,
                    height_px: c.height_px,
                    fps: c.fps,
                    format: c.pixel_format,
                })
            }
        };
        let um = s.um_per_px;
        let g = &self.segment;
        positive("segment.min_head_area_um2", g.min_head_area_um2)?;
        positive("segment.max_head_area_um2", g.max_head_area_um2)?;
        if g.max_head_area_um2 <= g.min_head_area_um2 {
            return Err(invalid(
                "segment.max_head_area_um2",
                "must be larger than segment.min_head_area_um2",
            ));
        }
        if !(g.open_radius_um.is_finite() && g.open_radius_um >= 0.0) {
            return Err(invalid("segment.open_radius_um", "must be 0 or more"));
        }
        let open_px = (g.open_radius_um / um).round();
        if open_px > 60.0 {
            return Err(invalid(
                "segment.open_radius_um",
                format!("is {open_px} px at source.um_per_px = {um}; at most 60 px"),
            ));
        }
        if !(g.max_elongation.is_finite() && g.max_elongation >= 1.0) {
            return Err(invalid("segment.max_elongation", "must be 1 or more"));
        }
        if !(0.0..=1.0).contains(&g.min_solidity) {
            return Err(invalid("segment.min_solidity", "must lie in [0, 1]"));
        }
        if !(g.nucleus_margin.is_finite() && (-1.0..=2.0).contains(&g.nucleus_margin)) {
            return Err(invalid("segment.nucleus_margin", "must lie in [-1, 2]"));
        }
        let px2 = um * um;
        let segment = SegmentSettings {
            contrast: g.contrast,
            min_area_px: (g.min_head_area_um2 / px2).round().max(1.0) as usize,
            max_area_px: (g.max_head_area_um2 / px2).round() as usize,
            open_radius_px: open_px as u8,
            max_elongation: g.max_elongation,
            min_solidity: g.min_solidity,
            nucleus_margin: g.nucleus_margin,
        };
        if !(0.0..=1.0).contains(&g.verifier_min_prob) {
            return Err(invalid("segment.verifier_min_prob", "must lie in [0, 1]"));
        }
        let verifier = g.verify.then(|| {
            let path = match &g.verifier_model {
                Some(p) => rel(p),
                None => bundled(DEFAULT_VERIFIER),
            };
            (path, g.verifier_min_prob)
        });
        let c = &self.classify;
        if let Some(v) = c.model_um_per_px {
            positive("classify.model_um_per_px", v)?;
        }
        if c.max_batch == 0 || c.max_batch > 4096 {
            return Err(invalid("classify.max_batch", "must lie in 1..=4096"));
        }
        if c.threads > 256 {
            return Err(invalid("classify.threads", "must be at most 256"));
        }
        if c.batch_wait_ms > 10_000 {
            return Err(invalid("classify.batch_wait_ms", "must be at most 10000"));
        }
        if !(0.0..=1.0).contains(&c.uncertain_below) {
            return Err(invalid("classify.uncertain_below", "must lie in [0, 1]"));
        }
        let model_path = match &c.model {
            Some(p) => rel(p),
            None => bundled(DEFAULT_MODEL),
        };
        let p = &self.publish;
        let socket = p.socket.as_deref().map(parse_socket).transpose()?;
        if p.subscriber_queue == 0 {
            return Err(invalid("publish.subscriber_queue", "must be at least 1"));
        }
        let r = &self.report;
        if r.min_cells == 0 {
            return Err(invalid("report.min_cells", "must be at least 1"));
        }
        if let Some(n) = &r.normal_class
            && r.exclude_classes.contains(n)
        {
            return Err(invalid(
                "report.exclude_classes",
                format!("holds the normal class '{n}'"),
            ));
        }
        if let Some(a) = r.reference_accuracy
            && !(a > 0.0 && a <= 1.0)
        {
            return Err(invalid("report.reference_accuracy", "must lie in (0, 1]"));
        }
        if !(0.0..=1.0).contains(&r.drift_margin) {
            return Err(invalid("report.drift_margin", "must lie in [0, 1]"));
        }
        let q = &self.pipeline;
        if q.queue_frames == 0 || q.queue_frames > 1024 {
            return Err(invalid("pipeline.queue_frames", "must lie in 1..=1024"));
        }
        if !(q.status_interval_secs.is_finite() && q.status_interval_secs > 0.0) {
            return Err(invalid("pipeline.status_interval_secs", "must be above 0"));
        }
        let v = &self.service;
        let metrics_addr = match &v.metrics_addr {
            None => None,
            Some(a) => {
                let addr: SocketAddr = a.parse().map_err(|e| {
                    invalid(
                        "service.metrics_addr",
                        format!("'{a}' is not an address and port: {e}"),
                    )
                })?;
                if !addr.ip().is_loopback() {
                    return Err(invalid(
                        "service.metrics_addr",
                        format!("{addr} is not a loopback address"),
                    ));
                }
                Some(addr)
            }
        };
        positive("service.stall_secs", v.stall_secs)?;
        Ok(Settings {
            sample_id: self.sample.id.clone(),
            source,
            live: s.live,
            um_per_px: um,
            segment,
            verifier,
            model_path,
            model_um_per_px: c.model_um_per_px,
            provider: c.provider,
            threads: c.threads,
            ort_dylib_path: c.ort_dylib_path.as_deref().map(rel),
            max_batch: c.max_batch,
            batch_wait_ms: c.batch_wait_ms,
            uncertain_below: c.uncertain_below,
            stdout: p.stdout,
            records_file: p.file.as_deref().map(rel),
            socket,
            subscriber_queue: p.subscriber_queue,
            report_file: r.file.as_deref().map(rel),
            summary_file: r.summary_file.as_deref().map(rel),
            report_print: r.print,
            normal_class: r.normal_class.clone(),
            exclude_classes: r.exclude_classes.clone(),
            min_cells: r.min_cells,
            reference_accuracy: r.reference_accuracy,
            drift_margin: r.drift_margin,
            drift_min_cells: r.drift_min_cells,
            queue_frames: q.queue_frames,
            status_interval_secs: q.status_interval_secs,
            metrics_addr,
            stall_secs: v.stall_secs,
        })
    }
}

fn positive(key: &'static str, v: f32) -> Result<(), ConfigError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(invalid(key, format!("must be a number above 0, not {v}")))
    }
}

fn parse_socket(s: &str) -> Result<SocketAddrSpec, ConfigError> {
    const KEY: &str = "publish.socket";
    if let Some(p) = s.strip_prefix("unix:") {
        if p.is_empty() {
            return Err(invalid(KEY, "unix: needs a path"));
        }
        return Ok(SocketAddrSpec::Unix(PathBuf::from(p)));
    }
    if let Some(a) = s.strip_prefix("tcp:") {
        let addr: SocketAddr = a
            .parse()
            .map_err(|e| invalid(KEY, format!("'{a}' is not an address and port: {e}")))?;
        if !addr.ip().is_loopback() {
            return Err(invalid(
                KEY,
                format!("{addr} is not a loopback address; records are served on localhost only"),
            ));
        }
        return Ok(SocketAddrSpec::Tcp(addr));
    }
    Err(invalid(KEY, format!("'{s}' must start with unix: or tcp:")))
}

/// A bundled file (`models/...`): beside the working directory, the executable or the source
/// tree.
pub fn bundled(rel: &str) -> PathBuf {
    crate::model::install_roots()
        .iter()
        .map(|r| r.join(rel))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_replay(extra: &str) -> String {
        format!("[source.replay]\npath = \"frames\"\n{extra}")
    }

    #[test]
    fn defaults_resolve_to_the_segmenter_defaults() {
        let raw = RawConfig::parse(&with_replay(""), Path::new("t.toml")).unwrap();
        let s = raw.resolve(Some(Path::new("/etc/x"))).unwrap();
        let d = SegmentSettings::default();
        assert_eq!(s.segment.open_radius_px, d.open_radius_px);
        assert!((s.segment.min_area_px as i64 - d.min_area_px as i64).abs() <= 3);
        assert!((s.segment.max_area_px as i64 - d.max_area_px as i64).abs() <= 40);
        match s.source {
            SourceSettings::Replay { path, .. } => assert_eq!(path, Path::new("/etc/x/frames")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = RawConfig::parse("[segment]\nmin_area = 3\n", Path::new("t.toml")).unwrap_err();
        assert!(e.to_string().contains("min_area"), "{e}");
        let raw = RawConfig::parse(
            &with_replay("[classify]\nuncertain_below = 1.5\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        let e = raw.resolve(None).unwrap_err();
        assert!(e.to_string().contains("classify.uncertain_below"), "{e}");
        let raw = RawConfig::parse(
            &with_replay("[publish]\nsocket = \"tcp:0.0.0.0:9000\"\n"),
            Path::new("t.toml"),
        )
        .unwrap();
        let e = raw.resolve(None).unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        let raw = RawConfig::parse("", Path::new("t.toml")).unwrap();
        let e = raw.resolve(None).unwrap_err();
        assert!(e.to_string().contains("source.replay.path"), "{e}");
    }

    #[test]
    fn example_config_parses_and_resolves() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
        let raw = RawConfig::load(&path).unwrap();
        raw.resolve(path.parent()).unwrap();
    }
}
