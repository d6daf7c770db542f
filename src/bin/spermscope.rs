//! `spermscope`: the daemon's command line (run, replay, validate, report). Argument handling
//! and exit codes only; the work is in the library.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spermscope::config::{ConfigError, RawConfig, Settings, SourceKind};
use spermscope::pipeline::{self, Control, Outcome, Reread, StartError};
use spermscope::publish::Record;
use spermscope::report::{Drift, Report, Seen, Tally};
use spermscope::service;
use spermscope::telemetry::Telemetry;

/// sysexits EX_CONFIG: the configuration (or a model it names) cannot be used.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Sperm morphology daemon: heads found, turned upright, classified"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon on the source its config names, until the source ends or SIGTERM/SIGINT.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config (and the model and source it names) without starting; exit 0 or 78.
    Validate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Replay recorded frames (a folder or glob) through the pipeline. With no config, the
    /// embedded defaults and the bundled SMIDS model are used.
    Replay(ReplayArgs),
    /// List the cameras (V4L2 devices) and the formats each offers.
    Cameras,
    /// Build the sample report(s) from a records file (JSON Lines), one per sample.
    Report {
        records: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Classes kept out of % normal forms (not sperm).
        #[arg(long, default_value = "non-sperm", value_delimiter = ',')]
        exclude: Vec<String>,
        /// Cells needed for a valid assessment.
        #[arg(long, default_value_t = 200)]
        min_cells: usize,
        /// The model card's accuracy (0-1): warn when the label-free estimate falls more than
        /// --drift-margin below it.
        #[arg(long)]
        reference_accuracy: Option<f64>,
        #[arg(long, default_value_t = 0.05)]
        drift_margin: f64,
    },
}

#[derive(clap::Args, Debug)]
struct ReplayArgs {
    /// Folder of frames (name order) or a glob such as 'run1/*.png'.
    path: PathBuf,
    #[arg(long)]
    config: Option<PathBuf>,
    /// Append records here instead of printing them.
    #[arg(long)]
    records: Option<PathBuf>,
    /// Write the sample report as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the run's accounting and latency figures as JSON here.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Pace the replay at this many frames per second (0: as fast as possible).
    #[arg(long)]
    fps: Option<f32>,
    /// Decode every frame before starting (throughput without decoding).
    #[arg(long)]
    preload: bool,
    /// Start over after the last frame.
    #[arg(long = "loop")]
    repeat: bool,
    /// Behave as a live camera: drop the oldest queued frame when behind.
    #[arg(long)]
    live: bool,
    /// Sample id for the records and the report.
    #[arg(long)]
    sample: Option<String>,
}

fn main() -> ExitCode {
    spermscope::cli::init_logging("info,ort=warn");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => load(&config).and_then(|s| run(s, Some(config))),
        Command::Cameras => cameras().map_err(Failure::Other),
        Command::Validate { config } => validate(&config),
        Command::Replay(args) => replay_settings(args).and_then(|s| run(vec![s], None)),
        Command::Report {
            records,
            json,
            exclude,
            min_cells,
            reference_accuracy,
            drift_margin,
        } => {
            let drift = reference_accuracy.map(|reference| Drift {
                reference,
                margin: drift_margin,
            });
            offline_report(&records, json, &exclude, min_cells, drift).map_err(Failure::Other)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Failure::Other(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How a command failed: a config problem (exit 78) or anything else (exit 1).
enum Failure {
    Config(anyhow::Error),
    Other(anyhow::Error),
}

fn config_failure(e: ConfigError) -> Failure {
    Failure::Config(anyhow::Error::new(e))
}

fn start_failure(e: StartError) -> Failure {
    let config = e.is_config();
    let e = anyhow::Error::new(e).context("cannot start");
    if config {
        Failure::Config(e)
    } else {
        Failure::Other(e)
    }
}

fn load(path: &Path) -> Result<Vec<Settings>, Failure> {
    let raw = RawConfig::load(path).map_err(config_failure)?;
    raw.resolve_all(path.parent()).map_err(config_failure)
}

fn validate(path: &Path) -> Result<(), Failure> {
    for settings in load(path)? {
        let (classifier, _) = pipeline::load_classifier(&settings).map_err(start_failure)?;
        pipeline::load_verifier(&settings).map_err(start_failure)?;
        spermscope::source::open(&settings.source)
            .map_err(|e| start_failure(StartError::Source(e)))?;
        let m = classifier.model();
        println!(
            "config {} is valid for sample {}: model {} ({} classes, {}), source {:?}",
            path.display(),
            settings.sample_id,
            m.spec.name,
            m.spec.classes.len(),
            m.provider,
            settings.source
        );
    }
    Ok(())
}

fn replay_settings(f: ReplayArgs) -> Result<Settings, Failure> {
    let (mut raw, base) = match &f.config {
        Some(c) => (RawConfig::load(c).map_err(config_failure)?, c.parent()),
        None => (RawConfig::default(), None),
    };
    raw.source.kind = SourceKind::Replay;
    // The command line's paths are taken from the working directory, not the config's folder.
    let cwd = std::env::current_dir().map_err(|e| Failure::Other(e.into()))?;
    let abs = |p: &Path| cwd.join(p);
    raw.source.replay.path = Some(abs(&f.path));
    if let Some(fps) = f.fps {
        raw.source.replay.fps = fps;
    }
    raw.source.replay.preload |= f.preload;
    raw.source.replay.repeat |= f.repeat;
    raw.source.live |= f.live;
    if let Some(s) = f.sample {
        raw.sample.id = s;
    }
    match f.records {
        Some(r) => raw.publish.file = Some(abs(&r)),
        None if raw.publish.file.is_none() => raw.publish.stdout = true,
        None => {}
    }
    if let Some(r) = f.report {
        raw.report.file = Some(abs(&r));
    }
    if let Some(s) = f.summary {
        raw.report.summary_file = Some(abs(&s));
    }
    raw.resolve(base).map_err(config_failure)
}

/// Run one pipeline per microscope (one for replay). `config` is the file a daemon re-reads
/// on SIGHUP (none for replay). Every pipeline is prepared (models loaded, sources opened)
/// before any starts, so one bad microscope stops start-up for all.
fn run(all: Vec<Settings>, config: Option<PathBuf>) -> Result<(), Failure> {
    let daemon = config.is_some();
    let stop = service::stop_flag()
        .context("cannot install signal handlers")
        .map_err(Failure::Other)?;
    let (metrics_addr, stall) = all
        .first()
        .map(|s| (s.metrics_addr, s.stall_secs))
        .unwrap_or((None, 10.0));
    let mut prepared = Vec::new();
    for settings in all {
        let telemetry = Arc::new(Telemetry::new());
        let ready =
            pipeline::prepare(settings.clone(), telemetry.clone()).map_err(start_failure)?;
        tracing::info!("starting: {}", ready.describe());
        if let Some(a) = ready.socket_addr() {
            tracing::info!(socket = %a, sample = %settings.sample_id, "serving records");
        }
        prepared.push((settings, telemetry, ready));
    }
    let metrics = match metrics_addr {
        Some(addr) => {
            let parts = prepared
                .iter()
                .map(|(s, t, _)| (s.sample_id.clone(), t.clone()))
                .collect();
            let m = service::MetricsServer::start(addr, parts, Duration::from_secs_f32(stall))
                .map_err(|e| Failure::Other(e.into()))?;
            tracing::info!(addr = %m.addr, "serving /metrics and /healthz");
            Some(m)
        }
        None => None,
    };
    let mut running = Vec::new();
    for (i, (settings, _, ready)) in prepared.into_iter().enumerate() {
        let mut control = Control::stop_only(stop.clone());
        if let Some(path) = &config {
            let flag = service::reload_flag()
                .context("cannot install the SIGHUP handler")
                .map_err(Failure::Other)?;
            let (path, sample) = (path.clone(), settings.sample_id.clone());
            let reread: Reread = Box::new(move || {
                let raw = RawConfig::load(&path).map_err(|e| e.to_string())?;
                raw.resolve_all(path.parent())
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .find(|s| s.sample_id == sample)
                    .ok_or_else(|| format!("the config no longer has sample '{sample}'"))
            });
            control.reload = Some((flag, reread));
            // One voice to the service manager: the first pipeline's.
            if i == 0 {
                control.notify = Some(Box::new(service::Systemd::from_env()));
            }
        }
        let name = format!("pipeline-{i}");
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || pipeline::run(ready, control))
            .context("cannot start a pipeline thread")
            .map_err(Failure::Other)?;
        running.push((settings, handle));
    }
    let mut failed = None;
    for (settings, handle) in running {
        let outcome = match handle.join() {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                failed =
                    Some(anyhow::Error::new(e).context(format!("sample {}", settings.sample_id)));
                continue;
            }
            Err(_) => {
                failed = Some(anyhow::anyhow!(
                    "sample {}: pipeline thread panicked",
                    settings.sample_id
                ));
                continue;
            }
        };
        if let Err(e) = finish(
            &outcome,
            settings.report_file.as_deref(),
            settings.summary_file.as_deref(),
            settings.report_print,
            daemon,
        ) {
            failed = Some(e);
        }
    }
    if let Some(m) = metrics {
        m.close();
    }
    match failed {
        Some(e) => Err(Failure::Other(e.context("pipeline failed"))),
        None => Ok(()),
    }
}

fn cameras() -> anyhow::Result<()> {
    let found =
        spermscope::source::v4l::list().map_err(|e| anyhow::anyhow!("cannot list cameras: {e}"))?;
    if found.is_empty() {
        println!("no V4L2 cameras found");
    }
    for c in found {
        println!("{}  {}", c.index, c.name);
        for f in c.formats {
            println!("    {f}");
        }
    }
    Ok(())
}

fn finish(
    o: &Outcome,
    report_file: Option<&Path>,
    summary_file: Option<&Path>,
    print: bool,
    daemon: bool,
) -> anyhow::Result<()> {
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
    if let Some(p) = report_file {
        let json = serde_json::to_string_pretty(&o.report)?;
        std::fs::write(p, json + "\n")
            .with_context(|| format!("cannot write the report to {}", p.display()))?;
    }
    if let Some(p) = summary_file {
        let json = serde_json::to_string_pretty(o)?;
        std::fs::write(p, json + "\n")
            .with_context(|| format!("cannot write the run summary to {}", p.display()))?;
    }
    if print {
        eprint!("\n{}", o.report.text());
        eprintln!("{}", throughput(o));
    } else if !daemon {
        eprintln!("{}", throughput(o));
    }
    Ok(())
}

/// The benchmark lines: frames/s, cells/s and per-stage latency percentiles.
fn throughput(o: &Outcome) -> String {
    let mut s = format!(
        "throughput {:.1} frames/s, {:.1} cells/s ({} frames, {} cells in {:.2} s)\nlatency ms    {:>8} {:>8} {:>8}",
        o.frames_per_sec,
        o.cells_per_sec,
        o.counts.frames_published_total,
        o.counts.cells_published_total,
        o.elapsed_secs,
        "p50",
        "p99",
        "max"
    );
    for (stage, l) in &o.latency {
        s.push_str(&format!(
            "\n  {stage:<11} {:>8.2} {:>8.2} {:>8.2}",
            l.p50_ms, l.p99_ms, l.max_ms
        ));
    }
    s
}

fn offline_report(
    path: &Path,
    json: bool,
    exclude: &[String],
    min_cells: usize,
    drift: Option<Drift>,
) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open records file {}", path.display()))?;
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line).with_context(|| {
            format!("{} line {}: not a spermscope record", path.display(), i + 1)
        })?;
        let t = tallies
            .entry(r.sample.clone())
            .or_insert_with(|| Tally::new(&r.sample));
        if let Some(m) = &r.model {
            t.models
                .entry(m.name.clone())
                .or_insert_with(|| m.sha256.clone());
        }
        t.add(Seen {
            at_edge: r.at_edge,
            touching: r.touching,
            class: r.class.as_deref(),
            normal: r.normal,
            confidence: r.confidence,
        });
    }
    if tallies.is_empty() {
        anyhow::bail!("records file {} holds no records", path.display());
    }
    let reports: Vec<Report> = tallies
        .values()
        .map(|t| t.report(exclude, min_cells, drift))
        .collect();
    if json {
        if let [one] = reports.as_slice() {
            println!("{}", serde_json::to_string_pretty(one)?);
        } else {
            println!("{}", serde_json::to_string_pretty(&reports)?);
        }
    } else {
        for r in &reports {
            println!("{}", r.text());
        }
    }
    Ok(())
}
