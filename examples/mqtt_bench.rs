//! MQTT sink throughput for `scripts/bench`: N record-sized messages through the daemon's
//! MQTT sink (`daemon::mqtt`) to a broker on loopback, and a subscriber counting them. Prints
//! records/s until the broker has acknowledged them all (QoS 1) and until the subscriber has
//! them all.
//!
//!   cargo run --release --example mqtt_bench -- PORT [N]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
use spermscope::daemon::check::Base;
use spermscope::daemon::mqtt::{Mqtt, RawMqtt};
use spermscope::daemon::telemetry::Telemetry;

/// A cell record of the usual size (about 800 bytes).
fn record(i: usize) -> String {
    format!(
        r#"{{"sample":"bench","kind":"cell","track":{i},"frame":{{"seq":{i},"name":"{i:06}.jpg"}},"timestamp":"2026-11-29T12:00:00.000Z","cell":0,"bbox":[100,200,160,260],"at_edge":false,"touching":false,"centroid":[130.2,230.7],"angle_deg":91.3,"morphometry":{{"head_length_um":4.61,"head_width_um":2.93,"head_area_um2":10.52,"head_perimeter_um":12.4,"ellipticity":1.57}},"class":"normal_sperm","normal":true,"confidence":0.81,"probs":{{"abnormal_sperm":0.12,"non-sperm":0.07,"normal_sperm":0.81}},"model":{{"name":"smids-3class","sha256":"5b2c0f6a1e4d9b7c3a8e2f1d0c9b8a7e6f5d4c3b2a1908f7e6d5c4b3a2918f7e"}},"latency_ms":41.25,"frames_seen":6,"first_seq":{i},"classified_frames":5}}"#
    )
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().context("usage: mqtt_bench PORT [N]")?.parse()?;
    let n: usize = args.next().map_or(Ok(20_000), |a| a.parse())?;
    // The subscriber first, so every message has a reader.
    let received = Arc::new(AtomicUsize::new(0));
    let mut opts = MqttOptions::new("bench-subscriber", "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 100);
    client.subscribe("bench/bench/cells", QoS::AtLeastOnce)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let count = received.clone();
    let reader = std::thread::Builder::new()
        .name("subscriber".into())
        .spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = tx.send(());
                    }
                    Ok(Event::Incoming(Incoming::Publish(_))) => {
                        if count.fetch_add(1, Ordering::Relaxed) + 1 == n {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        })?;
    rx.recv_timeout(Duration::from_secs(10))
        .context("the subscriber did not subscribe")?;

    let raw = RawMqtt {
        broker: Some(format!("mqtt://127.0.0.1:{port}")),
        topic_prefix: "bench".into(),
        queue: n + 16,
        ..RawMqtt::default()
    };
    let settings = raw
        .resolve(Base(None))?
        .context("a broker is set")?
        .for_sample("bench")?;
    let telemetry = Arc::new(Telemetry::new());
    let sink = Mqtt::start(&settings, telemetry.clone())?;
    let lines: Vec<String> = (0..n).map(record).collect();
    let t = Instant::now();
    for chunk in lines.chunks(64) {
        sink.records(chunk);
    }
    let queued = t.elapsed();
    let mut acked_at = None;
    while t.elapsed() < Duration::from_secs(120) {
        let c = telemetry.counts();
        if acked_at.is_none() && c.mqtt_messages_delivered_total as usize >= n {
            acked_at = Some(t.elapsed());
        }
        if acked_at.is_some() && received.load(Ordering::Relaxed) >= n {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let subscribed_at = t.elapsed();
    let (Some(acked), true) = (acked_at, received.load(Ordering::Relaxed) >= n) else {
        bail!(
            "not all {n} messages arrived: {} acknowledged, {} received",
            telemetry.counts().mqtt_messages_delivered_total,
            received.load(Ordering::Relaxed)
        );
    };
    drop(sink);
    let _ = reader.join();
    let dropped: u64 = telemetry
        .counts()
        .mqtt_messages_dropped_total
        .values()
        .sum();
    println!(
        "MQTT sink, {n} records of {} bytes, broker on loopback (QoS 1): queued in {:.1} ms; \
         acknowledged by the broker {:.0} records/s; at the subscriber {:.0} records/s; dropped {dropped}",
        lines[0].len(),
        queued.as_secs_f64() * 1e3,
        n as f64 / acked.as_secs_f64(),
        n as f64 / subscribed_at.as_secs_f64()
    );
    Ok(())
}
