//! `spermscope-train`: runs a training experiment (cross-validation, final model, ONNX export).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use spermscope::train::{self, RunOptions, config::Protocol};

/// Train a morphology classifier from an experiment file and export it to ONNX.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Experiment file (see config/train/).
    #[arg(long)]
    config: PathBuf,
    /// Run k-fold cross-validation (or the dataset's given split) before the final model.
    #[arg(long)]
    folds: bool,
    /// Override the experiment's protocol: stratified, folds-csv or given-split.
    #[arg(long, value_parser = parse_protocol)]
    protocol: Option<Protocol>,
    /// Override the seeds, comma separated (each repeats the cross-validation).
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Override the number of epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Use at most this many images, spread over the dataset (smoke runs).
    #[arg(long)]
    limit: Option<usize>,
    /// Cross-validation figures only; no final model.
    #[arg(long)]
    no_final: bool,
    /// Output folder for the model, its metrics JSON and pictures.
    #[arg(long, default_value = "models")]
    out: PathBuf,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s {
        "stratified" => Ok(Protocol::Stratified),
        "folds-csv" | "folds_csv" => Ok(Protocol::FoldsCsv),
        "given-split" | "given_split" => Ok(Protocol::GivenSplit),
        other => Err(format!(
            "unknown protocol '{other}' (stratified, folds-csv, given-split)"
        )),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spermscope-train: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let opts = RunOptions {
        folds: args.folds,
        protocol: args.protocol,
        seeds: args.seeds.clone(),
        epochs: args.epochs,
        limit: args.limit,
        no_final: args.no_final,
        out: args.out.clone(),
        quiet: args.quiet,
    };
    let report = train::run(&args.config, &opts)
        .with_context(|| format!("experiment {}", args.config.display()))?;
    println!(
        "{}: {} images ({} skipped), head found in {}",
        report.name,
        report.images,
        report.skipped.len(),
        report.heads_found
    );
    if let Some(cv) = &report.cv {
        println!(
            "{:?} cross-validation, {} folds x {} seeds: accuracy {:.4} ± {:.4}, macro-F1 {:.4} ± {:.4} ({:.0} s)",
            cv.protocol,
            cv.folds,
            cv.seeds.len(),
            cv.accuracy_mean,
            cv.accuracy_std,
            cv.macro_f1_mean,
            cv.macro_f1_std,
            cv.seconds
        );
        println!(
            "per-seed pooled accuracy: {:?}",
            cv.seed_accuracy
                .iter()
                .map(|a| format!("{a:.4}"))
                .collect::<Vec<_>>()
        );
        println!("{}", cv.pooled.to_text());
    }
    if let Some(f) = &report.final_model {
        println!(
            "final model {}: {} epochs (kept epoch {}), {} train / {} validation images, {:.0} s, {:.0} img/s",
            f.path.display(),
            f.epochs_run,
            f.best_epoch,
            f.train_images,
            f.val_images,
            f.seconds,
            f.images_per_second
        );
        if let Some(t) = &f.test {
            println!("test split:\n{}", t.to_text());
        }
    }
    Ok(())
}
