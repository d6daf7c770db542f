//! Raw pixel layouts to RGB: 8- and 16-bit grey, 8- and 16-bit RGB, and 8-bit Bayer mosaics
//! (bilinear demosaicing). Industrial cameras (GenICam Mono8/Mono16/RGB8/Bayer) and
//! microscope stacks (8/16-bit TIFF pages) both come through here.

use image::RgbImage;

/// The colour filter layout of a Bayer sensor, named by its top-left 2x2 block read row by
/// row (GenICam `BayerRG8` is `Rg`: red at (0, 0), green at (1, 0) and (0, 1), blue at (1, 1)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cfa {
    Rg,
    Bg,
    Gb,
    Gr,
}

/// Why a buffer does not hold the image it claims to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} frame of {width}x{height} has {got} bytes, needs {need}")]
pub struct SizeError {
    pub what: &'static str,
    pub width: u32,
    pub height: u32,
    pub got: usize,
    pub need: usize,
}

fn need(
    what: &'static str,
    data: &[u8],
    width: u32,
    height: u32,
    bytes_per_px: usize,
) -> Result<usize, SizeError> {
    let n = width as usize * height as usize * bytes_per_px;
    if data.len() < n {
        return Err(SizeError {
            what,
            width,
            height,
            got: data.len(),
            need: n,
        });
    }
    Ok(n)
}

fn image(width: u32, height: u32, rgb: Vec<u8>) -> RgbImage {
    // The buffer is built to width * height * 3 bytes by every caller.
    RgbImage::from_raw(width, height, rgb).unwrap_or_else(|| RgbImage::new(width, height))
}

/// A 16-bit sample to 8 bits, keeping its top `significant_bits` (a 12-bit sensor in a 16-bit
/// container has `significant_bits = 12`, so 4095 becomes 255).
pub fn to_u8(v: u16, significant_bits: u8) -> u8 {
    let bits = significant_bits.clamp(8, 16);
    let max = (1u32 << bits) - 1;
    ((u32::from(v).min(max) >> (bits - 8)) & 0xFF) as u8
}

/// 8-bit grey, one byte a pixel.
pub fn grey8(data: &[u8], width: u32, height: u32) -> Result<RgbImage, SizeError> {
    let n = need("grey 8-bit", data, width, height, 1)?;
    let rgb = data[..n].iter().flat_map(|&v| [v, v, v]).collect();
    Ok(image(width, height, rgb))
}

/// 16-bit grey samples.
pub fn grey16(samples: &[u16], width: u32, height: u32, significant_bits: u8) -> RgbImage {
    let n = width as usize * height as usize;
    let mut rgb: Vec<u8> = samples
        .iter()
        .take(n)
        .flat_map(|&v| {
            let g = to_u8(v, significant_bits);
            [g, g, g]
        })
        .collect();
    rgb.resize(n * 3, 0);
    image(width, height, rgb)
}

/// 16-bit grey as little-endian bytes (GenICam `Mono16`).
pub fn grey16_le(
    data: &[u8],
    width: u32,
    height: u32,
    significant_bits: u8,
) -> Result<RgbImage, SizeError> {
    let n = need("grey 16-bit", data, width, height, 2)?;
    let samples: Vec<u16> = data[..n]
        .chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    Ok(grey16(&samples, width, height, significant_bits))
}

/// Packed 8-bit RGB, three bytes a pixel.
pub fn rgb8(data: &[u8], width: u32, height: u32) -> Result<RgbImage, SizeError> {
    let n = need("RGB 8-bit", data, width, height, 3)?;
    Ok(image(width, height, data[..n].to_vec()))
}

/// Packed 16-bit RGB samples.
pub fn rgb16(samples: &[u16], width: u32, height: u32, significant_bits: u8) -> RgbImage {
    let n = width as usize * height as usize * 3;
    let mut rgb: Vec<u8> = samples
        .iter()
        .take(n)
        .map(|&v| to_u8(v, significant_bits))
        .collect();
    rgb.resize(n, 0);
    image(width, height, rgb)
}

/// Which colour a Bayer site holds: 0 red, 1 green, 2 blue.
fn site(cfa: Cfa, x: usize, y: usize) -> usize {
    let (top, bottom) = match cfa {
        Cfa::Rg => ([0, 1], [1, 2]),
        Cfa::Bg => ([2, 1], [1, 0]),
        Cfa::Gb => ([1, 2], [0, 1]),
        Cfa::Gr => ([1, 0], [2, 1]),
    };
    if y.is_multiple_of(2) {
        top[x % 2]
    } else {
        bottom[x % 2]
    }
}

/// Index `i` of a row or column of `n` mirrored into `0..n` about its first and last
/// element (`-1` → `1`, `n` → `n - 2`).
fn mirror(i: isize, n: usize) -> usize {
    let m = if i < 0 {
        i.unsigned_abs()
    } else if i as usize >= n {
        (2 * n).saturating_sub(2 + i as usize)
    } else {
        i as usize
    };
    m.min(n - 1)
}

/// An 8-bit Bayer mosaic to RGB by bilinear interpolation: each missing colour is the mean of
/// the nearest sites of that colour in the 3x3 neighbourhood (edges mirrored).
pub fn bayer8(data: &[u8], width: u32, height: u32, cfa: Cfa) -> Result<RgbImage, SizeError> {
    need("Bayer 8-bit", data, width, height, 1)?;
    let (w, h) = (width as usize, height as usize);
    let at = |x: isize, y: isize| -> (usize, u32) {
        // Mirror at the borders so every pixel has full neighbours of each colour.
        let (mx, my) = (mirror(x, w), mirror(y, h));
        (site(cfa, mx, my), u32::from(data[my * w + mx]))
    };
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h as isize {
        for x in 0..w as isize {
            let mut sum = [0u32; 3];
            let mut count = [0u32; 3];
            let own = site(cfa, x as usize, y as usize);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (c, v) = at(x + dx, y + dy);
                    if c == own && (dx, dy) != (0, 0) {
                        continue;
                    }
                    sum[c] += v;
                    count[c] += 1;
                }
            }
            for c in 0..3 {
                let v = if c == own {
                    u32::from(data[y as usize * w + x as usize])
                } else {
                    (sum[c] + count[c] / 2) / count[c].max(1)
                };
                rgb.push(v.min(255) as u8);
            }
        }
    }
    Ok(image(width, height, rgb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixteen_bits_keep_their_significant_top() {
        assert_eq!(to_u8(65535, 16), 255);
        assert_eq!(to_u8(256, 16), 1);
        assert_eq!(to_u8(4095, 12), 255);
        assert_eq!(to_u8(2048, 12), 128);
        // Values above the stated depth saturate instead of wrapping.
        assert_eq!(to_u8(5000, 12), 255);
        let img = grey16_le(&[0x00, 0x80, 0xFF, 0xFF], 2, 1, 16).unwrap();
        assert_eq!(img.get_pixel(0, 0).0, [128, 128, 128]);
        assert_eq!(img.get_pixel(1, 0).0, [255, 255, 255]);
        let e = grey16_le(&[0; 3], 2, 1, 16).unwrap_err();
        assert_eq!(e.need, 4);
    }

    #[test]
    fn a_flat_colour_survives_every_bayer_layout() {
        // A uniform (200, 100, 50) scene seen through each colour filter layout.
        for cfa in [Cfa::Rg, Cfa::Bg, Cfa::Gb, Cfa::Gr] {
            let (w, h) = (6u32, 4u32);
            let mosaic: Vec<u8> = (0..h as usize)
                .flat_map(|y| (0..w as usize).map(move |x| [200, 100, 50][site(cfa, x, y)]))
                .collect();
            let img = bayer8(&mosaic, w, h, cfa).unwrap();
            for p in img.pixels() {
                assert_eq!(p.0, [200, 100, 50], "{cfa:?}");
            }
        }
    }

    #[test]
    fn bayer_sites_follow_the_genicam_names() {
        // BayerRG8: R G / G B.
        assert_eq!(
            [
                site(Cfa::Rg, 0, 0),
                site(Cfa::Rg, 1, 0),
                site(Cfa::Rg, 1, 1)
            ],
            [0, 1, 2]
        );
        // BayerBG8: B G / G R.
        assert_eq!([site(Cfa::Bg, 0, 0), site(Cfa::Bg, 1, 1)], [2, 0]);
        // BayerGB8: G B / R G; BayerGR8: G R / B G.
        assert_eq!([site(Cfa::Gb, 1, 0), site(Cfa::Gb, 0, 1)], [2, 0]);
        assert_eq!([site(Cfa::Gr, 1, 0), site(Cfa::Gr, 0, 1)], [0, 2]);
    }
}
