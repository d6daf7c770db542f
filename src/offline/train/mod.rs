//! The offline trainer (feature `train`): experiments, cross-validation under the published
//! protocols, the final model, its ONNX export, metrics and pictures.

pub mod augment;
pub mod checkpoint;
pub mod config;
pub mod diagnose;
pub mod distill;
pub mod efficientnet;
pub mod export;
pub mod finetune;
pub mod fit;
pub mod health;
pub mod init;
pub mod net;
pub mod plot;
pub mod tune;

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::core::calibration::argmax;
use crate::core::dataset::{self, Dataset, Skipped};
use crate::core::morphometry;
use crate::core::spec::{
    CropSpec, FEATURES_WITH_FLAG, FeatureSpec, InputSpec, ModelSpec, SPEC_FORMAT,
};
use crate::offline::eval::Calibration;
use crate::offline::metrics::{Scores, mean_std};
use checkpoint::Checkpoints;
use config::{Experiment, Pretext, Protocol};
use fit::{FitCheckpoint, Item};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    #[error(transparent)]
    Export(#[from] export::ExportError),
    #[error("no usable images in {0}")]
    NoImages(PathBuf),
    #[error("protocol {protocol:?} needs {what}")]
    Protocol { protocol: Protocol, what: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error(transparent)]
    Fit(#[from] fit::FitError),
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    #[error(transparent)]
    Weights(#[from] efficientnet::WeightsError),
    #[error(
        "--resume needs train.checkpoint = true in the experiment (a run without checkpoints cannot be continued)"
    )]
    ResumeWithoutCheckpoints,
    #[error(transparent)]
    Init(#[from] init::InitError),
    #[error(transparent)]
    Distill(#[from] distill::DistillError),
    #[error("give an experiment file (--config), a model to start from (--init), or both")]
    NoExperiment,
    #[error("--init without --config needs --dataset (the lab's crops, one folder per class)")]
    InitWithoutDataset,
    #[error(
        "a pretext model (data.pretext) is not cross-validated: drop --folds, and measure it by the fine-tuning it starts (--init)"
    )]
    PretextFolds,
}

/// What the command line may change in an experiment.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run cross-validation (or the given split) before training the final model.
    pub folds: bool,
    pub protocol: Option<Protocol>,
    pub seeds: Option<Vec<u64>>,
    pub epochs: Option<usize>,
    /// Use at most this many images (spread over the classes): smoke runs.
    pub limit: Option<usize>,
    /// Skip the final model (cross-validation figures only).
    pub no_final: bool,
    /// Folder for the model and its metrics/pictures.
    pub out: PathBuf,
    pub quiet: bool,
    /// Continue from the checkpoints of an earlier, interrupted run (`train.checkpoint`).
    pub resume: bool,
    /// Stop, as if killed, after this many epochs (tests of `resume`).
    pub stop_after: Option<usize>,
    /// Cross-validate only the first N folds of each seed (pilot runs).
    pub max_folds: Option<usize>,
    /// Keep every cross-validation fold's model, with a record of its test images, in
    /// `OUT/NAME.folds/` (teachers for distillation, fold ensembles).
    pub fold_models: bool,
    /// Start from this trained model (`--init`) instead of random weights.
    pub init: Option<PathBuf>,
    pub init_opts: init::InitOptions,
}

/// Cross-validation figures.
#[derive(Debug, Clone, Serialize)]
pub struct CvReport {
    pub protocol: Protocol,
    pub folds: usize,
    pub seeds: Vec<u64>,
    /// Accuracy of every fold of every seed, in run order.
    pub fold_accuracy: Vec<f64>,
    pub fold_macro_f1: Vec<f64>,
    /// Mean over all folds and seeds, and the standard deviation across folds.
    pub accuracy_mean: f64,
    pub accuracy_std: f64,
    pub macro_f1_mean: f64,
    pub macro_f1_std: f64,
    /// Pooled-prediction accuracy of each seed's whole run.
    pub seed_accuracy: Vec<f64>,
    /// The same folds scored both ways, whichever the model uses: without and with test-time
    /// mirror fusion (mean accuracy over all folds and seeds).
    pub accuracy_plain: f64,
    pub accuracy_mirror_fused: f64,
    /// All test predictions pooled.
    pub pooled: Scores,
    pub seconds: f64,
    /// The teacher of every fold, in run order, when the folds were distilled.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub teachers: Vec<distill::Teacher>,
    /// The first seed's out-of-fold logits (item index, logits): validation data for a final
    /// model that keeps no validation split.
    #[serde(skip)]
    pub out_of_fold: Vec<(usize, Vec<f32>)>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub name: String,
    /// The experiment file, if one was given.
    pub config: Option<PathBuf>,
    /// The model the run started from (`--init`).
    pub init: Option<PathBuf>,
    pub dataset: PathBuf,
    pub images: usize,
    pub skipped: Vec<String>,
    pub heads_found: usize,
    pub cv: Option<CvReport>,
    pub final_model: Option<FinalReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FinalReport {
    pub path: PathBuf,
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub train_images: usize,
    pub val_images: usize,
    pub seconds: f64,
    pub images_per_second: f64,
    /// Logits of the trained network on real crops (unaugmented), for the parity check.
    pub parity_logits: Vec<Vec<f32>>,
    pub parity_items: Vec<PathBuf>,
    /// Scores on the held-out test split (given-split protocol only).
    pub test: Option<Scores>,
    /// Scores of the final network (in burn) on every image of the dataset it was trained on:
    /// not a generalisation figure, but what `spermscope-eval` must reproduce through ONNX
    /// Runtime on the same data.
    pub all_data: Scores,
    pub spec: ModelSpec,
    /// Loss, accuracy (train and validation), learning rate and seconds for every epoch.
    pub history: Vec<fit::EpochLog>,
    /// First epoch of three in which validation loss rose while training loss fell.
    pub overfitting_from_epoch: Option<usize>,
    /// The softmax temperature fitted on the validation split, stored in the model.
    pub calibration: Option<Calibration>,
    /// The teacher whose soft targets it learned from (`[distill]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<distill::Teacher>,
}

/// The experiment's dataset (at most `limit` images, spread over it), its base spec, and
/// every image decoded with its head located; unreadable images come back as skipped.
fn load_data(
    exp: &Experiment,
    limit: Option<usize>,
    bar: &ProgressBar,
) -> Result<(Dataset, ModelSpec, Vec<Item>, Vec<Skipped>), TrainError> {
    let mut ds = dataset::open(&exp.data.dataset, &exp.data.mhsma_label, None)?;
    if let Some(l) = limit {
        ds.spread(l);
    }
    if exp.data.pretext == Some(Pretext::Rotation) {
        ds.classes = Pretext::ROTATION_CLASSES.map(String::from).to_vec();
    }
    let spec = base_spec(exp, &ds.classes);
    match &exp.init {
        Some(i) if init::is_pretext(&i.spec) => tracing::info!(
            model = %i.path.display(),
            classes = ?spec.classes,
            "starting from a pretext model: its crop and weights are kept, the input normalisation is fitted on this dataset"
        ),
        Some(i) => tracing::info!(
            model = %i.path.display(),
            classes = ?spec.classes,
            "starting from a trained model: its crop, input normalisation and features are kept"
        ),
        None => {}
    }
    let (mut items, skipped) = fit::load_items(&ds, &spec, bar);
    if items.is_empty() {
        return Err(TrainError::NoImages(ds.root.clone()));
    }
    if exp.data.pretext == Some(Pretext::Rotation) {
        items = fit::rotation_pretext(items);
    }
    Ok((ds, spec, items, skipped))
}

/// The spec of a model trained by `exp` on `classes` (normalisation still to be fitted).
pub fn base_spec(exp: &Experiment, classes: &[String]) -> ModelSpec {
    let c = exp.crop.channels as usize;
    let mut spec = ModelSpec {
        format: SPEC_FORMAT,
        name: exp.name.clone(),
        classes: classes.to_vec(),
        normal_class: exp
            .data
            .normal_class
            .clone()
            .filter(|n| classes.contains(n)),
        input: InputSpec {
            size_px: exp.crop.size_px,
            channels: exp.crop.channels,
            mean: vec![0.0; c],
            std: vec![1.0; c],
        },
        crop: CropSpec {
            pose: exp.crop.pose,
            contrast: exp.crop.contrast,
            window_px: exp.crop.window_px,
            um_per_px: exp.data.um_per_px,
        },
        features: exp.model.features.then(|| FeatureSpec {
            set: morphometry::FEATURE_SET.into(),
            count: FEATURES_WITH_FLAG,
            mean: vec![0.0; FEATURES_WITH_FLAG],
            std: vec![1.0; FEATURES_WITH_FLAG],
        }),
        temperature: 1.0,
        test_time_mirror: exp.model.test_time_mirror,
    };
    if let Some(i) = &exp.init {
        spec.input = i.spec.input.clone();
        spec.features = i.spec.features.clone();
    }
    spec
}

/// Fit the input normalisation on the training items, unless the run starts from a trained
/// classifier, whose normalisation its weights expect. A pretext model's normalisation was
/// fitted on other images (often another stain), so it is fitted again here: each dataset
/// reaches the network standardised on its own statistics.
fn normalise(exp: &Experiment, items: &[Item], train_idx: &[usize], spec: &mut ModelSpec) {
    if exp.init.as_ref().is_none_or(|m| init::is_pretext(&m.spec)) {
        fit::fit_normalisation(items, train_idx, spec, exp.model.fixed_pixel_norm());
    }
}

/// Stratified hold-out of `fraction` of `idx` for validation.
fn split_val(items: &[Item], idx: &[usize], fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    if fraction <= 0.0 {
        return (idx.to_vec(), Vec::new());
    }
    let k = (1.0 / fraction).round().max(2.0) as usize;
    let labels: Vec<usize> = idx.iter().map(|&i| items[i].label).collect();
    let f = dataset::stratified_folds(&labels, k, seed ^ 0xA5A5);
    let mut tr = Vec::new();
    let mut va = Vec::new();
    for (j, &i) in idx.iter().enumerate() {
        if f[j] == 0 { va.push(i) } else { tr.push(i) }
    }
    (tr, va)
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>22} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// The experiment of a run: the file, a model to start from, or the file applied to the model;
/// `--dataset` replaces its dataset in each case.
fn load_experiment(config: Option<&Path>, opts: &RunOptions) -> Result<Experiment, TrainError> {
    let dataset = opts.init_opts.dataset.clone();
    let init = match &opts.init {
        Some(m) => Some(crate::core::spec::ModelFile::read(m).map_err(init::InitError::from)?),
        None => None,
    };
    let mut exp = match (config, &init, dataset.clone()) {
        (Some(c), _, _) => Experiment::load(c)?,
        (None, Some(m), Some(d)) => init::adaptation_experiment(m, d),
        (None, Some(_), None) => return Err(TrainError::InitWithoutDataset),
        (None, None, _) => return Err(TrainError::NoExperiment),
    };
    if let Some(d) = dataset {
        exp.data.dataset = d;
    }
    let Some(init) = init else {
        return Ok(exp);
    };
    let classes = dataset::open(&exp.data.dataset, &exp.data.mhsma_label, None)?.classes;
    Ok(init::attach(exp, init, &opts.init_opts, &classes)?)
}

/// Run an experiment: cross-validation when asked, then the final model and its files.
pub fn run(config: Option<&Path>, opts: &RunOptions) -> Result<RunReport, TrainError> {
    let mut exp = load_experiment(config, opts)?;
    let config_path = config
        .or(opts.init.as_deref())
        .unwrap_or(Path::new("--init"));
    if let Some(e) = opts.epochs {
        exp.train.epochs = e;
    }
    if let Some(p) = opts.protocol {
        exp.cv.protocol = p;
    }
    if let Some(s) = &opts.seeds {
        exp.cv.seeds = s.clone();
    }
    exp.validate(config_path)?;
    if exp.data.pretext.is_some() && opts.folds {
        return Err(TrainError::PretextFolds);
    }
    if let (true, Some(v)) = (exp.model.pretrained, exp.model.backbone.lite()) {
        efficientnet::find_weights(v, exp.model.weights.as_deref())?;
    }
    let ckpts = open_checkpoints(&exp, opts)?;
    let multi = if opts.quiet {
        MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    } else {
        MultiProgress::new()
    };
    let load_bar = multi.add(
        ProgressBar::new(0)
            .with_style(bar_style())
            .with_prefix("images"),
    );
    let (ds, spec0, items, skipped) = load_data(&exp, opts.limit, &load_bar)?;
    // A pretext sees each image four times; the images are counted once.
    let images = items.iter().filter(|i| i.turns == 0).count();
    let heads_found = items
        .iter()
        .filter(|i| i.turns == 0 && i.loc.head.is_some())
        .count();
    tracing::info!(
        images,
        skipped = skipped.len(),
        heads_found,
        "dataset ready"
    );
    let cv = if opts.folds {
        Some(cross_validate(
            &exp,
            &ds,
            &items,
            &spec0,
            &multi,
            (ckpts.as_ref(), opts),
        )?)
    } else {
        None
    };
    let final_model = if opts.no_final {
        None
    } else {
        Some(train_final(
            &exp,
            &items,
            &spec0,
            cv.as_ref(),
            opts,
            &multi,
            ckpts.as_ref(),
        )?)
    };
    let report = RunReport {
        name: exp.name.clone(),
        config: config.map(Path::to_path_buf),
        init: opts.init.clone(),
        dataset: ds.root.clone(),
        images,
        skipped: skipped
            .iter()
            .map(|s: &Skipped| format!("{}: {}", s.path.display(), s.reason))
            .collect(),
        heads_found,
        cv,
        final_model,
    };
    let json_path = opts.out.join(format!("{}.metrics.json", exp.name));
    std::fs::create_dir_all(&opts.out)
        .and_then(|_| {
            std::fs::write(
                &json_path,
                serde_json::to_string_pretty(&report).unwrap_or_default(),
            )
        })
        .map_err(|e| TrainError::Write {
            path: json_path.clone(),
            reason: e.to_string(),
        })?;
    Ok(report)
}

/// The run's checkpoints when the experiment keeps them (`train.checkpoint`), under
/// `OUT/NAME.checkpoints`.
fn open_checkpoints(
    exp: &Experiment,
    opts: &RunOptions,
) -> Result<Option<Checkpoints>, TrainError> {
    if !exp.train.checkpoint {
        if opts.resume {
            return Err(TrainError::ResumeWithoutCheckpoints);
        }
        return Ok(None);
    }
    // The experiment after the command line's overrides, and the subset: a checkpoint of any
    // other run must not be continued as this one.
    let fingerprint = format!("{}\nlimit {:?}", exp.fingerprint(), opts.limit);
    let root = opts.out.join(format!("{}.checkpoints", exp.name));
    Ok(Some(Checkpoints::open(
        root,
        &fingerprint,
        opts.resume,
        opts.stop_after,
    )?))
}

fn test_folds(
    exp: &Experiment,
    ds: &Dataset,
    items: &[Item],
    seed: u64,
) -> Result<Vec<Option<usize>>, TrainError> {
    let labels: Vec<usize> = items.iter().map(|i| i.label).collect();
    Ok(match exp.cv.protocol {
        Protocol::Stratified => dataset::stratified_folds(&labels, exp.cv.folds, seed)
            .into_iter()
            .map(Some)
            .collect(),
        Protocol::FoldsCsv => {
            let csv = ds.root.join("folds.csv");
            let kept = Dataset {
                root: ds.root.clone(),
                classes: ds.classes.clone(),
                samples: items
                    .iter()
                    .map(|i| dataset::Sample {
                        path: i.path.clone(),
                        label: i.label,
                        split: None,
                    })
                    .collect(),
            };
            dataset::folds_csv(&kept, &csv)?
                .into_iter()
                .map(Some)
                .collect()
        }
        Protocol::GivenSplit => {
            if !items.iter().any(|i| i.split.as_deref() == Some("test")) {
                return Err(TrainError::Protocol {
                    protocol: Protocol::GivenSplit,
                    what: "a dataset with a 'test' split (MHSMA's labels.csv)".into(),
                });
            }
            items
                .iter()
                .map(|i| (i.split.as_deref() == Some("test")).then_some(0))
                .collect()
        }
    })
}

/// The training, validation and test indexes of one fold: the test fold, and the rest split
/// into training and validation (the dataset's own train/valid split under `GivenSplit`).
fn fold_split(
    exp: &Experiment,
    items: &[Item],
    assign: &[Option<usize>],
    fold: usize,
    seed: u64,
) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let (test, rest): (Vec<usize>, Vec<usize>) =
        (0..items.len()).partition(|&i| assign[i] == Some(fold));
    let (train_idx, val_idx) = if exp.cv.protocol == Protocol::GivenSplit {
        rest.iter()
            .partition(|&&i| items[i].split.as_deref() == Some("train"))
    } else {
        split_val(items, &rest, exp.train.val_fraction, seed + fold as u64)
    };
    (train_idx, val_idx, test)
}

/// Accuracy of logits against the truth.
fn accuracy(classes: &[String], truth: &[usize], logits: &[Vec<f32>]) -> f64 {
    let p: Vec<usize> = logits.iter().map(|l| argmax(l)).collect();
    Scores::new(classes, truth, &p).accuracy
}

/// A fold's test predictions, both without and with test-time mirror fusion; what a
/// checkpointed run records when the fold is done, so that a resumed run skips it.
#[derive(Debug, Serialize, Deserialize)]
struct FoldOutcome {
    test: Vec<usize>,
    plain: Vec<Vec<f32>>,
    mirror: Vec<Vec<f32>>,
    best_epoch: usize,
    images_per_second: f64,
    /// The fold's per-epoch figures (kept in the record, for diagnosis).
    #[serde(default)]
    history: Vec<fit::EpochLog>,
    /// The teacher whose soft targets it learned from (`[distill]`).
    #[serde(default)]
    teacher: Option<distill::Teacher>,
}

/// Trains one fold (or reads its record) and predicts its test items.
#[allow(clippy::too_many_arguments)]
fn fold_outcome(
    exp: &Experiment,
    items: &[Item],
    spec0: &ModelSpec,
    (train_idx, val_idx, test): (&[usize], &[usize], &[usize]),
    seed: u64,
    bar: &ProgressBar,
    ckpts: Option<&Checkpoints>,
    (record, keep): (distill::FoldRecord, Option<&Path>),
) -> Result<FoldOutcome, TrainError> {
    let run = record.fit.clone();
    if let Some(c) = ckpts
        && let Some(done) = c.done::<FoldOutcome>(&run)?
        && done.test == test
    {
        tracing::info!(run, "fold done in an earlier session: its record is reused");
        if let Some(dir) = keep
            && !dir.join(format!("{run}.onnx")).is_file()
        {
            tracing::warn!(run, folder = %dir.display(), "--fold-models: this fold finished in a run without it, so its model was not kept");
        }
        return Ok(done);
    }
    let taught = distill::targets(exp, &run, Some(&record), items, train_idx, &spec0.classes)?;
    let mut spec = spec0.clone();
    normalise(exp, items, train_idx, &mut spec);
    let ckpt = ckpts.map(|all| FitCheckpoint {
        all,
        run: run.clone(),
    });
    let fitted = fit::fit(
        exp,
        items,
        train_idx,
        val_idx,
        &spec,
        seed,
        bar,
        ckpt.as_ref(),
        taught.as_ref().map(|t| t.targets.as_slice()),
    )?;
    let outcome = FoldOutcome {
        test: test.to_vec(),
        plain: fit::predict_with(&fitted.model, items, test, &spec, false),
        mirror: fit::predict_with(&fitted.model, items, test, &spec, true),
        best_epoch: fitted.best_epoch,
        images_per_second: fitted.images_per_second,
        history: fitted.history,
        teacher: taught.map(|t| t.teacher),
    };
    // Kept before the fold is recorded as done, so a finished fold always has its model.
    if let Some(dir) = keep {
        let mut kept = spec.clone();
        kept.name = format!("{}-{run}", spec.name);
        let bytes = export::to_onnx(fitted.model, &kept)?;
        distill::keep_fold_model(dir, &bytes, &record)?;
    }
    if let Some(c) = ckpts {
        c.finish(&run, &outcome)?;
    }
    Ok(outcome)
}

fn cross_validate(
    exp: &Experiment,
    ds: &Dataset,
    items: &[Item],
    spec0: &ModelSpec,
    multi: &MultiProgress,
    (ckpts, opts): (Option<&Checkpoints>, &RunOptions),
) -> Result<CvReport, TrainError> {
    let max_folds = opts.max_folds;
    let keep = opts
        .fold_models
        .then(|| distill::folds_dir(&opts.out, &exp.name));
    let started = Instant::now();
    let folds = match exp.cv.protocol {
        Protocol::GivenSplit => 1,
        _ => exp.cv.folds,
    };
    let run_folds = max_folds.map_or(folds, |m| m.clamp(1, folds));
    let runs = run_folds * exp.cv.seeds.len();
    let top = multi.add(
        ProgressBar::new(runs as u64)
            .with_style(bar_style())
            .with_prefix(format!("{:?} folds", exp.cv.protocol)),
    );
    let epoch_bar = multi.add(ProgressBar::new(0).with_style(bar_style()));
    let k = spec0.classes.len();
    let mut pooled = vec![vec![0usize; k]; k];
    let (mut accs, mut f1s, mut seed_acc) = (Vec::new(), Vec::new(), Vec::new());
    let (mut plain, mut fused) = (Vec::new(), Vec::new());
    let mut out_of_fold = Vec::new();
    let mut teachers = Vec::new();
    for (seed_no, &seed) in exp.cv.seeds.iter().enumerate() {
        let assign = test_folds(exp, ds, items, seed)?;
        let mut seed_conf = vec![vec![0usize; k]; k];
        for fold in 0..run_folds {
            epoch_bar.set_prefix(format!("seed {seed} fold {}/{folds}", fold + 1));
            let (train_idx, val_idx, test) = fold_split(exp, items, &assign, fold, seed);
            let run = format!("s{seed}-f{}", fold + 1);
            let record = distill::FoldRecord::new(&run, &ds.root, items, &train_idx, &test);
            let o = fold_outcome(
                exp,
                items,
                spec0,
                (&train_idx, &val_idx, &test),
                seed * 1000 + fold as u64,
                &epoch_bar,
                ckpts,
                (record, keep.as_deref()),
            )?;
            teachers.extend(o.teacher.clone());
            let truth: Vec<usize> = test.iter().map(|&i| items[i].label).collect();
            // Both ways once; the model's own setting picks which are its predictions.
            plain.push(accuracy(&spec0.classes, &truth, &o.plain));
            fused.push(accuracy(&spec0.classes, &truth, &o.mirror));
            let logits = if spec0.test_time_mirror {
                o.mirror
            } else {
                o.plain
            };
            if seed_no == 0 {
                out_of_fold.extend(test.iter().copied().zip(logits.iter().cloned()));
            }
            let pred: Vec<usize> = logits.iter().map(|l| argmax(l)).collect();
            let s = Scores::new(&spec0.classes, &truth, &pred);
            for t in 0..k {
                for p in 0..k {
                    pooled[t][p] += s.confusion[t][p];
                    seed_conf[t][p] += s.confusion[t][p];
                }
            }
            multi.suspend(|| {
                eprintln!(
                    "seed {seed} fold {}/{folds}: accuracy {:.3} macro-F1 {:.3} (n {}, best epoch {}, {:.1} img/s)",
                    fold + 1,
                    s.accuracy,
                    s.macro_f1,
                    s.n,
                    o.best_epoch,
                    o.images_per_second
                )
            });
            accs.push(s.accuracy);
            f1s.push(s.macro_f1);
            top.inc(1);
        }
        seed_acc.push(Scores::from_confusion(&spec0.classes, seed_conf).accuracy);
    }
    top.finish_and_clear();
    epoch_bar.finish_and_clear();
    let (am, asd) = mean_std(&accs);
    let (fm, fsd) = mean_std(&f1s);
    Ok(CvReport {
        protocol: exp.cv.protocol,
        folds,
        seeds: exp.cv.seeds.clone(),
        fold_accuracy: accs,
        fold_macro_f1: f1s,
        accuracy_mean: am,
        accuracy_std: asd,
        macro_f1_mean: fm,
        macro_f1_std: fsd,
        seed_accuracy: seed_acc,
        accuracy_plain: mean_std(&plain).0,
        accuracy_mirror_fused: mean_std(&fused).0,
        pooled: Scores::from_confusion(&spec0.classes, pooled),
        seconds: started.elapsed().as_secs_f64(),
        teachers,
        out_of_fold,
    })
}

/// The final model's temperature, fitted on its validation split, or on the
/// cross-validation's out-of-fold predictions when it keeps none.
fn final_temperature(
    exp: &Experiment,
    items: &[Item],
    val_idx: &[usize],
    all_logits: &[Vec<f32>],
    cv: Option<&CvReport>,
) -> Option<Calibration> {
    if !exp.train.fit_temperature || exp.data.pretext.is_some() {
        return None;
    }
    if !val_idx.is_empty() {
        let logits: Vec<Vec<f32>> = val_idx.iter().map(|&i| all_logits[i].clone()).collect();
        let truth: Vec<usize> = val_idx.iter().map(|&i| items[i].label).collect();
        return Calibration::fit(&logits, &truth, "validation split");
    }
    let Some(cv) = cv else {
        tracing::warn!(
            "temperature not fitted: the final model keeps no validation split and no cross-validation ran (use --folds or train.val_fraction)"
        );
        return None;
    };
    let truth: Vec<usize> = cv
        .out_of_fold
        .iter()
        .map(|(i, _)| items[*i].label)
        .collect();
    let logits: Vec<Vec<f32>> = cv.out_of_fold.iter().map(|(_, l)| l.clone()).collect();
    Calibration::fit(
        &logits,
        &truth,
        "cross-validation out-of-fold predictions (first seed)",
    )
}

/// The final model's pictures: training curves, gradient norms and the confusion matrix. A
/// picture that cannot be drawn is a warning, not a failed run.
fn draw_final(
    out: &Path,
    title: &str,
    history: &[fit::EpochLog],
    confusion: Option<(&Scores, &str)>,
) {
    let curves = out.join(format!("{title}.curves.png"));
    if let Err(e) = plot::training_curves(history, title, &curves) {
        tracing::warn!(path = %curves.display(), error = %e, "training curves not drawn");
    }
    let gradients = out.join(format!("{title}.gradients.png"));
    if let Err(e) = plot::gradient_norms(history, title, &gradients) {
        tracing::warn!(path = %gradients.display(), error = %e, "gradient norms not drawn");
    }
    if let Some((s, what)) = confusion {
        let p = out.join(format!("{title}.confusion.png"));
        if let Err(e) = plot::confusion(s, &format!("{title} ({what})"), &p) {
            tracing::warn!(path = %p.display(), error = %e, "confusion matrix not drawn");
        }
    }
}

/// The parity reference's images: up to 16 spread over the data, as a reader sees them (a
/// pretext's turned copies left out), whose logits before export the exported model must give.
fn parity_items(items: &[Item]) -> Vec<usize> {
    let plain: Vec<usize> = (0..items.len()).filter(|&i| items[i].turns == 0).collect();
    plain
        .iter()
        .copied()
        .step_by((plain.len() / 16).max(1))
        .take(16)
        .collect()
}

fn train_final(
    exp: &Experiment,
    items: &[Item],
    spec0: &ModelSpec,
    cv: Option<&CvReport>,
    opts: &RunOptions,
    multi: &MultiProgress,
    ckpts: Option<&Checkpoints>,
) -> Result<FinalReport, TrainError> {
    let started = Instant::now();
    let seed = exp.cv.seeds.first().copied().unwrap_or(exp.train.seed);
    let all: Vec<usize> = (0..items.len()).collect();
    let given = exp.cv.protocol == Protocol::GivenSplit && items.iter().any(|i| i.split.is_some());
    let (train_idx, val_idx, test_idx) = if given {
        let by = |name: &str| -> Vec<usize> {
            all.iter()
                .copied()
                .filter(|&i| items[i].split.as_deref() == Some(name))
                .collect()
        };
        (by("train"), by("valid"), by("test"))
    } else {
        let (tr, va) = split_val(items, &all, exp.train.val_fraction, seed);
        (tr, va, Vec::new())
    };
    let mut spec = spec0.clone();
    normalise(exp, items, &train_idx, &mut spec);
    let bar = multi.add(
        ProgressBar::new(0)
            .with_style(bar_style())
            .with_prefix("final model"),
    );
    let ckpt = ckpts.map(|all| FitCheckpoint {
        all,
        run: "final".into(),
    });
    let taught = distill::targets(exp, "final", None, items, &train_idx, &spec.classes)?;
    let fitted = fit::fit(
        exp,
        items,
        &train_idx,
        &val_idx,
        &spec,
        seed,
        &bar,
        ckpt.as_ref(),
        taught.as_ref().map(|t| t.targets.as_slice()),
    )?;
    bar.finish_and_clear();
    // `all` is every item in order, so these logits are indexed by item.
    let all_logits = fit::predict(&fitted.model, items, &all, &spec);
    let test = (!test_idx.is_empty()).then(|| {
        let truth: Vec<usize> = test_idx.iter().map(|&i| items[i].label).collect();
        let pred: Vec<usize> = test_idx.iter().map(|&i| argmax(&all_logits[i])).collect();
        Scores::new(&spec.classes, &truth, &pred)
    });
    let calibration = final_temperature(exp, items, &val_idx, &all_logits, cv);
    if let Some(c) = &calibration {
        spec.temperature = c.temperature;
        tracing::info!(
            temperature = c.temperature,
            ece_before = c.ece_before,
            ece_after = c.ece_after,
            "temperature fitted on the {}",
            c.fitted_on
        );
    }
    let all_data = Scores::new(
        &spec.classes,
        &items.iter().map(|i| i.label).collect::<Vec<_>>(),
        &all_logits.iter().map(|l| argmax(l)).collect::<Vec<_>>(),
    );
    let parity_idx = parity_items(items);
    let parity_logits: Vec<Vec<f32>> = parity_idx.iter().map(|&i| all_logits[i].clone()).collect();
    let onnx_path = opts.out.join(format!("{}.onnx", exp.name));
    let title = exp.name.clone();
    let history = fitted.history;
    let bytes = export::to_onnx(fitted.model, &spec)?;
    export::save(&bytes, &onnx_path)?;
    let confusion = match (cv, &test) {
        (Some(c), _) => Some((&c.pooled, "cross-validation, pooled")),
        (None, Some(t)) => Some((t, "test split")),
        (None, None) => None,
    };
    draw_final(&opts.out, &title, &history, confusion);
    Ok(FinalReport {
        path: onnx_path,
        epochs_run: history.len(),
        best_epoch: fitted.best_epoch,
        train_images: train_idx.len(),
        val_images: val_idx.len(),
        seconds: started.elapsed().as_secs_f64(),
        images_per_second: fitted.images_per_second,
        parity_logits,
        parity_items: parity_idx.iter().map(|&i| items[i].path.clone()).collect(),
        test,
        all_data,
        spec,
        overfitting_from_epoch: fit::overfitting_from(&history),
        history,
        calibration,
        teacher: taught.map(|t| t.teacher),
    })
}
