//! Pixel drawing for pictures that need no font: decimal digits from a 3x5 pixel glyph set.
//! The live view writes track ids with it and the scale histogram its axis labels.

use image::{Rgb, RgbImage};

/// 3x5 pixel digits, one row of bits per line (bit 2 is the left column).
const DIGITS: [[u8; 5]; 10] = [
    [7, 5, 5, 5, 7],
    [2, 6, 2, 2, 7],
    [7, 1, 7, 4, 7],
    [7, 1, 7, 1, 7],
    [5, 5, 7, 1, 1],
    [7, 4, 7, 1, 7],
    [7, 4, 7, 5, 7],
    [7, 1, 1, 1, 1],
    [7, 5, 7, 5, 7],
    [7, 5, 7, 1, 7],
];

/// Write the decimal digits of `text` at (x, y), three pixels per glyph pixel; other
/// characters are skipped and pixels outside the image left alone.
pub fn digits(img: &mut RgbImage, text: &str, x: u32, y: u32, c: Rgb<u8>) {
    const S: u32 = 3;
    let (w, h) = img.dimensions();
    for (k, d) in text.bytes().filter(u8::is_ascii_digit).enumerate() {
        let glyph = DIGITS[(d - b'0') as usize];
        let gx = x + k as u32 * 4 * S;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..3 {
                if bits & (4 >> col) == 0 {
                    continue;
                }
                for dy in 0..S {
                    for dx in 0..S {
                        let (px, py) = (gx + col * S + dx, y + row as u32 * S + dy);
                        if px < w && py < h {
                            img.put_pixel(px, py, c);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_is_a_narrow_column_and_an_eight_a_full_box() {
        let ink = Rgb([0, 0, 0]);
        let mut one = RgbImage::from_pixel(12, 15, Rgb([255, 255, 255]));
        digits(&mut one, "1", 0, 0, ink);
        let inked = |img: &RgbImage| img.pixels().filter(|p| **p == ink).count();
        // "1": 1+2+1+1+3 glyph pixels, 9 image pixels each.
        assert_eq!(inked(&one), 8 * 9);
        let mut eight = RgbImage::from_pixel(12, 15, Rgb([255, 255, 255]));
        digits(&mut eight, "8x", 0, 0, ink);
        assert_eq!(inked(&eight), 13 * 9);
    }
}
