//! Helpers shared by the integration tests: a gateway on port 0, a real RabbitMQ connection,
//! and a raw MQTT client built on mqgate's own codec (so tests see every byte's meaning,
//! including reason codes that high-level clients hide).
#![allow(dead_code)] // not every helper is used by every test module

pub mod certs;
pub mod kafka_front;
pub mod mosquitto;
pub mod proxy;
pub mod rabbit_node;
pub mod webhook;

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use mqgate::app::App;
use mqgate::config::Config;
use mqgate::mqtt::codec::{
    self, Connect, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode,
    SubscribeFilter, SubscriptionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{}-{nanos:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Connects to the machine's RabbitMQ; fails the test with a clear message when it is down.
pub async fn rabbit() -> Connection {
    match tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(AMQP_URL, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "RabbitMQ is not reachable at 127.0.0.1:5672 ({e}); run scripts/test.sh, which starts it"
        ),
        Err(_) => panic!("RabbitMQ at 127.0.0.1:5672 did not answer within 10 s"),
    }
}

/// Deletes queues a test created that RabbitMQ would otherwise keep (durable or job queues,
/// mqgate's last-value queues) when it is dropped: at the end of the test, and also while a
/// failed assertion unwinds. Create it right after choosing the names, before the gateway,
/// so the gateway (declared later, dropped earlier) is gone first.
#[must_use = "the queues are deleted when the guard is dropped"]
pub struct DeleteQueues(Vec<String>);

/// A [`DeleteQueues`] guard for `names`.
pub fn delete_queues_on_drop<S: AsRef<str>>(names: &[S]) -> DeleteQueues {
    DeleteQueues(names.iter().map(|n| n.as_ref().to_owned()).collect())
}

impl Drop for DeleteQueues {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        // Its own connection on its own thread and runtime: works from any runtime flavour,
        // inside a panic, and whatever state the test left its own channels in.
        let worker = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async move {
                let connect = Connection::connect(AMQP_URL, ConnectionProperties::default());
                let Ok(Ok(conn)) = tokio::time::timeout(Duration::from_secs(10), connect).await
                else {
                    eprintln!("could not connect to RabbitMQ to delete test queues {names:?}");
                    return;
                };
                for name in &names {
                    // A channel each: a failed delete closes its channel.
                    let deleted = match conn.create_channel().await {
                        Ok(ch) => ch
                            .queue_delete(
                                ShortString::from(name.as_str()),
                                QueueDeleteOptions::default(),
                            )
                            .await
                            .map(|_| ()),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = deleted {
                        eprintln!("could not delete test queue {name}: {e}");
                    }
                }
                let _ = conn.close(200, ShortString::from("test cleanup")).await;
            });
        });
        let _ = worker.join();
    }
}

/// A topic exchange (auto-delete) with an exclusive queue bound to it with `binding`.
pub async fn exchange_with_queue(conn: &Connection, binding: &str) -> (Channel, String, String) {
    let ch = conn.create_channel().await.expect("channel");
    let exchange = unique("mqgate-test-x");
    let queue = unique("mqgate-test-q");
    ch.exchange_declare(
        ShortString::from(exchange.as_str()),
        ExchangeKind::Topic,
        ExchangeDeclareOptions { auto_delete: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .expect("declare exchange");
    ch.queue_declare(
        ShortString::from(queue.as_str()),
        QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .expect("declare queue");
    ch.queue_bind(
        ShortString::from(queue.as_str()),
        ShortString::from(exchange.as_str()),
        ShortString::from(binding),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind queue");
    (ch, exchange, queue)
}

/// Takes the next message from `queue`, waiting up to `wait`.
pub async fn get(ch: &Channel, queue: &str, wait: Duration) -> Option<lapin::message::Delivery> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let got = ch
            .basic_get(ShortString::from(queue), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        if let Some(m) = got {
            return Some(m.delivery);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A header value as a string (long or short string) or integer, for assertions.
pub fn header(d: &lapin::message::Delivery, name: &str) -> Option<String> {
    let headers = d.properties.headers().as_ref()?;
    let v = headers.inner().get(name)?;
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    })
}

/// Starts a gateway from YAML (listen addresses should use port 0).
pub async fn gateway(yaml: &str) -> App {
    let config = Config::parse(Path::new("test.yaml"), yaml)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
    App::start(config).await.expect("gateway starts")
}

/// Starts a gateway on a store a stopped one used (its writer thread may take a moment to
/// let go of the file lock after the last handle is dropped).
pub async fn gateway_on_store(yaml: &str) -> mqgate::app::App {
    let config = Config::parse(Path::new("test.yaml"), yaml).expect("valid config");
    for _ in 0..100 {
        match mqgate::app::App::start(config.clone()).await {
            Ok(app) => return app,
            Err(e) if e.to_string().contains("locked") => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("gateway starts: {e:#}"),
        }
    }
    panic!("the store stayed locked after the gateway stopped");
}

/// A gateway config on port 0 with the local RabbitMQ as broker `rabbit`, extra `mqtt:` lines
/// (indented two spaces, each ending in a newline) and `rules` (a YAML list, unindented).
pub fn config_rules(extra_mqtt: &str, rules: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n{extra_mqtt}admin:\n  listen: \"127.0.0.1:0\"\namqp:\n  rabbit:\n    url: \"{AMQP_URL}\"\nrules:\n{rules}"
    )
}

/// A gateway config with one rule from `filter` to `exchange` on the local RabbitMQ.
pub fn config_one_rule(filter: &str, exchange: &str, extra_mqtt: &str) -> String {
    config_rules(
        extra_mqtt,
        &format!(
            "  - name: r1\n    from: \"{filter}\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{exchange}\"\n"
        ),
    )
}

/// Waits until `/readyz` answers 200 (every AMQP broker connected).
pub async fn wait_ready(app: &App) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok((200, _)) = http_get(app.admin_addr, "/readyz").await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "gateway not ready within 15 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A minimal HTTP/1.0 GET; returns the status and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// A minimal HTTP/1.0 JSON POST with an optional `Authorization` value; returns the status,
/// the response head and the body.
pub async fn post(
    addr: std::net::SocketAddr,
    path: &str,
    authorization: Option<&str>,
    body: &str,
) -> (u16, String, String) {
    let auth = authorization.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_http(addr, &request).await
}

/// One raw HTTP/1.0 request as written; (status, response head, body).
pub async fn raw_http(addr: std::net::SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_owned(), body.to_owned())
}

/// What a raw client talks over: TCP, TLS or a WebSocket.
pub trait RawIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawIo for T {}

/// A raw MQTT client on mqgate's codec.
pub struct RawClient {
    pub stream: Box<dyn RawIo>,
    pub version: ProtocolVersion,
    buf: BytesMut,
}

impl RawClient {
    /// Opens a TCP connection without sending anything.
    pub async fn tcp(addr: std::net::SocketAddr, version: ProtocolVersion) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect to gateway");
        RawClient::over(stream, version)
    }

    /// A client over an already open stream (TLS, WebSocket), nothing sent yet.
    pub fn over(stream: impl RawIo + 'static, version: ProtocolVersion) -> RawClient {
        RawClient { stream: Box::new(stream), version, buf: BytesMut::new() }
    }

    /// Connects and expects a successful CONNACK.
    pub async fn connect(
        addr: std::net::SocketAddr,
        version: ProtocolVersion,
        id: &str,
    ) -> RawClient {
        let mut c = RawClient::tcp(addr, version).await;
        c.send(&Packet::Connect(Box::new(connect_packet(version, id)))).await;
        match c.recv().await {
            Some(Packet::ConnAck(a)) => assert!(a.code.is_success(), "CONNACK refused: {a:?}"),
            other => panic!("expected CONNACK, got {other:?}"),
        }
        c
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        codec::encode(p, self.version, &mut out).expect("encode");
        self.send_raw(&out).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        // TLS and WebSocket streams buffer (a TCP stream: no-op).
        self.stream.flush().await.expect("flush");
    }

    /// The next packet within 10 s; `None` if the server closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(Duration::from_secs(10)).await.expect("no packet within the timeout")
    }

    /// `Err(())` on timeout, `Ok(None)` on close.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = codec::decode(&mut self.buf, Some(self.version), 1 << 24)
                .expect("server sent a malformed packet")
            {
                return Ok(Some(p));
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await;
            match read {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    pub async fn publish(&mut self, topic: &str, qos: QoS, packet_id: u16, payload: &[u8]) {
        self.send(&Packet::Publish(publish_packet(topic, qos, packet_id, payload))).await;
    }

    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Vec<ReasonCode> {
        self.send(&Packet::Subscribe(Box::new(codec::Subscribe {
            packet_id: 1,
            filters: vec![SubscribeFilter {
                filter: filter.into(),
                options: SubscriptionOptions { qos, ..Default::default() },
            }],
            properties: Properties::default(),
        })))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(s)) => s.codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
}

pub fn connect_packet(version: ProtocolVersion, id: &str) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

pub fn publish_packet(topic: &str, qos: QoS, packet_id: u16, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: mqgate::mqtt::codec::PublishProperties::none(),
        payload: Bytes::copy_from_slice(payload),
    }
}

/// Publishes at QoS 1 and waits for the PUBACK.
pub async fn publish_qos1(c: &mut RawClient, topic: &str, id: u16, payload: &[u8]) {
    c.publish(topic, QoS::AtLeastOnce, id, payload).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, id),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// The next packet, which must be a PUBLISH.
pub async fn expect_publish(c: &mut RawClient) -> Publish {
    match c.recv().await {
        Some(Packet::Publish(p)) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

/// Asserts the next packet is a DISCONNECT with reason `code`, and returns it.
pub async fn expect_disconnect(c: &mut RawClient, code: ReasonCode) -> Disconnect {
    match c.recv().await {
        Some(Packet::Disconnect(d)) if d.code == code => *d,
        other => panic!("expected DISCONNECT {:#04x}, got {other:?}", code.0),
    }
}

/// Asserts nothing arrives within `wait`.
pub async fn expect_silence(c: &mut RawClient, wait: Duration) {
    match c.recv_within(wait).await {
        Err(()) => {}
        Ok(p) => panic!("expected nothing, got {p:?}"),
    }
}

/// The gateway's `/metrics` text.
pub async fn metrics(app: &App) -> String {
    http_get(app.admin_addr, "/metrics").await.expect("metrics").1
}
