//! Process-level service concerns: signals (handlers only set flags), the systemd notify
//! protocol (READY, STATUS, WATCHDOG, RELOADING, STOPPING) and the metrics/health endpoint.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use sd_notify::NotifyState;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::flag;

use crate::daemon::check::{ConfigError, listen_addr, positive, warn_if_exposed};
use crate::daemon::telemetry::Telemetry;

/// `[service]`: running as a service.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawService {
    /// Serve `/metrics` (Prometheus) and `/healthz` here, e.g. "127.0.0.1:9464". Keep it on
    /// loopback; any other address is served with a WARN at start-up. Unset: no endpoint.
    pub metrics_addr: Option<String>,
    /// `/healthz` answers 503 when the source has delivered no frame for this long, seconds.
    pub stall_secs: f32,
    /// Serve the live view (the latest frame with its heads outlined, and the running tally)
    /// here, e.g. "127.0.0.1:9465". Keep it on loopback; any other address is served with a
    /// WARN at start-up. Unset: no view.
    pub view_addr: Option<String>,
}

impl Default for RawService {
    fn default() -> Self {
        Self {
            metrics_addr: None,
            stall_secs: 10.0,
            view_addr: None,
        }
    }
}

/// The service endpoints' resolved settings (one set per process).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ServiceSettings {
    pub metrics_addr: Option<SocketAddr>,
    pub stall_secs: f32,
    pub view_addr: Option<SocketAddr>,
}

impl RawService {
    /// Check every value (no I/O).
    pub fn resolve(&self) -> Result<ServiceSettings, ConfigError> {
        positive("service.stall_secs", self.stall_secs)?;
        Ok(ServiceSettings {
            metrics_addr: self
                .metrics_addr
                .as_deref()
                .map(|a| listen_addr("service.metrics_addr", a))
                .transpose()?,
            stall_secs: self.stall_secs,
            view_addr: self
                .view_addr
                .as_deref()
                .map(|a| listen_addr("service.view_addr", a))
                .transpose()?,
        })
    }
}

/// Exit status when a second stop signal cuts the drain short.
pub const EXIT_INTERRUPTED: i32 = 130;

/// A flag that SIGINT or SIGTERM sets. The first signal asks the pipeline to drain and stop;
/// a second one, while the flag is already set, exits immediately.
pub fn stop_flag() -> io::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // Order matters: the conditional exit sees the flag as the first signal left it.
        flag::register_conditional_shutdown(sig, EXIT_INTERRUPTED, Arc::clone(&stop))?;
        flag::register(sig, Arc::clone(&stop))?;
    }
    Ok(stop)
}

/// A flag that SIGHUP sets: re-read the configuration.
pub fn reload_flag() -> io::Result<Arc<AtomicBool>> {
    let reload = Arc::new(AtomicBool::new(false));
    flag::register(SIGHUP, Arc::clone(&reload))?;
    Ok(reload)
}

/// What the supervisor tells the service manager.
pub trait Notify: Send {
    fn ready(&mut self);
    fn status(&mut self, line: &str);
    fn watchdog(&mut self);
    fn reloading(&mut self);
    fn stopping(&mut self);
    /// How often to ping the watchdog, if the manager expects it.
    fn watchdog_every(&self) -> Option<Duration>;
}

/// The systemd notify protocol, through `NOTIFY_SOCKET`; silent when not run by systemd.
pub struct Systemd {
    watchdog: Option<Duration>,
}

impl Systemd {
    pub fn from_env() -> Self {
        let mut usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(50)));
        Self { watchdog }
    }

    fn send(&self, state: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(false, state) {
            tracing::debug!(error = %e, "service manager notification failed");
        }
    }
}

impl Notify for Systemd {
    fn ready(&mut self) {
        self.send(&[NotifyState::Ready]);
    }
    fn status(&mut self, line: &str) {
        self.send(&[NotifyState::Status(line)]);
    }
    fn watchdog(&mut self) {
        self.send(&[NotifyState::Watchdog]);
    }
    fn reloading(&mut self) {
        self.send(&[NotifyState::Reloading]);
    }
    fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping]);
    }
    fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog
    }
}

/// Why an HTTP endpoint cannot start.
#[derive(Debug, thiserror::Error)]
#[error("{what} {addr} cannot be served: {reason}")]
pub struct HttpError {
    pub what: &'static str,
    pub addr: SocketAddr,
    pub reason: String,
}

/// One answer: status, content type, body.
pub type Answer = (u16, &'static str, Vec<u8>);

/// A small HTTP endpoint on its own named thread: every request's URL goes to `answer`.
/// `/metrics` and the live view are served this way.
pub struct HttpServer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl HttpServer {
    pub fn start(
        what: &'static str,
        addr: SocketAddr,
        answer: impl Fn(&str) -> Answer + Send + 'static,
    ) -> Result<HttpServer, HttpError> {
        let err = |reason: String| HttpError { what, addr, reason };
        let server = tiny_http::Server::http(addr).map_err(|e| err(e.to_string()))?;
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        warn_if_exposed(what, bound);
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(what.replace(' ', "-"))
                .spawn(move || serve(what, &server, &answer, &stop))
                .map_err(|e| err(e.to_string()))?
        };
        Ok(HttpServer {
            stop,
            handle: Some(handle),
            addr: bound,
        })
    }

    pub fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(
    what: &str,
    server: &tiny_http::Server,
    answer: &dyn Fn(&str) -> Answer,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        let request = match server.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed");
                return;
            }
        };
        let (code, kind, body) = answer(request.url());
        let mut response = tiny_http::Response::from_data(body).with_status_code(code);
        for (k, v) in [("Content-Type", kind), ("Cache-Control", "no-store")] {
            if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
                response.add_header(h);
            }
        }
        let _ = request.respond(response);
    }
}

/// `/metrics` (Prometheus text format) and `/healthz` (200 while frames flow, 503 when a
/// source has stalled longer than `stall`) for the pipelines' telemetry.
pub fn metrics_server(
    addr: SocketAddr,
    telemetry: Vec<(String, Arc<Telemetry>)>,
    stall: Duration,
) -> Result<HttpServer, HttpError> {
    HttpServer::start("metrics endpoint", addr, move |url| {
        metrics_answer(url, &telemetry, stall)
    })
}

fn metrics_answer(url: &str, tel: &[(String, Arc<Telemetry>)], stall: Duration) -> Answer {
    let text = "text/plain; charset=utf-8";
    match url {
        "/metrics" => (
            200,
            crate::daemon::telemetry::CONTENT_TYPE,
            crate::daemon::telemetry::render(tel).into_bytes(),
        ),
        "/healthz" => {
            let stalled: Vec<String> = tel
                .iter()
                .filter_map(|(sample, t)| {
                    let quiet = t.stalled_for();
                    (quiet > stall).then(|| {
                        format!(
                            "stalled: sample {sample}: no frame for {:.1} s",
                            quiet.as_secs_f32()
                        )
                    })
                })
                .collect();
            if stalled.is_empty() {
                (200, text, b"ok\n".to_vec())
            } else {
                (503, text, (stalled.join("\n") + "\n").into_bytes())
            }
        }
        _ => (404, text, b"not found: try /metrics or /healthz\n".to_vec()),
    }
}
