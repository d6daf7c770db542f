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

/// How well a model agrees with an expert's labels: accuracy, Cohen's kappa and, for classes
/// with an order, linearly weighted kappa, each with a 95% interval.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Agreement {
    pub n: usize,
    pub accuracy: f64,
    /// Wilson score interval.
    pub accuracy_ci95: [f64; 2],
    pub kappa: f64,
    /// Percentile bootstrap (2000 resamples of the crops, seeded).
    pub kappa_ci95: [f64; 2],
    /// Linear weights (|i - j| / (k - 1)) over the classes in the given order.
    pub weighted_kappa: Option<f64>,
    pub weighted_kappa_ci95: Option<[f64; 2]>,
}

/// Cohen's kappa of a confusion matrix, with disagreement weights `w[i][j]` (0 on the
/// diagonal; all 1 off it for plain kappa): 1 - observed / expected weighted disagreement.
pub fn kappa(confusion: &[Vec<usize>], w: &dyn Fn(usize, usize) -> f64) -> f64 {
    let k = confusion.len();
    let n: usize = confusion.iter().flatten().sum();
    if n == 0 {
        return 0.0;
    }
    let rows: Vec<f64> = confusion
        .iter()
        .map(|r| r.iter().sum::<usize>() as f64)
        .collect();
    let cols: Vec<f64> = (0..k)
        .map(|j| confusion.iter().map(|r| r[j]).sum::<usize>() as f64)
        .collect();
    let (mut observed, mut expected) = (0.0, 0.0);
    for i in 0..k {
        for j in 0..k {
            observed += w(i, j) * confusion[i][j] as f64;
            expected += w(i, j) * rows[i] * cols[j] / n as f64;
        }
    }
    if expected <= 0.0 {
        return 1.0;
    }
    1.0 - observed / expected
}

/// Agreement of `predicted` with the expert's `truth` over `k` classes; `ordered` adds the
/// linearly weighted kappa (the class indices are the order).
pub fn agreement(truth: &[usize], predicted: &[usize], k: usize, ordered: bool) -> Agreement {
    use rand::{Rng, SeedableRng};
    let n = truth.len().min(predicted.len());
    let conf_of = |idx: &mut dyn Iterator<Item = usize>| {
        let mut c = vec![vec![0usize; k]; k];
        for i in idx {
            if truth[i] < k && predicted[i] < k {
                c[truth[i]][predicted[i]] += 1;
            }
        }
        c
    };
    let plain = |i: usize, j: usize| f64::from(u8::from(i != j));
    let linear = |i: usize, j: usize| i.abs_diff(j) as f64 / (k.max(2) - 1) as f64;
    let conf = conf_of(&mut (0..n));
    let right = (0..n).filter(|&i| truth[i] == predicted[i]).count();
    let (lo, hi) = crate::core::calibration::wilson(right as u64, n as u64);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2024);
    let (mut ks, mut wks) = (Vec::new(), Vec::new());
    for _ in 0..2000 {
        let c = conf_of(&mut (0..n).map(|_| rng.random_range(0..n.max(1))));
        ks.push(kappa(&c, &plain));
        if ordered {
            wks.push(kappa(&c, &linear));
        }
    }
    let ci = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        [at(0.025), at(0.975)]
    };
    Agreement {
        n,
        accuracy: right as f64 / n.max(1) as f64,
        accuracy_ci95: [lo, hi],
        kappa: kappa(&conf, &plain),
        kappa_ci95: ci(ks),
        weighted_kappa: ordered.then(|| kappa(&conf, &linear)),
        weighted_kappa_ci95: ordered.then(|| ci(wks)),
    }
}

#[cfg(test)]
mod agreement_tests {
    use super::*;

    #[test]
    fn kappa_matches_a_worked_example() {
        // Cohen (1960)-style table: 50 items, observed agreement 0.70, chance 0.50.
        let conf = vec![vec![20, 5], vec![10, 15]];
        let k = kappa(&conf, &|i, j| f64::from(u8::from(i != j)));
        assert!((k - 0.4).abs() < 1e-12, "{k}");
        // Perfect agreement, and agreement no better than chance.
        assert!(
            (kappa(&[vec![5, 0], vec![0, 5]], &|i, j| f64::from(u8::from(
                i != j
            ))) - 1.0)
                .abs()
                < 1e-12
        );
        assert!(
            kappa(&[vec![5, 5], vec![5, 5]], &|i, j| f64::from(u8::from(
                i != j
            )))
            .abs()
                < 1e-12
        );
        // Linear weights: a near miss costs less than a far one.
        let near = vec![vec![5, 5, 0], vec![0, 10, 0], vec![0, 0, 10]];
        let far = vec![vec![5, 0, 5], vec![0, 10, 0], vec![0, 0, 10]];
        let lin = |i: usize, j: usize| i.abs_diff(j) as f64 / 2.0;
        assert!(kappa(&near, &lin) > kappa(&far, &lin));
    }

    #[test]
    fn intervals_hold_the_estimate_and_shrink_with_more_crops() {
        let truth: Vec<usize> = (0..200).map(|i| i % 3).collect();
        let pred: Vec<usize> = truth
            .iter()
            .enumerate()
            .map(|(i, &t)| if i % 5 == 0 { (t + 1) % 3 } else { t })
            .collect();
        let a = agreement(&truth, &pred, 3, true);
        assert!((a.accuracy - 0.8).abs() < 1e-12);
        assert!(a.kappa_ci95[0] <= a.kappa && a.kappa <= a.kappa_ci95[1]);
        let w = a.weighted_kappa_ci95.unwrap();
        assert!(w[0] <= a.weighted_kappa.unwrap() && a.weighted_kappa.unwrap() <= w[1]);
        let small = agreement(&truth[..40], &pred[..40], 3, false);
        assert!(small.kappa_ci95[1] - small.kappa_ci95[0] > a.kappa_ci95[1] - a.kappa_ci95[0]);
        assert!(small.weighted_kappa.is_none());
    }
}
