//! The model spec: every number preprocessing needs (input size, channels, normalisation, crop
//! window, classes, feature set), carried inside the ONNX file as metadata so training and
//! serving cannot drift apart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::morphometry;
use crate::core::onnx_proto::{self, Field, Value, Weight, push_bytes};
use crate::core::pose::Contrast;

/// Metadata key under which the spec is stored (ONNX `metadata_props`).
pub const METADATA_KEY: &str = "spermscope.spec";
/// Version of the spec format this build reads and writes.
pub const SPEC_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    #[error("spec format {found} is not supported (this build reads format {SPEC_FORMAT})")]
    Format { found: u32 },
    #[error("spec field '{field}' is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("spec is not valid JSON: {0}")]
    Json(String),
    #[error("onnx file is not a well-formed protobuf: {0}")]
    Protobuf(&'static str),
}

/// How a crop is turned into the window the network sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoseMode {
    /// Find the head, rotate it upright (tail down) and centre the window on it.
    Upright,
    /// Keep the crop's orientation and centre (crops that are already centred, e.g. MHSMA).
    Centre,
    /// Centre the window on the head found in the crop, keeping its orientation.
    Head,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Side of the square input in pixels.
    pub size_px: u32,
    /// 3 (RGB) or 1 (luminance).
    pub channels: u32,
    /// Per-channel mean subtracted from pixel values scaled to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation pixel values are divided by.
    pub std: Vec<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropSpec {
    pub pose: PoseMode,
    pub contrast: Contrast,
    /// Side of the window cut around the head, in pixels of the training images.
    pub window_px: f32,
    /// Pixel scale of the training images in µm/px, when known; the daemon scales the window
    /// by it so the head appears at the size the model learned.
    pub um_per_px: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Name of the feature set (`morphometry::FEATURE_SET`).
    pub set: String,
    /// Number of features in the second input.
    pub count: usize,
    /// Standardisation applied before the features enter the network.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Everything a reader needs to feed a model and read its output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub format: u32,
    /// Short model name, e.g. `smids-3class`.
    pub name: String,
    /// Class names in output order.
    pub classes: Vec<String>,
    /// The class that counts as a normal form in reports, if the model has one.
    pub normal_class: Option<String>,
    pub input: InputSpec,
    pub crop: CropSpec,
    /// Morphometric features given as a second input, if the model takes them.
    pub features: Option<FeatureSpec>,
    /// Softmax temperature (1 when not calibrated).
    pub temperature: f32,
    /// Test-time fusion: average the logits of the window and of its left-right mirror image.
    #[serde(default)]
    pub test_time_mirror: bool,
}

impl ModelSpec {
    /// Check internal consistency (no I/O).
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |field: &'static str, reason: String| Err(SpecError::Invalid { field, reason });
        if self.format != SPEC_FORMAT {
            return Err(SpecError::Format { found: self.format });
        }
        if self.classes.len() < 2 {
            return bad(
                "classes",
                format!("needs at least 2, has {}", self.classes.len()),
            );
        }
        if let Some(n) = &self.normal_class
            && !self.classes.contains(n)
        {
            return bad("normal_class", format!("'{n}' is not one of the classes"));
        }
        let i = &self.input;
        if !(8..=1024).contains(&i.size_px) {
            return bad(
                "input.size_px",
                format!("{} is outside 8..=1024", i.size_px),
            );
        }
        if i.channels != 1 && i.channels != 3 {
            return bad("input.channels", format!("{} is not 1 or 3", i.channels));
        }
        if i.mean.len() != i.channels as usize || i.std.len() != i.channels as usize {
            return bad(
                "input.mean",
                "mean and std need one value per channel".into(),
            );
        }
        if i.std.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
            return bad("input.std", "every value must be positive".into());
        }
        if !(self.crop.window_px > 1.0 && self.crop.window_px.is_finite()) {
            return bad(
                "crop.window_px",
                format!("{} is not a positive size", self.crop.window_px),
            );
        }
        if let Some(u) = self.crop.um_per_px
            && !(u > 0.0 && u.is_finite())
        {
            return bad("crop.um_per_px", format!("{u} is not a positive scale"));
        }
        if let Some(f) = &self.features {
            if f.set != morphometry::FEATURE_SET {
                return bad(
                    "features.set",
                    format!(
                        "'{}' is unknown (this build computes '{}')",
                        f.set,
                        morphometry::FEATURE_SET
                    ),
                );
            }
            if f.count != FEATURES_WITH_FLAG || f.mean.len() != f.count || f.std.len() != f.count {
                return bad(
                    "features.count",
                    format!(
                        "expected {FEATURES_WITH_FLAG} values with matching mean/std, found {}",
                        f.count
                    ),
                );
            }
            if f.std.iter().any(|s| !(*s > 0.0 && s.is_finite())) {
                return bad("features.std", "every value must be positive".into());
            }
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                format!("{} is not positive", self.temperature),
            );
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<Self, SpecError> {
        let spec: ModelSpec =
            serde_json::from_str(s).map_err(|e| SpecError::Json(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }
}

/// Features the network takes: a "head found" flag, then `morphometry::shape_features`.
pub const FEATURES_WITH_FLAG: usize = morphometry::FEATURE_COUNT + 1;

/// Append `key = value` to an ONNX model's `metadata_props` (ModelProto field 14). Appending a
/// field to a serialized protobuf message is how protobuf merges messages, so the rest of the
/// file is left byte for byte as it was.
pub fn embed_metadata(onnx: &mut Vec<u8>, key: &str, value: &str) {
    let mut entry = Vec::new();
    push_bytes(&mut entry, 1, key.as_bytes());
    push_bytes(&mut entry, 2, value.as_bytes());
    push_bytes(onnx, 14, &entry);
}

/// An ONNX file with the metadata entry `key` set to `value`: earlier entries with that key are
/// removed from the model's top level, the new one is appended.
pub fn set_metadata(onnx: &[u8], key: &str, value: &str) -> Result<Vec<u8>, SpecError> {
    let mut out = Vec::with_capacity(onnx.len() + value.len() + 64);
    for f in onnx_proto::fields(onnx) {
        let f = f.map_err(|e| SpecError::Protobuf(e.as_str()))?;
        let drop = matches!(f.value, Value::Bytes(body)
            if f.number == 14 && entry_field(body, 1) == Some(key.as_bytes()));
        if !drop {
            out.extend_from_slice(&onnx[f.start..f.end]);
        }
    }
    embed_metadata(&mut out, key, value);
    Ok(out)
}

/// The value of the last metadata entry `key` of an ONNX file, read without ONNX Runtime.
pub fn read_metadata(onnx: &[u8], key: &str) -> Result<Option<String>, SpecError> {
    let mut found = None;
    for f in onnx_proto::fields(onnx) {
        let f = f.map_err(|e| SpecError::Protobuf(e.as_str()))?;
        if let (14, Value::Bytes(body)) = (f.number, f.value)
            && entry_field(body, 1) == Some(key.as_bytes())
        {
            found = entry_field(body, 2).map(|v| String::from_utf8_lossy(v).into_owned());
        }
    }
    Ok(found)
}

/// Field `number` (1: key, 2: value) of a `StringStringEntryProto`.
fn entry_field(body: &[u8], number: u64) -> Option<&[u8]> {
    onnx_proto::fields(body).find_map(|f| match f {
        Ok(Field {
            number: n,
            value: Value::Bytes(v),
            ..
        }) if n == number => Some(v),
        _ => None,
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {error}")]
    Spec { path: PathBuf, error: SpecError },
    #[error(
        "{path} has no spermscope spec (key '{METADATA_KEY}'): it was not exported by spermscope-train"
    )]
    NoSpec { path: PathBuf },
    #[error("{path}: {error}")]
    Weight {
        path: PathBuf,
        error: onnx_proto::WeightError,
    },
}

/// A constant of the exported graph rather than a parameter: a single value under a node
/// name (the bounds of an EfficientNet-Lite's ReLU6 are exported as `node_N_scalar`), where
/// every parameter is named by its module path (`head.weight`).
fn is_graph_constant(name: &str, w: &onnx_proto::Weight) -> bool {
    !name.contains('.') && w.values.len() <= 1
}

/// A model file read without ONNX Runtime: its spec and its weights (what fine-tuning starts
/// from).
#[derive(Clone)]
pub struct ModelFile {
    pub path: PathBuf,
    pub spec: ModelSpec,
    /// Every float parameter of the graph, by name (the trainer's parameter paths); the graph's
    /// own constants are left out.
    pub weights: BTreeMap<String, Weight>,
    /// FNV-1a of the file's bytes: a run's fingerprint names the weights by it.
    digest: u64,
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ModelFile({}, {} weights, {:016x})",
            self.path.display(),
            self.weights.len(),
            self.digest
        )
    }
}

impl ModelFile {
    pub fn read(path: &Path) -> Result<ModelFile, ModelFileError> {
        let bytes = std::fs::read(path).map_err(|error| ModelFileError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let spec_err = |error| ModelFileError::Spec {
            path: path.to_path_buf(),
            error,
        };
        let json = read_metadata(&bytes, METADATA_KEY)
            .map_err(spec_err)?
            .ok_or_else(|| ModelFileError::NoSpec {
                path: path.to_path_buf(),
            })?;
        let spec = ModelSpec::from_json(&json).map_err(spec_err)?;
        let mut weights =
            onnx_proto::float_initializers(&bytes).map_err(|error| ModelFileError::Weight {
                path: path.to_path_buf(),
                error,
            })?;
        weights.retain(|name, w| !is_graph_constant(name, w));
        let digest = bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
            (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
        });
        Ok(ModelFile {
            path: path.to_path_buf(),
            spec,
            weights,
            digest,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn example() -> ModelSpec {
        ModelSpec {
            format: SPEC_FORMAT,
            name: "test".into(),
            classes: vec!["normal".into(), "abnormal".into()],
            normal_class: Some("normal".into()),
            input: InputSpec {
                size_px: 32,
                channels: 3,
                mean: vec![0.5; 3],
                std: vec![0.25; 3],
            },
            crop: CropSpec {
                pose: PoseMode::Upright,
                contrast: Contrast::Dark,
                window_px: 64.0,
                um_per_px: None,
            },
            features: None,
            temperature: 1.0,
            test_time_mirror: false,
        }
    }

    #[test]
    fn json_round_trip_and_refusals() {
        let s = example();
        assert_eq!(ModelSpec::from_json(&s.to_json()).expect("round trip"), s);
        let mut b = s.clone();
        b.input.channels = 2;
        assert!(matches!(
            b.validate(),
            Err(SpecError::Invalid {
                field: "input.channels",
                ..
            })
        ));
        let mut b = s.clone();
        b.normal_class = Some("nope".into());
        assert!(matches!(
            b.validate(),
            Err(SpecError::Invalid {
                field: "normal_class",
                ..
            })
        ));
        let mut b = s.clone();
        b.format = 9;
        assert_eq!(b.validate(), Err(SpecError::Format { found: 9 }));
        assert!(matches!(
            ModelSpec::from_json("{\"format\":1}"),
            Err(SpecError::Json(_))
        ));
    }

    #[test]
    fn varint_encoding() {
        let mut v = Vec::new();
        onnx_proto::push_varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
        let mut m = Vec::new();
        embed_metadata(&mut m, "k", "v");
        assert_eq!(m, [0x72, 6, 0x0A, 1, b'k', 0x12, 1, b'v']);
    }

    #[test]
    fn set_metadata_replaces_only_its_key() {
        // ir_version 8, one entry k=v, one entry other=x.
        let mut m = vec![0x08, 8];
        embed_metadata(&mut m, "k", "v");
        embed_metadata(&mut m, "other", "x");
        let out = set_metadata(&m, "k", "new").unwrap();
        let mut want = vec![0x08, 8];
        embed_metadata(&mut want, "other", "x");
        embed_metadata(&mut want, "k", "new");
        assert_eq!(out, want);
        assert!(set_metadata(&[0x72, 50, 1], "k", "v").is_err());
        assert_eq!(read_metadata(&out, "k").unwrap().as_deref(), Some("new"));
        assert_eq!(read_metadata(&out, "other").unwrap().as_deref(), Some("x"));
        assert_eq!(read_metadata(&out, "none").unwrap(), None);
    }
}
