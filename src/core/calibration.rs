//! How far a model's probabilities can be trusted: one-vs-rest ROC and AUC, reliability bins
//! and expected calibration error, temperature fitting, and the label-free accuracy estimate
//! from calibrated confidences (confidence-based performance estimation, CBPE).

use serde::Serialize;

use crate::core::model::softmax;

/// One point of an ROC curve.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RocPoint {
    pub fpr: f64,
    pub tpr: f64,
}

/// One-vs-rest ROC curve of class `k` from per-crop probabilities, and its area (the
/// Mann-Whitney statistic, ties counted half). `None` when the class or its complement is absent.
pub fn roc(probs: &[Vec<f32>], truth: &[usize], k: usize) -> Option<(Vec<RocPoint>, f64)> {
    let mut scored: Vec<(f32, bool)> = probs
        .iter()
        .zip(truth)
        .map(|(p, &t)| (p.get(k).copied().unwrap_or(0.0), t == k))
        .collect();
    let pos = scored.iter().filter(|s| s.1).count();
    let neg = scored.len() - pos;
    if pos == 0 || neg == 0 {
        return None;
    }
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut curve = vec![RocPoint { fpr: 0.0, tpr: 0.0 }];
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut auc = 0.0;
    let mut i = 0;
    while i < scored.len() {
        // All crops with the same score move the curve together.
        let (mut dtp, mut dfp) = (0usize, 0usize);
        let s = scored[i].0;
        while i < scored.len() && scored[i].0 == s {
            if scored[i].1 {
                dtp += 1;
            } else {
                dfp += 1;
            }
            i += 1;
        }
        auc += dfp as f64 * (tp as f64 + dtp as f64 / 2.0);
        tp += dtp;
        fp += dfp;
        curve.push(RocPoint {
            fpr: fp as f64 / neg as f64,
            tpr: tp as f64 / pos as f64,
        });
    }
    Some((curve, auc / (pos as f64 * neg as f64)))
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Bin {
    pub lo: f64,
    pub hi: f64,
    pub n: usize,
    /// Mean top probability of the crops in the bin.
    pub confidence: f64,
    /// Share of them classified correctly.
    pub accuracy: f64,
}

/// Reliability bins (equal width on the top probability) and the expected calibration error:
/// the crop-weighted mean gap between confidence and accuracy.
pub fn reliability(probs: &[Vec<f32>], truth: &[usize], bins: usize) -> (Vec<Bin>, f64) {
    let bins = bins.max(1);
    let mut acc = vec![(0usize, 0.0f64, 0usize); bins];
    for (p, &t) in probs.iter().zip(truth) {
        let (best, conf) = top(p);
        let b = ((conf as f64 * bins as f64) as usize).min(bins - 1);
        acc[b].0 += 1;
        acc[b].1 += conf as f64;
        acc[b].2 += usize::from(best == t);
    }
    let n = probs.len().max(1) as f64;
    let mut ece = 0.0;
    let out = acc
        .iter()
        .enumerate()
        .map(|(i, &(k, c, right))| {
            let (confidence, accuracy) = if k > 0 {
                (c / k as f64, right as f64 / k as f64)
            } else {
                (0.0, 0.0)
            };
            ece += k as f64 / n * (confidence - accuracy).abs();
            Bin {
                lo: i as f64 / bins as f64,
                hi: (i + 1) as f64 / bins as f64,
                n: k,
                confidence,
                accuracy,
            }
        })
        .collect();
    (out, ece)
}

/// Index and value of the largest value: the first one on a tie, and a NaN never wins (every
/// reader of a model, the trainer included, picks its class through here).
pub fn top(p: &[f32]) -> (usize, f32) {
    p.iter()
        .copied()
        .enumerate()
        .fold((0, f32::MIN), |a, (i, v)| if v > a.1 { (i, v) } else { a })
}

/// Index of the largest value (`top`'s rule).
pub fn argmax(v: &[f32]) -> usize {
    top(v).0
}

/// The label-free accuracy estimate, kept as it runs: the mean top probability of the crops
/// seen. It equals the expected accuracy when the probabilities are calibrated.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimate {
    pub n: u64,
    pub sum: f64,
}

impl Estimate {
    /// Count one crop by its top probability.
    pub fn add(&mut self, confidence: f32) {
        self.n += 1;
        self.sum += f64::from(confidence);
    }

    /// Crops counted and the estimate, when any were.
    pub fn value(&self) -> Option<(u64, f64)> {
        (self.n > 0).then(|| (self.n, self.sum / self.n as f64))
    }
}

/// The label-free accuracy estimate of a set of probabilities (`Estimate` over their tops).
pub fn estimated_accuracy(probs: &[Vec<f32>]) -> Option<f64> {
    let mut e = Estimate::default();
    for p in probs {
        e.add(top(p).1);
    }
    e.value().map(|(_, v)| v)
}

/// z for a two-sided 95% interval.
pub const Z95: f64 = 1.959_963_985;

/// 95% Wilson score interval of `k` successes in `n` trials, as shares.
pub fn wilson(k: u64, n: u64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = Z95 / denom * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Mean negative log-likelihood of the true classes at temperature `t`.
pub fn nll(logits: &[Vec<f32>], truth: &[usize], t: f32) -> f64 {
    let n = logits.len().max(1) as f64;
    logits
        .iter()
        .zip(truth)
        .map(|(l, &k)| -(softmax(l, t).get(k).copied().unwrap_or(0.0).max(1e-12) as f64).ln())
        .sum::<f64>()
        / n
}

/// The temperature that minimises the negative log-likelihood (golden-section search on
/// log T over [0.05, 20]).
pub fn fit_temperature(logits: &[Vec<f32>], truth: &[usize]) -> f32 {
    let f = |lt: f64| nll(logits, truth, lt.exp() as f32);
    let (mut a, mut b) = (0.05f64.ln(), 20f64.ln());
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let mut c = b - g * (b - a);
    let mut d = a + g * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..60 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_random_and_tied_scores() {
        let truth = [0, 0, 1, 1];
        let perfect = vec![
            vec![0.9, 0.1],
            vec![0.8, 0.2],
            vec![0.3, 0.7],
            vec![0.1, 0.9],
        ];
        assert_eq!(roc(&perfect, &truth, 0).unwrap().1, 1.0);
        let tied = vec![vec![0.5, 0.5]; 4];
        assert_eq!(roc(&tied, &truth, 1).unwrap().1, 0.5);
        // One swapped pair out of four: AUC 3/4.
        let one_off = vec![
            vec![0.9, 0.1],
            vec![0.3, 0.7],
            vec![0.4, 0.6],
            vec![0.1, 0.9],
        ];
        assert!((roc(&one_off, &truth, 1).unwrap().1 - 0.75).abs() < 1e-12);
        assert!(roc(&perfect, &[0, 0, 0, 0], 0).is_none());
    }

    #[test]
    fn ece_is_zero_when_confidence_matches_accuracy() {
        // Ten crops at 0.8 confidence, eight right: calibrated.
        let probs = vec![vec![0.8f32, 0.2]; 10];
        let truth = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1];
        let (bins, ece) = reliability(&probs, &truth, 10);
        assert!(ece.abs() < 1e-6, "{ece}");
        assert_eq!(bins[8].n, 10);
        assert!((estimated_accuracy(&probs).unwrap() - 0.8).abs() < 1e-6);
        // All right at 0.8 confidence: under-confident by 0.2.
        let (_, ece) = reliability(&probs, &[0; 10], 10);
        assert!((ece - 0.2).abs() < 1e-6);
    }

    #[test]
    fn fitted_temperature_undoes_overconfidence() {
        // Every crop gets logits [4, 0] (98% confident) and 73 of 100 are right: the fitted
        // temperature must bring the confidence down to 73%.
        let logits = vec![vec![4.0f32, 0.0]; 100];
        let truth: Vec<usize> = (0..100).map(|i| usize::from(i >= 73)).collect();
        let t = fit_temperature(&logits, &truth);
        let p = softmax(&logits[0], t)[0] as f64;
        assert!((p - 0.73).abs() < 0.005, "T {t}: confidence {p}");
        assert!(nll(&logits, &truth, t) < nll(&logits, &truth, 1.0));
    }
}
