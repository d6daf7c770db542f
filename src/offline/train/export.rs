//! ONNX export of a trained network with a dynamic batch axis (logits out), its spec embedded
//! as metadata.

use std::path::Path;

use burn::prelude::*;
use burn_onnx::export::{AxisSpec, InputSpec as AxisInputs, OnnxExporter};

use super::net::Net;
use crate::core::spec::{METADATA_KEY, ModelSpec, embed_metadata};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("onnx export failed: {0}")]
    Export(String),
    #[error("cannot write {path}: {error}")]
    Write {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// Serialise the model to ONNX bytes with the spec embedded. The exporter leaves the module
/// unusable, so this takes it by value: call it last.
pub fn to_onnx(model: Net, spec: &ModelSpec) -> Result<Vec<u8>, ExportError> {
    let mut bytes = graph_only(model, spec)?;
    embed_metadata(&mut bytes, METADATA_KEY, &spec.to_json());
    Ok(bytes)
}

/// The ONNX graph alone, without the spec (readers refuse such a file; tests use it).
pub fn graph_only(model: Net, spec: &ModelSpec) -> Result<Vec<u8>, ExportError> {
    // burn-onnx cannot export `Clamp`: the backbone's ReLU6 is built from Relu for the graph.
    let model = model.exportable();
    let dev = Device::flex();
    let s = spec.input.size_px as usize;
    let c = spec.input.channels as usize;
    let image_axes = AxisInputs::new([
        AxisSpec::dynamic("batch"),
        AxisSpec::Static,
        AxisSpec::Static,
        AxisSpec::Static,
    ]);
    let exporter = OnnxExporter::new();
    let onnx = match &spec.features {
        Some(f) => {
            let sample = (
                Tensor::<4>::zeros([2, c, s, s], &dev),
                Tensor::<4>::zeros([2, f.count, 1, 1], &dev),
            );
            let validation = (
                Tensor::<4>::zeros([3, c, s, s], &dev),
                Tensor::<4>::zeros([3, f.count, 1, 1], &dev),
            );
            let axes = [
                image_axes,
                AxisInputs::new([
                    AxisSpec::dynamic("batch"),
                    AxisSpec::Static,
                    AxisSpec::Static,
                    AxisSpec::Static,
                ]),
            ];
            exporter.export_dynamic(&model, sample, validation, &axes, |m: &Net, (x, f)| {
                m.forward_fused(x, f)
            })
        }
        None => {
            let sample = Tensor::<4>::zeros([2, c, s, s], &dev);
            let validation = Tensor::<4>::zeros([3, c, s, s], &dev);
            exporter.export_dynamic(&model, sample, validation, &[image_axes], |m: &Net, x| {
                m.forward_image(x)
            })
        }
    }
    .map_err(|e| ExportError::Export(e.to_string()))?;
    Ok(onnx.into_bytes())
}

pub fn save(bytes: &[u8], path: &Path) -> Result<(), ExportError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ExportError::Write {
            path: dir.to_path_buf(),
            error: source,
        })?;
    }
    std::fs::write(path, bytes).map_err(|source| ExportError::Write {
        path: path.to_path_buf(),
        error: source,
    })
}
