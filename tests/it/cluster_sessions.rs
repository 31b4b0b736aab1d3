//! Persistent sessions in a cluster (`cluster:`, docs/cluster.md "Persistent sessions move
//! between nodes"): three mqgate nodes on the machine's RabbitMQ, a unique prefix per test. A
//! persistent session lives in a durable queue in RabbitMQ, so it moves with its client to
//! another node with what was queued while it was away, survives a SIGKILLed node, moves on a
//! takeover, and ends with a clean start on any node or its expiry.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use mqgate::app::App;
use mqgate::mqtt::codec::{self, Packet, ProtocolVersion, QoS, ReasonCode};

use crate::cluster::{node_config, qos, subscribe, until_bound, v5, NodeProcess};
use crate::support::proxy::Proxy;
use crate::support::rabbit_node::RabbitNode;
use crate::support::{
    connect_packet, delete_queues_on_drop, expect_disconnect, expect_silence, gateway, http_get,
    publish_qos1, rabbit, unique, wait_ready, RawClient, AMQP_URL,
};

/// Three ready in-process nodes of cluster `prefix`.
async fn nodes(prefix: &str) -> (App, App, App) {
    let a = gateway(&node_config(prefix, "a", AMQP_URL)).await;
    let b = gateway(&node_config(prefix, "b", AMQP_URL)).await;
    let c = gateway(&node_config(prefix, "c", AMQP_URL)).await;
    for n in [&a, &b, &c] {
        wait_ready(n).await;
    }
    (a, b, c)
}

/// The session queue and record queue of `client_id` in cluster `prefix`.
fn session_queues(prefix: &str, client_id: &str) -> [String; 2] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(client_id.as_bytes());
    let h: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    [format!("{prefix}.session.{h}"), format!("{prefix}.sessionrec.{h}")]
}

/// An MQTT 5 CONNECT of `id` with `clean` start and Session Expiry Interval `expiry`; the
/// CONNACK's reason code and session present flag.
async fn connect(
    addr: std::net::SocketAddr,
    id: &str,
    clean: bool,
    expiry: u32,
) -> (RawClient, ReasonCode, bool) {
    let (c, code, present, _) = connect_why(addr, id, clean, expiry).await;
    (c, code, present)
}

/// [`connect`], with the CONNACK's reason string.
async fn connect_why(
    addr: std::net::SocketAddr,
    id: &str,
    clean: bool,
    expiry: u32,
) -> (RawClient, ReasonCode, bool, Option<String>) {
    let mut c = RawClient::tcp(addr, ProtocolVersion::V5).await;
    let mut p = connect_packet(ProtocolVersion::V5, id);
    p.clean_start = clean;
    p.properties.session_expiry_interval = Some(expiry);
    c.send(&Packet::Connect(Box::new(p))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => {
            let why = a.properties.reason_string.clone();
            (c, a.code, a.session_present, why)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Connects a persistent session (expiry `expiry`, clean start 0); asserts it is accepted and
/// returns session present.
async fn persistent(addr: std::net::SocketAddr, id: &str, expiry: u32) -> (RawClient, bool) {
    let (c, code, present, why) = connect_why(addr, id, false, expiry).await;
    assert!(code.is_success(), "CONNACK refused: {code:?} {why:?}");
    (c, present)
}

/// One delivery as the client saw it.
#[derive(Debug, Clone, PartialEq)]
struct Got {
    payload: String,
    qos: QoS,
    ids: Vec<u32>,
}

/// Every PUBLISH until `quiet` passes without one, QoS 1 ones acknowledged.
async fn collect(c: &mut RawClient, quiet: Duration) -> Vec<Got> {
    let mut got = Vec::new();
    while let Ok(Some(p)) = c.recv_within(quiet).await {
        if let Packet::Publish(p) = p {
            if p.qos != QoS::AtMostOnce {
                c.send(&Packet::PubAck(codec::PubResponse::success(p.packet_id))).await;
            }
            let payload = String::from_utf8_lossy(&p.payload).into_owned();
            let ids = p.properties.subscription_identifiers.clone();
            got.push(Got { payload, qos: p.qos, ids });
        }
    }
    got
}

/// The QoS 1 payloads of `got`, in order.
fn qos1(got: &[Got]) -> Vec<String> {
    got.iter().filter(|g| g.qos == QoS::AtLeastOnce).map(|g| g.payload.clone()).collect()
}

fn numbered(prefix: &str, n: u16) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix}{i}")).collect()
}

/// Whether RabbitMQ has queue `name`.
async fn queue_exists(conn: &lapin::Connection, name: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let found = ch.queue_declare(ShortString::from(name), passive, FieldTable::default()).await;
    found.is_ok()
}

/// Waits (at most `within`) until queue `name` is gone.
async fn until_gone(conn: &lapin::Connection, name: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while queue_exists(conn, name).await {
        assert!(tokio::time::Instant::now() < deadline, "{name} still there after {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_persistent_session_moves_to_another_node_with_what_was_queued_while_away() {
    let prefix = unique("it-psess");
    let id = unique("ps");
    let _cleanup = delete_queues_on_drop(&session_queues(&prefix, &id));
    let (a, b, c) = nodes(&prefix).await;
    let (mut dev, present) = persistent(a.mqtt_addr, &id, 300).await;
    assert!(!present);
    subscribe(&mut dev, "ps/#", qos(QoS::AtLeastOnce), Some(5)).await;
    let mut publisher = v5(&c, &unique("pub")).await;
    until_bound(&mut publisher, &mut dev, "ps/probe").await;

    // Away (the connection drops): what is published on c meanwhile is queued for it.
    drop(dev);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 1..=10u16 {
        publish_qos1(&mut publisher, "ps/q1", i, format!("m{i}").as_bytes()).await;
    }
    publisher.publish("ps/q0", QoS::AtMostOnce, 0, b"zero").await;

    // Back through another node: the same session, its messages once each, in order.
    let (mut dev, present) = persistent(b.mqtt_addr, &id, 300).await;
    assert!(present, "session present on another node");
    let got = collect(&mut dev, Duration::from_millis(1500)).await;
    assert_eq!(qos1(&got), numbered("m", 10), "{got:?}");
    assert!(got.iter().filter(|g| g.qos == QoS::AtLeastOnce).all(|g| g.ids == vec![5]));

    // Its subscription works on its new node, for what is published anywhere (once).
    publish_qos1(&mut publisher, "ps/after", 11, b"from-c").await;
    let mut local = v5(&b, &unique("pub-b")).await;
    publish_qos1(&mut local, "ps/local", 1, b"from-b").await;
    let got = collect(&mut dev, Duration::from_millis(1000)).await;
    let mut payloads = qos1(&got);
    payloads.sort();
    assert_eq!(payloads, vec!["from-b".to_owned(), "from-c".to_owned()], "{got:?}");
    // The node it left does not deliver to it any more.
    drop(a);
    expect_silence(&mut dev, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_sigkilled_node_s_persistent_session_resumes_on_another_node_with_nothing_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique("it-psess");
    let id = unique("ps-kill");
    let _cleanup = delete_queues_on_drop(&session_queues(&prefix, &id));
    let mut a = NodeProcess::start(dir.path(), &prefix, "a").await;
    let b = NodeProcess::start(dir.path(), &prefix, "b").await;
    let c = NodeProcess::start(dir.path(), &prefix, "c").await;
    let (mut dev, _) = persistent(a.mqtt, &id, 300).await;
    subscribe(&mut dev, "k/#", qos(QoS::AtLeastOnce), None).await;
    let mut publisher = RawClient::connect(c.mqtt, ProtocolVersion::V5, &unique("pub")).await;
    until_bound(&mut publisher, &mut dev, "k/probe").await;
    for i in 1..=20u16 {
        publish_qos1(&mut publisher, "k/m", i, format!("m{i}").as_bytes()).await;
    }
    // Some are delivered and not acknowledged, the rest wait in a's hands or in RabbitMQ.
    let mut seen = 0;
    while seen < 5 {
        match dev.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::Publish(_))) => seen += 1,
            Ok(Some(_)) => {}
            other => panic!("expected deliveries on a, got {other:?}"),
        }
    }
    a.child.kill().expect("kill");
    a.child.wait().expect("reap");
    // Published while no node serves the session: the survivors still forward to its queue
    // (before and after they find a gone).
    for i in 21..=22u16 {
        publish_qos1(&mut publisher, "k/m", i, format!("m{i}").as_bytes()).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    publish_qos1(&mut publisher, "k/m", 23, b"m23").await;

    let (mut dev, present) = persistent(b.mqtt, &id, 300).await;
    assert!(present, "the session outlived its node");
    let got = collect(&mut dev, Duration::from_millis(2000)).await;
    // None was acknowledged on a: every one comes again, once, in order.
    assert_eq!(qos1(&got), numbered("m", 23), "{got:?}");
    // And the subscription goes on.
    publish_qos1(&mut publisher, "k/m", 24, b"after").await;
    let got = collect(&mut dev, Duration::from_millis(1000)).await;
    assert_eq!(qos1(&got), vec!["after".to_owned()]);
    let (status, body) = http_get(b.admin, "/readyz").await.expect("readyz");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_node_that_joins_after_a_session_s_node_died_forwards_to_its_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique("it-psess");
    let id = unique("ps-join");
    let _cleanup = delete_queues_on_drop(&session_queues(&prefix, &id));
    let mut a = NodeProcess::start(dir.path(), &prefix, "a").await;
    let b = NodeProcess::start(dir.path(), &prefix, "b").await;
    let (mut dev, _) = persistent(a.mqtt, &id, 300).await;
    subscribe(&mut dev, "j/#", qos(QoS::AtLeastOnce), None).await;
    let mut on_b = RawClient::connect(b.mqtt, ProtocolVersion::V5, &unique("pub-b")).await;
    until_bound(&mut on_b, &mut dev, "j/probe").await;
    a.child.kill().expect("kill");
    a.child.wait().expect("reap");
    drop(dev);
    // d never heard a announce the session: b tells it when it joins.
    let d = NodeProcess::start(dir.path(), &prefix, "d").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut on_d = RawClient::connect(d.mqtt, ProtocolVersion::V5, &unique("pub-d")).await;
    publish_qos1(&mut on_d, "j/x", 1, b"from-d").await;
    let (mut dev, present) = persistent(b.mqtt, &id, 300).await;
    assert!(present);
    let got = collect(&mut dev, Duration::from_millis(1500)).await;
    assert_eq!(qos1(&got), vec!["from-d".to_owned()], "{got:?}");
}

#[tokio::test]
async fn a_takeover_on_another_node_moves_the_subscriptions_and_the_unacknowledged_messages() {
    let prefix = unique("it-psess");
    let id = unique("ps-take");
    let _cleanup = delete_queues_on_drop(&session_queues(&prefix, &id));
    let (a, b, c) = nodes(&prefix).await;
    let (mut old, _) = persistent(a.mqtt_addr, &id, 300).await;
    subscribe(&mut old, "t/#", qos(QoS::AtLeastOnce), None).await;
    let mut publisher = v5(&c, &unique("pub")).await;
    until_bound(&mut publisher, &mut old, "t/probe").await;
    for i in 1..=3u16 {
        publish_qos1(&mut publisher, "t/m", i, format!("m{i}").as_bytes()).await;
    }
    // m1 acknowledged, m2 and m3 received and not.
    let first = crate::support::expect_publish(&mut old).await;
    assert_eq!(first.payload, &b"m1"[..]);
    old.send(&Packet::PubAck(codec::PubResponse::success(first.packet_id))).await;
    for want in ["m2", "m3"] {
        assert_eq!(crate::support::expect_publish(&mut old).await.payload, want.as_bytes());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut new, present) = persistent(b.mqtt_addr, &id, 300).await;
    assert!(present);
    expect_disconnect(&mut old, ReasonCode::SESSION_TAKEN_OVER).await;
    publish_qos1(&mut publisher, "t/m", 4, b"m4").await;
    let got = collect(&mut new, Duration::from_millis(1500)).await;
    assert_eq!(qos1(&got), vec!["m2", "m3", "m4"], "{got:?}");
    drop(a);
}

#[tokio::test]
async fn a_clean_start_on_another_node_ends_the_session_and_so_does_its_expiry() {
    let prefix = unique("it-psess");
    let (id, short) = (unique("ps-clean"), unique("ps-expiry"));
    let [queue, record] = session_queues(&prefix, &id);
    let [short_queue, short_record] = session_queues(&prefix, &short);
    let names = [&queue, &record, &short_queue, &short_record];
    let _cleanup = delete_queues_on_drop(&names);
    let rabbit = rabbit().await;
    let (a, b, c) = nodes(&prefix).await;

    let (mut dev, _) = persistent(a.mqtt_addr, &id, 300).await;
    subscribe(&mut dev, "clean/#", qos(QoS::AtLeastOnce), None).await;
    drop(dev);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(queue_exists(&rabbit, &queue).await && queue_exists(&rabbit, &record).await);
    let (dev, code, present) = connect(b.mqtt_addr, &id, true, 0).await;
    assert!(code.is_success() && !present);
    until_gone(&rabbit, &queue, Duration::from_secs(5)).await;
    until_gone(&rabbit, &record, Duration::from_secs(5)).await;
    drop(dev);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_dev, present) = persistent(c.mqtt_addr, &id, 300).await;
    assert!(!present, "the old session ended with the clean start");

    // Expiry: the queues go after the session's expiry interval, and the session with them.
    let (mut dev, _) = persistent(a.mqtt_addr, &short, 2).await;
    subscribe(&mut dev, "short/#", qos(QoS::AtLeastOnce), None).await;
    drop(dev);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(queue_exists(&rabbit, &short_queue).await);
    // Looked at only after the interval: a (passive) declare counts as a use in RabbitMQ.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(!queue_exists(&rabbit, &short_queue).await, "expired after 2 s unused");
    assert!(!queue_exists(&rabbit, &short_record).await);
    let (_dev, present) = persistent(b.mqtt_addr, &short, 2).await;
    assert!(!present, "expired");
}

#[tokio::test]
async fn clean_start_0_with_expiry_0_resumes_the_kept_session_which_then_ends_with_the_connection()
{
    let prefix = unique("it-psess");
    let id = unique("ps-resume0");
    let [queue, record] = session_queues(&prefix, &id);
    let _cleanup = delete_queues_on_drop(&[&queue, &record]);
    let rabbit = rabbit().await;
    let (a, b, c) = nodes(&prefix).await;
    let (mut dev, _) = persistent(a.mqtt_addr, &id, 300).await;
    subscribe(&mut dev, "zero0/#", qos(QoS::AtLeastOnce), None).await;
    drop(dev);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut publisher = RawClient::connect(c.mqtt_addr, ProtocolVersion::V5, &unique("pub")).await;
    for i in 1..=3u16 {
        publish_qos1(&mut publisher, "zero0/m", i, format!("m{i}").as_bytes()).await;
    }
    // Clean start 0 with expiry 0 on another node: the session goes on, with what was queued
    // while the client was away (MQTT 5 §3.1.2.4).
    let (mut dev, code, present) = connect(b.mqtt_addr, &id, false, 0).await;
    assert!(code.is_success() && present, "CONNACK {code:?}, session present {present}");
    let got = collect(&mut dev, Duration::from_millis(1500)).await;
    assert_eq!(qos1(&got), numbered("m", 3), "{got:?}");
    publish_qos1(&mut publisher, "zero0/m", 4, b"live").await;
    let got = collect(&mut dev, Duration::from_millis(1000)).await;
    assert_eq!(qos1(&got), vec!["live".to_owned()]);
    // And it ends with this connection: its queues go, the next CONNECT finds no session.
    drop(dev);
    until_gone(&rabbit, &queue, Duration::from_secs(5)).await;
    until_gone(&rabbit, &record, Duration::from_secs(5)).await;
    let (_dev, present) = persistent(c.mqtt_addr, &id, 300).await;
    assert!(!present, "the session ended with the expiry-0 connection");
}

#[tokio::test]
async fn a_forwarding_source_reaches_every_node_and_persistent_sessions_wherever_they_are() {
    let prefix = unique("it-psess");
    let (here, parked, topic) = (unique("ps-src-a"), unique("ps-src-c"), unique("cmd"));
    let queue = unique("it-src-fwd");
    let [hq, hr] = session_queues(&prefix, &here);
    let [pq, pr] = session_queues(&prefix, &parked);
    let _cleanup = delete_queues_on_drop(&[&hq, &hr, &pq, &pr, &queue]);
    let rabbit = rabbit().await;
    // The source runs on node a only: one queue, `cluster: forward`.
    let source = format!(
        "sources:\n  - name: cmds\n    broker: backbone\n    queue: \"{queue}\"\n    declare:\n      durable: false\n      arguments:\n        x-expires: 60000\n    topic: \"{topic}/dev\"\n    qos: 1\n    on_no_subscriber: drop\n    cluster: forward\n"
    );
    let a = gateway(&format!("{}{source}", node_config(&prefix, "a", AMQP_URL))).await;
    let b = gateway(&node_config(&prefix, "b", AMQP_URL)).await;
    let c = gateway(&node_config(&prefix, "c", AMQP_URL)).await;
    for n in [&a, &b, &c] {
        wait_ready(n).await;
    }
    let ch = rabbit.create_channel().await.expect("channel");
    let send = |body: String| {
        let (ch, queue) = (ch.clone(), queue.clone());
        async move {
            let props = lapin::BasicProperties::default();
            let options = lapin::options::BasicPublishOptions::default();
            ch.basic_publish("".into(), queue.as_str().into(), options, body.as_bytes(), props)
                .await
                .expect("publish")
                .await
                .expect("confirm");
        }
    };
    // Nobody anywhere subscribes yet (and the nodes' start, when everything travels, is
    // over): the source's `on_no_subscriber` applies (not acked as forwarded).
    crate::cluster::past_grace().await;
    send("nobody".into()).await;
    let dropped = "mqgate_source_messages_total{source=\"cmds\",outcome=\"dropped\"} 1";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !crate::support::metrics(&a).await.contains(dropped) {
        assert!(tokio::time::Instant::now() < deadline, "{dropped} not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let filter = format!("{topic}/#");
    // A clean subscriber on b, a persistent session connected on a (the source's node), one
    // parked on c.
    let mut clean = v5(&b, &unique("clean")).await;
    subscribe(&mut clean, &filter, qos(QoS::AtLeastOnce), None).await;
    let (mut on_a, _) = persistent(a.mqtt_addr, &here, 300).await;
    subscribe(&mut on_a, &filter, qos(QoS::AtLeastOnce), None).await;
    let (mut away, _) = persistent(c.mqtt_addr, &parked, 300).await;
    subscribe(&mut away, &filter, qos(QoS::AtLeastOnce), None).await;
    drop(away);
    tokio::time::sleep(Duration::from_millis(500)).await;

    for i in 1..=3 {
        send(format!("c{i}")).await;
    }
    let want = numbered("c", 3);
    let got = collect(&mut clean, Duration::from_millis(1500)).await;
    assert_eq!(qos1(&got), want, "the subscriber on another node: {got:?}");
    let got = collect(&mut on_a, Duration::from_millis(500)).await;
    assert_eq!(qos1(&got), want, "the session on the source's node, once each: {got:?}");
    // The parked session gets them where it comes back.
    let (mut back, present) = persistent(b.mqtt_addr, &parked, 300).await;
    assert!(present);
    let got = collect(&mut back, Duration::from_millis(1500)).await;
    assert_eq!(qos1(&got), want, "the session parked on c, resumed on b: {got:?}");
    // Every delivery was acknowledged to the source's queue.
    let passive = QueueDeclareOptions { passive: true, ..Default::default() };
    let q = ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await;
    assert_eq!(q.expect("the source's queue").message_count(), 0);
}

/// An MQTT 5 DISCONNECT setting the Session Expiry Interval to `expiry`.
async fn disconnect_with_expiry(mut c: RawClient, expiry: u32) {
    let mut d = codec::Disconnect::default();
    d.properties.session_expiry_interval = Some(expiry);
    c.send(&Packet::Disconnect(Box::new(d))).await;
    until_closed(&mut c, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_disconnect_that_ends_or_shortens_the_expiry_ends_the_session_on_every_node() {
    let prefix = unique("it-psess");
    let (zero, short, dead) = (unique("ps-zero"), unique("ps-shorter"), unique("ps-died"));
    let [zero_queue, zero_record] = session_queues(&prefix, &zero);
    let [short_queue, short_record] = session_queues(&prefix, &short);
    let [dead_queue, dead_record] = session_queues(&prefix, &dead);
    let names = [&zero_queue, &zero_record, &short_queue, &short_record, &dead_queue, &dead_record];
    let _cleanup = delete_queues_on_drop(&names);
    let rabbit = rabbit().await;
    let (a, b, c) = nodes(&prefix).await;

    // Expiry 0 at DISCONNECT (the queue was declared for an hour): the session ends now.
    let (mut dev, _) = persistent(a.mqtt_addr, &zero, 3600).await;
    subscribe(&mut dev, "zero/#", qos(QoS::AtLeastOnce), None).await;
    disconnect_with_expiry(dev, 0).await;
    until_gone(&rabbit, &zero_queue, Duration::from_secs(5)).await;
    until_gone(&rabbit, &zero_record, Duration::from_secs(5)).await;
    let (dev, present) = persistent(b.mqtt_addr, &zero, 3600).await;
    assert!(!present, "the session ended at its DISCONNECT");
    drop(dev);

    // Shortened to 2 s: it ends after 2 s on every node, not after the hour its queue has.
    let (mut dev, _) = persistent(a.mqtt_addr, &short, 3600).await;
    subscribe(&mut dev, "short/#", qos(QoS::AtLeastOnce), None).await;
    disconnect_with_expiry(dev, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(queue_exists(&rabbit, &short_queue).await, "kept for its 2 s");
    until_gone(&rabbit, &short_queue, Duration::from_secs(6)).await;
    until_gone(&rabbit, &short_record, Duration::from_secs(2)).await;
    let (dev, present) = persistent(c.mqtt_addr, &short, 3600).await;
    assert!(!present, "expired after the 2 s its DISCONNECT gave");
    drop(dev);

    // Shortened, then its node dies before it expires: the survivors end it in time.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut d = NodeProcess::start(dir.path(), &prefix, "d").await;
    let (mut dev, _) = persistent(d.mqtt, &dead, 3600).await;
    subscribe(&mut dev, "died/#", qos(QoS::AtLeastOnce), None).await;
    disconnect_with_expiry(dev, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.child.kill().expect("kill");
    d.child.wait().expect("reap");
    until_gone(&rabbit, &dead_queue, Duration::from_secs(20)).await;
    let (_dev, present) = persistent(b.mqtt_addr, &dead, 3600).await;
    assert!(!present, "ended by the surviving nodes");
}

#[tokio::test]
async fn a_burst_larger_than_the_session_s_queue_is_held_back_not_dropped() {
    let prefix = unique("it-psess");
    let id = unique("ps-burst");
    let _cleanup = delete_queues_on_drop(&session_queues(&prefix, &id));
    // 64 messages in the session's queue on its node: a forwarded batch alone fills it.
    let config = |node: &str| {
        node_config(&prefix, node, AMQP_URL).replacen(
            "mqtt:\n",
            "mqtt:\n  max_queued_messages: 64\n",
            1,
        )
    };
    let a = gateway(&config("a")).await;
    let c = gateway(&config("c")).await;
    wait_ready(&a).await;
    wait_ready(&c).await;
    // A small receive window: the session's queue fills while the client is slow.
    let mut dev = RawClient::tcp(a.mqtt_addr, ProtocolVersion::V5).await;
    let mut p = connect_packet(ProtocolVersion::V5, &id);
    p.clean_start = false;
    p.properties.session_expiry_interval = Some(300);
    p.properties.receive_maximum = Some(5);
    dev.send(&Packet::Connect(Box::new(p))).await;
    assert!(matches!(dev.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    subscribe(&mut dev, "burst/#", qos(QoS::AtLeastOnce), None).await;
    let mut publisher = v5(&c, &unique("pub")).await;
    until_bound(&mut publisher, &mut dev, "burst/probe").await;
    let n = 400u16;
    for i in 1..=n {
        publisher.publish("burst/x", QoS::AtLeastOnce, i, format!("b{i}").as_bytes()).await;
    }
    for _ in 1..=n {
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    let got = collect(&mut dev, Duration::from_millis(2000)).await;
    assert_eq!(qos1(&got), numbered("b", n), "every one, in order");
    let metrics = crate::support::metrics(&a).await;
    assert!(!metrics.contains("reason=\"subscriber_queue_full\""), "{metrics}");
}

#[tokio::test]
async fn a_node_cut_off_from_rabbitmq_refuses_persistent_sessions_and_serves_clean_ones() {
    let proxy = Proxy::start().await;
    let prefix = unique("it-psess");
    let a = gateway(&node_config(&prefix, "a", &proxy.url())).await;
    wait_ready(&a).await;
    proxy.cut();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !matches!(http_get(a.admin_addr, "/readyz").await, Ok((503, _))) {
        assert!(tokio::time::Instant::now() < deadline, "readyz still ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_c, code, present) = connect(a.mqtt_addr, &unique("ps-cut"), false, 300).await;
    assert_eq!((code, present), (ReasonCode::SERVER_UNAVAILABLE, false));
    let (_c, code, _) = connect(a.mqtt_addr, &unique("clean-cut"), true, 0).await;
    assert!(code.is_success(), "{code:?}");
    proxy.restore();
    wait_ready(&a).await;
}

/// The connections of the private RabbitMQ node `rabbit` that persistent sessions use (the
/// shared ones, `mqgate/sessions/N`; before they were shared, one `mqgate/session/…` each):
/// their pids.
fn session_connections(rabbit: &RabbitNode) -> Vec<String> {
    let out = rabbit.ctl(&["list_connections", "pid", "client_properties"]);
    out.lines()
        .filter(|l| l.contains("mqgate/session"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Reads until the connection closes (a DISCONNECT first, or not): asserts it does in `within`.
async fn until_closed(c: &mut RawClient, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_within(left).await {
            Ok(None) => return,
            Ok(Some(Packet::Disconnect(_))) => return,
            Ok(Some(_)) => {}
            Err(()) => panic!("the client is still connected after {within:?}"),
        }
    }
}

/// Many persistent sessions on one node are channels of one shared AMQP connection, not a
/// connection each: 50 clients use at most 2 connections from their node, each gets what was
/// queued for it while away; losing the shared connection disconnects every one of them, and
/// they come back (a new shared connection) with nothing lost.
#[tokio::test]
async fn fifty_persistent_sessions_on_a_node_share_one_or_two_amqp_connections() {
    let rabbit = tokio::task::spawn_blocking(RabbitNode::start_plain).await.expect("start");
    let url = rabbit.amqp_url();
    let prefix = unique("it-psess");
    let a = gateway(&node_config(&prefix, "a", &url)).await;
    let c = gateway(&node_config(&prefix, "c", &url)).await;
    wait_ready(&a).await;
    wait_ready(&c).await;
    let n = 50;
    let ids: Vec<String> = (0..n).map(|i| unique(&format!("ps-many{i}-"))).collect();
    let mut devs = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (mut dev, present) = persistent(a.mqtt_addr, id, 300).await;
        assert!(!present);
        subscribe(&mut dev, &format!("many/{i}"), qos(QoS::AtLeastOnce), None).await;
        devs.push(dev);
    }
    let conns = session_connections(&rabbit);
    assert!((1..=2).contains(&conns.len()), "{n} sessions on {} connections", conns.len());

    let mut publisher = v5(&c, &unique("pub")).await;
    let last = devs.len() - 1;
    until_bound(&mut publisher, &mut devs[last], &format!("many/{last}")).await;
    // Away: each one's message waits in its queue.
    devs.clear();
    for i in 0..n {
        let topic = format!("many/{i}");
        publish_qos1(&mut publisher, &topic, i as u16 + 1, format!("m{i}").as_bytes()).await;
    }
    for (i, id) in ids.iter().enumerate() {
        let (mut dev, present) = persistent(a.mqtt_addr, id, 300).await;
        assert!(present);
        let got = collect(&mut dev, Duration::from_millis(300)).await;
        assert_eq!(qos1(&got), vec![format!("m{i}")], "{id}");
        devs.push(dev);
    }
    let conns = session_connections(&rabbit);
    assert!((1..=2).contains(&conns.len()), "{n} sessions on {} connections", conns.len());

    // The shared connection goes: every session on it is disconnected (its deliveries go back
    // to its queue), and resumes with a new one.
    for pid in &conns {
        rabbit.ctl(&["close_connection", pid, "test: the shared connection goes"]);
    }
    for dev in &mut devs {
        until_closed(dev, Duration::from_secs(10)).await;
    }
    devs.clear();
    for i in 0..n {
        let topic = format!("many/{i}");
        publish_qos1(&mut publisher, &topic, i as u16 + 1, format!("again{i}").as_bytes()).await;
    }
    for (i, id) in ids.iter().enumerate() {
        let (mut dev, present) = persistent(a.mqtt_addr, id, 300).await;
        assert!(present);
        let got = collect(&mut dev, Duration::from_millis(300)).await;
        assert_eq!(qos1(&got), vec![format!("again{i}")], "{id}");
        devs.push(dev);
    }
    let conns = session_connections(&rabbit);
    assert!((1..=2).contains(&conns.len()), "{n} sessions on {} connections", conns.len());
    drop((a, c, devs));
    tokio::task::spawn_blocking(move || drop(rabbit)).await.expect("stop");
}
