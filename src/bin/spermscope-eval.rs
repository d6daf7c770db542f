//! `spermscope-eval`: scores an ONNX model on a labelled dataset through the daemon's own
//! preprocessing and ONNX Runtime path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use spermscope::core::calibration;
use spermscope::core::dataset;
use spermscope::core::model::{Model, Provider, RuntimeOptions};
use spermscope::offline::eval::{self, Calibration};
use spermscope::offline::metrics::{self, Scores};

/// One class's one-vs-rest ROC curve and its AUC.
type RocCurve = (String, Vec<calibration::RocPoint>, f64);

/// Evaluate a model on a labelled crop dataset (class-per-folder, or MHSMA's labels.csv).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// ONNX model exported by spermscope-train [default: the bundled SMIDS model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Dataset folder [default: ../shared/datasets/smids].
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// MHSMA only: which split to score (train, valid, test).
    #[arg(long, default_value = "test")]
    split: String,
    /// MHSMA only: which label the model predicts.
    #[arg(long, default_value = "head")]
    label: String,
    /// Score at most this many images, spread over the dataset.
    #[arg(long)]
    limit: Option<usize>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Execution provider.
    #[arg(long, value_enum, default_value_t = Provider::Cpu)]
    provider: Provider,
    /// ONNX Runtime intra-op threads (0: runtime default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Crops per inference batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// ONNX Runtime library (after ORT_DYLIB_PATH, before the setup folder .ort/).
    #[arg(long)]
    ort_dylib_path: Option<PathBuf>,
    /// Unlabelled images instead of a dataset (a folder or a glob): only the label-free
    /// estimate is printed.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Print the label-free accuracy estimate (mean calibrated confidence, CBPE).
    #[arg(long)]
    estimate: bool,
    /// Fit the softmax temperature on this labelled data (use the model's validation split)
    /// and write a copy of the model with it stored in its metadata here.
    #[arg(long)]
    fit_temperature: Option<PathBuf>,
    /// Draw ROC curves, the reliability diagram and occlusion saliency maps into this folder.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Agreement with the dataset's labels as an expert's: Cohen's kappa with a 95% interval
    /// (and accuracy with its Wilson interval).
    #[arg(long)]
    agreement: bool,
    /// With --agreement: the model's classes are ordered (in their output order); adds the
    /// linearly weighted kappa.
    #[arg(long)]
    ordered: bool,
}

/// A path relative to the working directory, or else to the source tree (the embedded default).
fn default_path(rel: &str) -> PathBuf {
    let here = PathBuf::from(rel);
    if here.exists() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn main() -> ExitCode {
    spermscope::cli::init_logging("warn");
    let args = Args::parse();
    spermscope::cli::exit("spermscope-eval", run(&args))
}

fn run(args: &Args) -> anyhow::Result<()> {
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(|| default_path("models/smids-3class.onnx"));
    let data_path = args
        .dataset
        .clone()
        .unwrap_or_else(|| default_path("../shared/datasets/smids"));
    let opts = RuntimeOptions {
        ort_dylib_path: args.ort_dylib_path.clone(),
        provider: args.provider,
        threads: args.threads,
    };
    let mut model = Model::load(&model_path, &opts).context("loading the model")?;
    if let Some(images) = &args.images {
        return estimate_only(args, &mut model, images);
    }
    let mut ds = dataset::open(&data_path, &args.label, Some(args.split.as_str()))
        .with_context(|| format!("reading dataset {}", data_path.display()))?;
    if ds.samples.is_empty() {
        bail!(
            "dataset {} has no images (split '{}')",
            data_path.display(),
            args.split
        );
    }
    if let Some(l) = args.limit {
        ds.spread(l);
    }
    let scored = eval::score(&mut model, &ds, args.batch).context("scoring")?;
    let classes = model.spec.classes.clone();
    let temperature = model.spec.temperature;
    let scores = Scores::new(&classes, &scored.truth, &scored.predictions());
    let curves = scored.roc_curves(&classes);
    let auc: BTreeMap<String, f64> = curves.iter().map(|(c, _, a)| (c.clone(), *a)).collect();
    let (bins, ece) = calibration::reliability(&scored.probs, &scored.truth, 10);
    let estimate = calibration::estimated_accuracy(&scored.probs);
    if let Some(out) = &args.fit_temperature {
        let fitted = Calibration::fit(&scored.logits, &scored.truth, "the scored crops")
            .context("no crops to fit a temperature on")?;
        let before = calibration::nll(&scored.logits, &scored.truth, temperature);
        let after = calibration::nll(&scored.logits, &scored.truth, fitted.temperature);
        eval::write_with_temperature(&model, fitted.temperature, out)?;
        eprintln!(
            "temperature {:.3} fitted on {} crops: NLL {before:.4} -> {after:.4}, ECE {:.3} -> {:.3}; written to {}",
            fitted.temperature,
            fitted.val_images,
            fitted.ece_before,
            fitted.ece_after,
            out.display()
        );
    }
    if let Some(dir) = &args.plots {
        draw(dir, &mut model, &curves, &scored, &bins)?;
    }
    let agreement = args.agreement.then(|| {
        metrics::agreement(
            &scored.truth,
            &scored.predictions(),
            classes.len(),
            args.ordered,
        )
    });
    let figures = Figures {
        agreement: agreement.as_ref(),
        scores: &scores,
        auc: &auc,
        ece,
        bins: &bins,
        estimate,
    };
    if args.json {
        print_json(&model, &data_path, &scored, &figures)
    } else {
        print_text(&model, &data_path, &scored, &figures);
        Ok(())
    }
}

/// What the evaluation measured, for printing.
struct Figures<'a> {
    agreement: Option<&'a metrics::Agreement>,
    scores: &'a Scores,
    auc: &'a BTreeMap<String, f64>,
    ece: f64,
    bins: &'a [calibration::Bin],
    estimate: Option<f64>,
}

fn print_json(
    model: &Model,
    data: &Path,
    scored: &eval::Scored,
    f: &Figures,
) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(f.scores)?;
    if let Some(o) = v.as_object_mut() {
        o.insert("model".into(), serde_json::json!({
            "name": model.spec.name, "path": model.path, "sha256": model.sha256, "provider": model.provider,
            "temperature": model.spec.temperature,
        }));
        o.insert("dataset".into(), serde_json::json!(data));
        o.insert(
            "crops_per_second".into(),
            serde_json::json!(scored.crops_per_second()),
        );
        o.insert("heads_found".into(), serde_json::json!(scored.heads_found));
        o.insert("skipped".into(), serde_json::json!(scored.skipped));
        o.insert("auc".into(), serde_json::json!(f.auc));
        o.insert("ece".into(), serde_json::json!(f.ece));
        o.insert("reliability".into(), serde_json::json!(f.bins));
        o.insert("estimated_accuracy".into(), serde_json::json!(f.estimate));
        if let Some(a) = f.agreement {
            o.insert("agreement".into(), serde_json::json!(a));
        }
    }
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

fn print_text(model: &Model, data: &Path, scored: &eval::Scored, f: &Figures) {
    println!(
        "model {} ({}, sha256 {}…, {}, temperature {:.3}) on {}",
        model.spec.name,
        model.path.display(),
        &model.sha256[..12],
        model.provider,
        model.spec.temperature,
        data.display()
    );
    print!("{}", f.scores.to_text());
    println!("\none-vs-rest AUC:");
    for (c, a) in f.auc {
        println!("  {c:<20} {a:.3}");
    }
    println!("expected calibration error (10 bins): {:.3}", f.ece);
    if let Some(a) = f.agreement {
        println!(
            "agreement with the labels ({} crops): accuracy {:.1}% (95% {:.1}-{:.1}%), Cohen's kappa {:.3} (95% {:.3} to {:.3})",
            a.n,
            100.0 * a.accuracy,
            100.0 * a.accuracy_ci95[0],
            100.0 * a.accuracy_ci95[1],
            a.kappa,
            a.kappa_ci95[0],
            a.kappa_ci95[1]
        );
        if let (Some(w), Some([lo, hi])) = (a.weighted_kappa, a.weighted_kappa_ci95) {
            println!("  linearly weighted kappa {w:.3} (95% {lo:.3} to {hi:.3})");
        }
    }
    if let Some(e) = f.estimate {
        println!(
            "label-free accuracy estimate (mean confidence): {:.1}% (true accuracy {:.1}%)",
            100.0 * e,
            100.0 * f.scores.accuracy
        );
    }
    println!(
        "\n{} crops in {:.2} s: {:.0} crops/s (decode + pose + inference); head found in {}; {} unreadable",
        scored.truth.len(),
        scored.secs,
        scored.crops_per_second(),
        scored.heads_found,
        scored.skipped.len()
    );
    for s in &scored.skipped {
        println!("  skipped: {s}");
    }
}

/// The label-free estimate on unlabelled images: mean calibrated confidence and the share of
/// each predicted class.
fn estimate_only(args: &Args, model: &mut Model, images: &Path) -> anyhow::Result<()> {
    let u = eval::score_unlabelled(model, images, args.batch)
        .with_context(|| format!("scoring {}", images.display()))?;
    let estimate = u.estimate();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "estimated_accuracy": estimate,
                "n": u.probs.len(),
                "predicted": u.predicted,
                "temperature": model.spec.temperature,
                "model": {"name": model.spec.name, "sha256": model.sha256},
                "images": images,
                "skipped": u.skipped,
            })
        );
        return Ok(());
    }
    match estimate {
        Some(e) => println!(
            "{}: {} images, label-free accuracy estimate {:.1}% (temperature {:.3})",
            images.display(),
            u.probs.len(),
            100.0 * e,
            model.spec.temperature
        ),
        None => println!("{}: no readable images", images.display()),
    }
    for (c, n) in &u.predicted {
        println!("  {c:<20} {n}");
    }
    Ok(())
}

#[cfg(feature = "plots")]
fn draw(
    dir: &Path,
    model: &mut Model,
    curves: &[RocCurve],
    scored: &eval::Scored,
    bins: &[calibration::Bin],
) -> anyhow::Result<()> {
    spermscope::offline::plots::evaluation(dir, model, curves, scored, bins)
        .with_context(|| format!("drawing into {}", dir.display()))?;
    eprintln!("pictures written to {}", dir.display());
    Ok(())
}

#[cfg(not(feature = "plots"))]
fn draw(
    _: &Path,
    _: &mut Model,
    _: &[RocCurve],
    _: &eval::Scored,
    _: &[calibration::Bin],
) -> anyhow::Result<()> {
    bail!("this spermscope-eval was built without pictures; build it with --features plots")
}
