//! Scores an ensemble out of sample from finished cross-validation runs, without training:
//! under k-fold cross-validation each image is a test image once per seed, for a model that
//! never saw it, so averaging an image's test probabilities over the seeds (or over runs of
//! other recipes) scores the ensemble of those models honestly. Reads each fit's `done.json`.
//! `cargo run --release --example oof_ensemble -- DATASET CHECKPOINTS_DIR [CHECKPOINTS_DIR...]`
//! (each `OUT/NAME.checkpoints`; every `s<seed>-f<fold>` in it is read).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use spermscope::core::calibration::argmax;
use spermscope::core::dataset;
use spermscope::core::model::softmax;
use spermscope::offline::metrics::Scores;

/// One run of one seed: the probabilities of every image (by index), from its test fold.
type Run = Vec<Option<Vec<f32>>>;

fn read_runs(dir: &Path, n: usize) -> Result<BTreeMap<String, Run>, String> {
    let mut runs: BTreeMap<String, Run> = BTreeMap::new();
    let mut fits: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("done.json").is_file())
        .collect();
    fits.sort();
    for fit in fits {
        let name = fit.file_name().unwrap().to_string_lossy().into_owned();
        let Some((seed, _fold)) = name.split_once("-f") else {
            continue;
        };
        let text = std::fs::read_to_string(fit.join("done.json")).map_err(|e| e.to_string())?;
        let done: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let test: Vec<usize> =
            serde_json::from_value(done["test"].clone()).map_err(|e| e.to_string())?;
        let logits: Vec<Vec<f32>> =
            serde_json::from_value(done["plain"].clone()).map_err(|e| e.to_string())?;
        let key = format!("{} {seed}", dir.display());
        let run = runs.entry(key).or_insert_with(|| vec![None; n]);
        for (i, l) in test.into_iter().zip(logits) {
            if i >= n || run[i].is_some() {
                return Err(format!(
                    "{}: item {i} out of range or tested twice",
                    fit.display()
                ));
            }
            run[i] = Some(softmax(&l, 1.0));
        }
    }
    Ok(runs)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: oof_ensemble DATASET CHECKPOINTS_DIR [CHECKPOINTS_DIR...]");
        return ExitCode::from(2);
    }
    let ds = match dataset::open(Path::new(&args[0]), "head", None) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("oof_ensemble: {e}");
            return ExitCode::from(1);
        }
    };
    let truth: Vec<usize> = ds.samples.iter().map(|s| s.label).collect();
    let n = truth.len();
    let mut runs = BTreeMap::new();
    for dir in &args[1..] {
        match read_runs(Path::new(dir), n) {
            Ok(r) => runs.extend(r),
            Err(e) => {
                eprintln!("oof_ensemble: {e}");
                return ExitCode::from(1);
            }
        }
    }
    let k = ds.classes.len();
    let mut sum = vec![vec![0f32; k]; n];
    let mut covered = vec![0usize; n];
    for (name, run) in &runs {
        let (mut right, mut seen) = (0, 0);
        for (i, p) in run.iter().enumerate() {
            if let Some(p) = p {
                seen += 1;
                right += usize::from(argmax(p) == truth[i]);
                covered[i] += 1;
                for (s, v) in sum[i].iter_mut().zip(p) {
                    *s += v;
                }
            }
        }
        println!(
            "{name}: {right} of {seen} right, accuracy {:.4}",
            right as f64 / seen.max(1) as f64
        );
    }
    let all = runs.len();
    let full: Vec<usize> = (0..n).filter(|&i| covered[i] == all).collect();
    let t: Vec<usize> = full.iter().map(|&i| truth[i]).collect();
    let p: Vec<usize> = full.iter().map(|&i| argmax(&sum[i])).collect();
    let scores = Scores::new(&ds.classes, &t, &p);
    let right: usize = (0..k).map(|c| scores.confusion[c][c]).sum();
    println!(
        "ensemble of {all} runs (mean probability) on the {} images every run tested: {right} right, accuracy {:.4}, macro-F1 {:.4}",
        full.len(),
        scores.accuracy,
        scores.macro_f1
    );
    println!(
        "confusion (rows: truth {:?}): {:?}",
        ds.classes, scores.confusion
    );
    ExitCode::SUCCESS
}
