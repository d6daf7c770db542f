//! The trainer's networks: the small CNN family (conv + batchnorm + ReLU blocks, optional
//! residual shortcut, global pooling, dropout) or an EfficientNet-Lite backbone, with an
//! optional morphometric branch fused before the classifier.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Dropout, DropoutConfig, PaddingConfig2d, Relu};
use burn::prelude::*;

use std::path::Path;

use super::config::NetConfig;
use super::efficientnet::{
    EfficientNetLite, EfficientNetLiteConfig, FEATURE_CHANNELS, LoadError, LoadSummary,
};

#[derive(Module, Debug)]
pub struct Block {
    convs: Vec<Conv2d>,
    norms: Vec<BatchNorm>,
    shortcut: Option<Conv2d>,
    shortcut_norm: Option<BatchNorm>,
    pool: MaxPool2d,
    act: Relu,
}

impl Block {
    fn new(device: &Device, c_in: usize, c_out: usize, convs: usize, residual: bool) -> Self {
        let mut cs = Vec::new();
        let mut ns = Vec::new();
        for i in 0..convs {
            let from = if i == 0 { c_in } else { c_out };
            cs.push(
                Conv2dConfig::new([from, c_out], [3, 3])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .with_bias(false)
                    .init(device),
            );
            ns.push(BatchNormConfig::new(c_out).init(device));
        }
        let (shortcut, shortcut_norm) = if residual {
            (
                Some(
                    Conv2dConfig::new([c_in, c_out], [1, 1])
                        .with_bias(false)
                        .init(device),
                ),
                Some(BatchNormConfig::new(c_out).init(device)),
            )
        } else {
            (None, None)
        };
        Self {
            convs: cs,
            norms: ns,
            shortcut,
            shortcut_norm,
            pool: MaxPool2dConfig::new([2, 2]).init(),
            act: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut y = x.clone();
        let last = self.convs.len() - 1;
        for (i, (c, n)) in self.convs.iter().zip(&self.norms).enumerate() {
            y = n.forward(c.forward(y));
            if i < last {
                y = self.act.forward(y);
            }
        }
        if let (Some(s), Some(n)) = (&self.shortcut, &self.shortcut_norm) {
            y = y + n.forward(s.forward(x));
        }
        self.pool.forward(self.act.forward(y))
    }
}

/// Field name of the pretrained backbone in [`Net`] (parameter paths start with it).
pub const BACKBONE_FIELD: &str = "backbone";

#[derive(Module, Debug)]
pub struct Net {
    /// The small CNN's blocks (empty with a backbone).
    blocks: Vec<Block>,
    /// An EfficientNet-Lite feature extractor instead of the blocks.
    backbone: Option<EfficientNetLite>,
    gap: AdaptiveAvgPool2d,
    feat_fc: Option<Conv2d>,
    drop: Dropout,
    head: Conv2d,
    act: Relu,
}

impl Net {
    pub fn new(
        device: &Device,
        cfg: &NetConfig,
        channels: usize,
        n_features: usize,
        n_classes: usize,
    ) -> Self {
        let mut blocks = Vec::new();
        let mut c = channels;
        let backbone = cfg.backbone.lite().map(|v| {
            EfficientNetLiteConfig::variant(v)
                .without_classifier()
                .init(device)
        });
        if backbone.is_some() {
            c = FEATURE_CHANNELS;
        } else {
            for &w in &cfg.widths {
                blocks.push(Block::new(device, c, w, cfg.convs_per_block, cfg.residual));
                c = w;
            }
        }
        // 1x1 convolutions on [batch, features, 1, 1] instead of linear layers: the graph then
        // needs no reshape, which the exporter cannot resolve when two inputs share the batch axis.
        let feat_fc = (n_features > 0)
            .then(|| Conv2dConfig::new([n_features, cfg.feature_hidden], [1, 1]).init(device));
        let head_in = c + if n_features > 0 {
            cfg.feature_hidden
        } else {
            0
        };
        Self {
            blocks,
            backbone,
            gap: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            feat_fc,
            drop: DropoutConfig::new(cfg.dropout).init(),
            head: Conv2dConfig::new([head_in, n_classes], [1, 1]).init(device),
            act: Relu::new(),
        }
    }

    /// Pooled CNN features, `[batch, channels, 1, 1]`.
    fn embed(&self, x: Tensor<4>) -> Tensor<4> {
        if let Some(b) = &self.backbone {
            return b.features(x);
        }
        let mut x = x;
        for b in &self.blocks {
            x = b.forward(x);
        }
        self.gap.forward(x)
    }

    /// Logits `[batch, classes, 1, 1]` from pixels alone (models without features).
    pub fn forward_image(&self, x: Tensor<4>) -> Tensor<4> {
        self.head.forward(self.drop.forward(self.embed(x)))
    }

    /// Logits `[batch, classes, 1, 1]` from pixels and standardised morphometric features
    /// (`[batch, features, 1, 1]`).
    pub fn forward_fused(&self, x: Tensor<4>, f: Tensor<4>) -> Tensor<4> {
        let e = self.embed(x);
        let z = match &self.feat_fc {
            Some(fc) => Tensor::cat(vec![e, self.act.forward(fc.forward(f))], 1),
            None => e,
        };
        self.head.forward(self.drop.forward(z))
    }

    pub fn takes_features(&self) -> bool {
        self.feat_fc.is_some()
    }

    /// The pretrained backbone, if the network has one.
    pub fn backbone(&self) -> Option<&EfficientNetLite> {
        self.backbone.as_ref()
    }

    /// Loads the backbone's ImageNet weights (nothing to do for the small CNN).
    pub fn load_pretrained(&mut self, path: &Path) -> Result<Option<LoadSummary>, LoadError> {
        self.backbone
            .as_mut()
            .map(|b| b.load_pytorch(path))
            .transpose()
    }

    /// The backbone's fine-tuning groups (0 for the small CNN).
    pub fn backbone_groups(&self) -> usize {
        self.backbone.as_ref().map_or(0, EfficientNetLite::groups)
    }

    /// Path patterns of each backbone group's parameters, in group order (stem first).
    pub fn backbone_group_patterns(&self) -> Vec<String> {
        self.backbone
            .as_ref()
            .map_or_else(Vec::new, |b| b.group_patterns(BACKBONE_FIELD))
    }

    /// Freezes the backbone groups below `first_trainable` (see
    /// [`EfficientNetLite::set_trainable`]); the small CNN and the classifier always train.
    pub fn set_trainable(
        self,
        first_trainable: usize,
        bn_batch_statistics: bool,
        bn_momentum: f64,
    ) -> Self {
        Self {
            backbone: self
                .backbone
                .map(|b| b.set_trainable(first_trainable, bn_batch_statistics, bn_momentum)),
            ..self
        }
    }

    /// The same network computed only with operations burn-onnx can export (ReLU6 without
    /// `Clamp`); call it before the export.
    pub fn exportable(self) -> Self {
        Self {
            backbone: self.backbone.map(|b| b.exportable(true)),
            ..self
        }
    }

    /// Logits `[batch, classes]` (training and evaluation in burn).
    pub fn forward(&self, x: Tensor<4>, f: Option<Tensor<4>>) -> Tensor<2> {
        let out = match f {
            Some(f) if self.takes_features() => self.forward_fused(x, f),
            _ => self.forward_image(x),
        };
        out.flatten(1, 3)
    }
}
