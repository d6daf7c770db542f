//! Pictures next to each model: the training curves and the confusion matrix, as PNG.

use std::path::Path;

use plotters::prelude::*;

use super::fit::EpochLog;
use crate::offline::metrics::Scores;
use crate::offline::plots::{PlotError, err};

/// Loss (train, validation) and accuracy (train, validation) against epoch.
pub fn training_curves(history: &[EpochLog], title: &str, path: &Path) -> Result<(), PlotError> {
    let root = BitMapBackend::new(path, (1100, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(550);
    let n = history.len().max(2) as f64;
    let max_loss = history
        .iter()
        .flat_map(|h| [Some(h.train_loss), h.val_loss])
        .flatten()
        .fold(0.1f64, f64::max)
        * 1.05;
    let series = |f: &dyn Fn(&EpochLog) -> Option<f64>| -> Vec<(f64, f64)> {
        history
            .iter()
            .filter_map(|h| f(h).map(|v| (h.epoch as f64, v)))
            .collect()
    };
    for (area, caption, ymax, train, val) in [
        (
            &left,
            format!("{title}: loss"),
            max_loss,
            series(&|h| Some(h.train_loss)),
            series(&|h| h.val_loss),
        ),
        (
            &right,
            format!("{title}: accuracy"),
            1.0,
            series(&|h| Some(h.train_accuracy)),
            series(&|h| h.val_accuracy),
        ),
    ] {
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(1f64..n, 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
            .map_err(err)?
            .label("train (augmented)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(2)));
        if !val.is_empty() {
            chart
                .draw_series(LineSeries::new(val, RED.stroke_width(2)))
                .map_err(err)?
                .label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// Each layer's mean gradient norm against epoch (log scale), one line per layer, from the
/// first block (darkest) to the classifier head (lightest).
pub fn gradient_norms(history: &[EpochLog], title: &str, path: &Path) -> Result<(), PlotError> {
    let layers: Vec<String> = history
        .first()
        .map(|h| h.grad_norms.iter().map(|g| g.layer.clone()).collect())
        .unwrap_or_default();
    let values = history
        .iter()
        .flat_map(|h| h.grad_norms.iter().map(|g| g.mean))
        .filter(|v| v.is_finite() && *v > 0.0);
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if layers.is_empty() || lo > hi {
        return Err(PlotError::NoData("no gradient norms were recorded"));
    }
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = history.len().max(2) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: gradient L2 norm per layer (mean over each epoch)"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .right_y_label_area_size(0)
        .build_cartesian_2d(1f64..n, (lo / 2.0..hi * 2.0).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("gradient norm")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0e}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    let count = layers.len().max(2) as f64;
    for (i, layer) in layers.iter().enumerate() {
        let shade = 0.15 + 0.7 * i as f64 / (count - 1.0);
        let colour = HSLColor(
            0.6 - 0.55 * i as f64 / (count - 1.0),
            0.8,
            shade * 0.6 + 0.15,
        );
        let points: Vec<(f64, f64)> = history
            .iter()
            .filter_map(|h| {
                h.grad_norms
                    .iter()
                    .find(|g| &g.layer == layer)
                    .filter(|g| g.mean.is_finite() && g.mean > 0.0)
                    .map(|g| (h.epoch as f64, g.mean))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(err)?
            .label(layer.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 11))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// The confusion matrix as a heat map, counts and row percentages in each cell.
pub fn confusion(scores: &Scores, title: &str, path: &Path) -> Result<(), PlotError> {
    let k = scores.classes.len();
    let cell = 110i32;
    let (left, top) = (150i32, 70i32);
    let w = (left + cell * k as i32 + 30) as u32;
    let h = (top + cell * k as i32 + 70) as u32;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let font = ("sans-serif", 16).into_font();
    let bold = ("sans-serif", 18).into_font();
    root.draw(&Text::new(
        format!(
            "{title}  (accuracy {:.1}%, n {})",
            scores.accuracy * 100.0,
            scores.n
        ),
        (10, 12),
        bold.clone(),
    ))
    .map_err(err)?;
    root.draw(&Text::new("predicted →", (left, top - 40), font.clone()))
        .map_err(err)?;
    root.draw(&Text::new("truth ↓", (10, top - 40), font.clone()))
        .map_err(err)?;
    for (t, row) in scores.confusion.iter().enumerate() {
        let support: usize = row.iter().sum();
        root.draw(&Text::new(
            scores.classes[t].clone(),
            (10, top + cell * t as i32 + cell / 2 - 8),
            font.clone(),
        ))
        .map_err(err)?;
        for (p, &v) in row.iter().enumerate() {
            let share = v as f64 / support.max(1) as f64;
            let shade = (255.0 * (1.0 - 0.8 * share)) as u8;
            let colour = RGBColor(shade, shade, 255);
            let x0 = left + cell * p as i32;
            let y0 = top + cell * t as i32;
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + cell, y0 + cell)],
                colour.filled(),
            ))
            .map_err(err)?;
            root.draw(&Rectangle::new(
                [(x0, y0), (x0 + cell, y0 + cell)],
                BLACK.stroke_width(1),
            ))
            .map_err(err)?;
            let ink = if share > 0.6 { WHITE } else { BLACK };
            root.draw(&Text::new(
                format!("{v}"),
                (x0 + cell / 2 - 12, y0 + cell / 2 - 18),
                bold.clone().color(&ink),
            ))
            .map_err(err)?;
            root.draw(&Text::new(
                format!("{:.0}%", share * 100.0),
                (x0 + cell / 2 - 14, y0 + cell / 2 + 6),
                font.clone().color(&ink),
            ))
            .map_err(err)?;
        }
    }
    for (p, c) in scores.classes.iter().enumerate() {
        root.draw(&Text::new(
            c.clone(),
            (left + cell * p as i32 + 6, top + cell * k as i32 + 10),
            font.clone(),
        ))
        .map_err(err)?;
    }
    root.present().map_err(err)
}

/// The learning-rate range test: loss against learning rate (log scale), with the suggestion.
pub fn lr_find(
    curve: &[(f64, f64)],
    suggested: Option<f64>,
    title: &str,
    path: &Path,
) -> Result<(), PlotError> {
    let root = BitMapBackend::new(path, (640, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (lo, hi) = curve.iter().fold((f64::MAX, f64::MIN), |(a, b), &(lr, _)| {
        (a.min(lr), b.max(lr))
    });
    let (lo, hi) = if lo < hi { (lo, hi) } else { (1e-6, 1.0) };
    let top = curve.iter().map(|c| c.1).fold(0.1f64, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title}: learning-rate range test"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("learning rate")
        .y_desc("training loss")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(curve.iter().copied(), BLUE.stroke_width(2)))
        .map_err(err)?;
    if let Some(s) = suggested {
        chart
            .draw_series(LineSeries::new([(s, 0.0), (s, top)], RED.stroke_width(2)))
            .map_err(err)?
            .label(format!("suggested {s:.1e}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)
}

/// One searched parameter's panel: trials as (value, score, promoted past the first rung);
/// log-uniform values on log10; a categorical one names its values (the x axis then indexes
/// them).
pub struct ScatterPanel {
    pub key: String,
    pub log: bool,
    pub points: Vec<(f64, f64, bool)>,
    pub names: Vec<String>,
}

/// Score against each searched parameter, one panel each.
pub fn tune_scatter(panels: &[ScatterPanel], title: &str, path: &Path) -> Result<(), PlotError> {
    let n = panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (340 * n, 340)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((1, n as usize));
    for (area, panel) in areas.iter().zip(panels) {
        let (key, log, pts, names) = (&panel.key, panel.log, &panel.points, &panel.names);
        let (lo, hi) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), q| (a.min(q.0), b.max(q.0)));
        let (lo, hi) = if lo < hi {
            (lo, hi)
        } else {
            (lo - 1.0, lo + 1.0)
        };
        let pad = (hi - lo) * 0.05;
        // The scores' own range (to the next 0.05), so close trials stay apart.
        let (s_lo, s_hi) = pts
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), q| (a.min(q.1), b.max(q.1)));
        let y_lo = ((s_lo - 0.02) * 20.0).floor().max(0.0) / 20.0;
        let y_hi = ((s_hi + 0.02) * 20.0).ceil().min(20.0) / 20.0;
        let (y_lo, y_hi) = if y_lo < y_hi {
            (y_lo, y_hi)
        } else {
            (0.0, 1.0)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{title}: {key}"), ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d((lo - pad)..(hi + pad), y_lo..y_hi)
            .map_err(err)?;
        let label = |v: &f64| -> String {
            if names.is_empty() {
                format!("{v:.2}")
            } else if (v - v.round()).abs() < 1e-6 && v.round() >= 0.0 {
                names.get(v.round() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .x_desc(if log {
                format!("log10 {key}")
            } else {
                key.clone()
            })
            .x_label_formatter(&label)
            .y_desc("inner accuracy")
            .draw()
            .map_err(err)?;
        chart
            .draw_series(pts.iter().map(|&(x, y, promoted)| {
                Circle::new(
                    (x, y),
                    4,
                    if promoted {
                        RED.filled()
                    } else {
                        BLUE.filled()
                    },
                )
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)
}
