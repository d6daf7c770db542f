//! Scoring a model on labelled crops through the daemon's own path (the model's
//! `Preprocessor`, then ONNX Runtime), temperature scaling on held-out predictions (the
//! evaluator and the trainer share `Calibration`), and the label-free estimate on unlabelled
//! images. `spermscope-eval` prints what this computes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::core::calibration::{self, RocPoint, argmax};
use crate::core::dataset::{Dataset, DatasetError};
use crate::core::imageio::{self, ImageError, ListError};
use crate::core::model::{Model, ModelError, softmax};
use crate::core::preprocess::Prepared;
use crate::core::spec::{self, SpecError};

/// Why an evaluation cannot be done.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    List(#[from] ListError),
    #[error("dataset class '{class}' is not one of the model's classes {classes:?}")]
    UnknownClass { class: String, classes: Vec<String> },
    #[error("dataset {path} has no images (split '{split}')")]
    Empty { path: PathBuf, split: String },
    #[error("cannot rewrite the model's metadata: {0}")]
    Spec(SpecError),
    #[error("cannot read or write {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

impl From<SpecError> for EvalError {
    fn from(e: SpecError) -> Self {
        EvalError::Spec(e)
    }
}

/// Temperature scaling on held-out predictions, and what it did.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub temperature: f32,
    /// Which held-out predictions it was fitted on.
    pub fitted_on: String,
    pub val_images: usize,
    pub val_accuracy: f64,
    /// Expected calibration error (10 bins) before (T = 1) and after.
    pub ece_before: f64,
    pub ece_after: f64,
    /// Mean calibrated top probability: the label-free estimate on the same crops.
    pub estimated_accuracy: f64,
}

impl Calibration {
    /// Fit the temperature on held-out logits and measure what it did; `None` without any.
    pub fn fit(logits: &[Vec<f32>], truth: &[usize], fitted_on: &str) -> Option<Calibration> {
        if logits.is_empty() {
            return None;
        }
        let probs_at = |t: f32| -> Vec<Vec<f32>> { logits.iter().map(|l| softmax(l, t)).collect() };
        let temperature = calibration::fit_temperature(logits, truth);
        let (_, ece_before) = calibration::reliability(&probs_at(1.0), truth, 10);
        let after = probs_at(temperature);
        let (_, ece_after) = calibration::reliability(&after, truth, 10);
        let right = logits
            .iter()
            .zip(truth)
            .filter(|(l, t)| argmax(l) == **t)
            .count();
        Some(Calibration {
            temperature,
            fitted_on: fitted_on.to_string(),
            val_images: logits.len(),
            val_accuracy: right as f64 / logits.len() as f64,
            ece_before,
            ece_after,
            estimated_accuracy: calibration::estimated_accuracy(&after).unwrap_or(0.0),
        })
    }
}

/// Each dataset label's class index in the model, matched by name.
pub fn class_map(ds: &Dataset, model: &Model) -> Result<Vec<usize>, EvalError> {
    let classes = &model.spec.classes;
    ds.classes
        .iter()
        .map(|c| {
            classes
                .iter()
                .position(|m| m == c)
                .ok_or_else(|| EvalError::UnknownClass {
                    class: c.clone(),
                    classes: classes.clone(),
                })
        })
        .collect()
}

/// A model's answers on labelled crops.
#[derive(Debug, Clone, Default)]
pub struct Scored {
    /// The true class (the model's index) of each scored crop.
    pub truth: Vec<usize>,
    pub logits: Vec<Vec<f32>>,
    /// Probabilities at the model's temperature.
    pub probs: Vec<Vec<f32>>,
    pub paths: Vec<PathBuf>,
    /// Unreadable images, with the reason.
    pub skipped: Vec<String>,
    /// Crops in which the crop path found a head.
    pub heads_found: usize,
    pub secs: f64,
}

impl Scored {
    pub fn predictions(&self) -> Vec<usize> {
        self.probs.iter().map(|p| argmax(p)).collect()
    }

    pub fn crops_per_second(&self) -> f64 {
        self.truth.len() as f64 / self.secs.max(1e-9)
    }

    /// One-vs-rest ROC curve and AUC of each class present.
    pub fn roc_curves(&self, classes: &[String]) -> Vec<(String, Vec<RocPoint>, f64)> {
        (0..classes.len())
            .filter_map(|k| {
                calibration::roc(&self.probs, &self.truth, k)
                    .map(|(c, a)| (classes[k].clone(), c, a))
            })
            .collect()
    }
}

/// The evaluator's inputs for crop files: each decoded by content and prepared through the
/// model's `Preprocessor` (the daemon's and the trainer's path too), or why it could not be.
pub fn crop_inputs(model: &Model, paths: &[&Path]) -> Vec<Result<Prepared, ImageError>> {
    let pre = model.preprocessor();
    paths
        .iter()
        .map(|p| imageio::load_rgb(p).map(|img| pre.crop(&img)))
        .collect()
}

/// Score every crop of `ds` (decoded by content, prepared through the model's
/// `Preprocessor`), `batch` at a time.
pub fn score(model: &mut Model, ds: &Dataset, batch: usize) -> Result<Scored, EvalError> {
    let map = class_map(ds, model)?;
    let started = Instant::now();
    let mut out = Scored::default();
    for chunk in ds.samples.chunks(batch.max(1)) {
        let paths: Vec<&Path> = chunk.iter().map(|s| s.path.as_path()).collect();
        let mut inputs = Vec::with_capacity(chunk.len());
        for (s, prepared) in chunk.iter().zip(crop_inputs(model, &paths)) {
            match prepared {
                Ok(p) => {
                    out.heads_found += usize::from(p.head.is_some());
                    inputs.push(p);
                    out.truth.push(map[s.label]);
                    out.paths.push(s.path.clone());
                }
                Err(e) => out.skipped.push(e.to_string()),
            }
        }
        out.logits.extend(model.logits(&inputs)?);
    }
    out.secs = started.elapsed().as_secs_f64();
    let t = model.spec.temperature;
    out.probs = out.logits.iter().map(|l| softmax(l, t)).collect();
    Ok(out)
}

/// Write a copy of the model file with `temperature` stored in its spec.
pub fn write_with_temperature(
    model: &Model,
    temperature: f32,
    out: &Path,
) -> Result<(), EvalError> {
    let mut spec = (*model.spec).clone();
    spec.temperature = temperature;
    let bytes = std::fs::read(&model.path).map_err(|source| EvalError::Io {
        path: model.path.clone(),
        error: source,
    })?;
    let updated = spec::set_metadata(&bytes, spec::METADATA_KEY, &spec.to_json())?;
    std::fs::write(out, updated).map_err(|source| EvalError::Io {
        path: out.to_path_buf(),
        error: source,
    })
}

/// The label-free view of unlabelled images: how many of each predicted class, and the mean
/// calibrated confidence.
#[derive(Debug, Clone, Default)]
pub struct Unlabelled {
    pub probs: Vec<Vec<f32>>,
    pub predicted: BTreeMap<String, usize>,
    pub skipped: Vec<String>,
}

impl Unlabelled {
    pub fn estimate(&self) -> Option<f64> {
        calibration::estimated_accuracy(&self.probs)
    }
}

/// Classify every image a folder or glob names, `batch` at a time.
pub fn score_unlabelled(
    model: &mut Model,
    images: &Path,
    batch: usize,
) -> Result<Unlabelled, EvalError> {
    let files = imageio::list_files(images)?;
    let mut out = Unlabelled::default();
    for chunk in files.chunks(batch.max(1)) {
        let paths: Vec<&Path> = chunk.iter().map(PathBuf::as_path).collect();
        let mut inputs = Vec::new();
        for prepared in crop_inputs(model, &paths) {
            match prepared {
                Ok(p) => inputs.push(p),
                Err(e) => out.skipped.push(e.to_string()),
            }
        }
        for l in model.logits(&inputs)? {
            out.probs.push(softmax(&l, model.spec.temperature));
        }
    }
    for p in &out.probs {
        let class = model
            .spec
            .classes
            .get(argmax(p))
            .cloned()
            .unwrap_or_default();
        *out.predicted.entry(class).or_default() += 1;
    }
    Ok(out)
}
