//! Typed pipeline events, the counters they feed (`*_total`) and per-stage latency
//! histograms. Stages report events; only this module turns them into numbers.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::Mutex;

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
    FramesDropped { reason: FrameDropReason, n: u64 },
    FramePublished,
    CellsFound { n: u64 },
    CellsPublished { n: u64 },
    CellsDropped { reason: CellDropReason, n: u64 },
    CellsClassified { class: String, n: u64 },
    SubscriberJoined,
    SubscriberDropped { reason: SubscriberDropReason },
    SinkWriteFailed { sink: &'static str },
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
    pub cells_published_total: u64,
    pub cells_dropped_total: BTreeMap<CellDropReason, u64>,
    pub cells_classified_total: BTreeMap<String, u64>,
    pub subscribers_joined_total: u64,
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
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        Self {
            counts: Mutex::new(Counts::default()),
            latency: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn event(&self, e: Event) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            Event::FrameSeen => c.frames_seen_total += 1,
            Event::FramesDropped { reason, n } => {
                *c.frames_dropped_total.entry(reason).or_default() += n
            }
            Event::FramePublished => c.frames_published_total += 1,
            Event::CellsFound { n } => c.cells_found_total += n,
            Event::CellsPublished { n } => c.cells_published_total += n,
            Event::CellsDropped { reason, n } => {
                *c.cells_dropped_total.entry(reason).or_default() += n
            }
            Event::CellsClassified { class, n } => {
                *c.cells_classified_total.entry(class).or_default() += n
            }
            Event::SubscriberJoined => c.subscribers_joined_total += 1,
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
