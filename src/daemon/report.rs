//! The per-sample report: cells per class, % normal forms with a 95% Wilson interval beside
//! the WHO 6th edition lower reference limit, and whether enough cells were assessed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::calibration::{Estimate, wilson};
use crate::daemon::check::{Base, ConfigError, invalid, within};
use crate::daemon::classify::UNCERTAIN;
use crate::daemon::publish::{Record, RecordKind};

/// `[report]`: the per-sample report.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawReport {
    /// Write the report as JSON here at the end of the run.
    pub file: Option<PathBuf>,
    /// Write the run's figures (frame and cell accounting, drops by reason, stage latency
    /// percentiles, throughput) as JSON here at the end of the run.
    pub summary_file: Option<PathBuf>,
    /// Print the readable report to standard error at the end of the run.
    pub print: bool,
    /// Class counted as a normal form; unset: the model's own normal class.
    pub normal_class: Option<String>,
    /// Classes that are not sperm (kept out of the % normal forms).
    pub exclude_classes: Vec<String>,
    /// Cells needed for a valid assessment (WHO 6th edition: 200).
    pub min_cells: usize,
    /// The model card's accuracy (0-1). When set, the label-free estimate (the classified
    /// cells' mean calibrated confidence) is compared with it and a drift warning is raised
    /// when it falls more than `drift_margin` below.
    pub reference_accuracy: Option<f32>,
    /// How far below `reference_accuracy` the estimate may fall, as a share (0.05: 5 points).
    pub drift_margin: f32,
    /// Classified detections needed before the running estimate is checked for drift (fewer
    /// give too noisy a mean).
    pub drift_min_cells: u64,
}

impl Default for RawReport {
    fn default() -> Self {
        Self {
            file: None,
            summary_file: None,
            print: true,
            normal_class: None,
            exclude_classes: vec!["non-sperm".into()],
            min_cells: 200,
            reference_accuracy: None,
            drift_margin: 0.05,
            drift_min_cells: 50,
        }
    }
}

/// Where the report goes at the end of a run (a restart is needed to change it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportOutput {
    pub file: Option<PathBuf>,
    pub summary_file: Option<PathBuf>,
    pub print: bool,
}

/// How cells are judged (applies on a reload).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRules {
    pub normal_class: Option<String>,
    pub exclude_classes: Vec<String>,
    pub min_cells: usize,
    pub reference_accuracy: Option<f32>,
    pub drift_margin: f32,
    pub drift_min_cells: u64,
}

impl ReportRules {
    /// The model card's accuracy and margin the estimate is judged against, when configured.
    pub fn drift(&self) -> Option<Drift> {
        self.reference_accuracy.map(|reference| Drift {
            reference: f64::from(reference),
            margin: f64::from(self.drift_margin),
        })
    }

    /// The report of a tally under these rules.
    pub fn report(&self, tally: &Tally) -> Report {
        tally.report(&self.exclude_classes, self.min_cells, self.drift())
    }
}

impl RawReport {
    /// Check every value (no I/O).
    pub fn resolve(&self, base: Base<'_>) -> Result<(ReportOutput, ReportRules), ConfigError> {
        if self.min_cells == 0 {
            return Err(invalid("report.min_cells", "must be at least 1"));
        }
        if let Some(n) = &self.normal_class
            && self.exclude_classes.contains(n)
        {
            return Err(invalid(
                "report.exclude_classes",
                format!("holds the normal class '{n}'"),
            ));
        }
        if let Some(a) = self.reference_accuracy
            && !(a > 0.0 && a <= 1.0)
        {
            return Err(invalid("report.reference_accuracy", "must lie in (0, 1]"));
        }
        within("report.drift_margin", self.drift_margin, 0.0, 1.0)?;
        let output = ReportOutput {
            file: self.file.as_deref().map(|p| base.path(p)),
            summary_file: self.summary_file.as_deref().map(|p| base.path(p)),
            print: self.print,
        };
        let rules = ReportRules {
            normal_class: self.normal_class.clone(),
            exclude_classes: self.exclude_classes.clone(),
            min_cells: self.min_cells,
            reference_accuracy: self.reference_accuracy,
            drift_margin: self.drift_margin,
            drift_min_cells: self.drift_min_cells,
        };
        Ok((output, rules))
    }
}

/// Why a records file cannot be read back into reports.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("cannot read records file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} line {line}: not a spermscope record: {reason}")]
    Record {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("records file {0} holds no records")]
    Empty(PathBuf),
}

/// Every record of a records file (JSON Lines), in order; a line that is not a record is an
/// error naming it.
pub fn read_record_lines(path: &Path) -> Result<Vec<Record>, RecordsError> {
    let file = std::fs::File::open(path).map_err(|source| RecordsError::Io {
        path: path.to_path_buf(),
        error: source,
    })?;
    parse_record_lines(std::io::BufReader::new(file), path)
}

/// Every record read from `reader` (JSON Lines), in order; `path` names the source in errors.
pub fn parse_record_lines(reader: impl BufRead, path: &Path) -> Result<Vec<Record>, RecordsError> {
    let mut records = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| RecordsError::Io {
            path: path.to_path_buf(),
            error: source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(
            serde_json::from_str(&line).map_err(|e| RecordsError::Record {
                path: path.to_path_buf(),
                line: i + 1,
                reason: e.to_string(),
            })?,
        );
    }
    if records.is_empty() {
        return Err(RecordsError::Empty(path.to_path_buf()));
    }
    Ok(records)
}

/// Read a records file back into one tally per sample, in sample order; the same tallies the
/// daemon kept while publishing them.
pub fn read_records(path: &Path) -> Result<Vec<Tally>, RecordsError> {
    Ok(tally_records(&read_record_lines(path)?))
}

/// One tally per sample, in sample order, of records already read.
pub fn tally_records(records: &[Record]) -> Vec<Tally> {
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    for r in records {
        tallies
            .entry(r.sample.clone())
            .or_insert_with(|| Tally::new(&r.sample))
            .add_record(r);
    }
    tallies.into_values().collect()
}

/// WHO laboratory manual, 6th edition (2021): lower reference limit of normal forms, %.
pub const WHO_LOWER_REFERENCE_PCT: f64 = 4.0;

/// Running counts for one sample: physical cells (one per track) for the report, and the
/// per-frame detections behind them.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub sample: String,
    /// Models that classified the cells (name → sha256).
    pub models: BTreeMap<String, String>,
    /// Detection records: one per head per frame.
    pub detections: u64,
    /// Cell records: one per physical cell.
    pub cells_recorded: u64,
    pub at_edge: u64,
    pub touching: u64,
    pub per_class: BTreeMap<String, u64>,
    /// Classified cells whose class is the model's normal class.
    pub normal: u64,
    /// The label-free accuracy estimate over classified detections (each frame's crop is
    /// what the model card's accuracy is about, and the estimate runs without waiting for
    /// tracks to end).
    pub estimate: Estimate,
}

/// One cell as the tally sees it.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub at_edge: bool,
    pub touching: bool,
    pub class: Option<&'a str>,
    pub normal: Option<bool>,
    pub confidence: Option<f32>,
}

impl Tally {
    pub fn new(sample: &str) -> Self {
        Self {
            sample: sample.to_string(),
            ..Self::default()
        }
    }

    pub fn add(&mut self, c: Seen<'_>) {
        self.cells_recorded += 1;
        if c.at_edge {
            self.at_edge += 1;
        } else if c.touching {
            self.touching += 1;
        }
        if let Some(class) = c.class {
            *self.per_class.entry(class.to_string()).or_default() += 1;
            if c.normal == Some(true) {
                self.normal += 1;
            }
        }
    }

    /// Count a classified detection's top probability into the running estimate.
    pub fn add_detection(&mut self, confidence: Option<f32>) {
        self.detections += 1;
        if let Some(c) = confidence {
            self.estimate.add(c);
        }
    }

    /// Count a published record (the daemon's publisher and `read_records` both call this):
    /// a detection into the detections and the estimate, a cell into the report.
    pub fn add_record(&mut self, r: &Record) {
        if let Some(m) = &r.model {
            self.models
                .entry(m.name.clone())
                .or_insert_with(|| m.sha256.clone());
        }
        match r.kind {
            RecordKind::Detection => self.add_detection(r.confidence),
            RecordKind::Cell => self.add(Seen {
                at_edge: r.at_edge,
                touching: r.touching,
                class: r.class.as_deref(),
                normal: r.normal,
                confidence: r.confidence,
            }),
        }
    }

    /// Classified detections and their label-free accuracy estimate (mean top probability).
    pub fn estimate(&self) -> Option<(u64, f64)> {
        self.estimate.value()
    }

    /// The report, with `exclude` classes (not sperm) kept out of the assessed cells. With the
    /// model card's accuracy as `reference`, the label-free estimate is checked against it.
    pub fn report(&self, exclude: &[String], min_cells: usize, drift: Option<Drift>) -> Report {
        let uncertain = self.per_class.get(UNCERTAIN).copied().unwrap_or(0);
        let excluded: u64 = exclude.iter().filter_map(|c| self.per_class.get(c)).sum();
        let classified: u64 = self.per_class.values().sum();
        let assessed = classified - uncertain - excluded;
        let (pct, ci) = if assessed > 0 {
            let (lo, hi) = wilson(self.normal, assessed);
            (
                Some(100.0 * self.normal as f64 / assessed as f64),
                Some([100.0 * lo, 100.0 * hi]),
            )
        } else {
            (None, None)
        };
        let estimated = self.estimate().map(|(_, e)| e);
        Report {
            estimated_accuracy: estimated,
            reference_accuracy: drift.map(|d| d.reference),
            drift_suspected: match (estimated, drift) {
                (Some(e), Some(d)) => Some(d.suspected(e)),
                _ => None,
            },
            sample: self.sample.clone(),
            models: self.models.clone(),
            detections: self.detections,
            cells_recorded: self.cells_recorded,
            cells_at_edge: self.at_edge,
            cells_touching: self.touching,
            cells_classified: classified,
            cells_uncertain: uncertain,
            cells_not_sperm: excluded,
            cells_assessed: assessed,
            per_class: self.per_class.clone(),
            normal_forms: self.normal,
            normal_forms_pct: pct,
            normal_forms_ci95_pct: ci,
            who_lower_reference_pct: WHO_LOWER_REFERENCE_PCT,
            below_who_reference: pct.map(|p| p < WHO_LOWER_REFERENCE_PCT),
            min_cells: min_cells as u64,
            min_cells_met: assessed >= min_cells as u64,
        }
    }
}

/// The model card's accuracy and how far below it the label-free estimate may fall before a
/// drift warning.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drift {
    pub reference: f64,
    pub margin: f64,
}

impl Drift {
    /// Whether `estimate` fell more than the margin below the reference.
    pub fn suspected(&self, estimate: f64) -> bool {
        estimate < self.reference - self.margin
    }
}

/// Watches the running estimate of a sample and says when drift starts or ends, judged only
/// once `min_cells` cells were classified.
#[derive(Debug, Clone, Default)]
pub struct DriftWatch {
    pub drifting: bool,
}

/// A change of the drift judgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftChange {
    Started,
    Ended,
}

impl DriftWatch {
    pub fn observe(
        &mut self,
        estimate: Option<(u64, f64)>,
        drift: Option<Drift>,
        min_cells: u64,
    ) -> Option<DriftChange> {
        let now = match (estimate, drift) {
            (Some((cells, e)), Some(d)) if cells >= min_cells => d.suspected(e),
            (_, None) => false,
            // Too few cells yet: keep the last judgement.
            _ => return None,
        };
        let change = match (self.drifting, now) {
            (false, true) => Some(DriftChange::Started),
            (true, false) => Some(DriftChange::Ended),
            _ => None,
        };
        self.drifting = now;
        change
    }
}

/// The report as written to JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Report {
    pub sample: String,
    pub models: BTreeMap<String, String>,
    /// Detection records: one per head per frame.
    pub detections: u64,
    /// Physical cells (one per track): the unit of every `cells_*` count and of % normal forms.
    pub cells_recorded: u64,
    pub cells_at_edge: u64,
    pub cells_touching: u64,
    /// Cells given a class (uncertain included).
    pub cells_classified: u64,
    pub cells_uncertain: u64,
    pub cells_not_sperm: u64,
    /// The denominator of % normal forms.
    pub cells_assessed: u64,
    pub per_class: BTreeMap<String, u64>,
    pub normal_forms: u64,
    pub normal_forms_pct: Option<f64>,
    pub normal_forms_ci95_pct: Option<[f64; 2]>,
    pub who_lower_reference_pct: f64,
    pub below_who_reference: Option<bool>,
    pub min_cells: u64,
    pub min_cells_met: bool,
    /// Label-free accuracy estimate: the classified detections' mean confidence (calibrated
    /// when the model's temperature was fitted).
    pub estimated_accuracy: Option<f64>,
    /// The model card's accuracy, when configured.
    pub reference_accuracy: Option<f64>,
    /// The estimate fell more than the configured margin below the reference.
    pub drift_suspected: Option<bool>,
}

impl Report {
    /// A summary a person reads.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "sample {}", self.sample);
        for (name, sha) in &self.models {
            let _ = writeln!(s, "model  {name} (sha256 {})", &sha[..sha.len().min(12)]);
        }
        let _ = writeln!(
            s,
            "cells  {} recorded (from {} detections): {} classified, {} uncertain, {} not sperm, {} cut by the frame edge, {} touching",
            self.cells_recorded,
            self.detections,
            self.cells_classified - self.cells_uncertain,
            self.cells_uncertain,
            self.cells_not_sperm,
            self.cells_at_edge,
            self.cells_touching
        );
        let _ = writeln!(s, "  {:<20} {:>7} {:>8}", "class", "cells", "share");
        let total = self.cells_classified.max(1) as f64;
        for (class, n) in &self.per_class {
            let _ = writeln!(
                s,
                "  {:<20} {:>7} {:>7.1}%",
                class,
                n,
                100.0 * *n as f64 / total
            );
        }
        match (self.normal_forms_pct, self.normal_forms_ci95_pct) {
            (Some(p), Some([lo, hi])) => {
                let _ = writeln!(
                    s,
                    "normal forms {p:.1}% (95% Wilson interval {lo:.1}-{hi:.1}%, {} of {} assessed)",
                    self.normal_forms, self.cells_assessed
                );
                let _ = writeln!(
                    s,
                    "WHO 6th edition lower reference limit {:.0}%: {}",
                    self.who_lower_reference_pct,
                    if p < self.who_lower_reference_pct {
                        "below"
                    } else {
                        "at or above"
                    }
                );
            }
            _ => {
                let _ = writeln!(s, "normal forms: no cells assessed");
            }
        }
        if let Some(e) = self.estimated_accuracy {
            let _ = write!(s, "label-free accuracy estimate {:.1}%", 100.0 * e);
            match (self.reference_accuracy, self.drift_suspected) {
                (Some(r), Some(true)) => {
                    let _ = writeln!(
                        s,
                        ": WARNING, well below the model card's {:.1}%; the images may differ from the training data",
                        100.0 * r
                    );
                }
                (Some(r), _) => {
                    let _ = writeln!(s, " (model card {:.1}%)", 100.0 * r);
                }
                _ => {
                    let _ = writeln!(s);
                }
            }
        }
        let _ = writeln!(
            s,
            "{}-cell minimum: {} ({} assessed)",
            self.min_cells,
            if self.min_cells_met { "met" } else { "NOT met" },
            self.cells_assessed
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_judged_only_with_enough_cells_and_reported_once_per_change() {
        let d = Some(Drift {
            reference: 0.86,
            margin: 0.05,
        });
        let mut w = DriftWatch::default();
        // 0.70 is far below, but 10 cells are too few.
        assert_eq!(w.observe(Some((10, 0.70)), d, 50), None);
        assert!(!w.drifting);
        assert_eq!(
            w.observe(Some((60, 0.70)), d, 50),
            Some(DriftChange::Started)
        );
        assert_eq!(w.observe(Some((80, 0.72)), d, 50), None);
        assert!(w.drifting);
        // 0.82 lies within the margin.
        assert_eq!(
            w.observe(Some((200, 0.82)), d, 50),
            Some(DriftChange::Ended)
        );
        assert_eq!(w.observe(Some((210, 0.83)), d, 50), None);
        // No reference (e.g. a reload removed it): no drift.
        w.drifting = true;
        assert_eq!(
            w.observe(Some((300, 0.1)), None, 50),
            Some(DriftChange::Ended)
        );
    }

    #[test]
    fn wilson_matches_published_values() {
        // Newcombe (1998), example: 81 of 263 → 0.2553 to 0.3662.
        let (lo, hi) = wilson(81, 263);
        assert!((lo - 0.2553).abs() < 5e-4, "{lo}");
        assert!((hi - 0.3662).abs() < 5e-4, "{hi}");
        let (lo, hi) = wilson(0, 10);
        assert_eq!(lo, 0.0);
        assert!((hi - 0.2775).abs() < 5e-4, "{hi}");
    }

    #[test]
    fn uncertain_and_non_sperm_stay_out_of_the_denominator() {
        let mut t = Tally::new("s1");
        let add = |t: &mut Tally, class: Option<&str>, normal: Option<bool>, edge: bool| {
            t.add(Seen {
                at_edge: edge,
                touching: false,
                class,
                normal,
                confidence: class.map(|_| 0.8),
            });
            // Each cell seen in two frames, classified in both.
            for _ in 0..2 {
                t.add_detection(class.map(|_| 0.8));
            }
        };
        for _ in 0..30 {
            add(&mut t, Some("normal_sperm"), Some(true), false);
        }
        for _ in 0..170 {
            add(&mut t, Some("abnormal_sperm"), Some(false), false);
        }
        for _ in 0..5 {
            add(&mut t, Some("non-sperm"), Some(false), false);
            add(&mut t, Some(UNCERTAIN), Some(false), false);
            add(&mut t, None, None, true);
        }
        let drift = Drift {
            reference: 0.9,
            margin: 0.05,
        };
        let r = t.report(&["non-sperm".into()], 200, Some(drift));
        assert_eq!(r.cells_recorded, 215);
        assert_eq!(r.detections, 430);
        assert!((r.estimated_accuracy.unwrap() - 0.8).abs() < 1e-6);
        assert_eq!(r.drift_suspected, Some(true));
        assert!(r.text().contains("WARNING"));
        assert_eq!(r.cells_assessed, 200);
        assert!(r.min_cells_met);
        assert!((r.normal_forms_pct.unwrap() - 15.0).abs() < 1e-9);
        let [lo, hi] = r.normal_forms_ci95_pct.unwrap();
        assert!(lo < 15.0 && hi > 15.0);
        assert_eq!(r.below_who_reference, Some(false));
        assert!(r.text().contains("200-cell minimum: met"));
        let r = t.report(&["non-sperm".into()], 201, None);
        assert!(!r.min_cells_met);
    }
}
