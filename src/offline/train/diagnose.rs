//! Checks a researcher runs before a long training: can the network fit one small batch
//! (`--overfit-batch`, the classic bug check), and which learning rates train at all
//! (`--lr-find`, a range test with its plot).

use std::path::{Path, PathBuf};

use indicatif::ProgressBar;
use serde::Serialize;

use super::config::{Balance, Experiment};
use super::{TrainError, fit, load_data, plot};

/// What `--overfit-batch` found.
#[derive(Debug, Clone, Serialize)]
pub struct OverfitReport {
    pub images: usize,
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub last_accuracy: f64,
    /// Every image right and the loss about zero (below 0.1): model, inputs and labels line up.
    pub passed: bool,
}

/// What `--lr-find` found.
#[derive(Debug, Clone, Serialize)]
pub struct LrFindReport {
    /// (learning rate, training loss) per batch.
    pub curve: Vec<(f64, f64)>,
    /// A tenth of the rate at the lowest smoothed loss.
    pub suggested_lr: Option<f64>,
    pub plot: PathBuf,
}

fn load(
    config: &Path,
    limit: Option<usize>,
) -> Result<(Experiment, Vec<fit::Item>, crate::core::spec::ModelSpec), TrainError> {
    let exp = Experiment::load(config)?;
    let (_, spec, items, _) = load_data(&exp, limit, &ProgressBar::hidden())?;
    Ok((exp, items, spec))
}

/// Train on `n` images (spread over the classes) with no augmentation, dropout, smoothing or
/// weighting, one batch per step, for `steps` steps; the loss must go to about zero.
pub fn overfit_batch(config: &Path, n: usize, steps: usize) -> Result<OverfitReport, TrainError> {
    let (mut exp, items, mut spec) = load(config, Some(n.max(2)))?;
    let idx: Vec<usize> = (0..items.len()).collect();
    fit::fit_normalisation(&items, &idx, &mut spec, exp.model.fixed_pixel_norm());
    let a = &mut exp.augment;
    for prob in [
        &mut a.rotate_prob,
        &mut a.mirror_prob,
        &mut a.flip_vertical_prob,
        &mut a.scale_prob,
        &mut a.shift_prob,
        &mut a.color_prob,
        &mut a.cutout_prob,
    ] {
        *prob = 0.0;
    }
    exp.model.dropout = 0.0;
    let t = &mut exp.train;
    t.label_smoothing = 0.0;
    t.balance = Balance::None;
    t.epochs = steps;
    t.batch_size = idx.len();
    t.warmup_epochs = 0;
    t.patience = 0;
    let fitted = fit::fit(
        &exp,
        &items,
        &idx,
        &[],
        &spec,
        exp.train.seed,
        &ProgressBar::hidden(),
        None,
        None,
    )?;
    let first = fitted.history.first().map_or(f64::NAN, |h| h.train_loss);
    let last = fitted.history.last().map_or(f64::NAN, |h| h.train_loss);
    let acc = fitted.history.last().map_or(0.0, |h| h.train_accuracy);
    Ok(OverfitReport {
        images: idx.len(),
        steps,
        first_loss: first,
        last_loss: last,
        last_accuracy: acc,
        passed: last < 0.1 && acc >= 1.0,
    })
}

/// A learning-rate range test from 1e-6 to 1 over `steps` batches, drawn to
/// `OUT/NAME.lr-find.png`.
pub fn lr_find(
    config: &Path,
    limit: Option<usize>,
    steps: usize,
    out: &Path,
) -> Result<LrFindReport, TrainError> {
    let (exp, items, mut spec) = load(config, limit)?;
    let idx: Vec<usize> = (0..items.len()).collect();
    fit::fit_normalisation(&items, &idx, &mut spec, exp.model.fixed_pixel_norm());
    let curve = fit::lr_range(
        &exp,
        &items,
        &idx,
        &spec,
        exp.train.seed,
        (1e-6, 1.0, steps),
    )?;
    let suggested = fit::suggest_lr(&curve);
    std::fs::create_dir_all(out).map_err(|e| TrainError::Write {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    let path = out.join(format!("{}.lr-find.png", exp.name));
    plot::lr_find(&curve, suggested, &exp.name, &path).map_err(|e| TrainError::Write {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(LrFindReport {
        curve,
        suggested_lr: suggested,
        plot: path,
    })
}
