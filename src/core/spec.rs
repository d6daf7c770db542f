//! The model spec: every number preprocessing needs (input size, channels, normalisation, crop
//! window, classes, feature set), carried inside the ONNX file as metadata so training and
//! serving cannot drift apart.

use serde::{Deserialize, Serialize};

use crate::core::morphometry;
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
    push_field(&mut entry, 1, key.as_bytes());
    push_field(&mut entry, 2, value.as_bytes());
    push_field(onnx, 14, &entry);
}

/// An ONNX file with the metadata entry `key` set to `value`: earlier entries with that key are
/// removed from the model's top level, the new one is appended.
pub fn set_metadata(onnx: &[u8], key: &str, value: &str) -> Result<Vec<u8>, SpecError> {
    let mut out = Vec::with_capacity(onnx.len() + value.len() + 64);
    let mut i = 0;
    while i < onnx.len() {
        let start = i;
        let tag = read_varint(onnx, &mut i)?;
        let (field, wire) = (tag >> 3, tag & 7);
        let mut drop = false;
        match wire {
            0 => {
                read_varint(onnx, &mut i)?;
            }
            1 => i += 8,
            2 => {
                let len = read_varint(onnx, &mut i)?;
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|len| i.checked_add(len))
                    .filter(|&end| end <= onnx.len())
                    .ok_or(SpecError::Protobuf("field runs past the end"))?;
                drop = field == 14 && entry_key(&onnx[i..end]) == Some(key.as_bytes());
                i = end;
            }
            5 => i += 4,
            _ => return Err(SpecError::Protobuf("unsupported wire type")),
        }
        if i > onnx.len() {
            return Err(SpecError::Protobuf("field runs past the end"));
        }
        if !drop {
            out.extend_from_slice(&onnx[start..i]);
        }
    }
    embed_metadata(&mut out, key, value);
    Ok(out)
}

/// The key of a `StringStringEntryProto` (field 1).
fn entry_key(body: &[u8]) -> Option<&[u8]> {
    let mut i = 0;
    while i < body.len() {
        let tag = read_varint(body, &mut i).ok()?;
        if tag & 7 != 2 {
            return None;
        }
        let len = usize::try_from(read_varint(body, &mut i).ok()?).ok()?;
        let end = i.checked_add(len)?;
        let v = body.get(i..end)?;
        if tag >> 3 == 1 {
            return Some(v);
        }
        i = end;
    }
    None
}

fn read_varint(b: &[u8], i: &mut usize) -> Result<u64, SpecError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i).ok_or(SpecError::Protobuf("truncated varint"))?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(SpecError::Protobuf("varint too long"))
}

fn push_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    push_varint(out, (field << 3) | 2);
    push_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
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
        push_varint(&mut v, 300);
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
    }
}
