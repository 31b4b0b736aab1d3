//! What the store keeps across restarts of the real binary: retained messages and persistent
//! sessions (subscriptions, queued and in-flight QoS 1 messages), after a graceful stop
//! (SIGTERM) and after SIGKILL right after the acknowledgement the device relied on; and a
//! store that cannot be opened (corrupt, unreadable) is a clear one-line error, not a panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, PubResponse, Publish, QoS};

const V311: ProtocolVersion = ProtocolVersion::V311;

/// A free port on 127.0.0.1 (released at once: the binary binds it next).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// The binary running with its store under `store`; killed when dropped (a failed test
/// leaves no process behind).
struct Gateway {
    /// `None` once stopped.
    child: Option<Child>,
    mqtt: SocketAddr,
    admin: SocketAddr,
}

impl Gateway {
    /// Starts `mqgate run` with `store.path: <store>` and waits until it accepts MQTT.
    async fn start(dir: &Path, store: &Path) -> Gateway {
        Gateway::start_with(dir, store, "").await
    }

    /// [`Gateway::start`] with `extra` config (top-level YAML).
    async fn start_with(dir: &Path, store: &Path, extra: &str) -> Gateway {
        let mqtt: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let config = dir.join("mqgate.yaml");
        std::fs::write(
            &config,
            format!(
                "mqtt:\n  listen: \"{mqtt}\"\nadmin:\n  listen: \"{admin}\"\nstore:\n  path: \"{}\"\n{extra}",
                store.display()
            ),
        )
        .expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_mqgate"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mqgate");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(mqtt).await.is_ok() {
                return Gateway { child: Some(child), mqtt, admin };
            }
            if let Ok(Some(status)) = child.try_wait() {
                let out = child.wait_with_output().expect("output");
                panic!("mqgate exited ({status}): {}", String::from_utf8_lossy(&out.stderr));
            }
            assert!(tokio::time::Instant::now() < deadline, "mqgate not listening within 15 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown, nothing flushed that was not durable already.
    fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("wait");
    }

    /// SIGTERM, and the exit status must be success.
    fn stop(mut self) {
        let child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        assert!(status.success());
        let out = child.wait_with_output().expect("wait");
        assert!(out.status.success(), "{}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Connects with `clean_session`; returns the client and CONNACK's session present flag.
async fn connect(addr: SocketAddr, id: &str, clean: bool) -> (RawClient, bool) {
    let mut c = RawClient::tcp(addr, V311).await;
    let mut p = connect_packet(V311, id);
    p.clean_start = clean;
    c.send(&Packet::Connect(Box::new(p))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => {
            assert!(a.code.is_success(), "CONNACK refused: {a:?}");
            (c, a.session_present)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

async fn disconnect(mut c: RawClient) {
    c.send(&Packet::Disconnect(Box::default())).await;
    let _ = c.recv_within(Duration::from_secs(5)).await;
}

/// Publishes a retained message at QoS 1 and waits for its PUBACK.
async fn retain_qos1(c: &mut RawClient, topic: &str, id: u16, payload: &[u8]) {
    let mut p = publish_packet(topic, QoS::AtLeastOnce, id, payload);
    p.retain = true;
    c.send(&Packet::Publish(p)).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, id),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Subscribes a new clean client to `filter` and returns the retained messages it gets
/// (topic → payload), waiting until none comes for a while.
async fn retained_of(addr: SocketAddr, filter: &str) -> BTreeMap<String, String> {
    let mut c = RawClient::connect(addr, V311, &unique("reader")).await;
    c.subscribe(filter, QoS::AtLeastOnce).await;
    let mut got = BTreeMap::new();
    while let Ok(Some(p)) = c.recv_within(Duration::from_millis(700)).await {
        let Packet::Publish(p) = p else { panic!("expected PUBLISH, got {p:?}") };
        assert!(p.retain, "a message sent on subscribe is retained");
        if p.qos != QoS::AtMostOnce {
            c.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
        }
        got.insert(p.topic, String::from_utf8_lossy(&p.payload).into_owned());
    }
    got
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(t, p)| (t.to_string(), p.to_string())).collect()
}

#[tokio::test]
async fn retained_messages_survive_a_graceful_restart_and_a_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("data");
    let gw = Gateway::start(dir.path(), &store).await;
    let mut p = RawClient::connect(gw.mqtt, V311, &unique("pub")).await;
    retain_qos1(&mut p, "r/keep", 1, b"one").await;
    retain_qos1(&mut p, "r/gone", 2, b"soon cleared").await;
    retain_qos1(&mut p, "r/gone", 3, b"").await;
    let mut zero = publish_packet("r/zero", QoS::AtMostOnce, 0, b"qos0");
    zero.retain = true;
    p.send(&Packet::Publish(zero)).await;
    // The QoS 0 one has no acknowledgement: the PUBACK of a later QoS 1 PUBLISH of the same
    // connection says it was routed.
    retain_qos1(&mut p, "r/keep", 4, b"one").await;
    gw.stop();

    let gw = Gateway::start(dir.path(), &store).await;
    let after_stop = map(&[("r/keep", "one"), ("r/zero", "qos0")]);
    assert_eq!(retained_of(gw.mqtt, "r/#").await, after_stop, "after a graceful restart");
    let mut p = RawClient::connect(gw.mqtt, V311, &unique("pub")).await;
    retain_qos1(&mut p, "r/zero", 1, b"").await;
    retain_qos1(&mut p, "r/keep", 2, b"uno").await;
    retain_qos1(&mut p, "r/kill", 3, b"two").await;
    // Killed right after the last PUBACK: every acknowledged change must be on disk.
    gw.kill9();

    let gw = Gateway::start(dir.path(), &store).await;
    let after_kill = map(&[("r/keep", "uno"), ("r/kill", "two")]);
    assert_eq!(retained_of(gw.mqtt, "r/#").await, after_kill, "after SIGKILL");
    let (_, body) = http_get(gw.admin, "/readyz").await.expect("readyz");
    assert!(body.contains(&format!("store: {}", store.join("mqgate.redb").display())), "{body}");
    let (_, metrics) = http_get(gw.admin, "/metrics").await.expect("metrics");
    assert!(metrics.contains("mqgate_store_size_bytes "), "{metrics}");
    assert!(metrics.contains("mqgate_store_commits_total "), "{metrics}");
    gw.kill9();
}

/// Receives `n` QoS 1 PUBLISHes without acknowledging them.
async fn receive(c: &mut RawClient, n: usize) -> Vec<Publish> {
    let mut got = Vec::new();
    for _ in 0..n {
        got.push(expect_publish(c).await);
    }
    got
}

fn payloads(ps: &[Publish]) -> Vec<String> {
    ps.iter().map(|p| String::from_utf8_lossy(&p.payload).into_owned()).collect()
}

#[tokio::test]
async fn a_persistent_session_and_its_queued_messages_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("data");
    let gw = Gateway::start(dir.path(), &store).await;
    let (id, clean_id) = (unique("away"), unique("clean"));
    let (mut sub, present) = connect(gw.mqtt, &id, false).await;
    assert!(!present);
    sub.subscribe("q/#", QoS::AtLeastOnce).await;
    disconnect(sub).await;
    // A clean session subscribed to the same topics: nothing of it may be left.
    let (mut clean, _) = connect(gw.mqtt, &clean_id, true).await;
    clean.subscribe("q/#", QoS::AtLeastOnce).await;
    let mut p = RawClient::connect(gw.mqtt, V311, &unique("pub")).await;
    for i in 0..5u16 {
        publish_qos1(&mut p, &format!("q/{i}"), i + 1, format!("m{i}").as_bytes()).await;
    }
    // Another persistent session subscribes last: killed right after its SUBACK.
    let late_id = unique("late");
    let (mut late, _) = connect(gw.mqtt, &late_id, false).await;
    late.subscribe("q/5", QoS::AtLeastOnce).await;
    // Killed right after that SUBACK and the fifth PUBACK, with the first subscriber away.
    gw.kill9();

    let gw = Gateway::start(dir.path(), &store).await;
    // The subscription is back in the tree: a message published now is queued too.
    let mut p = RawClient::connect(gw.mqtt, V311, &unique("pub")).await;
    publish_qos1(&mut p, "q/5", 1, b"m5").await;
    let (mut sub, present) = connect(gw.mqtt, &id, false).await;
    assert!(present, "the session was restored");
    let got = receive(&mut sub, 6).await;
    assert_eq!(payloads(&got), ["m0", "m1", "m2", "m3", "m4", "m5"], "in order");
    assert!(got.iter().all(|p| !p.dup && p.qos == QoS::AtLeastOnce));
    // The first five are acknowledged; m5 is left in flight.
    for p in &got[..5] {
        sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
    }
    expect_silence(&mut sub, Duration::from_millis(300)).await;
    let (mut late, present) = connect(gw.mqtt, &late_id, false).await;
    assert!(present, "a subscription acknowledged just before SIGKILL was kept");
    assert_eq!(&expect_publish(&mut late).await.payload[..], b"m5");
    disconnect(late).await;
    let (clean, present) = connect(gw.mqtt, &clean_id, false).await;
    assert!(!present, "a clean session leaves nothing in the store");
    disconnect(clean).await;
    gw.stop();

    let gw = Gateway::start(dir.path(), &store).await;
    let (mut sub, present) = connect(gw.mqtt, &id, false).await;
    assert!(present);
    let again = expect_publish(&mut sub).await;
    assert_eq!(&again.payload[..], b"m5", "only the unacknowledged one comes again");
    assert!(again.dup, "resent with DUP, as after a reconnect");
    assert_eq!(again.packet_id, got[5].packet_id, "with its packet id");
    sub.send(&Packet::PubAck(PubResponse::success(again.packet_id))).await;
    expect_silence(&mut sub, Duration::from_millis(500)).await;
    // Clean session: the session and its messages are deleted from the store.
    let (_, present) = connect(gw.mqtt, &id, true).await;
    assert!(!present);
    gw.stop();

    let gw = Gateway::start(dir.path(), &store).await;
    let (mut sub, present) = connect(gw.mqtt, &id, false).await;
    assert!(!present, "the clean start deleted the stored session");
    expect_silence(&mut sub, Duration::from_millis(500)).await;
    gw.kill9();
}

/// Runs `mqgate run` with its store under `store`; it must fail at once with one line on
/// stderr that names `names` and no panic.
fn assert_refused(dir: &Path, store: &Path, names: &Path) {
    let config = dir.join("refused.yaml");
    std::fs::write(
        &config,
        format!(
            "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\n",
            store.display()
        ),
    )
    .expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["run", "--config"])
        .arg(&config)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run mqgate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mqgate started on {}: {err}", store.display());
    assert_eq!(out.status.code(), Some(1), "an error exit, not a signal: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&names.display().to_string()), "names {}: {err}", names.display());
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

#[tokio::test]
async fn a_corrupt_or_unreadable_store_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("data");
    let gw = Gateway::start(dir.path(), &store).await;
    let mut p = RawClient::connect(gw.mqtt, V311, &unique("pub")).await;
    retain_qos1(&mut p, "c/1", 1, b"x").await;
    gw.kill9();
    let file = store.join("mqgate.redb");

    // Garbage over the whole file.
    let len = std::fs::metadata(&file).expect("store file").len() as usize;
    std::fs::write(&file, vec![0xA5u8; len.max(4096)]).expect("garbage");
    assert_refused(dir.path(), &store, &file);

    // store.path is a regular file, not a directory.
    let not_dir = dir.path().join("plain");
    std::fs::write(&not_dir, b"not a directory").expect("write");
    assert_refused(dir.path(), &not_dir, &not_dir);

    // The store file cannot be opened (a symbolic link to itself: refused even for root).
    let looped = dir.path().join("looped");
    std::fs::create_dir(&looped).expect("mkdir");
    std::os::unix::fs::symlink("mqgate.redb", looped.join("mqgate.redb")).expect("symlink");
    assert_refused(dir.path(), &looped, &looped.join("mqgate.redb"));

    // No permission on the file: root reads it anyway, so this case only says something
    // for another user (the two above cover root).
    use std::os::unix::fs::PermissionsExt;
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).expect("mkdir");
    std::fs::write(locked.join("mqgate.redb"), b"").expect("write");
    std::fs::set_permissions(locked.join("mqgate.redb"), std::fs::Permissions::from_mode(0o000))
        .expect("chmod 000");
    if std::fs::File::open(locked.join("mqgate.redb")).is_err() {
        assert_refused(dir.path(), &locked, &locked.join("mqgate.redb"));
    }
}

#[tokio::test]
async fn a_released_qos2_delivery_resumes_as_pubrel_and_expired_sessions_are_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("data");
    let gw = Gateway::start(dir.path(), &store).await;
    let id = unique("qos2");
    let (mut sub, _) = connect(gw.mqtt, &id, false).await;
    sub.subscribe("x/#", QoS::ExactlyOnce).await;
    // An MQTT 5 session kept one second after its connection ends.
    let short = unique("short");
    let mut c = RawClient::tcp(gw.mqtt, ProtocolVersion::V5).await;
    let mut p = connect_packet(ProtocolVersion::V5, &short);
    p.clean_start = false;
    p.properties.session_expiry_interval = Some(1);
    c.send(&Packet::Connect(Box::new(p))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    c.subscribe("x/#", QoS::AtLeastOnce).await;
    c.send(&Packet::Disconnect(Box::default())).await;
    let _ = c.recv_within(Duration::from_secs(5)).await;

    let mut publ = RawClient::connect(gw.mqtt, V311, &unique("pub")).await;
    publ.publish("x/1", QoS::ExactlyOnce, 1, b"once").await;
    assert!(matches!(publ.recv().await, Some(Packet::PubRec(_))));
    publ.send(&Packet::PubRel(PubResponse::success(1))).await;
    assert!(matches!(publ.recv().await, Some(Packet::PubComp(_))));
    let d = expect_publish(&mut sub).await;
    assert_eq!(d.qos, QoS::ExactlyOnce);
    sub.send(&Packet::PubRec(PubResponse::success(d.packet_id))).await;
    match sub.recv().await {
        Some(Packet::PubRel(r)) => assert_eq!(r.packet_id, d.packet_id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    // PUBCOMP never sent: the delivery is released and not complete.
    gw.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let gw = Gateway::start(dir.path(), &store).await;
    let (mut sub, present) = connect(gw.mqtt, &id, false).await;
    assert!(present);
    match sub.recv().await {
        Some(Packet::PubRel(r)) => {
            assert_eq!(r.packet_id, d.packet_id, "PUBREL again, not the message")
        }
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.send(&Packet::PubComp(PubResponse::success(d.packet_id))).await;
    expect_silence(&mut sub, Duration::from_millis(300)).await;
    // The one-second session expired while mqgate was stopped.
    let mut c = RawClient::tcp(gw.mqtt, ProtocolVersion::V5).await;
    let mut p = connect_packet(ProtocolVersion::V5, &short);
    p.clean_start = false;
    c.send(&Packet::Connect(Box::new(p))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => {
            assert!(!a.session_present, "an expired session is not restored")
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    gw.stop();

    let gw = Gateway::start(dir.path(), &store).await;
    let (mut sub, present) = connect(gw.mqtt, &id, false).await;
    assert!(present);
    expect_silence(&mut sub, Duration::from_millis(500)).await;
    gw.kill9();
}

#[tokio::test]
async fn a_source_delivery_acked_for_an_absent_persistent_session_survives_sigkill() {
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    use lapin::BasicProperties;

    let conn = rabbit().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default()).await.expect("confirms");
    let queue = unique("mqgate-persist-q");
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-expires"), AMQPValue::LongUInt(60_000));
    ch.queue_declare(ShortString::from(queue.as_str()), QueueDeclareOptions::default(), args)
        .await
        .expect("declare queue");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("data");
    let source = format!(
        "amqp:\n  rabbit:\n    url: \"{AMQP_URL}\"\nrules: []\nsources:\n  - name: s\n    broker: rabbit\n    queue: \"{queue}\"\n    topic: \"d/1\"\n    qos: 1\n"
    );
    let gw = Gateway::start_with(dir.path(), &store, &source).await;
    let id = unique("down");
    let (mut sub, _) = connect(gw.mqtt, &id, false).await;
    sub.subscribe("d/#", QoS::AtLeastOnce).await;
    disconnect(sub).await;
    let delivered = "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 1";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !http_get(gw.admin, "/metrics")
        .await
        .expect("metrics")
        .1
        .contains("outcome=\"delivered\"} 0")
    {
        assert!(tokio::time::Instant::now() < deadline, "the source never consumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ch.basic_publish(
        ShortString::from(""),
        ShortString::from(queue.as_str()),
        BasicPublishOptions::default(),
        b"down",
        BasicProperties::default(),
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");
    // Killed as soon as mqgate acked the delivery to RabbitMQ: from then on, only the store
    // has it (the gateway restarts without the source, so nothing can redeliver it).
    while !http_get(gw.admin, "/metrics").await.expect("metrics").1.contains(delivered) {
        assert!(tokio::time::Instant::now() < deadline, "the delivery was never acked");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gw.kill9();
    let _ = ch.queue_delete(ShortString::from(queue.as_str()), QueueDeleteOptions::default()).await;

    let gw = Gateway::start(dir.path(), &store).await;
    let (mut sub, present) = connect(gw.mqtt, &id, false).await;
    assert!(present);
    let p = expect_publish(&mut sub).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("d/1", &b"down"[..]));
    gw.kill9();
}
