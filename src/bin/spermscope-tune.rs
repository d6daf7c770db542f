//! `spermscope-tune`: a hyperparameter search over a trainer experiment, with nested
//! evaluation and a resumable log. Argument handling and printing only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use spermscope::offline::train::tune::{self, Search};

/// Search a trainer experiment's settings (see config/tune/ for search files).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Search file: the experiment, the strategy, the trials and the parameter ranges.
    #[arg(long)]
    search: PathBuf,
    /// Folder for the log, the best experiment and the picture.
    #[arg(long, default_value = "out/tune")]
    out: PathBuf,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    spermscope::cli::init_logging("warn");
    let args = Args::parse();
    spermscope::cli::exit("spermscope-tune", run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let search =
        Search::load(&args.search).with_context(|| format!("search {}", args.search.display()))?;
    let stem = args.search.file_stem().map_or_else(
        || "search".to_string(),
        |s| s.to_string_lossy().into_owned(),
    );
    let log = args.out.join(format!("{stem}.tune.jsonl"));
    let report = tune::run(&search, &log, &args.out, args.quiet)
        .with_context(|| format!("search {}", args.search.display()))?;
    let mut trials = report.trials.clone();
    trials.sort_by(|a, b| b.score.total_cmp(&a.score));
    println!(
        "top trials (inner validation accuracy; log {}):",
        log.display()
    );
    println!(
        "  {:>5} {:>5} {:>4} {:>6} {:>8}  params",
        "outer", "trial", "rung", "epochs", "score"
    );
    for t in trials.iter().take(10) {
        let params: Vec<String> = t.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "  {:>5} {:>5} {:>4} {:>6} {:>8.3}  {}",
            t.outer + 1,
            t.trial + 1,
            t.rung,
            t.epochs,
            t.score,
            params.join(" ")
        );
    }
    println!("nested evaluation (chosen on the inner split, scored on the outer test fold):");
    for r in &report.outer {
        let params: Vec<String> = r.chosen.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "  outer fold {}: inner {:.3}, outer {:.3}  {}",
            r.outer + 1,
            r.inner_score,
            r.outer_accuracy,
            params.join(" ")
        );
    }
    println!(
        "outer accuracy {:.4} ± {:.4} over {} folds ({:.0} s); best experiment written to {}",
        report.outer_accuracy_mean,
        report.outer_accuracy_std,
        report.outer.len(),
        report.seconds,
        report.best_experiment.display()
    );
    Ok(())
}
