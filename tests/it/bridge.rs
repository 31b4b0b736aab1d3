//! MQTT bridges (issue 14, item 7) against real upstream brokers: a Mosquitto started by the
//! test on a spare port (MQTT 5 and 3.1.1, plain and TLS) and mqgate itself. Uplink: the
//! device's PUBACK only after the upstream's; downlink: a persistent upstream session, acked
//! upstream only once delivered locally; no loops; an upstream killed and restarted
//! mid-stream loses nothing acknowledged and keeps the order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqgate::mqtt::codec::{Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};

use crate::support::certs::Ca;
use crate::support::mosquitto::Mosquitto;
use crate::support::*;

/// A gateway with bridge `cloud` to `url` (extra bridge lines indented 4), and `rest` (rules,
/// sources; unindented YAML).
fn bridge_config(url: &str, bridge_extra: &str, rest: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nbridges:\n  cloud:\n    url: \"{url}\"\n    client_id: \"{}\"\n    reconnect_min: 50ms\n    reconnect_max: 500ms\n{bridge_extra}{rest}",
        unique("edge")
    )
}

const UPLINK: &str = "rules:\n  - name: uplink\n    from: \"sensors/#\"\n    to:\n      - mqtt: { bridge: cloud, topic: \"site-1/{{ topic_name }}\", qos: 1 }\n";

/// Waits until `/readyz` says the bridge is connected.
async fn wait_bridge_up(app: &mqgate::app::App) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http_get(app.admin_addr, "/readyz").await.unwrap_or_default();
        if body.contains("mqtt bridge cloud: connected") {
            return;
        }
        assert!(Instant::now() < deadline, "bridge never connected:\n{body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A subscriber on `addr` (persistent session when `id` is reused), subscribed to `filter`.
async fn subscriber(addr: std::net::SocketAddr, id: &str, filter: &str, clean: bool) -> RawClient {
    let mut c = RawClient::tcp(addr, ProtocolVersion::V311).await;
    let mut connect = connect_packet(ProtocolVersion::V311, id);
    connect.clean_start = clean;
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    let codes = c.subscribe(filter, QoS::AtLeastOnce).await;
    assert!(codes[0].is_success(), "{codes:?}");
    c
}

/// Reconnects the persistent session `id` on `addr` (its subscriptions kept: no SUBSCRIBE).
async fn resume(addr: std::net::SocketAddr, id: &str) -> RawClient {
    let mut c = RawClient::tcp(addr, ProtocolVersion::V311).await;
    let mut connect = connect_packet(ProtocolVersion::V311, id);
    connect.clean_start = false;
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.session_present));
    c
}

/// Receives PUBLISHes for `wait`, acknowledging QoS 1 ones; (topic, payload) in order.
async fn drain(c: &mut RawClient, wait: Duration) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.recv_within(left).await {
            Ok(Some(Packet::Publish(p))) => {
                if p.qos == QoS::AtLeastOnce {
                    c.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
                }
                got.push((p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned()));
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(()) => return got,
        }
    }
}

/// Publishes QoS 1 and returns the PUBACK's reason code (or `None` if none came in `wait`).
async fn publish_acked(
    c: &mut RawClient,
    topic: &str,
    id: u16,
    payload: &str,
    wait: Duration,
) -> Option<ReasonCode> {
    c.publish(topic, QoS::AtLeastOnce, id, payload.as_bytes()).await;
    match c.recv_within(wait).await {
        Ok(Some(Packet::PubAck(a))) => Some(a.code),
        _ => None,
    }
}

async fn uplink_against_mosquitto(version: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Mosquitto::start(dir.path(), "").await;
    let mut sub = subscriber(upstream.addr(), &unique("up-sub"), "site-1/#", true).await;
    let yaml = bridge_config(
        &format!("mqtt://127.0.0.1:{}", upstream.port),
        &format!("    version: {version}\n"),
        UPLINK,
    );
    let app = gateway(&yaml).await;
    wait_bridge_up(&app).await;
    let mut dev = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("dev")).await;
    for i in 1..=20u16 {
        let code = publish_acked(
            &mut dev,
            &format!("sensors/{}", i % 3),
            i,
            &format!("m{i}"),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(code, Some(ReasonCode::SUCCESS), "message {i}");
    }
    let got = drain(&mut sub, Duration::from_millis(800)).await;
    let want: Vec<(String, String)> =
        (1..=20u16).map(|i| (format!("site-1/sensors/{}", i % 3), format!("m{i}"))).collect();
    assert_eq!(got, want, "every message, in order, under the template's topic");
    let m = metrics(&app).await;
    assert!(
        m.contains("mqgate_bridge_messages_total{bridge=\"cloud\",outcome=\"published\"} 20"),
        "{m}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_to_a_mosquitto_over_mqtt_5() {
    uplink_against_mosquitto("5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_to_a_mosquitto_over_mqtt_311() {
    uplink_against_mosquitto("\"3.1.1\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_is_acknowledged_only_after_the_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut upstream = Mosquitto::start(dir.path(), "").await;
    let sub_id = unique("up-sub");
    drop(subscriber(upstream.addr(), &sub_id, "site-1/#", false).await);
    let yaml = bridge_config(&format!("mqtt://127.0.0.1:{}", upstream.port), "", UPLINK);
    let app = gateway(&yaml).await;
    wait_bridge_up(&app).await;
    upstream.stop();
    let mut dev = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("dev")).await;
    // The upstream is down: no PUBACK (3.1.1: withheld, or the connection closed).
    let code = publish_acked(&mut dev, "sensors/a", 1, "while down", Duration::from_secs(1)).await;
    assert_eq!(code, None, "acknowledged while the upstream was down");
    upstream.restart().await;
    // The same client resends on a new connection (as 3.1.1 clients do) until acknowledged.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut dev =
            RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("dev")).await;
        if publish_acked(&mut dev, "sensors/a", 1, "while down", Duration::from_secs(2)).await
            == Some(ReasonCode::SUCCESS)
        {
            break;
        }
        assert!(Instant::now() < deadline, "never acknowledged after the upstream came back");
    }
    let mut sub = resume(upstream.addr(), &sub_id).await;
    let got = drain(&mut sub, Duration::from_secs(1)).await;
    assert!(got.iter().any(|(t, p)| t == "site-1/sensors/a" && p == "while down"), "{got:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_keeps_a_persistent_upstream_session_across_a_gateway_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Mosquitto::start(dir.path(), "").await;
    let store = dir.path().join("store");
    let client_id = unique("edge");
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\nbridges:\n  cloud:\n    url: \"mqtt://127.0.0.1:{}\"\n    client_id: \"{client_id}\"\n    clean_start: false\n    session_expiry: 1h\n    reconnect_min: 50ms\nsources:\n  - name: downlink\n    bridge: cloud\n    subscribe: [\"site-1/commands/#\"]\n    qos: 1\n    topic: \"{{{{ topic_name | replace('site-1/', '') }}}}\"\n",
        store.display(),
        upstream.port
    );
    let app = gateway(&yaml).await;
    wait_bridge_up(&app).await;
    // A local subscriber with a persistent session, then away.
    let local_id = unique("local");
    let mut local = subscriber(app.mqtt_addr, &local_id, "commands/#", false).await;
    let mut up =
        RawClient::connect(upstream.addr(), ProtocolVersion::V311, &unique("cloud-app")).await;
    assert_eq!(
        publish_acked(&mut up, "site-1/commands/a", 1, "live", Duration::from_secs(5)).await,
        Some(ReasonCode::SUCCESS)
    );
    assert_eq!(
        drain(&mut local, Duration::from_millis(500)).await,
        vec![("commands/a".to_owned(), "live".to_owned())]
    );
    drop(local);
    app.stop().await;

    // While mqgate is down, the upstream keeps the bridge's messages.
    for i in 1..=5u16 {
        let code = publish_acked(
            &mut up,
            "site-1/commands/b",
            i + 1,
            &format!("queued-{i}"),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(code, Some(ReasonCode::SUCCESS));
    }
    let app = gateway_on_store(&yaml).await;
    wait_bridge_up(&app).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The local session (restored from the store) has its subscription and the messages.
    let mut local = resume(app.mqtt_addr, &local_id).await;
    let got = drain(&mut local, Duration::from_secs(1)).await;
    let want: Vec<(String, String)> =
        (1..=5).map(|i| ("commands/b".to_owned(), format!("queued-{i}"))).collect();
    assert_eq!(got, want, "published upstream while the bridge was down, delivered in order");
    app.stop().await;
}

async fn no_loops(version: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Mosquitto::start(dir.path(), "").await;
    // Everything goes up, and everything comes down: the classic loop.
    let rest = "rules:\n  - name: all-up\n    from: \"#\"\n    to:\n      - mqtt: { bridge: cloud, qos: 1 }\nsources:\n  - name: all-down\n    bridge: cloud\n    subscribe: [\"#\"]\n    qos: 1\n";
    let yaml = bridge_config(
        &format!("mqtt://127.0.0.1:{}", upstream.port),
        &format!("    version: {version}\n"),
        rest,
    );
    let app = gateway(&yaml).await;
    wait_bridge_up(&app).await;
    let mut local = subscriber(app.mqtt_addr, &unique("local"), "t/#", true).await;
    let mut remote = subscriber(upstream.addr(), &unique("remote"), "t/#", true).await;
    // From a local device: up once, and locally once (not again from the upstream's echo).
    let mut dev = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("dev")).await;
    assert_eq!(
        publish_acked(&mut dev, "t/local", 1, "from-device", Duration::from_secs(5)).await,
        Some(ReasonCode::SUCCESS)
    );
    // From the upstream: down once, never back up.
    let mut app_up =
        RawClient::connect(upstream.addr(), ProtocolVersion::V311, &unique("cloud-app")).await;
    assert_eq!(
        publish_acked(&mut app_up, "t/remote", 1, "from-cloud", Duration::from_secs(5)).await,
        Some(ReasonCode::SUCCESS)
    );
    let local_got = drain(&mut local, Duration::from_secs(1)).await;
    let remote_got = drain(&mut remote, Duration::from_millis(200)).await;
    let count = |v: &[(String, String)], t: &str| v.iter().filter(|(topic, _)| topic == t).count();
    assert_eq!(
        (count(&local_got, "t/local"), count(&local_got, "t/remote")),
        (1, 1),
        "local: {local_got:?}"
    );
    assert_eq!(
        (count(&remote_got, "t/local"), count(&remote_got, "t/remote")),
        (1, 1),
        "upstream: {remote_got:?}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loops_with_an_mqtt_5_upstream() {
    no_loops("5").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_loops_with_an_mqtt_311_upstream() {
    no_loops("\"3.1.1\"").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_over_tls_to_a_mosquitto() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "bridge");
    let server = ca.server("mosquitto");
    let tls = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        ca.pem.display(),
        server.cert.display(),
        server.key.display()
    );
    // Mosquitto's one listener is the TLS one; the test subscribes over TLS through the bridge
    // config's own CA (the subscriber uses a second, plain listener).
    let plain = crate::support::mosquitto::spare_port();
    let upstream =
        Mosquitto::start(dir.path(), &format!("{tls}listener {plain} 127.0.0.1\n")).await;
    let plain_addr = std::net::SocketAddr::from(([127, 0, 0, 1], plain));
    // Mosquitto::start waited for the first (TLS) listener only.
    crate::support::mosquitto::wait_port(plain_addr).await;
    let mut sub = subscriber(plain_addr, &unique("up-sub"), "site-1/#", true).await;
    let yaml = bridge_config(
        &format!("mqtts://127.0.0.1:{}", upstream.port),
        &format!("    tls: {{ ca: \"{}\" }}\n", ca.pem.display()),
        UPLINK,
    );
    let app = gateway(&yaml).await;
    wait_bridge_up(&app).await;
    let mut dev = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("dev")).await;
    assert_eq!(
        publish_acked(&mut dev, "sensors/tls", 1, "secret", Duration::from_secs(5)).await,
        Some(ReasonCode::SUCCESS)
    );
    assert_eq!(
        drain(&mut sub, Duration::from_millis(500)).await,
        vec![("site-1/sensors/tls".to_owned(), "secret".to_owned())]
    );
    app.stop().await;

    // A bridge that does not trust the upstream's certificate never connects.
    let other = Ca::new(dir.path(), "other");
    let yaml = bridge_config(
        &format!("mqtts://127.0.0.1:{}", upstream.port),
        &format!("    tls: {{ ca: \"{}\" }}\n", other.pem.display()),
        UPLINK,
    );
    let app = gateway(&yaml).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("mqtt bridge cloud: disconnected (TLS"), "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqgate_as_the_upstream_and_its_reason_codes_reach_mqtt_5_devices() {
    // The upstream is another mqgate whose ACL refuses `site-1/forbidden/#`: MQTT 5 PUBACK 0x87.
    let upstream = gateway(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nacl:\n  - deny: publish\n    topic: \"site-1/forbidden/#\"\n  - allow: all\n    topic: \"#\"\n",
    )
    .await;
    let mut sub = subscriber(upstream.mqtt_addr, &unique("up-sub"), "site-1/#", true).await;
    let yaml = bridge_config(&format!("mqtt://{}", upstream.mqtt_addr), "", UPLINK);
    let app = gateway(&yaml).await;
    wait_bridge_up(&app).await;
    let mut dev = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("dev")).await;
    assert_eq!(
        publish_acked(&mut dev, "sensors/ok", 1, "fine", Duration::from_secs(5)).await,
        Some(ReasonCode::SUCCESS)
    );
    drop(dev);
    app.stop().await;
    let yaml = bridge_config(
        &format!("mqtt://{}", upstream.mqtt_addr),
        "",
        "rules:\n  - name: uplink\n    from: \"f/#\"\n    to:\n      - mqtt: { bridge: cloud, topic: \"site-1/forbidden/{{ topic_name }}\", qos: 1 }\n",
    );
    let app = gateway(&yaml).await;
    wait_bridge_up(&app).await;
    let mut dev = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("dev")).await;
    let code = publish_acked(&mut dev, "f/1", 1, "refused upstream", Duration::from_secs(5)).await;
    assert_eq!(code, Some(ReasonCode::NOT_AUTHORIZED), "the upstream's 0x87 passed back");
    let got = drain(&mut sub, Duration::from_millis(300)).await;
    assert_eq!(got, vec![("site-1/sensors/ok".to_owned(), "fine".to_owned())]);
    app.stop().await;
    upstream.stop().await;
}

/// A device that publishes `n` QoS 1 messages one at a time, resending the same message on a
/// new connection until it is acknowledged; returns the payloads acknowledged, in order.
async fn resilient_publisher(
    addr: std::net::SocketAddr,
    topic: &str,
    n: u32,
    progress: Arc<AtomicUsize>,
) -> Vec<String> {
    let id = unique("resilient");
    let mut acked = Vec::new();
    let mut conn: Option<RawClient> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    while i < n {
        assert!(Instant::now() < deadline, "stuck at message {i}");
        let c = match conn.as_mut() {
            Some(c) => c,
            None => {
                let mut c = RawClient::tcp(addr, ProtocolVersion::V5).await;
                c.send(&Packet::Connect(Box::new(connect_packet(ProtocolVersion::V5, &id)))).await;
                match c.recv().await {
                    Some(Packet::ConnAck(a)) if a.code.is_success() => {}
                    _ => continue,
                }
                conn.insert(c)
            }
        };
        let payload = format!("{i:05}");
        let pid = (i % 60_000 + 1) as u16;
        c.publish(topic, QoS::AtLeastOnce, pid, payload.as_bytes()).await;
        match c.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::PubAck(a))) if a.code.is_success() => {
                acked.push(payload);
                i += 1;
                progress.store(acked.len(), Ordering::SeqCst);
            }
            // Disconnected (the upstream connection was lost: resend), or no answer.
            _ => conn = None,
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_restarted_mid_stream_loses_nothing_acknowledged_and_keeps_the_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut upstream = Mosquitto::start(dir.path(), "").await;
    let sub_id = unique("up-sub");
    drop(subscriber(upstream.addr(), &sub_id, "site-1/#", false).await);
    let yaml = bridge_config(&format!("mqtt://127.0.0.1:{}", upstream.port), "", UPLINK);
    let app = gateway(&yaml).await;
    wait_bridge_up(&app).await;
    let addr = app.mqtt_addr;
    let progress = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&progress);
    let publisher =
        tokio::spawn(async move { resilient_publisher(addr, "sensors/stream", 3000, p).await });
    while progress.load(Ordering::SeqCst) < 500 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    upstream.stop();
    let at_stop = progress.load(Ordering::SeqCst);
    assert!(at_stop < 3000, "the restart must come mid-stream");
    tokio::time::sleep(Duration::from_millis(500)).await;
    upstream.restart().await;
    let acked = publisher.await.expect("publisher");
    assert_eq!(acked.len(), 3000);
    let mut sub = resume(upstream.addr(), &sub_id).await;
    let got = drain(&mut sub, Duration::from_secs(2)).await;
    let payloads: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for p in &payloads {
        *seen.entry(p).or_default() += 1;
    }
    let lost: Vec<&String> = acked.iter().filter(|p| !seen.contains_key(p.as_str())).collect();
    assert!(lost.is_empty(), "acknowledged but lost upstream: {lost:?}");
    // Order per topic: first copies in publishing order (resends may duplicate).
    let mut firsts = Vec::new();
    for p in &payloads {
        if !firsts.contains(p) {
            firsts.push(*p);
        }
    }
    let mut sorted = firsts.clone();
    sorted.sort();
    assert_eq!(firsts, sorted, "first copies out of order");
    let dups = payloads.len() - firsts.len();
    println!(
        "upstream restarted after {at_stop} acknowledged: {} received, {dups} duplicates",
        payloads.len()
    );
    app.stop().await;
}

#[test]
fn bridge_config_errors_point_at_the_value() {
    let text = "mqtt:\n  listen: \"127.0.0.1:0\"\nbridges:\n  cloud:\n    url: \"http://x\"\n    client_id: \"\"\n    version: 4.0\nrules:\n  - name: r\n    from: \"a\"\n    to:\n      - mqtt: { bridge: nope, qos: 3 }\nsources:\n  - name: s\n    bridge: cloud\n";
    let e = mqgate::config::Config::parse(std::path::Path::new("b.yaml"), text).unwrap_err();
    assert!(e.to_string().contains("b.yaml:7:"), "version: {e}");
    let text = text.replace("    version: 4.0\n", "");
    let e = mqgate::config::Config::parse(std::path::Path::new("b.yaml"), &text).unwrap_err();
    let s = e.to_string();
    for want in [
        "b.yaml:5:",
        "scheme \"http\"",
        "b.yaml:6:",
        "client_id",
        "no bridge \"nope\"",
        "qos must be 0, 1 or 2",
        "needs `subscribe:`",
    ] {
        assert!(s.contains(want), "{want}: {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_over_several_connections_keeps_the_order_per_topic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = Mosquitto::start(dir.path(), "").await;
    let mut sub = subscriber(upstream.addr(), &unique("up-sub"), "site-1/#", true).await;
    let yaml = bridge_config(
        &format!("mqtt://127.0.0.1:{}", upstream.port),
        "    connections: 3\n",
        UPLINK,
    );
    let app = gateway(&yaml).await;
    wait_bridge_up(&app).await;
    let mut dev = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("dev")).await;
    // Pipelined: 120 messages over 6 topics, then the acks.
    for i in 1..=120u16 {
        let p = crate::support::publish_packet(
            &format!("sensors/{}", i % 6),
            QoS::AtLeastOnce,
            i,
            format!("{i}").as_bytes(),
        );
        dev.send(&Packet::Publish(p)).await;
    }
    for _ in 1..=120 {
        assert!(matches!(dev.recv().await, Some(Packet::PubAck(a)) if a.code.is_success()));
    }
    let got = drain(&mut sub, Duration::from_millis(800)).await;
    assert_eq!(got.len(), 120);
    let mut last: HashMap<String, u16> = HashMap::new();
    for (topic, payload) in &got {
        let n: u16 = payload.parse().expect("number");
        let prev = last.insert(topic.clone(), n).unwrap_or(0);
        assert!(n > prev, "{topic}: {n} after {prev}");
    }
    app.stop().await;
}

#[test]
fn several_connections_are_refused_for_a_bridge_with_sources() {
    let text = "mqtt:\n  listen: \"127.0.0.1:0\"\nbridges:\n  cloud:\n    url: \"mqtt://127.0.0.1:1\"\n    client_id: x\n    connections: 2\nsources:\n  - name: s\n    bridge: cloud\n    subscribe: [\"a/#\"]\n";
    let e = mqgate::config::Config::parse(std::path::Path::new("c.yaml"), text).unwrap_err();
    assert!(e.to_string().contains("connections: more than one only"), "{e}");
}
