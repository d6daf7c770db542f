//! The only module that touches ONNX Runtime: finding the runtime library, loading models,
//! checking their metadata against their graph, choosing execution providers, running batches.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::{self, ExecutionProvider as _};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{Tensor, TensorElementType, ValueType};
use sha2::{Digest, Sha256};

use crate::core::preprocess::{Prepared, Preprocessor};
use crate::core::spec::{METADATA_KEY, ModelSpec, SpecError};

/// Where the project's setup script puts the runtime, relative to the project root.
pub const SETUP_DIR: &str = ".ort";
const SETUP_HINT: &str = "run `scripts/setup` in the spermscope folder (it fetches onnxruntime 1.31.1 from PyPI into .ort/), \
or set ORT_DYLIB_PATH to a libonnxruntime.so of version 1.31 or newer";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("onnx runtime library not found: {SETUP_HINT}")]
    RuntimeNotFound,
    #[error("onnx runtime library {path} could not be loaded: {reason}; {SETUP_HINT}")]
    RuntimeLoad { path: PathBuf, reason: String },
    #[error("model file {path} cannot be read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("model {path} is not a loadable onnx model: {reason}")]
    Session { path: PathBuf, reason: String },
    #[error(
        "model {path} has no spermscope metadata (key '{METADATA_KEY}'); export it with spermscope-train"
    )]
    NoMetadata { path: PathBuf },
    #[error("model {path} has invalid metadata: {error}")]
    BadSpec { path: PathBuf, error: SpecError },
    #[error("model {path} does not match its metadata: {reason}")]
    GraphMismatch { path: PathBuf, reason: String },
    #[error("execution provider '{provider}' could not be registered: {reason}")]
    Provider {
        provider: &'static str,
        reason: String,
    },
    #[error("inference failed: {0}")]
    Run(String),
}

/// Which execution provider runs the model.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    #[default]
    Cpu,
    /// CUDA; start-up fails if it cannot be registered.
    Cuda,
    /// CUDA when it registers, else CPU with a warning.
    Auto,
}

/// How to reach and drive ONNX Runtime.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    /// Runtime library named in the config (after `ORT_DYLIB_PATH`, before the setup folder).
    pub ort_dylib_path: Option<PathBuf>,
    pub provider: Provider,
    /// Intra-op threads (0: ONNX Runtime's default).
    pub threads: usize,
}

/// Find the runtime library: `ORT_DYLIB_PATH`, then the configured path, then the setup
/// folder next to the working directory, the executable or the source tree.
pub fn find_runtime(configured: Option<&Path>) -> Result<PathBuf, ModelError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = configured {
        return Ok(p.to_path_buf());
    }
    for root in install_roots() {
        let dir = root.join(SETUP_DIR);
        if let Some(lib) = runtime_in(&dir) {
            return Ok(lib);
        }
    }
    Err(ModelError::RuntimeNotFound)
}

/// Folders that may hold the project's files (`.ort/`, `models/`), nearest first: the working
/// directory and its parents, the executable's folders, then the source tree.
pub fn install_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    roots
}

fn runtime_in(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so.") || n == "libonnxruntime.so")
        })
        .collect();
    found.sort();
    found.pop()
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();
static ENV_LOCK: Mutex<()> = Mutex::new(());

/// The process-wide ONNX Runtime environment (ONNX Runtime allows one per process).
pub fn environment(opts: &RuntimeOptions) -> Result<Environment, ModelError> {
    let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let lib = find_runtime(opts.ort_dylib_path.as_deref())?;
    let made = ENVIRONMENT.get_or_init(|| {
        let builder = ort::init_from(&lib).map_err(|e| e.to_string())?;
        builder
            .with_name("spermscope")
            .with_telemetry(false)
            .build()
            .map_err(|e| e.to_string())
    });
    made.clone()
        .map_err(|reason| ModelError::RuntimeLoad { path: lib, reason })
}

/// Which model classified a cell: its name and the sha256 of its file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelId {
    pub name: String,
    pub sha256: String,
}

/// A loaded model: its session, its spec and its identity.
pub struct Model {
    session: Session,
    /// Shared with its `Preprocessor`; change it (`Arc::make_mut`) before taking one.
    pub spec: Arc<ModelSpec>,
    pub path: PathBuf,
    /// Hex sha256 of the ONNX file.
    pub sha256: String,
    /// The execution provider that actually runs it.
    pub provider: &'static str,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.spec.name)
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .field("provider", &self.provider)
            .finish()
    }
}

impl Model {
    /// Load an ONNX file, read and check its spec against the graph.
    pub fn load(path: &Path, opts: &RuntimeOptions) -> Result<Model, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::Read {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Model::from_bytes(&bytes, path, opts)
    }

    /// A model from ONNX bytes already read; `path` names it in errors and in the log.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        opts: &RuntimeOptions,
    ) -> Result<Model, ModelError> {
        let env = environment(opts)?;
        let sess_err = |reason: String| ModelError::Session {
            path: path.to_path_buf(),
            reason,
        };
        let (session, provider) = build_session(&env, bytes, opts).map_err(|e| match e {
            BuildError::Provider(p, reason) => ModelError::Provider {
                provider: p,
                reason,
            },
            BuildError::Ort(reason) => sess_err(reason),
        })?;
        let spec = read_spec(&session, path)?;
        check_graph(&session, &spec, path)?;
        let sha256 = format!("{:x}", Sha256::digest(bytes));
        Ok(Model {
            session,
            spec: Arc::new(spec),
            path: path.to_path_buf(),
            sha256,
            provider,
        })
    }

    /// Name and file hash.
    pub fn id(&self) -> ModelId {
        ModelId {
            name: self.spec.name.clone(),
            sha256: self.sha256.clone(),
        }
    }

    /// The crop → tensor path for this model's spec.
    pub fn preprocessor(&self) -> Preprocessor {
        Preprocessor::new(self.spec.clone())
    }

    /// Logits for a batch (one row per crop, `classes.len()` values each), fused over the
    /// spec's test-time views.
    pub fn logits(&mut self, batch: &[Prepared]) -> Result<Vec<Vec<f32>>, ModelError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let s = self.spec.input.size_px as usize;
        let c = self.spec.input.channels as usize;
        let per = c * s * s;
        let mut pixels = Vec::with_capacity(batch.len() * per);
        for p in batch {
            if p.pixels.len() != per {
                return Err(ModelError::Run(format!(
                    "a crop has {} values, the model takes {per}",
                    p.pixels.len()
                )));
            }
            pixels.extend_from_slice(&p.pixels);
        }
        let mut feats = Vec::new();
        if let Some(fs) = &self.spec.features {
            feats.reserve(batch.len() * fs.count);
            for p in batch {
                if p.features.len() != fs.count {
                    return Err(ModelError::Run(format!(
                        "a crop has {} features, the model takes {}",
                        p.features.len(),
                        fs.count
                    )));
                }
                feats.extend_from_slice(&p.features);
            }
        }
        let n_classes = self.spec.classes.len();
        let mut outputs = Vec::new();
        for view in self.preprocessor().views(pixels) {
            outputs.push(self.run_raw(view, feats.clone(), batch.len())?);
        }
        let flat = Preprocessor::fuse(outputs);
        if flat.len() != batch.len() * n_classes {
            return Err(ModelError::Run(format!(
                "model returned {} values for {} crops of {n_classes} classes",
                flat.len(),
                batch.len()
            )));
        }
        Ok(flat.chunks(n_classes).map(<[f32]>::to_vec).collect())
    }

    /// One pass of the graph over `n` crops; flat logits.
    fn run_raw(
        &mut self,
        pixels: Vec<f32>,
        feats: Vec<f32>,
        n: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let s = self.spec.input.size_px as usize;
        let c = self.spec.input.channels as usize;
        let run_err = |e: ort::Error| ModelError::Run(e.to_string());
        let image = Tensor::from_array(([n, c, s, s], pixels)).map_err(run_err)?;
        match &self.spec.features {
            Some(fs) => {
                let f = Tensor::from_array(([n, fs.count, 1, 1], feats)).map_err(run_err)?;
                let out = self.session.run(ort::inputs![image, f]).map_err(run_err)?;
                let (_, v) = out[0].try_extract_tensor::<f32>().map_err(run_err)?;
                Ok(v.to_vec())
            }
            None => {
                let out = self.session.run(ort::inputs![image]).map_err(run_err)?;
                let (_, v) = out[0].try_extract_tensor::<f32>().map_err(run_err)?;
                Ok(v.to_vec())
            }
        }
    }
}

enum BuildError {
    Provider(&'static str, String),
    Ort(String),
}

fn build_session(
    env: &Environment,
    bytes: &[u8],
    opts: &RuntimeOptions,
) -> Result<(Session, &'static str), BuildError> {
    let ort_err = |e: ort::Error| BuildError::Ort(e.to_string());
    let mut builder = Session::builder(env)
        .map_err(ort_err)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| BuildError::Ort(ort::Error::<()>::from(e).to_string()))?;
    if opts.threads > 0 {
        builder = builder
            .with_intra_threads(opts.threads)
            .map_err(|e| BuildError::Ort(ort::Error::<()>::from(e).to_string()))?;
    }
    let mut provider = "cpu";
    if opts.provider != Provider::Cpu {
        let cuda = ep::CUDA::default().build().error_on_failure();
        match builder.with_execution_providers([cuda]) {
            Ok(b) => {
                builder = b;
                provider = "cuda";
            }
            Err(e) => {
                let reason = e.message().to_string();
                if opts.provider == Provider::Cuda {
                    return Err(BuildError::Provider("cuda", reason));
                }
                let available = ep::CUDA::is_available().unwrap_or(false);
                tracing::warn!(%reason, cuda_in_runtime = available, "cuda execution provider unavailable, running on cpu");
                builder = e.recover();
            }
        }
    }
    let session = builder.commit_from_memory(bytes).map_err(ort_err)?;
    Ok((session, provider))
}

fn read_spec(session: &Session, path: &Path) -> Result<ModelSpec, ModelError> {
    let meta = session.metadata().map_err(|e| ModelError::Session {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let json = meta
        .custom(METADATA_KEY)
        .ok_or_else(|| ModelError::NoMetadata {
            path: path.to_path_buf(),
        })?;
    ModelSpec::from_json(&json).map_err(|source| ModelError::BadSpec {
        path: path.to_path_buf(),
        error: source,
    })
}

fn check_graph(session: &Session, spec: &ModelSpec, path: &Path) -> Result<(), ModelError> {
    let mismatch = |reason: String| ModelError::GraphMismatch {
        path: path.to_path_buf(),
        reason,
    };
    let dims = |v: &ValueType| -> Option<Vec<i64>> {
        match v {
            ValueType::Tensor { ty, shape, .. } if *ty == TensorElementType::Float32 => {
                Some(shape.to_vec())
            }
            _ => None,
        }
    };
    let want_inputs = if spec.features.is_some() { 2 } else { 1 };
    if session.inputs().len() != want_inputs {
        return Err(mismatch(format!(
            "graph has {} inputs, metadata implies {want_inputs}",
            session.inputs().len()
        )));
    }
    let s = spec.input.size_px as i64;
    let c = spec.input.channels as i64;
    let img = dims(session.inputs()[0].dtype())
        .ok_or_else(|| mismatch("input 0 is not a float32 tensor".into()))?;
    if img.len() != 4 || img[1] != c || img[2] != s || img[3] != s {
        return Err(mismatch(format!(
            "input 0 has shape {img:?}, metadata says [batch, {c}, {s}, {s}]"
        )));
    }
    if let Some(f) = &spec.features {
        let fd = dims(session.inputs()[1].dtype())
            .ok_or_else(|| mismatch("input 1 is not a float32 tensor".into()))?;
        if fd.len() != 4 || fd[1] != f.count as i64 || fd[2] != 1 || fd[3] != 1 {
            return Err(mismatch(format!(
                "input 1 has shape {fd:?}, metadata says [batch, {}, 1, 1]",
                f.count
            )));
        }
    }
    let out = session
        .outputs()
        .first()
        .and_then(|o| dims(o.dtype()))
        .ok_or_else(|| mismatch("output 0 is not a float32 tensor".into()))?;
    let k = spec.classes.len() as i64;
    // Logits are [batch, classes], or [batch, classes, 1, 1] from a 1x1-convolution head.
    let trailing_ones = out.iter().skip(2).all(|&d| d == 1);
    if out.len() < 2 || out[1] != k || !trailing_ones {
        return Err(mismatch(format!(
            "output 0 has shape {out:?}, metadata names {k} classes"
        )));
    }
    Ok(())
}

/// Softmax with temperature, numerically stable.
pub fn softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let t = if temperature > 0.0 { temperature } else { 1.0 };
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|l| ((l - m) / t).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_respects_temperature() {
        let p = softmax(&[1.0, 2.0, 3.0], 1.0);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[2] > p[1] && p[1] > p[0]);
        let hot = softmax(&[1.0, 2.0, 3.0], 10.0);
        assert!(hot[2] < p[2]);
        let big = softmax(&[1000.0, 0.0], 1.0);
        assert!((big[0] - 1.0).abs() < 1e-6);
    }
}
