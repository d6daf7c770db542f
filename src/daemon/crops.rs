//! The lab adaptation loop's first step: the upright crops the classifier saw, cut again from the
//! recorded frames, named by sample, frame and cell and ranked most uncertain first, so an
//! expert can sort them into class folders (the folders a lab's own training set is made of).
//!
//! A record keeps the head's place, not its pixels, so the frame is read again, heads are
//! found again the way the daemon found them, and the head whose centroid is the record's is
//! cut through the classifier's own `Preprocessor`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::core::imageio::{ImageError, load_rgb};
use crate::core::preprocess::Preprocessor;
use crate::daemon::publish::{Record, RecordKind};
use crate::daemon::report::{RecordsError, read_record_lines};
use crate::daemon::segment::{SegmentSettings, find_heads};

/// Which crops come first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Order {
    /// Lowest confidence first (unclassified cells last).
    Uncertainty,
    /// As recorded.
    Recorded,
}

/// Why the crops could not be cut.
#[derive(Debug, thiserror::Error)]
pub enum CropsError {
    #[error(transparent)]
    Records(#[from] RecordsError),
    #[error("frame {name} of the records is not in {dir}: {error}")]
    Frame {
        name: String,
        dir: PathBuf,
        error: ImageError,
    },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// What was cut.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cut {
    /// Crops written.
    pub written: usize,
    /// Records whose head was not found again in its frame (with the frame's name).
    pub not_found: Vec<String>,
}

/// The records to cut: the cell records when there are any (one crop per physical cell, at
/// its last view), else the detections.
fn chosen(records: Vec<Record>, order: Order) -> Vec<Record> {
    let has_cells = records.iter().any(|r| r.kind == RecordKind::Cell);
    let want = if has_cells {
        RecordKind::Cell
    } else {
        RecordKind::Detection
    };
    let mut out: Vec<Record> = records.into_iter().filter(|r| r.kind == want).collect();
    if order == Order::Uncertainty {
        out.sort_by(|a, b| {
            let key = |r: &Record| r.confidence.unwrap_or(f32::INFINITY);
            key(a).total_cmp(&key(b))
        });
    }
    out
}

/// A name safe on every file system.
fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Cut one crop per chosen record from the frames in `frames` into `out`, with `index.csv`
/// beside them (rank, file, sample, frame, cell, track, class, confidence).
pub fn cut(
    records_path: &Path,
    frames: &Path,
    out: &Path,
    order: Order,
    pre: &Preprocessor,
    segment: &SegmentSettings,
    um_per_px: f32,
) -> Result<Cut, CropsError> {
    let write_err = |path: &Path, source| CropsError::Write {
        path: path.to_path_buf(),
        error: source,
    };
    std::fs::create_dir_all(out).map_err(|e| write_err(out, e))?;
    let records = chosen(read_record_lines(records_path)?, order);
    // Each frame is read and segmented once.
    let mut heads: BTreeMap<String, (image::RgbImage, Vec<crate::core::pose::HeadRegion>)> =
        BTreeMap::new();
    let index_path = out.join("index.csv");
    let mut index = String::from("rank,file,sample,frame,cell,track,class,confidence\n");
    let mut cut = Cut::default();
    let size = pre.spec().crop.window_px.round().max(16.0) as u32;
    for r in &records {
        if !heads.contains_key(&r.frame.name) {
            let img =
                load_rgb(&frames.join(&r.frame.name)).map_err(|source| CropsError::Frame {
                    name: r.frame.name.clone(),
                    dir: frames.to_path_buf(),
                    error: source,
                })?;
            let found = find_heads(&img, segment)
                .into_iter()
                .map(|f| f.head)
                .collect();
            heads.insert(r.frame.name.clone(), (img, found));
        }
        let (img, found) = &heads[&r.frame.name];
        let near = found.iter().min_by(|a, b| {
            let d = |h: &crate::core::pose::HeadRegion| {
                (h.centroid.0 - r.centroid[0]).hypot(h.centroid.1 - r.centroid[1])
            };
            d(a).total_cmp(&d(b))
        });
        let Some(head) = near.filter(|h| {
            (h.centroid.0 - r.centroid[0]).hypot(h.centroid.1 - r.centroid[1]) <= h.major_px / 2.0
        }) else {
            cut.not_found
                .push(format!("{} cell {}", r.frame.name, r.cell));
            continue;
        };
        let rank = cut.written + 1;
        let stem = Path::new(&r.frame.name)
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let file = format!(
            "{rank:05}_{}_{}_c{}.png",
            safe(&r.sample),
            safe(&stem),
            r.cell
        );
        let path = out.join(&file);
        pre.head_window(img, head, Some(um_per_px), size)
            .save(&path)
            .map_err(|e| write_err(&path, std::io::Error::other(e)))?;
        let _ = writeln!(
            index,
            "{rank},{file},{},{},{},{},{},{}",
            r.sample,
            r.frame.name,
            r.cell,
            r.track.map_or(String::new(), |t| t.to_string()),
            r.class.as_deref().unwrap_or(""),
            r.confidence.map_or(String::new(), |c| format!("{c:.4}"))
        );
        cut.written += 1;
    }
    std::fs::write(&index_path, index).map_err(|e| write_err(&index_path, e))?;
    Ok(cut)
}
