//! Hyperparameter search with honest selection: a search space over an experiment's keys,
//! grid / random / TPE sampling, successive halving, nested evaluation (the configuration is
//! chosen on an inner split of each outer fold's training part and scored on its test part),
//! and a JSON Lines log that lets a killed search resume where it stopped.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::config::{ConfigError, Experiment};
use super::plot::ScatterPanel;
use super::{TrainError, base_spec, fit, load_data};
use crate::core::dataset;
use crate::offline::metrics::Scores;
pub use crate::offline::tune_log::{self, Trial};

/// One searched parameter: a dotted key of the experiment TOML and how to draw it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Param {
    /// Uniform on a log scale (learning rate, weight decay).
    LogUniform {
        min: f64,
        max: f64,
    },
    Uniform {
        min: f64,
        max: f64,
    },
    /// Integer, inclusive bounds.
    Int {
        min: i64,
        max: i64,
    },
    /// One of the listed values (strings, numbers or booleans).
    Categorical {
        values: Vec<toml::Value>,
    },
}

/// How trials are drawn.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Every combination of three levels per numeric parameter and every categorical value.
    Grid,
    Random,
    /// Tree-structured Parzen estimator: after a few random trials, draw candidates near the
    /// best quarter and keep the one most likely under them relative to the rest.
    Tpe,
}

/// A search file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Search {
    /// The experiment the parameters are applied to (relative to the search file).
    pub experiment: PathBuf,
    pub strategy: Strategy,
    /// Trials per outer fold.
    pub trials: usize,
    #[serde(default = "one")]
    pub seed: u64,
    /// Outer folds (stratified); each runs its own search.
    #[serde(default = "three")]
    pub outer_folds: usize,
    /// Share of an outer fold's training part held out to score trials.
    #[serde(default = "quarter")]
    pub inner_val_fraction: f64,
    /// Successive halving: every trial first runs a third of the epochs; the best third then
    /// runs them all.
    #[serde(default)]
    pub halving: bool,
    /// Use at most this many images, spread over the dataset.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Dotted experiment key → how it is drawn.
    pub params: BTreeMap<String, Param>,
    /// The experiment's text, read once by `load`.
    #[serde(skip)]
    base: String,
}

fn one() -> u64 {
    1
}
fn three() -> usize {
    3
}
fn quarter() -> f64 {
    0.25
}

/// The outcome of one outer fold.
#[derive(Debug, Clone, Serialize)]
pub struct OuterResult {
    pub outer: usize,
    pub chosen: BTreeMap<String, toml::Value>,
    pub inner_score: f64,
    /// Accuracy of the chosen configuration, trained on the whole outer training part, on
    /// the outer test part: the figure to report.
    pub outer_accuracy: f64,
}

/// What a search found.
#[derive(Debug, Clone, Serialize)]
pub struct TuneReport {
    pub outer: Vec<OuterResult>,
    pub outer_accuracy_mean: f64,
    pub outer_accuracy_std: f64,
    pub trials: Vec<Trial>,
    /// The outer fold's choice with the best inner score, written as a trainer experiment.
    pub best_experiment: PathBuf,
    pub seconds: f64,
}

fn invalid(path: &Path, key: &'static str, reason: String) -> TrainError {
    TrainError::Config(ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        reason,
    })
}

impl Search {
    pub fn load(path: &Path) -> Result<Search, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            TrainError::Config(ConfigError::Read {
                path: path.to_path_buf(),
                error: source,
            })
        })?;
        let mut s: Search = toml::from_str(&text).map_err(|e| {
            TrainError::Config(ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
        })?;
        if s.experiment.is_relative()
            && let Some(dir) = path.parent()
        {
            s.experiment = dir.join(&s.experiment);
        }
        if s.params.is_empty() {
            return Err(invalid(path, "params", "lists no parameter".into()));
        }
        if s.trials == 0 {
            return Err(invalid(path, "trials", "must be at least 1".into()));
        }
        if s.outer_folds < 2 {
            return Err(invalid(path, "outer_folds", "must be at least 2".into()));
        }
        if !(0.05..=0.5).contains(&s.inner_val_fraction) {
            return Err(invalid(
                path,
                "inner_val_fraction",
                "must lie in [0.05, 0.5]".into(),
            ));
        }
        for (k, p) in &s.params {
            let ok = match p {
                Param::LogUniform { min, max } => *min > 0.0 && max > min,
                Param::Uniform { min, max } => max > min,
                Param::Int { min, max } => max >= min,
                Param::Categorical { values } => !values.is_empty(),
            };
            if !ok {
                return Err(invalid(path, "params", format!("'{k}' has an empty range")));
            }
        }
        // Every parameter must land on a key the experiment accepts.
        s.base = std::fs::read_to_string(&s.experiment).map_err(|source| {
            TrainError::Config(ConfigError::Read {
                path: s.experiment.clone(),
                error: source,
            })
        })?;
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let probe: BTreeMap<String, toml::Value> = s
            .params
            .iter()
            .map(|(k, p)| (k.clone(), draw(p, &mut rng)))
            .collect();
        experiment_with(&s.base, &probe, &s.experiment)?;
        Ok(s)
    }
}

/// The experiment text with the parameters set, parsed and validated.
pub fn experiment_with(
    base: &str,
    params: &BTreeMap<String, toml::Value>,
    path: &Path,
) -> Result<(Experiment, String), TrainError> {
    let mut table: toml::Table = toml::from_str(base).map_err(|e| {
        TrainError::Config(ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    })?;
    for (key, value) in params {
        let parts: Vec<&str> = key.split('.').collect();
        let (last, tables) = parts
            .split_last()
            .ok_or_else(|| invalid(path, "params", "empty key".into()))?;
        let mut t = &mut table;
        for part in tables {
            t = t
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| {
                    invalid(path, "params", format!("'{key}': '{part}' is not a table"))
                })?;
        }
        t.insert(last.to_string(), value.clone());
    }
    let text = toml::to_string(&table).map_err(|e| invalid(path, "params", e.to_string()))?;
    let exp = Experiment::parse(&text, path)?;
    Ok((exp, text))
}

fn draw(p: &Param, rng: &mut ChaCha8Rng) -> toml::Value {
    match p {
        Param::LogUniform { min, max } => {
            toml::Value::Float(rng.random_range(min.ln()..=max.ln()).exp())
        }
        Param::Uniform { min, max } => toml::Value::Float(rng.random_range(*min..=*max)),
        Param::Int { min, max } => toml::Value::Integer(rng.random_range(*min..=*max)),
        Param::Categorical { values } => values[rng.random_range(0..values.len())].clone(),
    }
}

/// A parameter value on the axis the sampler works in (log for log-uniform), and its width.
fn axis(p: &Param, v: &toml::Value) -> Option<(f64, f64)> {
    let x = v.as_float().or_else(|| v.as_integer().map(|i| i as f64))?;
    match p {
        Param::LogUniform { min, max } => Some((x.ln(), max.ln() - min.ln())),
        Param::Uniform { min, max } => Some((x, max - min)),
        Param::Int { min, max } => Some((x, (max - min).max(1) as f64)),
        Param::Categorical { .. } => None,
    }
}

/// Three levels per numeric parameter, every value of a categorical one: the grid's points.
fn grid(params: &BTreeMap<String, Param>) -> Vec<BTreeMap<String, toml::Value>> {
    let mut points = vec![BTreeMap::new()];
    for (k, p) in params {
        let levels: Vec<toml::Value> = match p {
            Param::LogUniform { min, max } => {
                let mid = (min.ln() + max.ln()) / 2.0;
                vec![*min, mid.exp(), *max]
                    .into_iter()
                    .map(toml::Value::Float)
                    .collect()
            }
            Param::Uniform { min, max } => vec![*min, (min + max) / 2.0, *max]
                .into_iter()
                .map(toml::Value::Float)
                .collect(),
            Param::Int { min, max } => {
                let mut l = vec![*min, (min + max) / 2, *max];
                l.dedup();
                l.into_iter().map(toml::Value::Integer).collect()
            }
            Param::Categorical { values } => values.clone(),
        };
        points = points
            .into_iter()
            .flat_map(|pt| {
                levels.iter().map(move |v| {
                    let mut q = pt.clone();
                    q.insert(k.clone(), v.clone());
                    q
                })
            })
            .collect();
    }
    points
}

/// TPE: candidates drawn around the best quarter of `done`, kept by how much likelier they are
/// under the good trials than under the rest (per-parameter Parzen densities).
fn tpe(
    params: &BTreeMap<String, Param>,
    done: &[(BTreeMap<String, toml::Value>, f64)],
    rng: &mut ChaCha8Rng,
) -> BTreeMap<String, toml::Value> {
    let mut sorted: Vec<&(BTreeMap<String, toml::Value>, f64)> = done.iter().collect();
    sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
    let n_good = (sorted.len() / 4).max(1);
    let (good, bad) = sorted.split_at(n_good);
    let density =
        |set: &[&(BTreeMap<String, toml::Value>, f64)], k: &str, p: &Param, v: &toml::Value| {
            let n = set.len() as f64;
            match (p, axis(p, v)) {
                (Param::Categorical { values }, _) => {
                    let hits = set.iter().filter(|t| t.0.get(k) == Some(v)).count() as f64;
                    (hits + 1.0) / (n + values.len() as f64)
                }
                (_, Some((x, width))) => {
                    let bw = (0.2 * width).max(1e-9);
                    let s: f64 = set
                        .iter()
                        .filter_map(|t| t.0.get(k).and_then(|o| axis(p, o)))
                        .map(|(o, _)| (-(x - o).powi(2) / (2.0 * bw * bw)).exp())
                        .sum();
                    (s + 1e-3) / (n + 1.0)
                }
                _ => 1.0,
            }
        };
    let mut best: Option<(f64, BTreeMap<String, toml::Value>)> = None;
    for _ in 0..24 {
        let anchor = &good[rng.random_range(0..good.len())].0;
        let mut cand = BTreeMap::new();
        for (k, p) in params {
            let v = match (p, anchor.get(k).and_then(|v| axis(p, v))) {
                (Param::LogUniform { min, max }, Some((x, w))) => {
                    toml::Value::Float((x + 0.2 * w * gauss(rng)).clamp(min.ln(), max.ln()).exp())
                }
                (Param::Uniform { min, max }, Some((x, w))) => {
                    toml::Value::Float((x + 0.2 * w * gauss(rng)).clamp(*min, *max))
                }
                (Param::Int { min, max }, Some((x, w))) => toml::Value::Integer(
                    ((x + 0.2 * w * gauss(rng)).round() as i64).clamp(*min, *max),
                ),
                (Param::Categorical { .. }, _) if rng.random_bool(0.8) => {
                    anchor.get(k).cloned().unwrap_or_else(|| draw(p, rng))
                }
                _ => draw(p, rng),
            };
            cand.insert(k.clone(), v);
        }
        let ratio: f64 = params
            .iter()
            .map(|(k, p)| {
                let v = &cand[k];
                (density(good, k, p, v) / density(bad, k, p, v).max(1e-12)).ln()
            })
            .sum();
        if best.as_ref().is_none_or(|(r, _)| ratio > *r) {
            best = Some((ratio, cand));
        }
    }
    best.map(|(_, c)| c).unwrap_or_default()
}

fn gauss(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller.
    let u1: f64 = rng.random_range(1e-12..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The search's log: finished trials, one JSON line each, appended (and flushed) as they
/// finish, so a killed search resumes where it stopped.
pub struct TrialLog {
    path: PathBuf,
    logged: Vec<Trial>,
    file: std::fs::File,
}

/// Read a log's text (see `tune_log::parse_log`).
pub fn parse_log(text: &str, path: &Path) -> Result<Vec<Trial>, TrainError> {
    tune_log::parse_log(text, path).map_err(|e| {
        invalid(
            path,
            "log",
            format!("line {} is not a trial: {}", e.line, e.reason),
        )
    })
}

impl TrialLog {
    /// Open (or create) the log and read the trials an earlier run finished.
    pub fn open(path: &Path) -> Result<TrialLog, TrainError> {
        let write_err = |e: std::io::Error| TrainError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let logged = match std::fs::read_to_string(path) {
            Ok(text) => parse_log(&text, path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(write_err(e)),
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(write_err)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(write_err)?;
        Ok(TrialLog {
            path: path.to_path_buf(),
            logged,
            file,
        })
    }

    /// The trial from an earlier run, when it finished; refused when its parameters are
    /// not the ones drawn now (the search changed).
    fn get(
        &self,
        (outer, trial, rung): (usize, usize, usize),
        params: &BTreeMap<String, toml::Value>,
    ) -> Result<Option<Trial>, TrainError> {
        let Some(t) = self
            .logged
            .iter()
            .find(|t| t.outer == outer && t.trial == trial && t.rung == rung)
        else {
            return Ok(None);
        };
        if &t.params != params {
            return Err(invalid(
                &self.path,
                "log",
                format!(
                    "trial {trial} of outer fold {outer} in the log has other parameters; the search changed, start a new log"
                ),
            ));
        }
        Ok(Some(t.clone()))
    }

    fn append(&mut self, t: &Trial) -> Result<(), TrainError> {
        let line =
            serde_json::to_string(t).map_err(|e| invalid(&self.path, "log", e.to_string()))?;
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::Write {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        self.logged.push(t.clone());
        Ok(())
    }
}

/// What every trial of a search shares.
struct Ctx<'a> {
    search: &'a Search,
    items: &'a [fit::Item],
    classes: &'a [String],
    grid_points: Vec<BTreeMap<String, toml::Value>>,
    trials: usize,
}

impl Ctx<'_> {
    /// The parameters of trial `trial` of an outer fold: the grid's next point, a random
    /// draw, or TPE's proposal from the trials done so far.
    fn propose(
        &self,
        outer: usize,
        trial: usize,
        done: &[(BTreeMap<String, toml::Value>, f64)],
    ) -> BTreeMap<String, toml::Value> {
        let search = self.search;
        let mut rng = ChaCha8Rng::seed_from_u64(
            search.seed.wrapping_mul(1_000_003) ^ ((outer as u64) << 32) ^ trial as u64,
        );
        let random = |rng: &mut ChaCha8Rng| {
            search
                .params
                .iter()
                .map(|(k, p)| (k.clone(), draw(p, rng)))
                .collect()
        };
        match search.strategy {
            Strategy::Grid => self.grid_points.get(trial).cloned().unwrap_or_default(),
            Strategy::Random => random(&mut rng),
            Strategy::Tpe if done.len() < 4 => random(&mut rng),
            Strategy::Tpe => tpe(&search.params, done, &mut rng),
        }
    }

    /// One trial at one rung on the inner split: from the log when it ran before, else
    /// trained now and logged.
    fn score(
        &self,
        log: &mut TrialLog,
        (outer, trial, rung): (usize, usize, usize),
        params: &BTreeMap<String, toml::Value>,
        (inner_train, inner_val): (&[usize], &[usize]),
    ) -> Result<Trial, TrainError> {
        if let Some(t) = log.get((outer, trial, rung), params)? {
            return Ok(t);
        }
        let search = self.search;
        let (mut exp, _) = experiment_with(&search.base, params, &search.experiment)?;
        let full = exp.train.epochs;
        exp.train.epochs = if search.halving && rung == 0 {
            full.div_ceil(3)
        } else {
            full
        };
        exp.train.val_fraction = 0.0;
        let t0 = Instant::now();
        let score = train_and_score(&exp, self.items, self.classes, inner_train, inner_val)?;
        let t = Trial {
            outer,
            trial,
            rung,
            epochs: exp.train.epochs,
            params: params.clone(),
            score,
            seconds: t0.elapsed().as_secs_f64(),
        };
        log.append(&t)?;
        Ok(t)
    }

    /// One outer fold: trials on an inner split of its training part, the best third run to
    /// the end when halving, then the chosen configuration scored on the outer test part.
    /// Returns the fold's result and every trial it ran.
    fn outer_fold(
        &self,
        outer: usize,
        outer_of: &[usize],
        log: &mut TrialLog,
        bar: &ProgressBar,
    ) -> Result<(OuterResult, Vec<Trial>), TrainError> {
        let search = self.search;
        let (test, rest): (Vec<usize>, Vec<usize>) =
            (0..self.items.len()).partition(|&i| outer_of[i] == outer);
        let (inner_train, inner_val) = super::split_val(
            self.items,
            &rest,
            search.inner_val_fraction,
            search.seed + outer as u64,
        );
        let inner = (inner_train.as_slice(), inner_val.as_slice());
        let mut done: Vec<(BTreeMap<String, toml::Value>, f64)> = Vec::new();
        let mut first: Vec<Trial> = Vec::new();
        for trial in 0..self.trials {
            let params = self.propose(outer, trial, &done);
            let t = self.score(log, (outer, trial, 0), &params, inner)?;
            done.push((t.params.clone(), t.score));
            first.push(t);
            bar.inc(1);
            let best = first.iter().map(|t| t.score).fold(0.0, f64::max);
            bar.set_message(format!("outer fold {} best {:.3}", outer + 1, best));
        }
        // Successive halving: the best third runs all its epochs.
        let mut finals = Vec::new();
        if search.halving {
            let mut order: Vec<usize> = (0..first.len()).collect();
            order.sort_by(|&a, &b| first[b].score.total_cmp(&first[a].score));
            for &i in order.iter().take(first.len().div_ceil(3)) {
                let (t, params) = (&first[i], &first[i].params);
                finals.push(self.score(log, (outer, t.trial, 1), params, inner)?);
                bar.inc(1);
            }
        }
        let pool = if search.halving { &finals } else { &first };
        let chosen = pool
            .iter()
            .max_by(|a, b| a.score.total_cmp(&b.score))
            .cloned()
            .ok_or_else(|| invalid(&log.path, "trials", "no trial finished".into()))?;
        // The outer figure: the chosen configuration on the whole outer training part.
        let (exp, _) = experiment_with(&search.base, &chosen.params, &search.experiment)?;
        let outer_accuracy = train_and_score(&exp, self.items, self.classes, &rest, &test)?;
        bar.inc(1);
        let mut all = first;
        all.extend(finals);
        let result = OuterResult {
            outer,
            chosen: chosen.params,
            inner_score: chosen.score,
            outer_accuracy,
        };
        Ok((result, all))
    }
}

/// Run (or resume) a search; `log` is the JSON Lines file of finished trials.
pub fn run(search: &Search, log: &Path, out: &Path, quiet: bool) -> Result<TuneReport, TrainError> {
    let started = Instant::now();
    let (exp0, _) = experiment_with(&search.base, &BTreeMap::new(), &search.experiment)?;
    let (ds, _, items, _) = load_data(&exp0, search.limit, &ProgressBar::hidden())?;
    let mut trial_log = TrialLog::open(log)?;
    let labels: Vec<usize> = items.iter().map(|i| i.label).collect();
    let outer_of = dataset::stratified_folds(&labels, search.outer_folds, search.seed);
    let grid_points = grid(&search.params);
    let trials = match search.strategy {
        Strategy::Grid => search.trials.min(grid_points.len()),
        _ => search.trials,
    };
    let ctx = Ctx {
        search,
        items: &items,
        classes: &ds.classes,
        grid_points,
        trials,
    };
    let per_fold = trials
        + if search.halving {
            trials.div_ceil(3)
        } else {
            0
        }
        + 1;
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((per_fold * search.outer_folds) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(format!("tuning {}", exp0.name));
    let mut results = Vec::new();
    let mut all = Vec::new();
    for outer in 0..search.outer_folds {
        let (r, t) = ctx.outer_fold(outer, &outer_of, &mut trial_log, &bar)?;
        results.push(r);
        all.extend(t);
    }
    bar.finish_and_clear();
    let accs: Vec<f64> = results.iter().map(|r| r.outer_accuracy).collect();
    let (mean, std) = crate::offline::metrics::mean_std(&accs);
    let best = results
        .iter()
        .max_by(|a, b| a.inner_score.total_cmp(&b.inner_score))
        .ok_or_else(|| invalid(log, "trials", "no outer fold finished".into()))?;
    let (_, text) = experiment_with(&search.base, &best.chosen, &search.experiment)?;
    let write_err = |path: &Path, e: std::io::Error| TrainError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(out).map_err(|e| write_err(out, e))?;
    let best_path = out.join(format!("{}.best.toml", exp0.name));
    let header = format!(
        "# Found by spermscope-tune ({:?}, {} trials x {} outer folds): nested outer accuracy {:.3} ± {:.3}.\n",
        search.strategy, trials, search.outer_folds, mean, std
    );
    std::fs::write(&best_path, header + &text).map_err(|e| write_err(&best_path, e))?;
    if let Err(e) = super::plot::tune_scatter(
        &scatter_panels(&all, &search.params),
        &exp0.name,
        &out.join(format!("{}.tune.png", exp0.name)),
    ) {
        tracing::warn!(error = %e, "search picture not drawn");
    }
    Ok(TuneReport {
        outer: results,
        outer_accuracy_mean: mean,
        outer_accuracy_std: std,
        trials: all,
        best_experiment: best_path,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Train on `train` (no validation split) and return the accuracy on `test`.
fn train_and_score(
    exp: &Experiment,
    items: &[fit::Item],
    classes: &[String],
    train: &[usize],
    test: &[usize],
) -> Result<f64, TrainError> {
    let mut spec = base_spec(exp, classes);
    fit::fit_normalisation(items, train, &mut spec, exp.model.fixed_pixel_norm());
    let fitted = fit::fit(
        exp,
        items,
        train,
        &[],
        &spec,
        exp.train.seed,
        &ProgressBar::hidden(),
        None,
        None,
    )?;
    let logits = fit::predict(&fitted.model, items, test, &spec);
    let truth: Vec<usize> = test.iter().map(|&i| items[i].label).collect();
    let pred: Vec<usize> = logits
        .iter()
        .map(|l| crate::core::calibration::argmax(l))
        .collect();
    Ok(Scores::new(&spec.classes, &truth, &pred).accuracy)
}

/// The search picture's panels: each parameter's values (log10 for log-uniform ones,
/// indexes for categorical ones) against the trials' scores.
fn scatter_panels(trials: &[Trial], params: &BTreeMap<String, Param>) -> Vec<ScatterPanel> {
    params
        .iter()
        .map(|(key, p)| {
            let log = matches!(p, Param::LogUniform { .. });
            let points = trials
                .iter()
                .filter_map(|t| {
                    let v = as_number(p, t.params.get(key)?);
                    Some((if log { v.log10() } else { v }, t.score, t.rung > 0))
                })
                .collect();
            let names = match p {
                Param::Categorical { values } => values
                    .iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    .collect(),
                _ => Vec::new(),
            };
            ScatterPanel {
                key: key.clone(),
                log,
                points,
                names,
            }
        })
        .collect()
}

/// A parameter value as a number for plots (categorical: its index).
pub fn as_number(p: &Param, v: &toml::Value) -> f64 {
    match p {
        Param::Categorical { values } => values.iter().position(|x| x == v).unwrap_or(0) as f64,
        _ => v
            .as_float()
            .or_else(|| v.as_integer().map(|i| i as f64))
            .unwrap_or(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_last_line_is_run_again_and_a_bad_middle_line_refused() {
        let t = Trial {
            outer: 0,
            trial: 1,
            rung: 0,
            epochs: 3,
            params: BTreeMap::new(),
            score: 0.5,
            seconds: 1.0,
        };
        let line = serde_json::to_string(&t).unwrap();
        let path = Path::new("log.jsonl");
        let cut = format!("{line}\n{}", &line[..line.len() / 2]);
        assert_eq!(parse_log(&cut, path).unwrap(), vec![t.clone()]);
        let bad = format!("{line}\nnot json\n{line}\n");
        let e = parse_log(&bad, path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    /// A resumed search compares the logged parameters with the ones it draws again, so a
    /// trial must read back from its JSON line bit for bit.
    #[test]
    fn logged_trials_read_back_exactly() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let p = Param::LogUniform {
            min: 1e-5,
            max: 1e-2,
        };
        for trial in 0..2000 {
            let t = Trial {
                outer: 0,
                trial,
                rung: 0,
                epochs: 5,
                params: BTreeMap::from([("train.lr".to_string(), draw(&p, &mut rng))]),
                score: rng.random::<f64>(),
                seconds: rng.random::<f64>() * 100.0,
            };
            let back: Trial = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
            assert_eq!(back, t);
        }
    }

    fn space() -> BTreeMap<String, Param> {
        let mut m = BTreeMap::new();
        m.insert(
            "train.lr".into(),
            Param::LogUniform {
                min: 1e-4,
                max: 1e-2,
            },
        );
        m.insert(
            "train.optimizer".into(),
            Param::Categorical {
                values: vec!["adamw".into(), "lion".into()],
            },
        );
        m.insert("train.batch_size".into(), Param::Int { min: 8, max: 32 });
        m
    }

    #[test]
    fn grid_covers_every_level() {
        let g = grid(&space());
        assert_eq!(g.len(), 3 * 2 * 3);
        assert!(g.iter().any(|p| p["train.lr"] == toml::Value::Float(1e-4)));
    }

    #[test]
    fn tpe_draws_near_the_good_trials() {
        // Trials score best near lr 1e-3 with lion.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut done = Vec::new();
        for i in 0..20 {
            let mut p: BTreeMap<String, toml::Value> = space()
                .iter()
                .map(|(k, v)| (k.clone(), draw(v, &mut rng)))
                .collect();
            if i % 2 == 0 {
                p.insert("train.optimizer".into(), "lion".into());
            }
            let lr = p["train.lr"].as_float().unwrap_or(1.0);
            let score = -(lr.log10() + 3.0).abs()
                + if p["train.optimizer"] == toml::Value::from("lion") {
                    0.5
                } else {
                    0.0
                };
            done.push((p, score));
        }
        let mut near = 0;
        let mut lion = 0;
        for _ in 0..20 {
            let c = tpe(&space(), &done, &mut rng);
            let lr = c["train.lr"].as_float().unwrap_or(1.0);
            near += usize::from((lr.log10() + 3.0).abs() < 0.5);
            lion += usize::from(c["train.optimizer"] == toml::Value::from("lion"));
        }
        assert!(near >= 12, "{near} of 20 near 1e-3");
        assert!(lion >= 12, "{lion} of 20 lion");
    }

    #[test]
    fn parameters_land_on_experiment_keys() {
        let base = "name = 'x'\n[data]\ndataset = 'd'\n[train]\nlr = 0.001\n";
        let mut p = BTreeMap::new();
        p.insert("train.lr".to_string(), toml::Value::Float(0.005));
        p.insert("model.dropout".to_string(), toml::Value::Float(0.2));
        let (exp, _) = experiment_with(base, &p, Path::new("x.toml")).unwrap();
        assert_eq!(exp.train.lr, 0.005);
        assert_eq!(exp.model.dropout, 0.2);
        p.insert("train.bogus".to_string(), toml::Value::Float(1.0));
        let e = experiment_with(base, &p, Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
