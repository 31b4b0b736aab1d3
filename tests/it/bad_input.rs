//! Bad input gets the protocol's answer, and nothing else breaks.

use std::time::Duration;

use crate::support::*;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS, ReasonCode};

const CONFIG: &str = "mqtt:\n  listen: \"127.0.0.1:0\"\n  connect_timeout: 1s\n  max_packet_size: 4096\nadmin:\n  listen: \"127.0.0.1:0\"\n";

#[tokio::test]
async fn silent_connection_is_closed_after_the_connect_timeout() {
    let app = gateway(CONFIG).await;
    let mut c = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V311).await;
    let started = std::time::Instant::now();
    assert_eq!(c.recv_within(Duration::from_secs(5)).await, Ok(None), "closed, nothing sent");
    assert!(started.elapsed() >= Duration::from_millis(900), "closed too early");
    app.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_packets_get_reason_codes_and_others_are_unaffected() {
    let app = gateway(CONFIG).await;
    let mut bystander = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "bystander").await;
    bystander.subscribe("ok/#", QoS::AtMostOnce).await;

    // SUBSCRIBE with reserved flags 0000 instead of 0010: malformed.
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "bad-flags").await;
    c.send_raw(&[0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'a']).await;
    expect_disconnect(&mut c, ReasonCode::MALFORMED_PACKET).await;
    assert_eq!(c.recv().await, None);

    // Larger than max_packet_size: 0x95, detected from the header.
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "too-big").await;
    c.publish("ok/big", QoS::AtMostOnce, 0, &vec![0u8; 8000]).await;
    expect_disconnect(&mut c, ReasonCode::PACKET_TOO_LARGE).await;

    // A wildcard in a PUBLISH topic (3.1.1: the connection is closed).
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "bad-topic").await;
    c.send_raw(&[0x30, 0x07, 0x00, 0x04, b'o', b'k', b'/', b'+', b'x']).await;
    assert_eq!(c.recv().await, None);

    // A second CONNECT is a protocol error.
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "twice").await;
    c.send(&Packet::Connect(Box::new(connect_packet(ProtocolVersion::V5, "twice")))).await;
    expect_disconnect(&mut c, ReasonCode::PROTOCOL_ERROR).await;

    // Garbage instead of CONNECT: closed.
    let mut c = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V311).await;
    c.send_raw(b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(c.recv().await, None);

    // An unsupported protocol level gets CONNACK 0x01 (3.1.1 form).
    let mut c = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V311).await;
    c.send_raw(&[
        0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x07, 0x02, 0x00, 0x3c, 0x00, 0x00,
    ])
    .await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
        other => panic!("expected CONNACK 0x01, got {other:?}"),
    }

    // Bad subscription filters: per-filter failure codes, the connection stays up.
    let mut c3 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "bad-filter3").await;
    assert_eq!(c3.subscribe("a/#/b", QoS::AtMostOnce).await, vec![ReasonCode::UNSPECIFIED_ERROR]);
    let mut c5 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "bad-filter5").await;
    assert_eq!(c5.subscribe("a/b#", QoS::AtMostOnce).await, vec![ReasonCode::TOPIC_FILTER_INVALID]);
    assert_eq!(c5.subscribe("ok/#", QoS::AtMostOnce).await, vec![ReasonCode::GRANTED_QOS_0]);

    // After all that, the bystander still gets messages.
    let mut publ = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "publisher").await;
    publ.publish("ok/still", QoS::AtMostOnce, 0, b"alive").await;
    match bystander.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"alive"),
        other => panic!("bystander expected PUBLISH, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn keepalive_expiry_closes_a_silent_client() {
    let app = gateway(CONFIG).await;
    let mut c = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V5).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "sleepy");
    connect.keep_alive = 1;
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    match c.recv_within(Duration::from_secs(4)).await {
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.code, ReasonCode::KEEP_ALIVE_TIMEOUT),
        other => panic!("expected DISCONNECT 0x8D within 1.5 × keepalive, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_dropped_and_slows_nobody_else() {
    let yaml = "mqtt:\n  listen: \"127.0.0.1:0\"\n  write_timeout: 1s\n  outbound_queue: 16\nadmin:\n  listen: \"127.0.0.1:0\"\n";
    let app = gateway(yaml).await;
    let mut stuck = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "stuck").await;
    stuck.subscribe("flood/#", QoS::AtMostOnce).await;
    // From here on `stuck` reads nothing.
    let mut publ = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "flooder").await;
    let payload = vec![7u8; 64 * 1024];
    // Keep the flood going for 3 s, so the stuck subscriber's socket fills and stays full for
    // longer than write_timeout; meanwhile the publisher's own QoS 1 messages must be served.
    let flood_until = std::time::Instant::now() + Duration::from_secs(3);
    let mut id = 0u16;
    while std::time::Instant::now() < flood_until {
        for _ in 0..20 {
            publ.publish("flood/x", QoS::AtMostOnce, 0, &payload).await;
        }
        id += 1;
        let sent = std::time::Instant::now();
        publ.publish("other/x", QoS::AtLeastOnce, id, b"still served").await;
        match publ.recv_within(Duration::from_secs(2)).await {
            Ok(Some(Packet::PubAck(a))) => assert_eq!(a.packet_id, id),
            other => panic!("publisher held up by a stuck subscriber: {other:?}"),
        }
        assert!(sent.elapsed() < Duration::from_millis(500), "PUBACK slowed: {:?}", sent.elapsed());
    }
    let (_, metrics) = http_get(app.admin_addr, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains(r#"mqgate_messages_dropped_total{reason="subscriber_queue_full"}"#),
        "drops for the stuck subscriber are counted:\n{metrics}"
    );
    // The stuck subscriber is disconnected after write_timeout; draining its socket ends in EOF.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match stuck.recv_within(Duration::from_secs(10)).await {
            Ok(None) => break,
            Ok(Some(_)) => assert!(tokio::time::Instant::now() < deadline, "never disconnected"),
            Err(()) => panic!("stuck subscriber neither served nor disconnected"),
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn topic_and_subscription_limits_get_the_protocols_answers() {
    let yaml = "mqtt:\n  listen: \"127.0.0.1:0\"\n  max_topic_levels: 3\n  max_subscriptions: 2\nadmin:\n  listen: \"127.0.0.1:0\"\n";
    let app = gateway(yaml).await;
    let mut c5 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "limits5").await;
    assert_eq!(
        c5.subscribe("a/b/c/d", QoS::AtMostOnce).await,
        vec![ReasonCode::TOPIC_FILTER_INVALID]
    );
    assert_eq!(c5.subscribe("a/#", QoS::AtMostOnce).await, vec![ReasonCode::GRANTED_QOS_0]);
    assert_eq!(c5.subscribe("b/#", QoS::AtMostOnce).await, vec![ReasonCode::GRANTED_QOS_0]);
    assert_eq!(
        c5.subscribe("b/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::GRANTED_QOS_1],
        "replacing one is fine"
    );
    assert_eq!(c5.subscribe("c/#", QoS::AtMostOnce).await, vec![ReasonCode::QUOTA_EXCEEDED]);
    let mut c3 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "limits3").await;
    c3.subscribe("x", QoS::AtMostOnce).await;
    c3.subscribe("y", QoS::AtMostOnce).await;
    assert_eq!(c3.subscribe("z", QoS::AtMostOnce).await, vec![ReasonCode::UNSPECIFIED_ERROR]);

    c5.publish("a/b/c/d", QoS::AtMostOnce, 0, b"deep").await;
    expect_disconnect(&mut c5, ReasonCode::TOPIC_NAME_INVALID).await;
    app.stop().await;
}
