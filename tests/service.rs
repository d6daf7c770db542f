//! The daemon as a service, driving the real binary: the systemd unit verifies, the notify
//! protocol (READY, STATUS, WATCHDOG, RELOADING, STOPPING) reaches a test NOTIFY_SOCKET,
//! SIGHUP swaps the model between batches without losing a frame (and a bad reload is
//! refused), and /metrics and /healthz answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_spermscope");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn frames() -> String {
    common::dataset("sperm-parsing/val/frames")
        .display()
        .to_string()
}

/// The records of one kind (`detection` or `cell`) in a records file.
fn records_of(path: &Path, kind: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == kind)
        .collect()
}

fn daemon_config(dir: &Path, extra: &str) -> PathBuf {
    let cfg = dir.join("spermscope.toml");
    std::fs::write(
        &cfg,
        format!(
            "[sample]\nid = \"svc\"\n[source.replay]\npath = \"{}\"\nfps = 12.0\nrepeat = true\n\
             [publish]\nfile = \"records.jsonl\"\n[report]\nprint = false\nsummary_file = \"summary.json\"\n\
             [pipeline]\nstatus_interval_secs = 0.3\n{extra}",
            frames()
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(root().join("systemd/spermscope.service")).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("RestartPreventExitStatus=78"));
    assert!(unit.contains("ExecStartPre=/usr/local/bin/spermscope validate"));
    // Point the unit at the binary and config under test, so verify can check the commands.
    let cfg = daemon_config(dir.path(), "");
    let unit = unit.replace("/usr/local/bin/spermscope", BIN).replace(
        "/etc/spermscope/spermscope.toml",
        &cfg.display().to_string(),
    );
    let path = dir.path().join("spermscope.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is needed (.ci/run installs systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about other units on the host are not ours.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("spermscope.service"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
}

#[test]
fn notify_protocol_and_reload_without_losing_frames() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let cfg = daemon_config(dir.path(), "");
    let mut child = common::spawn_watched(
        BIN,
        &cfg,
        &sock_path,
        "400000",
        "info,ort=warn",
        Stdio::piped(),
    );
    let mut messages: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut pump = |until: Duration, messages: &mut Vec<String>| {
        let t = Instant::now();
        while t.elapsed() < until {
            if let Ok(n) = sock.recv(&mut buf) {
                messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    };
    pump(Duration::from_millis(2500), &mut messages);
    // Swap in the HuSHeM model.
    let hushem = root().join("models/hushem-4class.onnx");
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap()
            + &format!("[classify]\nmodel = \"{}\"\n", hushem.display()),
    )
    .unwrap();
    common::signal(&child, "-HUP");
    pump(Duration::from_millis(2500), &mut messages);
    // A broken config is refused; the daemon runs on.
    std::fs::write(&cfg, "[classify]\nmodel = 3\n").unwrap();
    common::signal(&child, "-HUP");
    pump(Duration::from_millis(1200), &mut messages);
    common::signal(&child, "-TERM");
    pump(Duration::from_millis(600), &mut messages);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stderr}");
    pump(Duration::from_millis(200), &mut messages);

    let has = |m: &str| messages.iter().any(|x| x.lines().any(|l| l.starts_with(m)));
    assert!(has("READY=1"), "{messages:?}");
    assert!(has("STATUS="), "{messages:?}");
    assert!(has("WATCHDOG=1"), "{messages:?}");
    assert!(has("RELOADING=1"), "{messages:?}");
    assert!(has("STOPPING=1"), "{messages:?}");
    assert!(stderr.contains("reload refused"), "{stderr}");

    let recs = records_of(&dir.path().join("records.jsonl"), "detection");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap())
            .unwrap();
    let c = &summary["counts"];
    assert_eq!(c["reloads_total"], 1, "{c}");
    assert_eq!(c["reload_failures_total"], 1, "{c}");
    assert_eq!(
        c["frames_seen_total"], c["frames_published_total"],
        "a recorded source loses no frame: {c}"
    );
    assert_eq!(
        c["cells_published_total"].as_u64().unwrap() as usize,
        recs.len()
    );
    // Records name the model that classified them, and the swap happened once, between frames.
    let model_of = |r: &Value| r["model"]["name"].as_str().map(str::to_string);
    let seq = |r: &Value| r["frame"]["seq"].as_u64().unwrap();
    let smids: Vec<&Value> = recs
        .iter()
        .filter(|r| model_of(r).as_deref() == Some("smids-3class"))
        .collect();
    let hush: Vec<&Value> = recs
        .iter()
        .filter(|r| model_of(r).as_deref() == Some("hushem-4class"))
        .collect();
    assert!(
        !smids.is_empty() && !hush.is_empty(),
        "{} / {}",
        smids.len(),
        hush.len()
    );
    let last_smids = smids.iter().map(|r| seq(r)).max().unwrap();
    let first_hush = hush.iter().map(|r| seq(r)).min().unwrap();
    assert!(last_smids < first_hush, "{last_smids} vs {first_hush}");
    for r in &hush {
        let probs = r["probs"].as_object().unwrap();
        assert!(probs.contains_key("tapered"), "{r}");
    }
}

fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out)
}

#[test]
fn metrics_and_health_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    // One frame every 2 s: /healthz sees the source stall between frames.
    let cfg = daemon_config(
        dir.path(),
        &format!("[service]\nmetrics_addr = \"127.0.0.1:{port}\"\nstall_secs = 0.8\n"),
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("fps = 12.0", "fps = 0.5");
    std::fs::write(&cfg, text).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let (code, body) = loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            drop(s.write_all(b""));
            break http_get(port, "/healthz");
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "endpoint never came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code == 200 || code == 503, "{body}");
    std::thread::sleep(Duration::from_millis(1300));
    let (code, body) = http_get(port, "/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("stalled"), "{body}");
    let (code, body) = http_get(port, "/metrics");
    assert_eq!(code, 200);
    for needle in [
        "spermscope_frames_seen_total{sample=\"svc\"} 1",
        "spermscope_model_info{sample=\"svc\",name=\"smids-3class\"",
        "spermscope_queue_depth{sample=\"svc\",stage=\"segment\"}",
        "spermscope_stage_latency_seconds_bucket{sample=\"svc\",stage=\"segment\",le=\"+Inf\"} 1",
        "# TYPE spermscope_frames_dropped_total counter",
        "spermscope_estimated_accuracy{sample=\"svc\"} 0.",
        "spermscope_drift_suspected{sample=\"svc\"} 0",
    ] {
        assert!(body.contains(needle), "'{needle}' not in:\n{body}");
    }
    let (code, _) = http_get(port, "/nothing");
    assert_eq!(code, 404);
    common::signal(&child, "-TERM");
    assert!(child.wait().unwrap().success());
}

#[test]
fn several_microscopes_keep_their_records_and_reports_apart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("two.toml");
    let val = common::dataset("sperm-parsing/val/frames");
    std::fs::write(
        &cfg,
        format!(
            "[report]\nprint = false\n\
             [[microscopes]]\nsample = \"scope-a\"\nrecords_file = \"a.jsonl\"\nreport_file = \"a.json\"\n\
             [microscopes.source.replay]\npath = \"{}/000*.jpg\"\n\
             [[microscopes]]\nsample = \"scope-b\"\nrecords_file = \"b.jsonl\"\nreport_file = \"b.json\"\n\
             [microscopes.source.replay]\npath = \"{}/003*.jpg\"\n",
            val.display(),
            val.display()
        ),
    )
    .unwrap();
    common::run_ok(Command::new(BIN).args(["run", "--config"]).arg(&cfg));
    for (sample, prefix, frames) in [("scope-a", "000", 8), ("scope-b", "003", 2)] {
        let tag = &sample[6..];
        let path = dir.path().join(format!("{tag}.jsonl"));
        let recs = records_of(&path, "detection");
        assert!(!recs.is_empty());
        assert!(recs.iter().all(|r| r["sample"] == sample));
        assert!(
            recs.iter()
                .all(|r| r["frame"]["name"].as_str().unwrap().starts_with(prefix))
        );
        let seqs: std::collections::BTreeSet<u64> = recs
            .iter()
            .map(|r| r["frame"]["seq"].as_u64().unwrap())
            .collect();
        assert!(seqs.len() <= frames && seqs.iter().all(|&s| s <= frames as u64));
        let report: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("{tag}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(report["sample"], sample);
        assert_eq!(
            report["cells_recorded"].as_u64().unwrap() as usize,
            records_of(&path, "cell").len()
        );
        assert_eq!(report["detections"].as_u64().unwrap() as usize, recs.len());
    }
    // A second microscope with the same sample id is refused before anything runs.
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("scope-b", "scope-a");
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new(BIN)
        .args(["validate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("microscopes"));
}

/// The overall exposure `systemd-analyze security --offline=true` gives a unit file.
fn exposure(unit: &Path) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .expect("systemd-analyze is needed (.ci/run installs systemd)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{text}"));
    // "→ Overall exposure level for spermscope.service: 1.5 OK 🙂"
    let after = line.rsplit_once(": ").unwrap().1;
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number in '{line}'"))
}

#[test]
fn systemd_unit_exposure_is_at_most_2() {
    let unit = root().join("systemd/spermscope.service");
    let score = exposure(&unit);
    println!("systemd-analyze security exposure: {score}");
    assert!(score <= 2.0, "exposure {score} is above 2.0");
    // The measure can fail: without the system-call filter the same unit is above 2.0.
    let dir = tempfile::tempdir().unwrap();
    let loose = dir.path().join("spermscope.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    let text: String = text
        .lines()
        .filter(|l| {
            !l.starts_with("SystemCallFilter=") && !l.starts_with("MemoryDenyWriteExecute=")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&loose, text).unwrap();
    assert!(exposure(&loose) > 2.0);
}

/// The unit's process-level sandbox (system-call filter, address families, W^X memory, no
/// capabilities, no new privileges, umask) applied by `scripts/sandbox-exec` without systemd:
/// the daemon loads its model, classifies, serves /metrics on loopback and writes its records.
#[test]
fn the_daemon_runs_in_the_units_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let cfg = daemon_config(
        dir.path(),
        &format!("[service]\nmetrics_addr = \"127.0.0.1:{port}\"\n"),
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("repeat = true", "repeat = false")
        .replace("fps = 12.0", "fps = 0.0")
        .replace(&frames(), &format!("{}/00*.jpg", frames()));
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new("/usr/bin/python3")
        .arg(root().join("scripts/sandbox-exec"))
        .arg(root().join("systemd/spermscope.service"))
        .arg("--")
        .arg(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info,ort=warn")
        .output()
        .expect("python3 is needed (.ci/run installs python3-seccomp)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MemoryDenyWriteExecute=yes") && stderr.contains("SystemCallFilter ("),
        "the sandbox was not applied (python3-seccomp installed?):\n{stderr}"
    );
    assert!(out.status.success(), "{stderr}");
    let recs = records_of(&dir.path().join("records.jsonl"), "detection");
    assert!(
        recs.iter().any(|r| r["model"]["name"] == "smids-3class"),
        "no classified record under the sandbox:\n{stderr}"
    );
    // The umask reached the files the daemon made.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(dir.path().join("records.jsonl"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "records file mode {mode:o}");
}

/// A line that starts with the formatter's timestamp ("2026-01-31T...").
fn stamped(line: &str) -> bool {
    let b = line.as_bytes();
    b.len() > 11 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T'
}

#[test]
fn logs_have_colour_only_on_a_terminal_and_no_timestamps_under_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let few = format!("{}/000*.jpg", frames());
    let replay = |records: &str| {
        let mut c = Command::new(BIN);
        c.args(["replay", &few, "--records"])
            .arg(dir.path().join(records))
            .env("RUST_LOG", "info,ort=warn")
            .env_remove("NO_COLOR")
            .env_remove("JOURNAL_STREAM");
        c
    };
    // Piped: plain lines with our timestamps.
    let out = replay("a.jsonl").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("INFO"), "{err}");
    assert!(!err.contains("\x1b["), "colour in piped logs:\n{err}");
    assert!(err.lines().any(stamped), "{err}");

    // On a terminal (script(1) gives the daemon a pty): colour, unless NO_COLOR says no.
    let on_tty = |no_color: Option<&str>| {
        let mut c = Command::new("script");
        c.args(["-qec"])
            .arg(format!(
                "'{BIN}' replay '{few}' --records '{}'",
                dir.path().join("t.jsonl").display()
            ))
            .arg("/dev/null")
            .env("RUST_LOG", "info,ort=warn")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NO_COLOR");
        if let Some(v) = no_color {
            c.env("NO_COLOR", v);
        }
        let out = c.output().expect("script(1) from util-linux is needed");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tty = on_tty(None);
    assert!(tty.contains("\x1b["), "no colour on a terminal:\n{tty}");
    let tty = on_tty(Some("1"));
    assert!(tty.contains("INFO") && !tty.contains("\x1b["), "{tty}");

    // Standard error is the journal's stream (JOURNAL_STREAM names its device and inode).
    let log = dir.path().join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    let stream = format!(
        "{}:{}",
        std::os::unix::fs::MetadataExt::dev(&meta),
        std::os::unix::fs::MetadataExt::ino(&meta)
    );
    let status = replay("b.jsonl")
        .env("JOURNAL_STREAM", &stream)
        .stderr(file)
        .status()
        .unwrap();
    assert!(status.success());
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(!err.contains("\x1b["), "{err}");
    assert!(
        !err.lines().any(stamped),
        "our timestamps under the journal:\n{err}"
    );
    if !Path::new("/run/systemd/journal/socket").exists() {
        // No journal socket: the lines fall back to standard error.
        assert!(err.contains("INFO"), "{err}");
    }
}

/// A listener beyond loopback is served, with a WARN naming it. The daemon runs in a fresh
/// network namespace (`unshare -n`), so the wildcard address reaches no real network.
#[test]
fn a_listener_beyond_loopback_is_logged_as_exposed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon_config(
        dir.path(),
        "[service]\nmetrics_addr = \"0.0.0.0:9464\"\nview_addr = \"127.0.0.1:9465\"\n",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("repeat = true", "repeat = false")
        .replace("fps = 12.0", "fps = 0.0")
        .replace(&frames(), &format!("{}/000*.jpg", frames()));
    std::fs::write(&cfg, text).unwrap();
    let out = Command::new("unshare")
        .args(["-n", BIN, "run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info,ort=warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "unshare -n (root or a user namespace) is needed:\n{stderr}"
    );
    let exposed: Vec<&str> = stderr.lines().filter(|l| l.contains("exposed")).collect();
    assert_eq!(exposed.len(), 1, "{stderr}");
    assert!(
        exposed[0].contains("WARN")
            && exposed[0].contains("metrics endpoint")
            && exposed[0].contains("0.0.0.0:9464"),
        "{stderr}"
    );
}
