//! Slow and abusive clients (issue 13, item 4): a packet that has started must complete
//! within `mqtt.packet_timeout`; a client without keepalive is bounded by `mqtt.idle_timeout`;
//! `mqtt.max_keepalive` bounds MQTT 3.1.1 clients too. Raw sockets, so the timing is exact.

use std::time::{Duration, Instant};

use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS};

use crate::support::*;

fn config(extra: &str) -> String {
    format!("mqtt:\n  listen: \"127.0.0.1:0\"\n{extra}admin:\n  listen: \"127.0.0.1:0\"\n")
}

/// Connects with `keep_alive` seconds.
async fn connect(
    addr: std::net::SocketAddr,
    version: ProtocolVersion,
    keep_alive: u16,
) -> RawClient {
    let mut c = RawClient::tcp(addr, version).await;
    let mut connect = connect_packet(version, &unique("slow"));
    connect.keep_alive = keep_alive;
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    c
}

/// Waits until the server closes the connection (skipping a DISCONNECT); how long it took.
async fn closed_after(c: &mut RawClient, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        match c.recv_within(limit.saturating_sub(start.elapsed())).await {
            Ok(None) => return start.elapsed(),
            Ok(Some(Packet::Disconnect(_))) => {}
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Err(()) => panic!("still open after {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_trickled_a_byte_at_a_time_is_cut_off_by_the_packet_timeout() {
    let app = gateway(&config("  packet_timeout: 1s\n")).await;
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut c = connect(app.mqtt_addr, version, 0).await;
        // A PUBLISH announcing ~1 MiB (remaining length 0xFFFF7F = 2,097,151 is over the
        // limit; 0x80 0x80 0x3F = 1,032,192 is under it), then one byte every 200 ms.
        c.send_raw(&[0x30, 0x80, 0x80, 0x3F, 0x00, 0x01]).await;
        let start = Instant::now();
        // Trickling keeps the socket busy, not the packet alive: closed about 1 s after its
        // first byte, trickle or not.
        let mut closed = false;
        for b in 0..20u8 {
            match c.recv_within(Duration::from_millis(200)).await {
                Ok(None) => {
                    closed = true;
                    break;
                }
                Ok(Some(Packet::Disconnect(_))) | Err(()) => {}
                Ok(Some(other)) => panic!("unexpected {other:?}"),
            }
            let _ = tokio::io::AsyncWriteExt::write_all(&mut c.stream, &[b'a' + b]).await;
        }
        let took = start.elapsed();
        assert!(closed, "{version:?}: still open after {took:?}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
            "{version:?}: {took:?}"
        );
    }
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_protocol_errors_total{reason=\"packet_timeout\"} 2"), "{m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_keepalive_is_closed_after_the_idle_timeout() {
    let app = gateway(&config("  idle_timeout: 1s\n")).await;
    let mut c = connect(app.mqtt_addr, ProtocolVersion::V311, 0).await;
    let took = closed_after(&mut c, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(900), "closed too early: {took:?}");
    // A client that talks is not idle.
    let mut talker = connect(app.mqtt_addr, ProtocolVersion::V311, 0).await;
    for i in 0..4u16 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        talker.publish("t/x", QoS::AtLeastOnce, i + 1, b"x").await;
        assert!(matches!(talker.recv().await, Some(Packet::PubAck(_))), "still connected at {i}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_keepalive_bounds_311_clients_too() {
    let app = gateway(&config("  max_keepalive: 1\n")).await;
    // Asks for an hour; held to 1 s (1.5 s of silence).
    let mut c = connect(app.mqtt_addr, ProtocolVersion::V311, 3600).await;
    let took = closed_after(&mut c, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(4), "{took:?}");
    app.stop().await;
}
