//! The classify stage's logic: load a model the daemon can use, prepare each found head
//! through the model's `Preprocessor` (the pose stage), run batches through ONNX Runtime,
//! softmax with the model's temperature, and call a cell `uncertain` below the configured
//! confidence.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::core::calibration::top;
use crate::core::model::{Model, ModelError, Provider, RuntimeOptions, softmax};
use crate::core::morphometry::head_size;
use crate::core::preprocess::{Prepared, Preprocessor};
use crate::daemon::check::{Base, ConfigError, bundled, invalid, positive, within};
use crate::daemon::frame::{Cell, ModelRef, Verdict, Work};
use crate::daemon::share::in_two;
use crate::daemon::telemetry::CellDropReason;

/// Class written for a cell whose top probability is below the threshold.
pub const UNCERTAIN: &str = "uncertain";
/// Model the embedded defaults use, relative to the project root.
pub const DEFAULT_MODEL: &str = "models/smids-3class.onnx";

/// `[classify]`: the classifier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawClassify {
    /// ONNX model exported by spermscope-train; relative paths are taken from the config
    /// file's folder. Default: the bundled SMIDS model.
    pub model: Option<PathBuf>,
    /// Scale (µm per pixel) of the images the model was trained on, when its metadata does not
    /// say; crops are resized from `source.um_per_px` to it. Unset: no resizing.
    pub model_um_per_px: Option<f32>,
    /// Execution provider: `cpu`, `cuda` (start-up fails if CUDA cannot be registered) or
    /// `auto` (CUDA when it registers, else CPU with a warning).
    pub provider: Provider,
    /// ONNX Runtime intra-op threads; 0 lets the runtime choose.
    pub threads: usize,
    /// ONNX Runtime library; unset: `ORT_DYLIB_PATH`, then `.ort/` from `scripts/setup`.
    pub ort_dylib_path: Option<PathBuf>,
    /// Most crops in one inference batch.
    pub max_batch: usize,
    /// How long a batch may wait for the next frame's heads, ms; 0 batches one frame at a time.
    pub batch_wait_ms: u64,
    /// Below this top probability a cell is recorded as `uncertain` (its probabilities are
    /// still written).
    pub uncertain_below: f32,
}

impl Default for RawClassify {
    fn default() -> Self {
        Self {
            model: None,
            model_um_per_px: None,
            provider: Provider::Cpu,
            threads: 1,
            ort_dylib_path: None,
            max_batch: 64,
            batch_wait_ms: 0,
            uncertain_below: 0.5,
        }
    }
}

/// The classifier's resolved settings (all of them apply on a reload).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassifySettings {
    pub model: PathBuf,
    pub model_um_per_px: Option<f32>,
    pub provider: Provider,
    pub threads: usize,
    pub max_batch: usize,
    pub batch_wait_ms: u64,
    pub uncertain_below: f32,
}

impl RawClassify {
    /// Check every value (no I/O). The runtime library path is returned apart: the runtime is
    /// loaded once per process.
    pub fn resolve(
        &self,
        base: Base<'_>,
    ) -> Result<(ClassifySettings, Option<PathBuf>), ConfigError> {
        if let Some(v) = self.model_um_per_px {
            positive("classify.model_um_per_px", v)?;
        }
        if self.max_batch == 0 || self.max_batch > 4096 {
            return Err(invalid("classify.max_batch", "must lie in 1..=4096"));
        }
        if self.threads > 256 {
            return Err(invalid("classify.threads", "must be at most 256"));
        }
        if self.batch_wait_ms > 10_000 {
            return Err(invalid("classify.batch_wait_ms", "must be at most 10000"));
        }
        within("classify.uncertain_below", self.uncertain_below, 0.0, 1.0)?;
        let settings = ClassifySettings {
            model: match &self.model {
                Some(p) => base.path(p),
                None => bundled(DEFAULT_MODEL),
            },
            model_um_per_px: self.model_um_per_px,
            provider: self.provider,
            threads: self.threads,
            max_batch: self.max_batch,
            batch_wait_ms: self.batch_wait_ms,
            uncertain_below: self.uncertain_below,
        };
        Ok((
            settings,
            self.ort_dylib_path.as_deref().map(|p| base.path(p)),
        ))
    }
}

/// Why a classifier cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model {model} is not suitable: {reason}")]
    Unsuitable { model: PathBuf, reason: String },
}

/// What the classify stage needs of a classifier: its identity, its preprocessing, and
/// verdicts for a batch of prepared heads. `Classifier` (ONNX Runtime) is the real one; the
/// pipeline's tests drive the stages with a fake.
pub trait Classify: Send {
    fn id(&self) -> &Arc<ModelRef>;
    /// The crop → tensor path of its model.
    fn preprocessor(&self) -> Preprocessor;
    /// One verdict per prepared head, in order.
    fn classify(&mut self, batch: &[Prepared]) -> Result<Vec<Verdict>, ModelError>;
    /// One line for the log: the model, its file and where it runs.
    fn describe(&self) -> String;
}

/// Classify every prepared cell of the frames, `max_batch` at a time. A failed batch drops
/// its cells with a reason; the frames go on.
pub fn classify_frames(c: &mut dyn Classify, frames: &mut [Work], max_batch: usize) {
    let mut slots: Vec<&mut Cell> = frames
        .iter_mut()
        .flat_map(|w| w.cells.iter_mut())
        .filter(|c| c.prepared.is_some())
        .collect();
    for chunk in slots.chunks_mut(max_batch.max(1)) {
        // The inputs move out of the cells: they are not needed past this stage.
        let inputs: Vec<_> = chunk.iter_mut().filter_map(|c| c.prepared.take()).collect();
        match c.classify(&inputs) {
            Ok(verdicts) => {
                for (cell, v) in chunk.iter_mut().zip(verdicts) {
                    cell.verdict = Some(v);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, cells = chunk.len(), "inference failed; cells dropped");
                for cell in chunk.iter_mut() {
                    cell.dropped = Some(CellDropReason::InferenceError);
                }
            }
        }
    }
}

/// A loaded model, its preprocessing, and the rule that turns its probabilities into a class.
pub struct Classifier {
    model: Model,
    id: Arc<ModelRef>,
    uncertain_below: f32,
}

impl Classifier {
    /// Load the model the settings name and check that the daemon can use it: it must name a
    /// normal class (or `normal_class` must be one of its classes). The report's normal class
    /// and `model_um_per_px` go into the model's own spec, so every stage reads one set of
    /// numbers. Start-up and reload both come through here.
    pub fn load(
        s: &ClassifySettings,
        normal_class: Option<&str>,
        runtime: &RuntimeOptions,
    ) -> Result<Classifier, ClassifyError> {
        let mut model = Model::load(&s.model, runtime)?;
        let unsuitable = |reason: String| ClassifyError::Unsuitable {
            model: s.model.clone(),
            reason,
        };
        let classes = &model.spec.classes;
        match normal_class {
            Some(n) if !classes.iter().any(|c| c == n) => {
                return Err(unsuitable(format!(
                    "report.normal_class '{n}' is not one of its classes {classes:?}"
                )));
            }
            None if model.spec.normal_class.is_none() => {
                return Err(unsuitable(
                    "it names no normal class; set report.normal_class".into(),
                ));
            }
            _ => {}
        }
        let spec = Arc::make_mut(&mut model.spec);
        if let Some(n) = normal_class {
            spec.normal_class = Some(n.to_string());
        }
        if spec.crop.um_per_px.is_none() {
            spec.crop.um_per_px = s.model_um_per_px;
        }
        if spec.crop.um_per_px.is_none() {
            tracing::warn!(
                model = %s.model.display(),
                window_px = spec.crop.window_px,
                "the model does not name the pixel scale of its training images and classify.model_um_per_px is unset: heads are cut in {} frame pixels whatever the frame's scale, so at another magnification the model sees them at the wrong size",
                spec.crop.window_px
            );
        }
        Ok(Classifier::new(model, s.uncertain_below))
    }

    pub fn new(model: Model, uncertain_below: f32) -> Self {
        let id = Arc::new(ModelRef {
            id: model.id(),
            classes: model.spec.classes.clone(),
            normal_class: model.spec.normal_class.clone(),
            uncertain_below,
        });
        Self {
            model,
            id,
            uncertain_below,
        }
    }

    pub fn model(&self) -> &Model {
        &self.model
    }
}

impl Classify for Classifier {
    fn id(&self) -> &Arc<ModelRef> {
        &self.id
    }

    fn preprocessor(&self) -> Preprocessor {
        self.model.preprocessor()
    }

    fn classify(&mut self, batch: &[Prepared]) -> Result<Vec<Verdict>, ModelError> {
        let logits = self.model.logits(batch)?;
        let spec = &self.model.spec;
        Ok(logits
            .iter()
            .map(|l| {
                verdict(
                    &softmax(l, spec.temperature),
                    &spec.classes,
                    spec.normal_class.as_deref(),
                    self.uncertain_below,
                )
            })
            .collect())
    }

    fn describe(&self) -> String {
        let m = &self.model;
        format!(
            "model {} ({}, {})",
            m.spec.name,
            m.path.display(),
            m.provider
        )
    }
}

/// The pose stage: turn each head of a frame upright and make its model inputs through the
/// classifier's `Preprocessor`; heads that will not be classified (at the edge, touching) only
/// get their sizes. Angle and sizes are those of the head as the classifier saw it.
pub fn prepare_cells(work: &mut Work, pre: &Preprocessor, um_per_px: f32) {
    let image = work.frame.image.clone();
    let stain = work.stain.take();
    let mut heads = Vec::new();
    for (i, c) in work.cells.iter_mut().enumerate() {
        let Some(head) = c.head.take() else {
            continue;
        };
        if c.unclassified.is_some() {
            c.size = head_size(&head, um_per_px);
            continue;
        }
        heads.push((i, head));
    }
    let prepared = in_two(&heads, |(_, head)| {
        pre.head_in(&image, stain.as_deref(), head, Some(um_per_px))
    });
    for ((i, head), mut p) in heads.into_iter().zip(prepared) {
        let Some(c) = work.cells.get_mut(i) else {
            continue;
        };
        let seen = p.head.take().unwrap_or(head);
        c.angle_deg = seen.angle_deg();
        c.size = head_size(&seen, um_per_px);
        c.prepared = Some(p);
    }
}

/// Probabilities → class, with `uncertain` below the threshold.
pub fn verdict(
    probs: &[f32],
    classes: &[String],
    normal: Option<&str>,
    uncertain_below: f32,
) -> Verdict {
    let (best, confidence) = top(probs);
    let top = classes.get(best).cloned().unwrap_or_default();
    let sure = confidence >= uncertain_below;
    Verdict {
        normal: sure && normal == Some(top.as_str()),
        class: if sure { top } else { UNCERTAIN.to_string() },
        confidence,
        probs: probs.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_the_threshold_is_uncertain_with_probabilities_kept() {
        let classes = vec!["normal".to_string(), "abnormal".to_string()];
        let v = verdict(&[0.7, 0.3], &classes, Some("normal"), 0.6);
        assert_eq!(v.class, "normal");
        assert!(v.normal);
        let v = verdict(&[0.55, 0.45], &classes, Some("normal"), 0.6);
        assert_eq!(v.class, UNCERTAIN);
        assert!(!v.normal);
        assert_eq!(v.probs, vec![0.55, 0.45]);
        let v = verdict(&[0.2, 0.8], &classes, Some("normal"), 0.6);
        assert_eq!(v.class, "abnormal");
        assert!(!v.normal);
    }

    #[test]
    fn bad_values_name_their_key() {
        let raw = RawClassify {
            max_batch: 0,
            ..RawClassify::default()
        };
        let e = raw.resolve(Base(None)).unwrap_err().to_string();
        assert!(e.contains("classify.max_batch"), "{e}");
        let raw = RawClassify {
            uncertain_below: 1.5,
            ..RawClassify::default()
        };
        let e = raw.resolve(Base(None)).unwrap_err().to_string();
        assert!(e.contains("classify.uncertain_below"), "{e}");
    }
}
