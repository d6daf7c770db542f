//! Pictures for `spermscope-eval --plots` (feature `plots`): one-vs-rest ROC curves, the
//! reliability diagram, and occlusion saliency maps computed from the ONNX model itself.

use std::path::Path;

use image::{Rgb, RgbImage};
use plotters::prelude::*;

use crate::core::calibration::{Bin, RocPoint};
use crate::core::imageio::load_rgb;
use crate::core::model::{Model, ModelError, softmax};
use crate::offline::eval::Scored;

/// Why a picture could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("drawing failed: {0}")]
    Draw(String),
    #[error("nothing to draw: {0}")]
    NoData(&'static str),
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// A plotting backend's error, as a `PlotError` (the pictures' and the trainer's plots share it).
pub fn err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError::Draw(format!("{e:?}"))
}

const COLOURS: [RGBColor; 6] = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];

type Square<'a, 'b> = ChartContext<
    'a,
    BitMapBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A chart on the unit square with a caption and axis names.
fn unit_square<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: String,
    x_desc: &str,
    y_desc: &str,
) -> Result<Square<'a, 'b>, PlotError> {
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// One-vs-rest ROC curve per class, AUC in the legend.
pub fn roc(
    path: &Path,
    title: &str,
    curves: &[(String, Vec<RocPoint>, f64)],
) -> Result<(), PlotError> {
    let root = BitMapBackend::new(path, (560, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = unit_square(
        &root,
        format!("{title}: one-vs-rest ROC"),
        "false positive rate",
        "true positive rate",
    )?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))
        .map_err(err)?;
    for (i, (class, points, auc)) in curves.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.fpr, p.tpr)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(format!("{class} (AUC {auc:.3})"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Accuracy against confidence per bin (bars), the diagonal of perfect calibration, and how
/// many crops each bin holds.
pub fn reliability(path: &Path, title: &str, bins: &[Bin]) -> Result<(), PlotError> {
    let root = BitMapBackend::new(path, (560, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let total: usize = bins.iter().map(|b| b.n).sum();
    let ece: f64 = bins
        .iter()
        .map(|b| b.n as f64 / total.max(1) as f64 * (b.confidence - b.accuracy).abs())
        .sum();
    let mut chart = unit_square(
        &root,
        format!("{title}: reliability (ECE {ece:.3}, {total} crops)"),
        "confidence (top probability)",
        "accuracy",
    )?;
    chart
        .draw_series(bins.iter().filter(|b| b.n > 0).map(|b| {
            Rectangle::new(
                [(b.lo + 0.005, 0.0), (b.hi - 0.005, b.accuracy)],
                BLUE.mix(0.5).filled(),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (1.0, 1.0)],
            RED.stroke_width(2),
        ))
        .map_err(err)?;
    chart
        .draw_series(bins.iter().filter(|b| b.n > 0).map(|b| {
            Text::new(
                format!("{}", b.n),
                ((b.lo + b.hi) / 2.0 - 0.02, b.accuracy.min(0.93) + 0.03),
                ("sans-serif", 12),
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)
}

/// Occlusion saliency: how much the probability of class `k` drops when each 8x8 block of the
/// model's input window is blanked (set to the normalised mean). Written as the upright window
/// beside the same window with the drop overlaid in red, both enlarged four times.
pub fn saliency(
    path: &Path,
    model: &mut Model,
    crop: &RgbImage,
    k: usize,
) -> Result<(), PlotError> {
    let spec = model.spec.clone();
    let (base, window) = model.preprocessor().crop_window(crop);
    let size = spec.input.size_px as usize;
    let channels = spec.input.channels as usize;
    let block = 8usize;
    let grid = size.div_ceil(block);
    let mut variants = vec![base.clone()];
    for gy in 0..grid {
        for gx in 0..grid {
            let mut v = base.clone();
            for c in 0..channels {
                for y in gy * block..((gy + 1) * block).min(size) {
                    for x in gx * block..((gx + 1) * block).min(size) {
                        v.pixels[c * size * size + y * size + x] = 0.0;
                    }
                }
            }
            variants.push(v);
        }
    }
    let logits = model.logits(&variants)?;
    let p = |i: usize| {
        softmax(&logits[i], spec.temperature)
            .get(k)
            .copied()
            .unwrap_or(0.0)
    };
    let p0 = p(0);
    let drops: Vec<f32> = (1..logits.len()).map(|i| (p0 - p(i)).max(0.0)).collect();
    let peak = drops.iter().copied().fold(1e-6f32, f32::max);
    let scale = 4u32;
    let side = spec.input.size_px * scale;
    let mut out = RgbImage::from_pixel(side * 2 + 8, side, Rgb([255, 255, 255]));
    for y in 0..side {
        for x in 0..side {
            let px = window.get_pixel(x / scale, y / scale);
            out.put_pixel(x, y, *px);
            let (gx, gy) = ((x / scale) as usize / block, (y / scale) as usize / block);
            let a = drops[(gy * grid + gx).min(drops.len() - 1)] / peak;
            let mix = |v: u8, t: f32| (v as f32 * (1.0 - 0.6 * a) + t * 0.6 * a) as u8;
            out.put_pixel(
                side + 8 + x,
                y,
                Rgb([mix(px[0], 255.0), mix(px[1], 0.0), mix(px[2], 0.0)]),
            );
        }
    }
    out.save(path).map_err(err)
}

/// The evaluator's pictures in `dir`: ROC curves, the reliability diagram, and occlusion
/// saliency for a few correctly and a few wrongly classified crops.
pub fn evaluation(
    dir: &Path,
    model: &mut Model,
    curves: &[(String, Vec<RocPoint>, f64)],
    scored: &Scored,
    bins: &[Bin],
) -> Result<(), PlotError> {
    std::fs::create_dir_all(dir).map_err(|e| PlotError::Draw(format!("{}: {e}", dir.display())))?;
    let name = model.spec.name.clone();
    roc(&dir.join(format!("{name}.roc.png")), &name, curves)?;
    reliability(&dir.join(format!("{name}.reliability.png")), &name, bins)?;
    let pred = scored.predictions();
    let pick = |right: bool| -> Vec<usize> {
        (0..scored.truth.len())
            .filter(|&i| (pred[i] == scored.truth[i]) == right)
            .take(4)
            .collect()
    };
    for (tag, idx) in [("correct", pick(true)), ("wrong", pick(false))] {
        for (j, &i) in idx.iter().enumerate() {
            let img = load_rgb(&scored.paths[i]).map_err(|e| PlotError::Draw(e.to_string()))?;
            let out = dir.join(format!("{name}.saliency-{tag}-{j}.png"));
            saliency(&out, model, &img, scored.truth[i])?;
        }
    }
    Ok(())
}
