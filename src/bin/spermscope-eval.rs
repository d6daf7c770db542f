//! `spermscope-eval`: scores an ONNX model on a labelled dataset through the daemon's own
//! preprocessing and ONNX Runtime path.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use spermscope::dataset;
use spermscope::metrics::Scores;
use spermscope::model::{Model, Provider, RuntimeOptions};
use spermscope::preprocess;

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spermscope-eval: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    let mut pred = Vec::new();
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
                }
                Err(e) => skipped.push(e.to_string()),
            }
        }
        for logits in model.logits(&batch).context("running the model")? {
            let best = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            pred.push(best);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let scores = Scores::new(&classes, &truth, &pred);
    let crops_per_second = truth.len() as f64 / secs.max(1e-9);
    if args.json {
        let mut v = serde_json::to_value(&scores)?;
        if let Some(o) = v.as_object_mut() {
            o.insert("model".into(), serde_json::json!({
                "name": model.spec.name, "path": model.path, "sha256": model.sha256, "provider": model.provider,
            }));
            o.insert("dataset".into(), serde_json::json!(data_path));
            o.insert(
                "crops_per_second".into(),
                serde_json::json!(crops_per_second),
            );
            o.insert("heads_found".into(), serde_json::json!(heads));
            o.insert("skipped".into(), serde_json::json!(skipped));
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!(
            "model {} ({}, sha256 {}…, {}) on {}",
            model.spec.name,
            model.path.display(),
            &model.sha256[..12],
            model.provider,
            data_path.display()
        );
        print!("{}", scores.to_text());
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
