//! `spermscope-train --init MODEL.onnx`: a trained model read back (its spec and its weights,
//! by the module paths the exporter names them with) to start a lab's fine-tuning from, instead
//! of random weights.

use std::path::PathBuf;

use burn_store::ModuleSnapshot;
use burn_store::burn_pack::{self, Bytes, DType};

use super::config::{
    AugmentConfig, Backbone, CropConfig, CvConfig, DataConfig, Experiment, FinetuneConfig,
    NetConfig, Pretext, TrainConfig,
};
use super::net::Net;
use crate::core::onnx_proto;
use crate::core::spec::{ModelFile, ModelFileError};

/// The classifier's parameters: rows are mapped by class name, not copied whole.
const HEAD: [&str; 2] = ["head.weight", "head.bias"];

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    File(#[from] ModelFileError),
    #[error("{path}: {reason}")]
    Architecture { path: PathBuf, reason: String },
}

/// What [`FineTune::apply`] does with the classifier.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadMapping {
    /// For each new class, the model's class whose classifier row it starts from (`None`: a
    /// freshly initialised row).
    pub rows: Vec<(String, Option<String>)>,
}

/// A trained model as the starting point of a fine-tuning run.
pub trait FineTune {
    /// The small CNN these weights belong to (widths, convolutions per block, shortcut,
    /// morphometric branch), with `base`'s training-only settings (dropout). A pretrained
    /// backbone's architecture is not inferred: its experiment file must be given.
    fn net_config(&self, base: &NetConfig) -> Result<NetConfig, InitError>;
    /// The classifier row each of `classes` starts from: the model's class of the same name,
    /// else, for the new normal class, the model's normal class; else none.
    fn head_mapping(&self, classes: &[String], normal: Option<&str>) -> HeadMapping;
    /// `net` (built for the mapping's classes) with every weight of this model, by name and
    /// shape; the classifier's rows follow `mapping`, the rest of it keeps `net`'s fresh
    /// initialisation. A weight the network lacks, or one the model lacks, is an error: the
    /// network is not the model's.
    fn apply(&self, net: Net, mapping: &HeadMapping) -> Result<Net, InitError>;
}

fn arch_err(m: &ModelFile, reason: String) -> InitError {
    InitError::Architecture {
        path: m.path.clone(),
        reason,
    }
}

impl FineTune for ModelFile {
    fn net_config(&self, base: &NetConfig) -> Result<NetConfig, InitError> {
        if self.weights.keys().any(|k| k.starts_with("backbone.")) {
            return Err(arch_err(self,
                "the model has an EfficientNet-Lite backbone; pass its experiment file with --config so the network can be rebuilt".into(),
            ));
        }
        let out_channels = |name: &str| self.weights.get(name).and_then(|w| w.shape.first());
        let widths: Vec<usize> = (0..)
            .map_while(|b| out_channels(&format!("blocks.{b}.convs.0.weight")).copied())
            .collect();
        if widths.is_empty() {
            return Err(arch_err(
                self,
                "no convolution blocks (blocks.0.convs.0.weight) found".into(),
            ));
        }
        let convs = (0..)
            .take_while(|c| {
                self.weights
                    .contains_key(&format!("blocks.0.convs.{c}.weight"))
            })
            .count();
        let hidden = out_channels("feat_fc.weight").copied();
        Ok(NetConfig {
            backbone: Backbone::SmallCnn,
            pretrained: false,
            weights: None,
            widths,
            convs_per_block: convs,
            residual: self.weights.contains_key("blocks.0.shortcut.weight"),
            dropout: base.dropout,
            features: hidden.is_some(),
            feature_hidden: hidden.unwrap_or(base.feature_hidden),
            test_time_mirror: self.spec.test_time_mirror,
        })
    }

    fn head_mapping(&self, classes: &[String], normal: Option<&str>) -> HeadMapping {
        let rows = classes
            .iter()
            .map(|c| {
                let same = self.spec.classes.iter().find(|m| *m == c);
                let normal_row = (Some(c.as_str()) == normal)
                    .then_some(self.spec.normal_class.as_ref())
                    .flatten();
                (c.clone(), same.or(normal_row).cloned())
            })
            .collect();
        HeadMapping { rows }
    }

    fn apply(&self, mut net: Net, mapping: &HeadMapping) -> Result<Net, InitError> {
        let fresh = net.collect(None, None, false);
        let extra: Vec<&String> = self
            .weights
            .keys()
            .filter(|k| !fresh.iter().any(|t| &t.name == *k))
            .collect();
        if !extra.is_empty() {
            return Err(arch_err(
                self,
                format!("the network has no place for {extra:?}"),
            ));
        }
        let mut tensors = Vec::with_capacity(fresh.len());
        for t in &fresh {
            let shape: Vec<usize> = t.shape.iter().copied().collect();
            let values = if HEAD.contains(&t.name.as_str()) {
                let bytes = t.to_bytes().map_err(|e| arch_err(self, e.to_string()))?;
                let mut v = onnx_proto::le_floats(&bytes);
                copy_rows(self, &t.name, &mut v, mapping)?;
                v
            } else {
                let w = self.weights.get(&t.name).ok_or_else(|| {
                    arch_err(
                        self,
                        format!("the network has '{}', the model does not", t.name),
                    )
                })?;
                if w.shape != shape {
                    return Err(arch_err(
                        self,
                        format!(
                            "'{}' is {:?} in the model and {:?} in the network",
                            t.name, w.shape, shape
                        ),
                    ));
                }
                w.values.clone()
            };
            let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push(burn_pack::Tensor::new(
                t.name.clone(),
                DType::F32,
                shape.clone(),
                t.param_id,
                Bytes::from_bytes_vec(bytes),
            ));
        }
        let result = net.apply(tensors, None, None, false);
        if !result.errors.is_empty() || !result.missing.is_empty() {
            return Err(arch_err(
                self,
                format!(
                    "weights not applied: {:?} {:?}",
                    result.errors, result.missing
                ),
            ));
        }
        Ok(net)
    }
}

/// Overwrites the rows of the classifier parameter `name` (`[classes, ...]`) that `mapping`
/// takes from the model.
fn copy_rows(
    m: &ModelFile,
    name: &str,
    fresh: &mut [f32],
    mapping: &HeadMapping,
) -> Result<(), InitError> {
    let Some(w) = m.weights.get(name) else {
        return Err(arch_err(m, format!("the model has no '{name}'")));
    };
    let model_rows = m.spec.classes.len();
    let new_rows = mapping.rows.len();
    if model_rows == 0
        || w.values.len() % model_rows != 0
        || fresh.len() != new_rows * (w.values.len() / model_rows)
    {
        return Err(arch_err(
            m,
            format!(
                "'{name}' has {} values for {model_rows} classes; the network wants {} for {new_rows}",
                w.values.len(),
                fresh.len()
            ),
        ));
    }
    let row = w.values.len() / model_rows;
    for (i, (_, from)) in mapping.rows.iter().enumerate() {
        if let Some(j) = from
            .as_ref()
            .and_then(|f| m.spec.classes.iter().position(|c| c == f))
        {
            fresh[i * row..(i + 1) * row].copy_from_slice(&w.values[j * row..(j + 1) * row]);
        }
    }
    Ok(())
}

/// What the command line says about a fine-tuning run from a trained model.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    /// The lab's labelled crops, one folder per class (replaces the experiment's dataset).
    pub dataset: Option<PathBuf>,
    /// Name of the new model (default: the model's name with `-adapted`).
    pub name: Option<String>,
    /// The lab's class that counts as a normal form (default: the model's normal class if the
    /// lab has a class of that name, else a class named `normal...`).
    pub normal_class: Option<String>,
}

/// The recipe of a fine-tuning run when no experiment file is given: the small CNN's training
/// at half its learning rate, 40 epochs, batches of 16 (a lab labels a few hundred crops), no
/// validation split (every crop trains; `--folds` gives the estimate and the temperature).
/// Chosen by 5-fold cross-validation on 100 HuSHeM crops from the SMIDS model (README): 0.85
/// against 0.74 for a quarter of the rate with early stopping on a fifth held out. The crop,
/// network and normal class are the model's, set by [`attach`].
pub fn adaptation_experiment(init: &ModelFile, dataset: PathBuf) -> Experiment {
    Experiment {
        name: format!("{}-adapted", init.spec.name),
        data: DataConfig {
            dataset,
            mhsma_label: "head".into(),
            normal_class: None,
            um_per_px: None,
            pretext: None,
        },
        crop: CropConfig::default(),
        model: NetConfig::default(),
        train: TrainConfig {
            epochs: 40,
            batch_size: 16,
            lr: 1e-3,
            warmup_epochs: 1,
            val_fraction: 0.0,
            patience: 0,
            ..TrainConfig::default()
        },
        augment: AugmentConfig::default(),
        cv: CvConfig::default(),
        finetune: FinetuneConfig::default(),
        distill: None,
        init: None,
    }
}

/// `exp` set up to start from `init`: its crop, input size and channels follow the model's
/// spec (the network must see what it learned on), its network is the model's, and the
/// normal class is settled against the lab's `classes`.
pub fn attach(
    mut exp: Experiment,
    init: ModelFile,
    opts: &InitOptions,
    classes: &[String],
) -> Result<Experiment, InitError> {
    let s = &init.spec;
    exp.crop.pose = s.crop.pose;
    exp.crop.contrast = s.crop.contrast;
    exp.crop.window_px = s.crop.window_px;
    exp.crop.size_px = s.input.size_px;
    exp.crop.channels = s.input.channels;
    exp.data.um_per_px = s.crop.um_per_px;
    let mirror = exp.model.test_time_mirror;
    if exp.model.backbone == Backbone::SmallCnn {
        exp.model = init.net_config(&exp.model)?;
    }
    // A classifier keeps its reading; a pretext model never had one (the experiment's holds).
    exp.model.test_time_mirror = if is_pretext(s) {
        mirror
    } else {
        s.test_time_mirror
    };
    if let Some(n) = &opts.name {
        exp.name = n.clone();
    }
    exp.data.normal_class = opts
        .normal_class
        .clone()
        .or_else(|| {
            exp.data
                .normal_class
                .clone()
                .filter(|n| classes.contains(n))
        })
        .or_else(|| guess_normal(s.normal_class.as_deref(), classes));
    if let Some(n) = &exp.data.normal_class
        && !classes.contains(n)
    {
        return Err(arch_err(
            &init,
            format!("normal class '{n}' is not one of the lab's classes {classes:?}"),
        ));
    }
    exp.init = Some(std::sync::Arc::new(init));
    Ok(exp)
}

/// Whether `spec` is a pretext model's (`data.pretext`): its classes are the pretext's, so
/// what it learned is a starting point, not a classifier.
pub fn is_pretext(spec: &crate::core::spec::ModelSpec) -> bool {
    spec.classes
        .iter()
        .map(String::as_str)
        .eq(Pretext::ROTATION_CLASSES)
}

/// The model's normal class if the lab has it, else the lab's class whose name starts with
/// `normal` (case-insensitive).
fn guess_normal(model_normal: Option<&str>, classes: &[String]) -> Option<String> {
    model_normal
        .and_then(|n| classes.iter().find(|c| *c == n))
        .or_else(|| {
            classes
                .iter()
                .find(|c| c.to_lowercase().starts_with("normal"))
        })
        .cloned()
}
