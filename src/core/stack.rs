//! Multi-page TIFF and OME-TIFF stacks, as confocal and widefield acquisition software writes
//! them: every page an image in order (8- or 16-bit, grey or RGB), and the OME-XML in the first
//! page's ImageDescription read for the physical pixel size and the significant bits.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use image::RgbImage;
use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::tags::Tag;

use crate::core::pixels;

/// Why a stack or one of its pages cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a readable TIFF: {reason}")]
    Tiff { path: PathBuf, reason: String },
    #[error("{path} page {page}: {reason}")]
    Page {
        path: PathBuf,
        page: usize,
        reason: String,
    },
}

/// What the OME-XML says about the pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OmePixels {
    /// `PhysicalSizeX` in µm (converted from its `PhysicalSizeXUnit`).
    pub physical_size_x_um: Option<f32>,
    /// `SignificantBits`: the depth of the data in its 16-bit container.
    pub significant_bits: Option<u8>,
}

/// Whether bytes start like a TIFF file (classic or BigTIFF, either byte order).
pub fn is_tiff(head: &[u8]) -> bool {
    matches!(
        head.get(..4),
        Some([b'I', b'I', 42, 0] | [b'M', b'M', 0, 42] | [b'I', b'I', 43, 0] | [b'M', b'M', 0, 43])
    )
}

/// Whether the file at `path` is a TIFF (by its first bytes, never its name).
pub fn file_is_tiff(path: &Path) -> bool {
    let mut head = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| is_tiff(&head))
}

/// The value of `name="..."` in an XML start tag's text.
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = tag;
    while let Some(i) = rest.find(name) {
        let before = rest[..i].chars().last();
        let after = &rest[i + name.len()..];
        rest = after;
        if !before.is_some_and(char::is_whitespace) {
            continue;
        }
        let after = after.trim_start();
        let Some(after) = after.strip_prefix('=') else {
            continue;
        };
        let after = after.trim_start();
        let quote = after.chars().next()?;
        if quote != '"' && quote != '\'' {
            continue;
        }
        let value = &after[1..];
        return value.find(quote).map(|end| &value[..end]);
    }
    None
}

/// Micrometres per unit of an OME length unit symbol (OME's default is µm).
fn um_per_unit(unit: &str) -> Option<f32> {
    match unit {
        "µm" | "μm" | "um" | "micron" | "&#181;m" | "&#xB5;m" | "&#xb5;m" => Some(1.0),
        "nm" => Some(1e-3),
        "Å" => Some(1e-4),
        "mm" => Some(1e3),
        "cm" => Some(1e4),
        "m" => Some(1e6),
        _ => None,
    }
}

/// Read the `Pixels` element of OME-XML: physical size in x and significant bits.
pub fn parse_ome(xml: &str) -> Option<OmePixels> {
    // The element may carry a namespace prefix (`<ome:Pixels`).
    let start = xml.match_indices("Pixels").map(|(i, _)| i).find(|&i| {
        let before = &xml[..i];
        let prefix_ok = before.ends_with('<')
            || before
                .rfind('<')
                .is_some_and(|lt| before[lt + 1..].ends_with(':') && !before[lt..].contains(' '));
        let after = xml[i + "Pixels".len()..].chars().next();
        prefix_ok && after.is_some_and(|c| c.is_whitespace() || c == '>' || c == '/')
    })?;
    let end = xml[start..].find('>').map(|e| start + e)?;
    let tag = &xml[start..end];
    let unit = attribute(tag, "PhysicalSizeXUnit").unwrap_or("µm");
    let physical_size_x_um = attribute(tag, "PhysicalSizeX")
        .and_then(|v| v.trim().parse::<f32>().ok())
        .zip(um_per_unit(unit))
        .map(|(v, k)| v * k)
        .filter(|v| v.is_finite() && *v > 0.0);
    let significant_bits = attribute(tag, "SignificantBits")
        .and_then(|v| v.trim().parse::<u8>().ok())
        .filter(|b| (1..=16).contains(b));
    Some(OmePixels {
        physical_size_x_um,
        significant_bits,
    })
}

/// The most one page may take decoded, bytes: what the image crate allows a PNG or JPEG frame
/// (512 MiB; a 16-bit RGB page of 8192 x 8192 is 384 MiB). A page whose header claims more is
/// an error for that page, not an allocation of whatever size a damaged header says.
pub const PAGE_LIMIT_BYTES: usize = 512 << 20;

fn limits() -> Limits {
    let mut l = Limits::default();
    l.decoding_buffer_size = PAGE_LIMIT_BYTES;
    l.intermediate_buffer_size = PAGE_LIMIT_BYTES;
    // OME-XML for a long multi-channel acquisition runs to megabytes.
    l.ifd_value_size = 64 << 20;
    l
}

/// A stack being read page by page (from a file, or any seekable reader).
pub struct TiffStack<R: Read + Seek = BufReader<File>> {
    path: PathBuf,
    decoder: Decoder<R>,
    /// Pages read so far.
    page: usize,
    done: bool,
    ome: Option<OmePixels>,
}

impl TiffStack {
    pub fn open(path: &Path) -> Result<Self, StackError> {
        let file = File::open(path).map_err(|source| StackError::Io {
            path: path.to_path_buf(),
            error: source,
        })?;
        TiffStack::from_reader(BufReader::new(file), path)
    }
}

impl<R: Read + Seek> TiffStack<R> {
    /// A stack read from `reader`; `path` names it in errors.
    pub fn from_reader(reader: R, path: &Path) -> Result<Self, StackError> {
        let tiff_err = |e: tiff::TiffError| StackError::Tiff {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let mut decoder = Decoder::new(reader)
            .map_err(tiff_err)?
            .with_limits(limits());
        let ome = decoder
            .find_tag(Tag::ImageDescription)
            .ok()
            .flatten()
            .and_then(|v| v.into_string().ok())
            .filter(|d| d.contains("<OME") || d.contains(":OME"))
            .and_then(|d| parse_ome(&d));
        Ok(Self {
            path: path.to_path_buf(),
            decoder,
            page: 0,
            done: false,
            ome,
        })
    }

    /// Whether another page follows the last one read.
    pub fn has_more(&self) -> bool {
        !self.done && self.decoder.more_images()
    }

    /// The OME metadata of the stack, when its first page carries OME-XML.
    pub fn ome(&self) -> Option<OmePixels> {
        self.ome
    }

    /// The next page as RGB (1-based page number with it), or `None` after the last one. A
    /// page that cannot be decoded is an error for that page; the stack goes on when the
    /// file's page chain allows.
    pub fn next_page(&mut self) -> Option<(usize, Result<RgbImage, StackError>)> {
        if self.done {
            return None;
        }
        if self.page > 0 {
            if !self.decoder.more_images() {
                self.done = true;
                return None;
            }
            if let Err(e) = self.decoder.next_image() {
                self.done = true;
                self.page += 1;
                return Some((self.page, Err(self.page_error(e.to_string()))));
            }
        }
        self.page += 1;
        let image = self.read_page().map_err(|r| self.page_error(r));
        Some((self.page, image))
    }

    fn page_error(&self, reason: String) -> StackError {
        StackError::Page {
            path: self.path.clone(),
            page: self.page,
            reason,
        }
    }

    fn read_page(&mut self) -> Result<RgbImage, String> {
        let (w, h) = self.decoder.dimensions().map_err(|e| e.to_string())?;
        let colour = self.decoder.colortype().map_err(|e| e.to_string())?;
        let data = self.decoder.read_image().map_err(|e| e.to_string())?;
        let bits = self.ome.and_then(|o| o.significant_bits).unwrap_or(16);
        use tiff::ColorType as C;
        match (colour, data) {
            (C::Gray(8), DecodingResult::U8(v)) => {
                pixels::grey8(&v, w, h).map_err(|e| e.to_string())
            }
            (C::Gray(16), DecodingResult::U16(v)) => Ok(pixels::grey16(&v, w, h, bits)),
            (C::RGB(8), DecodingResult::U8(v)) => pixels::rgb8(&v, w, h).map_err(|e| e.to_string()),
            (C::RGB(16), DecodingResult::U16(v)) => Ok(pixels::rgb16(&v, w, h, bits)),
            (other, _) => Err(format!(
                "pixel type {other:?} is not read (8- or 16-bit grey or RGB)"
            )),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tiff::encoder::{TiffEncoder, colortype};

    /// A stack of `pages` 16-bit grey pages, page `i` filled with `i * 1000`, with `ome` as
    /// the first page's ImageDescription.
    pub(crate) fn write_grey16_stack(path: &Path, pages: u16, ome: Option<&str>) {
        let mut enc = TiffEncoder::new(File::create(path).unwrap()).unwrap();
        for i in 0..pages {
            let mut img = enc.new_image::<colortype::Gray16>(8, 4).unwrap();
            if let (0, Some(d)) = (i, ome) {
                img.encoder().write_tag(Tag::ImageDescription, d).unwrap();
            }
            img.write_data(&[i * 1000; 32]).unwrap();
        }
    }

    #[test]
    fn ome_pixels_are_read_with_their_units() {
        let xml = r#"<?xml version="1.0"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels DimensionOrder="XYZCT" ID="Pixels:0" PhysicalSizeX="0.1032" PhysicalSizeY="0.1032" SignificantBits="12" SizeC="1" SizeT="1" SizeX="8" SizeY="4" SizeZ="3" Type="uint16"><Channel ID="Channel:0:0"/></Pixels></Image></OME>"#;
        let o = parse_ome(xml).unwrap();
        assert_eq!(o.physical_size_x_um, Some(0.1032));
        assert_eq!(o.significant_bits, Some(12));
        // PhysicalSizeY is not taken for X, and nm are converted.
        let nm = r#"<ome:OME><ome:Pixels PhysicalSizeY="9" PhysicalSizeX="250" PhysicalSizeXUnit="nm" Type="uint8"/></ome:OME>"#;
        assert_eq!(parse_ome(nm).unwrap().physical_size_x_um, Some(0.25));
        // No size, an unknown unit, or no Pixels element: nothing.
        assert_eq!(
            parse_ome("<OME><Pixels Type=\"uint8\"/></OME>")
                .unwrap()
                .physical_size_x_um,
            None
        );
        let furlong = r#"<OME><Pixels PhysicalSizeX="1" PhysicalSizeXUnit="furlong"/></OME>"#;
        assert_eq!(parse_ome(furlong).unwrap().physical_size_x_um, None);
        assert!(parse_ome("<OME><Image/></OME>").is_none());
    }

    #[test]
    fn every_page_is_read_in_order_at_its_depth() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stack.ome.tif");
        let ome = r#"<OME><Image><Pixels PhysicalSizeX="0.5" SignificantBits="12" Type="uint16"/></Image></OME>"#;
        write_grey16_stack(&path, 4, Some(ome));
        assert!(file_is_tiff(&path));
        let mut s = TiffStack::open(&path).unwrap();
        assert_eq!(s.ome().unwrap().physical_size_x_um, Some(0.5));
        let mut seen = Vec::new();
        while let Some((page, img)) = s.next_page() {
            let img = img.unwrap();
            assert_eq!(img.dimensions(), (8, 4));
            seen.push((page, img.get_pixel(0, 0)[0]));
        }
        // 12 significant bits: 1000 → 62, 2000 → 125, 3000 → 187.
        assert_eq!(seen, vec![(1, 0), (2, 62), (3, 125), (4, 187)]);
        assert!(!is_tiff(b"\xFF\xD8\xFF\xE0"));
    }

    /// A one-page 16-bit grey TIFF whose header claims `w` x `h` pixels, with 64 bytes of strip.
    fn claimed_size_tiff(w: u32, h: u32) -> Vec<u8> {
        let mut out = b"II*\0\0\0\0\0".to_vec();
        out.extend_from_slice(&[0; 64]);
        let ifd = out.len() as u32;
        out[4..8].copy_from_slice(&ifd.to_le_bytes());
        // (tag, type 3 SHORT or 4 LONG, value)
        let tags: [(u16, u16, u32); 9] = [
            (256, 4, w),
            (257, 4, h),
            (258, 3, 16),
            (259, 3, 1),
            (262, 3, 1),
            (273, 4, 8),
            (277, 3, 1),
            (278, 4, h),
            (279, 4, 64),
        ];
        out.extend_from_slice(&(tags.len() as u16).to_le_bytes());
        for (tag, ty, v) in tags {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
            if ty == 3 {
                out.extend_from_slice(&(v as u16).to_le_bytes());
                out.extend_from_slice(&[0, 0]);
            } else {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        out.extend_from_slice(&0u32.to_le_bytes());
        out
    }

    #[test]
    fn a_page_claiming_more_than_the_limit_is_refused_before_it_is_allocated() {
        let small = claimed_size_tiff(8, 4);
        let mut s =
            TiffStack::from_reader(std::io::Cursor::new(&small), Path::new("s.tif")).unwrap();
        assert_eq!(s.next_page().unwrap().1.unwrap().dimensions(), (8, 4));
        // 60000 x 60000 x 2 bytes = 7.2 GB: a damaged or hostile header, refused by size.
        let big = claimed_size_tiff(60_000, 60_000);
        let mut s = TiffStack::from_reader(std::io::Cursor::new(&big), Path::new("b.tif")).unwrap();
        let (page, err) = s.next_page().unwrap();
        let err = err.unwrap_err().to_string();
        assert_eq!(page, 1);
        assert!(
            err.contains("b.tif page 1") && err.contains("limits"),
            "{err}"
        );
        assert!(s.next_page().is_none());
    }
}
