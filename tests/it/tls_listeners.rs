//! Devices on a real network (issue 12): TLS and mutual TLS listeners, the certificate's name as
//! the user name, MQTT over WebSocket (ws, wss), the PROXY protocol, certificate reload, and
//! the bad input each gets answered and counted. Real clients: mosquitto_pub/mosquitto_sub,
//! paho-mqtt over WebSocket, rustls and tungstenite clients under our raw MQTT client.
//! Certificates are made per test (rcgen, `support::certs`).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::support::certs::{Ca, ClientNames, Pair};
use crate::support::*;

const V5: ProtocolVersion = ProtocolVersion::V5;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A TLS connection to `addr` trusting `ca`, presenting `client` if given.
async fn tls_connect(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&Pair>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(p) => {
            let chain: Vec<_> =
                CertificateDer::pem_file_iter(&p.cert).unwrap().map(|c| c.unwrap()).collect();
            let key = PrivateKeyDer::from_pem_file(&p.key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await
}

/// A raw MQTT 5 client over TLS, CONNECT sent with `user`; the CONNACK (or `None`: closed).
async fn tls_mqtt(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&Pair>,
    id: &str,
    user: Option<&str>,
) -> (RawClient, Option<Packet>) {
    let stream = tls_connect(addr, ca, client).await.expect("TLS handshake (client side)");
    let mut c = RawClient::over(stream, V5);
    let mut connect = connect_packet(V5, id);
    connect.username = user.map(Into::into);
    c.send(&Packet::Connect(Box::new(connect))).await;
    let answer = c.recv_within(Duration::from_secs(10)).await.expect("an answer in time");
    (c, answer)
}

fn connack_code(p: &Option<Packet>) -> Option<ReasonCode> {
    match p {
        Some(Packet::ConnAck(a)) => Some(a.code),
        _ => None,
    }
}

fn yaml(listeners: &str, extra: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n  connect_timeout: 2s\n  listeners:\n{listeners}\
         admin:\n  listen: \"127.0.0.1:0\"\n{extra}"
    )
}

fn tls_listener(kind: &str, name: &str, server: &Pair, extra: &str) -> String {
    format!(
        "    - kind: {kind}\n      name: {name}\n      listen: \"127.0.0.1:0\"\n      tls:\n        \
         cert: \"{}\"\n        key: \"{}\"\n{extra}",
        server.cert.display(),
        server.key.display()
    )
}

async fn run_client(cmd: &mut Command) -> std::process::Output {
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("client finished in time")
        .expect("the client runs (mosquitto-clients / python3 with paho-mqtt, see scripts/test.sh)")
}

fn metric_value(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn mosquitto_clients_over_tls_and_mutual_tls_with_the_certificate_name_as_user() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "devices");
    let server = ca.server("server");
    let dev1 = ca.client("dev-1", ClientNames { cn: "dev-1", ..Default::default() });
    let mtls_extra = format!(
        "        client_ca: \"{}\"\n        require_client_cert: true\n        identity: cn\n",
        ca.pem.display()
    );
    let listeners = tls_listener("tls", "tls", &server, "")
        + &tls_listener("tls", "mtls", &server, &mtls_extra);
    // A device may publish and subscribe under devices/<its certificate's CN>/ only.
    let acl = "acl:\n  - allow: all\n    topic: \"devices/%u/#\"\nacl_default: deny\n";
    let app = gateway(&yaml(&listeners, acl)).await;
    let mtls = app.listener_addr("mtls").unwrap();
    let tls = app.listener_addr("tls").unwrap();
    let tls_args = |addr: SocketAddr, pair: Option<&Pair>| {
        let mut a = vec![
            "-h".to_owned(),
            "127.0.0.1".into(),
            "-p".into(),
            addr.port().to_string(),
            "--cafile".into(),
            ca.pem.display().to_string(),
        ];
        if let Some(p) = pair {
            a.extend(["--cert".into(), p.cert.display().to_string()]);
            a.extend(["--key".into(), p.key.display().to_string()]);
        }
        a
    };
    // Mutual TLS: the subscriber and the publisher are dev-1 by certificate, no password.
    let mut sub = Command::new("mosquitto_sub");
    sub.args(tls_args(mtls, Some(&dev1)))
        .args(["-V", "mqttv5", "-q", "1", "-t", "devices/dev-1/#", "-C", "1", "-W", "15", "-v"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let sub = sub.spawn().expect("mosquitto_sub (Debian package mosquitto-clients)");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let out = run_client(Command::new("mosquitto_pub").args(tls_args(mtls, Some(&dev1))).args([
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        "devices/dev-1/temp",
        "-m",
        "21.5",
    ]))
    .await;
    assert!(
        out.status.success(),
        "mosquitto_pub over mTLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = tokio::time::timeout(Duration::from_secs(20), sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "devices/dev-1/temp 21.5");

    // The identity drives the ACL: dev-1 may not publish under dev-2.
    let (mut c, ack) = tls_mqtt(mtls, &ca.pem, Some(&dev1), &unique("m"), None).await;
    assert_eq!(connack_code(&ack), Some(ReasonCode::SUCCESS));
    c.publish("devices/dev-2/temp", QoS::AtLeastOnce, 7, b"x").await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::NOT_AUTHORIZED),
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    c.publish("devices/dev-1/temp", QoS::AtLeastOnce, 8, b"x").await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert!(a.code.is_success(), "{a:?}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // A CONNECT naming another user than the certificate is refused (0x86)...
    let (_c, ack) = tls_mqtt(mtls, &ca.pem, Some(&dev1), &unique("m"), Some("dev-2")).await;
    assert_eq!(connack_code(&ack), Some(ReasonCode::BAD_USER_NAME_OR_PASSWORD));
    // ... and by mosquitto_pub as well.
    let out = run_client(Command::new("mosquitto_pub").args(tls_args(mtls, Some(&dev1))).args([
        "-u",
        "dev-2",
        "-t",
        "devices/dev-2/temp",
        "-m",
        "x",
    ]))
    .await;
    assert!(!out.status.success(), "a foreign user name over mTLS must be refused");
    // Without a client certificate the mTLS listener refuses the handshake.
    let (_c, ack) = tls_mqtt(mtls, &ca.pem, None, &unique("m"), None).await;
    assert_eq!(connack_code(&ack), None, "no CONNACK without a client certificate");

    // One-way TLS (no client certificate asked): anonymous, and the ACL's %u is empty.
    let out = run_client(
        Command::new("mosquitto_pub")
            .args(tls_args(tls, None))
            .args(["-q", "1", "-t", "open/x", "-m", "x"]),
    )
    .await;
    assert!(
        out.status.success(),
        "mosquitto_pub over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = metrics(&app).await;
    assert!(metric_value(&m, "mqgate_listener_connections_total{listener=\"mtls\"}") >= 4.0, "{m}");
    assert!(m.contains("reason=\"no_client_cert\""), "{m}");
    app.stop().await;
}

#[tokio::test]
async fn identity_from_subject_alternative_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "san");
    let server = ca.server("server");
    let with_names = ca.client(
        "named",
        ClientNames {
            cn: "ignored-cn",
            dns: &["sensor-7.example"],
            email: &["ops@example.com"],
            ..Default::default()
        },
    );
    let without = ca.client("plain", ClientNames { cn: "only-cn", ..Default::default() });
    let extra = |identity: &str| {
        format!("        client_ca: \"{}\"\n        identity: {identity}\n", ca.pem.display())
    };
    let listeners = tls_listener("tls", "dns", &server, &extra("san_dns"))
        + &tls_listener("tls", "email", &server, &extra("san_email"));
    let acl = "acl:\n  - allow: all\n    topic: \"u/%u/#\"\nacl_default: deny\n";
    let app = gateway(&yaml(&listeners, acl)).await;
    for (listener, user) in [("dns", "sensor-7.example"), ("email", "ops@example.com")] {
        let addr = app.listener_addr(listener).unwrap();
        let (mut c, ack) = tls_mqtt(addr, &ca.pem, Some(&with_names), &unique("s"), None).await;
        assert_eq!(connack_code(&ack), Some(ReasonCode::SUCCESS), "{listener}");
        c.publish(&format!("u/{user}/x"), QoS::AtLeastOnce, 1, b"x").await;
        match c.recv().await {
            Some(Packet::PubAck(a)) => assert!(a.code.is_success(), "{listener}: {a:?}"),
            other => panic!("{listener}: expected PUBACK, got {other:?}"),
        }
        c.publish("u/ignored-cn/x", QoS::AtLeastOnce, 2, b"x").await;
        match c.recv().await {
            Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::NOT_AUTHORIZED, "{listener}"),
            other => panic!("{listener}: expected PUBACK 0x87, got {other:?}"),
        }
        // A certificate without that kind of name does not get in.
        let (_c, ack) = tls_mqtt(addr, &ca.pem, Some(&without), &unique("s"), None).await;
        assert_eq!(connack_code(&ack), None, "{listener}: certificate without the name");
    }
    assert!(metrics(&app).await.contains("reason=\"no_identity\""));
    app.stop().await;
}

#[tokio::test]
async fn bad_tls_input_is_refused_counted_and_disturbs_no_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "good");
    let rogue = Ca::new(dir.path(), "rogue");
    let server = ca.server("server");
    let good = ca.client("good", ClientNames { cn: "good", ..Default::default() });
    let untrusted = rogue.client("untrusted", ClientNames { cn: "good", ..Default::default() });
    let expired =
        ca.client("expired", ClientNames { cn: "good", expired: true, ..Default::default() });
    let extra =
        format!("        client_ca: \"{}\"\n        require_client_cert: true\n", ca.pem.display());
    let app = gateway(&yaml(&tls_listener("tls", "mtls", &server, &extra), "")).await;
    let tls = app.listener_addr("mtls").unwrap();
    // A client that stays connected throughout and must not notice anything.
    let (mut bystander, ack) = tls_mqtt(tls, &ca.pem, Some(&good), &unique("b"), None).await;
    assert_eq!(connack_code(&ack), Some(ReasonCode::SUCCESS));

    // Plain MQTT to the TLS port: no CONNACK (at most a TLS alert), closed.
    let mut plain = TcpStream::connect(tls).await.unwrap();
    let mut connect = bytes::BytesMut::new();
    let packet = Packet::Connect(Box::new(connect_packet(V5, "plain")));
    mqgate::mqtt::codec::encode(&packet, V5, &mut connect).unwrap();
    plain.write_all(&connect).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "closed within 5 s");
    assert!(answer.first() != Some(&0x20), "no CONNACK: {answer:?}");
    // TLS to the plain port: no CONNACK, closed.
    let tls_to_plain = tls_connect(app.mqtt_addr, &ca.pem, None).await;
    assert!(tls_to_plain.is_err(), "a TLS handshake with the plain listener cannot succeed");
    // A handshake that never finishes: closed after connect_timeout (2 s).
    let mut silent = TcpStream::connect(tls).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "closed, not {n:?}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "{:?}", started.elapsed());
    // Untrusted, expired and missing client certificates.
    for (what, pair) in
        [("untrusted", Some(&untrusted)), ("expired", Some(&expired)), ("none", None)]
    {
        let (_c, ack) = tls_mqtt(tls, &ca.pem, pair, &unique("x"), None).await;
        assert_eq!(connack_code(&ack), None, "{what} client certificate");
    }
    // The bystander still publishes.
    bystander.publish("still/here", QoS::AtLeastOnce, 1, b"x").await;
    match bystander.recv().await {
        Some(Packet::PubAck(a)) => assert!(a.code.is_success()),
        other => panic!("bystander: expected PUBACK, got {other:?}"),
    }
    let m = metrics(&app).await;
    for reason in ["not_tls", "timeout", "untrusted_cert", "expired_cert", "no_client_cert"] {
        let series =
            format!("mqgate_tls_handshake_failures_total{{listener=\"mtls\",reason=\"{reason}\"}}");
        assert!(metric_value(&m, &series) >= 1.0, "{series} missing in\n{m}");
    }
    app.stop().await;
}

async fn paho_ws(args: &[String]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/python/ws_paho.py");
    let python = std::env::var("MQGATE_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into());
    let out = run_client(Command::new(&python).arg(script).args(args)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "{script} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn paho_over_websocket_and_websocket_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ws");
    let server = ca.server("server");
    let client = ca.client("client", ClientNames { cn: "browser-1", ..Default::default() });
    let listeners = "    - kind: ws\n      name: ws\n      listen: \"127.0.0.1:0\"\n".to_owned()
        + &tls_listener(
            "wss",
            "wss",
            &server,
            &format!("        client_ca: \"{}\"\n", ca.pem.display()),
        )
        + "      path: /mqtt/ws\n";
    let app = gateway(&yaml(&listeners, "")).await;
    let ws = app.listener_addr("ws").unwrap();
    let wss = app.listener_addr("wss").unwrap();
    let ca_pem = ca.pem.display().to_string();
    for version in ["311", "5"] {
        paho_ws(&["127.0.0.1".into(), ws.port().to_string(), "/mqtt".into(), version.into()]).await;
        let wss_args = [
            "localhost".into(),
            wss.port().to_string(),
            "/mqtt/ws".into(),
            version.into(),
            ca_pem.clone(),
        ];
        paho_ws(&wss_args).await;
        let mut with_cert = wss_args.to_vec();
        with_cert.extend([client.cert.display().to_string(), client.key.display().to_string()]);
        paho_ws(&with_cert).await;
    }
    // WebSocket and TCP clients share one broker: a TCP subscriber sees a WebSocket publish.
    let mut sub = RawClient::connect(app.mqtt_addr, V5, &unique("tcp-sub")).await;
    assert_eq!(sub.subscribe("cross/#", QoS::AtLeastOnce).await, vec![ReasonCode::GRANTED_QOS_1]);
    let mut c = ws_mqtt(ws, "/mqtt", &["mqtt"]).await.expect("upgrade");
    c.send(&Packet::Connect(Box::new(connect_packet(V5, &unique("ws"))))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    c.publish("cross/ws", QoS::AtLeastOnce, 1, b"hello").await;
    let p = expect_publish(&mut sub).await;
    assert_eq!(&*p.topic, "cross/ws");
    app.stop().await;
}

/// A raw MQTT client over a WebSocket (tungstenite as the client), offering `protocols`.
async fn ws_mqtt(
    addr: SocketAddr,
    path: &str,
    protocols: &[&str],
) -> Result<RawClient, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    if !protocols.is_empty() {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocols.join(", ").parse().unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(request, tcp).await?;
    Ok(RawClient::over(mqgate::listeners::ws::WsStream::new(ws), V5))
}

/// Sends a raw HTTP upgrade request; the status code of the answer.
async fn raw_upgrade(addr: SocketAddr, path: &str, extra_headers: &str) -> u16 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn bad_websocket_input_gets_http_answers_and_closes() {
    let listeners = "    - kind: ws\n      name: ws\n      listen: \"127.0.0.1:0\"\n      \
                     allowed_origins: [\"https://console.example\"]\n";
    let app = gateway(
        &yaml(listeners, "")
            .replace("  connect_timeout: 2s\n", "  connect_timeout: 2s\n  max_packet_size: 1024\n"),
    )
    .await;
    let ws = app.listener_addr("ws").unwrap();
    let proto = "Sec-WebSocket-Protocol: mqtt\r\n";
    assert_eq!(raw_upgrade(ws, "/other", proto).await, 404);
    assert_eq!(raw_upgrade(ws, "/mqtt", "").await, 400);
    assert_eq!(raw_upgrade(ws, "/mqtt", "Sec-WebSocket-Protocol: chat\r\n").await, 400);
    let evil = format!("{proto}Origin: https://evil.example\r\n");
    assert_eq!(raw_upgrade(ws, "/mqtt", &evil).await, 403);
    let good = format!("{proto}Origin: https://console.example\r\n");
    assert_eq!(raw_upgrade(ws, "/mqtt", &good).await, 101);
    // `mqttv3.1` is accepted too.
    assert!(ws_mqtt(ws, "/mqtt", &["mqttv3.1"]).await.is_ok());

    // A text frame closes the connection.
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;
    let mut request = format!("ws://{ws}/mqtt").into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let tcp = TcpStream::connect(ws).await.unwrap();
    let (mut text, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    text.send(Message::Text("CONNECT".into())).await.unwrap();
    let mut raw = RawClient::over(mqgate::listeners::ws::WsStream::new(text), V5);
    assert!(raw.recv_within(Duration::from_secs(5)).await.unwrap().is_none(), "text frame: closed");
    // A frame larger than max_packet_size closes it.
    let mut big = ws_mqtt(ws, "/mqtt", &["mqtt"]).await.unwrap();
    big.send(&Packet::Connect(Box::new(connect_packet(V5, &unique("big"))))).await;
    assert!(matches!(big.recv().await, Some(Packet::ConnAck(_))));
    big.send_raw(&vec![0u8; 4096]).await;
    assert!(big.recv_within(Duration::from_secs(5)).await.unwrap().is_none(), "oversized: closed");
    // Ping/pong: a client's ping is answered.
    let mut request = format!("ws://{ws}/mqtt").into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    let tcp = TcpStream::connect(ws).await.unwrap();
    let (mut pinger, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    pinger.send(Message::Ping(bytes::Bytes::from_static(b"hi"))).await.unwrap();
    let mut connect = bytes::BytesMut::new();
    mqgate::mqtt::codec::encode(
        &Packet::Connect(Box::new(connect_packet(V5, &unique("p")))),
        V5,
        &mut connect,
    )
    .unwrap();
    pinger.send(Message::Binary(connect.freeze())).await.unwrap();
    use futures::StreamExt;
    let mut saw_pong = false;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), pinger.next()).await {
        match m {
            Message::Pong(p) if &p[..] == b"hi" => saw_pong = true,
            Message::Binary(_) => break,
            _ => {}
        }
    }
    assert!(saw_pong, "no pong for the ping");
    let m = metrics(&app).await;
    for reason in ["ws_wrong_path", "ws_no_subprotocol", "ws_origin"] {
        assert!(m.contains(&format!("reason=\"{reason}\"")), "{reason} not counted:\n{m}");
    }
    app.stop().await;
}

#[tokio::test]
async fn proxy_protocol_headers_are_required_and_understood() {
    let listeners = "    - kind: tcp\n      name: lb\n      listen: \"127.0.0.1:0\"\n      proxy_protocol: true\n";
    let app = gateway(&yaml(listeners, "")).await;
    let lb = app.listener_addr("lb").unwrap();
    // v1
    let mut c = RawClient::tcp(lb, V5).await;
    c.send_raw(b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 1883\r\n").await;
    c.send(&Packet::Connect(Box::new(connect_packet(V5, &unique("v1"))))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    // v2
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[203, 0, 113, 8, 198, 51, 100, 1, 0x9c, 0x40, 0x07, 0x5b]);
    let mut c = RawClient::tcp(lb, V5).await;
    c.send_raw(&v2).await;
    c.send(&Packet::Connect(Box::new(connect_packet(V5, &unique("v2"))))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    // No header: closed, counted.
    let mut c = RawClient::tcp(lb, V5).await;
    c.send(&Packet::Connect(Box::new(connect_packet(V5, &unique("none"))))).await;
    assert!(c.recv_within(Duration::from_secs(5)).await.unwrap().is_none());
    assert!(metrics(&app).await.contains("reason=\"proxy_header\""));
    // mqtt.listen itself is unaffected.
    RawClient::connect(app.mqtt_addr, V5, &unique("direct")).await;
    app.stop().await;
}

#[test]
fn tls_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cfg");
    let server = ca.server("server");
    let other = ca.server("other");
    let check = |listener: &str| {
        let y = yaml(listener, "");
        match mqgate::config::Config::parse(Path::new("mqgate.yaml"), &y) {
            Ok(_) => panic!("accepted:\n{y}"),
            Err(e) => e.to_string(),
        }
    };
    let missing = Pair { cert: dir.path().join("nope.pem"), key: server.key.clone() };
    let e = check(&tls_listener("tls", "a", &missing, ""));
    assert!(
        e.starts_with("mqgate.yaml:9:") && e.contains("tls.cert") && e.contains("nope.pem"),
        "{e}"
    );
    let mismatched = Pair { cert: server.cert.clone(), key: other.key.clone() };
    let e = check(&tls_listener("tls", "a", &mismatched, ""));
    assert!(e.starts_with("mqgate.yaml:10:") && e.contains("tls.key"), "{e}");
    let e = check(&tls_listener("tls", "a", &server, "        require_client_cert: true\n"));
    assert!(e.starts_with("mqgate.yaml:11:") && e.contains("client_ca"), "{e}");
    let e = check("    - kind: tls\n      listen: \"127.0.0.1:0\"\n");
    assert!(e.contains("needs `tls:"), "{e}");
}

/// Starts `mqgate run` on a config with a TLS listener whose files are `server`.
async fn binary_with_tls(
    dir: &Path,
    server: &Pair,
) -> (tokio::process::Child, SocketAddr, SocketAddr) {
    let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (mqtt, tls, admin) = (free(), free(), free());
    let y = format!(
        "mqtt:\n  listen: \"{mqtt}\"\n  listeners:\n    - kind: tls\n      name: tls\n      listen: \"{tls}\"\n      \
         tls:\n        cert: server.pem\n        key: server.key\nadmin:\n  listen: \"{admin}\"\n"
    );
    assert!(server.cert.starts_with(dir), "relative file names resolve to the config's folder");
    let path = dir.join("mqgate.yaml");
    std::fs::write(&path, y).unwrap();
    let log = std::fs::File::create(dir.join("mqgate.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if TcpStream::connect(tls).await.is_ok() {
            return (child, tls, admin);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("mqgate did not listen on {tls}");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_keeps_established_connections() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new(dir.path(), "old");
    let new_ca = Ca::new(dir.path(), "new");
    let server = old_ca.server("server");
    let (child, tls, admin) = binary_with_tls(dir.path(), &server).await;
    let pid = child.id().unwrap().to_string();
    let (mut old_conn, ack) = tls_mqtt(tls, &old_ca.pem, None, &unique("old"), None).await;
    assert_eq!(connack_code(&ack), Some(ReasonCode::SUCCESS));
    // New files in place, then SIGHUP.
    new_ca.server("server");
    let kill = std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    assert!(kill.success());
    let mut switched = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if tls_connect(tls, &new_ca.pem, None).await.is_ok() {
            switched = true;
            break;
        }
    }
    assert!(switched, "a new connection sees the new certificate after SIGHUP");
    assert!(tls_connect(tls, &old_ca.pem, None).await.is_err(), "the old certificate is gone");
    // The established connection keeps publishing.
    old_conn.publish("kept/alive", QoS::AtLeastOnce, 3, b"x").await;
    assert!(matches!(old_conn.recv().await, Some(Packet::PubAck(a)) if a.code.is_success()));
    // A bad file keeps the current certificate, logged and counted.
    std::fs::write(dir.path().join("server.pem"), "not a certificate").unwrap();
    std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tls_connect(tls, &new_ca.pem, None).await.is_ok(), "still the new certificate");
    let (_, m) = http_get(admin, "/metrics").await.unwrap();
    assert!(metric_value(&m, "mqgate_tls_reload_errors_total") >= 1.0, "{m}");
    drop(child);
}

/// A TLS-terminating proxy in front of the machine's RabbitMQ (127.0.0.1:5672), with a server
/// certificate from `server`: what a hosted RabbitMQ on 5671 looks like to mqgate.
async fn amqps_proxy(server: &Pair) -> SocketAddr {
    let chain: Vec<_> =
        CertificateDer::pem_file_iter(&server.cert).unwrap().map(|c| c.unwrap()).collect();
    let key = PrivateKeyDer::from_pem_file(&server.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut rabbit) = TcpStream::connect("127.0.0.1:5672").await else { return };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut rabbit).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn amqps_forwards_qos1_through_tls_and_refuses_an_untrusted_broker() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "rabbit");
    let other = Ca::new(dir.path(), "other");
    let proxy = amqps_proxy(&ca.server("rabbit-server")).await;
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "tls.#").await;
    let rules = format!(
        "  - name: r1\n    from: \"tls/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{exchange}\"\n"
    );
    let with_ca = |ca: &Path| {
        config_rules("", &rules).replace(
            &format!("    url: \"{AMQP_URL}\"\n"),
            &format!(
                "    url: \"amqps://guest:guest@localhost:{}/%2f\"\n    tls:\n      ca: \"{}\"\n",
                proxy.port(),
                ca.display()
            ),
        )
    };
    let app = gateway(&with_ca(&ca.pem)).await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, &unique("amqps")).await;
    c.publish("tls/a", QoS::AtLeastOnce, 1, b"through TLS").await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert!(a.code.is_success(), "{a:?}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let d = get(&ch, &queue, Duration::from_secs(5)).await.expect("the message reached RabbitMQ");
    assert_eq!(d.data, b"through TLS");
    app.stop().await;

    // A broker whose certificate the configured CA did not sign: never connected, and
    // /readyz says why.
    let app = gateway(&with_ca(&other.pem)).await;
    let mut body = String::new();
    for _ in 0..50 {
        let (status, b) = http_get(app.admin_addr, "/readyz").await.unwrap();
        assert_eq!(status, 503, "{b}");
        body = b;
        if body.contains("TLS handshake") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        body.contains("amqp rabbit: disconnected (TLS handshake with the broker failed"),
        "{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn amqp10_over_amqps_forwards_qos1_and_refuses_an_untrusted_broker() {
    // The AMQP 1.0 target over TLS: the same TLS-terminating proxy in front of the machine's
    // RabbitMQ (whose rabbitmq_amqp1_0 plugin scripts/test.sh enables).
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "rabbit10");
    let other = Ca::new(dir.path(), "other10");
    let proxy = amqps_proxy(&ca.server("rabbit10-server")).await;
    let conn = rabbit().await;
    let q = unique("amqp10-tls");
    let _guard = delete_queues_on_drop(&[&q]);
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        q.as_str().into(),
        lapin::options::QueueDeclareOptions { durable: true, ..Default::default() },
        lapin::types::FieldTable::default(),
    )
    .await
    .unwrap();
    let yaml = |ca: &Path| {
        format!(
            "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\namqp10:\n  rabbit:\n    url: \"amqps://guest:guest@localhost:{}\"\n    reconnect_max: 300ms\n    tls:\n      ca: \"{}\"\nrules:\n  - name: r\n    from: \"tls10/#\"\n    to:\n      - amqp10: {{ broker: rabbit, address: \"/amq/queue/{q}\" }}\n",
            proxy.port(),
            ca.display()
        )
    };
    let app = gateway(&yaml(&ca.pem)).await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, &unique("amqps10")).await;
    c.publish("tls10/a", QoS::AtLeastOnce, 1, b"AMQP 1.0 through TLS").await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert!(a.code.is_success(), "{a:?}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let d = get(&ch, &q, Duration::from_secs(5)).await.expect("the message reached RabbitMQ");
    assert!(
        d.data.windows(20).any(|w| w == b"AMQP 1.0 through TLS"),
        "the payload is in the AMQP 1.0 message body: {:?}",
        String::from_utf8_lossy(&d.data)
    );
    app.stop().await;

    // A broker certificate the configured CA did not sign: never connected, /readyz says so.
    let app = gateway(&yaml(&other.pem)).await;
    let mut body = String::new();
    for _ in 0..50 {
        let (status, b) = http_get(app.admin_addr, "/readyz").await.unwrap();
        assert_eq!(status, 503, "{b}");
        body = b;
        if body.contains("amqp10 rabbit") && body.to_lowercase().contains("certificate") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        body.contains("amqp10 rabbit") && body.to_lowercase().contains("certificate"),
        "{body}"
    );
    app.stop().await;
}
