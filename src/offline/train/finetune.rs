//! The fine-tuning recipe of a pretrained backbone: which backbone groups train in an epoch
//! (head-only epochs, then all at once or gradual unfreezing), how their batch norms behave,
//! and the learning rate of each group (discriminative rates, lower for early groups).

use burn::module::ParamGroup;
use burn::optim::lr_scheduler::LrSchedulerConfig;
use burn::optim::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrSchedulerConfig};

use super::config::{BnMode, Experiment};
use super::net::Net;

/// The learning rate of the trained parts of the network at a fractional epoch. Head epochs
/// run at the constant `finetune.head_lr`; then comes linear warm-up and cosine decay to zero
/// over the remaining epochs (all of them when there are no head epochs).
pub fn lr_at(exp: &Experiment, epoch_f: f64) -> f64 {
    let t = &exp.train;
    let head = exp.finetune.head_epochs as f64;
    if epoch_f < head {
        return exp.finetune.head_lr.unwrap_or(t.lr);
    }
    let epoch_f = epoch_f - head;
    let warm = t.warmup_epochs as f64;
    if epoch_f < warm {
        return t.lr * (epoch_f + 1.0 / 8.0).min(warm) / warm;
    }
    let span = (t.epochs as f64 - head - warm).max(1.0);
    let p = ((epoch_f - warm) / span).clamp(0.0, 1.0);
    t.lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
}

/// The first trainable backbone group in `epoch` (0-based) of a backbone with `groups`
/// groups: all frozen (`groups`) in the head epochs, then all trainable (0), or one more group
/// from the top every `unfreeze_every` epochs.
pub fn first_trainable(exp: &Experiment, groups: usize, epoch: usize) -> usize {
    let f = &exp.finetune;
    if epoch < f.head_epochs {
        return groups;
    }
    if f.unfreeze_every == 0 {
        return 0;
    }
    let open = (epoch - f.head_epochs) / f.unfreeze_every + 1;
    groups.saturating_sub(open)
}

/// The network set up for `epoch`: frozen groups, batch-norm behaviour and momentum. The
/// small CNN is returned as it is.
pub fn prepare_epoch(exp: &Experiment, model: Net, epoch: usize) -> Net {
    let groups = model.backbone_groups();
    if groups == 0 {
        return model;
    }
    let f = &exp.finetune;
    model.set_trainable(
        first_trainable(exp, groups, epoch),
        f.bn == BnMode::Train,
        f.bn_momentum,
    )
}

/// Per-group learning rates for one update.
pub struct LrPolicy {
    /// Each backbone group's parameters and its rate relative to the classifier's.
    groups: Vec<(ParamGroup, f64)>,
}

impl LrPolicy {
    /// The policy of `model` under `exp`: no groups for the small CNN, or when every backbone
    /// group learns at the classifier's rate.
    pub fn new(exp: &Experiment, model: &Net) -> Result<Self, String> {
        let f = &exp.finetune;
        let patterns = model.backbone_group_patterns();
        if patterns.is_empty() || (f.backbone_lr_mult == 1.0 && f.layer_lr_decay == 1.0) {
            return Ok(Self { groups: Vec::new() });
        }
        let top = patterns.len() - 1;
        let groups = patterns
            .iter()
            .enumerate()
            .map(|(g, p)| {
                let mult = f.backbone_lr_mult * f.layer_lr_decay.powi((top - g) as i32);
                ParamGroup::from_regex(p)
                    .map(|group| (group, mult))
                    .map_err(|e| format!("{e:?}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self { groups })
    }

    /// Each group's learning rates for a classifier rate of `lr`.
    pub fn at(&self, lr: f64) -> ModuleLearningRate {
        if self.groups.is_empty() {
            return lr.into();
        }
        let mut cfg = ModuleLrSchedulerConfig::new(LrSchedulerConfig::Constant(lr));
        for (group, mult) in &self.groups {
            cfg = cfg.with_group(group.clone(), LrSchedulerConfig::Constant(lr * mult));
        }
        // Constant schedules always build; fall back to one rate if that ever changes.
        cfg.init().map_or_else(|_| lr.into(), |mut s| s.step())
    }

    /// The rate of each backbone group relative to the classifier's (stem first).
    pub fn multipliers(&self) -> Vec<f64> {
        self.groups.iter().map(|(_, m)| *m).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::offline::train::config::ConfigError;

    fn parse(extra: &str) -> Result<Experiment, ConfigError> {
        let text = format!(
            "name='a'\n[data]\ndataset='d'\n[crop]\nsize_px=64\n[model]\nbackbone='efficientnet-lite0'\n[train]\nepochs=10\nlr=0.001\nwarmup_epochs=1\n{extra}"
        );
        Experiment::parse(&text, Path::new("a.toml"))
    }

    fn exp(extra: &str) -> Experiment {
        parse(extra).unwrap_or_else(|e| panic!("valid experiment: {e}"))
    }

    #[test]
    fn head_epochs_freeze_the_backbone_then_groups_open_from_the_top() {
        let e = exp("[finetune]\nhead_epochs=2\nunfreeze_every=1\n");
        let open: Vec<usize> = (0..8).map(|ep| first_trainable(&e, 9, ep)).collect();
        assert_eq!(open, vec![9, 9, 8, 7, 6, 5, 4, 3]);
        let all = exp("[finetune]\nhead_epochs=2\n");
        assert_eq!(first_trainable(&all, 9, 1), 9);
        assert_eq!(first_trainable(&all, 9, 2), 0);
        assert_eq!(first_trainable(&exp(""), 9, 0), 0);
        // As many head epochs as epochs: a linear probe, the backbone never opens.
        let probe = exp("[finetune]\nhead_epochs=10\nhead_lr=0.003\n");
        assert!((0..10).all(|ep| first_trainable(&probe, 9, ep) == 9));
        assert!((0..10).all(|ep| lr_at(&probe, ep as f64 + 0.5) == 0.003));
        let Err(err) = parse("[finetune]\nhead_epochs=11\n") else {
            panic!("more head epochs than epochs must be refused");
        };
        assert!(err.to_string().contains("finetune.head_epochs"), "{err}");
    }

    #[test]
    fn head_epochs_run_at_their_rate_then_warm_up_and_decay() {
        let e = exp("[finetune]\nhead_epochs=2\nhead_lr=0.01\n");
        assert_eq!(lr_at(&e, 0.5), 0.01);
        assert_eq!(lr_at(&e, 1.9), 0.01);
        assert!(lr_at(&e, 2.0) < 0.001 && lr_at(&e, 2.0) > 0.0);
        assert!((lr_at(&e, 3.0) - 0.001).abs() < 1e-12);
        assert!(lr_at(&e, 9.9) < 1e-4);
        // Without head epochs, the schedule the small CNN has always had.
        let plain = exp("");
        assert!((lr_at(&plain, 1.0) - 0.001).abs() < 1e-12);
    }

    #[test]
    fn discriminative_rates_fall_from_the_top_group_down() {
        let e = exp("[finetune]\nbackbone_lr_mult=0.5\nlayer_lr_decay=0.5\n");
        let device = burn::prelude::Device::flex();
        let net = Net::new(&device, &e.model, 3, 0, 2);
        let m = LrPolicy::new(&e, &net).expect("patterns").multipliers();
        assert_eq!(m.len(), 9);
        assert_eq!(m[8], 0.5);
        assert_eq!(m[7], 0.25);
        assert!((m[0] - 0.5f64.powi(9)).abs() < 1e-15);
        assert!(
            LrPolicy::new(&exp(""), &net)
                .expect("none")
                .multipliers()
                .is_empty()
        );
    }

    /// One plain SGD step: each parameter moves by its group's rate times its gradient, and a
    /// frozen group does not move at all.
    #[test]
    fn each_group_steps_at_its_own_rate_and_frozen_groups_stay() {
        use burn::module::Param;
        use burn::nn::loss::CrossEntropyLossConfig;
        use burn::optim::{GradientsParams, SgdConfig};
        use burn::prelude::*;

        let e = exp("[finetune]\nbackbone_lr_mult=0.5\nlayer_lr_decay=0.5\nunfreeze_every=1\n");
        let device = Device::flex().autodiff();
        device.seed(1);
        let net = Net::new(&device, &e.model, 3, 0, 2);
        // Epoch 1 of gradual unfreezing: the top two groups train, the rest are frozen.
        let net = prepare_epoch(&e, net, 1);
        let policy = LrPolicy::new(&e, &net).expect("patterns");
        let x = Tensor::<4>::random(
            [2, 3, 32, 32],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1], [2]), &device);
        let loss = CrossEntropyLossConfig::new()
            .init(&device)
            .forward(net.forward(x, None), y);
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        let b = net.backbone().expect("backbone");
        let top = &b.head.conv.weight;
        let below = &b.blocks[15].project.conv.weight;
        let frozen = &b.blocks[14].project.conv.weight;
        assert!(
            grads.get::<4>(frozen.id).is_none(),
            "a frozen group has a gradient"
        );
        let grad = |p: &Param<Tensor<4>>| grads.get::<4>(p.id).expect("gradient").inner();
        let (g_top, g_below) = (grad(top), grad(below));
        let (w_top, w_below, w_frozen) = (top.val(), below.val(), frozen.val());
        // The step's rate as the least-squares ratio of the weight change to the gradient
        // (a ratio of plain sums is ill-conditioned when the gradient sums to nearly zero).
        let rate = |before: Tensor<4>, after: &Param<Tensor<4>>, g: Tensor<4>| {
            let d = before.inner() - after.val().inner();
            let dg = (d * g.clone()).sum().into_scalar::<f32>();
            let gg = (g.clone() * g).sum().into_scalar::<f32>();
            f64::from(dg / gg)
        };
        let mut optim = SgdConfig::new().init();
        let stepped = optim.step(policy.at(0.1), net.clone(), grads);
        let s = stepped.backbone().expect("backbone");
        let top_rate = rate(w_top, &s.head.conv.weight, g_top);
        let below_rate = rate(w_below, &s.blocks[15].project.conv.weight, g_below);
        assert!((top_rate - 0.05).abs() < 1e-3, "{top_rate}");
        assert!((below_rate - 0.025).abs() < 1e-3, "{below_rate}");
        let moved = (w_frozen.inner() - s.blocks[14].project.conv.weight.val().inner())
            .abs()
            .max()
            .into_scalar::<f32>();
        assert_eq!(moved, 0.0);
    }
}
