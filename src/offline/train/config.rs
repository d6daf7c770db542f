//! Experiment files (`config/train/*.toml`): raw structs with defaults, checked without I/O.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::efficientnet::{PIXEL_NORM, Variant};
use crate::core::pose::Contrast;
use crate::core::spec::PoseMode;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: '{key}' {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

/// A refused value: `key` of the experiment at `path`, and why.
fn invalid(path: &Path, key: &'static str, reason: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        reason: reason.to_string(),
    })
}

/// One training experiment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    /// Model name; the ONNX file is `<out>/<name>.onnx`.
    pub name: String,
    pub data: DataConfig,
    #[serde(default)]
    pub crop: CropConfig,
    #[serde(default)]
    pub model: NetConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub augment: AugmentConfig,
    #[serde(default)]
    pub cv: CvConfig,
    #[serde(default)]
    pub finetune: FinetuneConfig,
    /// Knowledge distillation: soft targets from a teacher model (off when absent).
    #[serde(default)]
    pub distill: Option<DistillConfig>,
    /// A trained model to start from instead of random weights (`spermscope-train --init`; not
    /// read from the file).
    #[serde(skip)]
    pub init: Option<std::sync::Arc<crate::core::spec::ModelFile>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset folder (class-per-folder, or MHSMA with `labels.csv`), relative to the working
    /// directory.
    pub dataset: PathBuf,
    /// MHSMA: which binary label to learn (`head`, `acrosome`, `vacuole`, `tail`).
    #[serde(default = "default_label")]
    pub mhsma_label: String,
    /// The class reports count as a normal form.
    pub normal_class: Option<String>,
    /// Pixel scale of the images in µm/px, when known.
    pub um_per_px: Option<f32>,
    /// A self-supervised pretext instead of the dataset's labels (unset: learn the labels).
    /// `rotation`: every image is seen four times, its upright window turned by 0, 90, 180
    /// and 270 degrees, and the network learns which turn it was; the exported model is a
    /// starting point for `spermscope-train --init`, not a classifier. Needs
    /// `train.val_fraction = 0` (the four turns of one image would fall on both sides of a
    /// split) and no `--folds`.
    #[serde(default)]
    pub pretext: Option<Pretext>,
}

/// A self-supervised task that needs no labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pretext {
    /// Tell the quarter turn of an upright window (Gidaris et al. 2018, on head crops).
    Rotation,
}

impl Pretext {
    /// The classes a pretext model is exported with: the turns, in label order. A model with
    /// these classes is known as a pretext model when it is read back.
    pub const ROTATION_CLASSES: [&'static str; 4] =
        ["turned-0", "turned-90", "turned-180", "turned-270"];
}

fn default_label() -> String {
    "head".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CropConfig {
    /// `upright` (find the head, rotate it tail-down), `head` (centre on the head, keep its
    /// orientation) or `centre` (keep the crop as it is).
    pub pose: PoseMode,
    /// `dark` for stained heads, `any` for unstained images.
    pub contrast: Contrast,
    /// Side of the window cut around the head, in image pixels.
    pub window_px: f32,
    /// Side of the network input in pixels.
    pub size_px: u32,
    /// 3 for RGB, 1 for luminance.
    pub channels: u32,
}

impl Default for CropConfig {
    fn default() -> Self {
        Self {
            pose: PoseMode::Upright,
            contrast: Contrast::Dark,
            window_px: 96.0,
            size_px: 64,
            channels: 3,
        }
    }
}

/// The network's feature extractor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backbone {
    /// The small CNN family (`widths`, `convs_per_block`, `residual`).
    SmallCnn,
    /// EfficientNet-Lite0 (4.0M parameters without its classifier; ImageNet weights with
    /// `pretrained = true`).
    EfficientnetLite0,
    EfficientnetLite1,
    EfficientnetLite2,
}

impl Backbone {
    /// The EfficientNet-Lite variant, or `None` for the small CNN.
    pub fn lite(self) -> Option<Variant> {
        match self {
            Backbone::SmallCnn => None,
            Backbone::EfficientnetLite0 => Some(Variant::Lite0),
            Backbone::EfficientnetLite1 => Some(Variant::Lite1),
            Backbone::EfficientnetLite2 => Some(Variant::Lite2),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// `small-cnn` (the default), or `efficientnet-lite0`, `-lite1`, `-lite2`.
    pub backbone: Backbone,
    /// Start an EfficientNet-Lite backbone from its ImageNet weights (from `scripts/setup
    /// --train`), with the input normalisation they expect instead of one fitted on the data.
    pub pretrained: bool,
    /// The weight file, when not in `.weights/` (see `efficientnet::find_weights`).
    pub weights: Option<PathBuf>,
    /// Small CNN: output channels of each block (each block halves the resolution).
    pub widths: Vec<usize>,
    /// Small CNN: convolutions per block.
    pub convs_per_block: usize,
    /// Small CNN: add a residual (1x1 projection) shortcut around each block.
    pub residual: bool,
    /// Dropout before the classifier.
    pub dropout: f64,
    /// Feed the morphometric features beside the CNN's pooled features.
    pub features: bool,
    /// Width of the morphometric branch's hidden layer.
    pub feature_hidden: usize,
    /// Test-time fusion: average the logits of each window and its mirror image.
    pub test_time_mirror: bool,
}

impl NetConfig {
    /// The pixel (mean, std) a pretrained backbone expects; `None`: fitted on the data.
    pub fn fixed_pixel_norm(&self) -> Option<(f32, f32)> {
        (self.pretrained && self.backbone.lite().is_some()).then_some(PIXEL_NORM)
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            backbone: Backbone::SmallCnn,
            pretrained: false,
            weights: None,
            widths: vec![16, 32, 64, 128],
            convs_per_block: 2,
            residual: true,
            dropout: 0.3,
            features: true,
            feature_hidden: 32,
            test_time_mirror: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Adamw,
    /// SGD with Nesterov momentum.
    Sgd,
    /// Lion: the sign of an interpolation of momentum and gradient (Chen et al. 2023).
    Lion,
    /// Signum: the sign of the momentum (Bernstein et al. 2018); Lion with beta_1 = beta_2.
    Signum,
}

impl Optimizer {
    /// The seed method's starting points: (learning rate, beta_1, beta_2, weight decay).
    /// AdamW 3e-4, 0.9/0.95, 0.1; Lion 3e-4, 0.9/0.95; Signum 3e-4, 0.9; SGD 3e-4, 0.9.
    pub fn seed_defaults(self) -> (f64, f32, f32, f32) {
        match self {
            Optimizer::Adamw => (3e-4, 0.9, 0.95, 0.1),
            Optimizer::Lion => (3e-4, 0.9, 0.95, 0.0),
            Optimizer::Signum => (3e-4, 0.9, 0.9, 0.0),
            Optimizer::Sgd => (3e-4, 0.9, 0.9, 0.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Plain shuffling and an unweighted loss.
    None,
    /// Loss weights inversely proportional to class frequency.
    Weights,
    /// Each batch drawn with equal class probability.
    Sampling,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub optimizer: Optimizer,
    /// Peak learning rate (after warm-up; cosine decay to zero after it).
    pub lr: f64,
    pub warmup_epochs: usize,
    pub weight_decay: f32,
    /// SGD momentum.
    pub momentum: f64,
    pub label_smoothing: f32,
    /// First moment decay (AdamW, Lion; Signum's momentum). Unset: 0.9.
    pub beta_1: Option<f32>,
    /// Second moment decay (AdamW) or momentum decay (Lion). Unset: AdamW 0.999, Lion 0.99
    /// (the library defaults the committed models were trained with).
    pub beta_2: Option<f32>,
    /// Clip the gradient to this L2 norm before each step. Unset: no clipping.
    pub grad_clip_norm: Option<f32>,
    pub balance: Balance,
    /// Share of the training data held out for early stopping.
    pub val_fraction: f64,
    /// Epochs without a better validation loss before stopping (0: never stop early).
    pub patience: usize,
    pub seed: u64,
    /// Fit the softmax temperature on the final model's validation split and store it in the
    /// model (calibrated confidences for the label-free accuracy estimate).
    pub fit_temperature: bool,
    /// Write a checkpoint after every epoch under `OUT/NAME.checkpoints/`, so that a killed run
    /// continues with `--resume`. Each epoch then draws its random numbers (order,
    /// augmentation, dropout) from the seed and the epoch alone, so a resumed run ends with the
    /// same weights as an uninterrupted one.
    pub checkpoint: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 60,
            batch_size: 32,
            optimizer: Optimizer::Adamw,
            lr: 2e-3,
            warmup_epochs: 3,
            weight_decay: 5e-4,
            momentum: 0.9,
            label_smoothing: 0.05,
            beta_1: None,
            beta_2: None,
            grad_clip_norm: None,
            balance: Balance::Weights,
            val_fraction: 0.15,
            patience: 0,
            seed: 1,
            fit_temperature: true,
            checkpoint: false,
        }
    }
}

/// How a pretrained backbone's batch norms behave while their layers train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BnMode {
    /// Batch statistics; the running statistics are re-estimated on the new data (with
    /// `finetune.bn_momentum`).
    Train,
    /// The ImageNet running statistics are kept and used; scale and shift still learn.
    Frozen,
}

/// The fine-tuning recipe of a pretrained backbone (EfficientNet-Lite only; the defaults train
/// every layer from the first epoch at one learning rate, as for the small CNN).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// Epochs at the start with the whole backbone frozen: only the classifier and the
    /// morphometric branch learn, at `head_lr`. They count in `train.epochs`; equal to it, the
    /// backbone never trains (a linear probe of the pretrained features).
    pub head_epochs: usize,
    /// Learning rate of the head epochs (constant). Unset: `train.lr`.
    pub head_lr: Option<f64>,
    /// After the head epochs: 0 unfreezes the whole backbone at once; N > 0 unfreezes one more
    /// group (head convolution, then the stages from the top down, then the stem) every N
    /// epochs (gradual unfreezing).
    pub unfreeze_every: usize,
    /// Learning rate of the backbone relative to the classifier's.
    pub backbone_lr_mult: f64,
    /// Discriminative learning rates: each backbone group below the top one learns at this
    /// factor times the rate of the group above it (1: the same rate for all).
    pub layer_lr_decay: f64,
    /// Batch norm in the trainable backbone groups: `train` (re-estimated) or `frozen`.
    pub bn: BnMode,
    /// Weight of each batch in the running statistics when `bn = "train"`.
    pub bn_momentum: f64,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self {
            head_epochs: 0,
            head_lr: None,
            unfreeze_every: 0,
            backbone_lr_mult: 1.0,
            layer_lr_decay: 1.0,
            bn: BnMode::Train,
            bn_momentum: 0.1,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Probability of an extra rotation, and its largest angle in degrees (180: any angle).
    pub rotate_prob: f32,
    pub rotate_max_deg: f32,
    /// Probability of a left-right mirror (keeps the head upright).
    pub mirror_prob: f32,
    /// Probability of turning the crop upside down (only sensible without pose correction).
    pub flip_vertical_prob: f32,
    /// Probability and range of a zoom (factor in 1 ± range).
    pub scale_prob: f32,
    pub scale_range: f32,
    /// Probability and largest shift, as a fraction of the window.
    pub shift_prob: f32,
    pub shift_max: f32,
    /// Probability of colour jitter, and its strengths.
    pub color_prob: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub hue: f32,
    /// Probability of a cutout (a patch filled with the crop's mean colour) and its side.
    pub cutout_prob: f32,
    pub cutout_frac: f32,
    /// Probability of a stain jitter in optical density: each RGB channel's optical density
    /// -ln((v + 1) / 256) is scaled by a factor in 1 ± `stain_scale` and shifted by up to
    /// ± `stain_shift`, as another stain batch, staining time or lamp changes it (Tellez et al.
    /// 2018 jitter the haematoxylin-eosin channels; this jitters the RGB ones). 0: off.
    pub stain_prob: f32,
    pub stain_scale: f32,
    pub stain_shift: f32,
    /// Probability of a saturation change, by a factor in 1 ± `saturation` (0: grey).
    pub saturation_prob: f32,
    pub saturation: f32,
    /// Probability of turning the window grey (its luminance in all three channels), as an
    /// unstained or monochrome camera gives it.
    pub grayscale_prob: f32,
    /// Probability of a Gaussian blur (focus, optics), and its largest sigma in window pixels.
    pub blur_prob: f32,
    pub blur_max_sigma: f32,
    /// Probability of Gaussian pixel noise (sensor), and its largest standard deviation in
    /// grey levels (0-255).
    pub noise_prob: f32,
    pub noise_max_std: f32,
    /// Mixup: each training batch is blended with a shuffled copy of itself (images and
    /// features) by a weight drawn from Beta(alpha, alpha), and the loss is blended the same
    /// way. 0 turns it off.
    pub mixup_alpha: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            rotate_prob: 0.8,
            rotate_max_deg: 12.0,
            mirror_prob: 0.5,
            flip_vertical_prob: 0.0,
            scale_prob: 0.5,
            scale_range: 0.08,
            shift_prob: 0.5,
            shift_max: 0.04,
            color_prob: 0.8,
            brightness: 0.12,
            contrast: 0.15,
            hue: 0.03,
            cutout_prob: 0.25,
            cutout_frac: 0.2,
            stain_prob: 0.0,
            stain_scale: 0.2,
            stain_shift: 0.05,
            saturation_prob: 0.0,
            saturation: 0.3,
            grayscale_prob: 0.0,
            blur_prob: 0.0,
            blur_max_sigma: 1.5,
            noise_prob: 0.0,
            noise_max_std: 6.0,
            mixup_alpha: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Seeded stratified random folds.
    Stratified,
    /// The dataset's own `folds.csv`.
    FoldsCsv,
    /// The dataset's own train/valid/test split (MHSMA).
    GivenSplit,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CvConfig {
    pub folds: usize,
    pub protocol: Protocol,
    /// Seeds of repeated cross-validation (each reshuffles the folds and the initial weights).
    pub seeds: Vec<u64>,
}

impl Default for CvConfig {
    fn default() -> Self {
        Self {
            folds: 5,
            protocol: Protocol::Stratified,
            seeds: vec![1],
        }
    }
}

/// Soft targets from a trained teacher (`[distill]`): the loss is
/// `(1 - weight) * cross-entropy(labels) + weight * T^2 * cross-entropy(teacher at T, student at T)`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The teacher: an ONNX model exported by spermscope-train. `{fit}` is replaced by the fit's
    /// name (`s<seed>-f<fold>` for a cross-validation fold, `final` for the final model), so
    /// each fold learns from a teacher trained on that fold's training images only (written by
    /// `--fold-models`, and checked against the record beside it).
    pub teacher: String,
    /// The final model's teacher, when it is not `teacher` with `{fit}` = `final` (e.g. the
    /// teacher's own final model, trained on every image).
    #[serde(default)]
    pub final_teacher: Option<String>,
    /// Softmax temperature of both teacher and student in the soft-target term.
    #[serde(default = "default_distill_temperature")]
    pub temperature: f32,
    /// Share of the soft-target term in the loss, in (0, 1]; the labels' cross-entropy gets
    /// the rest.
    #[serde(default = "default_distill_weight")]
    pub weight: f32,
}

fn default_distill_temperature() -> f32 {
    4.0
}

fn default_distill_weight() -> f32 {
    0.7
}

impl Experiment {
    /// What `[distill]` and `data.pretext` add to the fingerprint of a run's checkpoints:
    /// nothing when they are absent, so checkpoints written before they existed still resume.
    pub fn fingerprint(&self) -> String {
        format!("{self:?}")
            .replacen(", pretext: None", "", 1)
            .replacen(", distill: None", "", 1)
    }

    pub fn load(path: &Path) -> Result<Experiment, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            error: source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate experiment text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Experiment, ConfigError> {
        let exp: Experiment = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        exp.validate(path)?;
        Ok(exp)
    }

    /// Check values without touching the file system.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, reason: &str| invalid(path, key, reason);
        if self.name.is_empty() || self.name.contains('/') {
            return bad("name", "must be a plain file name");
        }
        if self.crop.size_px < 16 {
            return bad("crop.size_px", "must be at least 16");
        }
        if self.crop.channels != 1 && self.crop.channels != 3 {
            return bad("crop.channels", "must be 1 or 3");
        }
        if self.crop.window_px <= 4.0 {
            return bad("crop.window_px", "must be larger than 4");
        }
        self.validate_net(path)?;
        if !(0.0..1.0).contains(&self.model.dropout) {
            return bad("model.dropout", "must be in [0, 1)");
        }
        let t = &self.train;
        if t.epochs == 0 || t.batch_size < 2 {
            return bad("train.epochs", "epochs must be > 0 and batch_size >= 2");
        }
        if !(t.lr > 0.0 && t.lr < 1.0) {
            return bad("train.lr", "must be in (0, 1)");
        }
        for (key, beta) in [("train.beta_1", t.beta_1), ("train.beta_2", t.beta_2)] {
            if beta.is_some_and(|b| !(0.0..1.0).contains(&b)) {
                return bad(key, "must be in [0, 1)");
            }
        }
        if t.grad_clip_norm
            .is_some_and(|c| !(c.is_finite() && c > 0.0))
        {
            return bad("train.grad_clip_norm", "must be above 0");
        }
        if !(0.0..0.5).contains(&t.val_fraction) {
            return bad("train.val_fraction", "must be in [0, 0.5)");
        }
        if !(0.0..1.0).contains(&t.label_smoothing) {
            return bad("train.label_smoothing", "must be in [0, 1)");
        }
        let a = &self.augment;
        for (key, p) in [
            ("augment.rotate_prob", a.rotate_prob),
            ("augment.mirror_prob", a.mirror_prob),
            ("augment.flip_vertical_prob", a.flip_vertical_prob),
            ("augment.scale_prob", a.scale_prob),
            ("augment.shift_prob", a.shift_prob),
            ("augment.color_prob", a.color_prob),
            ("augment.cutout_prob", a.cutout_prob),
            ("augment.stain_prob", a.stain_prob),
            ("augment.saturation_prob", a.saturation_prob),
            ("augment.grayscale_prob", a.grayscale_prob),
            ("augment.blur_prob", a.blur_prob),
            ("augment.noise_prob", a.noise_prob),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(key, "is a probability and must be in [0, 1]");
            }
        }
        for (key, v, max) in [
            ("augment.stain_scale", a.stain_scale, 1.0),
            ("augment.stain_shift", a.stain_shift, 1.0),
            ("augment.saturation", a.saturation, 1.0),
            ("augment.blur_max_sigma", a.blur_max_sigma, 20.0),
            ("augment.noise_max_std", a.noise_max_std, 128.0),
        ] {
            if !(0.0..=max).contains(&v) {
                return bad(key, &format!("must be in [0, {max}]"));
            }
        }
        if !(a.mixup_alpha >= 0.0 && a.mixup_alpha.is_finite()) {
            return bad("augment.mixup_alpha", "must be 0 (off) or above");
        }
        if self.cv.folds < 2 && self.cv.protocol != Protocol::GivenSplit {
            return bad("cv.folds", "must be at least 2");
        }
        if self.cv.seeds.is_empty() {
            return bad("cv.seeds", "needs at least one seed");
        }
        self.validate_tasks(path)
    }

    /// The pretext and distillation keys.
    fn validate_tasks(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, reason: &str| invalid(path, key, reason);
        if self.data.pretext.is_some() {
            if self.train.val_fraction > 0.0 {
                return bad(
                    "train.val_fraction",
                    "must be 0 with data.pretext: the four turns of an image would fall on both sides of the split",
                );
            }
            if self.distill.is_some() {
                return bad("distill", "cannot teach a pretext (data.pretext)");
            }
            if self.model.test_time_mirror {
                return bad(
                    "model.test_time_mirror",
                    "must be false with data.pretext: a mirrored quarter turn is the opposite turn",
                );
            }
        }
        if let Some(d) = &self.distill {
            if d.teacher.trim().is_empty() {
                return bad("distill.teacher", "must name an ONNX model");
            }
            if !(d.temperature > 0.0 && d.temperature <= 20.0) {
                return bad("distill.temperature", "must be in (0, 20]");
            }
            if !(d.weight > 0.0 && d.weight <= 1.0) {
                return bad("distill.weight", "must be in (0, 1]");
            }
        }
        Ok(())
    }

    /// The network and fine-tuning keys.
    fn validate_net(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, reason: &str| invalid(path, key, reason);
        let m = &self.model;
        let f = &self.finetune;
        if m.backbone.lite().is_none() {
            if m.widths.is_empty() || m.widths.contains(&0) {
                return bad("model.widths", "needs at least one non-zero width");
            }
            if self.crop.size_px >> m.widths.len() == 0 {
                return bad(
                    "model.widths",
                    "has more blocks than the input size can halve",
                );
            }
            if m.convs_per_block == 0 {
                return bad("model.convs_per_block", "must be at least 1");
            }
            if m.pretrained {
                return bad("model.pretrained", "needs an efficientnet-lite backbone");
            }
            if f.head_epochs > 0 || f.unfreeze_every > 0 || f.bn == BnMode::Frozen {
                return bad("finetune", "needs an efficientnet-lite backbone");
            }
        } else {
            if self.crop.channels != 3 {
                return bad(
                    "crop.channels",
                    "must be 3 for an efficientnet-lite backbone",
                );
            }
            if self.crop.size_px < 32 {
                return bad("crop.size_px", "must be at least 32 for efficientnet-lite");
            }
        }
        if f.head_epochs > self.train.epochs {
            return bad(
                "finetune.head_epochs",
                "must not exceed train.epochs (equal keeps the backbone frozen throughout)",
            );
        }
        if f.head_lr.is_some_and(|lr| !(lr > 0.0 && lr < 1.0)) {
            return bad("finetune.head_lr", "must be in (0, 1)");
        }
        for (key, v) in [
            ("finetune.backbone_lr_mult", f.backbone_lr_mult),
            ("finetune.layer_lr_decay", f.layer_lr_decay),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return bad(key, "must be in (0, 1]");
            }
        }
        if !(0.0..=1.0).contains(&f.bn_momentum) {
            return bad("finetune.bn_momentum", "must be in [0, 1]");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_experiment_parses() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/train");
        let mut n = 0;
        for dir in [
            root.clone(),
            root.join("ablation"),
            root.join("optimisers"),
            root.join("transfer"),
            root.join("acquisitions"),
            root.join("adaptation"),
            root.join("pretext"),
        ] {
            for e in std::fs::read_dir(&dir).expect("config/train exists") {
                let p = e.expect("entry").path();
                if p.extension().is_some_and(|x| x == "toml") {
                    Experiment::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                    n += 1;
                }
            }
        }
        assert!(
            n >= 16,
            "expected the model, ablation and optimiser experiments, found {n}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let p = Path::new("x.toml");
        let err = toml::from_str::<Experiment>("name='a'\nbogus=1\n[data]\ndataset='d'\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        let mut e: Experiment = toml::from_str("name='a'\n[data]\ndataset='d'\n").expect("minimal");
        assert!(e.validate(p).is_ok());
        e.augment.mirror_prob = 1.5;
        let err = e.validate(p).unwrap_err().to_string();
        assert!(err.contains("augment.mirror_prob"), "{err}");
        e.augment.mirror_prob = 0.5;
        e.augment.blur_prob = 1.5;
        let err = e.validate(p).unwrap_err().to_string();
        assert!(err.contains("augment.blur_prob"), "{err}");
        e.augment.blur_prob = 0.5;
        e.augment.stain_scale = 2.0;
        let err = e.validate(p).unwrap_err().to_string();
        assert!(
            err.contains("augment.stain_scale") && err.contains("[0, 1]"),
            "{err}"
        );
        e.augment.stain_scale = 0.2;
        e.augment.noise_max_std = -1.0;
        let err = e.validate(p).unwrap_err().to_string();
        assert!(err.contains("augment.noise_max_std"), "{err}");
        e.augment.noise_max_std = 0.0;
        // Without [distill] the checkpoint fingerprint is the one runs had before it existed.
        assert!(!e.fingerprint().contains("distill"));
        let mut d: Experiment =
            toml::from_str("name='a'\n[data]\ndataset='d'\n[distill]\nteacher='t/{fit}.onnx'\n")
                .expect("distill");
        assert!(d.validate(p).is_ok());
        assert!(d.fingerprint().contains("t/{fit}.onnx"));
        if let Some(c) = d.distill.as_mut() {
            c.weight = 1.5;
        }
        let err = d.validate(p).unwrap_err().to_string();
        assert!(err.contains("distill.weight"), "{err}");
    }

    #[test]
    fn a_pretext_needs_no_validation_split_and_no_teacher() {
        let p = Path::new("p.toml");
        let text = "name='p'\n[data]\ndataset='d'\npretext='rotation'\n[train]\nval_fraction=0.0\n";
        let e = Experiment::parse(text, p).expect("pretext");
        assert_eq!(e.data.pretext, Some(Pretext::Rotation));
        assert!(e.fingerprint().contains("Rotation"));
        let err = Experiment::parse(&text.replace("0.0", "0.1"), p)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train.val_fraction") && err.contains("four turns"),
            "{err}"
        );
        let taught = format!("{text}[distill]\nteacher='t.onnx'\n");
        let err = Experiment::parse(&taught, p).unwrap_err().to_string();
        assert!(err.contains("'distill'"), "{err}");
        let err = Experiment::parse(&text.replace("rotation", "jigsaw"), p)
            .unwrap_err()
            .to_string();
        assert!(err.contains("jigsaw"), "{err}");
        // Without a pretext the fingerprint is the one runs had before it existed.
        let plain = Experiment::parse("name='p'\n[data]\ndataset='d'\n", p).expect("plain");
        assert!(!plain.fingerprint().contains("pretext"));
    }
}
