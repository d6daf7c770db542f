//! The classify stage's logic: run a batch of prepared heads through the model, softmax with
//! the model's temperature, and call a cell `uncertain` below the configured confidence.

use std::sync::Arc;

use crate::frame::{ModelId, ModelRef, Verdict};
use crate::model::{Model, ModelError, softmax};
use crate::preprocess::Prepared;

/// Class written for a cell whose top probability is below the threshold.
pub const UNCERTAIN: &str = "uncertain";

/// A loaded model and the rule that turns its probabilities into a class.
pub struct Classifier {
    model: Model,
    id: Arc<ModelRef>,
    uncertain_below: f32,
}

impl Classifier {
    pub fn new(model: Model, uncertain_below: f32) -> Self {
        let id = Arc::new(ModelRef {
            id: ModelId {
                name: model.spec.name.clone(),
                sha256: model.sha256.clone(),
            },
            classes: model.spec.classes.clone(),
        });
        Self {
            model,
            id,
            uncertain_below,
        }
    }

    pub fn id(&self) -> &Arc<ModelRef> {
        &self.id
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// One verdict per prepared head, in order.
    pub fn classify(&mut self, batch: &[Prepared]) -> Result<Vec<Verdict>, ModelError> {
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
}

/// Probabilities → class, with `uncertain` below the threshold.
pub fn verdict(
    probs: &[f32],
    classes: &[String],
    normal: Option<&str>,
    uncertain_below: f32,
) -> Verdict {
    let (best, confidence) = crate::calibration::top(probs);
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
}
