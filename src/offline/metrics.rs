//! Classification scores (accuracy, macro-F1, per-class precision/recall/F1, confusion matrix)
//! shared by the trainer and the evaluator so both report the same numbers.

use serde::Serialize;

/// Per-class figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassScore {
    pub class: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

/// Scores of a set of predictions.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Scores {
    pub n: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub classes: Vec<String>,
    /// `confusion[truth][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    pub per_class: Vec<ClassScore>,
}

impl Scores {
    pub fn new(classes: &[String], truth: &[usize], predicted: &[usize]) -> Scores {
        let k = classes.len();
        let mut confusion = vec![vec![0usize; k]; k];
        for (&t, &p) in truth.iter().zip(predicted) {
            if t < k && p < k {
                confusion[t][p] += 1;
            }
        }
        Self::from_confusion(classes, confusion)
    }

    pub fn from_confusion(classes: &[String], confusion: Vec<Vec<usize>>) -> Scores {
        let k = classes.len();
        let n: usize = confusion.iter().flatten().sum();
        let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
        let per_class: Vec<ClassScore> = (0..k)
            .map(|c| {
                let tp = confusion[c][c] as f64;
                let support: usize = confusion[c].iter().sum();
                let predicted: usize = (0..k).map(|t| confusion[t][c]).sum();
                let precision = if predicted > 0 {
                    tp / predicted as f64
                } else {
                    0.0
                };
                let recall = if support > 0 {
                    tp / support as f64
                } else {
                    0.0
                };
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                ClassScore {
                    class: classes[c].clone(),
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();
        let macro_f1 = per_class.iter().map(|c| c.f1).sum::<f64>() / k.max(1) as f64;
        Scores {
            n,
            accuracy: if n > 0 {
                correct as f64 / n as f64
            } else {
                0.0
            },
            macro_f1,
            classes: classes.to_vec(),
            confusion,
            per_class,
        }
    }

    /// A readable table: per-class figures, then the confusion matrix.
    pub fn to_text(&self) -> String {
        let w = self
            .classes
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(5)
            .max(9);
        let mut s = format!(
            "accuracy {:.4}   macro-F1 {:.4}   n {}\n\n{:<w$}  precision  recall     F1  support\n",
            self.accuracy, self.macro_f1, self.n, "class"
        );
        for c in &self.per_class {
            s += &format!(
                "{:<w$}  {:>9.3}  {:>6.3}  {:>5.3}  {:>7}\n",
                c.class, c.precision, c.recall, c.f1, c.support
            );
        }
        s += &format!("\nconfusion (rows: truth, columns: predicted)\n{:<w$}", "");
        for c in &self.classes {
            s += &format!(" {:>w$}", c);
        }
        s.push('\n');
        for (i, row) in self.confusion.iter().enumerate() {
            s += &format!("{:<w$}", self.classes[i]);
            for v in row {
                s += &format!(" {:>w$}", v);
            }
            s.push('\n');
        }
        s
    }
}

/// Mean and (sample) standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    if v.len() < 2 {
        return (m, 0.0);
    }
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    (m, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_match_hand_computed_values() {
        let classes: Vec<String> = ["a", "b"].iter().map(|s| s.to_string()).collect();
        // truth a a a b b, predicted a a b b a
        let s = Scores::new(&classes, &[0, 0, 0, 1, 1], &[0, 0, 1, 1, 0]);
        assert_eq!(s.confusion, vec![vec![2, 1], vec![1, 1]]);
        assert!((s.accuracy - 0.6).abs() < 1e-12);
        assert!((s.per_class[0].precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.per_class[1].recall - 0.5).abs() < 1e-12);
        let f1a = 2.0 / 3.0;
        let f1b = 0.5;
        assert!((s.macro_f1 - (f1a + f1b) / 2.0).abs() < 1e-12);
        assert!(s.to_text().contains("macro-F1"));
        let (m, sd) = mean_std(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (sd - 1.0).abs() < 1e-12);
    }
}
