//! The live view in a real browser: while a replay runs, headless Chromium (Debian's package)
//! loads the page, and the page must show the frame and the running tally.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHROMIUM: &str = "/usr/bin/chromium";

fn get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Chromium as the project's probe runs it: headless, no sandbox (root), no background
/// networking (the machine has no outside network), a fresh profile.
fn chromium(profile: &Path) -> Command {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: the live-view test needs Debian's chromium (.ci/run installs it: apt-get install chromium)"
    );
    let mut c = Command::new(CHROMIUM);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=4000",
        "--window-size=1400,900",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stderr(Stdio::null());
    c
}

#[test]
fn the_live_view_shows_the_frame_and_the_tally_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let cfg = dir.path().join("view.toml");
    std::fs::write(
        &cfg,
        format!("[service]\nview_addr = \"127.0.0.1:{port}\"\n[report]\nprint = false\n"),
    )
    .unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_spermscope"))
        .env("RUST_LOG", "warn")
        .arg("replay")
        .arg(densest_val_frames(dir.path(), 24))
        .args(["--fps", "4", "--config"])
        .arg(&cfg)
        .arg("--records")
        .arg(dir.path().join("r.jsonl"))
        .spawn()
        .unwrap();
    // Wait until the publisher has left a frame with cells for the view.
    let t = Instant::now();
    loop {
        let tally = get(port, "/tally.json").unwrap_or_default();
        if tally.contains("\"heads\":[{") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no frame served: {tally}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let url = format!("http://127.0.0.1:{port}/");
    let dom = chromium(&dir.path().join("p1"))
        .arg("--dump-dom")
        .arg(&url)
        .output()
        .unwrap();
    let shot = dir.path().join("view.png");
    let status = chromium(&dir.path().join("p2"))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .status()
        .unwrap();
    daemon.kill().unwrap();
    let _ = daemon.wait();
    let dom = String::from_utf8_lossy(&dom.stdout);
    // The frame arrived in the page at its full width, and the tally was filled in.
    assert!(dom.contains("data-frame-width=\"1280\""), "{dom}");
    let cells: u64 = dom
        .split("data-cells=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no cell count in the page:\n{dom}"));
    assert!(cells > 0);
    assert!(dom.contains("% normal forms <span id=\"pct\">") && dom.contains('%'));
    assert!(!dom.contains("<span id=\"pct\">-</span>"), "{dom}");
    // The screenshot shows a stained field: many purple-blue pixels where the frame is.
    assert!(status.success());
    let png = image::open(&shot).unwrap().to_rgb8();
    let stained = png
        .pixels()
        .filter(|p| p[2] > 150 && p[1] < 120 && p[0] < 200)
        .count();
    assert!(stained > 2000, "{stained} stained pixels in the screenshot");
    eprintln!("live view: {cells} cells in the page, {stained} stained pixels on screen");
}

/// A folder of links to the `n` `sperm-parsing` val frames with the most head area
/// (`heads.csv`), densest first: whichever frame the screenshot catches is a crowded, stained
/// field, however far a loaded machine got through the replay.
fn densest_val_frames(dir: &std::path::Path, n: usize) -> std::path::PathBuf {
    let csv = std::fs::read_to_string(common::dataset("sperm-parsing/heads.csv")).unwrap();
    let mut area: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f[0] == "val" {
            *area.entry(f[1].to_string()).or_default() += f[3].parse::<u64>().unwrap();
        }
    }
    let mut frames: Vec<(u64, String)> = area.into_iter().map(|(f, a)| (a, f)).collect();
    frames.sort_by(|a, b| b.cmp(a));
    let out = dir.join("dense");
    std::fs::create_dir(&out).unwrap();
    for (i, (_, f)) in frames.iter().take(n).enumerate() {
        std::os::unix::fs::symlink(
            common::dataset(&format!("sperm-parsing/val/frames/{f}")),
            out.join(format!("{i:03}_{f}")),
        )
        .unwrap();
    }
    out
}
