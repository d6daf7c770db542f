//! Replay of recorded frames: a folder or glob in name order, decoded by content, paced to a
//! frame rate or as fast as the pipeline takes them, optionally looped or preloaded.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::imageio::{ImageError, list_files, load_rgb};
use crate::daemon::source::{FrameSource, Pull, SourceError};

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

/// Why a frame file cannot be used, for the log line that names it.
fn reason(e: ImageError) -> String {
    match e {
        ImageError::Decode { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

impl Replay {
    pub fn open(path: &Path, fps: f32, repeat: bool, preload: bool) -> Result<Replay, SourceError> {
        let files = list_files(path)?;
        let preloaded = preload.then(|| {
            files
                .iter()
                .map(|f| load_rgb(f).map(Arc::new).map_err(reason))
                .collect()
        });
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
            None => load_rgb(path).map(Arc::new).map_err(reason),
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
    }
}
