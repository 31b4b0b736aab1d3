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

/// A raw client from `local` (127.0.0.1 and 127.0.0.2 both work on loopback).
async fn tcp_from(local: [u8; 4], addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind((std::net::Ipv4Addr::from(local), 0).into()).expect("bind");
    socket.connect(addr).await.expect("connect")
}

/// Waits for PINGRESP (skipping nothing else); how long it took.
async fn pingresp_after(c: &mut RawClient, start: Instant) -> Duration {
    match c.recv().await {
        Some(Packet::PingResp) => start.elapsed(),
        other => panic!("expected PINGRESP, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_rates_are_held_by_not_reading_and_other_clients_are_unaffected() {
    let extra = "  max_publish_rate: 10\n  max_publish_bytes_rate: 10000\n";
    let app = gateway(&config(extra)).await;
    let mut fast = connect(app.mqtt_addr, ProtocolVersion::V311, 0).await;
    let mut big = connect(app.mqtt_addr, ProtocolVersion::V5, 0).await;
    let mut other = connect(app.mqtt_addr, ProtocolVersion::V311, 0).await;
    // 30 small messages at 10/s with a burst of 10: the PINGREQ behind them is read ~2 s later.
    let mut out = bytes::BytesMut::new();
    for i in 0..30u16 {
        let p = publish_packet("t/rate", QoS::AtMostOnce, 0, &i.to_be_bytes());
        mqgate::mqtt::codec::encode(&Packet::Publish(p), ProtocolVersion::V311, &mut out)
            .expect("encode");
    }
    mqgate::mqtt::codec::encode(&Packet::PingReq, ProtocolVersion::V311, &mut out).expect("encode");
    // 6 messages of 5,000 bytes at 10,000 bytes/s (burst 10,000): ~2 s too.
    let mut out_big = bytes::BytesMut::new();
    for _ in 0..6 {
        let p = publish_packet("t/bytes", QoS::AtMostOnce, 0, &[7u8; 5000]);
        mqgate::mqtt::codec::encode(&Packet::Publish(p), ProtocolVersion::V5, &mut out_big)
            .expect("encode");
    }
    mqgate::mqtt::codec::encode(&Packet::PingReq, ProtocolVersion::V5, &mut out_big)
        .expect("encode");
    let start = Instant::now();
    fast.send_raw(&out).await;
    big.send_raw(&out_big).await;
    // Meanwhile another client is answered at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    other.send(&Packet::PingReq).await;
    let other_took = pingresp_after(&mut other, asked).await;
    assert!(other_took < Duration::from_millis(500), "other client waited {other_took:?}");
    let fast_took = pingresp_after(&mut fast, start).await;
    let big_took = pingresp_after(&mut big, start).await;
    assert!(
        fast_took >= Duration::from_millis(1700) && fast_took < Duration::from_secs(5),
        "30 messages at 10/s: {fast_took:?}"
    );
    assert!(
        big_took >= Duration::from_millis(1700) && big_took < Duration::from_secs(5),
        "30,000 bytes at 10,000/s: {big_took:?}"
    );
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_messages_received_total{qos=\"0\"} 36"), "nothing dropped: {m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_address_rate_are_closed_before_connect() {
    let extra = "  max_connect_rate_per_address: 2\n  connect_burst_per_address: 3\n";
    let app = gateway(&config(extra)).await;
    let version = ProtocolVersion::V311;
    let mut kept = Vec::new();
    for _ in 0..3 {
        let stream = tcp_from([127, 0, 0, 1], app.mqtt_addr).await;
        let mut c = RawClient::over(stream, version);
        c.send(&Packet::Connect(Box::new(connect_packet(version, &unique("rate"))))).await;
        assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
        kept.push(c);
    }
    // The fourth from the same address is closed without a word.
    let mut refused = tcp_from([127, 0, 0, 1], app.mqtt_addr).await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut refused, &mut buf),
    )
    .await
    .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Another address is not limited.
    let stream = tcp_from([127, 0, 0, 2], app.mqtt_addr).await;
    let mut c = RawClient::over(stream, version);
    c.send(&Packet::Connect(Box::new(connect_packet(version, &unique("rate"))))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    // The bucket refills at 2/s.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stream = tcp_from([127, 0, 0, 1], app.mqtt_addr).await;
    let mut c = RawClient::over(stream, version);
    c.send(&Packet::Connect(Box::new(connect_packet(version, &unique("rate"))))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_connections_rejected_total{reason=\"connect_rate\"} 1"), "{m}");
    app.stop().await;
}

fn users_config(extra: &str) -> String {
    let phc = mqgate::auth::passwd::hash_password(b"right").expect("hash");
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n  allow_anonymous: false\n{extra}admin:\n  listen: \"127.0.0.1:0\"\nusers:\n  - username: dev\n    password_hash: \"{phc}\"\n"
    )
}

/// CONNECT as `user`/`password` from `local`; the CONNACK's code and how long it took.
async fn login(
    addr: std::net::SocketAddr,
    local: [u8; 4],
    user: &str,
    password: &[u8],
) -> (Option<mqgate::mqtt::codec::ReasonCode>, Duration) {
    let start = Instant::now();
    let stream = tcp_from(local, addr).await;
    let version = ProtocolVersion::V311;
    let mut c = RawClient::over(stream, version);
    let mut connect = connect_packet(version, &unique("login"));
    connect.username = Some(user.into());
    connect.password = Some(bytes::Bytes::copy_from_slice(password));
    c.send(&Packet::Connect(Box::new(connect))).await;
    let code = match c.recv_within(Duration::from_secs(20)).await {
        Ok(Some(Packet::ConnAck(a))) => Some(a.code),
        _ => None,
    };
    (code, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_storm_does_not_delay_a_correct_login_from_another_address() {
    let app = gateway(&users_config("  connect_timeout: 20s\n  login_cache_size: 0\n")).await;
    let addr = app.mqtt_addr;
    // A correct login alone (no cache: argon2 each time).
    let (code, alone) = login(addr, [127, 0, 0, 2], "dev", b"right").await;
    assert!(code.is_some_and(|c| c.is_success()), "{code:?}");
    // 60 different wrong passwords at once from 127.0.0.1 (the same one would be checked
    // once for all of them).
    let storm: Vec<_> = (0..60)
        .map(|i| {
            tokio::spawn(async move {
                login(addr, [127, 0, 0, 1], "dev", format!("wrong-{i}").as_bytes()).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, during) = login(addr, [127, 0, 0, 2], "dev", b"right").await;
    assert!(code.is_some_and(|c| c.is_success()), "{code:?}");
    for s in storm {
        let (code, _) = s.await.expect("storm task");
        assert!(code.is_some_and(|c| !c.is_success()), "a wrong password was refused: {code:?}");
    }
    // Without per-address turns and backoff the storm takes both verification slots for ~30
    // verifications before the correct login gets one.
    assert!(during < alone * 4 + Duration::from_millis(300), "alone {alone:?}, during {during:?}");
    let m = metrics(&app).await;
    let backoff = m
        .lines()
        .find_map(|l| l.strip_prefix("mqgate_login_failures_total{reason=\"backoff\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(backoff >= 40, "most of the storm was refused without a check: {backoff}\n{m}");
    assert!(m.contains("mqgate_login_failures_total{reason=\"bad_password\"} 5"), "{m}");
    // The address itself stays refused for a while, even with the right password.
    let (code, quick) = login(addr, [127, 0, 0, 1], "dev", b"right").await;
    assert!(code.is_some_and(|c| !c.is_success()), "{code:?}");
    assert!(quick < alone + Duration::from_millis(200), "refused without a check: {quick:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_with_the_same_password_skips_the_hash() {
    let app = gateway(&users_config("")).await;
    let addr = app.mqtt_addr;
    let (code, _) = login(addr, [127, 0, 0, 1], "dev", b"right").await;
    assert!(code.is_some_and(|c| c.is_success()), "{code:?}");
    let (code, _) = login(addr, [127, 0, 0, 1], "dev", b"right").await;
    assert!(code.is_some_and(|c| c.is_success()), "{code:?}");
    // Another password for the same user is checked (and refused), not taken from the cache.
    let (code, _) = login(addr, [127, 0, 0, 1], "dev", b"wrong").await;
    assert!(code.is_some_and(|c| !c.is_success()), "{code:?}");
    let (code, _) = login(addr, [127, 0, 0, 1], "nobody", b"right").await;
    assert!(code.is_some_and(|c| !c.is_success()), "{code:?}");
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_login_cache_hits_total 1"), "{m}");
    // The first login, the wrong password and the unknown user (checked against a decoy).
    assert!(m.contains("mqgate_password_checks_total 3"), "{m}");
    assert!(m.contains("mqgate_login_failures_total{reason=\"bad_password\"} 1"), "{m}");
    assert!(m.contains("mqgate_login_failures_total{reason=\"unknown_user\"} 1"), "{m}");
    app.stop().await;
}
