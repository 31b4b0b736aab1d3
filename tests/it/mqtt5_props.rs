//! MQTT 5 details a device library relies on: properties passed through, message expiry,
//! Server Keep Alive, payload format, Receive Maximum, Maximum Packet Size, AUTH.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use mqgate::mqtt::codec::{Auth, Packet, ProtocolVersion::V5, PubResponse, QoS, ReasonCode};

fn config(extra: &str) -> String {
    format!("mqtt:\n  listen: \"127.0.0.1:0\"\n{extra}admin:\n  listen: \"127.0.0.1:0\"\n")
}

async fn connack(c: &mut RawClient) -> mqgate::mqtt::codec::ConnAck {
    match c.recv().await {
        Some(Packet::ConnAck(a)) => *a,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn publish_properties_pass_through_to_subscribers() {
    let app = gateway(&config("")).await;
    let mut sub = RawClient::connect(app.mqtt_addr, V5, "props-sub").await;
    sub.subscribe("props/#", QoS::AtMostOnce).await;
    let mut publ = RawClient::connect(app.mqtt_addr, V5, "props-pub").await;
    let mut p = publish_packet("props/a", QoS::AtMostOnce, 0, b"{\"t\":1}");
    p.properties.content_type = Some("application/json".into());
    p.properties.payload_format_indicator = Some(1);
    p.properties.response_topic = Some("replies/props-pub".into());
    p.properties.correlation_data = Some(Bytes::from_static(b"\x00\x01corr"));
    p.properties.user_properties = vec![("k".into(), "v1".into()), ("k".into(), "v2".into())];
    p.properties.message_expiry_interval = Some(60);
    publ.send(&Packet::Publish(p)).await;
    match sub.recv().await {
        Some(Packet::Publish(got)) => {
            let pr = &got.properties;
            assert_eq!(pr.content_type.as_deref(), Some("application/json"));
            assert_eq!(pr.payload_format_indicator, Some(1));
            assert_eq!(pr.response_topic.as_deref(), Some("replies/props-pub"));
            assert_eq!(pr.correlation_data.as_deref(), Some(&b"\x00\x01corr"[..]));
            assert_eq!(
                pr.user_properties,
                vec![("k".into(), "v1".into()), ("k".into(), "v2".into())]
            );
            let left = pr.message_expiry_interval.expect("remaining expiry passed on");
            assert!((58..=60).contains(&left), "remaining interval {left}");
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn expired_messages_are_not_delivered() {
    let app = gateway(&config("")).await;
    // A persistent session that is away while a message with a 1 s expiry is queued for it.
    let mut c = RawClient::tcp(app.mqtt_addr, V5).await;
    let mut connect = connect_packet(V5, "expiry-sub");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(60);
    c.send(&Packet::Connect(Box::new(connect.clone()))).await;
    connack(&mut c).await;
    c.subscribe("exp/#", QoS::AtLeastOnce).await;
    c.send(&Packet::Disconnect(Default::default())).await;
    assert_eq!(c.recv().await, None);

    let mut publ = RawClient::connect(app.mqtt_addr, V5, "expiry-pub").await;
    let mut short = publish_packet("exp/short", QoS::AtLeastOnce, 1, b"stale");
    short.properties.message_expiry_interval = Some(1);
    publ.send(&Packet::Publish(short)).await;
    let mut long = publish_packet("exp/long", QoS::AtLeastOnce, 2, b"fresh");
    long.properties.message_expiry_interval = Some(100);
    publ.send(&Packet::Publish(long)).await;
    for _ in 0..2 {
        assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let mut c = RawClient::tcp(app.mqtt_addr, V5).await;
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(connack(&mut c).await.session_present);
    match c.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(&p.payload[..], b"fresh", "the expired message must not be delivered");
            let left = p.properties.message_expiry_interval.expect("remaining interval");
            assert!((96..=98).contains(&left), "remaining interval {left}");
            c.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
        }
        other => panic!("expected the fresh message, got {other:?}"),
    }
    assert_eq!(c.recv_within(Duration::from_millis(300)).await, Err(()));
    app.stop().await;
}

#[tokio::test]
async fn server_keep_alive_caps_what_the_client_asked() {
    let app = gateway(&config("  max_keepalive: 30\n")).await;
    let mut c = RawClient::tcp(app.mqtt_addr, V5).await;
    let mut connect = connect_packet(V5, "ka");
    connect.keep_alive = 600;
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert_eq!(connack(&mut c).await.properties.server_keep_alive, Some(30));
    let mut ok = RawClient::tcp(app.mqtt_addr, V5).await;
    ok.send(&Packet::Connect(Box::new(connect_packet(V5, "ka-ok")))).await; // asks for 60
    let a = connack(&mut ok).await;
    assert_eq!(a.properties.server_keep_alive, Some(30));
    let mut small = RawClient::tcp(app.mqtt_addr, V5).await;
    let mut connect = connect_packet(V5, "ka-small");
    connect.keep_alive = 10;
    small.send(&Packet::Connect(Box::new(connect))).await;
    assert_eq!(
        connack(&mut small).await.properties.server_keep_alive,
        None,
        "10 s is granted as asked"
    );
    app.stop().await;
}

#[tokio::test]
async fn invalid_utf8_with_payload_format_1_is_rejected() {
    let app = gateway(&config("")).await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, "pfi").await;
    let mut p = publish_packet("pfi/x", QoS::AtLeastOnce, 1, b"\xff\xfe not utf-8");
    p.properties.payload_format_indicator = Some(1);
    c.send(&Packet::Publish(p)).await;
    match c.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, ReasonCode::PAYLOAD_FORMAT_INVALID),
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::PAYLOAD_FORMAT_INVALID),
        other => panic!("expected 0x99, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn exceeding_our_receive_maximum_gets_0x93() {
    // A window of 1 and two QoS 1 PUBLISHes in one write: the second is decoded while the
    // first still holds the window.
    let app = gateway(&config("  receive_maximum: 1\n")).await;
    let mut c = RawClient::tcp(app.mqtt_addr, V5).await;
    c.send(&Packet::Connect(Box::new(connect_packet(V5, "rm")))).await;
    assert_eq!(connack(&mut c).await.properties.receive_maximum, Some(1));
    // Two PUBLISHes in one write: the second arrives while the first is unacknowledged.
    let mut both = bytes::BytesMut::new();
    for id in [1u16, 2] {
        let p = Packet::Publish(publish_packet("rm/x", QoS::AtLeastOnce, id, b"x"));
        mqgate::mqtt::codec::encode(&p, V5, &mut both).expect("encode");
    }
    c.send_raw(&both).await;
    let mut saw_disconnect = false;
    while let Some(p) = c.recv().await {
        if let Packet::Disconnect(d) = p {
            assert_eq!(d.code, ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
            saw_disconnect = true;
        }
    }
    assert!(saw_disconnect, "a client exceeding Receive Maximum must get DISCONNECT 0x93");
    app.stop().await;
}

#[tokio::test]
async fn the_clients_maximum_packet_size_is_respected() {
    let app = gateway(&config("")).await;
    let mut sub = RawClient::tcp(app.mqtt_addr, V5).await;
    let mut connect = connect_packet(V5, "mps");
    connect.properties.maximum_packet_size = Some(100);
    sub.send(&Packet::Connect(Box::new(connect))).await;
    connack(&mut sub).await;
    sub.subscribe("mps/#", QoS::AtMostOnce).await;
    let mut publ = RawClient::connect(app.mqtt_addr, V5, "mps-pub").await;
    publ.publish("mps/big", QoS::AtMostOnce, 0, &[1u8; 200]).await;
    publ.publish("mps/small", QoS::AtMostOnce, 0, b"fits").await;
    match sub.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"fits", "the big one is not sent"),
        other => panic!("expected the small message, got {other:?}"),
    }
    let (_, metrics) = http_get(app.admin_addr, "/metrics").await.expect("metrics");
    assert!(
        metrics.contains(r#"mqgate_messages_dropped_total{reason="too_large_for_client"} 1"#),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn auth_is_answered_cleanly() {
    let app = gateway(&config("")).await;
    // Enhanced authentication in CONNECT: CONNACK 0x8C.
    let mut c = RawClient::tcp(app.mqtt_addr, V5).await;
    let mut connect = connect_packet(V5, "auth-method");
    connect.properties.authentication_method = Some("SCRAM-SHA-1".into());
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert_eq!(connack(&mut c).await.code, ReasonCode::BAD_AUTHENTICATION_METHOD);
    // AUTH after a plain CONNECT: DISCONNECT 0x82 (0x8C is not a DISCONNECT code).
    let mut c = RawClient::connect(app.mqtt_addr, V5, "auth-late").await;
    c.send(&Packet::Auth(Box::new(Auth {
        code: ReasonCode::REAUTHENTICATE,
        properties: Default::default(),
    })))
    .await;
    expect_disconnect(&mut c, ReasonCode::PROTOCOL_ERROR).await;
    app.stop().await;
}

#[tokio::test]
async fn empty_client_ids_are_assigned_on_5_and_need_clean_session_on_3() {
    use mqgate::mqtt::codec::ProtocolVersion::V311;
    let app = gateway(&config("")).await;
    let mut c = RawClient::tcp(app.mqtt_addr, V5).await;
    c.send(&Packet::Connect(Box::new(connect_packet(V5, "")))).await;
    let a = connack(&mut c).await;
    assert!(a.code.is_success());
    let id = a.properties.assigned_client_identifier.expect("an assigned client id");
    assert!(!id.is_empty());
    let mut ok3 = RawClient::tcp(app.mqtt_addr, V311).await;
    ok3.send(&Packet::Connect(Box::new(connect_packet(V311, "")))).await;
    assert!(connack(&mut ok3).await.code.is_success(), "3.1.1 with clean session: accepted");
    let mut bad3 = RawClient::tcp(app.mqtt_addr, V311).await;
    let mut connect = connect_packet(V311, "");
    connect.clean_start = false;
    bad3.send(&Packet::Connect(Box::new(connect))).await;
    assert_eq!(connack(&mut bad3).await.code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    app.stop().await;
}

#[tokio::test]
async fn no_local_retain_as_published_and_retain_handling() {
    use mqgate::mqtt::codec::{RetainHandling, Subscribe, SubscribeFilter, SubscriptionOptions};
    let app = gateway(&config("")).await;
    let mut retainer = RawClient::connect(app.mqtt_addr, V5, "rh-pub").await;
    let mut r = publish_packet("rh/x", QoS::AtLeastOnce, 1, b"kept");
    r.retain = true;
    retainer.send(&Packet::Publish(r)).await;
    assert!(matches!(retainer.recv().await, Some(Packet::PubAck(_))));

    let mut c = RawClient::connect(app.mqtt_addr, V5, "rh-sub").await;
    let sub = |id: u16, filter: &str, options: SubscriptionOptions| {
        Packet::Subscribe(Box::new(Subscribe {
            packet_id: id,
            filters: vec![SubscribeFilter { filter: filter.into(), options }],
            properties: Default::default(),
        }))
    };
    // Retain Handling 2: no retained message on subscribe. No Local + Retain As Published.
    let opts = SubscriptionOptions {
        qos: QoS::AtMostOnce,
        no_local: true,
        retain_as_published: true,
        retain_handling: RetainHandling::DoNotSend,
    };
    c.send(&sub(1, "rh/#", opts)).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    assert_eq!(c.recv_within(Duration::from_millis(300)).await, Err(()), "retain handling 2");
    // Our own publish is not delivered back (No Local); another client's retained publish
    // arrives with RETAIN kept (Retain As Published).
    c.publish("rh/own", QoS::AtMostOnce, 0, b"mine").await;
    let mut r = publish_packet("rh/y", QoS::AtMostOnce, 0, b"other");
    r.retain = true;
    retainer.send(&Packet::Publish(r)).await;
    match c.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(&p.payload[..], b"other", "No Local: own message not delivered");
            assert!(p.retain, "Retain As Published");
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    // Retain Handling 1: retained messages only for a new subscription.
    let opts1 = SubscriptionOptions { retain_handling: RetainHandling::SendIfNew, ..opts };
    c.send(&sub(2, "rh/x", opts1)).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    match c.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"kept"),
        other => panic!("expected the retained message for a new subscription, got {other:?}"),
    }
    c.send(&sub(3, "rh/x", opts1)).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    assert_eq!(
        c.recv_within(Duration::from_millis(300)).await,
        Err(()),
        "not again when it existed"
    );
    app.stop().await;
}

#[tokio::test]
async fn rumqttc_v5_clients_exchange_properties_and_get_reason_codes() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason, PublishProperties};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let app = gateway(&config("")).await;
    let opts = |id: &str| MqttOptions::new(id, "127.0.0.1", app.mqtt_addr.port());
    let (sub, mut sub_loop) = AsyncClient::new(opts("r5-sub"), 10);
    let (publ, mut pub_loop) = AsyncClient::new(opts("r5-pub"), 10);
    sub.subscribe("r5/#", Q5::AtLeastOnce).await.expect("subscribe");
    loop {
        if let Event::Incoming(P5::SubAck(_)) = sub_loop.poll().await.expect("sub loop") {
            break;
        }
    }
    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("site".into(), "berlin".into())],
        ..Default::default()
    };
    publ.publish_with_properties("r5/a", Q5::AtLeastOnce, false, "hello", props)
        .await
        .expect("publish");
    publ.publish("nobody/r5", Q5::AtLeastOnce, false, "void").await.expect("publish");
    let mut reasons = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while reasons.len() < 2 {
        let ev = tokio::time::timeout_at(deadline, pub_loop.poll()).await.expect("PUBACKs in time");
        if let Event::Incoming(P5::PubAck(a)) = ev.expect("pub loop") {
            reasons.push(a.reason);
        }
    }
    assert_eq!(reasons, vec![PubAckReason::Success, PubAckReason::NoMatchingSubscribers]);
    loop {
        let ev = tokio::time::timeout_at(deadline, sub_loop.poll()).await.expect("message in time");
        if let Event::Incoming(P5::Publish(p)) = ev.expect("sub loop") {
            assert_eq!(&p.payload[..], b"hello");
            let pr = p.properties.expect("properties");
            assert_eq!(pr.content_type.as_deref(), Some("text/plain"));
            assert_eq!(pr.user_properties, vec![("site".to_string(), "berlin".to_string())]);
            break;
        }
    }
    app.stop().await;
}
