//! Fuzz target: a replayed or dropped-in image file (JPEG, PNG, TIFF, BMP, multi-page TIFF and
//! OME-TIFF stacks), decoded the way the replay source decodes it.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spermscope::core::{imageio, stack};

fuzz_target!(|data: &[u8]| {
    let _ = imageio::decode_rgb(data);
    if stack::is_tiff(data)
        && let Ok(mut s) = stack::TiffStack::from_reader(Cursor::new(data), Path::new("fuzz.tif"))
    {
        // Every page, as the replay source reads a stack; a stack cannot hold more pages than
        // its bytes can describe, but stop a page chain that loops.
        for _ in 0..64 {
            if s.next_page().is_none() {
                break;
            }
        }
    }
});
