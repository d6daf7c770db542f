//! Typed pipeline events, the counters they feed (`*_total`) and per-stage latency
//! histograms. Stages report events; only this module turns them into numbers.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::Mutex;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

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
    /// The sample's running label-free accuracy estimate fell more than the margin below the
    /// model card's accuracy.
    DriftSuspected,
    /// It came back within the margin.
    DriftCleared,
}

/// Pipeline stages with a latency histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Decode,
    Segment,
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
            Stage::Pose => "pose",
            Stage::Classify => "classify",
            Stage::Publish => "publish",
            Stage::EndToEnd => "end_to_end",
        }
    }
}

/// Counter values at one moment; the accounting identities are checked on it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
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
    /// Times drift was suspected (the running estimate fell below the reference).
    pub drift_warnings_total: u64,
    /// Whether drift is suspected now.
    pub drift_suspected: bool,
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
    latency: Mutex<BTreeMap<Stage, Histogram<u64>>>,
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
            Event::DriftSuspected => {
                c.drift_warnings_total += 1;
                c.drift_suspected = true;
            }
            Event::DriftCleared => c.drift_suspected = false,
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
        let h = match l.entry(stage) {
            Entry::Occupied(o) => o.into_mut(),
            // 1 µs to 1 hour at 3 significant digits.
            Entry::Vacant(v) => match Histogram::new_with_bounds(1, 3_600_000_000, 3) {
                Ok(h) => v.insert(h),
                Err(_) => return,
            },
        };
        h.saturating_record(us.max(1));
    }

    /// p50/p99/max per stage that has samples.
    pub fn latencies(&self) -> BTreeMap<&'static str, Latency> {
        let l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        l.iter()
            .map(|(s, h)| {
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
    fn snapshot(&self) -> (Counts, Gauges, BTreeMap<Stage, Histogram<u64>>) {
        let latency = self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        (self.counts(), self.gauges().clone(), latency)
    }
}

/// One pipeline's telemetry at a moment: sample id (escaped), counters, gauges, histograms.
type Snapshot = (String, Counts, Gauges, BTreeMap<Stage, Histogram<u64>>);

/// Every pipeline's counters in the Prometheus text exposition format, one `sample` label
/// per pipeline (several microscopes share one endpoint).
pub fn render(parts: &[(String, std::sync::Arc<Telemetry>)]) -> String {
    let snaps: Vec<Snapshot> = parts
        .iter()
        .map(|(sample, t)| {
            let (c, g, l) = t.snapshot();
            (escape(sample), c, g, l)
        })
        .collect();
    let mut s = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(s, "# HELP spermscope_{name} {help}");
        let _ = writeln!(s, "# TYPE spermscope_{name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(s, "spermscope_{name}{{{labels}}} {v}");
        }
    };
    let plain = |f: &dyn Fn(&Counts) -> u64| -> Vec<(String, String)> {
        snaps
            .iter()
            .map(|(sample, c, _, _)| (format!("sample=\"{sample}\""), f(c).to_string()))
            .collect()
    };
    fn by<K: serde::Serialize>(
        snaps: &[Snapshot],
        label: &str,
        f: &dyn Fn(&Counts) -> &BTreeMap<K, u64>,
    ) -> Vec<(String, String)> {
        let mut rows = Vec::new();
        for (sample, c, _, _) in snaps {
            for (k, v) in f(c) {
                let k = serde_json::to_value(k)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                rows.push((
                    format!("sample=\"{sample}\",{label}=\"{}\"", escape(&k)),
                    v.to_string(),
                ));
            }
        }
        rows
    }
    /// Counters with one value per pipeline: name, help, value.
    type Plain = (&'static str, &'static str, fn(&Counts) -> u64);
    const PLAIN: [Plain; 14] = [
        ("frames_seen_total", "Frames the source delivered.", |c| {
            c.frames_seen_total
        }),
        (
            "frames_published_total",
            "Frames whose records were published.",
            |c| c.frames_published_total,
        ),
        (
            "cells_found_total",
            "Heads found (after verification).",
            |c| c.cells_found_total,
        ),
        (
            "candidates_rejected_total",
            "Head candidates the verifier rejected.",
            |c| c.candidates_rejected_total,
        ),
        ("cells_published_total", "Cell records published.", |c| {
            c.cells_published_total
        }),
        (
            "subscribers_joined_total",
            "Record subscribers that connected.",
            |c| c.subscribers_joined_total,
        ),
        (
            "source_disconnects_total",
            "Times the live source lost its device.",
            |c| c.source_disconnects_total,
        ),
        (
            "source_reconnects_total",
            "Times the live source got its device back.",
            |c| c.source_reconnects_total,
        ),
        ("reloads_total", "Reloads that swapped the model in.", |c| {
            c.reloads_total
        }),
        (
            "reload_failures_total",
            "Reloads refused (bad config or model).",
            |c| c.reload_failures_total,
        ),
        (
            "verifier_errors_total",
            "Frames whose candidates could not be verified.",
            |c| c.verifier_errors_total,
        ),
        ("source_up", "Whether the source has its device.", |c| {
            u64::from(c.source_up)
        }),
        (
            "drift_warnings_total",
            "Times the running accuracy estimate fell below the reference.",
            |c| c.drift_warnings_total,
        ),
        (
            "drift_suspected",
            "Whether the running accuracy estimate is below the reference now.",
            |c| u64::from(c.drift_suspected),
        ),
    ];
    for (name, help, f) in PLAIN {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        family(name, kind, help, plain(&f));
    }
    let labelled = [
        (
            "frames_dropped_total",
            "Frames dropped, by reason.",
            by(&snaps, "reason", &|c| &c.frames_dropped_total),
        ),
        (
            "cells_dropped_total",
            "Cells dropped, by reason.",
            by(&snaps, "reason", &|c| &c.cells_dropped_total),
        ),
        (
            "cells_classified_total",
            "Cells classified, by class.",
            by(&snaps, "class", &|c| &c.cells_classified_total),
        ),
        (
            "subscribers_dropped_total",
            "Record subscribers dropped, by reason.",
            by(&snaps, "reason", &|c| &c.subscribers_dropped_total),
        ),
        (
            "sink_write_errors_total",
            "Failed record writes, by sink.",
            by(&snaps, "sink", &|c| &c.sink_write_errors_total),
        ),
    ];
    for (name, help, rows) in labelled {
        family(name, "counter", help, rows);
    }
    let mut queues = Vec::new();
    let mut models = Vec::new();
    let mut estimates = Vec::new();
    for (sample, _, g, _) in &snaps {
        if let Some((_, e)) = g.estimate {
            estimates.push((format!("sample=\"{sample}\""), format!("{e:.4}")));
        }
        for (q, n) in &g.queues {
            queues.push((format!("sample=\"{sample}\",stage=\"{q}\""), n.to_string()));
        }
        if let Some(id) = &g.model {
            models.push((
                format!(
                    "sample=\"{sample}\",name=\"{}\",sha256=\"{}\"",
                    escape(&id.name),
                    escape(&id.sha256)
                ),
                "1".to_string(),
            ));
        }
    }
    family(
        "queue_depth",
        "gauge",
        "Frames waiting before each stage.",
        queues,
    );
    family(
        "model_info",
        "gauge",
        "The model classifying cells.",
        models,
    );
    family(
        "estimated_accuracy",
        "gauge",
        "Label-free accuracy estimate: the classified cells' mean calibrated confidence.",
        estimates,
    );
    const BUCKETS_MS: [f64; 12] = [
        1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
    ];
    let mut rows = Vec::new();
    for (sample, _, _, l) in &snaps {
        for (stage, h) in l {
            let st = format!("sample=\"{sample}\",stage=\"{}\"", stage.name());
            for b in BUCKETS_MS {
                rows.push((
                    format!("{st},le=\"{}\"", b / 1000.0),
                    h.count_between(0, (b * 1000.0) as u64).to_string(),
                ));
            }
            rows.push((format!("{st},le=\"+Inf\""), h.len().to_string()));
        }
    }
    let _ = writeln!(
        s,
        "# HELP spermscope_stage_latency_seconds Time each stage spent per frame."
    );
    let _ = writeln!(s, "# TYPE spermscope_stage_latency_seconds histogram");
    for (labels, v) in rows {
        let _ = writeln!(s, "spermscope_stage_latency_seconds_bucket{{{labels}}} {v}");
    }
    for (sample, _, _, l) in &snaps {
        for (stage, h) in l {
            let st = format!("sample=\"{sample}\",stage=\"{}\"", stage.name());
            let _ = writeln!(
                s,
                "spermscope_stage_latency_seconds_sum{{{st}}} {}",
                h.mean() * h.len() as f64 / 1e6
            );
            let _ = writeln!(
                s,
                "spermscope_stage_latency_seconds_count{{{st}}} {}",
                h.len()
            );
        }
    }
    s
}

/// Escape a Prometheus label value.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

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
}
