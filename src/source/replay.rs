//! Replay of recorded frames: a folder or glob in name order, decoded by content, paced to a
//! frame rate or as fast as the pipeline takes them, optionally looped or preloaded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::dataset::decode_rgb;
use crate::source::{FrameSource, Pull, SourceError};

/// Frames from files.
pub struct Replay {
    root: String,
    files: Vec<PathBuf>,
    /// Decoded frames when preloaded (undecodable ones keep their reason).
    preloaded: Option<Vec<Result<Arc<image::RgbImage>, String>>>,
    next: usize,
    repeat: bool,
    period: Option<Duration>,
    due: Option<Instant>,
}

/// Files a replay path names: every regular file of a folder, or a glob's matches, by name.
pub fn list(path: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let text = path.to_string_lossy();
    let mut files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map_err(|e| SourceError::Read {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .filter(|p| {
                !p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.'))
            })
            .collect()
    } else if text.contains(['*', '?', '[']) {
        glob::glob(&text)
            .map_err(|e| SourceError::Pattern {
                pattern: text.to_string(),
                reason: e.to_string(),
            })?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect()
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        return Err(SourceError::Read {
            path: path.to_path_buf(),
            reason: "no such file or folder".into(),
        });
    };
    files.sort();
    if files.is_empty() {
        return Err(SourceError::Empty(path.to_path_buf()));
    }
    Ok(files)
}

fn decode(path: &Path) -> Result<image::RgbImage, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    decode_rgb(&bytes)
}

impl Replay {
    pub fn open(path: &Path, fps: f32, repeat: bool, preload: bool) -> Result<Replay, SourceError> {
        let files = list(path)?;
        let preloaded = preload.then(|| files.iter().map(|f| decode(f).map(Arc::new)).collect());
        Ok(Replay {
            root: path.display().to_string(),
            files,
            preloaded,
            next: 0,
            repeat,
            period: (fps > 0.0).then(|| Duration::from_secs_f32(1.0 / fps)),
            due: None,
        })
    }
}

impl FrameSource for Replay {
    fn describe(&self) -> String {
        format!(
            "replay of {} ({} files{}{})",
            self.root,
            self.files.len(),
            if self.preloaded.is_some() {
                ", preloaded"
            } else {
                ""
            },
            if self.repeat { ", looping" } else { "" }
        )
    }

    fn pull(&mut self) -> Pull {
        if self.next >= self.files.len() {
            if !self.repeat {
                return Pull::End;
            }
            self.next = 0;
        }
        let i = self.next;
        self.next += 1;
        if let Some(period) = self.period {
            let now = Instant::now();
            let due = self.due.unwrap_or(now);
            if due > now {
                std::thread::sleep(due - now);
            }
            // A late frame does not make the next ones come faster.
            self.due = Some(due.max(now) + period);
        }
        let path = &self.files[i];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let t = Instant::now();
        let decoded = match &self.preloaded {
            Some(frames) => frames[i].clone(),
            None => decode(path).map(Arc::new),
        };
        let decode_ms = if self.preloaded.is_some() {
            0.0
        } else {
            t.elapsed().as_secs_f32() * 1e3
        };
        match decoded {
            Ok(image) => Pull::Frame {
                name,
                image,
                decode_ms,
            },
            Err(reason) => Pull::Unreadable {
                name: path.display().to_string(),
                reason,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_in_name_order_with_unreadable_files_reported() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::RgbImage::from_pixel(20, 10, image::Rgb([200, 100, 50]));
        img.save_with_format(dir.path().join("b.png"), image::ImageFormat::Png)
            .unwrap();
        // A PNG named .jpg is decoded by content.
        img.save_with_format(dir.path().join("a.jpg"), image::ImageFormat::Png)
            .unwrap();
        std::fs::write(dir.path().join("c.png"), b"not an image").unwrap();
        let mut r = Replay::open(dir.path(), 0.0, false, false).unwrap();
        let mut seen = Vec::new();
        loop {
            match r.pull() {
                Pull::Frame { name, image, .. } => {
                    assert_eq!(image.dimensions(), (20, 10));
                    seen.push(name)
                }
                Pull::Unreadable { name, .. } => seen.push(format!("bad:{name}")),
                Pull::Idle(_) => {}
                Pull::End => break,
            }
        }
        assert_eq!(seen[0], "a.jpg");
        assert_eq!(seen[1], "b.png");
        assert!(seen[2].starts_with("bad:") && seen[2].ends_with("c.png"));
        let pattern = dir.path().join("*.png");
        assert_eq!(list(&pattern).unwrap().len(), 2);
        assert!(matches!(
            list(&dir.path().join("*.tif")),
            Err(SourceError::Empty(_))
        ));
    }
}
