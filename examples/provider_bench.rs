//! Crops a second for each bundled model at batch 1, 16, 64 and 256 on one execution provider
//! (ONNX Runtime through the daemon's own `Model`), for the CPU-against-CUDA table of the
//! README; `scripts/gpu-check` runs it for both on a GPU machine.
//! `cargo run --release --example provider_bench -- cpu|cuda [THREADS] [SECONDS] [MODEL.onnx...]`
//! (without models: every bundled one)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use spermscope::core::model::{Model, Provider, RuntimeOptions};
use spermscope::core::preprocess::Prepared;

fn main() -> ExitCode {
    let provider = match std::env::args().nth(1).as_deref() {
        Some("cpu") | None => Provider::Cpu,
        Some("cuda") => Provider::Cuda,
        Some(other) => {
            eprintln!("provider_bench: unknown provider '{other}' (cpu or cuda)");
            return ExitCode::from(2);
        }
    };
    let threads: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let seconds: f64 = std::env::args()
        .nth(3)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    // Models named after the seconds, else every bundled one.
    let mut paths: Vec<PathBuf> = std::env::args().skip(4).map(PathBuf::from).collect();
    if paths.is_empty() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models");
        paths = std::fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
            .collect();
        paths.sort();
    }
    let opts = RuntimeOptions {
        provider,
        threads,
        ..RuntimeOptions::default()
    };
    println!("provider {provider:?}, {threads} intra-op thread(s), {seconds} s a cell");
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>10}",
        "model", "batch 1", "16", "64", "256"
    );
    for path in &paths {
        let mut model = match Model::load(path, &opts) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("provider_bench: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        };
        let spec = model.spec.clone();
        let size = spec.input.size_px as usize;
        let per = spec.input.channels as usize * size * size;
        let crop = Prepared {
            pixels: (0..per).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect(),
            features: vec![0.0; spec.features.as_ref().map_or(0, |f| f.count)],
            head: None,
        };
        let mut row = format!("{:<24}", spec.name);
        for batch in [1usize, 16, 64, 256] {
            let inputs = vec![crop.clone(); batch];
            for _ in 0..3 {
                model.logits(&inputs).unwrap();
            }
            let (start, mut crops) = (Instant::now(), 0usize);
            while start.elapsed() < Duration::from_secs_f64(seconds) {
                model.logits(&inputs).unwrap();
                crops += batch;
            }
            let rate = crops as f64 / start.elapsed().as_secs_f64();
            row.push_str(&format!(" {rate:>10.0}"));
        }
        println!("{row}  crops/s ({})", model.provider);
    }
    ExitCode::SUCCESS
}
