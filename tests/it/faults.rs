//! Real faults in the default `ack: sink` mode: RabbitMQ cut off (through the TCP proxy of
//! `support/proxy.rs`) or silent, an HTTP endpoint refusing connections or answering 503, and
//! the real binary stopped with SIGTERM in the middle of a QoS 1 stream. In every case: no
//! message is acknowledged before its sink took it, memory stays bounded while a sink cannot
//! take anything, and everything acknowledged arrives.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::proxy::Proxy;
use crate::support::webhook::{Reply, Webhook};
use crate::support::*;
use axum::http::StatusCode;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::io::AsyncWriteExt;

/// Messages a device got a successful PUBACK for, with when.
type Acked = Arc<Mutex<Vec<(String, Instant)>>>;

/// A device publishing numbered QoS 1 messages (`{id}-{n}`) with at most `window`
/// unacknowledged. Like a real one, when the gateway closes the connection (MQTT 5 DISCONNECT
/// 0x89, or a plain close) it reconnects and resends what was not acknowledged. Records every
/// message a successful PUBACK acknowledged in `acked`; returns when `stop` is set and
/// everything was acknowledged, or the gateway is gone after `stop`.
async fn device(addr: SocketAddr, id: &str, window: usize, stop: Arc<AtomicBool>, acked: Acked) {
    let mut unacked: VecDeque<(u16, String)> = VecDeque::new();
    let mut n = 0u32;
    while !(stop.load(Ordering::SeqCst) && unacked.is_empty()) {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut c = RawClient::connect(addr, ProtocolVersion::V5, id).await;
        for (pid, payload) in &unacked {
            let mut p = publish_packet("f/1", QoS::AtLeastOnce, *pid, payload.as_bytes());
            p.dup = true;
            c.send(&Packet::Publish(p)).await;
        }
        loop {
            if unacked.len() < window && !stop.load(Ordering::SeqCst) {
                n += 1;
                let pid = (n % 60_000 + 1) as u16;
                let payload = format!("{id}-{n}");
                c.publish("f/1", QoS::AtLeastOnce, pid, payload.as_bytes()).await;
                unacked.push_back((pid, payload));
                continue;
            }
            if unacked.is_empty() {
                break;
            }
            match c.recv_within(Duration::from_millis(200)).await {
                Err(()) => {}
                Ok(Some(Packet::PubAck(a))) => {
                    let front = unacked.front().map(|f| f.0);
                    assert_eq!(Some(a.packet_id), front, "PUBACKs out of order");
                    assert_eq!(a.code, ReasonCode::SUCCESS, "a final failure in a fault test");
                    if let Some((_, payload)) = unacked.pop_front() {
                        acked.lock().expect("acked").push((payload, Instant::now()));
                    }
                }
                // Told to go away (the sink failed, retryable), or closed: reconnect, resend.
                Ok(Some(Packet::Disconnect(_)) | None) => break,
                Ok(Some(other)) => panic!("unexpected {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs [`device`] in a task; the shared record of its acknowledgements.
fn spawn_device(
    addr: SocketAddr,
    id: &'static str,
    window: usize,
    stop: &Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<()>, Acked) {
    let acked = Acked::default();
    let task = tokio::spawn(device(addr, id, window, Arc::clone(stop), Arc::clone(&acked)));
    (task, acked)
}

/// Stops the device and waits (bounded) until it has no message unacknowledged.
async fn finish(
    stop: &AtomicBool,
    task: tokio::task::JoinHandle<()>,
    acked: &Acked,
) -> Vec<(String, Instant)> {
    stop.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the device finishes")
        .expect("device task");
    acked.lock().expect("acked").clone()
}

/// Every message in `queue`, taken until it stays empty for a second.
async fn drain(ch: &lapin::Channel, queue: &str) -> HashSet<String> {
    let mut got = HashSet::new();
    while let Some(m) = get(ch, queue, Duration::from_secs(1)).await {
        got.insert(String::from_utf8_lossy(&m.data).into_owned());
    }
    got
}

fn amqp_config(url: &str, exchange: &str, extra: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n{extra}admin:\n  listen: \"127.0.0.1:0\"\namqp:\n  rabbit:\n    url: \"{url}\"\n    reconnect_min: 50ms\n    reconnect_max: 200ms\nrules:\n  - name: f\n    from: \"f/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{exchange}\"\n"
    )
}

#[tokio::test]
async fn rabbitmq_cut_then_restored_nothing_acked_while_cut_and_every_ack_arrives() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let proxy = Proxy::start().await;
    let app = gateway(&amqp_config(&proxy.url(), &exchange, "")).await;
    wait_ready(&app).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (task, acked) = spawn_device(app.mqtt_addr, "cut", 8, &stop);

    tokio::time::sleep(Duration::from_millis(700)).await;
    let cut_at = Instant::now();
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restored_at = Instant::now();
    proxy.restore();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acked = finish(&stop, task, &acked).await;

    // Acks for confirms that were already on their way may come right after the cut; none
    // can come while RabbitMQ is unreachable.
    let settled = cut_at + Duration::from_millis(200);
    let during: Vec<_> =
        acked.iter().filter(|(_, at)| *at > settled && *at < restored_at).collect();
    assert!(
        during.is_empty(),
        "{} acknowledged while RabbitMQ was cut off: {:?}",
        during.len(),
        &during[..during.len().min(5)]
    );
    let before = acked.iter().filter(|(_, at)| *at <= cut_at).count();
    let after = acked.iter().filter(|(_, at)| *at >= restored_at).count();
    assert!(before > 0 && after > 0, "acks before the cut {before}, after the restore {after}");
    let got = drain(&ch, &queue).await;
    let missing: Vec<_> = acked.iter().filter(|(p, _)| !got.contains(p)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged but not at RabbitMQ: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!(
        "cut: {} acknowledged ({before} before the cut, {after} after the restore), {} at RabbitMQ",
        acked.len(),
        got.len()
    );
    app.stop().await;
}

/// The resident memory of this process (the gateway runs in it), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn rabbitmq_silent_the_gateway_stops_reading_and_memory_stays_bounded() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let proxy = Proxy::start().await;
    let app = gateway(&amqp_config(&proxy.url(), &exchange, "  receive_maximum: 64\n")).await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "silent").await;
    // One message first: the exchange is checked once, then publishes go straight out.
    publish_qos1(&mut c, "f/1", 60_001, b"first").await;
    // Publishes reach the proxy and stay there: no confirm comes back.
    proxy.pause_to_broker.send_replace(true);
    let rss_before = rss_kib();

    // An MQTT 3.1.1 device that only writes: 4 KiB QoS 1 messages, as fast as the socket takes
    // them. The gateway reads 64 (its window), then stops reading; TCP pushes back.
    let payload = vec![b'x'; 4096];
    let mut written = 0u32;
    loop {
        let mut buf = bytes::BytesMut::new();
        let p = publish_packet("f/1", QoS::AtLeastOnce, (written % 60_000 + 1) as u16, &payload);
        mqgate::mqtt::codec::encode(&Packet::Publish(p), ProtocolVersion::V311, &mut buf)
            .expect("encode");
        match tokio::time::timeout(Duration::from_secs(2), c.stream.write_all(&buf)).await {
            Ok(Ok(())) => written += 1,
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => break,
        }
        assert!(written < 100_000, "400 MB written and the gateway still reads: no backpressure");
    }
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    let m = metrics(&app).await;
    let unconfirmed = m
        .lines()
        .find_map(|l| l.strip_prefix("mqgate_amqp_unconfirmed{broker=\"rabbit\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("unconfirmed gauge");
    eprintln!(
        "silent broker: the device wrote {written} messages ({} MiB) before blocking; \
         {unconfirmed} unconfirmed; RSS grew {grown_mib} MiB",
        written as u64 * 4 / 1024
    );
    assert!(unconfirmed <= 64, "more in flight than the session window: {unconfirmed}");
    assert!(grown_mib < 64, "memory grew {grown_mib} MiB while the broker was silent");
    // Nothing was acknowledged: no confirm came.
    expect_silence(&mut c, Duration::from_millis(300)).await;

    // Released: the gateway reads on and acknowledges what RabbitMQ confirms.
    proxy.pause_to_broker.send_replace(false);
    let mut acks = 0;
    while acks < 64 {
        match c.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAck(_))) => acks += 1,
            other => panic!("expected PUBACKs after the release, got {other:?} after {acks}"),
        }
    }
    let got = get(&ch, &queue, Duration::from_secs(5)).await;
    assert!(got.is_some(), "acknowledged messages reached RabbitMQ");
    drop(c);
    app.stop().await;
}

/// A webhook server on `listener` whose answer `status()` decides.
fn webhook_on(
    listener: tokio::net::TcpListener,
    status: impl Fn() -> StatusCode + Send + Sync + 'static,
) -> Webhook {
    Webhook::on(listener, move |_, _| Reply::Status(status().as_u16()))
}

/// Each message the server answered 2xx, with when.
fn delivered(hook: &Webhook) -> Vec<(String, Instant)> {
    hook.taken().iter().map(|r| (r.text(), r.at)).collect()
}

fn http_config(addr: SocketAddr) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nhttp:\n  api:\n    url: \"http://{addr}\"\nrules:\n  - name: f\n    from: \"f/#\"\n    to:\n      - http:\n          endpoint: api\n          path: /in\n          retry:\n            attempts: 3\n            initial_backoff: 20ms\n            max_backoff: 50ms\n"
    )
}

/// No acknowledgement arrived before `t` (`what` says when that was).
fn assert_none_acked_before(acked: &[(String, Instant)], t: Instant, what: &str) {
    let early: Vec<_> = acked.iter().filter(|(_, at)| *at < t).collect();
    assert!(
        early.is_empty(),
        "{} acknowledged {what}: {:?}",
        early.len(),
        &early[..early.len().min(5)]
    );
}

/// Every acknowledged message was answered 2xx by the endpoint before its PUBACK.
fn assert_delivered_before_acked(acked: &[(String, Instant)], ok: &[(String, Instant)]) {
    for (payload, acked_at) in acked {
        let answered = ok.iter().filter(|(p, _)| p == payload).map(|(_, at)| *at).min();
        match answered {
            Some(at) => assert!(at <= *acked_at, "{payload} acknowledged before its 2xx"),
            None => panic!("{payload} acknowledged but the endpoint never took it"),
        }
    }
}

#[tokio::test]
async fn http_endpoint_refusing_then_up_nothing_acked_early_all_delivered_after() {
    // A port nothing listens on yet: connections are refused.
    let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = reserved.local_addr().expect("addr");
    drop(reserved);
    let app = gateway(&http_config(addr)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (task, acked) = spawn_device(app.mqtt_addr, "refused", 4, &stop);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let up_at = Instant::now();
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind the endpoint");
    let ok = webhook_on(listener, || StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let acked = finish(&stop, task, &acked).await;

    assert_none_acked_before(&acked, up_at, "while the endpoint was down");
    assert!(acked.len() > 4, "delivered after the endpoint came up: {}", acked.len());
    assert_delivered_before_acked(&acked, &delivered(&ok));
    eprintln!("http refused then up: {} acknowledged, all at the endpoint", acked.len());
    app.stop().await;
}

#[tokio::test]
async fn http_endpoint_answering_503_then_200_nothing_acked_early_all_delivered_after() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let up = Arc::new(AtomicBool::new(false));
    let up2 = Arc::clone(&up);
    let ok = webhook_on(listener, move || {
        if up2.load(Ordering::SeqCst) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    });
    let app = gateway(&http_config(addr)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (task, acked) = spawn_device(app.mqtt_addr, "busy", 4, &stop);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let up_at = Instant::now();
    up.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let acked = finish(&stop, task, &acked).await;

    assert_none_acked_before(&acked, up_at, "while the endpoint answered 503");
    assert!(acked.len() > 4, "delivered after the endpoint recovered: {}", acked.len());
    assert_delivered_before_acked(&acked, &delivered(&ok));
    app.stop().await;
}

/// The real binary on free ports with a config in `dir`.
struct Binary {
    child: Child,
    mqtt: SocketAddr,
    admin: SocketAddr,
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

impl Binary {
    /// Starts `mqgate run` with the broker at `url`, rule `f/#` → `exchange`, and
    /// `shutdown_timeout`; waits until it is ready.
    async fn start(dir: &std::path::Path, url: &str, exchange: &str, shutdown: &str) -> Binary {
        let (mqtt, admin) = (free_addr(), free_addr());
        let yaml = amqp_config(url, exchange, "")
            .replacen("127.0.0.1:0", &mqtt.to_string(), 1)
            .replacen("127.0.0.1:0", &admin.to_string(), 1)
            + &format!("shutdown_timeout: {shutdown}\nstore:\n  path: \"{}\"\n", dir.display());
        let path = dir.join("mqgate.yaml");
        std::fs::write(&path, yaml).expect("write config");
        let log = std::fs::File::create(dir.join("mqgate.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_mqgate"))
            .args(["run", "--config"])
            .arg(&path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn mqgate");
        let b = Binary { child, mqtt, admin };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(http_get(b.admin, "/readyz").await, Ok((200, _))) {
            assert!(Instant::now() < deadline, "mqgate not ready: {}", b.log(dir));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b
    }

    fn log(&self, dir: &std::path::Path) -> String {
        std::fs::read_to_string(dir.join("mqgate.log")).unwrap_or_default()
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Waits for the exit (at most `within`): the status and how long it took.
    async fn exit(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return (s, t0.elapsed());
            }
            if t0.elapsed() > within {
                let _ = self.child.kill();
                panic!("mqgate did not exit within {within:?} of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sigterm_mid_stream_exits_0_and_every_acknowledged_message_is_at_rabbitmq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let mut gw = Binary::start(dir.path(), crate::support::AMQP_URL, &exchange, "5s").await;
    let stop = Arc::new(AtomicBool::new(false));
    let (task, acked) = spawn_device(gw.mqtt, "term", 64, &stop);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    gw.sigterm();
    let (status, took) = gw.exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status:?}: {}", gw.log(dir.path()));
    assert!(took < Duration::from_secs(7), "took {took:?} (shutdown_timeout 5s)");
    // The gateway is gone: what the device has is what was acknowledged.
    stop.store(true, Ordering::SeqCst);
    task.abort();
    let _ = task.await;
    let acked = acked.lock().expect("acked").clone();
    let got = drain(&ch, &queue).await;
    let log = gw.log(dir.path());
    assert!(log.contains("store flushed") && log.contains("mqgate stopped"), "{log}");
    let missing: Vec<_> = acked.iter().filter(|(p, _)| !got.contains(p)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged but not at RabbitMQ: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(!acked.is_empty());
    eprintln!(
        "SIGTERM mid-stream: exit 0 after {took:?}; {} acknowledged, {} at RabbitMQ",
        acked.len(),
        got.len()
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_messages_finish_then_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let proxy = Proxy::start().await;
    let mut gw = Binary::start(dir.path(), &proxy.url(), &exchange, "5s").await;
    let mut c = RawClient::connect(gw.mqtt, ProtocolVersion::V5, "inflight").await;
    // Confirms are held: 20 messages in flight.
    proxy.pause_to_client.send_replace(true);
    for id in 1..=20u16 {
        c.publish("f/1", QoS::AtLeastOnce, id, format!("m{id}").as_bytes()).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.sigterm();
    // Shutting down, the gateway waits for their outcomes instead of dropping the client.
    expect_silence(&mut c, Duration::from_millis(1000)).await;
    proxy.pause_to_client.send_replace(false);
    for id in 1..=20u16 {
        match c.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::PubAck(a))) => {
                assert_eq!((a.packet_id, a.code), (id, ReasonCode::SUCCESS));
            }
            other => panic!("expected PUBACK {id} after SIGTERM, got {other:?}"),
        }
    }
    expect_disconnect(&mut c, ReasonCode::SERVER_SHUTTING_DOWN).await;
    let (status, took) = gw.exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status:?}: {}", gw.log(dir.path()));
    let got = drain(&ch, &queue).await;
    assert_eq!(got.len(), 20, "{got:?}");
    eprintln!("in flight at SIGTERM: 20 acknowledged after it; exit 0 after {took:?}");
}

#[tokio::test]
async fn sigterm_with_a_silent_broker_exits_0_within_the_deadline_without_acking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rabbit().await;
    let (_ch, exchange, _queue) = exchange_with_queue(&conn, "#").await;
    let proxy = Proxy::start().await;
    let mut gw = Binary::start(dir.path(), &proxy.url(), &exchange, "2s").await;
    let mut c = RawClient::connect(gw.mqtt, ProtocolVersion::V5, "deadline").await;
    proxy.pause_to_client.send_replace(true);
    for id in 1..=5u16 {
        c.publish("f/1", QoS::AtLeastOnce, id, b"never confirmed").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.sigterm();
    // No confirm ever comes: at shutdown_timeout the client is told the server is going away,
    // without a PUBACK (it resends to the next gateway).
    expect_disconnect(&mut c, ReasonCode::SERVER_SHUTTING_DOWN).await;
    let (status, took) = gw.exit(Duration::from_secs(10)).await;
    assert!(status.success(), "exit {status:?}: {}", gw.log(dir.path()));
    // shutdown_timeout (2 s) + closing the connections (at most 2 s more) + process exit.
    assert!(took < Duration::from_millis(6500), "took {took:?}");
    assert!(took >= Duration::from_millis(1500), "gave up before shutdown_timeout: {took:?}");
    eprintln!("silent broker at SIGTERM: exit 0 after {took:?} (shutdown_timeout 2s)");
}
