//! The tuner's trial log format (one JSON line per finished trial), outside the `train`
//! feature so the reader can be tested and fuzzed without the trainer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One finished trial (a line of the log).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trial {
    pub outer: usize,
    pub trial: usize,
    /// 0: the first rung (a third of the epochs when halving), 1: promoted to all epochs.
    pub rung: usize,
    pub epochs: usize,
    pub params: BTreeMap<String, toml::Value>,
    /// Accuracy on the inner validation split.
    pub score: f64,
    pub seconds: f64,
}

/// A line before the last that is not a trial: the file is not a search log.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{path}: line {line} is not a trial: {reason}")]
pub struct TuneLogError {
    pub path: PathBuf,
    pub line: usize,
    pub reason: String,
}

/// Read a log's text. A malformed last line is what a killed run leaves (its trial runs
/// again); a malformed line before it means the file is not a search log, and is refused.
pub fn parse_log(text: &str, path: &Path) -> Result<Vec<Trial>, TuneLogError> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let mut trials = Vec::with_capacity(lines.len());
    for (k, (i, line)) in lines.iter().enumerate() {
        match serde_json::from_str::<Trial>(line) {
            Ok(t) => trials.push(t),
            Err(e) if k + 1 == lines.len() => {
                tracing::warn!(path = %path.display(), line = i + 1, error = %e, "last log line is cut off; its trial runs again");
            }
            Err(e) => {
                return Err(TuneLogError {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(trials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_last_line_is_dropped_and_an_earlier_bad_line_refused() {
        let good = r#"{"outer":0,"trial":1,"rung":0,"epochs":4,"params":{"train.lr":0.001},"score":0.8,"seconds":2.0}"#;
        let p = Path::new("log.jsonl");
        let cut = format!("{good}\n\n{}", &good[..20]);
        assert_eq!(parse_log(&cut, p).unwrap().len(), 1);
        let bad = format!("{}\n{good}\n", &good[..20]);
        let e = parse_log(&bad, p).unwrap_err();
        assert_eq!(e.line, 1);
        assert!(
            e.to_string()
                .starts_with("log.jsonl: line 1 is not a trial"),
            "{e}"
        );
    }
}
