//! `spermscope`: the daemon's command line (run, replay, validate, report). Argument handling
//! and exit codes only; the work is in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use spermscope::core::pose::Contrast;
use spermscope::daemon::calibrate;
use spermscope::daemon::check::invalid;
use spermscope::daemon::classify::Classify;
use spermscope::daemon::config::{ConfigError, RawConfig, Settings};
use spermscope::daemon::crops::{self, Order};
use spermscope::daemon::exit;
use spermscope::daemon::host::{self, HostError};
use spermscope::daemon::pipeline::{self, StartError};
use spermscope::daemon::report::{self, Drift, Report};
use spermscope::daemon::source::SourceKind;

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
    /// List the cameras (V4L2 devices and GenICam cameras) and the formats each offers.
    Cameras,
    /// Estimate the frame scale (source.um_per_px) from the sizes of the heads in view
    /// (WHO 6th edition: 4.0-5.5 µm long, 2.5-3.5 µm wide).
    Calibrate(CalibrateArgs),
    /// Cut the upright crops the classifier saw (one per cell) from the recorded frames, most
    /// uncertain first, for an expert to sort into class folders.
    Crops(CropsArgs),
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
struct CropsArgs {
    /// Records file (JSON Lines) written by the daemon.
    records: PathBuf,
    /// Folder holding the frames the records name.
    #[arg(long)]
    frames: PathBuf,
    /// Folder for the crops and their index.csv.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = Order::Uncertainty)]
    order: Order,
    /// The config the records were made with (its model, scale and head finding) [default: the
    /// embedded defaults].
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct CalibrateArgs {
    /// Folder of frames or a glob; without it, the source of --config (a camera, a replay).
    path: Option<PathBuf>,
    #[arg(long)]
    config: Option<PathBuf>,
    /// Frames to look at (spread over a folder).
    #[arg(long, default_value_t = 16)]
    frames: usize,
    /// How heads differ from the background [default: the config's segment.contrast, else dark].
    #[arg(long, value_enum)]
    contrast: Option<Contrast>,
    /// Print one JSON object (its `um_per_px` key holds the suggestion).
    #[arg(long)]
    json: bool,
    /// Draw the head-length histogram (at the suggested scale) to this PNG.
    #[arg(long)]
    picture: Option<PathBuf>,
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
        Command::Cameras => cameras().map_err(other),
        Command::Calibrate(args) => calibrate(args),
        Command::Crops(args) => crops(args),
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
            offline_report(&records, json, &exclude, min_cells, drift).map_err(other)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { status, error }) => {
            eprintln!("error: {error:#}");
            ExitCode::from(status)
        }
    }
}

/// How a command failed: the error and the exit status `daemon::exit` gives it.
struct Failure {
    status: u8,
    error: anyhow::Error,
}

fn other(error: anyhow::Error) -> Failure {
    Failure {
        status: exit::FAILURE,
        error,
    }
}

fn config_failure(e: ConfigError) -> Failure {
    Failure {
        status: exit::of_config(&e),
        error: anyhow::Error::new(e),
    }
}

fn start_failure(e: StartError) -> Failure {
    Failure {
        status: exit::of_start(&e),
        error: anyhow::Error::new(e).context("cannot start"),
    }
}

fn load(path: &Path) -> Result<Vec<Settings>, Failure> {
    let raw = RawConfig::load(path).map_err(config_failure)?;
    raw.resolve_all(path.parent()).map_err(config_failure)
}

fn validate(path: &Path) -> Result<(), Failure> {
    for settings in load(path)? {
        let (classifier, _) = pipeline::load_models(&settings).map_err(start_failure)?;
        let source = spermscope::daemon::source::open(&settings.restart.source)
            .map_err(|e| start_failure(StartError::Source(e)))?;
        let m = classifier.model();
        println!(
            "config {} is valid for sample {}: model {} ({} classes, {}), source {}",
            path.display(),
            settings.sample_id(),
            m.spec.name,
            m.spec.classes.len(),
            m.provider,
            source.describe()
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
    let cwd = std::env::current_dir().map_err(|e| other(e.into()))?;
    let abs = |p: &Path| cwd.join(p);
    raw.source.replay.path = Some(abs(&f.path));
    raw.source
        .settle_scale(spermscope::daemon::check::Base(base));
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

/// Run one pipeline per microscope (one for replay) and finish each: report and summary
/// files, the readable report and the throughput figures on standard error.
fn run(all: Vec<Settings>, config: Option<PathBuf>) -> Result<(), Failure> {
    let daemon = config.is_some();
    let finished = host::run_all(all, config.as_deref()).map_err(|e| match e {
        HostError::Start {
            error: source,
            sample,
        } => {
            let status = exit::of_start(&source);
            Failure {
                status,
                error: anyhow::Error::new(source).context(format!("cannot start sample {sample}")),
            }
        }
        e => other(e.into()),
    })?;
    let mut failed = None;
    for f in finished {
        let sample = f.settings.sample_id().to_string();
        let outcome = match f.outcome {
            Ok(o) => o,
            Err(e) => {
                failed = Some(anyhow::Error::new(e).context(format!("sample {sample}")));
                continue;
            }
        };
        let out = &f.settings.restart.report;
        if let Err(e) = host::write_outputs(&outcome, out) {
            failed = Some(e.into());
        }
        if out.print {
            eprint!("\n{}", outcome.report.text());
        }
        if out.print || !daemon {
            eprintln!("{}", outcome.throughput_text());
        }
    }
    match failed {
        Some(e) => Err(other(e.context("pipeline failed"))),
        None => Ok(()),
    }
}

fn calibrate(args: CalibrateArgs) -> Result<(), Failure> {
    let raw = match &args.config {
        Some(c) => Some(RawConfig::load(c).map_err(config_failure)?),
        None => None,
    };
    let contrast = args
        .contrast
        .or(raw.as_ref().map(|r| r.segment.contrast))
        .unwrap_or(Contrast::Dark);
    let frames = match (&args.path, &raw) {
        (Some(p), _) => calibrate::frames_from(p, args.frames)
            .map_err(|e| config_failure(invalid("calibrate", e.to_string())))?,
        (None, Some(r)) => {
            let base = args.config.as_deref().and_then(Path::parent);
            let s = r.resolve(base).map_err(config_failure)?;
            let mut source = spermscope::daemon::source::open(&s.restart.source)
                .map_err(|e| start_failure(StartError::Source(e)))?;
            calibrate::frames_from_source(source.as_mut(), args.frames, Duration::from_secs(30))
        }
        (None, None) => {
            return Err(config_failure(invalid(
                "calibrate",
                "give a folder of frames or --config with a source",
            )));
        }
    };
    let e = calibrate::estimate(&frames, contrast).map_err(|e| other(e.into()))?;
    if let Some(p) = &args.picture {
        calibrate::histogram_png(&e, p)
            .with_context(|| format!("cannot write {}", p.display()))
            .map_err(other)?;
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&e).map_err(|e| other(e.into()))?
        );
        return Ok(());
    }
    println!(
        "suggested source.um_per_px = {:.4}\n  from {} heads in {} frames: median length {:.1} px ({:.4} µm/px for a 4.75 µm head), median width {:.1} px ({:.4} µm/px for a 3.0 µm head)",
        e.um_per_px,
        e.heads,
        e.frames,
        e.median_length_px,
        e.from_length_um_per_px,
        e.median_width_px,
        e.from_width_um_per_px
    );
    println!(
        "  WHO 6th edition head: 4.0-5.5 µm long, 2.5-3.5 µm wide; confirm with a stage micrometer"
    );
    if let Some(p) = &args.picture {
        println!("  head lengths at this scale: {}", p.display());
    }
    Ok(())
}

fn crops(args: CropsArgs) -> Result<(), Failure> {
    let settings = match &args.config {
        Some(c) => RawConfig::load(c)
            .and_then(|r| r.resolve(c.parent()))
            .map_err(config_failure)?,
        None => RawConfig::default()
            .resolve_with_replay(Path::new("."))
            .map_err(config_failure)?,
    };
    let (classifier, _) = pipeline::load_models(&settings).map_err(start_failure)?;
    let r = &settings.restart;
    let done = crops::cut(
        &args.records,
        &args.frames,
        &args.out,
        args.order,
        &classifier.preprocessor(),
        &r.segment,
        r.source.um_per_px,
    )
    .map_err(|e| other(e.into()))?;
    println!(
        "{} crops in {} (index.csv lists them, {}); sort them into one folder per class for `spermscope-train --init`",
        done.written,
        args.out.display(),
        match args.order {
            Order::Uncertainty => "most uncertain first",
            Order::Recorded => "as recorded",
        }
    );
    if !done.not_found.is_empty() {
        eprintln!(
            "{} records whose head was not found again in its frame (other head-finding settings?): {}",
            done.not_found.len(),
            done.not_found.join(", ")
        );
    }
    Ok(())
}

/// The V4L2 devices with their formats, then the GenICam cameras discovery finds (it
/// broadcasts on every network interface).
fn cameras() -> anyhow::Result<()> {
    use spermscope::daemon::source::{genicam, v4l};
    match v4l::list() {
        Ok(found) if found.is_empty() => println!("no V4L2 cameras found"),
        Ok(found) => {
            for c in found {
                println!("{}  {}", c.index, c.name);
                for f in c.formats {
                    println!("    {f}");
                }
            }
        }
        Err(e) => println!("V4L2 cameras cannot be listed: {e}"),
    }
    let found = genicam::list().map_err(|e| anyhow::anyhow!("cannot list GenICam cameras: {e}"))?;
    if found.is_empty() {
        println!("no GenICam cameras found");
    }
    for c in found {
        println!(
            "genicam {}  {} {} ({} at {})",
            c.id, c.vendor, c.model, c.protocol, c.address
        );
        match c.details {
            Ok(d) => {
                println!(
                    "    serial {}, sensor {}x{}",
                    d.serial, d.sensor.0, d.sensor.1
                );
                println!("    pixel formats: {}", d.formats.join(", "));
            }
            Err(e) => println!("    (cannot be opened: {e})"),
        }
    }
    Ok(())
}

fn offline_report(
    path: &Path,
    json: bool,
    exclude: &[String],
    min_cells: usize,
    drift: Option<Drift>,
) -> anyhow::Result<()> {
    let reports: Vec<Report> = report::read_records(path)?
        .iter()
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
