//! The MQTT sink against a real broker: Debian's `mosquitto`, bound to 127.0.0.1 on a free
//! port. Every record must arrive exactly as the records file has it, in order, also across a
//! broker restart while the daemon runs; the report arrives retained; a broker that is not
//! there never holds the pipeline up, and what is given up is counted; TLS with a password
//! from a file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, Incoming, MqttOptions, QoS, Transport};
use serde_json::Value;

/// A mosquitto on 127.0.0.1:PORT with persistence in `dir` (subscriptions and queued messages
/// survive a restart, as a lab broker's would).
struct Broker {
    conf: PathBuf,
    child: Option<Child>,
}

impl Broker {
    fn start(dir: &Path, port: u16, extra: &str) -> Broker {
        assert!(
            Path::new("/usr/sbin/mosquitto").exists(),
            "mosquitto is missing: apt-get install mosquitto"
        );
        let conf = dir.join("mosquitto.conf");
        // Run as the test's user (as root, mosquitto would switch to its own user, which
        // cannot read the test's files).
        let me = Command::new("id").arg("-un").output().unwrap();
        let me = String::from_utf8_lossy(&me.stdout).trim().to_string();
        let text = format!(
            "user {me}\nlistener {port} 127.0.0.1\npersistence true\npersistence_location {}/\n\
             max_queued_messages 100000\nmax_inflight_messages 100\n{extra}",
            dir.display()
        );
        std::fs::write(&conf, text).unwrap();
        let mut b = Broker { conf, child: None };
        b.restart(port);
        b
    }

    fn restart(&mut self, port: u16) {
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM: mosquitto saves its persistence file and exits.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("sh")
                .arg("-c")
                .arg(format!("kill -TERM {}", c.id()))
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Received messages: topic, payload, retain flag.
type Got = Arc<Mutex<Vec<(String, String, bool)>>>;

/// A subscriber with a persistent session (clean_session = false): it keeps receiving across
/// broker restarts, and the broker queues for it while it reconnects.
fn subscribe(opts: MqttOptions, filter: &str) -> (Got, Arc<Mutex<bool>>) {
    let got: Got = Arc::default();
    let subscribed = Arc::new(Mutex::new(false));
    let (client, mut conn) = Client::new(opts, 100);
    client.subscribe(filter, QoS::AtLeastOnce).unwrap();
    let (g, s) = (got.clone(), subscribed.clone());
    std::thread::spawn(move || {
        let _client = client;
        loop {
            match conn.recv() {
                Ok(Ok(Event::Incoming(Incoming::Publish(p)))) => g.lock().unwrap().push((
                    p.topic.clone(),
                    String::from_utf8(p.payload.to_vec()).unwrap(),
                    p.retain,
                )),
                Ok(Ok(Event::Incoming(Incoming::SubAck(_)))) => *s.lock().unwrap() = true,
                Ok(Ok(_)) => {}
                Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                Err(_) => return,
            }
        }
    });
    (got, subscribed)
}

fn wait_until(what: &str, secs: u64, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(secs), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_spermscope"));
    c.env("RUST_LOG", "info,ort=warn");
    c
}

/// A replay config publishing to the broker; `frames` sperm-parsing val fields.
fn config(dir: &Path, broker: &str, frames: &str, fps: f32, mqtt_extra: &str) -> PathBuf {
    let path = dir.join("mqtt.toml");
    let text = format!(
        "[sample]\nid = \"scope-1\"\n[source.replay]\npath = \"{}\"\nfps = {fps}\n\
         [publish]\nfile = \"{}\"\n[publish.mqtt]\nbroker = \"{broker}\"\ntopic_prefix = \"lab\"\n{mqtt_extra}\n\
         [report]\nfile = \"{}\"\nsummary_file = \"{}\"\n[pipeline]\nstatus_interval_secs = 0.5\n",
        common::dataset("sperm-parsing/val/frames")
            .join(frames)
            .display(),
        dir.join("records.jsonl").display(),
        dir.join("report.json").display(),
        dir.join("summary.json").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Messages on one topic in arrival order, with repeats of the same message dropped (QoS 1 is
/// at least once: a message the broker had taken but not acknowledged when it went down comes
/// again), and how many repeats there were.
fn on_topic(got: &[(String, String, bool)], topic: &str) -> (Vec<String>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut repeats = 0;
    for (t, p, _) in got.iter().filter(|(t, _, _)| t == topic) {
        if seen.insert(p.clone()) {
            out.push(p.clone());
        } else {
            repeats += 1;
        }
        let _ = t;
    }
    (out, repeats)
}

#[test]
fn every_record_arrives_in_order_across_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut broker = Broker::start(dir.path(), port, "allow_anonymous true\n");
    let mut opts = MqttOptions::new("test-subscriber", "127.0.0.1", port);
    opts.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (got, subscribed) = subscribe(opts, "lab/scope-1/#");
    wait_until("subscribed", 10, || *subscribed.lock().unwrap());
    // 42 fields at 10 frames/s: the broker goes away for a while in the middle.
    let cfg = config(
        dir.path(),
        &format!("mqtt://127.0.0.1:{port}"),
        "00[0-2]*.jpg",
        10.0,
        "",
    );
    let mut daemon = bin().args(["run", "--config"]).arg(&cfg).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    broker.stop();
    std::thread::sleep(Duration::from_millis(1500));
    broker.restart(port);
    let status = daemon.wait().unwrap();
    assert!(status.success(), "daemon exit {status}");
    let records: Vec<String> = std::fs::read_to_string(dir.path().join("records.jsonl"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let (cells, detections): (Vec<String>, Vec<String>) = records
        .iter()
        .cloned()
        .partition(|l| serde_json::from_str::<Value>(l).unwrap()["kind"] == "cell");
    assert!(
        cells.len() > 20 && detections.len() >= cells.len(),
        "{}",
        records.len()
    );
    wait_until("every record at the subscriber", 20, || {
        let g = got.lock().unwrap();
        on_topic(&g, "lab/scope-1/cells").0.len() >= cells.len()
            && on_topic(&g, "lab/scope-1/detections").0.len() >= detections.len()
    });
    let g = got.lock().unwrap().clone();
    let (got_cells, rc) = on_topic(&g, "lab/scope-1/cells");
    let (got_detections, rd) = on_topic(&g, "lab/scope-1/detections");
    // Byte for byte the records file's lines, in its order.
    assert_eq!(got_cells, cells);
    assert_eq!(got_detections, detections);
    eprintln!(
        "{} cell and {} detection messages; repeats after the restart: {rc} and {rd}",
        cells.len(),
        detections.len()
    );
    // The report as the report file has it, and the last status says stopped.
    let summary = json(&dir.path().join("summary.json"));
    let c = &summary["counts"];
    assert!(c["mqtt_disconnects_total"].as_u64().unwrap() >= 1, "{c}");
    assert!(
        c["mqtt_messages_dropped_total"]
            .as_object()
            .unwrap()
            .is_empty(),
        "{c}"
    );
    wait_until("the report and the final status", 10, || {
        let g = got.lock().unwrap();
        g.iter().any(|(t, _, _)| t == "lab/scope-1/report")
            && g.iter()
                .any(|(t, p, _)| t == "lab/scope-1/status" && p.contains("stopped"))
    });
    let g = got.lock().unwrap().clone();
    let report = g
        .iter()
        .rev()
        .find(|(t, _, _)| t == "lab/scope-1/report")
        .unwrap();
    let report: Value = serde_json::from_str(&report.1).unwrap();
    assert_eq!(report, json(&dir.path().join("report.json")));
    let statuses: Vec<Value> = g
        .iter()
        .filter(|(t, _, _)| t == "lab/scope-1/status")
        .map(|(_, p, _)| serde_json::from_str(p).unwrap())
        .collect();
    let last = statuses.last().unwrap();
    assert_eq!(last["state"], "stopped");
    assert_eq!(last["cells"].as_u64().unwrap(), cells.len() as u64);
    assert!(last.get("drift_suspected").is_some());

    // A dashboard that connects later gets the retained report and status at once.
    let mut late = MqttOptions::new("late-dashboard", "127.0.0.1", port);
    late.set_max_packet_size(1 << 20, 1 << 20);
    let (later, _) = subscribe(late, "lab/+/report");
    wait_until("the retained report", 10, || {
        !later.lock().unwrap().is_empty()
    });
    let (_, payload, retained) = later.lock().unwrap()[0].clone();
    assert!(retained);
    assert_eq!(serde_json::from_str::<Value>(&payload).unwrap(), report);
}

#[test]
fn a_broker_that_is_not_there_never_holds_the_pipeline_up() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on this port.
    let port = common::free_port();
    let cfg = config(
        dir.path(),
        &format!("mqtt://127.0.0.1:{port}"),
        "000*.jpg",
        0.0,
        "queue = 5\ndrain_secs = 0.5\n",
    );
    let t = Instant::now();
    let out = bin().args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = json(&dir.path().join("summary.json"));
    let c = &summary["counts"];
    assert_eq!(c["frames_seen_total"], c["frames_published_total"], "{c}");
    let dropped: BTreeMap<String, u64> =
        serde_json::from_value(c["mqtt_messages_dropped_total"].clone()).unwrap();
    let records = std::fs::read_to_string(dir.path().join("records.jsonl")).unwrap();
    // Records, status lines and the report: the first five waited, the rest were dropped.
    assert_eq!(dropped["unsent_at_exit"], 5, "{c}");
    assert!(
        dropped["queue_full"] as usize + 5 > records.lines().count(),
        "{c}"
    );
    assert_eq!(c["mqtt_messages_delivered_total"], 0);
    // The run took what the frames take plus the drain time, not a broker timeout.
    assert!(t.elapsed() < Duration::from_secs(60));
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(log.matches("MQTT queue full").count(), 1, "{log}");
}

/// A CA, a server certificate for localhost signed by it, and a mosquitto password file.
fn make_certs(d: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    ]);
    let pw = Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(d.join("passwd"))
        .args(["scope", "pa:ss word"])
        .status()
        .expect("mosquitto_passwd (package mosquitto) is needed");
    assert!(pw.success());
}

#[test]
fn tls_with_a_password_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certs(d);
    std::fs::write(d.join("credentials"), "scope\npa:ss word\n").unwrap();
    let port = common::free_port();
    let extra = format!(
        "allow_anonymous false\npassword_file {0}/passwd\ncafile {0}/ca.pem\n\
         certfile {0}/server.pem\nkeyfile {0}/server.key\n",
        d.display()
    );
    let _broker = Broker::start(d, port, &extra);
    let mut opts = MqttOptions::new("tls-subscriber", "localhost", port);
    opts.set_credentials("scope", "pa:ss word")
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_transport(Transport::tls(
            std::fs::read(d.join("ca.pem")).unwrap(),
            None,
            None,
        ));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (got, subscribed) = subscribe(opts, "lab/scope-1/cells");
    wait_until("subscribed over TLS", 10, || *subscribed.lock().unwrap());
    let cfg = config(
        d,
        &format!("mqtts://localhost:{port}"),
        "000*.jpg",
        0.0,
        &format!(
            "ca_file = \"{0}/ca.pem\"\ncredentials_file = \"{0}/credentials\"\n",
            d.display()
        ),
    );
    let out = bin().args(["run", "--config"]).arg(&cfg).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cells: Vec<String> = std::fs::read_to_string(d.join("records.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"cell\""))
        .map(str::to_string)
        .collect();
    assert!(!cells.is_empty());
    wait_until("the cells over TLS", 10, || {
        got.lock().unwrap().len() >= cells.len()
    });
    let g: Vec<String> = got.lock().unwrap().iter().map(|m| m.1.clone()).collect();
    assert_eq!(g, cells);
}
