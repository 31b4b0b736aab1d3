//! MQTT 5 extras with our raw client (exact properties and reason codes): subscription
//! identifiers, Will Delay Interval and the ends that publish a will, Request Response
//! Information and Request Problem Information.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use mqgate::mqtt::codec::{
    ConnAck, Disconnect, LastWill, Packet, Properties, ProtocolVersion, PubResponse, QoS,
    ReasonCode, Subscribe, SubscribeFilter, SubscriptionOptions,
};

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;
const NO_RULES: &str = "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n";

/// Sends `connect` and returns the CONNACK (asserted successful).
async fn connect_with(
    addr: std::net::SocketAddr,
    connect: mqgate::mqtt::codec::Connect,
) -> (RawClient, ConnAck) {
    let mut c = RawClient::tcp(addr, connect.protocol).await;
    c.send(&Packet::Connect(Box::new(connect))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => {
            assert!(a.code.is_success(), "CONNACK refused: {a:?}");
            (c, *a)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Subscribes to one filter with an optional subscription identifier; returns the SUBACK codes.
async fn subscribe_id(
    c: &mut RawClient,
    filter: &str,
    qos: QoS,
    id: Option<u32>,
) -> Vec<ReasonCode> {
    let properties =
        Properties { subscription_identifiers: id.into_iter().collect(), ..Default::default() };
    c.send(&Packet::Subscribe(Box::new(Subscribe {
        packet_id: 7,
        filters: vec![SubscribeFilter {
            filter: filter.into(),
            options: SubscriptionOptions { qos, ..Default::default() },
        }],
        properties,
    })))
    .await;
    match c.recv().await {
        Some(Packet::SubAck(s)) => s.codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_with_every_identifier() {
    let app = gateway(NO_RULES).await;
    let (mut sub, connack) = connect_with(app.mqtt_addr, connect_packet(V5, &unique("sid"))).await;
    assert_eq!(connack.properties.subscription_identifier_available, Some(1));
    assert_eq!(
        subscribe_id(&mut sub, "sid/#", QoS::AtLeastOnce, Some(3)).await,
        vec![ReasonCode::GRANTED_QOS_1]
    );
    assert_eq!(
        subscribe_id(&mut sub, "sid/+/x", QoS::AtMostOnce, Some(7)).await,
        vec![ReasonCode::GRANTED_QOS_0]
    );
    // A subscription without an identifier adds none.
    subscribe_id(&mut sub, "sid/a/+", QoS::AtMostOnce, None).await;
    let mut old = RawClient::connect(app.mqtt_addr, V311, &unique("sid-311")).await;
    old.subscribe("sid/#", QoS::AtLeastOnce).await;
    let mut publ = RawClient::connect(app.mqtt_addr, V5, &unique("sid-pub")).await;

    publish_qos1(&mut publ, "sid/a/x", 1, b"both").await;
    let p = expect_publish(&mut sub).await;
    assert_eq!(p.payload, &b"both"[..]);
    assert_eq!(p.qos, QoS::AtLeastOnce, "the highest granted QoS");
    let mut ids = p.properties.subscription_identifiers.clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![3, 7], "one copy carrying the identifiers of both subscriptions");
    sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
    expect_silence(&mut sub, Duration::from_millis(300)).await;
    // The 3.1.1 subscriber gets its copy as before.
    let p = expect_publish(&mut old).await;
    assert_eq!(p.payload, &b"both"[..]);
    assert!(p.properties.subscription_identifiers.is_empty());

    publish_qos1(&mut publ, "sid/b", 2, b"one").await;
    let p = expect_publish(&mut sub).await;
    assert_eq!(p.properties.subscription_identifiers, vec![3]);
    sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;

    // Subscribing again without an identifier removes it from that subscription (§3.8.2.1.2).
    subscribe_id(&mut sub, "sid/#", QoS::AtLeastOnce, None).await;
    publish_qos1(&mut publ, "sid/b", 3, b"none").await;
    let p = expect_publish(&mut sub).await;
    assert_eq!((&p.payload[..], p.properties.subscription_identifiers.len()), (&b"none"[..], 0));
    app.stop().await;
}

#[tokio::test]
async fn retained_and_shared_deliveries_carry_their_subscription_identifier() {
    let app = gateway(NO_RULES).await;
    let mut publ = RawClient::connect(app.mqtt_addr, V5, &unique("sidr-pub")).await;
    let mut retained = publish_packet("sidr/kept", QoS::AtLeastOnce, 1, b"retained");
    retained.retain = true;
    publ.send(&Packet::Publish(retained)).await;
    assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));

    let mut sub = RawClient::connect(app.mqtt_addr, V5, &unique("sidr")).await;
    subscribe_id(&mut sub, "sidr/#", QoS::AtLeastOnce, Some(11)).await;
    let p = expect_publish(&mut sub).await;
    assert!(p.retain);
    assert_eq!(p.properties.subscription_identifiers, vec![11]);
    sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;

    let mut member = RawClient::connect(app.mqtt_addr, V5, &unique("sidr-member")).await;
    subscribe_id(&mut member, "$share/g/sids/#", QoS::AtLeastOnce, Some(42)).await;
    publish_qos1(&mut publ, "sids/a", 2, b"shared").await;
    let p = expect_publish(&mut member).await;
    assert_eq!(p.properties.subscription_identifiers, vec![42]);
    app.stop().await;
}

#[tokio::test]
async fn two_subscription_identifiers_on_one_subscribe_are_a_protocol_error() {
    let app = gateway(NO_RULES).await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, &unique("sid2")).await;
    c.send(&Packet::Subscribe(Box::new(Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter {
            filter: "a".into(),
            options: SubscriptionOptions::default(),
        }],
        properties: Properties { subscription_identifiers: vec![1, 2], ..Default::default() },
    })))
    .await;
    expect_disconnect(&mut c, ReasonCode::PROTOCOL_ERROR).await;
    app.stop().await;
}

/// An MQTT 5 CONNECT with a will on `wills5/{id}` after `delay` seconds.
fn with_will(
    id: &str,
    delay: Option<u32>,
    expiry: Option<u32>,
    clean_start: bool,
) -> mqgate::mqtt::codec::Connect {
    let mut c = connect_packet(V5, id);
    c.clean_start = clean_start;
    c.properties.session_expiry_interval = expiry;
    c.will = Some(LastWill {
        topic: format!("wills5/{id}"),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties { will_delay_interval: delay, ..Default::default() },
    });
    c
}

/// A subscriber to every will of this file.
async fn will_watcher(addr: std::net::SocketAddr) -> RawClient {
    let mut sub = RawClient::connect(addr, V5, &unique("will-watch")).await;
    sub.subscribe("wills5/#", QoS::AtLeastOnce).await;
    sub
}

/// Expects the will of `id` within `wait`.
async fn expect_will(sub: &mut RawClient, id: &str, wait: Duration) {
    match sub.recv_within(wait).await {
        Ok(Some(Packet::Publish(p))) => {
            assert_eq!(
                (p.topic.as_str(), &p.payload[..]),
                (format!("wills5/{id}").as_str(), &b"gone"[..])
            );
            assert_eq!(p.properties.will_delay_interval, None, "not a PUBLISH property");
            sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
        }
        other => panic!("expected the will of {id}, got {other:?}"),
    }
}

#[tokio::test]
async fn a_delayed_will_goes_out_after_its_delay() {
    let app = gateway(NO_RULES).await;
    let mut sub = will_watcher(app.mqtt_addr).await;
    let id = unique("delayed");
    let (c, _) = connect_with(app.mqtt_addr, with_will(&id, Some(1), Some(60), true)).await;
    drop(c);
    expect_silence(&mut sub, Duration::from_millis(600)).await;
    expect_will(&mut sub, &id, Duration::from_secs(3)).await;
    app.stop().await;
}

#[tokio::test]
async fn resuming_the_session_before_the_delay_cancels_the_will() {
    let app = gateway(NO_RULES).await;
    let mut sub = will_watcher(app.mqtt_addr).await;
    let id = unique("resumed");
    let (c, _) = connect_with(app.mqtt_addr, with_will(&id, Some(2), Some(60), true)).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, connack) = connect_with(app.mqtt_addr, with_will(&id, None, Some(60), false)).await;
    assert!(connack.session_present);
    expect_silence(&mut sub, Duration::from_millis(2500)).await;
    // That connection's own will (no delay) goes out when it ends ungracefully.
    drop(c);
    expect_will(&mut sub, &id, Duration::from_secs(3)).await;
    app.stop().await;
}

#[tokio::test]
async fn a_will_delayed_beyond_the_session_goes_out_when_the_session_ends() {
    let app = gateway(NO_RULES).await;
    let mut sub = will_watcher(app.mqtt_addr).await;
    // The session expires after 1 s, before the 60 s delay.
    let id = unique("expires");
    let (c, _) = connect_with(app.mqtt_addr, with_will(&id, Some(60), Some(1), true)).await;
    drop(c);
    expect_will(&mut sub, &id, Duration::from_secs(3)).await;
    // A clean start ends the waiting session: its will goes out at once.
    let id = unique("clean");
    let (c, _) = connect_with(app.mqtt_addr, with_will(&id, Some(60), Some(60), true)).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    expect_silence(&mut sub, Duration::from_millis(200)).await;
    let (_c, connack) = connect_with(app.mqtt_addr, connect_packet(V5, &id)).await;
    assert!(!connack.session_present);
    expect_will(&mut sub, &id, Duration::from_secs(1)).await;
    app.stop().await;
}

#[tokio::test]
async fn disconnect_with_will_publishes_it_and_a_normal_disconnect_does_not() {
    let app = gateway(NO_RULES).await;
    let mut sub = will_watcher(app.mqtt_addr).await;
    let polite = unique("polite");
    let (mut c, _) = connect_with(app.mqtt_addr, with_will(&polite, None, None, true)).await;
    c.send(&Packet::Disconnect(Box::default())).await;
    assert_eq!(c.recv().await, None);
    let asked = unique("asked");
    let (mut c, _) = connect_with(app.mqtt_addr, with_will(&asked, None, None, true)).await;
    c.send(&Packet::Disconnect(Box::new(Disconnect {
        code: ReasonCode::DISCONNECT_WITH_WILL,
        properties: Properties::default(),
    })))
    .await;
    assert_eq!(c.recv().await, None);
    // Only the second one's will: the first would have come first.
    expect_will(&mut sub, &asked, Duration::from_secs(3)).await;
    expect_silence(&mut sub, Duration::from_millis(300)).await;
    app.stop().await;
}

#[tokio::test]
async fn keepalive_expiry_publishes_the_will() {
    let app = gateway(NO_RULES).await;
    let mut sub = will_watcher(app.mqtt_addr).await;
    let id = unique("silent");
    let mut connect = with_will(&id, None, None, true);
    connect.keep_alive = 1;
    let (mut c, _) = connect_with(app.mqtt_addr, connect).await;
    // Silent for 1.5 × 1 s: DISCONNECT 0x8D, then the will.
    match c.recv_within(Duration::from_secs(4)).await {
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.code, ReasonCode::KEEP_ALIVE_TIMEOUT),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    expect_will(&mut sub, &id, Duration::from_secs(3)).await;
    app.stop().await;
}

#[tokio::test]
async fn response_information_is_given_only_when_requested() {
    let app = gateway(NO_RULES).await;
    let id = unique("resp");
    let mut connect = connect_packet(V5, &id);
    connect.properties.request_response_information = Some(1);
    let (_c, connack) = connect_with(app.mqtt_addr, connect).await;
    assert_eq!(connack.properties.response_information, Some(format!("mqgate/response/{id}")));
    let (_c, connack) = connect_with(app.mqtt_addr, connect_packet(V5, &unique("noresp"))).await;
    assert_eq!(connack.properties.response_information, None);
    app.stop().await;
}

#[tokio::test]
async fn request_problem_information_0_leaves_out_reason_strings() {
    let app = gateway(NO_RULES).await;
    for (problem_info, want_reason) in [(None, true), (Some(0), false)] {
        let mut connect = connect_packet(V5, &unique("problem"));
        connect.properties.request_problem_information = problem_info;
        let (mut c, _) = connect_with(app.mqtt_addr, connect).await;
        // An acknowledgement (here PUBACK 0x10, no subscribers) carries none either way.
        c.publish("p/nobody", QoS::AtLeastOnce, 1, b"x").await;
        match c.recv().await {
            Some(Packet::PubAck(a)) => {
                assert_eq!(a.code, ReasonCode::NO_MATCHING_SUBSCRIBERS);
                assert!(a.properties.is_empty());
            }
            other => panic!("expected PUBACK 0x10, got {other:?}"),
        }
        let mut bad = publish_packet("p/x", QoS::AtMostOnce, 0, &[0xff, 0xfe]);
        bad.properties.payload_format_indicator = Some(1);
        c.send(&Packet::Publish(bad)).await;
        match c.recv().await {
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.code, ReasonCode::PAYLOAD_FORMAT_INVALID);
                assert_eq!(
                    d.properties.reason_string.is_some(),
                    want_reason,
                    "{problem_info:?}: {d:?}"
                );
                assert!(d.properties.user_properties.is_empty());
            }
            other => panic!("expected DISCONNECT 0x99, got {other:?}"),
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn a_takeover_that_resumes_the_session_cancels_a_delayed_will() {
    let app = gateway(NO_RULES).await;
    let mut sub = will_watcher(app.mqtt_addr).await;
    let id = unique("taken");
    let (mut old, _) = connect_with(app.mqtt_addr, with_will(&id, Some(1), Some(60), true)).await;
    // The same client id connects while the first connection is still up.
    let (_new, connack) = connect_with(app.mqtt_addr, connect_packet_resume(&id)).await;
    assert!(connack.session_present);
    expect_disconnect(&mut old, ReasonCode::SESSION_TAKEN_OVER).await;
    expect_silence(&mut sub, Duration::from_millis(2000)).await;
    app.stop().await;
}

/// An MQTT 5 CONNECT that resumes the session of `id` (no will).
fn connect_packet_resume(id: &str) -> mqgate::mqtt::codec::Connect {
    let mut c = connect_packet(V5, id);
    c.clean_start = false;
    c.properties.session_expiry_interval = Some(60);
    c
}
