//! The MQTT sink (`[publish.mqtt]`, rumqttc): records, the sample report and status lines to a
//! broker, so several microscopes' results gather in one place. Topics, under a prefix:
//! `PREFIX/SAMPLE/cells` (one message per cell record), `PREFIX/SAMPLE/detections` (one per
//! detection record), `PREFIX/SAMPLE/report` (retained) and `PREFIX/SAMPLE/status` (retained;
//! the last will says `offline`). QoS 1 throughout.
//!
//! The pipeline never waits on the broker: messages go into a bounded queue (`try_send`; a full
//! queue drops the message and counts it). One named thread owns the connection: a one-thread
//! runtime drives rumqttc's event loop in a task that is never cancelled, and a control task
//! hands it at most `WINDOW` messages at a time, in order, only while connected. A message
//! leaves the queue for good only when the broker acknowledges it; when the connection drops,
//! every unacknowledged message is sent again, in order, once the broker is back (clean
//! sessions: rumqttc keeps nothing across a reconnection, so nothing is sent twice by it).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Incoming, LastWill, MqttOptions, Outgoing, QoS};
use serde::{Deserialize, Serialize};

use crate::daemon::check::{Base, ConfigError, invalid, positive};
use crate::daemon::telemetry::{Counts, Event as TelEvent, MqttDropReason, Telemetry};

/// `[publish.mqtt]`: results to an MQTT broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawMqtt {
    /// The broker: `mqtt://HOST[:PORT]` (1883 by default) or `mqtts://HOST[:PORT]` (TLS, 8883).
    pub broker: Option<String>,
    /// First topic level; messages go to `PREFIX/SAMPLE/cells`, `.../detections`,
    /// `.../report` and `.../status`.
    pub topic_prefix: String,
    /// MQTT client id. Unset: `spermscope-SAMPLE`. Each pipeline needs its own.
    pub client_id: Option<String>,
    /// Also publish detection records (one per head per frame) on `PREFIX/SAMPLE/detections`.
    pub detections: bool,
    /// PEM file of the certificate authorities a `mqtts://` broker's certificate is checked
    /// against. Unset: the system's (`/etc/ssl/certs/ca-certificates.crt`).
    pub ca_file: Option<PathBuf>,
    /// A file whose first line is the user name and second line the password. Credentials are
    /// never written in this config.
    pub credentials_file: Option<PathBuf>,
    /// Messages held while the broker is away or slow; past that, new ones are dropped and
    /// counted in `mqtt_messages_dropped_total{reason="queue_full"}`.
    pub queue: usize,
    /// Seconds between keep-alive pings.
    pub keep_alive_secs: u64,
    /// At shutdown, seconds to wait for the broker to acknowledge what is queued; what is left
    /// then is counted as `unsent_at_exit`.
    pub drain_secs: f32,
}

impl Default for RawMqtt {
    fn default() -> Self {
        Self {
            broker: None,
            topic_prefix: "spermscope".into(),
            client_id: None,
            detections: true,
            ca_file: None,
            credentials_file: None,
            queue: 10_000,
            keep_alive_secs: 30,
            drain_secs: 10.0,
        }
    }
}

/// The system's certificate authorities on Debian.
const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The sink's resolved settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub ca_file: PathBuf,
    pub topic_prefix: String,
    /// Set by `for_sample`.
    pub sample: String,
    pub client_id: Option<String>,
    pub detections: bool,
    pub credentials_file: Option<PathBuf>,
    pub queue: usize,
    pub keep_alive_secs: u64,
    pub drain_secs: f32,
}

/// Whether text can stand as one topic level.
fn topic_level_ok(s: &str) -> bool {
    !s.is_empty() && !s.contains(['+', '#', '/']) && !s.chars().any(char::is_control)
}

/// `mqtt://host[:port]` or `mqtts://host[:port]` (an IPv6 host in brackets).
fn parse_broker(url: &str) -> Result<(String, u16, bool), ConfigError> {
    const KEY: &str = "publish.mqtt.broker";
    let (rest, tls) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false)
    } else {
        return Err(invalid(
            KEY,
            format!("'{url}' must start with mqtt:// or mqtts://"),
        ));
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid(KEY, format!("'{url}': unclosed [")))?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => return Err(invalid(KEY, format!("'{url}' is not HOST[:PORT]"))),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() || host.contains(['/', '@', '?']) {
        return Err(invalid(KEY, format!("'{url}' has no usable host")));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| invalid(KEY, format!("'{url}': port must be 1..=65535")))?,
        None => default_port,
    };
    Ok((host.to_string(), port, tls))
}

impl RawMqtt {
    /// Check every value (no I/O); `None` when no broker is named.
    pub fn resolve(&self, base: Base<'_>) -> Result<Option<MqttSettings>, ConfigError> {
        let Some(url) = &self.broker else {
            return Ok(None);
        };
        let (host, port, tls) = parse_broker(url)?;
        if !self.topic_prefix.split('/').all(topic_level_ok) {
            return Err(invalid(
                "publish.mqtt.topic_prefix",
                "must be topic levels separated by /, without + or # or empty levels",
            ));
        }
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 128)
        {
            return Err(invalid(
                "publish.mqtt.client_id",
                "must be 1 to 128 characters",
            ));
        }
        if self.queue == 0 {
            return Err(invalid("publish.mqtt.queue", "must be at least 1"));
        }
        if self.keep_alive_secs < 5 {
            return Err(invalid(
                "publish.mqtt.keep_alive_secs",
                "must be at least 5",
            ));
        }
        positive("publish.mqtt.drain_secs", self.drain_secs)?;
        Ok(Some(MqttSettings {
            host,
            port,
            tls,
            ca_file: self
                .ca_file
                .as_deref()
                .map_or_else(|| PathBuf::from(SYSTEM_CA_FILE), |p| base.path(p)),
            topic_prefix: self.topic_prefix.clone(),
            sample: String::new(),
            client_id: self.client_id.clone(),
            detections: self.detections,
            credentials_file: self.credentials_file.as_deref().map(|p| base.path(p)),
            queue: self.queue,
            keep_alive_secs: self.keep_alive_secs,
            drain_secs: self.drain_secs,
        }))
    }
}

impl MqttSettings {
    /// The settings for one pipeline: its sample id is a topic level.
    pub fn for_sample(mut self, sample: &str) -> Result<Self, ConfigError> {
        if !topic_level_ok(sample) {
            return Err(invalid(
                "sample.id",
                format!("'{sample}' is an MQTT topic level here: it must not hold /, + or #"),
            ));
        }
        self.sample = sample.to_string();
        Ok(self)
    }

    fn topic(&self, leaf: &str) -> String {
        format!("{}/{}/{leaf}", self.topic_prefix, self.sample)
    }
}

/// Why the MQTT sink cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT credentials file {path}: {reason}")]
    Credentials { path: PathBuf, reason: String },
    #[error("MQTT TLS: certificate authorities from {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    #[error("MQTT sink thread could not start: {0}")]
    Spawn(std::io::Error),
}

/// User name and password from a file: first line, second line.
fn read_credentials(path: &Path) -> Result<(String, String), MqttError> {
    let err = |reason: String| MqttError::Credentials {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut lines = text.lines();
    let user = lines.next().unwrap_or_default().trim_end_matches('\r');
    let pass = lines.next().unwrap_or_default().trim_end_matches('\r');
    if user.is_empty() {
        return Err(err("the first line (the user name) is empty".into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o004 != 0) {
            tracing::warn!(path = %path.display(), "the MQTT credentials file is readable by every user; chmod o-r it");
        }
    }
    Ok((user.to_string(), pass.to_string()))
}

fn tls_transport(s: &MqttSettings) -> Result<rumqttc::Transport, MqttError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let err = |reason: String| MqttError::Tls {
        path: s.ca_file.clone(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&s.ca_file).map_err(|e| err(e.to_string()))?;
    for c in certs {
        roots
            .add(c.map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::Transport::tls_with_config(
        rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
    ))
}

/// One message to the broker.
#[derive(Debug, Clone)]
struct Message {
    topic: Arc<str>,
    payload: Arc<str>,
    retain: bool,
}

/// Messages handed to rumqttc and not yet acknowledged, at most.
const WINDOW: usize = 64;
/// Largest packet either way (a report is a few kB).
const MAX_PACKET: usize = 1 << 20;

/// Joins the sink's thread when the last handle goes.
struct Joiner(Mutex<Option<JoinHandle<()>>>);

impl Drop for Joiner {
    fn drop(&mut self) {
        let handle = self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// A handle on the MQTT sink. Clones share the queue; when the last one is dropped the
/// thread drains the queue (up to `drain_secs`), disconnects and is joined.
#[derive(Clone)]
pub struct Mqtt {
    // Dropped before `_joiner` (held for its Drop, which joins the thread), so the thread sees the queue close before it is joined.
    tx: flume::Sender<Message>,
    topics: Arc<Topics>,
    detections: bool,
    telemetry: Arc<Telemetry>,
    /// Whether a full queue has been logged since the queue last had room.
    full_logged: Arc<AtomicBool>,
    _joiner: Arc<Joiner>,
}

struct Topics {
    sample: String,
    cells: Arc<str>,
    detections: Arc<str>,
    report: Arc<str>,
    status: Arc<str>,
}

impl Mqtt {
    /// Read the credentials and CA file, and start the sink's thread (it connects on its own;
    /// a broker that is down at start-up is retried like one that goes away later).
    pub fn start(s: &MqttSettings, telemetry: Arc<Telemetry>) -> Result<Mqtt, MqttError> {
        let client_id = s
            .client_id
            .clone()
            .unwrap_or_else(|| format!("spermscope-{}", s.sample));
        let mut options = MqttOptions::new(client_id, s.host.clone(), s.port);
        options
            .set_keep_alive(Duration::from_secs(s.keep_alive_secs))
            .set_clean_session(true)
            .set_inflight(WINDOW as u16 + 1)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        let topics = Arc::new(Topics {
            sample: s.sample.clone(),
            cells: s.topic("cells").into(),
            detections: s.topic("detections").into(),
            report: s.topic("report").into(),
            status: s.topic("status").into(),
        });
        let will = serde_json::json!({"sample": s.sample, "state": "offline"}).to_string();
        options.set_last_will(LastWill::new(
            topics.status.to_string(),
            will,
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(path) = &s.credentials_file {
            let (user, pass) = read_credentials(path)?;
            if !s.tls && !is_loopback(&s.host) {
                tracing::warn!(broker = %s.host, "MQTT credentials go to a broker on another host without TLS; use mqtts://");
            }
            options.set_credentials(user, pass);
        }
        if s.tls {
            options.set_transport(tls_transport(s)?);
        }
        let (tx, rx) = flume::bounded::<Message>(s.queue);
        let broker = format!(
            "{}://{}:{}",
            if s.tls { "mqtts" } else { "mqtt" },
            s.host,
            s.port
        );
        let (tel, drain) = (telemetry.clone(), Duration::from_secs_f32(s.drain_secs));
        let handle = std::thread::Builder::new()
            .name("mqtt".into())
            .spawn(move || run(options, rx, &tel, drain, &broker))
            .map_err(MqttError::Spawn)?;
        Ok(Mqtt {
            tx,
            topics,
            detections: s.detections,
            telemetry,
            full_logged: Arc::new(AtomicBool::new(false)),
            _joiner: Arc::new(Joiner(Mutex::new(Some(handle)))),
        })
    }

    fn send(&self, topic: &Arc<str>, payload: Arc<str>, retain: bool) {
        let m = Message {
            topic: topic.clone(),
            payload,
            retain,
        };
        match self.tx.try_send(m) {
            Ok(()) => self.full_logged.store(false, Ordering::Relaxed),
            Err(_) => {
                self.telemetry.event(TelEvent::MqttDropped {
                    reason: MqttDropReason::QueueFull,
                    n: 1,
                });
                if !self.full_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "MQTT queue full (the broker is away or slow): messages are dropped and counted until it has room"
                    );
                }
            }
        }
    }

    /// Record lines, each to its topic by kind: cell records on `.../cells`, detections on
    /// `.../detections` (when asked for).
    pub fn records(&self, lines: &[String]) {
        for l in lines {
            if is_cell_record(l) {
                self.send(&self.topics.cells, Arc::from(l.as_str()), false);
            } else if self.detections {
                self.send(&self.topics.detections, Arc::from(l.as_str()), false);
            }
        }
    }

    /// The sample report, retained.
    pub fn report<T: Serialize>(&self, report: &T) {
        if let Ok(text) = serde_json::to_string(report) {
            let topic = self.topics.report.clone();
            self.send(&topic, text.into(), true);
        }
    }

    /// A status line with the figures behind it and the drift judgement, retained. `state` is
    /// `running` or `stopped` (the last will says `offline`).
    pub fn status(
        &self,
        state: &str,
        line: &str,
        c: &Counts,
        estimate: Option<(u64, f64)>,
        drift: bool,
    ) {
        let v = serde_json::json!({
            "sample": self.topics.sample,
            "state": state,
            "status": line,
            "frames_seen": c.frames_seen_total,
            "frames_published": c.frames_published_total,
            "frames_dropped": c.frames_dropped(),
            "cells": c.tracks_ended_total,
            "detections": c.cells_published_total,
            "source_up": c.source_up,
            "estimated_accuracy": estimate.map(|e| e.1),
            "estimate_detections": estimate.map(|e| e.0),
            "drift_suspected": drift,
        });
        let topic = self.topics.status.clone();
        self.send(&topic, v.to_string().into(), true);
    }
}

/// Whether a record line is a cell record. Records are serialized by `publish::Record`, whose
/// second field is `kind`; quotes inside JSON strings are escaped, so the text `"kind":"cell"`
/// can only be that field.
fn is_cell_record(line: &str) -> bool {
    line.contains("\"kind\":\"cell\"")
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The sink's thread: a one-thread runtime with the event loop task and the control task.
fn run(
    options: MqttOptions,
    rx: flume::Receiver<Message>,
    tel: &Telemetry,
    drain: Duration,
    broker: &str,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "MQTT sink cannot start its runtime; nothing is sent");
            return;
        }
    };
    runtime.block_on(async {
        let (client, eventloop) = AsyncClient::new(options, WINDOW * 2);
        let (ev_tx, ev_rx) = flume::unbounded();
        let net = tokio::spawn(drive(eventloop, ev_tx));
        let mut control = Control {
            client,
            retry: VecDeque::new(),
            inflight: VecDeque::new(),
            connected: false,
            ever_connected: false,
            broker,
            tel,
        };
        control.run(&rx, &ev_rx, drain).await;
        net.abort();
    });
}

/// What the event loop task reports.
enum NetEvent {
    ConnAck,
    Sent(u16),
    Acked(u16),
    Lost(String),
}

/// Poll rumqttc's event loop for ever (this future is never cancelled mid-poll, so no packet
/// is half written); on a connection error, wait with backoff before the next attempt.
async fn drive(mut eventloop: EventLoop, events: flume::Sender<NetEvent>) {
    const FIRST: Duration = Duration::from_millis(250);
    let mut backoff = FIRST;
    loop {
        let ev = match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                backoff = FIRST;
                NetEvent::ConnAck
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => NetEvent::Sent(pkid),
            Ok(Event::Incoming(Incoming::PubAck(a))) => NetEvent::Acked(a.pkid),
            Ok(_) => continue,
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(e) => {
                let lost = NetEvent::Lost(e.to_string());
                if events.send(lost).is_err() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if events.send(ev).is_err() {
            return;
        }
    }
}

/// A message handed to rumqttc: its packet id once sent, and whether the broker has it.
struct Inflight {
    pkid: Option<u16>,
    acked: bool,
    msg: Message,
}

/// The queue's order and delivery: what to send next, what is in flight, what goes again.
struct Control<'a> {
    client: AsyncClient,
    /// Messages to send before any new one (unacknowledged when the connection dropped).
    retry: VecDeque<Message>,
    inflight: VecDeque<Inflight>,
    connected: bool,
    ever_connected: bool,
    broker: &'a str,
    tel: &'a Telemetry,
}

impl Control<'_> {
    async fn run(
        &mut self,
        rx: &flume::Receiver<Message>,
        events: &flume::Receiver<NetEvent>,
        drain: Duration,
    ) {
        let mut closing: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            if closing.is_none() && rx.is_disconnected() {
                closing = Some(Instant::now());
            }
            if self.connected {
                self.feed(rx);
            }
            let idle = self.retry.is_empty() && self.inflight.is_empty() && rx.is_empty();
            if let Some(since) = closing
                && (idle || since.elapsed() >= drain)
            {
                self.finish(rx.len()).await;
                return;
            }
            let room = self.connected && self.retry.is_empty() && self.inflight.len() < WINDOW;
            let more = !(rx.is_disconnected() && rx.is_empty());
            tokio::select! {
                biased;
                ev = events.recv_async() => match ev {
                    Ok(ev) => self.handle(ev),
                    Err(_) => {
                        self.finish(rx.len()).await;
                        return;
                    }
                },
                m = rx.recv_async(), if room && more => {
                    if let Ok(m) = m {
                        self.retry.push_back(m);
                    }
                }
                _ = tick.tick() => {}
            }
        }
    }

    /// Hand rumqttc the next messages in order while the window has room.
    fn feed(&mut self, rx: &flume::Receiver<Message>) {
        while self.inflight.len() < WINDOW {
            let Some(m) = self.retry.pop_front().or_else(|| rx.try_recv().ok()) else {
                return;
            };
            let sent = self.client.try_publish(
                m.topic.to_string(),
                QoS::AtLeastOnce,
                m.retain,
                m.payload.as_bytes().to_vec(),
            );
            match sent {
                Ok(()) => self.inflight.push_back(Inflight {
                    pkid: None,
                    acked: false,
                    msg: m,
                }),
                Err(_) => {
                    self.retry.push_front(m);
                    return;
                }
            }
        }
    }

    fn handle(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::ConnAck => {
                self.connected = true;
                self.tel.event(TelEvent::MqttConnected);
                if self.ever_connected {
                    tracing::info!(broker = %self.broker, resend = self.retry.len(), "MQTT broker back; queued messages follow in order");
                } else {
                    tracing::info!(broker = %self.broker, "MQTT broker connected");
                }
                self.ever_connected = true;
            }
            NetEvent::Sent(pkid) => {
                if let Some(f) = self.inflight.iter_mut().find(|f| f.pkid.is_none()) {
                    f.pkid = Some(pkid);
                }
            }
            NetEvent::Acked(pkid) => {
                if let Some(f) = self
                    .inflight
                    .iter_mut()
                    .find(|f| f.pkid == Some(pkid) && !f.acked)
                {
                    f.acked = true;
                }
                let mut n = 0;
                while self.inflight.front().is_some_and(|f| f.acked) {
                    self.inflight.pop_front();
                    n += 1;
                }
                if n > 0 {
                    self.tel.event(TelEvent::MqttDelivered { n });
                }
            }
            NetEvent::Lost(reason) => {
                if self.connected {
                    tracing::warn!(broker = %self.broker, %reason, "MQTT broker connection lost; messages are queued and retried with backoff");
                    self.tel.event(TelEvent::MqttDisconnected);
                } else {
                    tracing::debug!(broker = %self.broker, %reason, "MQTT broker not reachable");
                }
                self.connected = false;
                // Unacknowledged messages go again, first, in their order (rumqttc starts each
                // connection with a clean session and keeps none of them).
                for f in self.inflight.drain(..).rev() {
                    if !f.acked {
                        self.retry.push_front(f.msg);
                    }
                }
            }
        }
    }

    /// Count what could not be delivered and say goodbye to the broker.
    async fn finish(&mut self, queued: usize) {
        let left = self.retry.len() + self.inflight.iter().filter(|f| !f.acked).count() + queued;
        if left > 0 {
            tracing::warn!(broker = %self.broker, messages = left, "MQTT messages not delivered by shutdown");
            self.tel.event(TelEvent::MqttDropped {
                reason: MqttDropReason::UnsentAtExit,
                n: left as u64,
            });
        }
        if self.connected {
            let _ = self.client.try_disconnect();
            // Let the event loop write the DISCONNECT.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_and_topics_are_checked() {
        assert_eq!(
            parse_broker("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            parse_broker("mqtts://broker.lab").unwrap(),
            ("broker.lab".into(), 8883, true)
        );
        assert_eq!(
            parse_broker("mqtt://[::1]:9").unwrap(),
            ("::1".into(), 9, false)
        );
        for bad in [
            "tcp://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:x",
            "mqtt://u@h",
        ] {
            let e = parse_broker(bad).unwrap_err().to_string();
            assert!(e.contains("publish.mqtt.broker"), "{bad}: {e}");
        }
        let raw = |prefix: &str| RawMqtt {
            broker: Some("mqtt://127.0.0.1".into()),
            topic_prefix: prefix.into(),
            ..RawMqtt::default()
        };
        let s = raw("lab/andrology").resolve(Base(None)).unwrap().unwrap();
        let s = s.for_sample("S-17").unwrap();
        assert_eq!(s.topic("cells"), "lab/andrology/S-17/cells");
        assert!(s.clone().for_sample("a/b").is_err());
        assert!(s.for_sample("a+").is_err());
        for bad in ["", "a//b", "a/#", "+"] {
            assert!(raw(bad).resolve(Base(None)).is_err(), "{bad}");
        }
        assert!(RawMqtt::default().resolve(Base(None)).unwrap().is_none());
    }

    #[test]
    fn cell_records_are_told_from_detections_by_their_kind_field() {
        assert!(is_cell_record(r#"{"sample":"s","kind":"cell","track":1}"#));
        assert!(!is_cell_record(r#"{"sample":"s","kind":"detection"}"#));
        // A sample id cannot fake it: its quotes are escaped.
        let tricky = serde_json::json!({"sample": "\"kind\":\"cell\"", "kind": "detection"});
        assert!(!is_cell_record(&tricky.to_string()));
    }

    #[test]
    fn credentials_come_from_two_lines_of_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cred");
        std::fs::write(&p, "lab\ns3cret:with:colons\n").unwrap();
        assert_eq!(
            read_credentials(&p).unwrap(),
            ("lab".to_string(), "s3cret:with:colons".to_string())
        );
        std::fs::write(&p, "\n").unwrap();
        assert!(
            read_credentials(&p)
                .unwrap_err()
                .to_string()
                .contains("user name")
        );
        let e = read_credentials(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("credentials file"), "{e}");
    }
}
