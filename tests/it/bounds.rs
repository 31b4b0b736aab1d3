//! Bounds that keep a small deployment alive under abuse (issue 13, item 3): how many
//! sessions exist, how long they are kept (3.1.1 persistent ones too), how long a will waits.

use std::time::{Duration, Instant};

use bytes::Bytes;
use mqgate::mqtt::codec::{
    LastWill, Packet, Properties, ProtocolVersion, PubResponse, QoS, ReasonCode,
};

use crate::support::*;

fn config(extra: &str) -> String {
    format!("mqtt:\n  listen: \"127.0.0.1:0\"\n{extra}admin:\n  listen: \"127.0.0.1:0\"\n")
}

/// CONNECT `id` (persistent when `persistent`); the client and its CONNACK.
async fn connect(
    addr: std::net::SocketAddr,
    version: ProtocolVersion,
    id: &str,
    persistent: bool,
) -> (RawClient, mqgate::mqtt::codec::ConnAck) {
    let mut c = RawClient::tcp(addr, version).await;
    let mut connect = connect_packet(version, id);
    connect.clean_start = !persistent;
    if persistent && version == ProtocolVersion::V5 {
        connect.properties.session_expiry_interval = Some(u32::MAX);
    }
    c.send(&Packet::Connect(Box::new(connect))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => (c, *a),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_sessions_counts_connected_and_parked_client_ids() {
    let app = gateway(&config("  max_sessions: 2\n")).await;
    let (a, ack) = connect(app.mqtt_addr, ProtocolVersion::V311, "bound-a", true).await;
    assert!(ack.code.is_success());
    drop(a); // parked
    let (_b, ack) = connect(app.mqtt_addr, ProtocolVersion::V5, "bound-b", false).await;
    assert!(ack.code.is_success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let (_, ack) = connect(app.mqtt_addr, version, "bound-c", false).await;
        let want = match version {
            // 3.1.1 has no quota code: return code 3, Server unavailable.
            ProtocolVersion::V311 => ReasonCode::SERVER_UNAVAILABLE,
            ProtocolVersion::V5 => ReasonCode::QUOTA_EXCEEDED,
        };
        assert_eq!(ack.code, want, "{version:?}");
    }
    // The parked session's owner gets back in.
    let (_, ack) = connect(app.mqtt_addr, ProtocolVersion::V311, "bound-a", true).await;
    assert!(ack.code.is_success() && ack.session_present);
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_auth_refused_total{reason=\"max_sessions\"} 2"), "{m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_sessions_expire_at_max_session_expiry_311_included() {
    let app = gateway(&config("  max_session_expiry: 1s\n")).await;
    // 3.1.1 Clean Session 0 used to mean "forever".
    let (mut c, ack) = connect(app.mqtt_addr, ProtocolVersion::V311, "exp-311", true).await;
    assert!(ack.code.is_success());
    c.subscribe("x/#", QoS::AtLeastOnce).await;
    drop(c);
    // MQTT 5 asking for "never" is told the cap.
    let (c5, ack) = connect(app.mqtt_addr, ProtocolVersion::V5, "exp-5", true).await;
    assert_eq!(ack.properties.session_expiry_interval, Some(1));
    drop(c5);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, ack) = connect(app.mqtt_addr, ProtocolVersion::V311, "exp-311", true).await;
    assert!(ack.session_present, "kept within the cap");
    drop(c);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (version, id) in [(ProtocolVersion::V311, "exp-311"), (ProtocolVersion::V5, "exp-5")] {
        let (_, ack) = connect(app.mqtt_addr, version, id, true).await;
        assert!(ack.code.is_success() && !ack.session_present, "{id}: expired after the cap");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_waits_at_most_max_will_delay() {
    let app = gateway(&config("  max_will_delay: 1s\n")).await;
    let (mut watcher, _) =
        connect(app.mqtt_addr, ProtocolVersion::V5, &unique("watch"), false).await;
    watcher.subscribe("wills/#", QoS::AtMostOnce).await;
    let mut c = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V5).await;
    let mut connect = connect_packet(ProtocolVersion::V5, &unique("dying"));
    connect.properties.session_expiry_interval = Some(3600);
    connect.will = Some(LastWill {
        topic: "wills/x".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: Properties { will_delay_interval: Some(86_400), ..Properties::default() },
    });
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    let gone = Instant::now();
    drop(c); // no DISCONNECT: the will is due
    match watcher.recv_within(Duration::from_secs(5)).await {
        Ok(Some(Packet::Publish(p))) => assert_eq!(p.topic, "wills/x"),
        other => panic!("the will never came: {other:?}"),
    }
    let waited = gone.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_session_keeps_at_most_max_queued_bytes() {
    let app = gateway(&config("  max_queued_bytes: 1KiB\n")).await;
    let (mut c, _) = connect(app.mqtt_addr, ProtocolVersion::V311, "bytes-away", true).await;
    c.subscribe("big/#", QoS::AtLeastOnce).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut p = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("pub")).await;
    let payload = vec![b'x'; 300];
    for i in 1..=10u16 {
        p.publish("big/1", QoS::AtLeastOnce, i, &payload).await;
        assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    }
    let (mut c, ack) = connect(app.mqtt_addr, ProtocolVersion::V311, "bytes-away", true).await;
    assert!(ack.session_present);
    let mut got = 0;
    while let Ok(Some(Packet::Publish(m))) = c.recv_within(Duration::from_millis(300)).await {
        c.send(&Packet::PubAck(mqgate::mqtt::codec::PubResponse::success(m.packet_id))).await;
        got += 1;
    }
    // 1 KiB holds three 305-byte messages: the rest were dropped, and counted.
    assert_eq!(got, 3);
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_messages_dropped_total{reason=\"session_queue_full\"} 7"), "{m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_beyond_max_retained_bytes_are_refused() {
    let app = gateway(&config("  max_retained_bytes: 1KiB\n")).await;
    let big = vec![b'r'; 600];
    let mut c5 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("r5")).await;
    let retain = |topic: &str, id: u16| {
        let mut p = publish_packet(topic, QoS::AtLeastOnce, id, &big);
        p.retain = true;
        Packet::Publish(p)
    };
    c5.send(&retain("keep/a", 1)).await;
    assert!(puback_code(&mut c5).await.is_success());
    c5.send(&retain("keep/b", 2)).await;
    assert_eq!(puback_code(&mut c5).await, ReasonCode::QUOTA_EXCEEDED, "1 KiB holds one");
    c5.send(&retain("keep/a", 3)).await;
    assert!(puback_code(&mut c5).await.is_success(), "replacing a topic's value fits");
    // 3.1.1 cannot be told: acknowledged, delivered live, not retained.
    let mut c3 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("r3")).await;
    c3.send(&retain("keep/c", 1)).await;
    assert!(puback_code(&mut c3).await.is_success());
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("s")).await;
    sub.subscribe("keep/#", QoS::AtMostOnce).await;
    let mut topics = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = sub.recv_within(Duration::from_millis(300)).await {
        topics.push(p.topic.clone());
    }
    assert_eq!(topics, vec!["keep/a"]);
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_messages_dropped_total{reason=\"retained_bytes_full\"} 2"), "{m}");
    app.stop().await;
}

async fn puback_code(c: &mut RawClient) -> ReasonCode {
    match c.recv().await {
        Some(Packet::PubAck(a)) => a.code,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Polls the metrics until `line` appears (values counted without waiting for the disk).
async fn wait_metric(app: &mqgate::app::App, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(app).await;
        if m.contains(line) {
            return m;
        }
        assert!(Instant::now() < deadline, "never saw {line}:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_beyond_max_dead_letter_bytes_evict_the_oldest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hook =
        crate::support::webhook::Webhook::start(|_, _| crate::support::webhook::Reply::Status(404))
            .await;
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\n  max_dead_letter_bytes: 5KiB\nhttp:\n  api:\n    url: \"http://{}\"\nrules:\n  - name: hooks\n    from: \"h/#\"\n    to:\n      - http:\n          endpoint: api\n          path: /missing\n",
        dir.path().display(),
        hook.addr
    );
    let app = gateway(&yaml).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("dl")).await;
    // Ten letters of a bit more than 1 KiB each: 5 KiB keeps four of them.
    let payload = vec![b'd'; 1024];
    for i in 1..=10u16 {
        c.publish(&format!("h/{i}"), QoS::AtLeastOnce, i, &payload).await;
        assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    }
    let m =
        wait_metric(&app, "mqgate_messages_dropped_total{reason=\"dead_letters_full\"} 6").await;
    assert!(m.contains("mqgate_dead_letters 4\n"), "{m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_owns_at_most_max_retained_per_client_topics() {
    let app = gateway(&config("  max_retained_per_client: 2\n")).await;
    let retain = |topic: &str, id: u16, payload: &[u8]| {
        let mut p = publish_packet(topic, QoS::AtLeastOnce, id, payload);
        p.retain = true;
        Packet::Publish(p)
    };
    let greedy = unique("greedy");
    let mut c5 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &greedy).await;
    for (i, topic) in ["own/1", "own/2"].into_iter().enumerate() {
        c5.send(&retain(topic, i as u16 + 1, b"v")).await;
        assert!(puback_code(&mut c5).await.is_success());
    }
    c5.send(&retain("own/3", 3, b"v")).await;
    assert_eq!(puback_code(&mut c5).await, ReasonCode::QUOTA_EXCEEDED, "a third topic");
    c5.send(&retain("own/1", 4, b"v2")).await;
    assert!(puback_code(&mut c5).await.is_success(), "its own topic can be replaced");
    // Another client has its own share, and clearing a topic gives one back.
    let mut other = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("o")).await;
    other.send(&retain("own/3", 1, b"w")).await;
    assert!(puback_code(&mut other).await.is_success());
    c5.send(&retain("own/2", 5, b"")).await;
    assert!(puback_code(&mut c5).await.is_success());
    c5.send(&retain("own/4", 6, b"v")).await;
    assert!(puback_code(&mut c5).await.is_success());
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("s")).await;
    sub.subscribe("own/#", QoS::AtMostOnce).await;
    let mut topics = Vec::new();
    while let Ok(Some(Packet::Publish(p))) = sub.recv_within(Duration::from_millis(300)).await {
        topics.push(p.topic.clone());
    }
    topics.sort();
    assert_eq!(topics, vec!["own/1", "own/3", "own/4"]);
    let m = metrics(&app).await;
    assert!(
        m.contains("mqgate_messages_dropped_total{reason=\"retained_per_client_full\"} 1"),
        "{m}"
    );
    app.stop().await;
}

/// The sum of the `mqgate_messages_dropped_total` lines of `m` whose reason is in `reasons`.
fn dropped(m: &str, reasons: &[&str]) -> u64 {
    reasons
        .iter()
        .filter_map(|r| {
            let prefix = format!("mqgate_messages_dropped_total{{reason=\"{r}\"}} ");
            m.lines().find_map(|l| l.strip_prefix(prefix.as_str())?.trim().parse::<u64>().ok())
        })
        .sum()
}

/// The value of the metric line starting with `name ` in `m`.
fn gauge(m: &str, name: &str) -> Option<u64> {
    m.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_does_not_read_gets_at_most_max_outbound_bytes_written_at_once() {
    let app = gateway(&config("  max_outbound_bytes: 64KiB\n")).await;
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("stuck")).await;
    sub.subscribe("flood/#", QoS::AtMostOnce).await;
    // 600 × 32 KiB: more than the sockets hold; the subscriber reads nothing meanwhile.
    let mut p = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("flood")).await;
    let payload = vec![b'f'; 32 * 1024];
    const SENT: u64 = 600;
    for _ in 0..SENT {
        p.publish("flood/x", QoS::AtMostOnce, 0, &payload).await;
    }
    p.send(&Packet::PingReq).await;
    assert!(matches!(p.recv().await, Some(Packet::PingResp)), "every PUBLISH was read");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Now it reads. What waited was in the bounded session queue (the rest dropped and
    // counted), never more than 64 KiB (and one delivery) in its write buffer.
    let mut got = 0u64;
    while let Ok(Some(Packet::Publish(_))) = sub.recv_within(Duration::from_millis(1000)).await {
        got += 1;
    }
    let m = metrics(&app).await;
    let queue = dropped(&m, &["subscriber_queue_full", "session_queue_full"]);
    let peak = gauge(&m, "mqgate_write_buffer_peak_bytes").expect("the peak is exported");
    eprintln!("sent {SENT}: delivered {got}, queue full {queue}, write buffer peak {peak} bytes");
    assert!(peak > 0 && peak <= 64 * 1024 + 33 * 1024, "write buffer peak {peak}");
    assert_eq!(got + queue, SENT, "got {got}, dropped {queue}");
    app.stop().await;
}

/// `mqtt.max_memory`: at the budget a QoS 0 PUBLISH is dropped and counted, a QoS 1 publisher
/// is not read any more (its later PUBLISHes wait unacknowledged in TCP), and once the
/// subscriber that holds the bytes takes its messages, the publisher goes on: nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_memory_drops_qos0_and_pauses_qos1_publishers_until_bytes_are_freed() {
    let app = gateway(&config(
        "  max_memory: 1MiB\n  max_retained_bytes: 64KiB\n  max_packet_size: 131072\n",
    ))
    .await;
    let topic = unique("mem");
    // A subscriber that takes nothing: what it is sent stays in its window and queue.
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("slow")).await;
    sub.subscribe(&format!("{topic}/#"), QoS::AtLeastOnce).await;
    let mut publisher =
        RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("pub")).await;
    let payload = vec![7u8; 64 * 1024];
    let total: u16 = 32; // 2 MiB, twice the budget
    for id in 1..=total {
        publisher.publish(&format!("{topic}/q1"), QoS::AtLeastOnce, id, &payload).await;
    }
    // About 1 MiB is taken and acknowledged; then the publisher is no longer read.
    let mut acked = 0u16;
    while let Ok(Some(p)) = publisher.recv_within(Duration::from_secs(2)).await {
        match p {
            Packet::PubAck(a) => {
                acked += 1;
                assert_eq!(a.packet_id, acked, "acks in order");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!((10..total).contains(&acked), "{acked} of {total} acknowledged at the budget");
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_memory_pauses_total 1"), "{m}");
    let held: i64 = metric_value(&m, "mqgate_memory_message_bytes").expect("gauge");
    assert!(((1 << 20)..=(1 << 20) + 2 * 65_600).contains(&held), "held {held}");
    // A QoS 0 publisher at the budget: dropped and counted, not paused.
    let mut q0 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("q0")).await;
    for _ in 0..3 {
        q0.publish(&format!("{topic}/q0"), QoS::AtMostOnce, 0, b"small").await;
    }
    q0.send(&Packet::PingReq).await;
    assert!(matches!(q0.recv().await, Some(Packet::PingResp)), "a QoS 0 client is still read");
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_messages_dropped_total{reason=\"max_memory\"} 3"), "{m}");
    // The subscriber takes its messages: every QoS 1 message arrives, in order, once.
    let mut got = 0u16;
    while got < total {
        match sub.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::Publish(p))) => {
                assert_eq!(p.topic, format!("{topic}/q1"), "the QoS 0 ones were dropped");
                assert_eq!(p.payload.len(), payload.len());
                got += 1;
                sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
            }
            other => panic!("after {got} messages: {other:?}"),
        }
    }
    // ... and the publisher was read again: all its acks came.
    while acked < total {
        match publisher.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAck(a))) => {
                acked += 1;
                assert_eq!(a.packet_id, acked);
            }
            other => panic!("after {acked} acks: {other:?}"),
        }
    }
    expect_silence(&mut sub, Duration::from_millis(300)).await;
    let m = metrics(&app).await;
    assert_eq!(metric_value(&m, "mqgate_memory_message_bytes"), Some(0), "all given back");
    app.stop().await;
}

/// The value of an unlabelled metric in a `/metrics` text.
fn metric_value(text: &str, name: &str) -> Option<i64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `mqtt.max_memory`: a publisher whose own unacknowledged deliveries hold the budget is not
/// paused for good: it is read again now and then, so its PUBACKs (sent after its PUBLISHes)
/// come through and free the bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_memory_does_not_deadlock_a_publisher_that_holds_the_budget_itself() {
    let app = gateway(&config(
        "  max_memory: 1MiB\n  max_retained_bytes: 64KiB\n  max_packet_size: 131072\n",
    ))
    .await;
    let topic = unique("self");
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("selfpub")).await;
    c.subscribe(&topic, QoS::AtLeastOnce).await;
    let payload = vec![1u8; 64 * 1024];
    let total: u16 = 24;
    for id in 1..=total {
        c.publish(&topic, QoS::AtLeastOnce, id, &payload).await;
    }
    let (mut delivered, mut acked) = (0u16, 0u16);
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered < total || acked < total {
        assert!(Instant::now() < deadline, "stuck: {delivered} delivered, {acked} acked");
        match c.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::Publish(p))) => {
                delivered += 1;
                c.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
            }
            Ok(Some(Packet::PubAck(a))) => {
                acked += 1;
                assert_eq!(a.packet_id, acked, "acks in order");
            }
            other => panic!("{delivered} delivered, {acked} acked: {other:?}"),
        }
    }
    let m = metrics(&app).await;
    assert!(metric_value(&m, "mqgate_memory_pauses_total").is_some_and(|n| n >= 1), "{m}");
    app.stop().await;
}
