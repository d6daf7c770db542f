//! Per-epoch checkpoints of a training run (weights, optimiser state, the best weights so far,
//! and the loop's own state as JSON), written so that a run killed at any moment continues
//! from its last complete epoch; and the record of a finished cross-validation fold.
//!
//! Layout: `OUT/NAME.checkpoints/experiment.txt` (the fingerprint of the experiment that wrote
//! them), and one folder per fit (`s1-f3`, `final`) holding `epoch-NNNN/` folders and a
//! `latest` file naming the newest complete one. An epoch folder is written in full before
//! `latest` is replaced (atomically, by a rename), and older epoch folders are removed after.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::net::Net;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error(
        "{0} holds the checkpoints of an earlier run: add --resume to continue it, or remove the folder to start again"
    )]
    Exists(PathBuf),
    #[error(
        "{0} was written by a different experiment (config, limit, protocol, seeds or epochs changed): remove it, or use another --out"
    )]
    Foreign(PathBuf),
}

fn io(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// The checkpoints of one run of the trainer.
pub struct Checkpoints {
    root: PathBuf,
    /// Stop (as if killed) once this process has trained this many epochs: tests of resume.
    stop_after: Option<usize>,
    trained: Cell<usize>,
}

impl Checkpoints {
    /// Opens `root` for an experiment with this fingerprint: refuses a folder left by an
    /// earlier run unless `resume`, and one written by another experiment.
    pub fn open(
        root: PathBuf,
        fingerprint: &str,
        resume: bool,
        stop_after: Option<usize>,
    ) -> Result<Self, CheckpointError> {
        let stamp = root.join("experiment.txt");
        let digest = hex(&Sha256::digest(fingerprint.as_bytes()));
        if root.exists() {
            if !resume {
                return Err(CheckpointError::Exists(root));
            }
            let found = std::fs::read_to_string(&stamp).map_err(|e| io(&stamp, e))?;
            if found.trim() != digest {
                return Err(CheckpointError::Foreign(root));
            }
        } else {
            if resume {
                tracing::warn!(path = %root.display(), "--resume: no checkpoints yet, starting afresh");
            }
            std::fs::create_dir_all(&root).map_err(|e| io(&root, e))?;
            std::fs::write(&stamp, format!("{digest}\n")).map_err(|e| io(&stamp, e))?;
        }
        Ok(Self {
            root,
            stop_after,
            trained: Cell::new(0),
        })
    }

    /// The folder of one fit (`s1-f3`, `final`).
    pub fn run_dir(&self, run: &str) -> PathBuf {
        self.root.join(run)
    }

    /// Counts an epoch trained by this process; `true` when the run must stop here.
    pub fn count_epoch(&self) -> bool {
        let n = self.trained.get() + 1;
        self.trained.set(n);
        self.stop_after.is_some_and(|s| n >= s)
    }

    /// The record of a finished fit, if one was written.
    pub fn done<T: DeserializeOwned>(&self, run: &str) -> Result<Option<T>, CheckpointError> {
        let p = self.run_dir(run).join("done.json");
        if !p.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
        serde_json::from_str(&text).map(Some).map_err(|e| io(&p, e))
    }

    /// Records a finished fit and removes its epoch folders.
    pub fn finish<T: Serialize>(&self, run: &str, record: &T) -> Result<(), CheckpointError> {
        let dir = self.run_dir(run);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        let text = serde_json::to_string(record).map_err(|e| io(&dir, e))?;
        write_atomic(&dir.join("done.json"), text.as_bytes())?;
        let latest = dir.join("latest");
        if latest.exists() {
            std::fs::remove_file(&latest).map_err(|e| io(&latest, e))?;
        }
        remove_epochs(&dir, None)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

/// Removes the epoch folders of `dir` except `keep`.
fn remove_epochs(dir: &Path, keep: Option<&str>) -> Result<(), CheckpointError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("epoch-") && Some(name.as_str()) != keep {
            std::fs::remove_dir_all(e.path()).map_err(|err| io(&e.path(), err))?;
        }
    }
    Ok(())
}

/// What an epoch checkpoint holds.
pub struct Saved {
    pub model: Net,
    pub optim: ModuleOptimizer,
    /// The weights with the lowest validation loss so far (validation mode), if any.
    pub best: Option<Net>,
    /// The training loop's own state, as JSON.
    pub state: String,
}

/// The loop state of a checkpoint (`Default` for a fit that starts afresh).
pub fn parse_state<S: DeserializeOwned + Default>(
    text: &str,
    dir: &Path,
) -> Result<S, CheckpointError> {
    if text.is_empty() {
        return Ok(S::default());
    }
    serde_json::from_str(text).map_err(|e| io(&dir.join("latest"), e))
}

/// Whether `dir` holds a complete epoch checkpoint.
pub fn exists(dir: &Path) -> bool {
    dir.join("latest").is_file()
}

/// Writes the state after `epoch` (1-based) epochs into `dir`.
pub fn save<S: Serialize>(
    dir: &Path,
    epoch: usize,
    model: &Net,
    optim: &ModuleOptimizer,
    best: Option<&Net>,
    state: &S,
) -> Result<(), CheckpointError> {
    let name = format!("epoch-{epoch:04}");
    let at = dir.join(&name);
    if at.exists() {
        std::fs::remove_dir_all(&at).map_err(|e| io(&at, e))?;
    }
    std::fs::create_dir_all(&at).map_err(|e| io(&at, e))?;
    let p = at.join("model.bpk");
    // `valid()` first folds the batch norms' pending running-statistics update into their
    // value (a record reads the value without it), without changing what training sees next.
    model.valid().save_file(&p).map_err(|e| io(&p, e))?;
    let p = at.join("optim.bpk");
    optim.save(&p).map_err(|e| io(&p, e))?;
    if let Some(b) = best {
        let p = at.join("best.bpk");
        b.clone().save_file(&p).map_err(|e| io(&p, e))?;
    }
    let p = at.join("state.json");
    let text = serde_json::to_string(state).map_err(|e| io(&p, e))?;
    std::fs::write(&p, text).map_err(|e| io(&p, e))?;
    write_atomic(&dir.join("latest"), name.as_bytes())?;
    remove_epochs(dir, Some(&name))
}

/// The newest complete checkpoint in `dir`, loaded into `fresh` (a network of the same
/// configuration on the training device), `optim` and a copy of `fresh` for the best weights.
pub fn load(dir: &Path, fresh: Net, optim: ModuleOptimizer) -> Result<Saved, CheckpointError> {
    let latest = dir.join("latest");
    let name = std::fs::read_to_string(&latest).map_err(|e| io(&latest, e))?;
    let at = dir.join(name.trim());
    let p = at.join("state.json");
    let state = std::fs::read_to_string(&p).map_err(|e| io(&p, e))?;
    // The best weights go into a copy first; `valid()` gives that copy its own running
    // statistics before the current weights are loaded into `fresh`.
    let best_path = at.join("best.bpk");
    let best = if best_path.is_file() {
        let b = fresh
            .clone()
            .try_load_file(&best_path)
            .map_err(|e| io(&best_path, e))?;
        Some(b.valid())
    } else {
        None
    };
    let p = at.join("model.bpk");
    let model = fresh.try_load_file(&p).map_err(|e| io(&p, e))?;
    let p = at.join("optim.bpk");
    let optim = optim.load(&p).map_err(|e| io(&p, e))?;
    Ok(Saved {
        model,
        optim,
        best,
        state,
    })
}

#[cfg(test)]
mod tests {
    use burn::nn::loss::CrossEntropyLossConfig;
    use burn::optim::{AdamWConfig, GradientsParams};
    use burn::prelude::*;

    use super::*;
    use crate::offline::train::config::{Backbone, NetConfig};

    fn net(device: &Device, backbone: Backbone) -> Net {
        let cfg = NetConfig {
            backbone,
            dropout: 0.0,
            ..NetConfig::default()
        };
        Net::new(device, &cfg, 3, 4, 2)
    }

    fn step(model: Net, optim: &mut ModuleOptimizer, device: &Device) -> Net {
        let x = Tensor::<4>::from_data(
            TensorData::new(
                (0..2 * 3 * 32 * 32)
                    .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                    .collect::<Vec<f32>>(),
                [2, 3, 32, 32],
            ),
            device,
        );
        let f = Tensor::<4>::ones([2, 4, 1, 1], device);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1], [2]), device);
        let loss = CrossEntropyLossConfig::new()
            .init(device)
            .forward(model.forward(x, Some(f)), y);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        optim.step(1e-3, model, grads)
    }

    fn logits(model: &Net) -> Vec<f32> {
        let device = Device::flex();
        let x = Tensor::<4>::ones([1, 3, 32, 32], &device);
        let f = Tensor::<4>::ones([1, 4, 1, 1], &device);
        model
            .valid()
            .forward(x, Some(f))
            .into_data()
            .iter::<f32>()
            .collect()
    }

    #[test]
    fn a_reloaded_checkpoint_continues_exactly() {
        for backbone in [Backbone::SmallCnn, Backbone::EfficientnetLite0] {
            let device = Device::flex().autodiff();
            device.seed(2);
            let dir = tempfile::tempdir().expect("tempdir");
            let mut optim = AdamWConfig::new().init();
            let mut model = net(&device, backbone);
            model = step(model, &mut optim, &device);
            save(dir.path(), 1, &model, &optim, None, &0u8).expect("save");
            let saved = load(
                dir.path(),
                net(&device, backbone),
                AdamWConfig::new().init(),
            )
            .expect("load");
            assert_eq!(logits(&saved.model), logits(&model), "{backbone:?}");
            let (mut o2, m2) = (saved.optim, saved.model);
            let continued = step(model, &mut optim, &device);
            let resumed = step(m2, &mut o2, &device);
            assert_eq!(logits(&continued), logits(&resumed), "{backbone:?}");
        }
    }
}
