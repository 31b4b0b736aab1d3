//! Pathological inputs that must not stall other clients (issue 13, item 5): a wildcard
//! SUBSCRIBE over more retained messages than the queue holds, the same SUBSCRIBE repeated in
//! a loop, and MQTT 5 PUBLISHes with thousands of user properties. Raw sockets, so what the
//! server sends is counted exactly. (The fan-out and parked-session cases are measured by
//! `mqgate-bench --mode attack`, docs/benchmarks.md.)

use std::time::{Duration, Instant};

use bytes::BytesMut;
use mqgate::mqtt::codec::{
    self, Packet, Properties, ProtocolVersion, QoS, ReasonCode, Subscribe, SubscribeFilter,
    SubscriptionOptions,
};

use crate::support::*;

fn config(extra: &str) -> String {
    format!("mqtt:\n  listen: \"127.0.0.1:0\"\n{extra}admin:\n  listen: \"127.0.0.1:0\"\n")
}

/// Sets `n` retained messages `ret/<i>/v` (QoS 0) from one client, and waits until the last
/// one is stored (a QoS 1 retained PUBLISH after them is acknowledged in order).
async fn set_retained(addr: std::net::SocketAddr, n: usize) {
    let mut c = RawClient::connect(addr, ProtocolVersion::V311, &unique("setter")).await;
    let mut out = BytesMut::new();
    for i in 0..n {
        let mut p = publish_packet(&format!("ret/{i:05}/v"), QoS::AtMostOnce, 0, b"v");
        p.retain = true;
        codec::encode(&Packet::Publish(p), ProtocolVersion::V311, &mut out).expect("encode");
    }
    c.send_raw(&out).await;
    let mut last = publish_packet("ret/last", QoS::AtLeastOnce, 1, b"v");
    last.retain = true;
    c.send(&Packet::Publish(last)).await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
}

/// Counts the retained PUBLISHes `c` receives until `quiet` passes without one.
async fn count_publishes(c: &mut RawClient, quiet: Duration) -> (usize, Instant) {
    let mut n = 0;
    let mut last = Instant::now();
    loop {
        match c.recv_within(quiet).await {
            Ok(Some(Packet::Publish(p))) => {
                assert!(p.retain, "a retained message has its flag set");
                n += 1;
                last = Instant::now();
            }
            Ok(Some(Packet::SubAck(_))) => {}
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("closed"),
            Err(()) => return (n, last),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_subscriber_gets_every_retained_message_its_queue_could_not_hold() {
    // A queue of 50, 1,200 retained messages, 600 per second: all of them arrive, paced.
    let app = gateway(&config("  outbound_queue: 50\n  max_retained_rate: 600\n")).await;
    set_retained(app.mqtt_addr, 1_200).await;
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("all")).await;
    let start = Instant::now();
    assert_eq!(sub.subscribe("ret/+/v", QoS::AtMostOnce).await, vec![ReasonCode(0)]);
    let (n, last) = count_publishes(&mut sub, Duration::from_secs(2)).await;
    assert_eq!(n, 1_200, "every retained message, not only the queue's worth");
    // A second's burst (600), then 600/s: about a second for the rest.
    let took = last - start;
    assert!(took >= Duration::from_millis(800), "paced by max_retained_rate: {took:?}");
    let m = metrics(&app).await;
    assert!(!m.contains("reason=\"subscriber_queue_full\""), "nothing dropped: {m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_repeated_in_a_loop_is_held_to_the_retained_rate() {
    let app = gateway(&config("  max_retained_rate: 1000\n")).await;
    set_retained(app.mqtt_addr, 3_000).await;
    let mut attacker =
        RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("loop")).await;
    let mut other = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("o")).await;
    // 300 SUBSCRIBEs of `#` in one write: each restarts the walk of `#`; it does not add one.
    let mut out = BytesMut::new();
    for id in 1..=300u16 {
        let s = Subscribe {
            packet_id: id,
            filters: vec![SubscribeFilter {
                filter: "#".into(),
                options: SubscriptionOptions { qos: QoS::AtMostOnce, ..Default::default() },
            }],
            properties: Properties::default(),
        };
        codec::encode(&Packet::Subscribe(Box::new(s)), ProtocolVersion::V311, &mut out)
            .expect("encode");
    }
    let start = Instant::now();
    attacker.send_raw(&out).await;
    // Another client is answered at once meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    other.send(&Packet::PingReq).await;
    assert!(matches!(other.recv().await, Some(Packet::PingResp)));
    let ping = asked.elapsed();
    assert!(ping < Duration::from_millis(500), "the other client waited {ping:?}");
    // The attacker reads for 2.5 s: a second's burst and 1,000/s after it, whatever it
    // asked for (before: up to a queue's worth, 1,000, per SUBSCRIBE: 300,000).
    let mut got = 0usize;
    let mut subacks = 0usize;
    while start.elapsed() < Duration::from_millis(2_500) {
        match attacker.recv_within(Duration::from_millis(100)).await {
            Ok(Some(Packet::Publish(_))) => got += 1,
            Ok(Some(Packet::SubAck(_))) => subacks += 1,
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => panic!("closed"),
            Err(()) => {}
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(subacks, 300, "every SUBSCRIBE answered");
    let bound = 1_000.0 + 1_000.0 * elapsed + 100.0;
    assert!((got as f64) <= bound, "{got} retained messages in {elapsed:.1} s (bound {bound})");
    assert!(got >= 2_000, "the walk goes on at the rate: {got}");
    app.stop().await;
}

/// An MQTT 5 QoS 1 PUBLISH with `n` user properties.
fn with_user_properties(n: usize, id: u16) -> Packet {
    let mut p = publish_packet("props/x", QoS::AtLeastOnce, id, b"p");
    let props = Properties {
        user_properties: (0..n).map(|i| (format!("k{i}"), "v".to_string())).collect(),
        ..Default::default()
    };
    p.properties = props.into();
    Packet::Publish(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_with_more_user_properties_than_allowed_is_refused() {
    let app = gateway(&config("  max_user_properties: 64\n")).await;
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("sub")).await;
    sub.subscribe("props/#", QoS::AtMostOnce).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("props")).await;
    c.send(&with_user_properties(64, 1)).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert!(a.code.is_success(), "64 are allowed: {a:?}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let p = expect_publish(&mut sub).await;
    assert_eq!(p.properties.user_properties.len(), 64);
    c.send(&with_user_properties(5_000, 2)).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => {
            assert_eq!((a.packet_id, a.code), (2, ReasonCode::QUOTA_EXCEEDED), "{a:?}")
        }
        other => panic!("expected PUBACK 0x97, got {other:?}"),
    }
    // Not routed, and the connection goes on.
    expect_silence(&mut sub, Duration::from_millis(300)).await;
    publish_qos1(&mut c, "props/y", 3, b"ok").await;
    let m = metrics(&app).await;
    assert!(
        m.contains("mqgate_messages_dropped_total{reason=\"too_many_user_properties\"} 1"),
        "{m}"
    );
    app.stop().await;
}
