//! Typed pipeline events, the counters they feed (`*_total`) and per-stage latency
//! histograms. Stages report events; only this module turns them into numbers.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::Mutex;

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram as PromHistogram;
use prometheus_client::registry::{Registry, Unit};

use crate::core::model::ModelId;

/// Why a frame never reached the publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameDropReason {
    /// The file or buffer could not be decoded.
    Undecodable,
    /// A live source was ahead of the pipeline; the oldest queued frame gave way.
    QueueFull,
    /// A stage downstream had stopped.
    PipelineClosed,
    /// A camera frame arrived with parts missing (lost packets).
    Incomplete,
}

/// Why a found cell was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CellDropReason {
    /// The inference batch failed.
    InferenceError,
    /// Its frame was dropped after segmentation.
    FrameDropped,
}

/// Why a message to the MQTT broker was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttDropReason {
    /// The sink's queue was full (the broker away or slower than the records).
    QueueFull,
    /// The broker had not acknowledged it when the drain time at shutdown ran out.
    UnsentAtExit,
}

/// Why a record subscriber was disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriberDropReason {
    /// Its queue filled: it reads slower than cells are published.
    Slow,
    /// It closed the connection.
    Gone,
}

/// Something that happened in the pipeline.
#[derive(Debug, Clone)]
pub enum Event {
    FrameSeen,
    FramesDropped {
        reason: FrameDropReason,
        n: u64,
    },
    FramePublished,
    CellsFound {
        n: u64,
    },
    /// Head candidates the verifier rejected (never cells).
    CandidatesRejected {
        n: u64,
    },
    /// The verifier failed on a frame; its candidates were kept unverified.
    VerifierFailed,
    CellsPublished {
        n: u64,
    },
    CellsDropped {
        reason: CellDropReason,
        n: u64,
    },
    CellsClassified {
        class: String,
        n: u64,
    },
    SubscriberJoined,
    /// A live source lost its device (it retries with backoff).
    SourceLost {
        reason: String,
    },
    /// A live source has its device back.
    SourceBack,
    /// A reload swapped the model in.
    Reloaded,
    /// A reload was refused (bad config or model); the old one runs on.
    ReloadFailed,
    SubscriberDropped {
        reason: SubscriberDropReason,
    },
    SinkWriteFailed {
        sink: &'static str,
    },
    /// Records a sink could not write and gave up (a full disk, for the file sink).
    SinkRecordsLost {
        sink: &'static str,
        n: u64,
    },
    /// The sample's running label-free accuracy estimate fell more than the margin below the
    /// model card's accuracy.
    DriftSuspected,
    /// It came back within the margin.
    DriftCleared,
    /// The track stage started new tracks (physical cells first seen).
    TracksStarted {
        n: u64,
    },
    /// Tracks ended and their cell records were published.
    TracksEnded {
        n: u64,
    },
    /// Detections left unclassified because their cell had been classified in enough frames.
    ClassificationsSkipped {
        n: u64,
    },
    /// The stage moved to a new field: every track ended.
    FieldChanged,
    /// The MQTT broker acknowledged messages.
    MqttDelivered {
        n: u64,
    },
    /// MQTT messages given up.
    MqttDropped {
        reason: MqttDropReason,
        n: u64,
    },
    /// The MQTT connection is up.
    MqttConnected,
    /// The MQTT connection dropped (messages are queued and retried).
    MqttDisconnected,
    /// The heads' sizes disagree with `source.um_per_px` (or no heads are found at all); the
    /// suggestion, when the sizes give one.
    ScaleSuspect {
        suggested_um_per_px: Option<f32>,
    },
}

/// Pipeline stages with a latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Decode,
    Segment,
    Track,
    Pose,
    Classify,
    Publish,
    /// From capture to the frame's records leaving the publisher.
    EndToEnd,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Segment => "segment",
            Stage::Track => "track",
            Stage::Pose => "pose",
            Stage::Classify => "classify",
            Stage::Publish => "publish",
            Stage::EndToEnd => "end_to_end",
        }
    }
}

/// Counter values at one moment; the accounting identities are checked on it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Counts {
    pub frames_seen_total: u64,
    pub frames_published_total: u64,
    pub frames_dropped_total: BTreeMap<FrameDropReason, u64>,
    pub cells_found_total: u64,
    pub candidates_rejected_total: u64,
    pub verifier_errors_total: u64,
    pub cells_published_total: u64,
    pub cells_dropped_total: BTreeMap<CellDropReason, u64>,
    pub cells_classified_total: BTreeMap<String, u64>,
    pub subscribers_joined_total: u64,
    pub reloads_total: u64,
    pub reload_failures_total: u64,
    pub source_disconnects_total: u64,
    pub source_reconnects_total: u64,
    /// Whether the source has its device (false between a loss and the reconnection).
    pub source_up: bool,
    pub subscribers_dropped_total: BTreeMap<SubscriberDropReason, u64>,
    pub sink_write_errors_total: BTreeMap<&'static str, u64>,
    pub sink_records_lost_total: BTreeMap<&'static str, u64>,
    /// Times drift was suspected (the running estimate fell below the reference).
    pub drift_warnings_total: u64,
    /// Whether drift is suspected now.
    pub drift_suspected: bool,
    /// Physical cells first seen (tracks started).
    pub tracks_started_total: u64,
    /// Cell records published (tracks ended).
    pub tracks_ended_total: u64,
    /// Detections not classified because their cell had enough classified frames.
    pub classifications_skipped_total: u64,
    /// Times every track ended because the field changed.
    pub field_changes_total: u64,
    /// MQTT messages the broker acknowledged.
    pub mqtt_messages_delivered_total: u64,
    /// MQTT messages given up, by reason.
    pub mqtt_messages_dropped_total: BTreeMap<MqttDropReason, u64>,
    /// Times the MQTT connection dropped.
    pub mqtt_disconnects_total: u64,
    /// Whether the MQTT sink is connected now.
    pub mqtt_connected: bool,
    /// Times the head sizes disagreed with the configured scale (once per run).
    pub scale_warnings_total: u64,
    /// The scale the heads suggest, after such a warning.
    pub suggested_um_per_px: Option<f32>,
}

impl Counts {
    pub fn frames_dropped(&self) -> u64 {
        self.frames_dropped_total.values().sum()
    }

    pub fn cells_dropped(&self) -> u64 {
        self.cells_dropped_total.values().sum()
    }

    /// Every frame seen was published or dropped with a reason, and every cell found was
    /// published or dropped with a reason.
    pub fn balanced(&self) -> bool {
        self.frames_seen_total == self.frames_published_total + self.frames_dropped()
            && self.cells_found_total == self.cells_published_total + self.cells_dropped()
    }
}

/// Latency summary of one stage, ms.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Shared counters and histograms.
pub struct Telemetry {
    counts: Mutex<Counts>,
    /// Per stage: HDR histogram (percentiles for the summary) and the exact bucket counts and
    /// sum `/metrics` serves.
    latency: Mutex<BTreeMap<Stage, (Histogram<u64>, PromHistogram)>>,
    gauges: Mutex<Gauges>,
    started: Instant,
}

/// Values that go up and down, set by the supervisor.
#[derive(Debug, Clone, Default)]
struct Gauges {
    queues: Vec<(&'static str, usize)>,
    model: Option<ModelId>,
    last_frame: Option<Instant>,
    /// Classified cells and their label-free accuracy estimate, as the publisher last saw.
    estimate: Option<(u64, f64)>,
    /// Tracks alive now (cells in view, or missed for fewer frames than the limit).
    tracks_active: usize,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        Self {
            counts: Mutex::new(Counts {
                source_up: true,
                ..Counts::default()
            }),
            latency: Mutex::new(BTreeMap::new()),
            gauges: Mutex::new(Gauges::default()),
            started: Instant::now(),
        }
    }

    fn gauges(&self) -> std::sync::MutexGuard<'_, Gauges> {
        self.gauges.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frames waiting in each queue between stages.
    pub fn set_queue_depths(&self, queues: Vec<(&'static str, usize)>) {
        self.gauges().queues = queues;
    }

    /// The model that classifies from now on.
    pub fn set_model(&self, id: &ModelId) {
        self.gauges().model = Some(id.clone());
    }

    /// The sample's running label-free accuracy estimate (classified cells, mean confidence).
    pub fn set_estimate(&self, estimate: Option<(u64, f64)>) {
        self.gauges().estimate = estimate;
    }

    /// Tracks alive now, as the track stage last saw.
    pub fn set_tracks_active(&self, n: usize) {
        self.gauges().tracks_active = n;
    }

    pub fn tracks_active(&self) -> usize {
        self.gauges().tracks_active
    }

    pub fn estimate(&self) -> Option<(u64, f64)> {
        self.gauges().estimate
    }

    /// How long since the source delivered a frame (since start when none yet).
    pub fn stalled_for(&self) -> Duration {
        self.gauges().last_frame.unwrap_or(self.started).elapsed()
    }

    pub fn event(&self, e: Event) {
        // Taken before the counters, so no thread ever holds both locks.
        if matches!(e, Event::FrameSeen) {
            self.gauges().last_frame = Some(Instant::now());
        }
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            Event::FrameSeen => c.frames_seen_total += 1,
            Event::FramesDropped { reason, n } => {
                *c.frames_dropped_total.entry(reason).or_default() += n
            }
            Event::FramePublished => c.frames_published_total += 1,
            Event::CellsFound { n } => c.cells_found_total += n,
            Event::CandidatesRejected { n } => c.candidates_rejected_total += n,
            Event::VerifierFailed => c.verifier_errors_total += 1,
            Event::CellsPublished { n } => c.cells_published_total += n,
            Event::CellsDropped { reason, n } => {
                *c.cells_dropped_total.entry(reason).or_default() += n
            }
            Event::CellsClassified { class, n } => {
                *c.cells_classified_total.entry(class).or_default() += n
            }
            Event::SubscriberJoined => c.subscribers_joined_total += 1,
            Event::SourceLost { .. } => {
                c.source_disconnects_total += 1;
                c.source_up = false;
            }
            Event::Reloaded => c.reloads_total += 1,
            Event::ReloadFailed => c.reload_failures_total += 1,
            Event::SourceBack => {
                c.source_reconnects_total += 1;
                c.source_up = true;
            }
            Event::SubscriberDropped { reason } => {
                *c.subscribers_dropped_total.entry(reason).or_default() += 1
            }
            Event::SinkWriteFailed { sink } => {
                *c.sink_write_errors_total.entry(sink).or_default() += 1
            }
            Event::SinkRecordsLost { sink, n } => {
                *c.sink_records_lost_total.entry(sink).or_default() += n
            }
            Event::DriftSuspected => {
                c.drift_warnings_total += 1;
                c.drift_suspected = true;
            }
            Event::DriftCleared => c.drift_suspected = false,
            Event::TracksStarted { n } => c.tracks_started_total += n,
            Event::TracksEnded { n } => c.tracks_ended_total += n,
            Event::ClassificationsSkipped { n } => c.classifications_skipped_total += n,
            Event::FieldChanged => c.field_changes_total += 1,
            Event::MqttDelivered { n } => c.mqtt_messages_delivered_total += n,
            Event::MqttDropped { reason, n } => {
                *c.mqtt_messages_dropped_total.entry(reason).or_default() += n
            }
            Event::MqttConnected => c.mqtt_connected = true,
            Event::MqttDisconnected => {
                c.mqtt_disconnects_total += 1;
                c.mqtt_connected = false;
            }
            Event::ScaleSuspect {
                suggested_um_per_px,
            } => {
                c.scale_warnings_total += 1;
                c.suggested_um_per_px = suggested_um_per_px;
            }
        }
    }

    pub fn counts(&self) -> Counts {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Record one latency sample for a stage.
    pub fn latency(&self, stage: Stage, ms: f32) {
        let us = (ms.max(0.0) * 1000.0) as u64;
        let mut l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let (h, p) = match l.entry(stage) {
            Entry::Occupied(o) => o.into_mut(),
            // 1 µs to 1 hour at 3 significant digits.
            Entry::Vacant(v) => match Histogram::new_with_bounds(1, 3_600_000_000, 3) {
                Ok(h) => v.insert((h, PromHistogram::new(BUCKETS_S))),
                Err(_) => return,
            },
        };
        h.saturating_record(us.max(1));
        p.observe(f64::from(ms.max(0.0)) / 1e3);
    }

    /// p50/p99/max per stage that has samples.
    pub fn latencies(&self) -> BTreeMap<&'static str, Latency> {
        let l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        l.iter()
            .map(|(s, (h, _))| {
                (
                    s.name(),
                    Latency {
                        count: h.len(),
                        p50_ms: h.value_at_quantile(0.5) as f64 / 1e3,
                        p99_ms: h.value_at_quantile(0.99) as f64 / 1e3,
                        max_ms: h.max() as f64 / 1e3,
                    },
                )
            })
            .collect()
    }

    /// Its counters and histograms, for `render`.
    fn snapshot(&self) -> (Counts, Gauges, Vec<StageLatency>) {
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(s, (h, p))| (*s, h.clone(), p.clone()))
            .collect();
        (self.counts(), self.gauges().clone(), latency)
    }
}

/// Upper bounds of the latency histogram buckets on `/metrics`, seconds.
const BUCKETS_S: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A counter with one value per pipeline: name (without `_total`), help, value.
type PlainCounter = (&'static str, &'static str, fn(&Counts) -> u64);

const COUNTERS: [PlainCounter; 19] = [
    ("frames_seen", "Frames the source delivered.", |c| {
        c.frames_seen_total
    }),
    (
        "frames_published",
        "Frames whose records were published.",
        |c| c.frames_published_total,
    ),
    ("cells_found", "Heads found (after verification).", |c| {
        c.cells_found_total
    }),
    (
        "candidates_rejected",
        "Head candidates the verifier rejected.",
        |c| c.candidates_rejected_total,
    ),
    ("cells_published", "Cell records published.", |c| {
        c.cells_published_total
    }),
    (
        "subscribers_joined",
        "Record subscribers that connected.",
        |c| c.subscribers_joined_total,
    ),
    (
        "source_disconnects",
        "Times the live source lost its device.",
        |c| c.source_disconnects_total,
    ),
    (
        "source_reconnects",
        "Times the live source got its device back.",
        |c| c.source_reconnects_total,
    ),
    ("reloads", "Reloads that swapped the model in.", |c| {
        c.reloads_total
    }),
    (
        "reload_failures",
        "Reloads refused (bad config or model).",
        |c| c.reload_failures_total,
    ),
    (
        "verifier_errors",
        "Frames whose candidates could not be verified.",
        |c| c.verifier_errors_total,
    ),
    (
        "drift_warnings",
        "Times the running accuracy estimate fell below the reference.",
        |c| c.drift_warnings_total,
    ),
    (
        "tracks_started",
        "Physical cells first seen (tracks started).",
        |c| c.tracks_started_total,
    ),
    ("tracks_ended", "Tracks ended; one cell record each.", |c| {
        c.tracks_ended_total
    }),
    (
        "classifications_skipped",
        "Detections not classified: their cell had enough classified frames.",
        |c| c.classifications_skipped_total,
    ),
    (
        "field_changes",
        "Times the field changed and every track ended.",
        |c| c.field_changes_total,
    ),
    (
        "mqtt_messages_delivered",
        "MQTT messages the broker acknowledged.",
        |c| c.mqtt_messages_delivered_total,
    ),
    (
        "mqtt_disconnects",
        "Times the MQTT connection dropped.",
        |c| c.mqtt_disconnects_total,
    ),
    (
        "scale_warnings",
        "Times the head sizes disagreed with source.um_per_px.",
        |c| c.scale_warnings_total,
    ),
];

/// A counter with a label per entry: name (without `_total`), help, label, values.
type LabelledCounter = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Counts) -> Vec<(String, u64)>,
);

fn by<K: serde::Serialize>(m: &BTreeMap<K, u64>) -> Vec<(String, u64)> {
    m.iter()
        .map(|(k, v)| {
            let k = serde_json::to_value(k)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            (k, *v)
        })
        .collect()
}

const LABELLED: [LabelledCounter; 7] = [
    (
        "frames_dropped",
        "Frames dropped, by reason.",
        "reason",
        |c| by(&c.frames_dropped_total),
    ),
    (
        "cells_dropped",
        "Cells dropped, by reason.",
        "reason",
        |c| by(&c.cells_dropped_total),
    ),
    (
        "cells_classified",
        "Cells classified, by class.",
        "class",
        |c| by(&c.cells_classified_total),
    ),
    (
        "subscribers_dropped",
        "Record subscribers dropped, by reason.",
        "reason",
        |c| by(&c.subscribers_dropped_total),
    ),
    (
        "sink_write_errors",
        "Failed record writes, by sink.",
        "sink",
        |c| by(&c.sink_write_errors_total),
    ),
    (
        "sink_records_lost",
        "Records a sink could not write and gave up, by sink.",
        "sink",
        |c| by(&c.sink_records_lost_total),
    ),
    (
        "mqtt_messages_dropped",
        "MQTT messages given up, by reason.",
        "reason",
        |c| by(&c.mqtt_messages_dropped_total),
    ),
];

/// One pipeline's telemetry at the moment of a scrape.
#[derive(Debug)]
struct Part {
    sample: String,
    counts: Counts,
    gauges: Gauges,
    latency: Vec<StageLatency>,
}

/// One stage's latency: HDR histogram and the exact one.
type StageLatency = (Stage, Histogram<u64>, PromHistogram);

/// Every pipeline's counters, gauges and exact latency histograms, encoded on a scrape.
#[derive(Debug)]
struct Exposition(Vec<Part>);

impl Exposition {
    fn counters(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        for (name, help, f) in COUNTERS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &self.0 {
                let labels = [("sample", p.sample.as_str())];
                ConstCounter::new(f(&p.counts)).encode(m.encode_family(&labels)?)?;
            }
        }
        for (name, help, label, f) in LABELLED {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for p in &self.0 {
                for (k, v) in f(&p.counts) {
                    let labels = [("sample", p.sample.as_str()), (label, k.as_str())];
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }

    fn gauges(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        type Flag = (&'static str, &'static str, fn(&Counts) -> bool);
        const FLAGS: [Flag; 3] = [
            ("source_up", "Whether the source has its device.", |c| {
                c.source_up
            }),
            (
                "drift_suspected",
                "Whether the running accuracy estimate is below the reference now.",
                |c| c.drift_suspected,
            ),
            (
                "mqtt_connected",
                "Whether the MQTT sink is connected.",
                |c| c.mqtt_connected,
            ),
        ];
        for (name, help, f) in FLAGS {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for p in &self.0 {
                let labels = [("sample", p.sample.as_str())];
                ConstGauge::new(i64::from(f(&p.counts))).encode(m.encode_family(&labels)?)?;
            }
        }
        let help = "Tracks alive now (cells in view, or missed for fewer frames than the limit).";
        let mut m = enc.encode_descriptor("tracks_active", help, None, MetricType::Gauge)?;
        for p in &self.0 {
            let labels = [("sample", p.sample.as_str())];
            ConstGauge::new(p.gauges.tracks_active as i64).encode(m.encode_family(&labels)?)?;
        }
        let help = "Frames waiting before each stage.";
        let mut m = enc.encode_descriptor("queue_depth", help, None, MetricType::Gauge)?;
        for p in &self.0 {
            for (q, n) in &p.gauges.queues {
                let labels = [("sample", p.sample.as_str()), ("stage", *q)];
                ConstGauge::new(*n as i64).encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = enc.encode_descriptor(
            "model_info",
            "The model classifying cells.",
            None,
            MetricType::Gauge,
        )?;
        for p in &self.0 {
            if let Some(id) = &p.gauges.model {
                let labels = [
                    ("sample", p.sample.as_str()),
                    ("name", id.name.as_str()),
                    ("sha256", id.sha256.as_str()),
                ];
                ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
            }
        }
        let help = "The frame scale the heads' sizes suggest, um/px, after a scale warning.";
        let mut m = enc.encode_descriptor("suggested_um_per_px", help, None, MetricType::Gauge)?;
        for p in &self.0 {
            if let Some(s) = p.counts.suggested_um_per_px {
                let labels = [("sample", p.sample.as_str())];
                ConstGauge::new(f64::from(s)).encode(m.encode_family(&labels)?)?;
            }
        }
        let help =
            "Label-free accuracy estimate: the classified detections' mean calibrated confidence.";
        let mut m = enc.encode_descriptor("estimated_accuracy", help, None, MetricType::Gauge)?;
        for p in &self.0 {
            if let Some((_, e)) = p.gauges.estimate {
                let labels = [("sample", p.sample.as_str())];
                ConstGauge::new(e).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }

    fn histograms(&self, enc: &mut DescriptorEncoder) -> std::fmt::Result {
        let help = "Time each stage spent per frame.";
        let unit = Unit::Seconds;
        let mut m =
            enc.encode_descriptor("stage_latency", help, Some(&unit), MetricType::Histogram)?;
        for p in &self.0 {
            for (stage, _, h) in &p.latency {
                let labels = [("sample", p.sample.as_str()), ("stage", stage.name())];
                h.encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        self.counters(&mut enc)?;
        self.gauges(&mut enc)?;
        self.histograms(&mut enc)
    }
}

/// Every pipeline's telemetry in the Prometheus text exposition format (0.0.4), one `sample`
/// label per pipeline (several microscopes share one endpoint).
pub fn render(parts: &[(String, std::sync::Arc<Telemetry>)]) -> String {
    let snapshot = parts
        .iter()
        .map(|(sample, t)| {
            let (counts, gauges, latency) = t.snapshot();
            Part {
                sample: sample.clone(),
                counts,
                gauges,
                latency,
            }
        })
        .collect();
    let mut registry = Registry::with_prefix("spermscope");
    registry.register_collector(Box::new(Exposition(snapshot)));
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut s, &registry);
    s
}

/// The content type of `render`'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_balance_only_when_everything_is_accounted_for() {
        let t = Telemetry::new();
        for _ in 0..3 {
            t.event(Event::FrameSeen);
        }
        t.event(Event::FramePublished);
        t.event(Event::FramesDropped {
            reason: FrameDropReason::Undecodable,
            n: 1,
        });
        assert!(!t.counts().balanced());
        t.event(Event::FramesDropped {
            reason: FrameDropReason::QueueFull,
            n: 1,
        });
        t.event(Event::CellsFound { n: 5 });
        t.event(Event::CellsPublished { n: 4 });
        assert!(!t.counts().balanced());
        t.event(Event::CellsDropped {
            reason: CellDropReason::InferenceError,
            n: 1,
        });
        assert!(t.counts().balanced());
        for ms in [1.0, 2.0, 3.0, 100.0] {
            t.latency(Stage::Segment, ms);
        }
        let l = t.latencies()["segment"];
        assert_eq!(l.count, 4);
        assert!((l.p50_ms - 2.0).abs() < 0.01, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 0.2, "{l:?}");
    }

    #[test]
    fn exposition_has_exact_sums_and_escaped_labels() {
        let t = std::sync::Arc::new(Telemetry::new());
        for ms in [1.0, 2.0, 3.0, 400.0] {
            t.latency(Stage::Segment, ms);
        }
        t.event(Event::FrameSeen);
        t.event(Event::FramesDropped {
            reason: FrameDropReason::Undecodable,
            n: 2,
        });
        let text = render(&[("a\"b".to_string(), t)]);
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .to_string()
        };
        assert_eq!(
            line("spermscope_frames_seen_total"),
            "spermscope_frames_seen_total{sample=\"a\\\"b\"} 1"
        );
        assert!(line("spermscope_frames_dropped_total").ends_with("reason=\"undecodable\"} 2"));
        let sum: f64 = line("spermscope_stage_latency_seconds_sum")
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 0.406).abs() < 1e-9, "{sum}");
        assert!(line("spermscope_stage_latency_seconds_bucket{sample=\"a\\\"b\",stage=\"segment\",le=\"0.005\"}").ends_with(" 3"));
        assert!(text.contains("# TYPE spermscope_frames_dropped_total counter"));
    }
}
