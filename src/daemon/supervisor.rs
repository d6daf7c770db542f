//! The supervisor's judgement, kept apart from the threads it watches so it can be tested with a
//! fake clock and a fake service manager: watchdog pings, the stop notice, status lines (frames/s,
//! cells, drops, the running label-free estimate, drift, a lost source), and reloads (a new
//! configuration checked, the model loaded through the start-up path, or refused).

use std::time::{Duration, Instant};

use crate::daemon::classify::{Classifier, Classify};
use crate::daemon::config::{ConfigError, Settings};
use crate::daemon::report::{DriftChange, DriftWatch, ReportRules};
use crate::daemon::service::Notify;
use crate::daemon::telemetry::{Counts, Event, Telemetry};

/// Re-reads and resolves the configuration on a reload request.
pub type Reread = Box<dyn FnMut() -> Result<Settings, ConfigError> + Send>;

/// What a reload hands the pipeline: the new classifier and how its stage batches.
pub struct Swap {
    pub classifier: Box<dyn Classify>,
    pub max_batch: usize,
    pub batch_wait: Duration,
}

/// Watches one pipeline and speaks for it to the log and the service manager.
pub struct Supervisor {
    sample: String,
    started: Instant,
    interval: Duration,
    next_status: Instant,
    next_ping: Instant,
    stopping: bool,
    drift: DriftWatch,
    rules: ReportRules,
    notify: Option<Box<dyn Notify>>,
}

impl Supervisor {
    pub fn new(
        sample: &str,
        status_interval: Duration,
        rules: ReportRules,
        notify: Option<Box<dyn Notify>>,
        now: Instant,
    ) -> Self {
        Self {
            sample: sample.to_string(),
            started: now,
            interval: status_interval,
            next_status: now + status_interval,
            next_ping: now,
            stopping: false,
            drift: DriftWatch::default(),
            rules,
            notify,
        }
    }

    /// The pipeline is running: tell the service manager.
    pub fn ready(&mut self) {
        if let Some(n) = &mut self.notify {
            n.ready();
        }
    }

    /// Whether drift is suspected now.
    pub fn drifting(&self) -> bool {
        self.drift.drifting
    }

    /// One look at the pipeline at `now`: ping the watchdog when due, announce a stop once,
    /// and write the status line when due (returned, for tests).
    pub fn tick(&mut self, now: Instant, tel: &Telemetry, stop_requested: bool) -> Option<String> {
        if let Some(n) = &mut self.notify
            && let Some(every) = n.watchdog_every()
            && now >= self.next_ping
        {
            n.watchdog();
            self.next_ping = now + every;
        }
        if stop_requested && !self.stopping {
            self.stopping = true;
            tracing::info!("stop requested: draining the pipeline");
            if let Some(n) = &mut self.notify {
                n.stopping();
            }
        }
        if now < self.next_status {
            return None;
        }
        self.next_status += self.interval;
        let estimate = tel.estimate();
        self.watch_drift(estimate, tel);
        let secs = now.duration_since(self.started).as_secs_f64();
        let line = status_line(&tel.counts(), secs, estimate, self.drift.drifting);
        tracing::info!("status: {line}");
        if let Some(n) = &mut self.notify {
            n.status(&line);
        }
        Some(line)
    }

    /// Judge the running estimate against the model card's accuracy; warn when drift starts,
    /// note when it ends.
    fn watch_drift(&mut self, estimate: Option<(u64, f64)>, tel: &Telemetry) {
        let reference = self.rules.drift();
        match self
            .drift
            .observe(estimate, reference, self.rules.drift_min_cells)
        {
            Some(DriftChange::Started) => {
                tel.event(Event::DriftSuspected);
                if let (Some((cells, e)), Some(d)) = (estimate, reference) {
                    tracing::warn!(
                        sample = %self.sample,
                        cells,
                        "drift suspected: the label-free accuracy estimate {:.1}% is more than {:.1} points below the model card's {:.1}% (check staining, focus and magnification against the model's training data)",
                        100.0 * e,
                        100.0 * d.margin,
                        100.0 * d.reference
                    );
                }
            }
            Some(DriftChange::Ended) => {
                tel.event(Event::DriftCleared);
                tracing::info!(sample = %self.sample, "drift no longer suspected: the estimate is back within the margin");
            }
            None => {}
        }
    }

    /// Re-read the configuration and load the model it names through the start-up path. A
    /// bad configuration or model leaves the running one in place (`None`), with the reason
    /// in the log; keys that only a restart applies are named.
    pub fn reload(
        &mut self,
        reread: &mut Reread,
        current: &mut Settings,
        tel: &Telemetry,
    ) -> Option<Swap> {
        if let Some(n) = &mut self.notify {
            n.reloading();
        }
        let swap = self.reload_inner(reread, current, tel);
        if let Some(n) = &mut self.notify {
            n.ready();
        }
        swap
    }

    fn reload_inner(
        &mut self,
        reread: &mut Reread,
        current: &mut Settings,
        tel: &Telemetry,
    ) -> Option<Swap> {
        let new = match reread() {
            Ok(s) => s,
            Err(e) => {
                tel.event(Event::ReloadFailed);
                tracing::error!(error = %e, "reload refused: configuration is not valid; running on with the old one");
                return None;
            }
        };
        let ignored = current.restart_changes(&new);
        if !ignored.is_empty() {
            tracing::warn!(
                keys = %ignored.join(", "),
                "reload applies [classify] and the report's rules; these changes need a restart"
            );
        }
        let c = &new.reload.classify;
        match Classifier::load(c, new.reload.report.normal_class.as_deref(), &new.runtime()) {
            Ok(classifier) => {
                let id = classifier.id().id.clone();
                tel.set_model(&id);
                tel.event(Event::Reloaded);
                tracing::info!(model = %id.name, sha256 = %id.sha256, "reload: new model ready; it takes over between batches");
                let swap = Swap {
                    classifier: Box::new(classifier),
                    max_batch: c.max_batch,
                    batch_wait: Duration::from_millis(c.batch_wait_ms),
                };
                self.rules = new.reload.report.clone();
                current.reload = new.reload;
                Some(swap)
            }
            Err(e) => {
                tel.event(Event::ReloadFailed);
                tracing::error!(error = %e, "reload refused: model not usable; running on with the old one");
                None
            }
        }
    }
}

/// The status line: throughput, counts, drops, the running estimate and any trouble.
pub fn status_line(c: &Counts, secs: f64, estimate: Option<(u64, f64)>, drifting: bool) -> String {
    let mut line = format!(
        "{:.1} frames/s, {} frames, {} cells ({} detections), {} frames dropped",
        c.frames_published_total as f64 / secs.max(1e-9),
        c.frames_published_total,
        c.tracks_started_total,
        c.cells_published_total,
        c.frames_dropped(),
    );
    if let Some((n, e)) = estimate {
        line.push_str(&format!(
            ", estimated accuracy {:.1}% ({n} detections)",
            100.0 * e
        ));
    }
    if drifting {
        line.push_str(", DRIFT SUSPECTED");
    }
    if c.scale_warnings_total > 0 {
        match c.suggested_um_per_px {
            Some(s) => line.push_str(&format!(", SCALE SUSPECT (heads suggest {s:.4} um/px)")),
            None => line.push_str(", SCALE SUSPECT (no heads pass the size filter)"),
        }
    }
    if !c.source_up {
        line.push_str(", SOURCE DOWN (retrying)");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what the supervisor told the service manager.
    #[derive(Clone, Default)]
    struct Fake {
        said: Arc<Mutex<Vec<String>>>,
        watchdog: Option<Duration>,
    }

    impl Fake {
        fn push(&self, s: String) {
            self.said.lock().unwrap().push(s);
        }
        fn said(&self) -> Vec<String> {
            self.said.lock().unwrap().clone()
        }
    }

    impl Notify for Fake {
        fn ready(&mut self) {
            self.push("READY".into());
        }
        fn status(&mut self, line: &str) {
            self.push(format!("STATUS {line}"));
        }
        fn watchdog(&mut self) {
            self.push("WATCHDOG".into());
        }
        fn reloading(&mut self) {
            self.push("RELOADING".into());
        }
        fn stopping(&mut self) {
            self.push("STOPPING".into());
        }
        fn watchdog_every(&self) -> Option<Duration> {
            self.watchdog
        }
    }

    fn rules(reference: Option<f32>) -> ReportRules {
        ReportRules {
            normal_class: None,
            exclude_classes: Vec::new(),
            min_cells: 200,
            reference_accuracy: reference,
            drift_margin: 0.05,
            drift_min_cells: 10,
        }
    }

    #[test]
    fn watchdog_status_and_stop_follow_the_clock() {
        let fake = Fake {
            watchdog: Some(Duration::from_secs(5)),
            ..Fake::default()
        };
        let t0 = Instant::now();
        let mut s = Supervisor::new(
            "s1",
            Duration::from_secs(10),
            rules(None),
            Some(Box::new(fake.clone())),
            t0,
        );
        let tel = Telemetry::new();
        s.ready();
        assert_eq!(s.tick(t0, &tel, false), None);
        assert_eq!(s.tick(t0 + Duration::from_secs(1), &tel, false), None);
        assert_eq!(s.tick(t0 + Duration::from_secs(5), &tel, false), None);
        for _ in 0..20 {
            tel.event(Event::FrameSeen);
            tel.event(Event::FramePublished);
        }
        let line = s.tick(t0 + Duration::from_secs(10), &tel, true).unwrap();
        assert!(line.starts_with("2.0 frames/s, 20 frames"), "{line}");
        // The stop is announced once.
        s.tick(t0 + Duration::from_secs(11), &tel, true);
        let said = fake.said();
        assert_eq!(said[0], "READY");
        assert_eq!(said.iter().filter(|s| *s == "WATCHDOG").count(), 3);
        assert_eq!(said.iter().filter(|s| *s == "STOPPING").count(), 1);
        assert_eq!(said.iter().filter(|s| s.starts_with("STATUS")).count(), 1);
    }

    #[test]
    fn drift_is_flagged_on_the_status_line_and_counted() {
        let t0 = Instant::now();
        let mut s = Supervisor::new("s1", Duration::from_secs(1), rules(Some(0.9)), None, t0);
        let tel = Telemetry::new();
        tel.set_estimate(Some((50, 0.6)));
        let line = s.tick(t0 + Duration::from_secs(1), &tel, false).unwrap();
        assert!(line.contains("DRIFT SUSPECTED"), "{line}");
        assert!(s.drifting());
        assert_eq!(tel.counts().drift_warnings_total, 1);
        tel.set_estimate(Some((80, 0.88)));
        let line = s.tick(t0 + Duration::from_secs(2), &tel, false).unwrap();
        assert!(!line.contains("DRIFT"), "{line}");
        assert!(!tel.counts().drift_suspected);
        tel.event(Event::SourceLost {
            reason: "unplugged".into(),
        });
        let line = s.tick(t0 + Duration::from_secs(3), &tel, false).unwrap();
        assert!(line.ends_with("SOURCE DOWN (retrying)"), "{line}");
    }

    #[test]
    fn a_bad_reload_is_refused_and_announced() {
        let fake = Fake::default();
        let t0 = Instant::now();
        let mut s = Supervisor::new(
            "s1",
            Duration::from_secs(1),
            rules(None),
            Some(Box::new(fake.clone())),
            t0,
        );
        let tel = Telemetry::new();
        let raw = crate::daemon::config::RawConfig::parse(
            "[source.replay]\npath = \"f\"\n",
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let mut current = raw.resolve(None).unwrap();
        let mut reread: Reread = Box::new(|| {
            Err(crate::daemon::check::invalid(
                "classify.max_batch",
                "must lie in 1..=4096",
            ))
        });
        assert!(s.reload(&mut reread, &mut current, &tel).is_none());
        assert_eq!(tel.counts().reload_failures_total, 1);
        assert_eq!(fake.said(), vec!["RELOADING".to_string(), "READY".into()]);
    }
}
