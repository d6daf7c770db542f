//! Knowledge distillation without leakage: each cross-validation fold's model can be kept
//! (`--fold-models`) with a record of the images it was tested on, and a student fold reads the
//! soft targets of the teacher trained for that same fold, refusing any other.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::config::{DistillConfig, Experiment};
use super::fit::Item;
use crate::core::model::{Model, ModelError, RuntimeOptions, softmax};

#[derive(Debug, thiserror::Error)]
pub enum DistillError {
    #[error("teacher {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error(
        "teacher {path} has no fold record ({record} is missing): only models written by spermscope-train --fold-models can teach a cross-validation fold"
    )]
    NoRecord { path: PathBuf, record: PathBuf },
    #[error("teacher record {path}: {reason}")]
    BadRecord { path: PathBuf, reason: String },
    #[error(
        "teacher {path} was tested on other images than fold {fit} ({teacher} vs {student}): it may have trained on this fold's test images (same dataset, protocol, seed and --limit needed)"
    )]
    OtherFold {
        path: PathBuf,
        fit: String,
        teacher: String,
        student: String,
    },
    #[error("teacher {path} does not know class '{class}' (its classes: {classes:?})")]
    Class {
        path: PathBuf,
        class: String,
        classes: Vec<String>,
    },
    #[error("teacher {path} failed on {image}: {source}")]
    Infer {
        path: PathBuf,
        image: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
}

/// What a kept fold model was tested on, written beside it (`<fit>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FoldRecord {
    /// The fit's name (`s<seed>-f<fold>`).
    pub fit: String,
    pub train_images: usize,
    pub test_images: usize,
    /// sha256 of the test images' paths (relative to the dataset, sorted, one per line).
    pub test_sha256: String,
}

impl FoldRecord {
    pub fn new(fit: &str, root: &Path, items: &[Item], train: &[usize], test: &[usize]) -> Self {
        Self {
            fit: fit.to_string(),
            train_images: train.len(),
            test_images: test.len(),
            test_sha256: digest(root, items, test),
        }
    }
}

/// sha256 over the sorted dataset-relative paths of `idx`.
fn digest(root: &Path, items: &[Item], idx: &[usize]) -> String {
    let mut names: Vec<String> = idx
        .iter()
        .map(|&i| {
            let p = &items[i].path;
            p.strip_prefix(root)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    let mut h = Sha256::new();
    for n in &names {
        h.update(n.as_bytes());
        h.update(b"\n");
    }
    format!("{:x}", h.finalize())
}

/// The folder of a run's kept fold models: `OUT/NAME.folds`.
pub fn folds_dir(out: &Path, name: &str) -> PathBuf {
    out.join(format!("{name}.folds"))
}

/// Writes a fold's model and its record (`<fit>.onnx`, `<fit>.json`).
pub fn keep_fold_model(dir: &Path, onnx: &[u8], record: &FoldRecord) -> Result<(), DistillError> {
    let write = |path: PathBuf, bytes: &[u8]| {
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&path, bytes))
            .map_err(|e| DistillError::Write {
                path,
                reason: e.to_string(),
            })
    };
    let json = serde_json::to_string_pretty(record).map_err(|e| DistillError::Write {
        path: dir.join(format!("{}.json", record.fit)),
        reason: e.to_string(),
    })?;
    write(dir.join(format!("{}.onnx", record.fit)), onnx)?;
    write(dir.join(format!("{}.json", record.fit)), json.as_bytes())
}

/// The teacher of one fit: `{fit}` in the configured path replaced by its name.
fn teacher_path(cfg: &DistillConfig, fit: &str) -> PathBuf {
    match (&cfg.final_teacher, fit) {
        (Some(t), "final") => PathBuf::from(t),
        _ => PathBuf::from(cfg.teacher.replace("{fit}", fit)),
    }
}

/// Which teacher taught a fit: recorded in the student's metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Teacher {
    pub fit: String,
    pub path: PathBuf,
    pub sha256: String,
}

/// A fit's soft targets (indexed by item) and their teacher.
pub struct Taught {
    pub targets: Vec<Vec<f32>>,
    pub teacher: Teacher,
}

/// The soft targets of one fit when the experiment distills (`[distill]`), else `None`; the
/// classes are the dataset's, in the student's order.
pub fn targets(
    exp: &Experiment,
    fit: &str,
    expect: Option<&FoldRecord>,
    items: &[Item],
    idx: &[usize],
    classes: &[String],
) -> Result<Option<Taught>, DistillError> {
    exp.distill
        .as_ref()
        .map(|cfg| soft_targets(cfg, fit, expect, items, idx, classes))
        .transpose()
}

/// The teacher's probabilities at the distillation temperature for the items in `idx`, in the
/// student's class order, indexed by item (empty for items outside `idx`). A fold's teacher
/// (`expect` given) must carry a record showing it was tested on exactly this fold's images.
fn soft_targets(
    cfg: &DistillConfig,
    fit: &str,
    expect: Option<&FoldRecord>,
    items: &[Item],
    idx: &[usize],
    classes: &[String],
) -> Result<Taught, DistillError> {
    let path = teacher_path(cfg, fit);
    if let Some(want) = expect {
        check_record(&path, want)?;
    }
    let opts = RuntimeOptions {
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        ..RuntimeOptions::default()
    };
    let mut model = Model::load(&path, &opts).map_err(|source| DistillError::Load {
        path: path.clone(),
        source,
    })?;
    let order: Vec<usize> = classes
        .iter()
        .map(|c| {
            model
                .spec
                .classes
                .iter()
                .position(|t| t == c)
                .ok_or_else(|| DistillError::Class {
                    path: path.clone(),
                    class: c.clone(),
                    classes: model.spec.classes.clone(),
                })
        })
        .collect::<Result<_, _>>()?;
    let pre = model.preprocessor();
    let mut out = vec![Vec::new(); items.len()];
    for chunk in idx.chunks(64) {
        let batch: Vec<_> = chunk.iter().map(|&i| pre.crop(&items[i].img)).collect();
        let logits = model.logits(&batch).map_err(|source| DistillError::Infer {
            path: path.clone(),
            image: items[chunk[0]].path.clone(),
            source,
        })?;
        for (&i, l) in chunk.iter().zip(logits) {
            let mine: Vec<f32> = order.iter().map(|&j| l[j]).collect();
            out[i] = softmax(&mine, cfg.temperature);
        }
    }
    tracing::info!(teacher = %path.display(), fit, images = idx.len(), "soft targets ready");
    Ok(Taught {
        targets: out,
        teacher: Teacher {
            fit: fit.to_string(),
            path,
            sha256: model.sha256.clone(),
        },
    })
}

fn check_record(model: &Path, want: &FoldRecord) -> Result<(), DistillError> {
    let record = model.with_extension("json");
    if !record.is_file() {
        return Err(DistillError::NoRecord {
            path: model.to_path_buf(),
            record,
        });
    }
    let bad = |reason: String| DistillError::BadRecord {
        path: record.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&record).map_err(|e| bad(e.to_string()))?;
    let got: FoldRecord = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if got.test_sha256 != want.test_sha256 || got.test_images != want.test_images {
        let short = |r: &FoldRecord| {
            format!(
                "{} images, {}",
                r.test_images,
                &r.test_sha256[..12.min(r.test_sha256.len())]
            )
        };
        return Err(DistillError::OtherFold {
            path: model.to_path_buf(),
            fit: want.fit.clone(),
            teacher: short(&got),
            student: short(want),
        });
    }
    Ok(())
}
