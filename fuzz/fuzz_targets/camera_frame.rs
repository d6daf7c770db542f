//! Fuzz target: a camera's raw buffer (V4L2 MJPEG/YUYV/grey, GenICam Mono16/RGB8/Bayer) with
//! the size and pixel format the device claims, decoded to RGB as the camera source does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spermscope::core::pixels::Cfa;
use spermscope::daemon::source::camera::{self, PixelFormat, RawFrame};

fuzz_target!(|data: &[u8]| {
    // Header: format selector, then width and height (u16 each, little-endian); the rest is
    // the buffer.
    let [sel, w0, w1, h0, h1, rest @ ..] = data else {
        return;
    };
    let format = match sel % 10 {
        0 => PixelFormat::Mjpeg,
        1 => PixelFormat::Yuyv,
        2 => PixelFormat::Grey,
        3 => PixelFormat::Grey16 { bits: sel / 10 },
        4 => PixelFormat::Rgb24,
        5 => PixelFormat::Bayer8(Cfa::Rg),
        6 => PixelFormat::Bayer8(Cfa::Bg),
        7 => PixelFormat::Bayer8(Cfa::Gb),
        8 => PixelFormat::Bayer8(Cfa::Gr),
        _ => PixelFormat::Grey16 { bits: 16 },
    };
    let raw = RawFrame {
        width: u32::from(u16::from_le_bytes([*w0, *w1])),
        height: u32::from(u16::from_le_bytes([*h0, *h1])),
        format,
        data: rest.to_vec(),
    };
    // A decoded raw buffer has the size the device claimed (an MJPEG frame has its own).
    if let Ok(img) = camera::decode(&raw)
        && raw.format != PixelFormat::Mjpeg
    {
        assert_eq!((img.width(), img.height()), (raw.width, raw.height));
    }
});
