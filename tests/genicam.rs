//! GenICam through the real protocol: Debian's `arv-fake-gv-camera-0.8` (a GigE Vision camera
//! simulator) streams to the daemon inside a fresh network namespace that has only loopback,
//! since GigE Vision discovery broadcasts on every interface. The simulator is killed and
//! restarted to check reconnection, and made to lose packets to check that incomplete frames
//! are counted and skipped. Where `unshare` is not permitted the tests fail saying so; they
//! never fall back to the host network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

const SIMULATOR: &str = "arv-fake-gv-camera-0.8";

/// A fresh network namespace, held by a sleeping process; commands enter it with nsenter.
struct NetNs {
    holder: Child,
}

impl NetNs {
    fn new() -> NetNs {
        let mut holder = Command::new("unshare")
            .args(["-n", "sleep", "600"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) must be installed");
        std::thread::sleep(Duration::from_millis(200));
        if let Some(status) = holder.try_wait().unwrap() {
            let mut why = String::new();
            if let Some(mut e) = holder.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut why).unwrap();
            }
            panic!(
                "these tests need a fresh network namespace (GigE Vision discovery broadcasts on \
                 every interface) and `unshare -n` is not permitted here ({status}: {}); run \
                 them as root or with CAP_SYS_ADMIN. They do not fall back to the host network.",
                why.trim()
            );
        }
        let ns = NetNs { holder };
        let up = ns.cmd("ip").args(["link", "set", "lo", "up"]).status();
        assert!(
            up.is_ok_and(|s| s.success()),
            "cannot bring up loopback in the namespace (ip from iproute2 is needed)"
        );
        ns
    }

    /// A command that runs inside the namespace.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.holder.id().to_string(), "-n", program]);
        c
    }

    fn simulator(&self, serial: &str, extra: &[&str]) -> Child {
        assert!(
            Command::new(SIMULATOR).arg("--help").output().is_ok(),
            "{SIMULATOR} is missing: apt-get install aravis-tools"
        );
        let child = self
            .cmd(SIMULATOR)
            .args(["-i", "127.0.0.1", "-s", serial])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        child
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn config(dir: &Path, serial: &str, genicam: &str) -> PathBuf {
    let path = dir.join("genicam.toml");
    let text = format!(
        "[sample]\nid = \"gige\"\n[source]\nkind = \"genicam\"\n\
         [source.genicam]\ncamera = \"{serial}\"\nframe_timeout_secs = 1.0\n{genicam}\n\
         [publish]\nfile = \"{}\"\n[report]\nsummary_file = \"{}\"\n\
         [pipeline]\nstatus_interval_secs = 0.5\n",
        dir.join("records.jsonl").display(),
        dir.join("summary.json").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// The daemon in the namespace, its log lines collected as they come.
struct Daemon {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(ns: &NetNs, config: &Path) -> Daemon {
        let mut child = ns
            .cmd(env!("CARGO_BIN_EXE_spermscope"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info,ort=warn")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (err, sink) = (child.stderr.take().unwrap(), log.clone());
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        Daemon {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// Wait until a log line contains `text`; the log so far when it does not come in time.
    fn wait_for(&self, text: &str, secs: u64) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            if self.log.lock().unwrap().iter().any(|l| l.contains(text)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no log line with '{text}' in {secs} s:\n{}",
            self.log().join("\n")
        );
    }

    /// Frames published as the last status line says.
    fn frames(&self) -> u64 {
        self.log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find_map(|l| {
                let s = l.split("status: ").nth(1)?;
                s.split(", ").nth(1)?.strip_suffix(" frames")?.parse().ok()
            })
            .unwrap_or(0)
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then the exit status and the run summary.
    fn finish(mut self, dir: &Path) -> Value {
        common::sigterm(&self.child);
        let status = self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        assert!(
            status.success(),
            "exit {status}:\n{}",
            self.log().join("\n")
        );
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
    }
}

fn wait_frames(d: &Daemon, more_than: u64, secs: u64) -> u64 {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        let n = d.frames();
        if n > more_than {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "frames stayed at {} (wanted more than {more_than}):\n{}",
        d.frames(),
        d.log().join("\n")
    );
}

fn balanced(c: &Value) -> bool {
    let dropped: u64 = c["frames_dropped_total"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    c["frames_seen_total"].as_u64().unwrap()
        == c["frames_published_total"].as_u64().unwrap() + dropped
}

#[test]
fn cameras_lists_the_simulated_camera_with_its_formats() {
    let ns = NetNs::new();
    let mut sim = ns.simulator("LISTME", &[]);
    let out = ns
        .cmd(env!("CARGO_BIN_EXE_spermscope"))
        .arg("cameras")
        .output()
        .unwrap();
    stop(&mut sim);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Aravis-Fake-LISTME"), "{text}");
    assert!(text.contains("serial LISTME"), "{text}");
    for f in ["Mono8", "Mono16", "RGB8", "BayerRG8"] {
        assert!(text.contains(f), "{f} missing:\n{text}");
    }
}

/// Streams in a Bayer format, loses the camera, and gets it back.
#[test]
fn a_genicam_camera_streams_and_is_reconnected_after_it_goes_away() {
    let ns = NetNs::new();
    let dir = tempfile::tempdir().unwrap();
    let mut sim = ns.simulator("RECON", &[]);
    let cfg = config(dir.path(), "RECON", "pixel_format = \"BayerRG8\"\n");
    let d = Daemon::start(&ns, &cfg);
    d.wait_for("camera opened", 30);
    let before = wait_frames(&d, 10, 30);
    stop(&mut sim);
    d.wait_for("camera lost; retrying with backoff", 10);
    std::thread::sleep(Duration::from_millis(1500));
    let mut sim = ns.simulator("RECON", &[]);
    d.wait_for("camera back; capture resumes", 30);
    let after_loss = d.frames();
    wait_frames(&d, after_loss + 10, 30);
    let summary = d.finish(dir.path());
    stop(&mut sim);
    let c = &summary["counts"];
    assert!(c["source_disconnects_total"].as_u64().unwrap() >= 1, "{c}");
    assert!(c["source_reconnects_total"].as_u64().unwrap() >= 1, "{c}");
    assert!(
        c["frames_published_total"].as_u64().unwrap() > before + 10,
        "{c}"
    );
    assert!(
        c["frames_dropped_total"].get("undecodable").is_none(),
        "{c}"
    );
    assert!(balanced(c), "{c}");
    // Bayer frames demosaiced to RGB reached the records' frames.
    let records = std::fs::read_to_string(dir.path().join("records.jsonl")).unwrap();
    for l in records.lines() {
        let r: Value = serde_json::from_str(l).unwrap();
        assert!(r["frame"]["name"].as_str().unwrap().starts_with("camera-"));
    }
}

/// Mono16 and RGB8 through the real protocol (Mono8 is the simulator's own format).
#[test]
fn mono16_and_rgb8_frames_are_read() {
    let ns = NetNs::new();
    for format in ["Mono16", "RGB8", "Mono8"] {
        let dir = tempfile::tempdir().unwrap();
        let mut sim = ns.simulator("FMT", &[]);
        let cfg = config(
            dir.path(),
            "FMT",
            &format!(
                "pixel_format = \"{format}\"\nsignificant_bits = 16\nroi = [0, 0, 320, 240]\n"
            ),
        );
        let d = Daemon::start(&ns, &cfg);
        wait_frames(&d, 5, 30);
        let log = d.log().join("\n");
        let summary = d.finish(dir.path());
        stop(&mut sim);
        let c = &summary["counts"];
        assert!(
            c["frames_published_total"].as_u64().unwrap() > 5,
            "{format}: {c}"
        );
        assert!(
            c["frames_dropped_total"].get("undecodable").is_none(),
            "{format}: {c}\n{log}"
        );
        assert!(balanced(c), "{format}: {c}");
        assert!(
            log.contains(&format!("pixel format {format}, region 320x240")),
            "{log}"
        );
    }
}

/// Packets lost on purpose, no resend: the frames that miss some are counted and skipped.
#[test]
fn lost_packets_make_incomplete_frames_that_are_counted_and_skipped() {
    let ns = NetNs::new();
    let dir = tempfile::tempdir().unwrap();
    // 3 packets in a thousand lost: about 188 packets a frame, so roughly half the frames.
    let mut sim = ns.simulator("LOSSY", &["--gvsp-lost-ratio", "3"]);
    let cfg = config(dir.path(), "LOSSY", "packet_resend = false\n");
    let d = Daemon::start(&ns, &cfg);
    wait_frames(&d, 15, 40);
    let summary = d.finish(dir.path());
    stop(&mut sim);
    let c = &summary["counts"];
    let incomplete = c["frames_dropped_total"]["incomplete"]
        .as_u64()
        .unwrap_or(0);
    assert!(incomplete > 0, "{c}");
    assert!(c["frames_published_total"].as_u64().unwrap() > 15, "{c}");
    assert!(balanced(c), "{c}");
}
