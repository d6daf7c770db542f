//! Replay of recorded frames: a folder or glob in name order, decoded by content, paced to a
//! frame rate or as fast as the pipeline takes them, optionally looped or preloaded. A TIFF
//! file is read as a stack: every page a frame, in order (`name.tif#3` is its third page).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;

use crate::core::imageio::{ImageError, list_files, load_rgb};
use crate::core::stack::{TiffStack, file_is_tiff};
use crate::daemon::source::{FrameSource, Pull, SourceError};

/// One frame as read: its name, the image or why not, and the decoding time in ms.
type Read = (String, Result<Arc<RgbImage>, String>, f32);

/// Frames from files.
pub struct Replay {
    root: String,
    files: Vec<PathBuf>,
    /// Every frame decoded before the run (undecodable ones keep their reason).
    preloaded: Option<Vec<Read>>,
    /// The next file (or, preloaded, the next frame).
    next: usize,
    /// The stack whose pages are being read, with its file's name.
    stack: Option<(String, TiffStack)>,
    repeat: bool,
    period: Option<Duration>,
    due: Option<Instant>,
}

/// Why a frame file cannot be used, for the log line that names it.
fn reason(e: ImageError) -> String {
    match e {
        ImageError::Decode { error, .. } => error.to_string(),
        other => other.to_string(),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

impl Replay {
    pub fn open(path: &Path, fps: f32, repeat: bool, preload: bool) -> Result<Replay, SourceError> {
        let files = list_files(path)?;
        let mut replay = Replay {
            root: path.display().to_string(),
            files,
            preloaded: None,
            next: 0,
            stack: None,
            repeat,
            period: (fps > 0.0).then(|| Duration::from_secs_f32(1.0 / fps)),
            due: None,
        };
        if preload {
            let mut frames = Vec::new();
            while let Some(f) = replay.read_next() {
                frames.push(f);
            }
            replay.next = 0;
            replay.preloaded = Some(frames);
        }
        Ok(replay)
    }

    /// The next frame from the files (a stack's next page, or the next file), or `None` after
    /// the last.
    fn read_next(&mut self) -> Option<Read> {
        loop {
            if let Some((name, stack)) = &mut self.stack {
                let t = Instant::now();
                match stack.next_page() {
                    Some((page, image)) => {
                        let ms = t.elapsed().as_secs_f32() * 1e3;
                        let single = page == 1 && !stack.has_more();
                        let frame = if single {
                            name.clone()
                        } else {
                            format!("{name}#{page}")
                        };
                        return Some((frame, image.map(Arc::new).map_err(|e| e.to_string()), ms));
                    }
                    None => self.stack = None,
                }
            }
            let path = self.files.get(self.next)?.clone();
            self.next += 1;
            let t = Instant::now();
            if file_is_tiff(&path) {
                match TiffStack::open(&path) {
                    Ok(stack) => self.stack = Some((file_name(&path), stack)),
                    Err(e) => return Some((path.display().to_string(), Err(e.to_string()), 0.0)),
                }
                continue;
            }
            let decoded = load_rgb(&path).map(Arc::new).map_err(reason);
            let ms = t.elapsed().as_secs_f32() * 1e3;
            let name = match decoded {
                Ok(_) => file_name(&path),
                // An undecodable frame is logged with its path.
                Err(_) => path.display().to_string(),
            };
            return Some((name, decoded, ms));
        }
    }

    /// The next frame, preloaded or read now.
    fn next_frame(&mut self) -> Option<Read> {
        match &self.preloaded {
            Some(frames) => {
                let (name, image, _) = frames.get(self.next)?.clone();
                self.next += 1;
                Some((name, image, 0.0))
            }
            None => self.read_next(),
        }
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
        if let Some(period) = self.period {
            let now = Instant::now();
            let due = self.due.unwrap_or(now);
            if due > now {
                std::thread::sleep(due - now);
            }
            // A late frame does not make the next ones come faster.
            self.due = Some(due.max(now) + period);
        }
        let mut frame = self.next_frame();
        if frame.is_none() && self.repeat {
            self.next = 0;
            self.stack = None;
            frame = self.next_frame();
        }
        match frame {
            None => Pull::End,
            Some((name, Ok(image), decode_ms)) => Pull::Frame {
                name,
                image,
                decode_ms,
            },
            Some((name, Err(reason), _)) => Pull::Unreadable { name, reason },
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
                Pull::Idle(_) | Pull::Incomplete { .. } => {}
                Pull::End => break,
            }
        }
        assert_eq!(seen[0], "a.jpg");
        assert_eq!(seen[1], "b.png");
        assert!(seen[2].starts_with("bad:") && seen[2].ends_with("c.png"));
    }

    #[test]
    fn a_tiff_stack_gives_every_page_as_a_frame_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::RgbImage::from_pixel(8, 4, image::Rgb([9, 9, 9]));
        img.save_with_format(dir.path().join("a.png"), image::ImageFormat::Png)
            .unwrap();
        crate::core::stack::tests::write_grey16_stack(&dir.path().join("b.tif"), 3, None);
        // A one-page TIFF keeps its plain name.
        crate::core::stack::tests::write_grey16_stack(&dir.path().join("c.tiff"), 1, None);
        for preload in [false, true] {
            let mut r = Replay::open(dir.path(), 0.0, false, preload).unwrap();
            let mut seen = Vec::new();
            loop {
                match r.pull() {
                    Pull::Frame { name, image, .. } => {
                        seen.push(format!("{name}:{}", image.get_pixel(0, 0)[0]))
                    }
                    Pull::Unreadable { name, reason } => panic!("{name}: {reason}"),
                    Pull::Idle(_) | Pull::Incomplete { .. } => {}
                    Pull::End => break,
                }
            }
            assert_eq!(
                seen,
                ["a.png:9", "b.tif#1:0", "b.tif#2:3", "b.tif#3:7", "c.tiff:0"]
            );
        }
    }
}
