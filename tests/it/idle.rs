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
