//! Images from outside bytes: decoding by content (never by file name, and a cut-off JPEG
//! refused) and the files a folder or glob names. Replay, the camera's MJPEG frames, the
//! dataset readers and the evaluator all decode through here.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{ImageReader, RgbImage};

/// Why bytes are not an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated JPEG (no end-of-image marker)")]
    TruncatedJpeg,
    #[error("unrecognised image format")]
    UnknownFormat,
    #[error("{0}")]
    Invalid(String),
}

/// Why an image file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot decode image {path}: {error}")]
    Decode { path: PathBuf, error: DecodeError },
}

/// Why a folder or glob names no usable files.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("path {0} matches no files")]
    Empty(PathBuf),
    #[error("path {path} cannot be read: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("pattern {pattern} is not a valid glob: {reason}")]
    Pattern { pattern: String, reason: String },
}

/// Decode image bytes by content into RGB. A JPEG without its end-of-image marker is refused:
/// decoders fill a cut-off file with grey, and a frame cut off in writing or in transfer (a
/// replayed file, a camera's MJPEG frame) must not be analysed as if it were whole.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_complete(bytes) {
        return Err(DecodeError::TruncatedJpeg);
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::Invalid(e.to_string()))?;
    if reader.format().is_none() {
        return Err(DecodeError::UnknownFormat);
    }
    let img = reader
        .decode()
        .map_err(|e| DecodeError::Invalid(e.to_string()))?;
    Ok(img.into_rgb8())
}

/// A JPEG ends with its end-of-image marker `FF D9` (zero or newline padding after it allowed).
fn jpeg_complete(bytes: &[u8]) -> bool {
    let end = bytes
        .iter()
        .rposition(|&b| !matches!(b, 0x00 | b'\n' | b'\r'))
        .map_or(0, |i| i + 1);
    end >= 2 && bytes[end - 2..end] == [0xFF, 0xD9]
}

/// Read and decode an image file by its content (some SMIDS `.bmp` files are PNG) into RGB.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_path_buf(),
        error: source,
    })?;
    decode_rgb(&bytes).map_err(|source| ImageError::Decode {
        path: path.to_path_buf(),
        error: source,
    })
}

/// The files a path names, in name order: every regular file of a folder (hidden ones left
/// out), a glob's matches, or the one file.
pub fn list_files(path: &Path) -> Result<Vec<PathBuf>, ListError> {
    let text = path.to_string_lossy();
    let mut files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map_err(|e| ListError::Read {
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
            .map_err(|e| ListError::Pattern {
                pattern: text.to_string(),
                reason: e.to_string(),
            })?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect()
    } else if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        return Err(ListError::Read {
            path: path.to_path_buf(),
            reason: "no such file or folder".into(),
        });
    };
    files.sort();
    if files.is_empty() {
        return Err(ListError::Empty(path.to_path_buf()));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_jpeg_is_refused_and_a_whole_one_decodes() {
        let img = RgbImage::from_pixel(32, 24, image::Rgb([180, 90, 40]));
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Jpeg)
            .unwrap();
        assert_eq!(decode_rgb(&bytes).unwrap().dimensions(), (32, 24));
        // Padding after the end-of-image marker is allowed.
        let mut padded = bytes.clone();
        padded.extend_from_slice(b"\n\0");
        assert!(decode_rgb(&padded).is_ok());
        let cut = &bytes[..bytes.len() * 2 / 3];
        assert_eq!(decode_rgb(cut).unwrap_err(), DecodeError::TruncatedJpeg);
        assert!(
            DecodeError::TruncatedJpeg
                .to_string()
                .contains("truncated JPEG")
        );
    }

    #[test]
    fn decode_by_content_and_clear_error() {
        let mut png = Vec::new();
        RgbImage::from_pixel(4, 4, image::Rgb([1, 2, 3]))
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .expect("encode");
        let dir = tempfile::tempdir().expect("tempdir");
        let disguised = dir.path().join("x.bmp");
        std::fs::write(&disguised, &png).expect("write");
        assert_eq!(load_rgb(&disguised).expect("decodes").dimensions(), (4, 4));
        let broken = dir.path().join("broken.png");
        std::fs::write(&broken, &png[..20]).expect("write");
        let err = load_rgb(&broken).unwrap_err().to_string();
        assert!(err.contains("broken.png"), "{err}");
        assert!(matches!(
            list_files(&dir.path().join("*.tif")),
            Err(ListError::Empty(_))
        ));
        assert_eq!(list_files(&dir.path().join("*.png")).unwrap().len(), 1);
    }
}
