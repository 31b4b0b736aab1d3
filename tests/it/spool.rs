//! `ack:` policies and the store-and-forward spool, with real faults: RabbitMQ behind a TCP
//! proxy the test cuts and restores, an HTTP endpoint (axum) that refuses connections, then
//! answers 503, then 200, and the real binary killed with SIGKILL mid-stream. Devices are the
//! raw MQTT client on mqgate's codec, so the tests see exactly which PUBACKs came.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::proxy::Proxy;
use crate::support::webhook::{Reply, Webhook};
use crate::support::*;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use mqgate::config::Config;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// A gateway config: MQTT and admin on port 0, RabbitMQ at `amqp_url` as broker `rabbit`
/// (quick reconnects), a store in `store`, and `rules`.
fn config(amqp_url: &str, store: &Path, rules: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\namqp:\n  rabbit:\n    url: \"{amqp_url}\"\n    reconnect_max: 500ms\nrules:\n{rules}",
        store.display()
    )
}

/// An `ack: spool` rule from `sensors/#` to `exchange`, with `spool` settings (YAML lines
/// indented four spaces, or empty).
fn spool_rule(exchange: &str, ack: &str, spool: &str) -> String {
    format!(
        "  - name: s\n    from: \"sensors/#\"\n    ack: {ack}\n{spool}    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{exchange}\"\n"
    )
}

/// Publishes `payloads` (topic, text) at QoS 1 without waiting, then collects the PUBACKs
/// that come within `wait` of the last one; returns the acknowledged packet ids in order.
async fn publish_all(c: &mut RawClient, msgs: &[(String, String)], wait: Duration) -> Vec<u16> {
    for (i, (topic, text)) in msgs.iter().enumerate() {
        c.publish(topic, QoS::AtLeastOnce, i as u16 + 1, text.as_bytes()).await;
    }
    let mut acked = Vec::new();
    while acked.len() < msgs.len() {
        match c.recv_within(wait).await {
            Ok(Some(Packet::PubAck(a))) => acked.push(a.packet_id),
            Ok(other) => panic!("expected PUBACK, got {other:?}"),
            Err(()) => break,
        }
    }
    acked
}

/// `n` messages over `topics` topics: `sensors/<t>` with text `<t>:<i>` (i counts per topic).
fn messages(n: usize, topics: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| (format!("sensors/{}", i % topics), format!("{}:{}", i % topics, i / topics)))
        .collect()
}

/// Checks that every message of `sent` is in `got` and that, per topic, the first copies
/// come in publish order; returns the duplicates counted.
fn check_order(sent: &[(String, String)], got: &[String]) -> usize {
    let mut per_topic: HashMap<&str, Vec<u64>> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut dups = 0;
    for text in got {
        if !seen.insert(text.clone()) {
            dups += 1;
            continue;
        }
        let (t, i) = text.split_once(':').expect("topic:index");
        per_topic.entry(t).or_default().push(i.parse().expect("index"));
    }
    for (_, text) in sent {
        assert!(seen.contains(text), "message {text} never arrived (got {} messages)", got.len());
    }
    for (t, idx) in &per_topic {
        let mut sorted = idx.clone();
        sorted.sort_unstable();
        assert_eq!(idx, &sorted, "topic {t}: first copies out of order");
    }
    dups
}

/// Takes messages from `queue` until `want` distinct bodies came or `wait` passes without one.
async fn drain(ch: &lapin::Channel, queue: &str, want: usize, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    while distinct.len() < want {
        let Some(d) = get(ch, queue, wait).await else { break };
        let text = String::from_utf8_lossy(&d.data).into_owned();
        distinct.insert(text.clone());
        got.push(text);
    }
    got
}

/// A gauge or counter of `/metrics` with this exact name and label set (0 if absent).
fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_messages_survive_a_rabbitmq_outage_and_arrive_in_order() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "sensors.#").await;
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let app = gateway(&config(&proxy.url(), dir.path(), &spool_rule(&exchange, "spool", ""))).await;
    wait_ready(&app).await;

    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "spool-outage").await;
    let before = messages(20, 2);
    assert_eq!(publish_all(&mut c, &before, Duration::from_secs(5)).await.len(), 20);
    proxy.cut();
    // RabbitMQ is unreachable: the device is still acknowledged (spooled).
    let during: Vec<_> = messages(220, 2).split_off(20);
    let acked = publish_all(&mut c, &during, Duration::from_secs(5)).await;
    assert_eq!(acked.len(), during.len(), "every PUBLISH is acknowledged while RabbitMQ is down");
    let m = metrics(&app).await;
    assert!(
        metric(&m, &format!("mqgate_spool_depth_messages{{target=\"s/amqp:rabbit/{exchange}\"}}"))
            > 0.0,
        "spool holds them:\n{m}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    proxy.restore();

    let sent: Vec<_> = messages(220, 2);
    let got = drain(&ch, &queue, sent.len(), Duration::from_secs(20)).await;
    let dups = check_order(&sent, &got);
    println!("outage: {} messages, {} received, {dups} duplicates", sent.len(), got.len());
    let m = metrics(&app).await;
    assert!(
        metric(&m, &format!("mqgate_spool_retries_total{{target=\"s/amqp:rabbit/{exchange}\"}}"))
            > 0.0,
        "{m}"
    );
    app.stop().await;
}

/// The webhook server: answers 200 or 503 as `mode` says (with `with_404`, 404 to bodies
/// ending in `:bad` whatever the mode); `bodies()` is what it took (answered 2xx).
#[derive(Clone)]
struct Hook {
    mode: Arc<AtomicU8>,
    web: Webhook,
}

const HOOK_OK: u8 = 0;
const HOOK_503: u8 = 1;

impl Hook {
    fn serve(listener: TcpListener, mode: u8, with_404: bool) -> Hook {
        let mode = Arc::new(AtomicU8::new(mode));
        let m = Arc::clone(&mode);
        let web = Webhook::on(listener, move |r, _| {
            if with_404 && r.text().ends_with(":bad") {
                Reply::Status(404)
            } else if m.load(Ordering::SeqCst) == HOOK_503 {
                Reply::Status(503)
            } else {
                Reply::Status(200)
            }
        });
        Hook { mode, web }
    }

    fn bodies(&self) -> Vec<String> {
        self.web.taken_bodies()
    }
}

/// A loopback port bound but not listening: connections to it are refused until the test
/// calls `listen` on the socket (the port cannot be taken by anyone else meanwhile).
fn reserved_port() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = socket.local_addr().expect("addr");
    (socket, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_endpoint_refusing_then_503_then_up_gets_everything_in_order() {
    // A port bound but not listening yet: connections are refused.
    let (socket, addr) = reserved_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\nhttp:\n  hook:\n    url: \"http://{addr}\"\n    connect_timeout: 1s\nrules:\n  - name: h\n    from: \"sensors/#\"\n    ack: spool\n    spool:\n      replay_rate: 0\n    to:\n      - http:\n          endpoint: hook\n          concurrency: 2\n          retry: {{ attempts: 1 }}\n",
        dir.path().display()
    );
    let app = gateway(&yaml).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "spool-http").await;
    let sent = messages(60, 3);
    let acked = publish_all(&mut c, &sent[..30], Duration::from_secs(5)).await;
    assert_eq!(acked.len(), 30, "acknowledged while the endpoint refuses connections");

    // Up, but answering 503.
    let listener = socket.listen(1024).expect("listen on the endpoint's port");
    let h = Hook::serve(listener, HOOK_503, false);
    let acked = publish_all(&mut c, &sent[30..], Duration::from_secs(5)).await;
    assert_eq!(acked.len(), 30, "acknowledged while the endpoint answers 503");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(h.bodies().is_empty());
    h.mode.store(HOOK_OK, Ordering::SeqCst);

    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let got = h.bodies();
        let distinct: std::collections::HashSet<_> = got.iter().collect();
        if distinct.len() >= sent.len() || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let dups = check_order(&sent, &got);
    println!("http: {} messages, {} received, {dups} duplicates", sent.len(), got.len());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_applies_backpressure_until_room_frees() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "sensors.#").await;
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // About 40 messages of this size fit.
    let spool =
        "    spool:\n      max_bytes: 2048\n      on_full: backpressure\n      replay_rate: 0\n";
    let app =
        gateway(&config(&proxy.url(), dir.path(), &spool_rule(&exchange, "spool", spool))).await;
    wait_ready(&app).await;
    proxy.cut();
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "spool-full").await;
    let sent = messages(150, 1);
    let acked = publish_all(&mut c, &sent, Duration::from_secs(2)).await;
    assert!(
        !acked.is_empty() && acked.len() < 100,
        "PUBACKs stop when the spool is full: {} of 150",
        acked.len()
    );
    let m = metrics(&app).await;
    let bytes =
        metric(&m, &format!("mqgate_spool_depth_bytes{{target=\"s/amqp:rabbit/{exchange}\"}}"));
    assert!(bytes > 0.0 && bytes <= 2048.0, "depth within max_bytes: {bytes}\n{m}");

    proxy.restore();
    let mut rest = acked.len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while rest < sent.len() && Instant::now() < deadline {
        match c.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAck(_))) => rest += 1,
            other => panic!("expected PUBACK after room freed, got {other:?}"),
        }
    }
    assert_eq!(rest, sent.len(), "every PUBLISH acknowledged once room freed");
    let got = drain(&ch, &queue, sent.len(), Duration::from_secs(20)).await;
    let dups = check_order(&sent, &got);
    println!("backpressure: {} acked before the restore, {dups} duplicates", acked.len());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_with_drop_oldest_drops_and_counts() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "sensors.#").await;
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let spool =
        "    spool:\n      max_bytes: 2048\n      on_full: drop_oldest\n      replay_rate: 0\n";
    let app =
        gateway(&config(&proxy.url(), dir.path(), &spool_rule(&exchange, "spool", spool))).await;
    wait_ready(&app).await;
    proxy.cut();
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "spool-drop").await;
    let sent = messages(150, 1);
    let acked = publish_all(&mut c, &sent, Duration::from_secs(5)).await;
    assert_eq!(acked.len(), sent.len(), "drop_oldest never holds a PUBACK back");
    let m = metrics(&app).await;
    let dropped =
        metric(&m, &format!("mqgate_spool_dropped_total{{target=\"s/amqp:rabbit/{exchange}\"}}"));
    assert!(dropped >= 100.0, "the oldest were dropped and counted: {dropped}\n{m}");
    proxy.restore();
    let got = drain(&ch, &queue, sent.len() - dropped as usize, Duration::from_secs(5)).await;
    assert!(got.contains(&"0:149".to_owned()), "the newest message is kept: {got:?}");
    let distinct: std::collections::HashSet<_> = got.iter().collect();
    assert!(
        distinct.len() as f64 >= sent.len() as f64 - dropped,
        "dropped {dropped}, received {}",
        distinct.len()
    );
    assert!(!got.contains(&"0:0".to_owned()), "the oldest message was dropped: {got:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_receive_acknowledges_while_the_sink_is_down() {
    let conn = rabbit().await;
    let (_ch, exchange, _queue) = exchange_with_queue(&conn, "sensors.#").await;
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = format!(
        "{}  - name: sink\n    from: \"other/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{exchange}\"\n",
        spool_rule(&exchange, "receive", "")
    );
    let app = gateway(&config(&proxy.url(), dir.path(), &rules)).await;
    wait_ready(&app).await;
    proxy.cut();
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "ack-receive").await;
    let acked = publish_all(&mut c, &messages(10, 1), Duration::from_secs(5)).await;
    assert_eq!(acked.len(), 10, "ack: receive acknowledges on receipt, sink down or not");
    // The same sink under `ack: sink` withholds the PUBACK (3.1.1: the connection closes).
    c.publish("other/x", QoS::AtLeastOnce, 99, b"x").await;
    match c.recv_within(Duration::from_secs(5)).await {
        Ok(None) | Err(()) => {}
        Ok(Some(p)) => panic!("ack: sink must not acknowledge while RabbitMQ is down: {p:?}"),
    }
    app.stop().await;
}

#[test]
fn ack_spool_without_a_store_is_a_config_error_with_a_position() {
    let text = "mqtt:\n  listen: \"0.0.0.0:1883\"\namqp:\n  r:\n    url: \"amqp://g:g@h/%2f\"\nrules:\n  - name: a\n    from: \"a/#\"\n    ack: spool\n    to:\n      - amqp:\n          broker: r\n          exchange: x\n";
    let e = Config::parse(Path::new("c.yaml"), text).expect_err("ack: spool needs store:");
    let e = e.to_string();
    assert!(e.starts_with("c.yaml:9:10:"), "{e}");
    assert!(e.contains("needs a `store:` section"), "{e}");
    let with_store = format!("{text}store:\n  path: ./data\n");
    Config::parse(Path::new("c.yaml"), &with_store).expect("valid with a store");
    let spool_without_ack = text.replace("    ack: spool\n", "    spool:\n      max_bytes: 1MiB\n");
    let e =
        Config::parse(Path::new("c.yaml"), &format!("{spool_without_ack}store:\n  path: ./d\n"))
            .expect_err("spool: needs ack: spool");
    assert!(e.to_string().contains("only applies with `ack: spool`"), "{e}");
}

/// The real binary on a config file; its addresses come from the config (free ports).
struct Mqgate {
    child: Child,
}

impl Mqgate {
    fn spawn(config: &Path, log: &Path) -> Mqgate {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_mqgate"))
            .args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn mqgate");
        Mqgate { child }
    }
}

impl Drop for Mqgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

async fn wait_admin_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok((200, _)) = http_get(admin, "/readyz").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("mqgate not ready within 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_message() {
    let conn = rabbit().await;
    let ch = conn.create_channel().await.expect("channel");
    let (_, exchange, queue) = exchange_with_queue(&conn, "sensors.#").await;
    let proxy = Proxy::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mqtt, admin) = (free_port(), free_port());
    let yaml = config(
        &proxy.url(),
        &dir.path().join("store"),
        &spool_rule(&exchange, "spool", "    spool:\n      replay_rate: 0\n"),
    )
    .replace(
        "listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"",
        &format!("listen: \"127.0.0.1:{mqtt}\"\nadmin:\n  listen: \"127.0.0.1:{admin}\""),
    );
    let config_path = dir.path().join("mqgate.yaml");
    std::fs::write(&config_path, yaml).expect("write config");
    let log = dir.path().join("mqgate.log");
    let mqtt_addr: SocketAddr = format!("127.0.0.1:{mqtt}").parse().expect("addr");
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().expect("addr");

    // Consume everything from the start, counting copies per message.
    let counts: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "spool-kill".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let counts2 = Arc::clone(&counts);
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(Ok(d)) = consumer.next().await {
            let text = String::from_utf8_lossy(&d.data).into_owned();
            *counts2.lock().expect("counts").entry(text).or_default() += 1;
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });

    let gw = Mqgate::spawn(&config_path, &log);
    wait_admin_ready(admin_addr).await;
    // A QoS 1 stream with 100 in flight; RabbitMQ goes away half-way (so the spool holds a
    // backlog), and mqgate is killed while PUBLISHes and PUBACKs are still flowing.
    let mut c = RawClient::connect(mqtt_addr, ProtocolVersion::V311, "spool-kill").await;
    let total = 20_000u32;
    let mut acked: Vec<u32> = Vec::new();
    let mut sent = 0u32;
    let mut gw = Some(gw);
    let mut cut = false;
    loop {
        while sent < total && sent - acked.len() as u32 <= 100 {
            let id = (sent % 65_000) as u16 + 1;
            c.publish("sensors/k", QoS::AtLeastOnce, id, format!("k:{sent}").as_bytes()).await;
            sent += 1;
        }
        match c.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::PubAck(_))) => acked.push(acked.len() as u32),
            Ok(None) | Err(()) => break,
            Ok(Some(p)) => panic!("unexpected {p:?}"),
        }
        if !cut && acked.len() == 4000 {
            proxy.cut();
            cut = true;
        }
        if acked.len() == 8000 {
            if let Some(mut g) = gw.take() {
                g.child.kill().expect("SIGKILL");
                let _ = g.child.wait();
            }
            // PUBACKs the gateway sent before it died still count.
            while let Ok(Some(Packet::PubAck(_))) = c.recv_within(Duration::from_secs(2)).await {
                acked.push(acked.len() as u32);
            }
            break;
        }
    }
    assert!(acked.len() >= 8000, "the stream ran until the kill: {} acknowledged", acked.len());
    proxy.restore();
    let _gw = Mqgate::spawn(&config_path, &log);
    wait_admin_ready(admin_addr).await;

    let want: Vec<String> = (0..acked.len()).map(|i| format!("k:{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let counts = counts.lock().expect("counts");
            want.iter().filter(|w| !counts.contains_key(*w)).count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} acknowledged messages never arrived; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counts = counts.lock().expect("counts").clone();
    let dups: usize = counts.values().map(|n| n - 1).sum();
    println!(
        "SIGKILL: {} acknowledged, {} sent, {} distinct received (unacknowledged ones may arrive too), {dups} duplicates",
        acked.len(),
        sent,
        counts.len()
    );
    let _ = exchange;
}

fn http_spool_config(store: &Path, addr: SocketAddr, spool: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\nhttp:\n  hook:\n    url: \"http://{addr}\"\nrules:\n  - name: h\n    from: \"sensors/#\"\n    ack: spool\n    spool:\n      replay_rate: 0\n{spool}    to:\n      - http:\n          endpoint: hook\n          retry: {{ attempts: 1 }}\n",
        store.display()
    )
}

/// Opens the store of a stopped gateway and lists its dead letters: (target, reason, payload).
async fn dead_letters_in(store: &Path) -> Vec<(String, String, String)> {
    let metrics = mqgate::metrics::Metrics::new();
    let mut opened = None;
    for _ in 0..100 {
        match mqgate::store::Store::open(store) {
            Ok(s) => {
                opened = Some(s);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let store = opened.expect("the store opens once the gateway stopped");
    let dl = mqgate::deadletters::DeadLetters::new(store, &metrics).expect("dead letters");
    dl.list(None, 1000)
        .expect("list")
        .into_iter()
        .map(|(_, l)| {
            (l.target, l.reason, String::from_utf8_lossy(&l.message.payload).into_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_failure_and_exhausted_retries_go_to_the_dead_letters() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let h = Hook::serve(listener, HOOK_OK, true);
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = gateway(&http_spool_config(dir.path(), addr, "      max_retry_time: 1s\n")).await;
    let mut c = RawClient::connect(gw.mqtt_addr, ProtocolVersion::V311, "spool-dead").await;
    let msgs: Vec<(String, String)> =
        ["0:0", "0:bad", "0:2"].iter().map(|t| ("sensors/0".to_owned(), t.to_string())).collect();
    assert_eq!(publish_all(&mut c, &msgs, Duration::from_secs(5)).await.len(), 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.bodies().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.bodies(), vec!["0:0", "0:2"], "the 404 does not block the rest");

    // Down for longer than max_retry_time: the next message goes to the dead letters.
    h.mode.store(HOOK_503, Ordering::SeqCst);
    let late = vec![("sensors/0".to_owned(), "0:3".to_owned())];
    assert_eq!(publish_all(&mut c, &late, Duration::from_secs(5)).await.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let m = metrics(&gw).await;
        if metric(&m, "mqgate_spool_dead_lettered_total{target=\"h/http:hook\"}") >= 2.0 {
            assert_eq!(
                metric(&m, "mqgate_spool_depth_messages{target=\"h/http:hook\"}"),
                0.0,
                "{m}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "not dead-lettered:\n{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.stop().await;
    let letters = dead_letters_in(dir.path()).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(
        (letters[0].0.as_str(), letters[0].2.as_str()),
        ("h/http:hook", "0:bad"),
        "{letters:?}"
    );
    assert!(letters[0].1.contains("404"), "{letters:?}");
    assert_eq!(letters[1].2, "0:3", "{letters:?}");
    assert!(letters[1].1.contains("max_retry_time"), "{letters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_forwards_the_spool_and_dead_letters_what_no_target_claims() {
    // An endpoint that refuses connections: everything stays in the spools.
    let (socket, addr) = reserved_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let two_targets = http_spool_config(dir.path(), addr, "").replace(
        "          retry: { attempts: 1 }\n",
        "          retry: { attempts: 1 }\n      - http:\n          endpoint: hook\n          path: \"/second\"\n          retry: { attempts: 1 }\n",
    );
    let gw = gateway(&two_targets).await;
    let mut c = RawClient::connect(gw.mqtt_addr, ProtocolVersion::V311, "spool-restart").await;
    let sent = messages(20, 2);
    assert_eq!(publish_all(&mut c, &sent, Duration::from_secs(5)).await.len(), 20);
    gw.stop().await;

    // Restart with one target only (h/http:hook/second is gone) and the endpoint up.
    let h = Hook::serve(socket.listen(1024).expect("listen"), HOOK_OK, false);
    let gw = gateway_on_store(&http_spool_config(dir.path(), addr, "")).await;
    let (_, body) = http_get(gw.admin_addr, "/readyz").await.expect("readyz");
    assert!(body.contains("spool h/http:hook:"), "{body}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while h.bodies().len() < sent.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = h.bodies();
    let dups = check_order(&sent, &got);
    println!("restart: {} received, {dups} duplicates", got.len());
    gw.stop().await;
    let letters = dead_letters_in(dir.path()).await;
    assert_eq!(
        letters.len(),
        20,
        "the second target's spool went to the dead letters: {letters:?}"
    );
    assert!(
        letters
            .iter()
            .all(|(t, r, _)| t == "h/http:hook/second" && r.contains("no longer configured")),
        "{letters:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_replayed_at_replay_rate() {
    let (socket, addr) = reserved_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = http_spool_config(dir.path(), addr, "").replace("replay_rate: 0", "replay_rate: 20");
    let gw = gateway(&yaml).await;
    let mut c = RawClient::connect(gw.mqtt_addr, ProtocolVersion::V311, "spool-pace").await;
    let sent = messages(40, 1);
    assert_eq!(publish_all(&mut c, &sent, Duration::from_secs(5)).await.len(), 40);
    let h = Hook::serve(socket.listen(1024).expect("listen"), HOOK_OK, false);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut first = None;
    let last = loop {
        let n = h.bodies().len();
        if n > 0 && first.is_none() {
            first = Some(Instant::now());
        }
        if n >= sent.len() {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "only {n} of 40 replayed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let took = last - first.expect("first");
    // 40 messages at 20/s: about 2 s from the first to the last (unpaced: milliseconds).
    assert!(took >= Duration::from_millis(1500), "replayed in {took:?}: not paced");
    check_order(&sent, &h.bodies());
    gw.stop().await;
}
