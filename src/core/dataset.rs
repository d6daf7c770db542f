//! Readers for the labelled crop datasets (class-per-folder and MHSMA's `labels.csv`) and the
//! split protocols that cross-validation uses; images are decoded by content, never by name.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::core::imageio::{ImageError, load_rgb};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{path}: no class folders with images found")]
    NoClasses { path: PathBuf },
    #[error("{path} line {line}: {reason}")]
    Csv {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("unknown MHSMA label '{0}' (expected head, acrosome, vacuole or tail)")]
    UnknownLabel(String),
}

/// One labelled image on disk.
#[derive(Debug, Clone)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
    /// Split name given by the dataset itself (MHSMA: train/valid/test), if any.
    pub split: Option<String>,
}

/// A labelled dataset: class names in label order and one entry per image.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub samples: Vec<Sample>,
}

impl Dataset {
    /// Keep at most `limit` samples, spread evenly over the dataset (its order kept).
    pub fn spread(&mut self, limit: usize) {
        if self.samples.len() <= limit {
            return;
        }
        let step = self.samples.len() as f64 / limit as f64;
        self.samples = (0..limit)
            .map(|i| self.samples[(i as f64 * step) as usize].clone())
            .collect();
    }
}

/// An image that could not be used, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "bmp", "jpg", "jpeg", "tif", "tiff"];

fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Class name from a folder name: a leading ordering prefix such as `01_` is dropped.
pub fn class_name(folder: &str) -> String {
    let trimmed = folder.trim_start_matches(|c: char| c.is_ascii_digit());
    match trimmed.strip_prefix('_') {
        Some(rest) if trimmed.len() < folder.len() && !rest.is_empty() => rest.to_string(),
        _ => folder.to_string(),
    }
}

fn read_dir_sorted(path: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let io = |source| DatasetError::Io {
        path: path.to_path_buf(),
        error: source,
    };
    let mut entries = fs::read_dir(path)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.sort();
    Ok(entries)
}

/// Read a dataset laid out as one folder per class (HuSHeM, SMIDS), or MHSMA when `labels.csv`
/// is present (then `mhsma_label` and `split` choose what to read).
pub fn open(root: &Path, mhsma_label: &str, split: Option<&str>) -> Result<Dataset, DatasetError> {
    if root.join("labels.csv").is_file() {
        read_mhsma(root, mhsma_label, split)
    } else {
        read_class_folders(root)
    }
}

/// One folder per class; class order is the folders' name order.
pub fn read_class_folders(root: &Path) -> Result<Dataset, DatasetError> {
    let mut classes = Vec::new();
    let mut samples = Vec::new();
    for dir in read_dir_sorted(root)? {
        if !dir.is_dir() {
            continue;
        }
        let files: Vec<PathBuf> = read_dir_sorted(&dir)?
            .into_iter()
            .filter(|p| p.is_file() && is_image_name(p))
            .collect();
        if files.is_empty() {
            continue;
        }
        let folder = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let label = classes.len();
        classes.push(class_name(folder));
        samples.extend(files.into_iter().map(|path| Sample {
            path,
            label,
            split: None,
        }));
    }
    if classes.is_empty() {
        return Err(DatasetError::NoClasses {
            path: root.to_path_buf(),
        });
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        classes,
        samples,
    })
}

/// MHSMA: `labels.csv` with `split,file,head,acrosome,vacuole,tail` (0 normal, 1 abnormal).
pub fn read_mhsma(root: &Path, label: &str, split: Option<&str>) -> Result<Dataset, DatasetError> {
    let path = root.join("labels.csv");
    let text = fs::read_to_string(&path).map_err(|source| DatasetError::Io {
        path: path.clone(),
        error: source,
    })?;
    let mut lines = text.lines().enumerate();
    let header: Vec<&str> = lines
        .next()
        .map(|(_, l)| l.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(split_col), Some(file_col)) = (col("split"), col("file")) else {
        return Err(DatasetError::Csv {
            path,
            line: 1,
            reason: "header must name 'split' and 'file'".into(),
        });
    };
    let label_col = col(label).ok_or_else(|| DatasetError::UnknownLabel(label.to_string()))?;
    let mut samples = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let bad = |reason: String| DatasetError::Csv {
            path: path.clone(),
            line: i + 1,
            reason,
        };
        let get = |c: usize| {
            fields
                .get(c)
                .copied()
                .ok_or_else(|| bad(format!("missing column {}", c + 1)))
        };
        let s = get(split_col)?;
        if split.is_some_and(|want| want != s) {
            continue;
        }
        let value = get(label_col)?;
        let label = match value {
            "0" => 0,
            "1" => 1,
            other => return Err(bad(format!("label '{other}' is not 0 or 1"))),
        };
        samples.push(Sample {
            path: root.join(get(file_col)?),
            label,
            split: Some(s.to_string()),
        });
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        classes: vec!["normal".into(), "abnormal".into()],
        samples,
    })
}

/// Decode every sample; unreadable ones are returned in `Skipped` (with path and reason).
pub fn load_all(ds: &Dataset) -> (Vec<(usize, RgbImage)>, Vec<Skipped>) {
    let mut ok = Vec::with_capacity(ds.samples.len());
    let mut skipped = Vec::new();
    for (i, s) in ds.samples.iter().enumerate() {
        match load_rgb(&s.path) {
            Ok(img) => ok.push((i, img)),
            Err(e) => {
                tracing::warn!(path = %s.path.display(), error = %e, "image skipped");
                skipped.push(Skipped {
                    path: s.path.clone(),
                    reason: e.to_string(),
                });
            }
        }
    }
    (ok, skipped)
}

/// Seeded stratified k-fold: each class is shuffled and dealt round-robin over the folds.
/// Returns the test fold (0..k) of each label.
pub fn stratified_folds(labels: &[usize], k: usize, seed: u64) -> Vec<usize> {
    let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut fold = vec![0; labels.len()];
    let mut offset = 0;
    for idx in by_class.values_mut() {
        idx.shuffle(&mut rng);
        for (j, &i) in idx.iter().enumerate() {
            fold[i] = (j + offset) % k.max(1);
        }
        // Start the next class where this one stopped, so fold sizes stay even.
        offset = (offset + idx.len()) % k.max(1);
    }
    fold
}

/// HuSHeM's `folds.csv` (`file,class,test_fold`, folds numbered from 1): test fold (0-based)
/// per sample, matched by the path relative to the dataset root.
pub fn folds_csv(ds: &Dataset, csv: &Path) -> Result<Vec<usize>, DatasetError> {
    let text = fs::read_to_string(csv).map_err(|source| DatasetError::Io {
        path: csv.to_path_buf(),
        error: source,
    })?;
    let mut map: HashMap<String, usize> = HashMap::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() < 3 {
            continue;
        }
        let fold: usize = f[2].parse().map_err(|_| DatasetError::Csv {
            path: csv.to_path_buf(),
            line: i + 1,
            reason: format!("test_fold '{}' is not a number", f[2]),
        })?;
        if fold == 0 {
            return Err(DatasetError::Csv {
                path: csv.to_path_buf(),
                line: i + 1,
                reason: "test_fold counts from 1".into(),
            });
        }
        map.insert(f[0].to_string(), fold - 1);
    }
    ds.samples
        .iter()
        .map(|s| {
            let rel = s
                .path
                .strip_prefix(&ds.root)
                .unwrap_or(&s.path)
                .to_string_lossy()
                .replace('\\', "/");
            map.get(&rel).copied().ok_or_else(|| DatasetError::Csv {
                path: csv.to_path_buf(),
                line: 0,
                reason: format!("no fold listed for {rel}"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_drop_ordering_prefix() {
        assert_eq!(class_name("01_normal"), "normal");
        assert_eq!(class_name("normal_sperm"), "normal_sperm");
        assert_eq!(class_name("non-sperm"), "non-sperm");
        assert_eq!(class_name("2024"), "2024");
    }

    #[test]
    fn stratified_folds_are_balanced_and_seeded() {
        let labels: Vec<usize> = (0..103).map(|i| i % 3).collect();
        let a = stratified_folds(&labels, 5, 7);
        let b = stratified_folds(&labels, 5, 7);
        let c = stratified_folds(&labels, 5, 8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        for f in 0..5 {
            let n = a.iter().filter(|&&x| x == f).count();
            assert!((20..=21).contains(&n), "fold {f} has {n}");
            for cls in 0..3 {
                let m = (0..103).filter(|&i| a[i] == f && labels[i] == cls).count();
                assert!((6..=7).contains(&m), "fold {f} class {cls} has {m}");
            }
        }
    }
}
