//! `spermscope-eval`: scores an ONNX model on a labelled dataset through the daemon's own
//! preprocessing and ONNX Runtime path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use spermscope::calibration;
use spermscope::dataset;
use spermscope::metrics::Scores;
use spermscope::model::{Model, Provider, RuntimeOptions, softmax};
use spermscope::preprocess;
use spermscope::spec;

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
    /// Execution provider: cpu, cuda or auto.
    #[arg(long, default_value = "cpu", value_parser = parse_provider)]
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
}

fn parse_provider(s: &str) -> Result<Provider, String> {
    match s {
        "cpu" => Ok(Provider::Cpu),
        "cuda" => Ok(Provider::Cuda),
        "auto" => Ok(Provider::Auto),
        o => Err(format!("unknown provider '{o}' (cpu, cuda, auto)")),
    }
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
    // Dataset labels are matched to the model's classes by name.
    let classes = model.spec.classes.clone();
    let map: Vec<usize> = ds
        .classes
        .iter()
        .map(|c| {
            classes.iter().position(|m| m == c).with_context(|| {
                format!("dataset class '{c}' is not one of the model's classes {classes:?}")
            })
        })
        .collect::<anyhow::Result<_>>()?;
    if let Some(l) = args.limit
        && ds.samples.len() > l
    {
        let step = ds.samples.len() as f64 / l as f64;
        ds.samples = (0..l)
            .map(|i| ds.samples[(i as f64 * step) as usize].clone())
            .collect();
    }
    let started = Instant::now();
    let mut truth = Vec::new();
    let mut logits_all: Vec<Vec<f32>> = Vec::new();
    let mut kept: Vec<PathBuf> = Vec::new();
    let mut skipped = Vec::new();
    let mut heads = 0usize;
    for chunk in ds.samples.chunks(args.batch.max(1)) {
        let mut batch = Vec::with_capacity(chunk.len());
        for s in chunk {
            match dataset::load_rgb(&s.path) {
                Ok(img) => {
                    let p = preprocess::prepare_crop(&img, &model.spec);
                    heads += usize::from(p.head.is_some());
                    batch.push(p);
                    truth.push(map[s.label]);
                    kept.push(s.path.clone());
                }
                Err(e) => skipped.push(e.to_string()),
            }
        }
        logits_all.extend(model.logits(&batch).context("running the model")?);
    }
    let secs = started.elapsed().as_secs_f64();
    let temperature = model.spec.temperature;
    let probs: Vec<Vec<f32>> = logits_all.iter().map(|l| softmax(l, temperature)).collect();
    let pred: Vec<usize> = probs.iter().map(|p| calibration::top(p).0).collect();
    let scores = Scores::new(&classes, &truth, &pred);
    let crops_per_second = truth.len() as f64 / secs.max(1e-9);
    let curves: Vec<RocCurve> = (0..classes.len())
        .filter_map(|k| {
            calibration::roc(&probs, &truth, k).map(|(c, a)| (classes[k].clone(), c, a))
        })
        .collect();
    let auc: BTreeMap<String, f64> = curves.iter().map(|(c, _, a)| (c.clone(), *a)).collect();
    let (bins, ece) = calibration::reliability(&probs, &truth, 10);
    let estimate = calibration::estimated_accuracy(&probs);
    if let Some(out) = &args.fit_temperature {
        let t = calibration::fit_temperature(&logits_all, &truth);
        let before = calibration::nll(&logits_all, &truth, temperature);
        let after = calibration::nll(&logits_all, &truth, t);
        let fitted: Vec<Vec<f32>> = logits_all.iter().map(|l| softmax(l, t)).collect();
        let (_, ece_after) = calibration::reliability(&fitted, &truth, 10);
        let mut spec = model.spec.clone();
        spec.temperature = t;
        let bytes = std::fs::read(&model.path)
            .with_context(|| format!("reading {}", model.path.display()))?;
        let updated = spec::set_metadata(&bytes, spec::METADATA_KEY, &spec.to_json())
            .context("rewriting the model's metadata")?;
        std::fs::write(out, updated).with_context(|| format!("writing {}", out.display()))?;
        eprintln!(
            "temperature {t:.3} fitted on {} crops: NLL {before:.4} -> {after:.4}, ECE {:.3} -> {ece_after:.3}; written to {}",
            truth.len(),
            ece,
            out.display()
        );
    }
    if let Some(dir) = &args.plots {
        draw(dir, &mut model, &curves, &probs, &truth, &bins, &kept)?;
    }
    if args.json {
        let mut v = serde_json::to_value(&scores)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("model".into(), serde_json::json!({
                "name": model.spec.name, "path": model.path, "sha256": model.sha256, "provider": model.provider,
                "temperature": temperature,
            }));
            o.insert("dataset".into(), serde_json::json!(data_path));
            o.insert(
                "crops_per_second".into(),
                serde_json::json!(crops_per_second),
            );
            o.insert("heads_found".into(), serde_json::json!(heads));
            o.insert("skipped".into(), serde_json::json!(skipped));
            o.insert("auc".into(), serde_json::json!(auc));
            o.insert("ece".into(), serde_json::json!(ece));
            o.insert("reliability".into(), serde_json::json!(bins));
            o.insert("estimated_accuracy".into(), serde_json::json!(estimate));
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "model {} ({}, sha256 {}…, {}, temperature {:.3}) on {}",
            model.spec.name,
            model.path.display(),
            &model.sha256[..12],
            model.provider,
            temperature,
            data_path.display()
        );
        print!("{}", scores.to_text());
        println!("\none-vs-rest AUC:");
        for (c, a) in &auc {
            println!("  {c:<20} {a:.3}");
        }
        println!("expected calibration error (10 bins): {ece:.3}");
        if let Some(e) = estimate {
            println!(
                "label-free accuracy estimate (mean confidence): {:.1}% (true accuracy {:.1}%)",
                100.0 * e,
                100.0 * scores.accuracy
            );
        }
        println!(
            "\n{} crops in {:.2} s: {:.0} crops/s (decode + pose + inference); head found in {}; {} unreadable",
            truth.len(),
            secs,
            crops_per_second,
            heads,
            skipped.len()
        );
        for s in &skipped {
            println!("  skipped: {s}");
        }
    }
    Ok(())
}

/// The label-free estimate on unlabelled images: mean calibrated confidence and the share of
/// each predicted class.
fn estimate_only(args: &Args, model: &mut Model, images: &Path) -> anyhow::Result<()> {
    let files = spermscope::source::replay::list(images)
        .with_context(|| format!("listing {}", images.display()))?;
    let mut probs: Vec<Vec<f32>> = Vec::new();
    let mut skipped = Vec::new();
    for chunk in files.chunks(args.batch.max(1)) {
        let mut batch = Vec::new();
        for f in chunk {
            match dataset::load_rgb(f) {
                Ok(img) => batch.push(preprocess::prepare_crop(&img, &model.spec)),
                Err(e) => skipped.push(e.to_string()),
            }
        }
        for l in model.logits(&batch).context("running the model")? {
            probs.push(softmax(&l, model.spec.temperature));
        }
    }
    let mut predicted: BTreeMap<String, usize> = BTreeMap::new();
    for p in &probs {
        let k = calibration::top(p).0;
        *predicted
            .entry(model.spec.classes.get(k).cloned().unwrap_or_default())
            .or_default() += 1;
    }
    let estimate = calibration::estimated_accuracy(&probs);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "estimated_accuracy": estimate,
                "n": probs.len(),
                "predicted": predicted,
                "temperature": model.spec.temperature,
                "model": {"name": model.spec.name, "sha256": model.sha256},
                "images": images,
                "skipped": skipped,
            })
        );
    } else {
        match estimate {
            Some(e) => println!(
                "{}: {} images, label-free accuracy estimate {:.1}% (temperature {:.3})",
                images.display(),
                probs.len(),
                100.0 * e,
                model.spec.temperature
            ),
            None => println!("{}: no readable images", images.display()),
        }
        for (c, n) in &predicted {
            println!("  {c:<20} {n}");
        }
    }
    Ok(())
}

#[cfg(feature = "plots")]
fn draw(
    dir: &Path,
    model: &mut Model,
    curves: &[RocCurve],
    probs: &[Vec<f32>],
    truth: &[usize],
    bins: &[calibration::Bin],
    crops: &[PathBuf],
) -> anyhow::Result<()> {
    use spermscope::plots;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = &model.spec.name;
    let name = name.clone();
    let fail = |e: String| anyhow::anyhow!("drawing: {e}");
    plots::roc(&dir.join(format!("{name}.roc.png")), &name, curves).map_err(fail)?;
    plots::reliability(&dir.join(format!("{name}.reliability.png")), &name, bins).map_err(fail)?;
    // Occlusion saliency for a few correct and a few wrong crops.
    let right: Vec<usize> = (0..truth.len())
        .filter(|&i| calibration::top(&probs[i]).0 == truth[i])
        .take(4)
        .collect();
    let wrong: Vec<usize> = (0..truth.len())
        .filter(|&i| calibration::top(&probs[i]).0 != truth[i])
        .take(4)
        .collect();
    for (tag, idx) in [("correct", right), ("wrong", wrong)] {
        for (j, &i) in idx.iter().enumerate() {
            let img = dataset::load_rgb(&crops[i])?;
            let out = dir.join(format!("{name}.saliency-{tag}-{j}.png"));
            plots::saliency(&out, model, &img, truth[i]).map_err(fail)?;
        }
    }
    eprintln!("pictures written to {}", dir.display());
    Ok(())
}

#[cfg(not(feature = "plots"))]
fn draw(
    _: &Path,
    _: &mut Model,
    _: &[RocCurve],
    _: &[Vec<f32>],
    _: &[usize],
    _: &[calibration::Bin],
    _: &[PathBuf],
) -> anyhow::Result<()> {
    bail!("this spermscope-eval was built without pictures; build it with --features plots")
}
