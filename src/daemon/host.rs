//! One process, several microscopes: every pipeline prepared (models loaded, sources opened)
//! before any starts, one `/metrics` endpoint for all, SIGHUP re-reading the config file
//! for each, one thread per pipeline, and the report and summary files written at the end.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::daemon::check::invalid;
use crate::daemon::config::{RawConfig, Settings};
use crate::daemon::pipeline::{self, Control, Outcome, RunError, StartError};
use crate::daemon::report::ReportOutput;
use crate::daemon::service::{self, HttpError, HttpServer};
use crate::daemon::supervisor::Reread;
use crate::daemon::telemetry::Telemetry;
use crate::daemon::view::view_server;

/// Why the pipelines could not be started.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot start sample {sample}: {error}")]
    Start { sample: String, error: StartError },
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("cannot start a pipeline thread: {0}")]
    Spawn(std::io::Error),
}

/// How one pipeline ended.
pub struct Finished {
    pub settings: Settings,
    pub outcome: Result<Outcome, RunError>,
}

/// Run one pipeline per settings until every source ends or a stop signal drains them.
/// `config` is the file a daemon re-reads on SIGHUP (none for replay); then the first
/// pipeline also speaks to systemd.
pub fn run_all(all: Vec<Settings>, config: Option<&Path>) -> Result<Vec<Finished>, HostError> {
    let stop = service::stop_flag().map_err(HostError::Signals)?;
    let mut prepared = Vec::new();
    for settings in all {
        let telemetry = Arc::new(Telemetry::new());
        let ready = pipeline::prepare(settings.clone(), telemetry.clone()).map_err(|source| {
            HostError::Start {
                sample: settings.sample_id().to_string(),
                error: source,
            }
        })?;
        tracing::info!("starting: {}", ready.describe());
        if let Some(a) = ready.socket_addr() {
            tracing::info!(socket = %a, sample = %settings.sample_id(), "serving records");
        }
        prepared.push((settings, telemetry, ready));
    }
    let metrics = match prepared.first().map(|p| &p.0.process.service) {
        Some(svc) if svc.metrics_addr.is_some() => {
            let parts = prepared
                .iter()
                .map(|(s, t, _)| (s.sample_id().to_string(), t.clone()))
                .collect();
            let stall = Duration::from_secs_f32(svc.stall_secs);
            let addr = svc
                .metrics_addr
                .unwrap_or_else(|| ([127, 0, 0, 1], 0).into());
            let m = service::metrics_server(addr, parts, stall)?;
            tracing::info!(addr = %m.addr, "serving /metrics and /healthz");
            Some(m)
        }
        _ => None,
    };
    let view = start_view(&prepared)?;
    let mut running = Vec::new();
    for (i, (settings, _, ready)) in prepared.into_iter().enumerate() {
        let mut control = Control::stop_only(stop.clone());
        if let Some(path) = config {
            let flag = service::reload_flag().map_err(HostError::Signals)?;
            control.reload = Some((flag, reread(path, settings.sample_id())));
            // One voice to the service manager: the first pipeline's.
            if i == 0 {
                control.notify = Some(Box::new(service::Systemd::from_env()));
            }
        }
        let handle = std::thread::Builder::new()
            .name(format!("pipeline-{i}"))
            .spawn(move || pipeline::run(ready, control))
            .map_err(HostError::Spawn)?;
        running.push((settings, handle));
    }
    let finished = running
        .into_iter()
        .map(|(settings, handle)| Finished {
            outcome: handle
                .join()
                .unwrap_or(Err(RunError::StageFailed("pipeline".into()))),
            settings,
        })
        .collect();
    if let Some(m) = metrics {
        m.close();
    }
    if let Some(v) = view {
        v.close();
    }
    Ok(finished)
}

/// The live view of every pipeline, when `service.view_addr` asks for one.
fn start_view(
    prepared: &[(Settings, Arc<Telemetry>, pipeline::Ready)],
) -> Result<Option<HttpServer>, HostError> {
    let Some(addr) = prepared.first().and_then(|p| p.0.process.service.view_addr) else {
        return Ok(None);
    };
    let views = prepared
        .iter()
        .filter_map(|(s, _, r)| r.view().map(|v| (s.sample_id().to_string(), v)))
        .collect();
    let v = view_server(addr, views)?;
    tracing::info!(addr = %v.addr, "serving the live view at http://{}/", v.addr);
    Ok(Some(v))
}

/// Re-read `path` for the pipeline of `sample`, through the start-up path.
fn reread(path: &Path, sample: &str) -> Reread {
    let (path, sample): (PathBuf, String) = (path.to_path_buf(), sample.to_string());
    Box::new(move || {
        RawConfig::load(&path)?
            .resolve_all(path.parent())?
            .into_iter()
            .find(|s| s.sample_id() == sample)
            .ok_or_else(|| {
                invalid(
                    "microscopes",
                    format!("the config no longer has sample '{sample}'"),
                )
            })
    })
}

/// Why the report or summary could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the {what} to {path}: {error}")]
pub struct OutputError {
    pub what: &'static str,
    pub path: PathBuf,
    pub error: std::io::Error,
}

/// Log the run's accounting and write the report and summary files its settings name.
pub fn write_outputs(o: &Outcome, out: &ReportOutput) -> Result<(), OutputError> {
    let c = &o.counts;
    tracing::info!(
        stopped_by_signal = o.stopped,
        frames_seen = c.frames_seen_total,
        frames_published = c.frames_published_total,
        frames_dropped = c.frames_dropped(),
        cells_found = c.cells_found_total,
        cells_published = c.cells_published_total,
        cells_dropped = c.cells_dropped(),
        "run finished"
    );
    if !c.balanced() {
        tracing::error!(?c, "frame or cell accounting does not add up");
    }
    let write = |what: &'static str, path: &Path, json: String| {
        std::fs::write(path, json + "\n").map_err(|source| OutputError {
            what,
            path: path.to_path_buf(),
            error: source,
        })
    };
    if let Some(p) = &out.file {
        write("report", p, pretty(&o.report))?;
    }
    if let Some(p) = &out.summary_file {
        write("run summary", p, pretty(o))?;
    }
    Ok(())
}

fn pretty<T: serde::Serialize>(v: &T) -> String {
    // Plain structs of numbers, strings and string-keyed maps always serialize.
    serde_json::to_string_pretty(v).unwrap_or_default()
}
