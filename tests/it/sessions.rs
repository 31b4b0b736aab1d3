//! Persistent sessions (3.1.1 Clean Session 0, MQTT 5 Session Expiry), takeover that hands the
//! session over, the offline queue bound, and QoS 2 deliveries, with real clients: our raw
//! client (exact flags: session present, DUP) and rumqttc.

use std::time::Duration;

use crate::support::*;
use mqgate::mqtt::codec::{
    Disconnect, Packet, Properties, ProtocolVersion, PubResponse, QoS, ReasonCode,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as RPacket};

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;

fn config(extra_mqtt: &str) -> String {
    format!("mqtt:\n  listen: \"127.0.0.1:0\"\n{extra_mqtt}admin:\n  listen: \"127.0.0.1:0\"\n")
}

/// Connects with `clean_start` (and, for MQTT 5, a session expiry interval); returns the
/// client and the CONNACK's session present flag.
async fn connect(
    addr: std::net::SocketAddr,
    version: ProtocolVersion,
    id: &str,
    clean_start: bool,
    expiry: Option<u32>,
) -> (RawClient, bool) {
    let mut c = RawClient::tcp(addr, version).await;
    let mut p = connect_packet(version, id);
    p.clean_start = clean_start;
    p.properties.session_expiry_interval = expiry;
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
    // Wait for the server to close, so the session is parked before the test goes on.
    let _ = c.recv_within(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn clean_session_0_keeps_subscriptions_and_queues_messages_while_away() {
    let app = gateway(&config("")).await;
    let id = unique("persist");
    let (mut sub, present) = connect(app.mqtt_addr, V311, &id, false, None).await;
    assert!(!present, "a new session is not present");
    assert_eq!(sub.subscribe("away/#", QoS::AtLeastOnce).await, vec![ReasonCode::GRANTED_QOS_1]);
    disconnect(sub).await;

    let mut publ = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    for (i, payload) in [b"one", b"two", b"six"].iter().enumerate() {
        publish_qos1(&mut publ, "away/x", i as u16 + 1, *payload).await;
    }
    // QoS 0 is not queued for a session that is away (mqtt.queue_qos0 defaults to false).
    publ.publish("away/x", QoS::AtMostOnce, 0, b"qos0").await;
    publish_qos1(&mut publ, "away/x", 9, b"last").await;

    let (mut sub, present) = connect(app.mqtt_addr, V311, &id, false, None).await;
    assert!(present, "the session was kept");
    for want in [&b"one"[..], b"two", b"six", b"last"] {
        let p = expect_publish(&mut sub).await;
        assert_eq!(p.payload, want);
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert!(!p.dup, "never sent before: no DUP");
        sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
    }
    // The subscription itself came back: a live message is delivered too.
    publish_qos1(&mut publ, "away/y", 10, b"live").await;
    assert_eq!(expect_publish(&mut sub).await.payload, &b"live"[..]);
    app.stop().await;
}

#[tokio::test]
async fn unacknowledged_qos1_is_resent_with_dup_before_new_messages() {
    let app = gateway(&config("")).await;
    let id = unique("dup");
    let (mut sub, _) = connect(app.mqtt_addr, V311, &id, false, None).await;
    sub.subscribe("dup/#", QoS::AtLeastOnce).await;
    let mut publ = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    publish_qos1(&mut publ, "dup/a", 1, b"first").await;
    publish_qos1(&mut publ, "dup/a", 2, b"second").await;
    let first = expect_publish(&mut sub).await;
    let second = expect_publish(&mut sub).await;
    assert_eq!((first.payload.as_ref(), second.payload.as_ref()), (&b"first"[..], &b"second"[..]));
    // Neither is acknowledged; the connection drops without DISCONNECT.
    drop(sub);
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish_qos1(&mut publ, "dup/a", 3, b"while away").await;

    let (mut sub, present) = connect(app.mqtt_addr, V311, &id, false, None).await;
    assert!(present);
    for (want, was) in [(&b"first"[..], &first), (b"second", &second)] {
        let p = expect_publish(&mut sub).await;
        assert_eq!(p.payload, want, "resent in the original order");
        assert!(p.dup, "a resend carries DUP");
        assert_eq!(p.packet_id, was.packet_id, "a resend keeps its packet id");
        sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
    }
    let p = expect_publish(&mut sub).await;
    assert_eq!(p.payload, &b"while away"[..]);
    assert!(!p.dup);
    sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
    // Acknowledged: not resent on the next reconnect.
    disconnect(sub).await;
    let (mut sub, present) = connect(app.mqtt_addr, V311, &id, false, None).await;
    assert!(present);
    expect_silence(&mut sub, Duration::from_millis(500)).await;
    app.stop().await;
}

#[tokio::test]
async fn clean_session_1_discards_the_session() {
    let app = gateway(&config("")).await;
    let id = unique("clean");
    let (mut sub, _) = connect(app.mqtt_addr, V311, &id, false, None).await;
    sub.subscribe("clean/#", QoS::AtLeastOnce).await;
    disconnect(sub).await;
    let mut publ = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    publish_qos1(&mut publ, "clean/a", 1, b"queued").await;

    let (mut sub, present) = connect(app.mqtt_addr, V311, &id, true, None).await;
    assert!(!present, "clean session: no session present");
    expect_silence(&mut sub, Duration::from_millis(500)).await;
    publish_qos1(&mut publ, "clean/a", 2, b"live").await;
    expect_silence(&mut sub, Duration::from_millis(300)).await;
    disconnect(sub).await;
    // Nor is a clean session kept after it ends.
    let (_sub, present) = connect(app.mqtt_addr, V311, &id, false, None).await;
    assert!(!present);
    app.stop().await;
}

#[tokio::test]
async fn v5_session_expiry_interval_is_kept_then_expires() {
    let app = gateway(&config("")).await;
    let id = unique("expiry");
    let mut publ = RawClient::connect(app.mqtt_addr, V5, &unique("pub")).await;

    // Within the interval: resumed.
    let (mut sub, present) = connect(app.mqtt_addr, V5, &id, true, Some(2)).await;
    assert!(!present);
    sub.subscribe("exp/#", QoS::AtLeastOnce).await;
    disconnect(sub).await;
    publish_qos1(&mut publ, "exp/a", 1, b"kept").await;
    let (mut sub, present) = connect(app.mqtt_addr, V5, &id, false, Some(2)).await;
    assert!(present);
    let p = expect_publish(&mut sub).await;
    assert_eq!(p.payload, &b"kept"[..]);
    sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
    disconnect(sub).await;

    // After it: gone, with its subscription.
    publish_qos1(&mut publ, "exp/a", 2, b"expires with the session").await;
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (mut sub, present) = connect(app.mqtt_addr, V5, &id, false, Some(0)).await;
    assert!(!present, "the session expired");
    expect_silence(&mut sub, Duration::from_millis(500)).await;
    publish_qos1(&mut publ, "exp/a", 3, b"no subscription").await;
    expect_silence(&mut sub, Duration::from_millis(300)).await;
    disconnect(sub).await;

    // Expiry 0 on CONNECT: the session ends with the connection.
    let (mut sub, _) = connect(app.mqtt_addr, V5, &id, false, None).await;
    sub.subscribe("exp/#", QoS::AtLeastOnce).await;
    disconnect(sub).await;
    let (_sub, present) = connect(app.mqtt_addr, V5, &id, false, None).await;
    assert!(!present, "expiry 0: nothing kept");
    app.stop().await;
}

#[tokio::test]
async fn v5_disconnect_may_change_the_session_expiry() {
    let app = gateway(&config("")).await;
    let id = unique("disc-expiry");
    let (mut sub, _) = connect(app.mqtt_addr, V5, &id, true, Some(3600)).await;
    sub.subscribe("de/#", QoS::AtLeastOnce).await;
    let properties = Properties { session_expiry_interval: Some(0), ..Default::default() };
    sub.send(&Packet::Disconnect(Box::new(Disconnect { code: ReasonCode::SUCCESS, properties })))
        .await;
    let _ = sub.recv_within(Duration::from_secs(5)).await;
    let (_sub, present) = connect(app.mqtt_addr, V5, &id, false, Some(3600)).await;
    assert!(!present, "DISCONNECT set the expiry to 0");
    app.stop().await;
}

#[tokio::test]
async fn takeover_without_clean_start_hands_the_session_over() {
    let app = gateway(&config("")).await;
    let id = unique("takeover");
    let (mut old, _) = connect(app.mqtt_addr, V5, &id, true, Some(60)).await;
    old.subscribe("to/#", QoS::AtLeastOnce).await;
    let mut publ = RawClient::connect(app.mqtt_addr, V5, &unique("pub")).await;
    publish_qos1(&mut publ, "to/a", 1, b"unacked").await;
    let unacked = expect_publish(&mut old).await;

    let (mut new, present) = connect(app.mqtt_addr, V5, &id, false, Some(60)).await;
    assert!(present, "the session was handed over");
    expect_disconnect(&mut old, ReasonCode::SESSION_TAKEN_OVER).await;
    let p = expect_publish(&mut new).await;
    assert_eq!(
        (p.payload.as_ref(), p.dup, p.packet_id),
        (&b"unacked"[..], true, unacked.packet_id)
    );
    new.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
    publish_qos1(&mut publ, "to/b", 2, b"after").await;
    assert_eq!(expect_publish(&mut new).await.payload, &b"after"[..]);
    app.stop().await;
}

#[tokio::test]
async fn qos2_end_to_end_exactly_once() {
    let app = gateway(&config("")).await;
    let mut sub = RawClient::connect(app.mqtt_addr, V5, &unique("q2sub")).await;
    assert_eq!(sub.subscribe("q2/#", QoS::ExactlyOnce).await, vec![ReasonCode::GRANTED_QOS_2]);
    let mut publ = RawClient::connect(app.mqtt_addr, V311, &unique("q2pub")).await;
    publ.publish("q2/a", QoS::ExactlyOnce, 7, b"once").await;
    match publ.recv().await {
        Some(Packet::PubRec(r)) => assert_eq!(r.packet_id, 7),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // A resend before PUBREL is not delivered again.
    let mut again = publish_packet("q2/a", QoS::ExactlyOnce, 7, b"once");
    again.dup = true;
    publ.send(&Packet::Publish(again)).await;
    assert!(matches!(publ.recv().await, Some(Packet::PubRec(_))));
    publ.send(&Packet::PubRel(PubResponse::success(7))).await;
    match publ.recv().await {
        Some(Packet::PubComp(r)) => assert_eq!(r.packet_id, 7),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }

    let p = expect_publish(&mut sub).await;
    assert_eq!((p.qos, p.payload.as_ref()), (QoS::ExactlyOnce, &b"once"[..]));
    sub.send(&Packet::PubRec(PubResponse::success(p.packet_id))).await;
    match sub.recv().await {
        Some(Packet::PubRel(r)) => assert_eq!(r.packet_id, p.packet_id),
        other => panic!("expected PUBREL, got {other:?}"),
    }
    sub.send(&Packet::PubComp(PubResponse::success(p.packet_id))).await;
    expect_silence(&mut sub, Duration::from_millis(500)).await;

    // rumqttc at QoS 2 on both ends: every message exactly once.
    let opts = |id: String| {
        let mut o = MqttOptions::new(id, "127.0.0.1", app.mqtt_addr.port());
        o.set_keep_alive(Duration::from_secs(10));
        o
    };
    let (rsub, mut sub_loop) = AsyncClient::new(opts(unique("rq2sub")), 100);
    let (rpub, mut pub_loop) = AsyncClient::new(opts(unique("rq2pub")), 100);
    rsub.subscribe("rq2/#", rumqttc::QoS::ExactlyOnce).await.expect("subscribe");
    loop {
        if let Event::Incoming(RPacket::SubAck(a)) = sub_loop.poll().await.expect("sub loop") {
            assert_eq!(
                a.return_codes,
                vec![rumqttc::SubscribeReasonCode::Success(rumqttc::QoS::ExactlyOnce)]
            );
            break;
        }
    }
    for i in 0..20u8 {
        rpub.publish(format!("rq2/{i}"), rumqttc::QoS::ExactlyOnce, false, vec![i])
            .await
            .expect("publish");
    }
    let publisher = tokio::spawn(async move {
        let mut comps = 0;
        while comps < 20 {
            if let Event::Incoming(RPacket::PubComp(_)) = pub_loop.poll().await.expect("pub loop") {
                comps += 1;
            }
        }
    });
    let mut got = Vec::new();
    let mut pubrels = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pubrels < 20 {
        let event = tokio::time::timeout_at(deadline, sub_loop.poll())
            .await
            .expect("20 QoS 2 deliveries within 10 s")
            .expect("sub loop");
        match event {
            Event::Incoming(RPacket::Publish(p)) => {
                assert_eq!(p.qos, rumqttc::QoS::ExactlyOnce);
                got.push(p.payload[0]);
            }
            Event::Incoming(RPacket::PubRel(_)) => pubrels += 1,
            _ => {}
        }
    }
    tokio::time::timeout(Duration::from_secs(10), publisher).await.expect("PUBCOMPs").unwrap();
    got.sort_unstable();
    assert_eq!(got, (0..20u8).collect::<Vec<_>>(), "each message exactly once");
    app.stop().await;
}

#[tokio::test]
async fn unfinished_qos2_deliveries_resume_as_publish_dup_or_pubrel() {
    let app = gateway(&config("")).await;
    let id = unique("q2resume");
    let (mut sub, _) = connect(app.mqtt_addr, V311, &id, false, None).await;
    sub.subscribe("q2r/#", QoS::ExactlyOnce).await;
    let mut publ = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    publish_qos1(&mut publ, "q2r/a", 1, b"received").await;
    publish_qos1(&mut publ, "q2r/a", 2, b"not received").await;
    publ.publish("q2r/b", QoS::ExactlyOnce, 3, b"at two").await;
    assert!(matches!(publ.recv().await, Some(Packet::PubRec(_))));
    publ.send(&Packet::PubRel(PubResponse::success(3))).await;
    assert!(matches!(publ.recv().await, Some(Packet::PubComp(_))));

    let a = expect_publish(&mut sub).await;
    let b = expect_publish(&mut sub).await;
    let c = expect_publish(&mut sub).await;
    assert_eq!((a.qos, b.qos, c.qos), (QoS::AtLeastOnce, QoS::AtLeastOnce, QoS::ExactlyOnce));
    sub.send(&Packet::PubRec(PubResponse::success(c.packet_id))).await;
    assert!(matches!(sub.recv().await, Some(Packet::PubRel(_))));
    sub.send(&Packet::PubAck(PubResponse::success(a.packet_id))).await;
    // b is unacknowledged, c is released but not completed; the connection drops.
    drop(sub);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (mut sub, present) = connect(app.mqtt_addr, V311, &id, false, None).await;
    assert!(present);
    let again = expect_publish(&mut sub).await;
    assert_eq!((again.packet_id, again.dup), (b.packet_id, true));
    match sub.recv().await {
        Some(Packet::PubRel(r)) => assert_eq!(r.packet_id, c.packet_id),
        other => panic!("expected PUBREL for the released QoS 2 delivery, got {other:?}"),
    }
    sub.send(&Packet::PubAck(PubResponse::success(again.packet_id))).await;
    sub.send(&Packet::PubComp(PubResponse::success(c.packet_id))).await;
    expect_silence(&mut sub, Duration::from_millis(500)).await;
    app.stop().await;
}

#[tokio::test]
async fn a_full_offline_queue_drops_the_newest_and_counts_it() {
    let app = gateway(&config("  max_queued_messages: 3\n")).await;
    let id = unique("bound");
    let (mut sub, _) = connect(app.mqtt_addr, V311, &id, false, None).await;
    sub.subscribe("bound/#", QoS::AtLeastOnce).await;
    disconnect(sub).await;
    let mut publ = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    for i in 1..=5u8 {
        publish_qos1(&mut publ, "bound/a", u16::from(i), &[i]).await;
    }
    let m = metrics(&app).await;
    assert!(m.contains(r#"mqgate_messages_dropped_total{reason="session_queue_full"} 2"#), "{m}");
    let (mut sub, present) = connect(app.mqtt_addr, V311, &id, false, None).await;
    assert!(present);
    for i in 1..=3u8 {
        let p = expect_publish(&mut sub).await;
        assert_eq!(p.payload.as_ref(), &[i], "the oldest are kept, the newest dropped");
        sub.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
    }
    expect_silence(&mut sub, Duration::from_millis(500)).await;
    app.stop().await;
}

#[tokio::test]
async fn rumqttc_persistent_session_gets_what_was_published_while_away() {
    let app = gateway(&config("")).await;
    let id = unique("rumq-persist");
    let opts = || {
        let mut o = MqttOptions::new(id.clone(), "127.0.0.1", app.mqtt_addr.port());
        o.set_keep_alive(Duration::from_secs(10));
        o.set_clean_session(false);
        o
    };
    let (client, mut eventloop) = AsyncClient::new(opts(), 100);
    client.subscribe("rp/#", rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
    loop {
        if let Event::Incoming(RPacket::SubAck(_)) = eventloop.poll().await.expect("loop") {
            break;
        }
    }
    client.disconnect().await.expect("disconnect");
    loop {
        match eventloop.poll().await {
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    drop(eventloop);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut publ = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    publish_qos1(&mut publ, "rp/a", 1, b"hello again").await;

    let (_client, mut eventloop) = AsyncClient::new(opts(), 100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut present = None;
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .expect("the queued message within 10 s")
            .expect("loop");
        match event {
            Event::Incoming(RPacket::ConnAck(a)) => present = Some(a.session_present),
            Event::Incoming(RPacket::Publish(p)) => {
                assert_eq!(p.payload.as_ref(), b"hello again");
                break;
            }
            _ => {}
        }
    }
    assert_eq!(present, Some(true));
    app.stop().await;
}

#[tokio::test]
async fn queue_qos0_keeps_qos0_messages_for_absent_sessions() {
    let app = gateway(&config("  queue_qos0: true\n")).await;
    let id = unique("qos0");
    let (mut sub, _) = connect(app.mqtt_addr, V311, &id, false, None).await;
    sub.subscribe("q0/#", QoS::AtMostOnce).await;
    disconnect(sub).await;
    let mut publ = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    publ.publish("q0/a", QoS::AtMostOnce, 0, b"zero").await;
    // A QoS 1 publish after it: once acknowledged, the QoS 0 one was routed too.
    publish_qos1(&mut publ, "q0/a", 1, b"one").await;
    let (mut sub, present) = connect(app.mqtt_addr, V311, &id, false, None).await;
    assert!(present);
    for want in [&b"zero"[..], b"one"] {
        let p = expect_publish(&mut sub).await;
        assert_eq!((p.payload.as_ref(), p.qos), (want, QoS::AtMostOnce));
    }
    app.stop().await;
}

#[tokio::test]
async fn v5_disconnect_may_not_raise_an_expiry_of_zero() {
    let app = gateway(&config("")).await;
    let id = unique("zero-expiry");
    let (mut c, _) = connect(app.mqtt_addr, V5, &id, true, None).await;
    c.subscribe("z/#", QoS::AtLeastOnce).await;
    let properties = Properties { session_expiry_interval: Some(60), ..Default::default() };
    c.send(&Packet::Disconnect(Box::new(Disconnect { code: ReasonCode::SUCCESS, properties })))
        .await;
    expect_disconnect(&mut c, ReasonCode::PROTOCOL_ERROR).await;
    let (_c, present) = connect(app.mqtt_addr, V5, &id, false, Some(60)).await;
    assert!(!present, "the session ended with the connection");
    app.stop().await;
}

#[tokio::test]
async fn inbound_qos2_resent_after_reconnect_before_pubrel_is_not_delivered_twice() {
    let app = gateway(&config("")).await;
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "q2-sub").await;
    sub.subscribe("q2/#", QoS::AtMostOnce).await;

    let (mut p, _) = connect(app.mqtt_addr, ProtocolVersion::V311, "q2-pub", false, None).await;
    p.publish("q2/x", QoS::ExactlyOnce, 42, b"once").await;
    match p.recv().await {
        Some(Packet::PubRec(r)) => assert_eq!(r.packet_id, 42),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    assert_eq!(&expect_publish(&mut sub).await.payload[..], b"once");
    // The connection drops before the client sent PUBREL; it resends the PUBLISH (DUP).
    drop(p);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut p, present) =
        connect(app.mqtt_addr, ProtocolVersion::V311, "q2-pub", false, None).await;
    assert!(present);
    let mut again = publish_packet("q2/x", QoS::ExactlyOnce, 42, b"once");
    again.dup = true;
    p.send(&Packet::Publish(again)).await;
    match p.recv().await {
        Some(Packet::PubRec(r)) => assert_eq!(r.packet_id, 42),
        other => panic!("expected PUBREC for the resend, got {other:?}"),
    }
    p.send(&Packet::PubRel(PubResponse::success(42))).await;
    match p.recv().await {
        Some(Packet::PubComp(r)) => assert_eq!(r.packet_id, 42),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    expect_silence(&mut sub, Duration::from_millis(500)).await;
    app.stop().await;
}
