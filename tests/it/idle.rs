//! Idle sessions: what an idle connection waits for still reaches it. Its task polls its
//! sources in place (no stored waiters, to keep idle connections small, see the session's
//! `poll_event`): shutdown comes through its registry link, keepalive from a boxed timer made
//! only when the client asked for a keepalive.

use std::time::{Duration, Instant};

use crate::support::*;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, ReasonCode};

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
