//! Writes a live-like sequence for benchmarks: each field of a folder seen for several frames,
//! the stage drifting a few pixels a frame, every frame JPEG re-encoded (quality 90), as a
//! camera watching a slide gives them.
//!
//!   cargo run --release --example live_like -- FIELDS_DIR OUT_DIR [REPEATS] [MAX_FIELDS]

use std::path::PathBuf;

use spermscope::core::imageio;
use spermscope::daemon::source::montage::drifted;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (Some(fields), Some(out)) = (args.get(1), args.get(2)) else {
        return Err("usage: live_like FIELDS_DIR OUT_DIR [REPEATS] [MAX_FIELDS]".into());
    };
    let repeats: i64 = args.get(3).map_or(Ok(8), |s| s.parse())?;
    let max: usize = args.get(4).map_or(Ok(usize::MAX), |s| s.parse())?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    let files = imageio::list_files(&PathBuf::from(fields))?;
    for (f, path) in files.iter().take(max).enumerate() {
        let img = imageio::load_rgb(path)?;
        for k in 0..repeats {
            let frame = drifted(&img, (3 * k, -2 * k));
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
                .encode_image(&frame)?;
            std::fs::write(out.join(format!("{f:03}-{k:02}.jpg")), jpeg)?;
        }
    }
    println!(
        "{} frames written to {}",
        files.len().min(max) as i64 * repeats,
        out.display()
    );
    Ok(())
}
