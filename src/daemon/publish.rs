//! Records and sinks: the only place cells are serialized. One JSON object per cell (JSON
//! Lines) goes to standard output, an appended file, a socket that any number of
//! subscribers read, and an MQTT broker (`mqtt`); a slow or vanished subscriber is dropped,
//! never waited for.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError, bounded};

use crate::core::model::ModelId;
use crate::core::morphometry::HeadSize;
use crate::daemon::check::{Base, ConfigError, invalid, listen_addr, warn_if_exposed};
use crate::daemon::frame::{Cell, Unclassified, Work};
use crate::daemon::mqtt::{Mqtt, MqttError, MqttSettings, RawMqtt};
use crate::daemon::telemetry::{CellDropReason, Event, SubscriberDropReason, Telemetry};

/// `[publish]`: where records go.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPublish {
    /// Write records to standard output.
    pub stdout: bool,
    /// Append records to this JSON Lines file.
    pub file: Option<PathBuf>,
    /// Serve records to any number of subscribers: `unix:/path/to.sock` or
    /// `tcp:127.0.0.1:PORT` (keep TCP on loopback; any other address is served with a WARN at
    /// start-up).
    pub socket: Option<String>,
    /// Records queued per subscriber before a slow one is dropped.
    pub subscriber_queue: usize,
    /// Records, the report and status lines to an MQTT broker.
    pub mqtt: RawMqtt,
}

impl Default for RawPublish {
    fn default() -> Self {
        Self {
            stdout: false,
            file: None,
            socket: None,
            subscriber_queue: 4096,
            mqtt: RawMqtt::default(),
        }
    }
}

/// Where a socket sink listens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum SocketAddrSpec {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

/// The sinks' resolved settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PublishSettings {
    pub stdout: bool,
    pub file: Option<PathBuf>,
    pub socket: Option<SocketAddrSpec>,
    pub subscriber_queue: usize,
    pub mqtt: Option<MqttSettings>,
}

impl RawPublish {
    /// Check every value (no I/O).
    pub fn resolve(&self, base: Base<'_>) -> Result<PublishSettings, ConfigError> {
        if self.subscriber_queue == 0 {
            return Err(invalid("publish.subscriber_queue", "must be at least 1"));
        }
        Ok(PublishSettings {
            stdout: self.stdout,
            file: self.file.as_deref().map(|p| base.path(p)),
            socket: self.socket.as_deref().map(parse_socket).transpose()?,
            subscriber_queue: self.subscriber_queue,
            mqtt: self.mqtt.resolve(base)?,
        })
    }
}

impl PublishSettings {
    /// The sinks of the pipeline of `sample` (the MQTT topics name it).
    pub fn for_sample(mut self, sample: &str) -> Result<Self, ConfigError> {
        self.mqtt = self.mqtt.map(|m| m.for_sample(sample)).transpose()?;
        Ok(self)
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
        return Ok(SocketAddrSpec::Tcp(listen_addr(KEY, a)?));
    }
    Err(invalid(KEY, format!("'{s}' must start with unix: or tcp:")))
}

/// Which frame a cell came from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct FrameRef {
    pub seq: u64,
    pub name: String,
}

/// Head sizes in µm.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Morphometry {
    pub head_length_um: f32,
    pub head_width_um: f32,
    pub head_area_um2: f32,
    pub head_perimeter_um: f32,
    pub ellipticity: f32,
}

impl From<HeadSize> for Morphometry {
    fn from(s: HeadSize) -> Self {
        Self {
            head_length_um: s.length_um,
            head_width_um: s.width_um,
            head_area_um2: s.area_um2,
            head_perimeter_um: s.perimeter_um,
            ellipticity: s.ellipticity,
        }
    }
}

/// What a record stands for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// One head in one frame.
    #[default]
    Detection,
    /// One physical cell: a track's detections fused, published when the track ends.
    Cell,
}

/// One detection, or one cell, as published. `schema/record.schema.json` documents it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Record {
    pub sample: String,
    #[serde(default)]
    pub kind: RecordKind,
    /// The physical cell (track) within the sample.
    #[serde(default)]
    pub track: Option<u64>,
    /// For a detection its frame; for a cell the last frame it was seen in.
    pub frame: FrameRef,
    /// Capture time, RFC 3339 UTC.
    pub timestamp: String,
    /// Index of the cell in its frame.
    pub cell: usize,
    pub bbox: [u32; 4],
    pub at_edge: bool,
    pub touching: bool,
    pub centroid: [f32; 2],
    pub angle_deg: f32,
    pub morphometry: Morphometry,
    /// Class, `uncertain`, or null when the cell was not classified (see `unclassified`).
    pub class: Option<String>,
    /// Why a detection was not classified: `at_edge`, `touching`, or `track_complete` (its
    /// cell was already classified in enough frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unclassified: Option<Unclassified>,
    /// Whether `class` is the model's normal class; null when not classified.
    pub normal: Option<bool>,
    pub confidence: Option<f32>,
    pub probs: Option<BTreeMap<String, f32>>,
    pub model: Option<ModelId>,
    /// From capture to publication, ms (a cell: of its last detection).
    pub latency_ms: f32,
    /// A cell: the frames it was seen in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames_seen: Option<u32>,
    /// A cell: the sequence number of the first frame it was seen in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    /// A cell: the frames whose probabilities were fused into its class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classified_frames: Option<u32>,
}

impl Record {
    /// The records of a frame's published cells, and the cells dropped on the way (by reason).
    pub fn of_frame(
        sample: &str,
        work: &Work,
        latency_ms: f32,
    ) -> (Vec<Record>, BTreeMap<CellDropReason, u64>) {
        let mut dropped: BTreeMap<CellDropReason, u64> = BTreeMap::new();
        let mut records = Vec::with_capacity(work.cells.len());
        for c in &work.cells {
            match c.dropped {
                Some(reason) => *dropped.entry(reason).or_default() += 1,
                None => records.push(Record::of(sample, work, c, latency_ms)),
            }
        }
        (records, dropped)
    }

    pub fn of(sample: &str, work: &Work, cell: &Cell, latency_ms: f32) -> Record {
        let f = &work.frame;
        let v = cell.verdict.as_ref();
        let classes: &[String] = work.model.as_deref().map_or(&[], |m| &m.classes);
        Record {
            sample: sample.to_string(),
            kind: RecordKind::Detection,
            track: cell.track,
            frame: FrameRef {
                seq: f.seq,
                name: f.name.clone(),
            },
            timestamp: humantime::format_rfc3339_millis(f.timestamp).to_string(),
            cell: cell.index,
            bbox: cell.bbox,
            at_edge: cell.unclassified == Some(Unclassified::AtEdge),
            touching: cell.unclassified == Some(Unclassified::Touching),
            centroid: [round1(cell.centroid.0), round1(cell.centroid.1)],
            angle_deg: round1(cell.angle_deg),
            morphometry: cell.size.into(),
            class: v.map(|v| v.class.clone()),
            unclassified: cell.unclassified,
            normal: v.map(|v| v.normal),
            confidence: v.map(|v| v.confidence),
            probs: v.map(|v| {
                classes
                    .iter()
                    .cloned()
                    .zip(v.probs.iter().copied())
                    .collect()
            }),
            model: v.and(work.model.as_deref().map(|m| m.id.clone())),
            latency_ms: (latency_ms * 100.0).round() / 100.0,
            frames_seen: None,
            first_seq: None,
            classified_frames: None,
        }
    }

    pub fn to_line(&self) -> String {
        // A struct of plain fields and string-keyed maps always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn round1(v: f32) -> f32 {
    (v * 10.0).round() / 10.0
}

/// Why a sink could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("records file {path} cannot be opened for appending: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("record socket {addr} cannot be bound: {reason}")]
    Bind { addr: String, reason: String },
    #[error(transparent)]
    Mqtt(#[from] MqttError),
}

/// Every place records go.
pub struct Sinks {
    stdout: Option<BufWriter<std::io::Stdout>>,
    file: Option<FileSink>,
    socket: Option<Broadcaster>,
    mqtt: Option<Mqtt>,
    telemetry: Arc<Telemetry>,
    last_flush: Instant,
}

impl Sinks {
    pub fn open(s: &PublishSettings, telemetry: Arc<Telemetry>) -> Result<Sinks, SinkError> {
        let file = s
            .file
            .as_ref()
            .map(|p| FileSink::open(p, telemetry.clone()))
            .transpose()?;
        let socket = s
            .socket
            .as_ref()
            .map(|a| Broadcaster::bind(a, s.subscriber_queue, telemetry.clone()))
            .transpose()?;
        let mqtt = s
            .mqtt
            .as_ref()
            .map(|m| Mqtt::start(m, telemetry.clone()))
            .transpose()?;
        Ok(Sinks {
            stdout: s.stdout.then(|| BufWriter::new(std::io::stdout())),
            file,
            socket,
            mqtt,
            telemetry,
            last_flush: Instant::now(),
        })
    }

    /// The MQTT sink, for the report and status lines (its queue is shared; it drains and
    /// stops when the last handle is dropped).
    pub fn mqtt(&self) -> Option<Mqtt> {
        self.mqtt.clone()
    }

    /// Where subscribers connect, if a socket is served.
    pub fn socket_addr(&self) -> Option<String> {
        self.socket.as_ref().map(|b| b.addr.clone())
    }

    /// Send one frame's lines to every sink; a frame without cells still lets buffered
    /// records out on time.
    pub fn write(&mut self, lines: &[String]) {
        if !lines.is_empty() {
            self.send(lines);
        }
        if self.last_flush.elapsed() > Duration::from_secs(1) {
            self.flush();
        }
    }

    fn send(&mut self, lines: &[String]) {
        if let Some(out) = &mut self.stdout {
            let ok = lines.iter().all(|l| writeln!(out, "{l}").is_ok()) && out.flush().is_ok();
            if !ok {
                self.telemetry
                    .event(Event::SinkWriteFailed { sink: "stdout" });
            }
        }
        if let Some(f) = &mut self.file {
            f.push(lines);
        }
        if let Some(b) = &self.socket {
            b.send(lines);
        }
        if let Some(m) = &self.mqtt {
            m.records(lines);
        }
    }

    pub fn flush(&mut self) {
        self.last_flush = Instant::now();
        if let Some(f) = &mut self.file {
            f.write_out();
        }
        if let Some(out) = &mut self.stdout {
            let _ = out.flush();
        }
    }

    /// Flush everything and stop serving subscribers.
    pub fn close(mut self) {
        self.flush();
        if let Some(b) = self.socket.take() {
            b.close();
        }
    }
}

/// Pending records written out early once they take this many bytes.
const FILE_PENDING_MAX: usize = 256 * 1024;

/// The appended records file. Records wait in memory as whole lines and go out in one
/// `write` per flush (every second, or sooner past `FILE_PENDING_MAX`), followed by
/// `fdatasync`; a write that fails part way (a full disk) is cut back to the last whole line,
/// its records are counted as lost, and the failure is logged once until a write succeeds
/// again. A file left ending in a partial line (a killed writer) is cut back when opened.
struct FileSink {
    path: PathBuf,
    file: File,
    pending: Vec<u8>,
    pending_records: u64,
    /// Records lost since the current run of failures began (`None`: writes succeed).
    failing: Option<u64>,
    telemetry: Arc<Telemetry>,
}

impl FileSink {
    fn open(path: &std::path::Path, telemetry: Arc<Telemetry>) -> Result<Self, SinkError> {
        let err = |e: std::io::Error| SinkError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let whole = whole_lines_len(&mut file, len).map_err(err)?;
        if whole < len {
            file.set_len(whole).map_err(err)?;
            tracing::warn!(
                path = %path.display(),
                bytes = len - whole,
                "records file ended in a partial line (an earlier run was killed); it was cut off"
            );
        }
        Ok(FileSink {
            path: path.to_path_buf(),
            file,
            pending: Vec::new(),
            pending_records: 0,
            failing: None,
            telemetry,
        })
    }

    fn push(&mut self, lines: &[String]) {
        for l in lines {
            self.pending.extend_from_slice(l.as_bytes());
            self.pending.push(b'\n');
        }
        self.pending_records += lines.len() as u64;
        if self.pending.len() >= FILE_PENDING_MAX {
            self.write_out();
        }
    }

    /// Write the pending lines with one `write_all` and sync them to the disk.
    fn write_out(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let before = self.file.metadata().map(|m| m.len());
        let result = self
            .file
            .write_all(&self.pending)
            .and_then(|()| self.file.sync_data());
        let records = std::mem::take(&mut self.pending_records);
        self.pending.clear();
        match result {
            Ok(()) => {
                if let Some(lost) = self.failing.take() {
                    tracing::info!(
                        path = %self.path.display(),
                        records_lost = lost,
                        "records file takes writes again"
                    );
                }
            }
            Err(e) => {
                // Cut a partly written line off, so the file holds whole records only.
                if let Ok(len) = before
                    && self.file.metadata().is_ok_and(|m| m.len() > len)
                    && let Err(t) = self.file.set_len(len)
                {
                    tracing::warn!(path = %self.path.display(), error = %t, "records file cannot be cut back to its last whole line");
                }
                self.telemetry
                    .event(Event::SinkWriteFailed { sink: "file" });
                self.telemetry.event(Event::SinkRecordsLost {
                    sink: "file",
                    n: records,
                });
                match &mut self.failing {
                    Some(lost) => *lost += records,
                    None => {
                        tracing::warn!(
                            path = %self.path.display(),
                            error = %e,
                            "records file write failed; records are counted as lost until it takes writes again"
                        );
                        self.failing = Some(records);
                    }
                }
            }
        }
    }
}

/// The length of `file` up to and including its last newline (`len` when it is empty or ends
/// in one).
fn whole_lines_len(file: &mut File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

type Subscriber = Sender<Arc<str>>;

/// A subscriber whose socket takes no bytes for this long is cut off.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves records to subscribers of a Unix or TCP socket. Each subscriber has its own
/// bounded queue and writer thread; the publisher only ever `try_send`s.
pub struct Broadcaster {
    addr: String,
    subscribers: Arc<Mutex<Vec<Subscriber>>>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<Vec<JoinHandle<()>>>>,
    unix_path: Option<PathBuf>,
    telemetry: Arc<Telemetry>,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Broadcaster {
    fn bind(
        spec: &SocketAddrSpec,
        queue: usize,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self, SinkError> {
        let bind_err = |addr: String, e: std::io::Error| SinkError::Bind {
            addr,
            reason: e.to_string(),
        };
        let (listener, addr, unix_path) = match spec {
            SocketAddrSpec::Unix(p) => {
                // A socket file left by an earlier run would block the bind.
                if std::fs::symlink_metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(p);
                }
                let name = format!("unix:{}", p.display());
                let l = UnixListener::bind(p).map_err(|e| bind_err(name.clone(), e))?;
                l.set_nonblocking(true)
                    .map_err(|e| bind_err(name.clone(), e))?;
                (Listener::Unix(l), name, Some(p.clone()))
            }
            SocketAddrSpec::Tcp(a) => {
                let l = TcpListener::bind(a).map_err(|e| bind_err(format!("tcp:{a}"), e))?;
                l.set_nonblocking(true)
                    .map_err(|e| bind_err(format!("tcp:{a}"), e))?;
                let local = l.local_addr().unwrap_or(*a);
                warn_if_exposed("record socket", local);
                (Listener::Tcp(l), format!("tcp:{local}"), None)
            }
        };
        let subscribers: Arc<Mutex<Vec<Subscriber>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (subs, stop, tel) = (subscribers.clone(), stop.clone(), telemetry.clone());
            std::thread::Builder::new()
                .name("subscribers".into())
                .spawn(move || accept_loop(listener, subs, stop, queue, tel))
                .map_err(|e| bind_err(addr.clone(), e))?
        };
        Ok(Broadcaster {
            addr,
            subscribers,
            stop,
            acceptor: Some(acceptor),
            unix_path,
            telemetry,
        })
    }

    fn send(&self, lines: &[String]) {
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        if subs.is_empty() {
            return;
        }
        let lines: Vec<Arc<str>> = lines.iter().map(|l| Arc::from(l.as_str())).collect();
        subs.retain(|s| {
            for l in &lines {
                match s.try_send(l.clone()) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => {
                        tracing::warn!("record subscriber dropped: it reads too slowly");
                        self.telemetry.event(Event::SubscriberDropped {
                            reason: SubscriberDropReason::Slow,
                        });
                        return false;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        tracing::info!("record subscriber left");
                        self.telemetry.event(Event::SubscriberDropped {
                            reason: SubscriberDropReason::Gone,
                        });
                        return false;
                    }
                }
            }
            true
        });
    }

    fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let writers = self
            .acceptor
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        // Dropping the senders lets each writer drain its queue and exit.
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for w in writers {
            let _ = w.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn accept_loop(
    listener: Listener,
    subs: Arc<Mutex<Vec<Subscriber>>>,
    stop: Arc<AtomicBool>,
    queue: usize,
    telemetry: Arc<Telemetry>,
) -> Vec<JoinHandle<()>> {
    let mut writers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let stream: Option<Box<dyn Write + Send>> = match &listener {
            Listener::Unix(l) => l.accept().ok().and_then(|(s, _)| {
                s.set_nonblocking(false).ok()?;
                s.set_write_timeout(Some(WRITE_TIMEOUT)).ok()?;
                Some(Box::new(s) as Box<dyn Write + Send>)
            }),
            Listener::Tcp(l) => l.accept().ok().and_then(|(s, _)| {
                s.set_nonblocking(false).ok()?;
                s.set_write_timeout(Some(WRITE_TIMEOUT)).ok()?;
                let _ = s.set_nodelay(true);
                Some(Box::new(s) as Box<dyn Write + Send>)
            }),
        };
        let Some(mut stream) = stream else {
            std::thread::sleep(Duration::from_millis(25));
            writers.retain(|h| !h.is_finished());
            continue;
        };
        let (tx, rx) = bounded::<Arc<str>>(queue);
        subs.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        telemetry.event(Event::SubscriberJoined);
        tracing::info!("record subscriber joined");
        let spawned = std::thread::Builder::new()
            .name("subscriber".into())
            .spawn(move || {
                for line in rx {
                    if stream.write_all(line.as_bytes()).is_err()
                        || stream.write_all(b"\n").is_err()
                    {
                        // Returning drops the receiver; the publisher sees it as gone.
                        return;
                    }
                }
                let _ = stream.flush();
            });
        match spawned {
            Ok(h) => writers.push(h),
            Err(e) => tracing::warn!(error = %e, "subscriber writer thread could not start"),
        }
    }
    writers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::ModelId;
    use crate::daemon::frame::{Frame, ModelRef, StageTimes, Verdict};
    use std::io::{BufRead, BufReader};

    fn work(cells: Vec<Cell>) -> Work {
        Work {
            frame: Frame {
                seq: 3,
                name: "f.png".into(),
                timestamp: std::time::SystemTime::UNIX_EPOCH,
                captured: Instant::now(),
                image: Arc::new(image::RgbImage::new(4, 4)),
            },
            cells,
            times: StageTimes::default(),
            model: Some(Arc::new(ModelRef {
                id: ModelId {
                    name: "m".into(),
                    sha256: "ab".into(),
                },
                classes: vec!["normal".into(), "abnormal".into()],
                normal_class: Some("normal".into()),
                uncertain_below: 0.5,
            })),
            ended_tracks: Vec::new(),
            stain: None,
        }
    }

    fn cell(index: usize, verdict: Option<Verdict>, dropped: Option<CellDropReason>) -> Cell {
        Cell {
            index,
            track: Some(index as u64 + 1),
            head: None,
            bbox: [1, 2, 3, 4],
            centroid: (2.04, 3.06),
            angle_deg: 91.23,
            size: HeadSize::default(),
            unclassified: verdict.is_none().then_some(Unclassified::AtEdge),
            prepared: None,
            verdict,
            dropped,
        }
    }

    #[test]
    fn a_frame_gives_one_record_per_published_cell_and_counts_the_rest() {
        let v = Verdict {
            class: "normal".into(),
            normal: true,
            confidence: 0.8,
            probs: vec![0.8, 0.2],
        };
        let w = work(vec![
            cell(0, Some(v.clone()), None),
            cell(1, None, None),
            cell(2, Some(v), Some(CellDropReason::InferenceError)),
        ]);
        let (records, dropped) = Record::of_frame("s", &w, 12.345);
        assert_eq!(records.len(), 2);
        assert_eq!(dropped[&CellDropReason::InferenceError], 1);
        let r = &records[0];
        assert_eq!(r.probs.as_ref().unwrap()["abnormal"], 0.2);
        assert_eq!(r.model.as_ref().unwrap().name, "m");
        assert_eq!(r.centroid, [2.0, 3.1]);
        assert_eq!(r.latency_ms, 12.35);
        assert_eq!(r.timestamp, "1970-01-01T00:00:00.000Z");
        // The unclassified cell names no model and has no class, and is at the edge.
        let e = &records[1];
        assert!(e.at_edge && e.class.is_none() && e.model.is_none());
        // Lines read back as the same records.
        let back: Record = serde_json::from_str(&r.to_line()).unwrap();
        assert_eq!(&back, r);
    }

    #[test]
    fn the_file_sink_appends_whole_lines_and_flushes_on_close() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        std::fs::write(&path, "{\"earlier\":1}\n").unwrap();
        let s = PublishSettings {
            stdout: false,
            file: Some(path.clone()),
            socket: None,
            subscriber_queue: 4,
            mqtt: None,
        };
        let tel = Arc::new(Telemetry::new());
        let mut sinks = Sinks::open(&s, tel.clone()).unwrap();
        sinks.write(&["{\"a\":1}".to_string(), "{\"b\":2}".to_string()]);
        sinks.close();
        let lines: Vec<String> = BufReader::new(File::open(&path).unwrap())
            .lines()
            .map(Result::unwrap)
            .collect();
        assert_eq!(lines, vec!["{\"earlier\":1}", "{\"a\":1}", "{\"b\":2}"]);
        assert!(tel.counts().sink_write_errors_total.is_empty());
        let bad = PublishSettings {
            file: Some(dir.path().join("no/such/dir/r.jsonl")),
            ..s
        };
        let e = Sinks::open(&bad, tel).err().unwrap().to_string();
        assert!(e.contains("no/such/dir"), "{e}");
    }

    #[test]
    fn a_partial_last_line_is_cut_off_when_the_file_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"b\":").unwrap();
        let tel = Arc::new(Telemetry::new());
        let mut f = FileSink::open(&path, tel.clone()).unwrap();
        f.push(&["{\"c\":3}".to_string()]);
        f.write_out();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"c\":3}\n");
        // No newline at all: nothing whole is kept.
        std::fs::write(&path, "{\"b\":").unwrap();
        drop(FileSink::open(&path, tel).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }

    #[test]
    fn a_full_disk_counts_lost_records_and_logs_once_per_episode() {
        // /dev/full answers every write with ENOSPC.
        let tel = Arc::new(Telemetry::new());
        let mut f = FileSink::open(std::path::Path::new("/dev/full"), tel.clone()).unwrap();
        f.push(&["{}".to_string(), "{}".to_string()]);
        f.write_out();
        f.push(&["{}".to_string()]);
        f.write_out();
        // Nothing pending: no write, no error.
        f.write_out();
        let c = tel.counts();
        assert_eq!(c.sink_write_errors_total["file"], 2);
        assert_eq!(c.sink_records_lost_total["file"], 3);
        assert_eq!(f.failing, Some(3));
        assert!(f.pending.is_empty());
    }

    #[test]
    fn socket_addresses_are_checked() {
        let base = Base(None);
        let raw = |socket: &str| RawPublish {
            socket: Some(socket.into()),
            ..RawPublish::default()
        };
        assert!(raw("unix:/tmp/x.sock").resolve(base).is_ok());
        assert!(raw("tcp:127.0.0.1:9000").resolve(base).is_ok());
        assert!(raw("tcp:10.0.0.1:9000").resolve(base).is_ok());
        for bad in ["tcp:localhost", "udp:1", "unix:"] {
            let e = raw(bad).resolve(base).unwrap_err().to_string();
            assert!(e.contains("publish.socket"), "{bad}: {e}");
        }
    }
}
