//! The wiring: stage threads joined by bounded channels (source → segment → pose → classify →
//! publish), backpressure, accounting and shutdown. What each stage does to a frame lives in
//! the stage modules and the supervisor's judgement in `supervisor`; this is the one place
//! that creates threads and channels and knows how they connect.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};

use crate::core::pose::Contrast;
use crate::core::preprocess::Preprocessor;
use crate::core::register::{Registrar, Spectrum};
use crate::daemon::calibrate::{ScaleAlarm, ScaleWatch};
use crate::daemon::classify::{
    Classifier, Classify, ClassifyError, classify_frames, prepare_cells,
};
use crate::daemon::config::Settings;
use crate::daemon::frame::{Frame, StageTimes, Work};
use crate::daemon::mqtt::Mqtt;
use crate::daemon::publish::{Record, SinkError, Sinks};
use crate::daemon::report::{Report, ReportRules, Tally};
use crate::daemon::segment::{SegmentSettings, Verifier, VerifierError, segment_frame};
use crate::daemon::service::Notify;
use crate::daemon::share::frame_waiting;
use crate::daemon::source::{self, FrameSource, Pull, SourceError, SourceNote};
use crate::daemon::supervisor::{Reread, Supervisor, Swap};
use crate::daemon::telemetry::{
    CellDropReason, Counts, Event, FrameDropReason, Latency, Stage, Telemetry,
};
use crate::daemon::track::{Tracker, Votes};
use crate::daemon::view::View;

/// Why the pipeline cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Classifier(#[from] ClassifyError),
    #[error(transparent)]
    Verifier(#[from] VerifierError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Why a running pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("a pipeline thread could not start: {0}")]
    Spawn(std::io::Error),
    #[error("pipeline stage {0} stopped unexpectedly")]
    StageFailed(String),
}

/// Everything opened and loaded, ready to run.
pub struct Ready {
    settings: Settings,
    source: Box<dyn FrameSource>,
    classifier: Box<dyn Classify>,
    /// One head verifier per segment worker (`None` each when verification is off).
    verifiers: Vec<Option<Verifier>>,
    sinks: Sinks,
    telemetry: Arc<Telemetry>,
    /// Where the publisher leaves its latest frame for the live view, when one is served.
    view: Option<Arc<View>>,
}

/// Load the models the settings name, the way start-up and `validate` do.
pub fn load_models(settings: &Settings) -> Result<(Classifier, Option<Verifier>), StartError> {
    let runtime = settings.runtime();
    let r = &settings.reload;
    let classifier = Classifier::load(&r.classify, r.report.normal_class.as_deref(), &runtime)?;
    let verifier = settings
        .restart
        .verifier
        .as_ref()
        .map(|v| Verifier::load(v, &runtime))
        .transpose()?;
    Ok((classifier, verifier))
}

/// Check what the settings name and open it all: models first (a bad model is refused before
/// any frame is read), then the source, then the sinks.
pub fn prepare(settings: Settings, telemetry: Arc<Telemetry>) -> Result<Ready, StartError> {
    let (classifier, verifier) = load_models(&settings)?;
    let mut verifiers = vec![verifier];
    for _ in 1..settings.restart.pipeline.workers {
        let more = match &settings.restart.verifier {
            Some(v) => Some(Verifier::load(v, &settings.runtime())?),
            None => None,
        };
        verifiers.push(more);
    }
    let source = source::open(&settings.restart.source)?;
    let sinks = Sinks::open(&settings.restart.publish, telemetry.clone())?;
    let view = settings
        .process
        .service
        .view_addr
        .map(|_| Arc::new(View::default()));
    Ok(Ready {
        settings,
        source,
        classifier: Box::new(classifier),
        verifiers,
        sinks,
        telemetry,
        view,
    })
}

impl Ready {
    pub fn describe(&self) -> String {
        let verifier = match self.verifiers.first() {
            Some(Some(v)) => format!("head verifier {}", v.model().spec.name),
            _ => "no head verifier".into(),
        };
        format!(
            "{}; {}, {verifier}, sample {}",
            self.source.describe(),
            self.classifier.describe(),
            self.settings.sample_id()
        )
    }

    pub fn socket_addr(&self) -> Option<String> {
        self.sinks.socket_addr()
    }

    /// The live view this pipeline feeds, when one is served.
    pub fn view(&self) -> Option<Arc<View>> {
        self.view.clone()
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

impl Outcome {
    /// The benchmark lines: frames/s, cells/s and per-stage latency percentiles.
    pub fn throughput_text(&self) -> String {
        let mut s = format!(
            "throughput {:.1} frames/s, {:.1} cells/s ({} frames, {} cells in {:.2} s)\nlatency ms    {:>8} {:>8} {:>8}",
            self.frames_per_sec,
            self.cells_per_sec,
            self.counts.frames_published_total,
            self.counts.cells_published_total,
            self.elapsed_secs,
            "p50",
            "p99",
            "max"
        );
        for (stage, l) in &self.latency {
            s.push_str(&format!(
                "\n  {stage:<11} {:>8.2} {:>8.2} {:>8.2}",
                l.p50_ms, l.p99_ms, l.max_ms
            ));
        }
        s
    }
}

fn spawn<T: Send + 'static>(
    name: impl Into<String>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, RunError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(RunError::Spawn)
}

/// Named threads of a pipeline, joined in order at the end.
type Handles = Vec<(String, JoinHandle<()>)>;

/// Run `work` on each frame on as many threads as there are workers: frames are handed out
/// round-robin in arrival order by a dispatcher and taken back in the same order by a merger,
/// so the stage after sees the frames in their order, as from one thread. One worker: one
/// thread, no dispatcher or merger.
fn pool<F>(
    name: &'static str,
    workers: Vec<F>,
    rx: Receiver<Work>,
    tx: Sender<Work>,
    tel: &Arc<Telemetry>,
    handles: &mut Handles,
) -> Result<(), RunError>
where
    F: FnMut(&mut Work) + Send + 'static,
{
    let n = workers.len();
    if n <= 1 {
        for (i, mut f) in workers.into_iter().enumerate() {
            let t = tel.clone();
            let (rx, tx) = (rx.clone(), tx.clone());
            let h = spawn(format!("{name}-{i}"), move || {
                for mut w in &rx {
                    frame_waiting(!rx.is_empty());
                    f(&mut w);
                    pass(&tx, w, &t);
                }
            })?;
            handles.push((format!("{name}-{i}"), h));
        }
        return Ok(());
    }
    let (mut ins, mut outs) = (Vec::new(), Vec::new());
    for (i, mut f) in workers.into_iter().enumerate() {
        let (to_worker, worker_in) = bounded::<Work>(1);
        let (worker_out, from_worker) = bounded::<Work>(2);
        let (t, backlog) = (tel.clone(), rx.clone());
        let h = spawn(format!("{name}-{i}"), move || {
            for mut w in &worker_in {
                frame_waiting(!worker_in.is_empty() || !backlog.is_empty());
                f(&mut w);
                pass(&worker_out, w, &t);
            }
        })?;
        handles.push((format!("{name}-{i}"), h));
        ins.push(to_worker);
        outs.push(from_worker);
    }
    let t = tel.clone();
    let h = spawn(format!("{name}-dispatch"), move || {
        for (k, w) in rx.into_iter().enumerate() {
            pass(&ins[k % n], w, &t);
        }
    })?;
    handles.push((format!("{name}-dispatch"), h));
    let t = tel.clone();
    let h = spawn(format!("{name}-merge"), move || {
        for k in 0.. {
            match outs[k % n].recv() {
                Ok(w) => pass(&tx, w, &t),
                Err(_) => break,
            }
        }
    })?;
    handles.push((format!("{name}-merge"), h));
    Ok(())
}

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

/// The stage threads of a running pipeline, and the ends the supervisor keeps.
struct Stages {
    handles: Handles,
    publish: JoinHandle<Tally>,
    swaps: Sender<Swap>,
    /// Receivers of each queue, for their depths (they do not keep a channel open).
    depths: [(&'static str, Receiver<Work>); 4],
    classify_depth: Receiver<ToClassify>,
    /// The MQTT sink, for status lines and the report.
    mqtt: Option<Mqtt>,
}

/// Start every stage thread, joined by bounded channels.
fn start(ready: Ready, stop: &Arc<AtomicBool>) -> Result<(Stages, Settings), RunError> {
    let Ready {
        settings,
        source,
        classifier,
        verifiers,
        sinks,
        telemetry: tel,
        view,
    } = ready;
    let tel = &tel;
    let r = &settings.restart;
    let q = r.pipeline.queue_frames;
    let (to_segment, segment_in) = bounded::<Work>(q);
    let (to_track, track_in) = bounded::<Work>(q);
    let (to_pose, pose_in) = bounded::<Work>(q);
    let (to_classify, classify_in) = bounded::<ToClassify>(q);
    let (swap_tx, swap_rx) = crossbeam_channel::unbounded::<Swap>();
    let (to_publish, publish_in) = bounded::<Work>(q);
    let depths = [
        ("segment", segment_in.clone()),
        ("track", track_in.clone()),
        ("pose", pose_in.clone()),
        ("publish", publish_in.clone()),
    ];
    let classify_depth = classify_in.clone();
    let mqtt = sinks.mqtt();
    let (tel, um) = (tel.clone(), r.source.um_per_px);
    tel.set_model(&classifier.id().id);
    let mut handles = Vec::new();
    // A live source makes room by taking the oldest frame off its own queue.
    let oldest = (r.source.live || source.live()).then(|| segment_in.clone());
    let backlog = segment_in.clone();
    let (t, stop) = (tel.clone(), stop.clone());
    let h = spawn("source", move || {
        source_stage(source, to_segment, oldest, &stop, &t)
    })?;
    handles.push(("source".into(), h));
    let segmenters: Vec<_> = verifiers
        .into_iter()
        .map(|v| segmenter(r.segment.clone(), v, um, tel.clone()))
        .collect();
    pool(
        "segment",
        segmenters,
        segment_in,
        to_track,
        &tel,
        &mut handles,
    )?;
    let (t, tracker) = (tel.clone(), Tracker::new(&r.track, um));
    let h = spawn("track", move || {
        track_stage(track_in, to_pose, tracker, um, &t)
    })?;
    handles.push(("track".into(), h));
    let (t, pre) = (tel.clone(), classifier.preprocessor());
    let h = spawn("pose", move || {
        let queues = (pose_in, backlog);
        pose_stage(queues, to_classify, swap_rx, pre, um, &t)
    })?;
    handles.push(("pose".into(), h));
    let c = &settings.reload.classify;
    let batching = (c.max_batch, Duration::from_millis(c.batch_wait_ms));
    let t = tel.clone();
    let h = spawn("classify", move || {
        classify_stage(classify_in, to_publish, classifier, batching, &t)
    })?;
    handles.push(("classify".into(), h));
    let (t, tally) = (tel.clone(), Tally::new(&r.sample_id));
    let view = view.map(|v| (v, settings.reload.report.clone()));
    let publish = spawn("publish", move || {
        publish_stage(publish_in, sinks, tally, view, &t)
    })?;
    let stages = Stages {
        handles,
        publish,
        swaps: swap_tx,
        depths,
        classify_depth,
        mqtt,
    };
    Ok((stages, settings))
}

/// Run until the source ends or `stop` is set; every stage drains before this returns.
pub fn run(ready: Ready, control: Control) -> Result<Outcome, RunError> {
    let Control {
        stop,
        reload: mut reloader,
        notify,
    } = control;
    let tel = ready.telemetry.clone();
    let started = Instant::now();
    let (stages, mut settings) = start(ready, &stop)?;
    let interval = Duration::from_secs_f32(settings.restart.pipeline.status_interval_secs);
    let rules = settings.reload.report.clone();
    let mut supervisor = Supervisor::new(settings.sample_id(), interval, rules, notify, started);
    supervisor.ready();
    // Supervise until the last stage has drained: status lines, watchdog pings, reloads.
    while !stages.publish.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        let mut depths: Vec<(&'static str, usize)> =
            stages.depths.iter().map(|(n, r)| (*n, r.len())).collect();
        depths.push(("classify", stages.classify_depth.len()));
        tel.set_queue_depths(depths);
        let line = supervisor.tick(Instant::now(), &tel, stop.load(Ordering::SeqCst));
        if let (Some(line), Some(m)) = (line, &stages.mqtt) {
            m.status(
                "running",
                &line,
                &tel.counts(),
                tel.estimate(),
                supervisor.drifting(),
            );
        }
        if let Some((flag, reread)) = &mut reloader
            && flag.swap(false, Ordering::SeqCst)
            && let Some(swap) = supervisor.reload(reread, &mut settings, &tel)
        {
            // The pose stage passes it on in order with the frames.
            let _ = stages.swaps.send(swap);
        }
    }
    let Stages {
        handles,
        publish,
        swaps,
        mqtt,
        ..
    } = stages;
    drop(swaps);
    for (name, h) in handles {
        h.join().map_err(|_| RunError::StageFailed(name))?;
    }
    let tally = publish
        .join()
        .map_err(|_| RunError::StageFailed("publish".into()))?;
    let elapsed = started.elapsed().as_secs_f64();
    let report = settings.reload.report.report(&tally);
    if let Some(m) = mqtt {
        let c = tel.counts();
        let line = crate::daemon::supervisor::status_line(
            &c,
            elapsed,
            tel.estimate(),
            supervisor.drifting(),
        );
        m.report(&report);
        m.status("stopped", &line, &c, tel.estimate(), supervisor.drifting());
        // The last handle: the sink delivers what is queued (up to its drain time) and stops.
        drop(m);
    }
    let counts = tel.counts();
    Ok(Outcome {
        report,
        frames_per_sec: counts.frames_published_total as f64 / elapsed.max(1e-9),
        cells_per_sec: counts.cells_published_total as f64 / elapsed.max(1e-9),
        latency: tel.latencies(),
        counts,
        elapsed_secs: elapsed,
        stopped: stop.load(Ordering::SeqCst),
    })
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

/// Send a frame on, or count it lost when the next stage is gone.
fn pass(tx: &Sender<Work>, w: Work, tel: &Telemetry) {
    if let Err(e) = tx.send(w) {
        lost(tel, &e.into_inner());
    }
}

/// A frame the source delivered without an image: seen, and dropped for `reason`.
fn skipped(tel: &Telemetry, reason: FrameDropReason) {
    tel.event(Event::FrameSeen);
    tel.event(Event::FramesDropped { reason, n: 1 });
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
        let (name, image, decode_ms) = match src.pull() {
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
            Pull::Incomplete { name, reason } => {
                seq += 1;
                skipped(tel, FrameDropReason::Incomplete);
                tracing::debug!(frame = %name, %reason, "frame skipped: incomplete");
                continue;
            }
            Pull::Unreadable { name, reason } => {
                seq += 1;
                skipped(tel, FrameDropReason::Undecodable);
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
            ended_tracks: Vec::new(),
            stain: None,
        };
        let sent = match &oldest {
            None => tx.send(work).map_err(|e| Box::new(e.into_inner())),
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
) -> Result<(), Box<Work>> {
    loop {
        match tx.try_send(work) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Disconnected(w)) => return Err(Box::new(w)),
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

/// One segment worker: head finding, its verifier's second look, and the cells of a frame.
fn segmenter(
    settings: SegmentSettings,
    mut verifier: Option<Verifier>,
    um_per_px: f32,
    tel: Arc<Telemetry>,
) -> impl FnMut(&mut Work) + Send + 'static {
    move |w: &mut Work| {
        let t = Instant::now();
        let seg = segment_frame(&w.frame.image, &settings, verifier.as_mut(), um_per_px);
        match seg.verifier_error {
            None => tel.event(Event::CandidatesRejected {
                n: seg.rejected as u64,
            }),
            Some(e) => {
                tel.event(Event::VerifierFailed);
                tracing::warn!(error = %e, frame = w.frame.seq, "head verifier failed; candidates kept unverified");
            }
        }
        w.cells = seg.cells;
        w.stain = Some(seg.stain);
        w.times.segment_ms = t.elapsed().as_secs_f32() * 1e3;
        tel.latency(Stage::Segment, w.times.segment_ms);
        tel.event(Event::CellsFound {
            n: w.cells.len() as u64,
        });
        tracing::debug!(frame = w.frame.seq, cells = w.cells.len(), "segmented");
    }
}

/// Say, once, that the heads disagree with the configured scale (log, counter, status line).
fn warn_scale(alarm: &ScaleAlarm, um_per_px: f32, tel: &Telemetry) {
    match alarm {
        ScaleAlarm::Sizes {
            median_length_um,
            heads,
            suggested_um_per_px,
        } => {
            tracing::warn!(
                heads,
                "head sizes disagree with source.um_per_px = {um_per_px}: median head length {median_length_um:.1} µm where the WHO range is 4.0-5.5 µm; the heads suggest um_per_px = {suggested_um_per_px:.4} (check with `spermscope calibrate`); sizes and the area filter are wrong until it is set"
            );
            tel.event(Event::ScaleSuspect {
                suggested_um_per_px: Some(*suggested_um_per_px),
            });
        }
        ScaleAlarm::NoHeads { frames } => {
            tracing::warn!(
                frames,
                "no head has passed head finding's size filter at source.um_per_px = {um_per_px}; if heads are in view, the scale is likely wrong (run `spermscope calibrate`)"
            );
            tel.event(Event::ScaleSuspect {
                suggested_um_per_px: None,
            });
        }
    }
}

fn track_stage(
    rx: Receiver<Work>,
    tx: Sender<Work>,
    mut tracker: Tracker,
    um_per_px: f32,
    tel: &Telemetry,
) {
    let registrar = Registrar::default();
    let mut previous: Option<Spectrum> = None;
    let mut scale = ScaleWatch::default();
    for mut w in rx {
        // The frames are in order again here: the scale is judged on them as they came.
        scale.observe(
            w.cells
                .iter()
                .filter(|c| c.unclassified.is_none())
                .filter_map(|c| c.head.as_ref().map(|h| (h.major_px, h.minor_px))),
        );
        if let Some(alarm) = scale.judge(um_per_px) {
            warn_scale(&alarm, um_per_px, tel);
        }
        let t = Instant::now();
        // Registration only when tracks are followed (it is most of this stage's cost).
        let motion = if tracker.enabled() {
            let spectrum = match w.stain.as_deref() {
                Some(s) if s.contrast == Contrast::Dark => registrar.spectrum_of_stain(&s.map),
                _ => registrar.spectrum(&w.frame.image),
            };
            let m = previous.as_ref().map(|p| registrar.motion(p, &spectrum));
            previous = Some(spectrum);
            m
        } else {
            None
        };
        let before = tracker.started();
        let step = tracker.step(w.frame.seq, &mut w.cells, motion);
        w.ended_tracks = step.ended;
        w.times.track_ms = t.elapsed().as_secs_f32() * 1e3;
        tel.latency(Stage::Track, w.times.track_ms);
        tel.event(Event::TracksStarted {
            n: tracker.started() - before,
        });
        if step.skipped > 0 {
            tel.event(Event::ClassificationsSkipped {
                n: step.skipped as u64,
            });
        }
        if step.field_change {
            tel.event(Event::FieldChanged);
            tracing::debug!(frame = w.frame.seq, "field changed: every track ended");
        }
        tel.set_tracks_active(tracker.active());
        pass(&tx, w, tel);
    }
}

/// What the classify stage receives: frames, and in between them a new classifier to use
/// from the next frame on (a reload travels in order with the frames, so no frame prepared
/// for one model is classified by another).
enum ToClassify {
    Work(Work),
    Swap(Box<Swap>),
}

/// `queues`: the stage's input and the pipeline's front queue (only looked at).
fn pose_stage(
    (rx, backlog): (Receiver<Work>, Receiver<Work>),
    tx: Sender<ToClassify>,
    swaps: Receiver<Swap>,
    mut pre: Preprocessor,
    um_per_px: f32,
    tel: &Telemetry,
) {
    for mut w in &rx {
        if let Ok(swap) = swaps.try_recv() {
            pre = swap.classifier.preprocessor();
            if tx.send(ToClassify::Swap(Box::new(swap))).is_err() {
                lost(tel, &w);
                continue;
            }
        }
        let t = Instant::now();
        frame_waiting(!rx.is_empty() || !backlog.is_empty());
        prepare_cells(&mut w, &pre, um_per_px);
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
    mut classifier: Box<dyn Classify>,
    (mut max_batch, mut wait): (usize, Duration),
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
            ToClassify::Swap(s) => {
                tracing::info!(
                    from = %classifier.id().id.name,
                    to = %s.classifier.id().id.name,
                    "model swapped between batches"
                );
                (classifier, max_batch, wait) = (s.classifier, s.max_batch, s.batch_wait);
                continue;
            }
            ToClassify::Work(w) => w,
        };
        let mut n = pending(&first);
        let mut batch = vec![first];
        let deadline = Instant::now() + wait;
        while !wait.is_zero() && n < max_batch {
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
        let t = Instant::now();
        classify_frames(classifier.as_mut(), &mut batch, max_batch);
        let ms = t.elapsed().as_secs_f32() * 1e3;
        for mut w in batch {
            w.times.classify_ms = ms;
            w.model = Some(classifier.id().clone());
            tel.latency(Stage::Classify, ms);
            pass(&tx, w, tel);
        }
    }
}

/// The cell records of tracks that ended, counted into the tally, as lines.
fn cells_of(ended: &[u64], votes: &mut Votes, tally: &mut Tally, tel: &Telemetry) -> Vec<String> {
    let cells: Vec<Record> = ended.iter().filter_map(|&id| votes.finish(id)).collect();
    if !cells.is_empty() {
        tel.event(Event::TracksEnded {
            n: cells.len() as u64,
        });
    }
    cells
        .iter()
        .map(|c| {
            tally.add_record(c);
            c.to_line()
        })
        .collect()
}

fn publish_stage(
    rx: Receiver<Work>,
    mut sinks: Sinks,
    mut tally: Tally,
    view: Option<(Arc<View>, ReportRules)>,
    tel: &Telemetry,
) -> Tally {
    let mut votes = Votes::default();
    for w in rx {
        let t = Instant::now();
        let latency_ms = w.frame.captured.elapsed().as_secs_f32() * 1e3;
        let (records, dropped) = Record::of_frame(&tally.sample, &w, latency_ms);
        let mut classes: BTreeMap<&str, u64> = BTreeMap::new();
        let mut lines = Vec::with_capacity(records.len());
        for r in &records {
            tally.add_record(r);
            votes.observe(r, w.model.as_deref());
            if let Some(c) = &r.class {
                *classes.entry(c.as_str()).or_default() += 1;
            }
            lines.push(r.to_line());
        }
        // Detections first: a track may end at the frame it started in (tracking off).
        let detections = lines.len();
        lines.extend(cells_of(&w.ended_tracks, &mut votes, &mut tally, tel));
        sinks.write(&lines);
        if let Some((v, rules)) = &view {
            v.update(&w, &records, rules.report(&tally));
        }
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
            n: detections as u64,
        });
        tel.set_estimate(tally.estimate());
        tel.event(Event::FramePublished);
        tel.latency(Stage::Publish, t.elapsed().as_secs_f32() * 1e3);
        tel.latency(
            Stage::EndToEnd,
            w.frame.captured.elapsed().as_secs_f32() * 1e3,
        );
    }
    // The source ended or the pipeline stops: every track still open ends now.
    let open = votes.open_tracks();
    let lines = cells_of(&open, &mut votes, &mut tally, tel);
    sinks.write(&lines);
    sinks.close();
    tally
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{ModelError, ModelId};
    use crate::core::preprocess::Prepared;
    use crate::core::spec::tests::example;
    use crate::core::testing::synthetic_field;
    use crate::daemon::classify::verdict;
    use crate::daemon::config::RawConfig;
    use crate::daemon::frame::{ModelRef, Verdict};
    use crate::daemon::publish::PublishSettings;
    use crate::daemon::telemetry::CellDropReason;

    /// Frames handed over as fast as the pipeline takes them (or, live, faster).
    struct Frames {
        left: std::collections::VecDeque<Pull>,
        live: bool,
    }

    impl FrameSource for Frames {
        fn describe(&self) -> String {
            "test frames".into()
        }
        fn pull(&mut self) -> Pull {
            self.left.pop_front().unwrap_or(Pull::End)
        }
        fn live(&self) -> bool {
            self.live
        }
    }

    /// A classifier without ONNX Runtime: every head is "normal" at 0.9, after `delay`, or
    /// every batch fails.
    struct Fake {
        id: Arc<ModelRef>,
        pre: Preprocessor,
        delay: Duration,
        fail: bool,
    }

    impl Fake {
        fn new(delay_ms: u64, fail: bool) -> Box<Fake> {
            let spec = example();
            Box::new(Fake {
                id: Arc::new(ModelRef {
                    id: ModelId {
                        name: "fake".into(),
                        sha256: "0".into(),
                    },
                    classes: spec.classes.clone(),
                    normal_class: spec.normal_class.clone(),
                    uncertain_below: 0.5,
                }),
                pre: Preprocessor::new(Arc::new(spec)),
                delay: Duration::from_millis(delay_ms),
                fail,
            })
        }
    }

    impl Classify for Fake {
        fn id(&self) -> &Arc<ModelRef> {
            &self.id
        }
        fn preprocessor(&self) -> Preprocessor {
            self.pre.clone()
        }
        fn classify(&mut self, batch: &[Prepared]) -> Result<Vec<Verdict>, ModelError> {
            std::thread::sleep(self.delay);
            if self.fail {
                return Err(ModelError::Run("planted failure".into()));
            }
            let classes = &self.id.classes;
            Ok(batch
                .iter()
                .map(|_| verdict(&[0.9, 0.1], classes, Some("normal"), 0.5))
                .collect())
        }
        fn describe(&self) -> String {
            "model fake".into()
        }
    }

    /// `n` fields of three synthetic sperm each, then one frame that cannot be decoded.
    fn frames(n: usize) -> std::collections::VecDeque<Pull> {
        let field = Arc::new(synthetic_field(
            640,
            480,
            &[(150, 150, 30.0), (420, 200, 200.0), (260, 360, 100.0)],
        ));
        let mut out: std::collections::VecDeque<Pull> = (0..n)
            .map(|i| Pull::Frame {
                name: format!("f{i:03}.png"),
                image: field.clone(),
                decode_ms: 0.0,
            })
            .collect();
        out.push_back(Pull::Unreadable {
            name: "broken.png".into(),
            reason: "planted".into(),
        });
        out
    }

    fn run_with(
        n: usize,
        fake: Box<Fake>,
        live: bool,
        records: &std::path::Path,
    ) -> (Outcome, Vec<serde_json::Value>) {
        let text = format!(
            "[source]\nlive = {live}\n[source.replay]\npath = \"unused\"\n[segment]\nverify = false\n[pipeline]\nqueue_frames = 1\n"
        );
        let settings = RawConfig::parse(&text, std::path::Path::new("t.toml"))
            .unwrap()
            .resolve(None)
            .unwrap();
        let tel = Arc::new(Telemetry::new());
        let publish = PublishSettings {
            stdout: false,
            file: Some(records.to_path_buf()),
            socket: None,
            subscriber_queue: 16,
            mqtt: None,
        };
        let ready = Ready {
            source: Box::new(Frames {
                left: frames(n),
                live,
            }),
            classifier: fake,
            verifiers: vec![None, None],
            sinks: Sinks::open(&publish, tel.clone()).unwrap(),
            telemetry: tel,
            settings,
            view: None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let outcome = run(ready, Control::stop_only(stop)).unwrap();
        let lines = std::fs::read_to_string(records).unwrap();
        let records = lines
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (outcome, records)
    }

    #[test]
    fn the_worker_pool_hands_frames_on_in_their_order() {
        let tel = Arc::new(Telemetry::new());
        let (tx_in, rx_in) = bounded::<Work>(4);
        let (tx_out, rx_out) = bounded::<Work>(4);
        // Three workers, the first much slower than the others: frames still leave in order.
        let workers: Vec<_> = [7u64, 0, 1]
            .into_iter()
            .map(|ms| {
                move |w: &mut Work| {
                    std::thread::sleep(Duration::from_millis(ms * (w.frame.seq % 2)));
                    w.ended_tracks.push(ms);
                }
            })
            .collect();
        let mut handles = Handles::new();
        pool("test", workers, rx_in, tx_out, &tel, &mut handles).unwrap();
        let names: Vec<&str> = handles.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["test-0", "test-1", "test-2", "test-dispatch", "test-merge"]
        );
        let feeder = std::thread::spawn(move || {
            for seq in 1..=40u64 {
                let w = Work {
                    frame: crate::daemon::frame::Frame {
                        seq,
                        name: format!("f{seq}"),
                        timestamp: std::time::SystemTime::UNIX_EPOCH,
                        captured: Instant::now(),
                        image: Arc::new(image::RgbImage::new(2, 2)),
                    },
                    cells: Vec::new(),
                    times: Default::default(),
                    model: None,
                    ended_tracks: Vec::new(),
                    stain: None,
                };
                tx_in.send(w).unwrap();
            }
        });
        let out: Vec<(u64, Vec<u64>)> = rx_out
            .iter()
            .map(|w| (w.frame.seq, w.ended_tracks))
            .collect();
        feeder.join().unwrap();
        for (_, h) in handles {
            h.join().unwrap();
        }
        let seqs: Vec<u64> = out.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
        // Each frame went through exactly one worker, round-robin.
        for (k, (_, by)) in out.iter().enumerate() {
            assert_eq!(by, &vec![[7u64, 0, 1][k % 3]]);
        }
    }

    #[test]
    fn every_frame_and_cell_is_published_in_order_or_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (o, records) = run_with(6, Fake::new(0, false), false, &dir.path().join("r.jsonl"));
        let c = &o.counts;
        assert!(c.balanced(), "{c:?}");
        assert_eq!(c.frames_seen_total, 7);
        assert_eq!(c.frames_published_total, 6);
        assert_eq!(c.frames_dropped_total[&FrameDropReason::Undecodable], 1);
        assert_eq!(c.cells_found_total, 18, "three heads in each of six frames");
        let (detections, cells): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) =
            records.iter().partition(|r| r["kind"] == "detection");
        assert_eq!(detections.len(), 18);
        let seqs: Vec<u64> = detections
            .iter()
            .map(|r| r["frame"]["seq"].as_u64().unwrap())
            .collect();
        assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
        // The same field six times: three cells, classified in five frames each (the
        // default budget), the sixth frame's heads left unclassified for it.
        let classified = detections.iter().filter(|r| r["class"] == "normal").count();
        assert_eq!(classified, 15);
        assert_eq!(c.classifications_skipped_total, 3);
        assert_eq!(cells.len(), 3);
        for cell in &cells {
            assert_eq!(cell["frames_seen"], 6);
            assert_eq!(cell["classified_frames"], 5);
            assert_eq!(cell["class"], "normal");
            assert_eq!(cell["model"]["name"], "fake");
        }
        let tracks: std::collections::BTreeSet<u64> = detections
            .iter()
            .map(|r| r["track"].as_u64().unwrap())
            .collect();
        assert_eq!(tracks.len(), 3);
        assert_eq!((o.report.cells_recorded, o.report.detections), (3, 18));
        assert_eq!(o.report.normal_forms, 3);
        assert_eq!((c.tracks_started_total, c.tracks_ended_total), (3, 3));
    }

    #[test]
    fn a_failed_batch_drops_its_cells_with_a_reason_and_the_frames_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let (o, records) = run_with(4, Fake::new(0, true), false, &dir.path().join("r.jsonl"));
        let c = &o.counts;
        assert!(c.balanced(), "{c:?}");
        assert_eq!(c.frames_published_total, 4);
        assert_eq!(c.cells_dropped_total[&CellDropReason::InferenceError], 12);
        assert!(records.is_empty());
    }

    #[test]
    fn a_live_source_drops_the_oldest_frames_when_behind_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let (o, records) = run_with(40, Fake::new(30, false), true, &dir.path().join("r.jsonl"));
        let c = &o.counts;
        assert!(c.balanced(), "{c:?}");
        let dropped = c.frames_dropped_total.get(&FrameDropReason::QueueFull);
        assert!(dropped.is_some_and(|&n| n > 0), "{c:?}");
        let detections = records.iter().filter(|r| r["kind"] == "detection").count();
        assert_eq!(detections as u64, 3 * c.frames_published_total);
        // Dropped frames are gaps a track bridges: still three cells.
        assert_eq!(records.len() - detections, 3);
    }
}
