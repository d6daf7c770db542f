//! Training: data made ready once (heads located, features measured), batches augmented on the
//! fly, the optimisation loop with warm-up + cosine schedule and early stopping, and prediction.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, GradientsParams, LionConfig, ModuleOptimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use image::RgbImage;
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::augment;
use super::checkpoint::{self, CheckpointError, Checkpoints, Saved};
use super::config::{Balance, DistillConfig, Experiment, Optimizer};
use super::efficientnet;
use super::finetune::{self, LrPolicy};
use super::health::{self, EpochNorms, GradStats, GradTrouble};
use super::net::Net;
use crate::core::calibration::argmax;
use crate::core::dataset::{Dataset, Skipped};
use crate::core::imageio;
use crate::core::pose::Jitter;
use crate::core::preprocess::{Located, Preprocessor};
use crate::core::spec::{FeatureSpec, ModelSpec};

/// A training image with its head located and its raw features measured.
#[derive(Clone)]
pub struct Item {
    pub path: PathBuf,
    pub label: usize,
    pub split: Option<String>,
    /// Shared, so a pretext's four turns of one image hold its pixels once.
    pub img: Arc<RgbImage>,
    pub loc: Located,
    /// Quarter turns (clockwise) given to the upright window after it is cut: a rotation
    /// pretext's label, 0 otherwise.
    pub turns: u8,
}

/// Each item four times, turned by 0-3 quarter turns and labelled with the turn
/// (`data.pretext = "rotation"`); the dataset's labels are dropped.
pub fn rotation_pretext(items: Vec<Item>) -> Vec<Item> {
    items
        .into_iter()
        .flat_map(|item| {
            (0..4u8).map(move |turns| Item {
                label: turns as usize,
                turns,
                ..item.clone()
            })
        })
        .collect()
}

/// `window` turned clockwise by `turns` quarter turns.
fn turned(window: RgbImage, turns: u8) -> RgbImage {
    match turns % 4 {
        1 => image::imageops::rotate90(&window),
        2 => image::imageops::rotate180(&window),
        3 => image::imageops::rotate270(&window),
        _ => window,
    }
}

/// Decode and locate every image (in parallel); unreadable images are returned as skipped.
pub fn load_items(ds: &Dataset, spec: &ModelSpec, bar: &ProgressBar) -> (Vec<Item>, Vec<Skipped>) {
    bar.set_length(ds.samples.len() as u64);
    bar.set_message("decoding and locating heads");
    let pre = Preprocessor::new(Arc::new(spec.clone()));
    let results: Vec<Result<Item, Skipped>> = ds
        .samples
        .par_iter()
        .map(|s| {
            let r = imageio::load_rgb(&s.path)
                .map(|img| {
                    let loc = pre.locate(&img);
                    Item {
                        path: s.path.clone(),
                        label: s.label,
                        split: s.split.clone(),
                        img: Arc::new(img),
                        loc,
                        turns: 0,
                    }
                })
                .map_err(|e| Skipped {
                    path: s.path.clone(),
                    reason: e.to_string(),
                });
            bar.inc(1);
            r
        })
        .collect();
    let mut items = Vec::new();
    let mut skipped = Vec::new();
    for r in results {
        match r {
            Ok(i) => items.push(i),
            Err(s) => {
                tracing::warn!(path = %s.path.display(), reason = %s.reason, "image skipped");
                skipped.push(s)
            }
        }
    }
    bar.finish_and_clear();
    (items, skipped)
}

/// Fit normalisation (pixel mean/std per channel, feature mean/std) on the training items only;
/// `fixed` pixel statistics (a pretrained backbone's) replace the fitted ones.
pub fn fit_normalisation(
    items: &[Item],
    idx: &[usize],
    spec: &mut ModelSpec,
    fixed: Option<(f32, f32)>,
) {
    let c = spec.input.channels as usize;
    spec.input.mean = vec![0.0; c];
    spec.input.std = vec![1.0; c];
    if let Some((mean, std)) = fixed {
        spec.input.mean = vec![mean; c];
        spec.input.std = vec![std; c];
        fit_features(items, idx, spec);
        return;
    }
    let mut sum = vec![0f64; c];
    let mut sq = vec![0f64; c];
    let mut n = 0f64;
    let pre = Preprocessor::new(Arc::new(spec.clone()));
    for &i in idx.iter().step_by((idx.len() / 400).max(1)) {
        let item = &items[i];
        let t = pre
            .finish(
                &pre.window(&item.img, &item.loc, &Jitter::default()),
                &item.loc,
            )
            .pixels;
        let per = t.len() / c;
        for ch in 0..c {
            for v in &t[ch * per..(ch + 1) * per] {
                sum[ch] += *v as f64;
                sq[ch] += (*v as f64).powi(2);
            }
        }
        n += per as f64;
    }
    for ch in 0..c {
        let m = sum[ch] / n.max(1.0);
        let var = (sq[ch] / n.max(1.0) - m * m).max(1e-6);
        spec.input.mean[ch] = m as f32;
        spec.input.std[ch] = var.sqrt() as f32;
    }
    fit_features(items, idx, spec);
}

/// Feature mean/std on the training items.
fn fit_features(items: &[Item], idx: &[usize], spec: &mut ModelSpec) {
    if let Some(fs) = spec.features.as_mut() {
        let k = fs.count;
        let mut m = vec![0f64; k];
        let mut s2 = vec![0f64; k];
        for &i in idx {
            for (j, v) in items[i].loc.raw_features.iter().enumerate().take(k) {
                m[j] += *v as f64;
                s2[j] += (*v as f64).powi(2);
            }
        }
        let n = idx.len().max(1) as f64;
        fs.mean = m.iter().map(|v| (v / n) as f32).collect();
        fs.std = (0..k)
            .map(|j| ((s2[j] / n - (m[j] / n).powi(2)).max(0.0).sqrt() as f32).max(1e-3))
            .collect();
    }
}

/// Model inputs for a set of items (pixels, then features, concatenated), augmented when
/// `aug` is given.
pub fn inputs(
    items: &[Item],
    idx: &[usize],
    spec: &ModelSpec,
    aug: Option<(&super::config::AugmentConfig, u64)>,
) -> (Vec<f32>, Vec<f32>) {
    let pre = Preprocessor::new(Arc::new(spec.clone()));
    let per: Vec<(Vec<f32>, Vec<f32>)> = idx
        .par_iter()
        .enumerate()
        .map(|(k, &i)| {
            let item = &items[i];
            let img = match aug {
                Some((cfg, seed)) => {
                    let mut rng =
                        ChaCha8Rng::seed_from_u64(seed ^ ((k as u64 + 1) * 0x9E37_79B9_7F4A_7C15));
                    let (j, _) = augment::draw_jitter(cfg, &mut rng);
                    let mut w = pre.window(&item.img, &item.loc, &j);
                    augment::photometric(&mut w, cfg, &mut rng);
                    w
                }
                None => pre.window(&item.img, &item.loc, &Jitter::default()),
            };
            let p = pre.finish(&turned(img, item.turns), &item.loc);
            (p.pixels, p.features)
        })
        .collect();
    let mut px = Vec::new();
    let mut fs = Vec::new();
    for (p, f) in per {
        px.extend(p);
        fs.extend(f);
    }
    (px, fs)
}

fn tensors(
    px: Vec<f32>,
    fs: Vec<f32>,
    n: usize,
    spec: &ModelSpec,
    device: &Device,
) -> (Tensor<4>, Option<Tensor<4>>) {
    let s = spec.input.size_px as usize;
    let c = spec.input.channels as usize;
    let x = Tensor::<4>::from_data(TensorData::new(px, [n, c, s, s]), device);
    let f = spec.features.as_ref().map(|f: &FeatureSpec| {
        Tensor::<4>::from_data(TensorData::new(fs, [n, f.count, 1, 1]), device)
    });
    (x, f)
}

/// Logits of a trained (validation-mode) model for the given items, without augmentation,
/// fused with the mirror image when the spec asks for it (as the ONNX reader does).
pub fn predict(model: &Net, items: &[Item], idx: &[usize], spec: &ModelSpec) -> Vec<Vec<f32>> {
    predict_with(model, items, idx, spec, spec.test_time_mirror)
}

/// Logits with or without test-time mirror fusion.
pub fn predict_with(
    model: &Net,
    items: &[Item],
    idx: &[usize],
    spec: &ModelSpec,
    mirror: bool,
) -> Vec<Vec<f32>> {
    let device = Device::flex();
    let k = spec.classes.len();
    let mut views_spec = spec.clone();
    views_spec.test_time_mirror = mirror;
    let pre = Preprocessor::new(Arc::new(views_spec));
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(64) {
        let (px, fs) = inputs(items, chunk, spec, None);
        let outputs: Vec<Vec<f32>> = pre
            .views(px)
            .into_iter()
            .map(|view| {
                let (x, f) = tensors(view, fs.clone(), chunk.len(), spec, &device);
                model.forward(x, f).into_data().iter::<f32>().collect()
            })
            .collect();
        out.extend(Preprocessor::fuse(outputs).chunks(k).map(<[f32]>::to_vec));
    }
    out
}

/// One epoch's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub seconds: f64,
    /// Each layer's gradient L2 norm over the epoch's batches (before clipping).
    pub grad_norms: Vec<GradStats>,
    /// Layers whose gradient vanished or exploded this epoch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grad_warnings: Vec<(String, GradTrouble)>,
}

/// A fitted model (validation mode) and how it got there.
pub struct Fitted {
    pub model: Net,
    pub history: Vec<EpochLog>,
    /// Epoch whose weights were kept (1-based).
    pub best_epoch: usize,
    pub images_per_second: f64,
}

/// Training stopped because the numbers went wrong.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// The weights are checked after every update, so a non-finite loss with finite weights
    /// comes from the inputs or the loss itself.
    #[error(
        "training diverged at epoch {epoch}, batch {batch}: the loss is {value}; every layer's weights are finite, so the inputs or the loss produced it (lower the learning rate or clip gradients with train.grad_clip_norm)"
    )]
    NonFinite {
        epoch: usize,
        batch: usize,
        value: f32,
    },
    #[error(
        "training diverged at epoch {epoch}, batch {batch}: the gradient of layer {layer} is not finite (lower the learning rate or clip gradients with train.grad_clip_norm)"
    )]
    NonFiniteGradient {
        epoch: usize,
        batch: usize,
        layer: String,
    },
    #[error(
        "training diverged at epoch {epoch}, batch {batch}: the update left the weights of layer {layer} not finite (lower the learning rate or clip gradients with train.grad_clip_norm)"
    )]
    NonFiniteWeights {
        epoch: usize,
        batch: usize,
        layer: String,
    },
    #[error(transparent)]
    Weights(#[from] efficientnet::WeightsError),
    #[error("cannot load the ImageNet weights from {path}: {reason}")]
    LoadWeights { path: PathBuf, reason: String },
    #[error("per-group learning rates: {0}")]
    LrGroups(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("stopped after {epochs} epochs as asked (--stop-after); continue with --resume")]
    Stopped { epochs: usize },
    #[error(transparent)]
    Init(#[from] super::init::InitError),
}

/// The network an experiment trains, on `device`: a fresh small CNN, or an EfficientNet-Lite
/// backbone (with its ImageNet weights when `model.pretrained`) and a new classifier.
pub fn new_model(exp: &Experiment, spec: &ModelSpec, device: &Device) -> Result<Net, FitError> {
    let n_feat = spec.features.as_ref().map_or(0, |f| f.count);
    let k = spec.classes.len();
    let mut model = Net::new(device, &exp.model, spec.input.channels as usize, n_feat, k);
    if let (true, Some(v)) = (exp.model.pretrained, exp.model.backbone.lite()) {
        let path = efficientnet::find_weights(v, exp.model.weights.as_deref())?;
        let summary = model
            .load_pretrained(&path)
            .map_err(|e| FitError::LoadWeights {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        tracing::debug!(path = %path.display(), tensors = summary.map_or(0, |s| s.applied), "ImageNet weights loaded");
    }
    if let Some(init) = &exp.init {
        use super::init::FineTune;
        let mapping = init.head_mapping(&spec.classes, spec.normal_class.as_deref());
        tracing::debug!(?mapping, "classifier rows");
        model = init.apply(model, &mapping)?;
    }
    Ok(model)
}

/// The loss of a batch, or the error that stops a diverged run.
fn finite(value: f32, epoch: usize, batch: usize) -> Result<f32, FitError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(FitError::NonFinite {
            epoch,
            batch,
            value,
        })
    }
}

/// The optimiser an experiment asks for, with its clipping.
pub fn optimizer(t: &super::config::TrainConfig) -> ModuleOptimizer {
    let clip = t.grad_clip_norm.map(GradientClippingConfig::Norm);
    let b1 = t.beta_1.unwrap_or(0.9);
    match t.optimizer {
        Optimizer::Adamw => AdamWConfig::new()
            .with_weight_decay(t.weight_decay)
            .with_beta_1(b1)
            .with_beta_2(t.beta_2.unwrap_or(0.999))
            .with_epsilon(1e-8)
            .with_grad_clipping(clip)
            .init(),
        Optimizer::Sgd => SgdConfig::new()
            .with_momentum(Some(
                MomentumConfig::new()
                    .with_momentum(t.momentum)
                    .with_dampening(0.0)
                    .with_nesterov(true),
            ))
            .with_weight_decay(Some(WeightDecayConfig::new(t.weight_decay)))
            .with_gradient_clipping(clip)
            .init(),
        Optimizer::Lion => LionConfig::new()
            .with_beta_1(b1)
            .with_beta_2(t.beta_2.unwrap_or(0.99))
            .with_weight_decay(t.weight_decay)
            .with_grad_clipping(clip)
            .init(),
        // Lion with equal betas updates with the sign of the momentum: Signum.
        Optimizer::Signum => LionConfig::new()
            .with_beta_1(b1)
            .with_beta_2(b1)
            .with_weight_decay(t.weight_decay)
            .with_grad_clipping(clip)
            .init(),
    }
}

/// The epoch from which the model overfits: validation loss rises for three epochs in a row
/// while training loss falls. Returns the first of those epochs (1-based).
pub fn overfitting_from(history: &[EpochLog]) -> Option<usize> {
    history.windows(4).find_map(|w| {
        let rising = w.windows(2).all(|p| match (p[0].val_loss, p[1].val_loss) {
            (Some(a), Some(b)) => b > a,
            _ => false,
        });
        let falling = w.windows(2).all(|p| p[1].train_loss < p[0].train_loss);
        (rising && falling).then_some(w[1].epoch)
    })
}

/// A learning-rate range test: from `lo` to `hi` exponentially over `steps` batches (with the
/// experiment's augmentation), the training loss at each rate. Stops early once the loss is
/// four times its best or no longer finite.
pub fn lr_range(
    exp: &Experiment,
    items: &[Item],
    idx: &[usize],
    spec: &ModelSpec,
    seed: u64,
    (lo, hi, steps): (f64, f64, usize),
) -> Result<Vec<(f64, f64)>, FitError> {
    let device = Device::flex().autodiff();
    device.seed(seed);
    let mut model = finetune::prepare_epoch(exp, new_model(exp, spec, &device)?, 0);
    let mut optim = optimizer(&exp.train);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut order = idx.to_vec();
    let mut out = Vec::new();
    let mut best = f64::MAX;
    let mut pos = order.len();
    for step in 0..steps {
        if pos + exp.train.batch_size > order.len() {
            order.shuffle(&mut rng);
            pos = 0;
        }
        let chunk = &order[pos..(pos + exp.train.batch_size).min(order.len())];
        pos += chunk.len();
        let lr = lo * (hi / lo).powf(step as f64 / (steps.max(2) - 1) as f64);
        let (px, fs) = inputs(items, chunk, spec, Some((&exp.augment, rng.random())));
        let (x, f) = tensors(px, fs, chunk.len(), spec, &device);
        let labels: Vec<i64> = chunk.iter().map(|&i| items[i].label as i64).collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [chunk.len()]), &device);
        let loss = loss_fn.forward(model.forward(x, f), y);
        let value = loss.clone().into_scalar::<f32>() as f64;
        if !value.is_finite() {
            break;
        }
        out.push((lr, value));
        best = best.min(value);
        if value > 4.0 * best && step > 10 {
            break;
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    Ok(out)
}

/// The learning rate a range test suggests: a tenth of the rate at the lowest smoothed loss.
pub fn suggest_lr(curve: &[(f64, f64)]) -> Option<f64> {
    let mut smooth = 0.0;
    let mut best: Option<(f64, f64)> = None;
    for (i, &(lr, loss)) in curve.iter().enumerate() {
        smooth = if i == 0 {
            loss
        } else {
            0.8 * smooth + 0.2 * loss
        };
        if best.is_none_or(|(_, b)| smooth < b) {
            best = Some((lr, smooth));
        }
    }
    best.map(|(lr, _)| lr / 10.0)
}

/// What one training run holds fixed: the data, the loss and the class balance.
struct Run<'a> {
    exp: &'a Experiment,
    items: &'a [Item],
    spec: &'a ModelSpec,
    device: Device,
    loss_fn: CrossEntropyLoss,
    /// Unweighted, on the plain device: validation loss.
    eval_loss: CrossEntropyLoss,
    /// Training indexes by class (balanced sampling draws from them).
    by_class: Vec<Vec<usize>>,
    train_idx: &'a [usize],
    /// The teacher's probabilities per item, and the distillation settings.
    soft: Option<(&'a [Vec<f32>], &'a DistillConfig)>,
}

/// What one epoch of training left: the figures of its log without validation.
struct EpochTrained {
    lr: f64,
    loss_sum: f64,
    correct: usize,
    seen: usize,
    grad_norms: EpochNorms,
}

impl<'a> Run<'a> {
    fn new(
        exp: &'a Experiment,
        items: &'a [Item],
        train_idx: &'a [usize],
        spec: &'a ModelSpec,
        device: Device,
        soft: Option<&'a [Vec<f32>]>,
    ) -> Self {
        let k = spec.classes.len();
        let by_class: Vec<Vec<usize>> = (0..k)
            .map(|c| {
                train_idx
                    .iter()
                    .copied()
                    .filter(|&i| items[i].label == c)
                    .collect()
            })
            .collect();
        let t = &exp.train;
        let weights = matches!(t.balance, Balance::Weights).then(|| {
            let n = train_idx.len() as f32;
            by_class
                .iter()
                .map(|c| n / (k as f32 * c.len().max(1) as f32))
                .collect::<Vec<f32>>()
        });
        let smoothing = (t.label_smoothing > 0.0).then_some(t.label_smoothing);
        let loss_fn = CrossEntropyLossConfig::new()
            .with_weights(weights)
            .with_smoothing(smoothing)
            .init(&device);
        Self {
            exp,
            items,
            spec,
            eval_loss: CrossEntropyLossConfig::new().init(&Device::flex()),
            device,
            loss_fn,
            by_class,
            train_idx,
            soft: soft.zip(exp.distill.as_ref()),
        }
    }

    /// This epoch's order of training images: shuffled, or drawn class-balanced.
    fn order(&self, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let mut order: Vec<usize> = match self.exp.train.balance {
            Balance::Sampling => {
                let nonempty: Vec<&Vec<usize>> =
                    self.by_class.iter().filter(|v| !v.is_empty()).collect();
                (0..self.train_idx.len())
                    .map(|_| {
                        let cls = nonempty[rng.random_range(0..nonempty.len())];
                        cls[rng.random_range(0..cls.len())]
                    })
                    .collect()
            }
            _ => self.train_idx.to_vec(),
        };
        order.shuffle(rng);
        order
    }

    /// One pass over the training images, batch by batch, with the health checks: a
    /// non-finite loss, gradient or weight stops the run naming epoch, batch and layer.
    fn epoch(
        &self,
        mut model: Net,
        optim: &mut ModuleOptimizer,
        (epoch, policy): (usize, &LrPolicy),
        rng: &mut ChaCha8Rng,
    ) -> Result<(Net, EpochTrained), FitError> {
        let order = self.order(rng);
        let batches: Vec<&[usize]> = order
            .chunks(self.exp.train.batch_size)
            .filter(|b| b.len() >= 2)
            .collect();
        let nb = batches.len().max(1);
        let mut out = EpochTrained {
            lr: self.exp.train.lr,
            loss_sum: 0.0,
            correct: 0,
            seen: 0,
            grad_norms: EpochNorms::default(),
        };
        for (b, chunk) in batches.into_iter().enumerate() {
            let at = |layer: &str| (epoch + 1, b + 1, layer.to_string());
            out.lr = finetune::lr_at(self.exp, epoch as f64 + b as f64 / nb as f64);
            let (logits, loss, labels) = self.batch_loss(&model, chunk, rng);
            let value = finite(loss.clone().into_scalar::<f32>(), epoch + 1, b + 1)?;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let norms = health::gradient_norms(&model, &grads);
            if let Some(layer) = health::first_non_finite(&norms) {
                let (epoch, batch, layer) = at(layer);
                return Err(FitError::NonFiniteGradient {
                    epoch,
                    batch,
                    layer,
                });
            }
            out.grad_norms.add(&norms);
            model = optim.step(policy.at(out.lr), model, grads);
            if let Some(layer) = health::first_non_finite(&health::weight_norms(&model)) {
                let (epoch, batch, layer) = at(layer);
                return Err(FitError::NonFiniteWeights {
                    epoch,
                    batch,
                    layer,
                });
            }
            out.loss_sum += value as f64 * chunk.len() as f64;
            let preds: Vec<i64> = logits.argmax(1).into_data().iter::<i64>().collect();
            out.correct += preds.iter().zip(&labels).filter(|(p, l)| p == l).count();
            out.seen += chunk.len();
        }
        Ok((model, out))
    }

    /// One augmented batch through the network: its logits, its loss (blended with a
    /// shuffled copy of the batch under mixup) and its labels.
    fn batch_loss(
        &self,
        model: &Net,
        chunk: &[usize],
        rng: &mut ChaCha8Rng,
    ) -> (Tensor<2>, Tensor<1>, Vec<i64>) {
        let (items, spec, n) = (self.items, self.spec, chunk.len());
        let (px, fs) = inputs(items, chunk, spec, Some((&self.exp.augment, rng.random())));
        let (x, f) = tensors(px, fs, n, spec, &self.device);
        let labels: Vec<i64> = chunk.iter().map(|&i| items[i].label as i64).collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [n]), &self.device);
        let alpha = self.exp.augment.mixup_alpha;
        let soft = self.soft.map(|(targets, cfg)| {
            let k = self.spec.classes.len();
            let t: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| targets[i].iter().copied())
                .collect();
            (
                Tensor::<2>::from_data(TensorData::new(t, [n, k]), &self.device),
                cfg,
            )
        });
        if alpha <= 0.0 {
            let logits = model.forward(x, f);
            let loss = self.loss_fn.forward(logits.clone(), y);
            let loss = match soft {
                Some((t, cfg)) => distilled(loss, logits.clone(), t, cfg),
                None => loss,
            };
            return (logits, loss, labels);
        }
        let lam = augment::mixup_weight(alpha, rng);
        let mut perm: Vec<i64> = (0..n as i64).collect();
        perm.shuffle(rng);
        let perm = Tensor::<1, Int>::from_data(TensorData::new(perm, [n]), &self.device);
        let blend = |t: Tensor<4>| {
            t.clone().mul_scalar(lam) + t.select(0, perm.clone()).mul_scalar(1.0 - lam)
        };
        let logits = model.forward(blend(x), f.map(blend));
        let loss = self
            .loss_fn
            .forward(logits.clone(), y.clone())
            .mul_scalar(lam)
            + self
                .loss_fn
                .forward(logits.clone(), y.select(0, perm.clone()))
                .mul_scalar(1.0 - lam);
        let loss = match soft {
            Some((t, cfg)) => {
                let mixed = t.clone().mul_scalar(lam) + t.select(0, perm).mul_scalar(1.0 - lam);
                distilled(loss, logits.clone(), mixed, cfg)
            }
            None => loss,
        };
        (logits, loss, labels)
    }

    /// Validation loss and accuracy of a (validation-mode) model.
    fn validate(&self, model: &Net, val_idx: &[usize]) -> (f64, f64) {
        let logits = predict(model, self.items, val_idx, self.spec);
        let labels: Vec<i64> = val_idx
            .iter()
            .map(|&i| self.items[i].label as i64)
            .collect();
        let right = logits
            .iter()
            .zip(&labels)
            .filter(|(l, y)| argmax(l) as i64 == **y)
            .count();
        let acc = right as f64 / labels.len().max(1) as f64;
        let k = self.spec.classes.len();
        let dev = Device::flex();
        let lt = Tensor::<2>::from_data(TensorData::new(logits.concat(), [labels.len(), k]), &dev);
        let yt = Tensor::<1, Int>::from_data(TensorData::new(labels, [val_idx.len()]), &dev);
        let loss = self.eval_loss.forward(lt, yt).into_scalar::<f32>() as f64;
        (loss, acc)
    }
}

/// The distillation loss: `(1 - w) * hard + w * T^2 * CE(teacher at T, student at T)`, where
/// `teacher` holds the teacher's probabilities at temperature T (`[n, classes]`). The T^2
/// keeps the soft term's gradients on the scale of the hard one's.
pub fn distilled(
    hard: Tensor<1>,
    logits: Tensor<2>,
    teacher: Tensor<2>,
    cfg: &DistillConfig,
) -> Tensor<1> {
    let t = cfg.temperature;
    let w = cfg.weight;
    let log_p = log_softmax(logits.div_scalar(t), 1);
    let soft = (teacher * log_p).sum_dim(1).mean().neg().mul_scalar(t * t);
    hard.mul_scalar(1.0 - w) + soft.mul_scalar(w)
}

/// Each layer whose gradient vanished or exploded over the epoch, warned about once.
fn judge_gradients(epoch: usize, stats: &[GradStats]) -> Vec<(String, GradTrouble)> {
    let mut warnings = Vec::new();
    for (s, trouble) in health::judge(stats) {
        tracing::warn!(
            epoch,
            layer = %s.layer,
            mean_norm = s.mean,
            max_norm = s.max,
            "gradient {}",
            match trouble {
                GradTrouble::Vanishing => "vanishing",
                GradTrouble::Exploding => "exploding",
            }
        );
        warnings.push((s.layer.clone(), trouble));
    }
    warnings
}

/// Where a fit keeps its per-epoch checkpoints.
pub struct FitCheckpoint<'a> {
    pub all: &'a Checkpoints,
    /// The fit's folder (`s1-f3`, `final`).
    pub run: String,
}

/// The training loop's own state, saved with every checkpoint.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LoopState {
    epochs_done: usize,
    history: Vec<EpochLog>,
    /// Lowest validation loss so far and its epoch (1-based).
    best: Option<(f64, usize)>,
    since_best: usize,
    images: usize,
    seconds: f64,
    /// Early stopping ended the run.
    finished: bool,
}

/// With checkpoints, each epoch draws its random numbers from the seed and the epoch alone:
/// (device seed for dropout, seed of the order and augmentation).
fn epoch_seeds(seed: u64, epoch: usize) -> (u64, u64) {
    let e = (epoch as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (
        seed ^ e.rotate_left(17),
        seed.wrapping_mul(31).wrapping_add(7) ^ e,
    )
}

/// The network, optimiser, loop state and best weights to start from: the last checkpoint
/// when there is one, else a new network.
fn start(
    exp: &Experiment,
    spec: &ModelSpec,
    device: &Device,
    ckpt: Option<&FitCheckpoint>,
) -> Result<Saved, FitError> {
    let resume = ckpt
        .map(|c| c.all.run_dir(&c.run))
        .filter(|d| checkpoint::exists(d));
    let optim = optimizer(&exp.train);
    let Some(dir) = resume else {
        let model = new_model(exp, spec, device)?;
        return Ok(Saved {
            model,
            optim,
            best: None,
            state: String::new(),
        });
    };
    // The checkpoint overwrites every weight: no need for the ImageNet ones.
    let n_feat = spec.features.as_ref().map_or(0, |f| f.count);
    let fresh = Net::new(
        device,
        &exp.model,
        spec.input.channels as usize,
        n_feat,
        spec.classes.len(),
    );
    let saved = checkpoint::load(&dir, fresh, optim)?;
    tracing::info!(path = %dir.display(), "resuming from the last checkpoint");
    Ok(saved)
}

/// The figures of a trained epoch, before validation.
fn epoch_log(epoch: usize, trained: &EpochTrained) -> EpochLog {
    let grad_stats = trained.grad_norms.stats();
    EpochLog {
        epoch: epoch + 1,
        lr: trained.lr,
        train_loss: trained.loss_sum / trained.seen.max(1) as f64,
        train_accuracy: trained.correct as f64 / trained.seen.max(1) as f64,
        val_loss: None,
        val_accuracy: None,
        seconds: 0.0,
        grad_warnings: judge_gradients(epoch + 1, &grad_stats),
        grad_norms: grad_stats,
    }
}

fn show(bar: &ProgressBar, log: &EpochLog) {
    bar.set_message(format!(
        "loss {:.3} acc {:.3}{}",
        log.train_loss,
        log.train_accuracy,
        log.val_accuracy
            .map_or(String::new(), |a| format!(" val_acc {a:.3}"))
    ));
    bar.inc(1);
    tracing::debug!(?log, "epoch");
}

/// Train on `train_idx`; when `val_idx` is not empty it drives early stopping and the choice
/// of the kept weights (lowest validation loss). With `ckpt`, every epoch is checkpointed and
/// a run continues from its last checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    exp: &Experiment,
    items: &[Item],
    train_idx: &[usize],
    val_idx: &[usize],
    spec: &ModelSpec,
    seed: u64,
    bar: &ProgressBar,
    ckpt: Option<&FitCheckpoint>,
    soft: Option<&[Vec<f32>]>,
) -> Result<Fitted, FitError> {
    let device = Device::flex().autodiff();
    device.seed(seed);
    let Saved {
        mut model,
        mut optim,
        mut best,
        state,
    } = start(exp, spec, &device, ckpt)?;
    let dir = ckpt.map(|c| c.all.run_dir(&c.run)).unwrap_or_default();
    let mut st: LoopState = checkpoint::parse_state(&state, &dir)?;
    let policy = LrPolicy::new(exp, &model).map_err(FitError::LrGroups)?;
    let run = Run::new(exp, items, train_idx, spec, device.clone(), soft);
    let t = &exp.train;
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(7));
    bar.set_length(t.epochs as u64);
    bar.set_position(st.epochs_done as u64);
    for epoch in st.epochs_done..t.epochs {
        if st.finished {
            break;
        }
        if ckpt.is_some() {
            let (d, r) = epoch_seeds(seed, epoch);
            device.seed(d);
            rng = ChaCha8Rng::seed_from_u64(r);
        }
        let t0 = Instant::now();
        model = finetune::prepare_epoch(exp, model, epoch);
        let trained;
        (model, trained) = run.epoch(model, &mut optim, (epoch, &policy), &mut rng)?;
        let mut log = epoch_log(epoch, &trained);
        if !val_idx.is_empty() {
            let valid = model.valid();
            let (vl, acc) = run.validate(&valid, val_idx);
            log.val_loss = Some(vl);
            log.val_accuracy = Some(acc);
            if st.best.is_none_or(|(b, _)| vl < b) {
                st.best = Some((vl, epoch + 1));
                best = Some(valid);
                st.since_best = 0;
            } else {
                st.since_best += 1;
            }
        }
        log.seconds = t0.elapsed().as_secs_f64();
        show(bar, &log);
        st.seconds += log.seconds;
        st.images += trained.seen;
        st.history.push(log);
        st.epochs_done = epoch + 1;
        st.finished = t.patience > 0 && st.since_best >= t.patience;
        if let Some(c) = ckpt {
            checkpoint::save(&dir, epoch + 1, &model, &optim, best.as_ref(), &st)?;
            if c.all.count_epoch() && epoch + 1 < t.epochs && !st.finished {
                return Err(FitError::Stopped { epochs: epoch + 1 });
            }
        }
    }
    let (model, best_epoch) = match (best, st.best) {
        (Some(m), Some((_, e))) => (m, e),
        _ => (model.valid(), st.history.len()),
    };
    Ok(Fitted {
        model,
        best_epoch,
        images_per_second: st.images as f64 / st.seconds.max(1e-9),
        history: st.history,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offline::train::config::{NetConfig, TrainConfig};

    /// A dark, lopsided head on a light field: every quarter turn of it looks different.
    fn lopsided_head() -> RgbImage {
        RgbImage::from_fn(96, 96, |x, y| {
            let (dx, dy) = (x as f32 - 48.0, y as f32 - 44.0);
            let body = (dx / 10.0).powi(2) + (dy / 16.0).powi(2) <= 1.0;
            let knob = (x as f32 - 54.0).powi(2) + (y as f32 - 32.0).powi(2) <= 16.0;
            if body || knob {
                image::Rgb([70, 40, 120])
            } else {
                image::Rgb([220, 215, 225])
            }
        })
    }

    #[test]
    fn a_rotation_pretext_labels_each_image_by_its_turn_and_turns_its_window() {
        let exp = crate::offline::train::config::Experiment::parse(
            "name='p'\n[data]\ndataset='d'\npretext='rotation'\n[train]\nval_fraction=0.0\n",
            std::path::Path::new("p.toml"),
        )
        .expect("experiment");
        let classes = crate::offline::train::config::Pretext::ROTATION_CLASSES.map(String::from);
        let spec = crate::offline::train::base_spec(&exp, &classes);
        let img = lopsided_head();
        let loc = Preprocessor::new(Arc::new(spec.clone())).locate(&img);
        assert!(loc.head.is_some(), "the synthetic head must be found");
        let item = Item {
            path: PathBuf::from("h.png"),
            label: 3,
            split: None,
            img: Arc::new(img),
            loc,
            turns: 0,
        };
        let items = rotation_pretext(vec![item]);
        let labels: Vec<(usize, u8)> = items.iter().map(|i| (i.label, i.turns)).collect();
        assert_eq!(labels, [(0, 0), (1, 1), (2, 2), (3, 3)]);
        let (px, _) = inputs(&items, &[0, 1, 2, 3], &spec, None);
        let s = spec.input.size_px as usize;
        let per = 3 * s * s;
        let views: Vec<&[f32]> = px.chunks(per).collect();
        // One clockwise quarter turn of a [3, s, s] tensor: out[c][y][x] = in[c][s-1-x][y].
        let quarter = |t: &[f32]| -> Vec<f32> {
            let mut out = vec![0.0; t.len()];
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        out[c * s * s + y * s + x] = t[c * s * s + (s - 1 - x) * s + y];
                    }
                }
            }
            out
        };
        let mut want = views[0].to_vec();
        for k in 1..4 {
            want = quarter(&want);
            let worst = want
                .iter()
                .zip(views[k])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-4, "turn {k}: the window differs by {worst}");
            let unturned = views[0]
                .iter()
                .zip(views[k])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(unturned > 0.5, "turn {k} left the window as it was");
        }
    }

    /// Eight 3x32x32 images: class 0 bright on the left, class 1 bright on the right.
    fn batch(device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
        let (n, s) = (8usize, 32usize);
        let mut px = vec![0f32; n * 3 * s * s];
        let mut labels = Vec::new();
        for i in 0..n {
            let class = i % 2;
            labels.push(class as i64);
            for c in 0..3 {
                for y in 0..s {
                    for x in 0..s {
                        let left = x < s / 2;
                        let v = if left == (class == 0) { 1.0 } else { -1.0 };
                        px[((i * 3 + c) * s + y) * s + x] =
                            v + 0.1 * ((x * 7 + y * 3 + i) % 5) as f32;
                    }
                }
            }
        }
        (
            Tensor::<4>::from_data(TensorData::new(px, [n, 3, s, s]), device),
            Tensor::<1, Int>::from_data(TensorData::new(labels, [n]), device),
        )
    }

    #[test]
    fn every_optimiser_lowers_the_loss_on_a_fixed_batch() {
        for opt in [
            Optimizer::Adamw,
            Optimizer::Sgd,
            Optimizer::Lion,
            Optimizer::Signum,
        ] {
            let device = Device::flex().autodiff();
            device.seed(1);
            let net = NetConfig {
                dropout: 0.0,
                ..NetConfig::default()
            };
            let (lr, b1, b2, wd) = opt.seed_defaults();
            let train = TrainConfig {
                optimizer: opt,
                beta_1: Some(b1),
                beta_2: Some(b2),
                weight_decay: wd,
                grad_clip_norm: Some(1.0),
                ..TrainConfig::default()
            };
            let mut model = Net::new(&device, &net, 3, 0, 2);
            let mut optim = optimizer(&train);
            let loss_fn = CrossEntropyLossConfig::new().init(&device);
            let (x, y) = batch(&device);
            let loss_of = |m: &Net| {
                loss_fn
                    .forward(m.forward(x.clone(), None), y.clone())
                    .into_scalar::<f32>()
            };
            let first = loss_of(&model);
            for _ in 0..20 {
                let loss = loss_fn.forward(model.forward(x.clone(), None), y.clone());
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                model = optim.step(lr, model, grads);
            }
            let last = loss_of(&model);
            assert!(last < first, "{opt:?}: loss {first} -> {last}");
        }
    }

    fn log(epoch: usize, train_loss: f64, val_loss: f64) -> EpochLog {
        EpochLog {
            epoch,
            lr: 1e-3,
            train_loss,
            train_accuracy: 0.5,
            val_loss: Some(val_loss),
            val_accuracy: Some(0.5),
            seconds: 1.0,
            grad_norms: Vec::new(),
            grad_warnings: Vec::new(),
        }
    }

    #[test]
    fn overfitting_is_dated_from_the_first_rise_of_validation_loss() {
        let losses = [
            (1.0, 1.0),
            (0.8, 0.8),
            (0.6, 0.7),
            (0.5, 0.72),
            (0.4, 0.75),
            (0.3, 0.8),
        ];
        let h: Vec<EpochLog> = losses
            .iter()
            .enumerate()
            .map(|(i, &(t, v))| log(i + 1, t, v))
            .collect();
        assert_eq!(overfitting_from(&h), Some(4));
        // Both falling: no overfitting.
        let h: Vec<EpochLog> = (1..8)
            .map(|e| log(e, 1.0 / e as f64, 1.0 / e as f64))
            .collect();
        assert_eq!(overfitting_from(&h), None);
    }

    #[test]
    fn distillation_loss_is_the_weighted_sum_of_hard_and_tempered_soft_terms() {
        let dev = Device::flex();
        let logits = [[2.0f32, -1.0, 0.5], [0.0, 1.5, -0.5]];
        let teacher = [[0.7f32, 0.1, 0.2], [0.2, 0.6, 0.2]];
        let to2 =
            |v: &[[f32; 3]; 2]| Tensor::<2>::from_data(TensorData::new(v.concat(), [2, 3]), &dev);
        let hard = Tensor::<1>::from_data(TensorData::new(vec![0.9f32], [1]), &dev);
        let cfg = |temperature, weight| DistillConfig {
            teacher: String::new(),
            final_teacher: None,
            temperature,
            weight,
        };
        // By hand: T^2 * mean over rows of -sum(teacher * log_softmax(logits / T)).
        let soft = |t: f32| -> f32 {
            let rows: Vec<f32> = logits
                .iter()
                .zip(&teacher)
                .map(|(l, p)| {
                    let z: Vec<f32> = l.iter().map(|v| v / t).collect();
                    let lse = z.iter().map(|v| v.exp()).sum::<f32>().ln();
                    -p.iter().zip(&z).map(|(p, z)| p * (z - lse)).sum::<f32>()
                })
                .collect();
            t * t * rows.iter().sum::<f32>() / rows.len() as f32
        };
        for (t, w) in [(1.0, 1.0), (4.0, 0.7), (2.0, 0.25)] {
            let got = distilled(hard.clone(), to2(&logits), to2(&teacher), &cfg(t, w))
                .into_scalar::<f32>();
            let want = (1.0 - w) * 0.9 + w * soft(t);
            assert!((got - want).abs() < 1e-5, "T {t} w {w}: {got} vs {want}");
        }
        // With one-hot targets at T = 1 and weight 1 it is plain cross-entropy.
        let one_hot = [[1.0f32, 0.0, 0.0], [0.0, 1.0, 0.0]];
        let ce = CrossEntropyLossConfig::new()
            .init(&dev)
            .forward(
                to2(&logits),
                Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1], [2]), &dev),
            )
            .into_scalar::<f32>();
        let got = distilled(hard, to2(&logits), to2(&one_hot), &cfg(1.0, 1.0)).into_scalar::<f32>();
        assert!((got - ce).abs() < 1e-5, "{got} vs {ce}");
    }

    #[test]
    fn suggested_rate_is_a_tenth_of_the_lowest_loss() {
        let curve: Vec<(f64, f64)> = (0..50)
            .map(|i| {
                let lr = 1e-5 * 10f64.powf(i as f64 / 10.0);
                (lr, (lr.log10() + 2.0).powi(2) + 1.0)
            })
            .collect();
        let s = suggest_lr(&curve).unwrap();
        assert!(s > 3e-4 && s < 3e-3, "{s}");
    }

    #[test]
    fn a_nan_loss_stops_training_naming_epoch_batch_and_layer() {
        let device = Device::flex().autodiff();
        device.seed(1);
        let model = Net::new(&device, &NetConfig::default(), 3, 0, 2);
        let (x, y) = batch(&device);
        let poisoned = x.mul_scalar(f32::NAN);
        let loss = CrossEntropyLossConfig::new()
            .init(&device)
            .forward(model.forward(poisoned, None), y)
            .into_scalar::<f32>();
        let e = finite(loss, 3, 7).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("epoch 3, batch 7"), "{msg}");
        // The weights are fine here: the message must say the inputs or loss produced it.
        assert!(msg.contains("weights are finite"), "{msg}");
        assert_eq!(finite(0.5, 1, 1).unwrap(), 0.5);
    }
}
