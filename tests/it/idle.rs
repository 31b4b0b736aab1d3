//! Idle sessions: what an idle connection waits for still reaches it. Its task polls its
//! sources in place (no stored waiters, to keep idle connections small, see the session's
//! `poll_event`): shutdown comes through its registry link, keepalive from a boxed timer made
//! only when the client asked for a keepalive.

use std::time::{Duration, Instant};

use crate::support::*;
use mqgate::mqtt::codec::{Packet, Properties, ProtocolVersion, ReasonCode};

const NO_RULES: &str = "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n";

#[tokio::test]
async fn shutdown_disconnects_idle_clients_of_both_versions_at_once() {
    let app = gateway(NO_RULES).await;
    let addr = app.mqtt_addr;
    let mut v5 = RawClient::connect(addr, ProtocolVersion::V5, "shutdown-v5").await;
    let mut v311 = RawClient::connect(addr, ProtocolVersion::V311, "shutdown-v311").await;
    // A client still in its handshake when the gateway stops is not left hanging either.
    let mut half = RawClient::tcp(addr, ProtocolVersion::V311).await;
    let started = Instant::now();
    let stop = tokio::spawn(app.stop());
    expect_disconnect(&mut v5, ReasonCode::SERVER_SHUTTING_DOWN).await;
    assert!(v5.recv().await.is_none(), "the v5 connection is closed after its DISCONNECT");
    assert!(v311.recv().await.is_none(), "the 3.1.1 connection is closed (no DISCONNECT in 3.1.1)");
    assert!(half.recv().await.is_none(), "a connection without CONNECT is closed");
    stop.await.expect("stop");
    // Sessions that missed the signal would hold shutdown up for the drain deadline (5 s).
    assert!(started.elapsed() < Duration::from_secs(3), "shutdown took {:?}", started.elapsed());
}

#[tokio::test]
async fn pings_keep_a_keepalive_client_connected_and_silence_ends_it() {
    let app = gateway(NO_RULES).await;
    let mut c = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V5).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "pinger");
    connect.keep_alive = 1;
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    // 3.5 s of pings every 0.6 s: more than twice the 1.5 s allowed between packets, so the
    // timer fires and is moved forward while the client stays.
    let until = Instant::now() + Duration::from_millis(3500);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(600)).await;
        c.send(&Packet::PingReq).await;
        match c.recv_within(Duration::from_secs(2)).await {
            Ok(Some(Packet::PingResp)) => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
    let silent = Instant::now();
    match c.recv_within(Duration::from_secs(4)).await {
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.code, ReasonCode::KEEP_ALIVE_TIMEOUT),
        other => panic!("expected DISCONNECT 0x8D after 1.5 s of silence, got {other:?}"),
    }
    let waited = silent.elapsed();
    assert!(waited >= Duration::from_millis(1200), "closed {waited:?} into the silence");
    app.stop().await;
}

/// `mqgate_connections_resting` now.
async fn resting(app: &mqgate::app::App) -> i64 {
    let text = metrics(app).await;
    text.lines()
        .find_map(|l| l.strip_prefix("mqgate_connections_resting "))
        .and_then(|v| v.trim().parse().ok())
        .expect("mqgate_connections_resting in /metrics")
}

/// Waits (up to 3 s: a resumed connection rests after one to two 500 ms ticks of quiet) until
/// `n` connections rest.
async fn until_resting(app: &mqgate::app::App, n: i64) {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let now = resting(app).await;
        if now == n {
            return;
        }
        assert!(Instant::now() < end, "{now} connections resting, expected {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Quiet plain-TCP connections rest in the idle pool without a task (`mqtt/idle.rs`); what
/// they wait for still reaches them at once: a delivery, their own next packet, a takeover,
/// and the keepalive still ends a silent one.
#[tokio::test]
async fn resting_connections_get_deliveries_packets_takeovers_and_keepalive() {
    use mqgate::mqtt::codec::{PubResponse, PublishProperties, QoS};
    let app = gateway(NO_RULES).await;
    let addr = app.mqtt_addr;
    let mut sub = RawClient::connect(addr, ProtocolVersion::V311, "rest-sub").await;
    sub.subscribe("rest/t", QoS::AtLeastOnce).await;
    let mut victim = RawClient::connect(addr, ProtocolVersion::V5, "rest-victim").await;
    until_resting(&app, 2).await;
    // A delivery wakes the resting subscriber.
    let mut publisher = RawClient::connect(addr, ProtocolVersion::V311, "rest-pub").await;
    let sent = Instant::now();
    publish_qos1(&mut publisher, "rest/t", 1, b"to a resting subscriber").await;
    let p = expect_publish(&mut sub).await;
    assert_eq!(&p.payload[..], b"to a resting subscriber");
    assert!(sent.elapsed() < Duration::from_millis(500), "delivered after {:?}", sent.elapsed());
    let ack = PubResponse {
        packet_id: p.packet_id,
        code: ReasonCode::SUCCESS,
        properties: PublishProperties::none(),
    };
    sub.send(&Packet::PubAck(ack)).await;
    // Resting again, it answers its own next packet at once.
    until_resting(&app, 3).await;
    let pinged = Instant::now();
    sub.send(&Packet::PingReq).await;
    assert!(matches!(sub.recv().await, Some(Packet::PingResp)));
    assert!(pinged.elapsed() < Duration::from_millis(500), "answered after {:?}", pinged.elapsed());
    // A takeover reaches the resting holder of the client id at once.
    until_resting(&app, 3).await;
    let taken = Instant::now();
    let _new = RawClient::connect(addr, ProtocolVersion::V5, "rest-victim").await;
    expect_disconnect(&mut victim, ReasonCode::SESSION_TAKEN_OVER).await;
    assert!(taken.elapsed() < Duration::from_millis(1000), "took {:?}", taken.elapsed());
    // A resting client's keepalive still runs out (1 s: closed 1.5 s after its last packet,
    // up to a tick late).
    let mut quiet = RawClient::tcp(addr, ProtocolVersion::V5).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "rest-quiet");
    connect.keep_alive = 1;
    quiet.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(quiet.recv().await, Some(Packet::ConnAck(_))));
    let silent = Instant::now();
    match quiet.recv_within(Duration::from_secs(4)).await {
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.code, ReasonCode::KEEP_ALIVE_TIMEOUT),
        other => panic!("expected DISCONNECT 0x8D, got {other:?}"),
    }
    let waited = silent.elapsed();
    assert!(waited >= Duration::from_millis(1400), "closed {waited:?} into the silence");
    app.stop().await;
}

/// The encoded bytes of `p` (to send several packets, or part of one, in one write).
fn wire(p: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = bytes::BytesMut::new();
    mqgate::mqtt::codec::encode(p, version, &mut out).expect("encode");
    out.to_vec()
}

/// Expects a successful CONNACK next.
async fn expect_connack(c: &mut RawClient) {
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert!(a.code.is_success(), "CONNACK refused: {a:?}"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// The direct handshake (`session/direct.rs`) reads the CONNECT the accept loop finds; a
/// client whose CONNECT comes late, or in pieces, is served by a task reading the rest, and
/// rests afterwards like the others. One whose CONNECT is followed in the same segment by a
/// PUBLISH gets its CONNACK and then its PUBACK (in that order, nothing lost).
#[tokio::test]
async fn a_connect_late_in_pieces_or_with_a_publish_behind_it_is_answered() {
    use mqgate::mqtt::codec::QoS;
    let app = gateway(NO_RULES).await;
    let addr = app.mqtt_addr;
    // Late: nothing for 300 ms after the TCP handshake.
    let mut late = RawClient::tcp(addr, ProtocolVersion::V311).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    late.send(&Packet::Connect(Box::new(connect_packet(ProtocolVersion::V311, "late")))).await;
    expect_connack(&mut late).await;
    // In pieces: the fixed header and 3 bytes, then the rest 200 ms later.
    let bytes = wire(
        &Packet::Connect(Box::new(connect_packet(ProtocolVersion::V5, "pieces"))),
        ProtocolVersion::V5,
    );
    let mut pieces = RawClient::tcp(addr, ProtocolVersion::V5).await;
    pieces.send_raw(&bytes[..5]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    pieces.send_raw(&bytes[5..]).await;
    expect_connack(&mut pieces).await;
    until_resting(&app, 2).await;
    // A PUBLISH (QoS 1) right behind the CONNECT, in one write.
    let mut eager = RawClient::tcp(addr, ProtocolVersion::V311).await;
    let mut both = wire(
        &Packet::Connect(Box::new(connect_packet(ProtocolVersion::V311, "eager"))),
        ProtocolVersion::V311,
    );
    both.extend(wire(
        &Packet::Publish(publish_packet("eager/t", QoS::AtLeastOnce, 7, b"behind the connect")),
        ProtocolVersion::V311,
    ));
    eager.send_raw(&both).await;
    expect_connack(&mut eager).await;
    match eager.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, 7),
        other => panic!("expected PUBACK 7, got {other:?}"),
    }
    // All three rest, and still answer at once.
    until_resting(&app, 3).await;
    for c in [&mut late, &mut pieces, &mut eager] {
        c.send(&Packet::PingReq).await;
        assert!(matches!(c.recv().await, Some(Packet::PingResp)));
    }
    app.stop().await;
}

/// A client with a will that went straight to rest from its handshake: its will is published
/// when its connection drops, not when it closes with DISCONNECT.
#[tokio::test]
async fn a_resting_clients_will_is_published_when_its_connection_drops() {
    use mqgate::mqtt::codec::{LastWill, QoS};
    let app = gateway(NO_RULES).await;
    let addr = app.mqtt_addr;
    let mut sub = RawClient::connect(addr, ProtocolVersion::V311, "will-sub").await;
    sub.subscribe("will/#", QoS::AtMostOnce).await;
    let with_will = |id: &str| {
        let mut c = connect_packet(ProtocolVersion::V311, id);
        c.will = Some(LastWill {
            topic: format!("will/{id}"),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        });
        Packet::Connect(Box::new(c))
    };
    let mut polite = RawClient::tcp(addr, ProtocolVersion::V311).await;
    polite.send(&with_will("polite")).await;
    expect_connack(&mut polite).await;
    let mut dropped = RawClient::tcp(addr, ProtocolVersion::V311).await;
    dropped.send(&with_will("dropped")).await;
    expect_connack(&mut dropped).await;
    until_resting(&app, 3).await;
    polite.send(&Packet::Disconnect(Box::default())).await;
    assert!(polite.recv().await.is_none(), "closed after DISCONNECT");
    drop(dropped);
    let p = expect_publish(&mut sub).await;
    assert_eq!(p.topic, "will/dropped", "only the dropped client's will");
    assert_eq!(&p.payload[..], b"gone");
    expect_silence(&mut sub, Duration::from_millis(300)).await;
    app.stop().await;
}

/// A password user: the first CONNECT verifies the argon2 hash off the async workers (the
/// handshake waits in a task), the next ones hit the login cache and are answered in the
/// accept loop; a wrong password is refused either way, and a takeover of a resting
/// client id waits for the old connection to park its session.
#[tokio::test]
async fn password_users_and_takeovers_go_through_the_handshake_that_waits() {
    let phc = mqgate::auth::passwd::hash_password(b"secret").expect("hash");
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n  login_failures_before_backoff: 0\nadmin:\n  listen: \"127.0.0.1:0\"\nusers:\n  - username: dev\n    password_hash: \"{phc}\"\n"
    );
    let app = gateway(&yaml).await;
    let addr = app.mqtt_addr;
    let login = |id: &str, password: &[u8]| {
        let mut c = connect_packet(ProtocolVersion::V5, id);
        c.username = Some("dev".into());
        c.password = Some(bytes::Bytes::copy_from_slice(password));
        Packet::Connect(Box::new(c))
    };
    let mut first = RawClient::tcp(addr, ProtocolVersion::V5).await;
    first.send(&login("pw-1", b"secret")).await;
    expect_connack(&mut first).await;
    let mut second = RawClient::tcp(addr, ProtocolVersion::V5).await;
    second.send(&login("pw-2", b"secret")).await;
    expect_connack(&mut second).await;
    let mut wrong = RawClient::tcp(addr, ProtocolVersion::V5).await;
    wrong.send(&login("pw-3", b"guess")).await;
    match wrong.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.code, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        other => panic!("expected CONNACK 0x86, got {other:?}"),
    }
    assert!(wrong.recv().await.is_none(), "a refused client is closed");
    until_resting(&app, 2).await;
    // Taking `pw-1` over while it rests.
    let mut taker = RawClient::tcp(addr, ProtocolVersion::V5).await;
    taker.send(&login("pw-1", b"secret")).await;
    expect_disconnect(&mut first, ReasonCode::SESSION_TAKEN_OVER).await;
    expect_connack(&mut taker).await;
    until_resting(&app, 2).await;
    taker.send(&Packet::PingReq).await;
    assert!(matches!(taker.recv().await, Some(Packet::PingResp)));
    app.stop().await;
}
