//! Training health: per-layer gradient and weight norms, the vanishing/exploding judgement on
//! them, and the layer in which a NaN or infinity first shows.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// One layer's L2 norm (its parameters together: weight and bias, or BatchNorm's gamma and
/// beta), named by its path in the network, e.g. `blocks.2.convs.0` or `head`.
pub type LayerNorms = Vec<(String, f64)>;

/// Gathers each float parameter's squared norm under the layer it belongs to.
struct Gather<'a> {
    path: Vec<String>,
    /// Gradients to measure; `None` measures the parameters themselves.
    grads: Option<&'a GradientsParams>,
    parts: Vec<(String, Tensor<1>)>,
}

impl ModuleVisitor for Gather<'_> {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = match self.grads {
            Some(g) => match g.get::<D>(param.id) {
                Some(t) => t,
                // Buffers (BatchNorm running statistics) have no gradient.
                None => return,
            },
            None => param.val().detach(),
        };
        // The last path element is the parameter's own name (`weight`, `bias`, ...).
        let layer = self.path[..self.path.len().saturating_sub(1)].join(".");
        self.parts.push((layer, t.powi_scalar(2).sum()));
    }
}

fn gather<M: Module>(module: &M, grads: Option<&GradientsParams>) -> LayerNorms {
    let mut g = Gather {
        path: Vec::new(),
        grads,
        parts: Vec::new(),
    };
    module.visit(&mut g);
    if g.parts.is_empty() {
        return Vec::new();
    }
    let (names, sums): (Vec<String>, Vec<Tensor<1>>) = g.parts.into_iter().unzip();
    // One read-back for the whole network.
    let values: Vec<f32> = Tensor::cat(sums, 0).into_data().iter::<f32>().collect();
    let mut out: LayerNorms = Vec::new();
    for (name, sq) in names.into_iter().zip(values) {
        match out.last_mut() {
            Some((last, acc)) if *last == name => *acc += f64::from(sq),
            _ => out.push((name, f64::from(sq))),
        }
    }
    for (_, v) in &mut out {
        *v = v.sqrt();
    }
    out
}

/// L2 norm of each layer's gradient, in the network's order.
pub fn gradient_norms<M: Module>(module: &M, grads: &GradientsParams) -> LayerNorms {
    gather(module, Some(grads))
}

/// L2 norm of each layer's parameters and buffers, in the network's order.
pub fn weight_norms<M: Module>(module: &M) -> LayerNorms {
    gather(module, None)
}

/// The first layer whose norm is NaN or infinite.
pub fn first_non_finite(norms: &LayerNorms) -> Option<&str> {
    norms
        .iter()
        .find(|(_, v)| !v.is_finite())
        .map(|(n, _)| n.as_str())
}

/// Gradient norms below this are taken as vanished.
pub const VANISH_BELOW: f64 = 1e-6;
/// Gradient norms above this (before clipping) are taken as exploding.
pub const EXPLODE_ABOVE: f64 = 1e3;

/// One layer's gradient norm over an epoch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GradStats {
    pub layer: String,
    /// Mean over the epoch's batches.
    pub mean: f64,
    /// Largest single batch.
    pub max: f64,
}

/// What is wrong with a layer's gradient.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GradTrouble {
    Vanishing,
    Exploding,
}

/// Per-layer gradient norms summed up over an epoch's batches.
#[derive(Debug, Default)]
pub struct EpochNorms {
    sums: Vec<(String, f64, f64)>,
    batches: usize,
}

impl EpochNorms {
    pub fn add(&mut self, norms: &LayerNorms) {
        if self.sums.is_empty() {
            self.sums = norms.iter().map(|(n, _)| (n.clone(), 0.0, 0.0)).collect();
        }
        for ((_, sum, max), (_, v)) in self.sums.iter_mut().zip(norms) {
            *sum += v;
            *max = max.max(*v);
        }
        self.batches += 1;
    }

    pub fn stats(&self) -> Vec<GradStats> {
        let n = self.batches.max(1) as f64;
        self.sums
            .iter()
            .map(|(layer, sum, max)| GradStats {
                layer: layer.clone(),
                mean: sum / n,
                max: *max,
            })
            .collect()
    }
}

/// Layers whose gradient vanished (mean norm over the epoch below `VANISH_BELOW`) or exploded
/// (some batch above `EXPLODE_ABOVE`).
pub fn judge(stats: &[GradStats]) -> Vec<(&GradStats, GradTrouble)> {
    stats
        .iter()
        .filter_map(|s| {
            if s.max > EXPLODE_ABOVE {
                Some((s, GradTrouble::Exploding))
            } else if s.mean < VANISH_BELOW {
                Some((s, GradTrouble::Vanishing))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use burn::module::ModuleMapper;
    use burn::nn::loss::CrossEntropyLossConfig;

    use super::*;
    use crate::offline::train::config::NetConfig;
    use crate::offline::train::net::Net;

    /// Multiplies the parameters of one layer by NaN.
    struct Poison {
        path: Vec<String>,
        layer: &'static str,
    }

    impl ModuleMapper for Poison {
        fn enter_module(&mut self, name: &str, _container: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let layer = self.path[..self.path.len() - 1].join(".");
            if layer == self.layer {
                param.map(|t| t.mul_scalar(f32::NAN))
            } else {
                param
            }
        }
    }

    fn net(device: &Device) -> Net {
        let cfg = NetConfig {
            dropout: 0.0,
            ..NetConfig::default()
        };
        Net::new(device, &cfg, 3, 4, 2)
    }

    fn inputs(device: &Device) -> (Tensor<4>, Tensor<4>, Tensor<1, Int>) {
        let x = Tensor::<4>::from_data(
            TensorData::new(
                (0..4 * 3 * 32 * 32)
                    .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                    .collect::<Vec<f32>>(),
                [4, 3, 32, 32],
            ),
            device,
        );
        let f = Tensor::<4>::from_data(
            TensorData::new(
                (0..16).map(|i| i as f32 / 8.0 - 1.0).collect::<Vec<f32>>(),
                [4, 4, 1, 1],
            ),
            device,
        );
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1, 0, 1], [4]), device);
        (x, f, y)
    }

    #[test]
    fn every_trained_layer_has_a_finite_positive_gradient_norm() {
        let device = Device::flex().autodiff();
        device.seed(3);
        let model = net(&device);
        let (x, f, y) = inputs(&device);
        let loss = CrossEntropyLossConfig::new()
            .init(&device)
            .forward(model.forward(x, Some(f)), y);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let norms = gradient_norms(&model, &grads);
        let names: Vec<&str> = norms.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"blocks.0.convs.0"), "{names:?}");
        assert!(names.contains(&"blocks.0.norms.0"), "{names:?}");
        assert!(names.contains(&"feat_fc"), "{names:?}");
        assert_eq!(names.last(), Some(&"head"), "{names:?}");
        assert!(
            norms.iter().all(|(_, v)| v.is_finite() && *v > 0.0),
            "{norms:?}"
        );
        assert_eq!(first_non_finite(&norms), None);
    }

    #[test]
    fn a_nan_in_the_weights_is_traced_to_its_layer() {
        let device = Device::flex();
        let model = net(&device);
        assert_eq!(first_non_finite(&weight_norms(&model)), None);
        let poisoned = model.map(&mut Poison {
            path: Vec::new(),
            layer: "blocks.1.convs.0",
        });
        let norms = weight_norms(&poisoned);
        assert_eq!(first_non_finite(&norms), Some("blocks.1.convs.0"));
    }

    #[test]
    fn vanishing_and_exploding_layers_are_named() {
        let mut e = EpochNorms::default();
        e.add(&vec![
            ("a".into(), 0.5),
            ("b".into(), 1e-9),
            ("c".into(), 2.0),
        ]);
        e.add(&vec![
            ("a".into(), 1.5),
            ("b".into(), 1e-8),
            ("c".into(), 5e3),
        ]);
        let stats = e.stats();
        assert_eq!(stats[0].mean, 1.0);
        assert_eq!(stats[2].max, 5e3);
        assert_eq!(
            judge(&stats),
            vec![
                (&stats[1], GradTrouble::Vanishing),
                (&stats[2], GradTrouble::Exploding)
            ]
        );
    }
}
