//! Typed pipeline events, the counters they feed (`*_total`) and per-stage latency
//! histograms. Stages report events; only this module turns them into numbers.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::Mutex;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

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
    pub const ALL: [Stage; 6] = [
        Stage::Decode,
        Stage::Segment,
        Stage::Pose,
        Stage::Classify,
        Stage::Publish,
        Stage::EndToEnd,
    ];

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
    model: Option<(String, String)>,
    last_frame: Option<Instant>,
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
    pub fn set_model(&self, name: &str, sha256: &str) {
        self.gauges().model = Some((name.to_string(), sha256.to_string()));
    }

    /// How long since the source delivered a frame (since start when none yet).
    pub fn stalled_for(&self) -> Option<Duration> {
        let last = self.gauges().last_frame.unwrap_or(self.started);
        Some(last.elapsed())
    }

    /// Everything in the Prometheus text exposition format.
    pub fn prometheus(&self) -> String {
        let c = self.counts();
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, rows: Vec<(String, u64)>| {
            let _ = writeln!(s, "# HELP spermscope_{name} {help}");
            let _ = writeln!(s, "# TYPE spermscope_{name} counter");
            for (labels, v) in rows {
                let _ = writeln!(s, "spermscope_{name}{labels} {v}");
            }
        };
        let plain = |v: u64| vec![(String::new(), v)];
        fn by<K: serde::Serialize>(label: &str, m: &BTreeMap<K, u64>) -> Vec<(String, u64)> {
            m.iter()
                .map(|(k, v)| {
                    let k = serde_json::to_value(k)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default();
                    (format!("{{{label}=\"{}\"}}", escape(&k)), *v)
                })
                .collect()
        }
        counter(
            "frames_seen_total",
            "Frames the source delivered.",
            plain(c.frames_seen_total),
        );
        counter(
            "frames_published_total",
            "Frames whose records were published.",
            plain(c.frames_published_total),
        );
        counter(
            "frames_dropped_total",
            "Frames dropped, by reason.",
            by("reason", &c.frames_dropped_total),
        );
        counter(
            "cells_found_total",
            "Heads found (after verification).",
            plain(c.cells_found_total),
        );
        counter(
            "candidates_rejected_total",
            "Head candidates the verifier rejected.",
            plain(c.candidates_rejected_total),
        );
        counter(
            "cells_published_total",
            "Cell records published.",
            plain(c.cells_published_total),
        );
        counter(
            "cells_dropped_total",
            "Cells dropped, by reason.",
            by("reason", &c.cells_dropped_total),
        );
        counter(
            "cells_classified_total",
            "Cells classified, by class.",
            by("class", &c.cells_classified_total),
        );
        counter(
            "subscribers_joined_total",
            "Record subscribers that connected.",
            plain(c.subscribers_joined_total),
        );
        counter(
            "subscribers_dropped_total",
            "Record subscribers dropped, by reason.",
            by("reason", &c.subscribers_dropped_total),
        );
        counter(
            "source_disconnects_total",
            "Times the live source lost its device.",
            plain(c.source_disconnects_total),
        );
        counter(
            "source_reconnects_total",
            "Times the live source got its device back.",
            plain(c.source_reconnects_total),
        );
        counter(
            "reloads_total",
            "Reloads that swapped the model in.",
            plain(c.reloads_total),
        );
        counter(
            "reload_failures_total",
            "Reloads refused (bad config or model).",
            plain(c.reload_failures_total),
        );
        counter(
            "verifier_errors_total",
            "Frames whose candidates could not be verified.",
            plain(c.verifier_errors_total),
        );
        counter(
            "sink_write_errors_total",
            "Failed record writes, by sink.",
            by("sink", &c.sink_write_errors_total),
        );
        let g = self.gauges().clone();
        let _ = writeln!(
            s,
            "# HELP spermscope_source_up Whether the source has its device."
        );
        let _ = writeln!(s, "# TYPE spermscope_source_up gauge");
        let _ = writeln!(s, "spermscope_source_up {}", u8::from(c.source_up));
        let _ = writeln!(
            s,
            "# HELP spermscope_queue_depth Frames waiting before each stage."
        );
        let _ = writeln!(s, "# TYPE spermscope_queue_depth gauge");
        for (q, n) in &g.queues {
            let _ = writeln!(s, "spermscope_queue_depth{{stage=\"{q}\"}} {n}");
        }
        if let Some((name, sha)) = &g.model {
            let _ = writeln!(
                s,
                "# HELP spermscope_model_info The model classifying cells."
            );
            let _ = writeln!(s, "# TYPE spermscope_model_info gauge");
            let _ = writeln!(
                s,
                "spermscope_model_info{{name=\"{}\",sha256=\"{}\"}} 1",
                escape(name),
                escape(sha)
            );
        }
        const BUCKETS_MS: [f64; 12] = [
            1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
        ];
        let _ = writeln!(
            s,
            "# HELP spermscope_stage_latency_seconds Time each stage spent per frame."
        );
        let _ = writeln!(s, "# TYPE spermscope_stage_latency_seconds histogram");
        let l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        for (stage, h) in l.iter() {
            let name = stage.name();
            for b in BUCKETS_MS {
                let n = h.count_between(0, (b * 1000.0) as u64);
                let _ = writeln!(
                    s,
                    "spermscope_stage_latency_seconds_bucket{{stage=\"{name}\",le=\"{}\"}} {n}",
                    b / 1000.0
                );
            }
            let _ = writeln!(
                s,
                "spermscope_stage_latency_seconds_bucket{{stage=\"{name}\",le=\"+Inf\"}} {}",
                h.len()
            );
            let _ = writeln!(
                s,
                "spermscope_stage_latency_seconds_sum{{stage=\"{name}\"}} {}",
                h.mean() * h.len() as f64 / 1e6
            );
            let _ = writeln!(
                s,
                "spermscope_stage_latency_seconds_count{{stage=\"{name}\"}} {}",
                h.len()
            );
        }
        s
    }

    pub fn event(&self, e: Event) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            Event::FrameSeen => {
                c.frames_seen_total += 1;
                self.gauges().last_frame = Some(Instant::now());
            }
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
