//! `spermscope-train`: runs a training experiment (cross-validation, final model, ONNX export).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use spermscope::offline::train::{self, RunOptions, config::Protocol, init::InitOptions};

/// Train a morphology classifier from an experiment file and export it to ONNX.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Experiment file (see config/train/). Optional with --init, whose built-in recipe then
    /// fine-tunes the model on --dataset.
    #[arg(long, required_unless_present = "init")]
    config: Option<PathBuf>,
    /// Start from this trained model (an ONNX file spermscope-train exported) instead of
    /// random weights: its network, crop, input normalisation and features are kept; the
    /// classes are those of the dataset (rows of classes the model knows by name, and of the
    /// normal class, keep their weights). From a pretext model (data.pretext) only the network,
    /// crop and weights are kept: the normalisation is fitted on the dataset.
    #[arg(long)]
    init: Option<PathBuf>,
    /// The labelled crops to train on, one folder per class (replaces the experiment's).
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Name of the model written (default with --init: the model's name and "-adapted").
    #[arg(long)]
    name: Option<String>,
    /// With --init: the class that counts as a normal form (default: the model's normal class
    /// if the dataset has it, else a class named "normal...").
    #[arg(long)]
    normal_class: Option<String>,
    /// Run k-fold cross-validation (or the dataset's given split) before the final model.
    #[arg(long)]
    folds: bool,
    /// Override the experiment's protocol: stratified, folds-csv or given-split.
    #[arg(long, value_enum)]
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
    /// Continue an interrupted run from its checkpoints (OUT/NAME.checkpoints; needs
    /// train.checkpoint = true). The result is the one an uninterrupted run gives.
    #[arg(long)]
    resume: bool,
    /// Stop, as if killed, after this many epochs have been trained by this process (to test
    /// --resume).
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    /// Cross-validate only the first N folds of each seed (pilot runs; the figures are then
    /// not the protocol's).
    #[arg(long)]
    max_folds: Option<usize>,
    /// Keep every cross-validation fold's model in OUT/NAME.folds/ (s<seed>-f<fold>.onnx), with
    /// a record of its test images: the teachers of a distilled student ([distill]).
    #[arg(long)]
    fold_models: bool,
    /// Check instead of training: fit this many images (one batch) and report whether the
    /// loss goes to about zero.
    #[arg(long, num_args = 0..=1, default_missing_value = "8")]
    overfit_batch: Option<usize>,
    /// Check instead of training: a learning-rate range test (1e-6 to 1), drawn to
    /// OUT/NAME.lr-find.png, with a suggested rate.
    #[arg(long)]
    lr_find: bool,
}

fn main() -> ExitCode {
    spermscope::cli::init_logging("info,ort=warn");
    let args = Args::parse();
    spermscope::cli::exit("spermscope-train", run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    if args.overfit_batch.is_some() || args.lr_find {
        return diagnose(args);
    }
    let opts = RunOptions {
        folds: args.folds,
        protocol: args.protocol,
        seeds: args.seeds.clone(),
        epochs: args.epochs,
        limit: args.limit,
        no_final: args.no_final,
        out: args.out.clone(),
        quiet: args.quiet,
        resume: args.resume,
        stop_after: args.stop_after,
        max_folds: args.max_folds,
        fold_models: args.fold_models,
        init: args.init.clone(),
        init_opts: InitOptions {
            dataset: args.dataset.clone(),
            name: args.name.clone(),
            normal_class: args.normal_class.clone(),
        },
    };
    if args.init.is_none() && (args.name.is_some() || args.normal_class.is_some()) {
        anyhow::bail!("--name and --normal-class go with --init");
    }
    let what = match &args.config {
        Some(c) => format!("experiment {}", c.display()),
        None => "fine-tuning".into(),
    };
    let report = train::run(args.config.as_deref(), &opts).context(what)?;
    println!(
        "{}: {} images ({} skipped), head found in {}",
        report.name,
        report.images,
        report.skipped.len(),
        report.heads_found
    );
    if let Some(cv) = &report.cv {
        print_cv(cv);
    }
    if let Some(f) = &report.final_model {
        print_final(f);
    }
    Ok(())
}

/// The checks run instead of training: `--overfit-batch` and `--lr-find`.
fn diagnose(args: &Args) -> anyhow::Result<()> {
    let Some(config) = &args.config else {
        anyhow::bail!("--overfit-batch and --lr-find need --config");
    };
    if let Some(n) = args.overfit_batch {
        let steps = args.epochs.unwrap_or(150);
        let r = train::diagnose::overfit_batch(config, n, steps)
            .with_context(|| format!("experiment {}", config.display()))?;
        println!(
            "overfit-batch: {} images, {} steps: loss {:.4} -> {:.4}, accuracy {:.3}: {}",
            r.images,
            r.steps,
            r.first_loss,
            r.last_loss,
            r.last_accuracy,
            if r.passed {
                "passes (the network, inputs and labels line up)"
            } else {
                "FAILS: the network cannot fit one small batch; look for a bug in the labels, inputs or loss, or raise the learning rate"
            }
        );
        return Ok(());
    }
    if args.lr_find {
        let r = train::diagnose::lr_find(config, args.limit, 120, &args.out)
            .with_context(|| format!("experiment {}", config.display()))?;
        match r.suggested_lr {
            Some(lr) => println!(
                "lr-find: {} batches; suggested learning rate {lr:.2e} (plot {})",
                r.curve.len(),
                r.plot.display()
            ),
            None => println!(
                "lr-find: no finite loss at any rate (plot {})",
                r.plot.display()
            ),
        }
        return Ok(());
    }
    Ok(())
}

fn print_cv(cv: &train::CvReport) {
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
    for t in &cv.teachers {
        print_teacher(&format!("fold {}", t.fit), t);
    }
    println!("{}", cv.pooled.to_text());
}

fn print_teacher(what: &str, t: &spermscope::offline::train::distill::Teacher) {
    println!(
        "{what} distilled from {} (sha256 {})",
        t.path.display(),
        &t.sha256[..12.min(t.sha256.len())]
    );
}

fn print_final(f: &train::FinalReport) {
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
    if let Some(t) = &f.teacher {
        print_teacher("final model", t);
    }
    if train::init::is_pretext(&f.spec) {
        println!(
            "pretext: the turn told right for {:.1}% of the training windows (unaugmented); fine-tune from it with --init",
            100.0 * f.all_data.accuracy
        );
    }
    if let Some(c) = &f.calibration {
        println!(
            "temperature {:.3} fitted on {} ({} images): ECE {:.3} -> {:.3}, label-free estimate {:.1}% vs accuracy {:.1}%",
            c.temperature,
            c.fitted_on,
            c.val_images,
            c.ece_before,
            c.ece_after,
            100.0 * c.estimated_accuracy,
            100.0 * c.val_accuracy
        );
    }
    let warned: std::collections::BTreeSet<String> = f
        .history
        .iter()
        .flat_map(|h| h.grad_warnings.iter().map(|(l, t)| format!("{l} {t:?}")))
        .collect();
    if !warned.is_empty() {
        println!(
            "gradient warnings (see the metrics history): {}",
            warned.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    if let Some(e) = f.overfitting_from_epoch {
        println!("overfitting from epoch {e}: validation loss rises while training loss falls");
    }
    if let Some(t) = &f.test {
        println!("test split:\n{}", t.to_text());
    }
}
