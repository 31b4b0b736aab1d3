//! Shutdown reaches idle sessions: each connected session is told through its registry link
//! (sessions do not wait on the shutdown token themselves, to keep idle connections small).

mod support;

use std::time::{Duration, Instant};

use mqgate::mqtt::codec::{Packet, ProtocolVersion, ReasonCode};
use support::*;

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
    match v5.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, ReasonCode::SERVER_SHUTTING_DOWN),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    assert!(v5.recv().await.is_none(), "the v5 connection is closed after its DISCONNECT");
    assert!(v311.recv().await.is_none(), "the 3.1.1 connection is closed (no DISCONNECT in 3.1.1)");
    assert!(half.recv().await.is_none(), "a connection without CONNECT is closed");
    stop.await.expect("stop");
    // Sessions that missed the signal would hold shutdown up for the drain deadline (5 s).
    assert!(started.elapsed() < Duration::from_secs(3), "shutdown took {:?}", started.elapsed());
}
