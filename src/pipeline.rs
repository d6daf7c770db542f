//! The wiring: stage threads joined by bounded channels (source → segment → pose → classify →
//! publish), backpressure, accounting and shutdown. Stage logic lives in the stage modules;
//! this is the one place that knows how they connect.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};

use crate::classify::Classifier;
use crate::config::Settings;
use crate::frame::{Cell, Frame, StageTimes, Unclassified, Work};
use crate::model::{Model, ModelError, RuntimeOptions};
use crate::morphometry::{HeadSize, head_size};
use crate::preprocess::prepare_head;
use crate::publish::{Record, SinkError, Sinks};
use crate::report::{Drift, DriftChange, DriftWatch, Report, Seen, Tally};
use crate::segment::{SegmentSettings, Verifier, find_heads};
use crate::service::Notify;
use crate::source::{self, FrameSource, Pull, SourceError, SourceNote};
use crate::spec::ModelSpec;
use crate::telemetry::{CellDropReason, Counts, Event, FrameDropReason, Latency, Stage, Telemetry};

/// Why the pipeline cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model {model} is not suitable: {reason}")]
    Unsuitable { model: String, reason: String },
    #[error(transparent)]
    Sink(#[from] SinkError),
}

impl StartError {
    /// A problem with what the configuration names (exit 78), not with the host.
    pub fn is_config(&self) -> bool {
        !matches!(
            self,
            StartError::Sink(_) | StartError::Source(SourceError::Camera(_))
        )
    }
}

/// Why a running pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("a pipeline thread could not start: {0}")]
    Spawn(std::io::Error),
    #[error("pipeline stage {0} stopped unexpectedly")]
    StageFailed(&'static str),
}

/// Everything opened and loaded, ready to run.
pub struct Ready {
    settings: Settings,
    source: Box<dyn FrameSource>,
    classifier: Classifier,
    verifier: Option<Verifier>,
    spec: Arc<ModelSpec>,
    sinks: Sinks,
    telemetry: Arc<Telemetry>,
}

/// Load a model as the settings ask and check that the daemon can use it.
pub fn load_classifier(settings: &Settings) -> Result<(Classifier, Arc<ModelSpec>), StartError> {
    let mut model = Model::load(&settings.model_path, &runtime_options(settings))?;
    let unsuitable = |reason: String| StartError::Unsuitable {
        model: settings.model_path.display().to_string(),
        reason,
    };
    let spec = &model.spec;
    if let Some(n) = &settings.normal_class
        && !spec.classes.contains(n)
    {
        return Err(unsuitable(format!(
            "report.normal_class '{n}' is not one of its classes {:?}",
            spec.classes
        )));
    }
    if settings.normal_class.is_none() && spec.normal_class.is_none() {
        return Err(unsuitable(
            "it names no normal class; set report.normal_class".into(),
        ));
    }
    // The settings' overrides go into the model's own spec, so the classifier and the
    // stages read one set of numbers.
    if let Some(n) = &settings.normal_class {
        model.spec.normal_class = Some(n.clone());
    }
    if model.spec.crop.um_per_px.is_none() {
        model.spec.crop.um_per_px = settings.model_um_per_px;
    }
    let spec = Arc::new(model.spec.clone());
    Ok((Classifier::new(model, settings.uncertain_below), spec))
}

fn runtime_options(settings: &Settings) -> RuntimeOptions {
    RuntimeOptions {
        ort_dylib_path: settings.ort_dylib_path.clone(),
        provider: settings.provider,
        threads: settings.threads,
    }
}

/// Load the head verifier the settings ask for, if any.
pub fn load_verifier(settings: &Settings) -> Result<Option<Verifier>, StartError> {
    let Some((path, min_prob)) = &settings.verifier else {
        return Ok(None);
    };
    let model = Model::load(path, &runtime_options(settings))?;
    Verifier::new(model, *min_prob)
        .map(Some)
        .map_err(|reason| StartError::Unsuitable {
            model: path.display().to_string(),
            reason,
        })
}

/// Check what the settings name and open it all: model first (a bad model is refused before
/// any frame is read), then the source, then the sinks.
pub fn prepare(settings: Settings, telemetry: Arc<Telemetry>) -> Result<Ready, StartError> {
    let (classifier, spec) = load_classifier(&settings)?;
    let verifier = load_verifier(&settings)?;
    let source = source::open(&settings.source)?;
    let sinks = Sinks::open(
        settings.stdout,
        settings.records_file.as_ref(),
        settings.socket.as_ref(),
        settings.subscriber_queue,
        telemetry.clone(),
    )?;
    Ok(Ready {
        settings,
        source,
        classifier,
        verifier,
        spec,
        sinks,
        telemetry,
    })
}

impl Ready {
    pub fn describe(&self) -> String {
        let m = self.classifier.model();
        let verifier = match &self.verifier {
            Some(v) => format!("head verifier {}", v.model().spec.name),
            None => "no head verifier".into(),
        };
        format!(
            "{}; model {} ({}, {}), {verifier}, sample {}",
            self.source.describe(),
            m.spec.name,
            m.path.display(),
            m.provider,
            self.settings.sample_id
        )
    }

    pub fn socket_addr(&self) -> Option<String> {
        self.sinks.socket_addr()
    }
}

/// What a finished run leaves.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub report: Report,
    pub counts: Counts,
    pub latency: BTreeMap<&'static str, Latency>,
    pub elapsed_secs: f64,
    pub frames_per_sec: f64,
    pub cells_per_sec: f64,
    /// The run ended on a stop request rather than at the end of the source.
    pub stopped: bool,
}

fn spawn<T: Send + 'static>(
    name: &'static str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, RunError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(RunError::Spawn)
}

/// Re-reads and resolves the configuration on a reload request.
pub type Reread = Box<dyn FnMut() -> Result<Settings, String> + Send>;

/// How the outside world steers a run.
pub struct Control {
    /// Set: stop the source and drain.
    pub stop: Arc<AtomicBool>,
    /// Set: re-read the configuration and swap the model between batches.
    pub reload: Option<(Arc<AtomicBool>, Reread)>,
    /// The service manager to tell about readiness, status, watchdog and stopping.
    pub notify: Option<Box<dyn Notify>>,
}

impl Control {
    /// Only a stop flag (tests, replay without a service manager).
    pub fn stop_only(stop: Arc<AtomicBool>) -> Self {
        Self {
            stop,
            reload: None,
            notify: None,
        }
    }
}

/// Settings a reload cannot change (they need a restart), for a warning.
fn restart_only(s: &Settings) -> String {
    format!(
        "{:?}|{:?}|{:?}|{}|{:?}|{:?}|{:?}|{}|{:?}",
        s.source,
        s.segment,
        s.verifier,
        s.um_per_px,
        s.records_file,
        s.socket,
        s.metrics_addr,
        s.sample_id,
        s.queue_frames
    )
}

/// Load the model a re-read configuration names, through the start-up code path, and hand it
/// to the pose stage, which passes it on in order with the frames. A bad config or model
/// leaves the running one in place.
fn reload(
    reread: &mut Reread,
    current: &mut Settings,
    swaps: &Sender<(Classifier, Arc<ModelSpec>)>,
    tel: &Telemetry,
) {
    let new = match reread() {
        Ok(s) => s,
        Err(e) => {
            tel.event(Event::ReloadFailed);
            tracing::error!(error = %e, "reload refused: configuration is not valid; running on with the old one");
            return;
        }
    };
    if restart_only(&new) != restart_only(current) {
        tracing::warn!(
            "reload applies [classify] and the report's classes; other changes need a restart"
        );
    }
    match load_classifier(&new) {
        Ok((classifier, spec)) => {
            let id = classifier.id().id.clone();
            if swaps.send((classifier, spec)).is_ok() {
                tel.set_model(&id);
                tel.event(Event::Reloaded);
                tracing::info!(model = %id.name, sha256 = %id.sha256, "reload: new model ready; it takes over between batches");
                *current = new;
            }
        }
        Err(e) => {
            tel.event(Event::ReloadFailed);
            tracing::error!(error = %e, "reload refused: model not usable; running on with the old one");
        }
    }
}

/// Run until the source ends or `stop` is set; every stage drains before this returns.
pub fn run(ready: Ready, control: Control) -> Result<Outcome, RunError> {
    let Control {
        stop,
        reload: mut reloader,
        mut notify,
    } = control;
    let Ready {
        mut settings,
        source,
        classifier,
        verifier,
        spec,
        sinks,
        telemetry: tel,
    } = ready;
    let q = settings.queue_frames;
    let (to_segment, segment_in) = bounded::<Work>(q);
    let (to_pose, pose_in) = bounded::<Work>(q);
    let (to_classify, classify_in) = bounded::<ToClassify>(q);
    let (swap_tx, swap_rx) = crossbeam_channel::unbounded::<(Classifier, Arc<ModelSpec>)>();
    let (to_publish, publish_in) = bounded::<Work>(q);
    let started = Instant::now();

    let source_h = {
        let (tel, stop) = (tel.clone(), stop.clone());
        // A live source makes room by taking the oldest frame off its own queue.
        let oldest = (settings.live || source.live()).then(|| segment_in.clone());
        spawn("source", move || {
            source_stage(source, to_segment, oldest, &stop, &tel)
        })?
    };
    // Queue depths for /metrics (receivers do not keep a channel open).
    let depths = (
        segment_in.clone(),
        pose_in.clone(),
        classify_in.clone(),
        publish_in.clone(),
    );
    tel.set_model(&classifier.id().id);
    let segment_h = {
        let (tel, s, um) = (tel.clone(), settings.segment.clone(), settings.um_per_px);
        spawn("segment", move || {
            segment_stage(segment_in, to_pose, &s, verifier, um, &tel)
        })?
    };
    let pose_h = {
        let (tel, spec, um) = (tel.clone(), spec.clone(), settings.um_per_px);
        spawn("pose", move || {
            pose_stage(pose_in, to_classify, swap_rx, spec, um, &tel)
        })?
    };
    let classify_h = {
        let tel = tel.clone();
        let (max_batch, wait) = (
            settings.max_batch,
            Duration::from_millis(settings.batch_wait_ms),
        );
        spawn("classify", move || {
            classify_stage(classify_in, to_publish, classifier, max_batch, wait, &tel)
        })?
    };
    let publish_h = {
        let tel = tel.clone();
        let tally = Tally::new(&settings.sample_id);
        spawn("publish", move || {
            publish_stage(publish_in, sinks, tally, &tel)
        })?
    };

    // Supervise until the last stage has drained: status lines, watchdog pings, reloads.
    if let Some(n) = &mut notify {
        n.ready();
    }
    let interval = Duration::from_secs_f32(settings.status_interval_secs);
    let mut next_status = Instant::now() + interval;
    let watchdog = notify.as_ref().and_then(|n| n.watchdog_every());
    let mut next_ping = Instant::now();
    let mut stopping = false;
    let mut drift = DriftWatch::default();
    while !publish_h.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        tel.set_queue_depths(vec![
            ("segment", depths.0.len()),
            ("pose", depths.1.len()),
            ("classify", depths.2.len()),
            ("publish", depths.3.len()),
        ]);
        if let (Some(every), Some(n)) = (watchdog, &mut notify)
            && now >= next_ping
        {
            n.watchdog();
            next_ping = now + every;
        }
        if !stopping && stop.load(Ordering::SeqCst) {
            stopping = true;
            tracing::info!("stop requested: draining the pipeline");
            if let Some(n) = &mut notify {
                n.stopping();
            }
        }
        if let Some((flag, reread)) = &mut reloader
            && flag.swap(false, Ordering::SeqCst)
        {
            if let Some(n) = &mut notify {
                n.reloading();
            }
            reload(reread, &mut settings, &swap_tx, &tel);
            if let Some(n) = &mut notify {
                n.ready();
            }
        }
        if now >= next_status {
            next_status += interval;
            let estimate = tel.estimate();
            watch_drift(&mut drift, estimate, &settings, &tel);
            let c = tel.counts();
            let secs = started.elapsed().as_secs_f64();
            let line = format!(
                "{:.1} frames/s, {} frames, {} cells, {} frames dropped{}{}{}",
                c.frames_published_total as f64 / secs.max(1e-9),
                c.frames_published_total,
                c.cells_published_total,
                c.frames_dropped(),
                estimate.map_or(String::new(), |(n, e)| format!(
                    ", estimated accuracy {:.1}% ({n} cells)",
                    100.0 * e
                )),
                if drift.drifting {
                    ", DRIFT SUSPECTED"
                } else {
                    ""
                },
                if c.source_up {
                    ""
                } else {
                    ", SOURCE DOWN (retrying)"
                }
            );
            tracing::info!("status: {line}");
            if let Some(n) = &mut notify {
                n.status(&line);
            }
        }
    }
    drop(swap_tx);
    let join =
        |name: &'static str, h: JoinHandle<()>| h.join().map_err(|_| RunError::StageFailed(name));
    join("source", source_h)?;
    join("segment", segment_h)?;
    join("pose", pose_h)?;
    join("classify", classify_h)?;
    let tally = publish_h
        .join()
        .map_err(|_| RunError::StageFailed("publish"))?;
    let elapsed = started.elapsed().as_secs_f64();
    let counts = tel.counts();
    Ok(Outcome {
        report: tally.report(
            &settings.exclude_classes,
            settings.min_cells,
            drift_of(&settings),
        ),
        frames_per_sec: counts.frames_published_total as f64 / elapsed.max(1e-9),
        cells_per_sec: counts.cells_published_total as f64 / elapsed.max(1e-9),
        latency: tel.latencies(),
        counts,
        elapsed_secs: elapsed,
        stopped: stop.load(Ordering::SeqCst),
    })
}

/// The model card's accuracy and margin the estimate is judged against, when configured.
fn drift_of(settings: &Settings) -> Option<Drift> {
    settings.reference_accuracy.map(|reference| Drift {
        reference: f64::from(reference),
        margin: f64::from(settings.drift_margin),
    })
}

/// Judge the running estimate against the model card's accuracy; warn when drift starts,
/// note when it ends.
fn watch_drift(
    watch: &mut DriftWatch,
    estimate: Option<(u64, f64)>,
    settings: &Settings,
    tel: &Telemetry,
) {
    let reference = drift_of(settings);
    match watch.observe(estimate, reference, settings.drift_min_cells) {
        Some(DriftChange::Started) => {
            tel.event(Event::DriftSuspected);
            if let (Some((cells, e)), Some(d)) = (estimate, reference) {
                tracing::warn!(
                    sample = %settings.sample_id,
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
            tracing::info!(sample = %settings.sample_id, "drift no longer suspected: the estimate is back within the margin");
        }
        None => {}
    }
}

/// Count a frame (and its cells) that could not go on because the next stage is gone.
fn lost(tel: &Telemetry, w: &Work) {
    tel.event(Event::FramesDropped {
        reason: FrameDropReason::PipelineClosed,
        n: 1,
    });
    if !w.cells.is_empty() {
        tel.event(Event::CellsDropped {
            reason: CellDropReason::FrameDropped,
            n: w.cells.len() as u64,
        });
    }
}

fn source_stage(
    mut src: Box<dyn FrameSource>,
    tx: Sender<Work>,
    oldest: Option<Receiver<Work>>,
    stop: &AtomicBool,
    tel: &Telemetry,
) {
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let pulled = src.pull();
        let (name, image, decode_ms) = match pulled {
            Pull::End => break,
            Pull::Idle(note) => {
                match note {
                    Some(SourceNote::Disconnected(reason)) => {
                        tel.event(Event::SourceLost { reason })
                    }
                    Some(SourceNote::Reconnected) => tel.event(Event::SourceBack),
                    None => {}
                }
                continue;
            }
            Pull::Unreadable { name, reason } => {
                seq += 1;
                tel.event(Event::FrameSeen);
                tel.event(Event::FramesDropped {
                    reason: FrameDropReason::Undecodable,
                    n: 1,
                });
                tracing::warn!(frame = %name, %reason, "frame skipped: it cannot be decoded");
                continue;
            }
            Pull::Frame {
                name,
                image,
                decode_ms,
            } => (name, image, decode_ms),
        };
        seq += 1;
        tel.event(Event::FrameSeen);
        if decode_ms > 0.0 {
            tel.latency(Stage::Decode, decode_ms);
        }
        let work = Work {
            frame: Frame {
                seq,
                name,
                // The frame counts as captured when its decoding began.
                timestamp: SystemTime::now(),
                captured: Instant::now() - Duration::from_secs_f32(decode_ms / 1e3),
                image,
            },
            cells: Vec::new(),
            times: StageTimes {
                decode_ms,
                ..StageTimes::default()
            },
            model: None,
        };
        let sent = match &oldest {
            None => tx.send(work).map_err(|e| e.into_inner()),
            Some(queue) => send_dropping_oldest(&tx, queue, work, tel),
        };
        if let Err(w) = sent {
            lost(tel, &w);
            break;
        }
    }
}

/// Live sources never wait: when the queue is full the oldest queued frame is dropped.
fn send_dropping_oldest(
    tx: &Sender<Work>,
    queue: &Receiver<Work>,
    mut work: Work,
    tel: &Telemetry,
) -> Result<(), Work> {
    loop {
        match tx.try_send(work) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Disconnected(w)) => return Err(w),
            Err(TrySendError::Full(w)) => {
                work = w;
                if queue.try_recv().is_ok() {
                    tel.event(Event::FramesDropped {
                        reason: FrameDropReason::QueueFull,
                        n: 1,
                    });
                    tracing::debug!("frame dropped: pipeline behind a live source");
                }
            }
        }
    }
}

fn segment_stage(
    rx: Receiver<Work>,
    tx: Sender<Work>,
    settings: &SegmentSettings,
    mut verifier: Option<Verifier>,
    um_per_px: f32,
    tel: &Telemetry,
) {
    for mut w in rx {
        let t = Instant::now();
        let mut found = find_heads(&w.frame.image, settings);
        if let Some(v) = &mut verifier {
            match v.retain(&w.frame.image, &mut found, um_per_px) {
                Ok(rejected) => {
                    tel.event(Event::CandidatesRejected { n: rejected as u64 });
                }
                Err(e) => {
                    tel.event(Event::VerifierFailed);
                    tracing::warn!(error = %e, frame = w.frame.seq, "head verifier failed; candidates kept unverified");
                }
            }
        }
        w.cells = found
            .into_iter()
            .enumerate()
            .map(|(index, f)| Cell {
                index,
                angle_deg: f.head.angle_deg(),
                centroid: f.head.centroid,
                bbox: f.bbox,
                unclassified: if f.at_edge {
                    Some(Unclassified::AtEdge)
                } else if f.touching {
                    Some(Unclassified::Touching)
                } else {
                    None
                },
                size: HeadSize::default(),
                head: Some(f.head),
                prepared: None,
                verdict: None,
                dropped: None,
            })
            .collect();
        w.times.segment_ms = t.elapsed().as_secs_f32() * 1e3;
        tel.latency(Stage::Segment, w.times.segment_ms);
        tel.event(Event::CellsFound {
            n: w.cells.len() as u64,
        });
        tracing::debug!(frame = w.frame.seq, cells = w.cells.len(), "segmented");
        if let Err(e) = tx.send(w) {
            lost(tel, &e.into_inner());
        }
    }
}

/// What the classify stage receives: frames, and in between them a new model to use from
/// the next frame on (a reload travels in order with the frames, so no frame prepared for one
/// model is classified by another).
enum ToClassify {
    Work(Work),
    Swap(Box<Classifier>),
}

fn pose_stage(
    rx: Receiver<Work>,
    tx: Sender<ToClassify>,
    swaps: Receiver<(Classifier, Arc<ModelSpec>)>,
    mut spec: Arc<ModelSpec>,
    um_per_px: f32,
    tel: &Telemetry,
) {
    for mut w in rx {
        if let Ok((classifier, new_spec)) = swaps.try_recv() {
            spec = new_spec;
            if tx.send(ToClassify::Swap(Box::new(classifier))).is_err() {
                lost(tel, &w);
                continue;
            }
        }
        let t = Instant::now();
        let image = w.frame.image.clone();
        for c in &mut w.cells {
            let Some(head) = c.head.take() else {
                continue;
            };
            if c.unclassified.is_some() {
                c.size = head_size(&head, um_per_px);
                continue;
            }
            let mut p = prepare_head(&image, &head, &spec, Some(um_per_px));
            // Pose and sizes of the head as the classifier saw it (the crop path's).
            let seen = p.head.take().unwrap_or(head);
            c.angle_deg = seen.angle_deg();
            c.size = head_size(&seen, um_per_px);
            c.prepared = Some(p);
        }
        w.times.pose_ms = t.elapsed().as_secs_f32() * 1e3;
        tel.latency(Stage::Pose, w.times.pose_ms);
        if let Err(e) = tx.send(ToClassify::Work(w))
            && let ToClassify::Work(w) = e.into_inner()
        {
            lost(tel, &w);
        }
    }
}

fn classify_stage(
    rx: Receiver<ToClassify>,
    tx: Sender<Work>,
    mut classifier: Classifier,
    max_batch: usize,
    wait: Duration,
    tel: &Telemetry,
) {
    let pending = |w: &Work| w.cells.iter().filter(|c| c.prepared.is_some()).count();
    let mut held: Option<ToClassify> = None;
    loop {
        let next = match held.take() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            },
        };
        let first = match next {
            ToClassify::Swap(c) => {
                tracing::info!(
                    from = %classifier.id().id.name,
                    to = %c.id().id.name,
                    "model swapped between batches"
                );
                classifier = *c;
                continue;
            }
            ToClassify::Work(w) => w,
        };
        let mut n = pending(&first);
        let mut batch = vec![first];
        if !wait.is_zero() {
            let deadline = Instant::now() + wait;
            while n < max_batch {
                match rx.recv_deadline(deadline) {
                    Ok(ToClassify::Work(w)) => {
                        n += pending(&w);
                        batch.push(w);
                    }
                    Ok(swap) => {
                        held = Some(swap);
                        break;
                    }
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        let t = Instant::now();
        classify_batch(&mut classifier, &mut batch, max_batch);
        let ms = t.elapsed().as_secs_f32() * 1e3;
        for mut w in batch {
            w.times.classify_ms = ms;
            w.model = Some(classifier.id().clone());
            tel.latency(Stage::Classify, ms);
            if let Err(e) = tx.send(w) {
                lost(tel, &e.into_inner());
            }
        }
    }
}

/// Classify every prepared cell of the frames, `max_batch` at a time. A failed batch drops its
/// cells with a reason; the frames go on.
fn classify_batch(classifier: &mut Classifier, frames: &mut [Work], max_batch: usize) {
    let mut slots: Vec<&mut Cell> = frames
        .iter_mut()
        .flat_map(|w| w.cells.iter_mut())
        .filter(|c| c.prepared.is_some())
        .collect();
    for chunk in slots.chunks_mut(max_batch) {
        // The inputs move out of the cells: they are not needed past this stage.
        let inputs: Vec<_> = chunk.iter_mut().filter_map(|c| c.prepared.take()).collect();
        match classifier.classify(&inputs) {
            Ok(verdicts) => {
                for (c, v) in chunk.iter_mut().zip(verdicts) {
                    c.verdict = Some(v);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, cells = chunk.len(), "inference failed; cells dropped");
                for c in chunk.iter_mut() {
                    c.dropped = Some(CellDropReason::InferenceError);
                }
            }
        }
    }
}

fn publish_stage(rx: Receiver<Work>, mut sinks: Sinks, mut tally: Tally, tel: &Telemetry) -> Tally {
    for w in rx {
        let t = Instant::now();
        let latency_ms = w.frame.captured.elapsed().as_secs_f32() * 1e3;
        if let Some(m) = &w.model {
            tally
                .models
                .entry(m.id.name.clone())
                .or_insert_with(|| m.id.sha256.clone());
        }
        let mut lines = Vec::with_capacity(w.cells.len());
        let mut dropped: BTreeMap<CellDropReason, u64> = BTreeMap::new();
        let mut classes: BTreeMap<&str, u64> = BTreeMap::new();
        for c in &w.cells {
            if let Some(reason) = c.dropped {
                *dropped.entry(reason).or_default() += 1;
                continue;
            }
            let r = Record::of(&tally.sample, &w, c, latency_ms);
            tally.add(Seen {
                at_edge: r.at_edge,
                touching: r.touching,
                class: r.class.as_deref(),
                normal: r.normal,
                confidence: r.confidence,
            });
            if let Some(v) = &c.verdict {
                *classes.entry(v.class.as_str()).or_default() += 1;
            }
            lines.push(r.to_line());
        }
        sinks.write(&lines);
        for (reason, n) in dropped {
            tel.event(Event::CellsDropped { reason, n });
        }
        for (class, n) in classes {
            tel.event(Event::CellsClassified {
                class: class.to_string(),
                n,
            });
        }
        tel.event(Event::CellsPublished {
            n: lines.len() as u64,
        });
        tel.set_estimate(tally.estimate());
        tel.event(Event::FramePublished);
        tel.latency(Stage::Publish, t.elapsed().as_secs_f32() * 1e3);
        tel.latency(
            Stage::EndToEnd,
            w.frame.captured.elapsed().as_secs_f32() * 1e3,
        );
    }
    sinks.close();
    tally
}
