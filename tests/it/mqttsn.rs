//! The MQTT-SN gateway (`mqttsn:`) end to end: a test client speaking the MQTT-SN 1.2 message
//! formats over UDP (encoded with mqgate's own MQTT-SN codec, whose bytes are checked against
//! the specification's formats in `src/mqttsn/codec/tests.rs`), a real MQTT client on the
//! other side, the machine's RabbitMQ behind the rules, and the third-party `mqtt-sn-12`
//! client from PyPI (installed by scripts/lib.sh `ensure_mqttsn_client`).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqgate::app::App;
use mqgate::mqtt::codec::{Packet as MqttPacket, ProtocolVersion, QoS};
use mqgate::mqttsn::codec::{
    self, Connect, Packet, Publish, ReturnCode, SnQos, Subscribe, TopicRef, TopicSpec, WillTopic,
};
use tokio::net::UdpSocket;

use crate::support::{
    config_rules, exchange_with_queue, expect_publish, gateway, get, metrics, rabbit, unique,
    wait_ready, RawClient, AMQP_URL,
};

const V311: ProtocolVersion = ProtocolVersion::V311;

/// A test client: one UDP socket, the MQTT-SN codec.
struct Sn {
    sock: UdpSocket,
    gw: SocketAddr,
}

impl Sn {
    async fn new(gw: SocketAddr) -> Sn {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        Sn { sock, gw }
    }

    async fn send(&self, p: &Packet) {
        let mut out = BytesMut::new();
        codec::encode(p, &mut out).expect("encode");
        self.sock.send_to(&out, self.gw).await.expect("send");
    }

    async fn send_raw(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.gw).await.expect("send");
    }

    /// The next message within `wait`, `None` on timeout.
    async fn recv_within(&self, wait: Duration) -> Option<Packet> {
        let mut buf = vec![0u8; 65_536];
        let (n, _) = tokio::time::timeout(wait, self.sock.recv_from(&mut buf)).await.ok()?.ok()?;
        Some(
            codec::decode(&Bytes::copy_from_slice(&buf[..n])).expect("gateway sent a bad datagram"),
        )
    }

    async fn recv(&self) -> Packet {
        self.recv_within(Duration::from_secs(10)).await.expect("no datagram within 10 s")
    }

    async fn silence(&self, wait: Duration) {
        if let Some(p) = self.recv_within(wait).await {
            panic!("expected nothing, got {p:?}");
        }
    }

    /// CONNECT (clean session, no will) and its CONNACK's code.
    async fn connect_as(&self, id: &str, duration: u16, clean: bool) -> ReturnCode {
        let c = Connect { will: false, clean_session: clean, duration, client_id: id.into() };
        self.send(&Packet::Connect(c)).await;
        match self.recv().await {
            Packet::ConnAck { code } => code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn connect(gw: SocketAddr, id: &str) -> Sn {
        let c = Sn::new(gw).await;
        assert_eq!(c.connect_as(id, 60, true).await, ReturnCode::ACCEPTED);
        c
    }

    /// REGISTER `topic`: its id.
    async fn register(&self, topic: &str, msg_id: u16) -> u16 {
        self.send(&Packet::Register { topic_id: 0, msg_id, topic_name: topic.into() }).await;
        match self.recv().await {
            Packet::RegAck { topic_id, msg_id: m, code } => {
                assert_eq!((m, code), (msg_id, ReturnCode::ACCEPTED));
                topic_id
            }
            other => panic!("expected REGACK, got {other:?}"),
        }
    }

    async fn publish(&self, qos: SnQos, topic: TopicRef, msg_id: u16, data: &[u8]) {
        let p = Publish {
            dup: false,
            qos,
            retain: false,
            topic,
            msg_id,
            data: Bytes::copy_from_slice(data),
        };
        self.send(&Packet::Publish(p)).await;
    }

    /// SUBSCRIBE: the SUBACK's topic id and code.
    async fn subscribe(&self, topic: TopicSpec, qos: SnQos, msg_id: u16) -> (u16, ReturnCode) {
        self.send(&Packet::Subscribe(Subscribe { dup: false, qos, msg_id, topic })).await;
        match self.recv().await {
            Packet::SubAck { topic_id, msg_id: m, code, .. } => {
                assert_eq!(m, msg_id);
                (topic_id, code)
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next PUBLISH, answering the REGISTERs before it; its topic name and the message.
    async fn expect_publish(&self, names: &mut std::collections::HashMap<u16, String>) -> Publish {
        loop {
            match self.recv().await {
                Packet::Register { topic_id, msg_id, topic_name } => {
                    names.insert(topic_id, topic_name);
                    let ack = Packet::RegAck { topic_id, msg_id, code: ReturnCode::ACCEPTED };
                    self.send(&ack).await;
                }
                Packet::Publish(p) => return p,
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
    }
}

/// Waits (up to 10 s) until `/metrics` has `line`.
async fn wait_metric(app: &App, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(app).await;
        if text.contains(line) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{line} not in /metrics:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn puback(p: Packet) -> (u16, u16, ReturnCode) {
    match p {
        Packet::PubAck { topic_id, msg_id, code } => (topic_id, msg_id, code),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// A gateway with an MQTT-SN listener; `sn` is extra `mqttsn:` lines (indented 2 spaces).
async fn sn_gateway(sn: &str, rest: &str) -> App {
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nmqttsn:\n  listen: \"127.0.0.1:0\"\n  predefined_topics:\n    7: \"sn/predefined\"\n{sn}{rest}"
    );
    gateway(&yaml).await
}

fn sn_addr(app: &App) -> SocketAddr {
    app.mqttsn_addr.expect("MQTT-SN listener")
}

async fn mqtt_sub(app: &App, filter: &str, qos: QoS) -> RawClient {
    let mut m = RawClient::connect(app.mqtt_addr, V311, &unique("sub")).await;
    let codes = m.subscribe(filter, qos).await;
    assert_eq!(codes[0].0, qos as u8);
    m
}

#[tokio::test]
async fn mqttsn_publishes_reach_an_mqtt_subscriber_at_every_qos_and_topic_kind() {
    let app = sn_gateway("", "").await;
    let mut m = mqtt_sub(&app, "#", QoS::AtMostOnce).await;
    let client_id = unique("sn-pub");
    let c = Sn::connect(sn_addr(&app), &client_id).await;
    let id = c.register("sn/a/b", 1).await;
    assert_ne!(id, 0);
    assert_eq!(c.register("sn/a/b", 2).await, id, "the same topic keeps its id");

    c.publish(SnQos::Zero, TopicRef::Normal(id), 0, b"q0").await;
    let p = expect_publish(&mut m).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("sn/a/b", &b"q0"[..]));

    c.publish(SnQos::One, TopicRef::Normal(id), 10, b"q1").await;
    assert_eq!(puback(c.recv().await), (id, 10, ReturnCode::ACCEPTED));
    let p = expect_publish(&mut m).await;
    assert_eq!(&p.payload[..], b"q1");

    c.publish(SnQos::Two, TopicRef::Predefined(7), 11, b"q2").await;
    assert_eq!(c.recv().await, Packet::PubRec { msg_id: 11 });
    // Its PUBREC lost, the client sends it again before PUBREL: PUBREC again, not routed again
    // (the subscriber gets it once, below).
    let again = Publish {
        dup: true,
        qos: SnQos::Two,
        retain: false,
        topic: TopicRef::Predefined(7),
        msg_id: 11,
        data: Bytes::from_static(b"q2"),
    };
    c.send(&Packet::Publish(again)).await;
    assert_eq!(c.recv().await, Packet::PubRec { msg_id: 11 });
    c.send(&Packet::PubRel { msg_id: 11 }).await;
    assert_eq!(c.recv().await, Packet::PubComp { msg_id: 11 });
    let p = expect_publish(&mut m).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("sn/predefined", &b"q2"[..]));

    c.publish(SnQos::One, TopicRef::Short(*b"ab"), 12, b"short").await;
    assert_eq!(puback(c.recv().await), (u16::from_be_bytes(*b"ab"), 12, ReturnCode::ACCEPTED));
    let p = expect_publish(&mut m).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("ab", &b"short"[..]));

    // An id nobody registered: PUBACK 0x02 at any QoS; nothing is routed.
    c.publish(SnQos::One, TopicRef::Normal(999), 13, b"x").await;
    assert_eq!(puback(c.recv().await), (999, 13, ReturnCode::INVALID_TOPIC_ID));
    c.publish(SnQos::Zero, TopicRef::Predefined(8), 0, b"x").await;
    assert_eq!(puback(c.recv().await).2, ReturnCode::INVALID_TOPIC_ID);

    // The admin API says what the client speaks.
    let (status, body) =
        crate::support::http_get(app.admin_addr, &format!("/api/v1/clients?search={client_id}"))
            .await
            .expect("api");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"protocol\": \"MQTT-SN 1.2\""), "{body}");

    // PINGREQ / PINGRESP; DISCONNECT is answered.
    c.send(&Packet::PingReq { client_id: None }).await;
    assert_eq!(c.recv().await, Packet::PingResp);
    c.send(&Packet::Disconnect { duration: None }).await;
    assert_eq!(c.recv().await, Packet::Disconnect { duration: None });
    app.stop().await;
}

#[tokio::test]
async fn mqtt_publishes_reach_an_mqttsn_subscriber_registered_first() {
    let app = sn_gateway("  max_inflight: 4\n", "").await;
    let mut m = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    // A retained message before the subscription.
    m.send(&MqttPacket::Publish(mqgate::mqtt::codec::Publish {
        retain: true,
        ..crate::support::publish_packet("sn/ret", QoS::AtMostOnce, 0, b"kept")
    }))
    .await;
    let c = Sn::connect(sn_addr(&app), &unique("sn-sub")).await;
    let mut names = std::collections::HashMap::new();

    // A wildcard filter: SUBACK topic id 0; each concrete topic is REGISTERed before it is
    // delivered on.
    let (tid, code) = c.subscribe(TopicSpec::Name("sn/+/x".into()), SnQos::One, 1).await;
    assert_eq!((tid, code), (0, ReturnCode::ACCEPTED));
    crate::support::publish_qos1(&mut m, "sn/a/x", 1, b"one").await;
    let p = c.expect_publish(&mut names).await;
    let TopicRef::Normal(id) = p.topic else { panic!("a registered id, got {:?}", p.topic) };
    assert_eq!(names.get(&id).map(String::as_str), Some("sn/a/x"));
    assert_eq!((p.qos, &p.data[..]), (SnQos::One, &b"one"[..]));
    c.send(&Packet::PubAck { topic_id: id, msg_id: p.msg_id, code: ReturnCode::ACCEPTED }).await;
    // The same topic again: no second REGISTER.
    crate::support::publish_qos1(&mut m, "sn/a/x", 2, b"two").await;
    match c.recv().await {
        Packet::Publish(p) => {
            assert_eq!(p.topic, TopicRef::Normal(id));
            c.send(&Packet::PubAck { topic_id: id, msg_id: p.msg_id, code: ReturnCode::ACCEPTED })
                .await;
        }
        other => panic!("expected PUBLISH without REGISTER, got {other:?}"),
    }

    // A topic name: its id comes in the SUBACK; the retained message follows, RETAIN set.
    let (tid, code) = c.subscribe(TopicSpec::Name("sn/ret".into()), SnQos::Zero, 2).await;
    assert_eq!(code, ReturnCode::ACCEPTED);
    assert_ne!(tid, 0);
    match c.recv().await {
        Packet::Publish(p) => {
            assert_eq!(
                (p.topic, p.retain, &p.data[..]),
                (TopicRef::Normal(tid), true, &b"kept"[..])
            )
        }
        other => panic!("expected the retained PUBLISH, got {other:?}"),
    }

    // A predefined id and a short name: delivered by them, no REGISTER.
    assert_eq!(
        c.subscribe(TopicSpec::Predefined(7), SnQos::Zero, 3).await,
        (7, ReturnCode::ACCEPTED)
    );
    assert_eq!(
        c.subscribe(TopicSpec::Predefined(99), SnQos::Zero, 4).await.1,
        ReturnCode::INVALID_TOPIC_ID
    );
    assert_eq!(c.subscribe(TopicSpec::Short(*b"zz"), SnQos::Zero, 5).await.1, ReturnCode::ACCEPTED);
    m.publish("sn/predefined", QoS::AtMostOnce, 0, b"pre").await;
    match c.recv().await {
        Packet::Publish(p) => {
            assert_eq!((p.topic, &p.data[..]), (TopicRef::Predefined(7), &b"pre"[..]))
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    m.publish("zz", QoS::AtMostOnce, 0, b"z").await;
    match c.recv().await {
        Packet::Publish(p) => {
            assert_eq!((p.topic, &p.data[..]), (TopicRef::Short(*b"zz"), &b"z"[..]))
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }

    // QoS 2 to the client: PUBREC → PUBREL → PUBCOMP.
    assert_eq!(
        c.subscribe(TopicSpec::Name("q2/t".into()), SnQos::Two, 6).await.1,
        ReturnCode::ACCEPTED
    );
    m.send(&MqttPacket::Publish(crate::support::publish_packet(
        "q2/t",
        QoS::ExactlyOnce,
        9,
        b"x2",
    )))
    .await;
    let p = match c.recv().await {
        Packet::Publish(p) => p,
        other => panic!("expected PUBLISH, got {other:?}"),
    };
    assert_eq!(p.qos, SnQos::Two);
    c.send(&Packet::PubRec { msg_id: p.msg_id }).await;
    assert_eq!(c.recv().await, Packet::PubRel { msg_id: p.msg_id });
    c.send(&Packet::PubComp { msg_id: p.msg_id }).await;

    // UNSUBSCRIBE: nothing more on it.
    c.send(&Packet::Unsubscribe { msg_id: 7, topic: TopicSpec::Name("sn/+/x".into()) }).await;
    assert_eq!(c.recv().await, Packet::UnsubAck { msg_id: 7 });
    m.publish("sn/b/x", QoS::AtMostOnce, 0, b"gone").await;
    c.silence(Duration::from_millis(300)).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqttsn_qos1_is_acknowledged_only_after_rabbitmq_confirmed() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let proxy = crate::support::proxy::Proxy::start().await;
    let yaml = config_rules(
        "",
        &format!(
            "  - name: sn\n    from: \"sn/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{exchange}\"\n"
        ),
    )
    .replace(AMQP_URL, &proxy.url())
    .replace("    url:", "    reconnect_min: 50ms\n    reconnect_max: 200ms\n    url:")
    .replace("amqp:\n  rabbit", "mqttsn:\n  listen: \"127.0.0.1:0\"\namqp:\n  rabbit");
    let app = gateway(&yaml).await;
    wait_ready(&app).await;
    let c = Sn::connect(sn_addr(&app), &unique("sn-amqp")).await;
    let id = c.register("sn/amqp", 1).await;

    c.publish(SnQos::One, TopicRef::Normal(id), 1, b"confirmed").await;
    assert_eq!(puback(c.recv().await), (id, 1, ReturnCode::ACCEPTED));
    let d = get(&ch, &queue, Duration::from_secs(5)).await.expect("in RabbitMQ");
    assert_eq!(d.data, b"confirmed");

    // Confirms held back: no PUBACK while RabbitMQ has not confirmed.
    proxy.pause_to_client.send_replace(true);
    c.publish(SnQos::One, TopicRef::Normal(id), 2, b"held").await;
    c.silence(Duration::from_millis(800)).await;
    proxy.pause_to_client.send_replace(false);
    assert_eq!(puback(c.recv().await), (id, 2, ReturnCode::ACCEPTED));
    let d = get(&ch, &queue, Duration::from_secs(5)).await.expect("in RabbitMQ");
    assert_eq!(d.data, b"held");

    // The connection lost before the confirm: a retryable failure is PUBACK 0x01
    // (congestion: send again later), never accepted.
    proxy.pause_to_client.send_replace(true);
    c.publish(SnQos::One, TopicRef::Normal(id), 3, b"lost").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.cut();
    assert_eq!(puback(c.recv().await), (id, 3, ReturnCode::CONGESTION));
    proxy.restore();
    wait_ready(&app).await;
    let mut again = Publish {
        dup: true,
        qos: SnQos::One,
        retain: false,
        topic: TopicRef::Normal(id),
        msg_id: 3,
        data: Bytes::from_static(b"lost"),
    };
    c.send(&Packet::Publish(again.clone())).await;
    assert_eq!(puback(c.recv().await), (id, 3, ReturnCode::ACCEPTED));
    let d = get(&ch, &queue, Duration::from_secs(5)).await.expect("the resend is in RabbitMQ");
    assert_eq!(d.data, b"lost");
    // The first copy may have reached the queue before the connection was cut (at least
    // once): take it too.
    while get(&ch, &queue, Duration::from_millis(500)).await.is_some() {}
    // Its PUBACK lost, the client sends it again (DUP): acknowledged again, not routed again.
    again.data = Bytes::from_static(b"lost");
    c.send(&Packet::Publish(again)).await;
    assert_eq!(puback(c.recv().await), (id, 3, ReturnCode::ACCEPTED));
    assert!(get(&ch, &queue, Duration::from_millis(500)).await.is_none(), "not routed twice");
    app.stop().await;
}

#[tokio::test]
async fn bad_datagrams_are_answered_or_dropped_and_counted_and_the_gateway_goes_on() {
    let app = sn_gateway("  max_datagram_size: 64\n", "").await;
    let c = Sn::new(sn_addr(&app)).await;
    c.send_raw(&[]).await; // empty
    c.send_raw(&[0x05, 0x16]).await; // length says 5, 2 came
    c.send_raw(&[0x02, 0x03]).await; // unknown type
    c.send_raw(&[0x06, 0x0C, 0x20, 0x00]).await; // length disagreeing
    c.send_raw(&[0x03, 0x0E, 0x01]).await; // PUBCOMP of 1 octet
    c.send_raw(&[0x07, 0x04, 0x04, 0x02, 0, 30, b'c']).await; // CONNECT, protocol id 2
    let mut big = vec![0x01, 0x00, 100, 0x0C];
    big.resize(100, 0);
    c.send_raw(&big).await; // oversized
    c.silence(Duration::from_millis(200)).await;
    // A message that needs a connection, from an address without one: DISCONNECT.
    c.publish(SnQos::One, TopicRef::Normal(1), 1, b"x").await;
    assert_eq!(c.recv().await, Packet::Disconnect { duration: None });
    // The gateway goes on, and a connected client's bad datagrams are counted too.
    assert_eq!(c.connect_as(&unique("after-bad"), 60, true).await, ReturnCode::ACCEPTED);
    c.send_raw(&[0x04, 0x0C, 0x03, 0x00]).await;
    c.send_raw(&[0x02, 0xF0]).await;
    c.send(&Packet::PingReq { client_id: None }).await;
    assert_eq!(c.recv().await, Packet::PingResp);
    let text = metrics(&app).await;
    for reason in [
        "truncated",
        "length_mismatch",
        "unknown_type",
        "bad_length",
        "protocol_id",
        "oversized",
        "not_connected",
    ] {
        let line = format!("mqgate_mqttsn_datagrams_dropped_total{{reason=\"{reason}\"}}");
        assert!(text.contains(&line), "{line} missing:\n{text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn searchgw_is_answered_and_advertise_is_sent() {
    let listener = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let to = listener.local_addr().expect("addr");
    let app = sn_gateway(
        &format!("  gateway_id: 42\n  advertise_interval: 1s\n  advertise_to: \"{to}\"\n"),
        "",
    )
    .await;
    let c = Sn::new(sn_addr(&app)).await;
    c.send(&Packet::SearchGw { radius: 1 }).await;
    assert_eq!(c.recv().await, Packet::GwInfo { gw_id: 42, gw_add: Bytes::new() });
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), listener.recv_from(&mut buf))
        .await
        .expect("ADVERTISE within 5 s")
        .expect("recv");
    let p = codec::decode(&Bytes::copy_from_slice(&buf[..n])).expect("decodes");
    assert_eq!(p, Packet::Advertise { gw_id: 42, duration: 1 });
    app.stop().await;
}

/// CONNECT with the will flag and the exchange that follows; the CONNACK's code.
async fn connect_with_will(c: &Sn, id: &str, duration: u16, topic: &str, msg: &[u8]) -> ReturnCode {
    let connect = Connect { will: true, clean_session: true, duration, client_id: id.into() };
    c.send(&Packet::Connect(connect)).await;
    assert_eq!(c.recv().await, Packet::WillTopicReq);
    let w = WillTopic { qos: SnQos::One, retain: false, topic: topic.into() };
    c.send(&Packet::WillTopic(Some(w))).await;
    assert_eq!(c.recv().await, Packet::WillMsgReq);
    c.send(&Packet::WillMsg(Bytes::copy_from_slice(msg))).await;
    match c.recv().await {
        Packet::ConnAck { code } => code,
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

#[tokio::test]
async fn the_will_is_exchanged_updated_and_published_when_the_client_is_lost() {
    let app = sn_gateway("", "").await;
    let mut m = mqtt_sub(&app, "will/#", QoS::AtMostOnce).await;
    let c = Sn::new(sn_addr(&app)).await;
    assert_eq!(
        connect_with_will(&c, &unique("will"), 1, "will/old", b"old").await,
        ReturnCode::ACCEPTED
    );
    let w = WillTopic { qos: SnQos::Zero, retain: false, topic: "will/new".into() };
    c.send(&Packet::WillTopicUpd(Some(w))).await;
    assert_eq!(c.recv().await, Packet::WillTopicResp { code: ReturnCode::ACCEPTED });
    c.send(&Packet::WillMsgUpd(Bytes::from_static(b"gone"))).await;
    assert_eq!(c.recv().await, Packet::WillMsgResp { code: ReturnCode::ACCEPTED });
    // Keep alive 1 s: silent for 1.5 s, the client is lost and its will published.
    let p = expect_publish(&mut m).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("will/new", &b"gone"[..]));
    assert!(metrics(&app)
        .await
        .contains("mqgate_mqttsn_clients_lost_total{reason=\"keepalive\"} 1"));

    // DISCONNECT: no will.
    let d = Sn::new(sn_addr(&app)).await;
    assert_eq!(
        connect_with_will(&d, &unique("will2"), 60, "will/d", b"d").await,
        ReturnCode::ACCEPTED
    );
    d.send(&Packet::Disconnect { duration: None }).await;
    assert_eq!(d.recv().await, Packet::Disconnect { duration: None });
    // An empty WILLTOPIC: no will, CONNACK at once.
    let e = Sn::new(sn_addr(&app)).await;
    e.send(&Packet::Connect(Connect {
        will: true,
        clean_session: true,
        duration: 1,
        client_id: unique("nowill"),
    }))
    .await;
    assert_eq!(e.recv().await, Packet::WillTopicReq);
    e.send(&Packet::WillTopic(None)).await;
    assert_eq!(e.recv().await, Packet::ConnAck { code: ReturnCode::ACCEPTED });
    match m.recv_within(Duration::from_secs(3)).await {
        Err(()) => {}
        Ok(p) => panic!("no will expected, got {p:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn a_sleeping_client_gets_what_waited_when_it_wakes_bounded_and_counted() {
    let app = sn_gateway("  max_queued_messages: 2\n", "").await;
    let mut m = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    let id = unique("sleeper");
    let c = Sn::connect(sn_addr(&app), &id).await;
    let (tid, _) = c.subscribe(TopicSpec::Name("sleep/t".into()), SnQos::One, 1).await;
    c.send(&Packet::Disconnect { duration: Some(60) }).await;
    assert_eq!(c.recv().await, Packet::Disconnect { duration: None });
    assert!(metrics(&app).await.contains("mqgate_mqttsn_clients_asleep 1"));
    for i in 0..4u8 {
        crate::support::publish_qos1(&mut m, "sleep/t", u16::from(i) + 1, &[b'0' + i]).await;
    }
    c.silence(Duration::from_millis(300)).await;
    // Woken by PINGREQ with its client id: what waited (2: the bound), then PINGRESP.
    c.send(&Packet::PingReq { client_id: Some(id.clone()) }).await;
    let mut got = Vec::new();
    loop {
        match c.recv().await {
            Packet::Publish(p) => {
                assert_eq!(p.topic, TopicRef::Normal(tid));
                got.push(p.data.clone());
                c.send(&Packet::PubAck {
                    topic_id: tid,
                    msg_id: p.msg_id,
                    code: ReturnCode::ACCEPTED,
                })
                .await;
            }
            Packet::PingResp => break,
            other => panic!("expected PUBLISH or PINGRESP, got {other:?}"),
        }
    }
    assert_eq!(got, vec![Bytes::from_static(b"0"), Bytes::from_static(b"1")]);
    let text = metrics(&app).await;
    assert!(
        text.contains("mqgate_messages_dropped_total{reason=\"subscriber_queue_full\"} 2"),
        "{text}"
    );
    // Asleep again: nothing is sent until the next PINGREQ.
    crate::support::publish_qos1(&mut m, "sleep/t", 9, b"later").await;
    c.silence(Duration::from_millis(300)).await;
    c.send(&Packet::PingReq { client_id: Some(id) }).await;
    match c.recv().await {
        Packet::Publish(p) => {
            assert_eq!(&p.data[..], b"later");
            c.send(&Packet::PubAck { topic_id: tid, msg_id: p.msg_id, code: ReturnCode::ACCEPTED })
                .await;
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    assert_eq!(c.recv().await, Packet::PingResp);
    app.stop().await;
}

#[tokio::test]
async fn an_oversleeping_client_is_lost_and_its_will_published() {
    let app = sn_gateway("", "").await;
    let mut m = mqtt_sub(&app, "will/#", QoS::AtMostOnce).await;
    let c = Sn::new(sn_addr(&app)).await;
    assert_eq!(
        connect_with_will(&c, &unique("over"), 60, "will/slept", b"zzz").await,
        ReturnCode::ACCEPTED
    );
    c.send(&Packet::Disconnect { duration: Some(1) }).await;
    assert_eq!(c.recv().await, Packet::Disconnect { duration: None });
    let p = expect_publish(&mut m).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("will/slept", &b"zzz"[..]));
    assert!(metrics(&app)
        .await
        .contains("mqgate_mqttsn_clients_lost_total{reason=\"overslept\"} 1"));
    app.stop().await;
}

#[tokio::test]
async fn the_gateway_sends_again_after_t_retry_and_gives_up_after_n_retry() {
    let app = sn_gateway("  retry_interval: 200ms\n  max_retries: 2\n", "").await;
    let mut m = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    let c = Sn::connect(sn_addr(&app), &unique("deaf")).await;
    let (tid, _) = c.subscribe(TopicSpec::Name("r/t".into()), SnQos::One, 1).await;
    crate::support::publish_qos1(&mut m, "r/t", 1, b"again").await;
    let mut sends = Vec::new();
    for _ in 0..3 {
        match c.recv().await {
            Packet::Publish(p) => sends.push((p.dup, p.msg_id, p.topic)),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    assert!(!sends[0].0, "the first send is not a DUP");
    assert!(
        sends[1..].iter().all(|s| s.0 && s.1 == sends[0].1 && s.2 == TopicRef::Normal(tid)),
        "{sends:?}"
    );
    // N_retry = 2 resends, then lost (and nothing more sent).
    wait_metric(&app, "mqgate_mqttsn_clients_lost_total{reason=\"no_answer\"} 1").await;
    let text = metrics(&app).await;
    assert!(text.contains("mqgate_mqttsn_retransmissions_total 2"), "{text}");
    c.silence(Duration::from_millis(300)).await;
    app.stop().await;
}

#[tokio::test]
async fn qos_minus_one_publishes_without_a_connection() {
    let app = sn_gateway("", "").await;
    let mut m = mqtt_sub(&app, "#", QoS::AtMostOnce).await;
    let c = Sn::new(sn_addr(&app)).await;
    c.publish(SnQos::MinusOne, TopicRef::Predefined(7), 0, b"m1").await;
    let p = expect_publish(&mut m).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("sn/predefined", &b"m1"[..]));
    c.publish(SnQos::MinusOne, TopicRef::Short(*b"hq"), 0, b"m2").await;
    let p = expect_publish(&mut m).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("hq", &b"m2"[..]));
    c.publish(SnQos::MinusOne, TopicRef::Predefined(3), 0, b"m3").await;
    assert_eq!(puback(c.recv().await), (3, 0, ReturnCode::INVALID_TOPIC_ID));
    app.stop().await;
}

#[tokio::test]
async fn client_ids_are_admitted_by_pattern_and_the_acl_applies_by_client_id() {
    let app = sn_gateway(
        "  client_ids: [\"sensor-*\"]\n",
        "acl:\n  - deny: publish\n    topic: \"secret/#\"\n    client: \"sensor-2\"\n  - allow: all\n    topic: \"#\"\n",
    )
    .await;
    let mut m = mqtt_sub(&app, "secret/#", QoS::AtMostOnce).await;
    let c = Sn::new(sn_addr(&app)).await;
    assert_eq!(c.connect_as("intruder", 60, true).await, ReturnCode::NOT_SUPPORTED);
    let s1 = Sn::connect(sn_addr(&app), "sensor-1").await;
    let s2 = Sn::connect(sn_addr(&app), "sensor-2").await;
    let id2 = s2.register("secret/x", 1).await;
    s2.publish(SnQos::One, TopicRef::Normal(id2), 5, b"no").await;
    assert_eq!(puback(s2.recv().await), (id2, 5, ReturnCode::NOT_SUPPORTED));
    let id1 = s1.register("secret/x", 1).await;
    s1.publish(SnQos::One, TopicRef::Normal(id1), 5, b"yes").await;
    assert_eq!(puback(s1.recv().await).2, ReturnCode::ACCEPTED);
    let p = expect_publish(&mut m).await;
    assert_eq!(&p.payload[..], b"yes", "sensor-2's message was never routed");
    app.stop().await;
}

#[tokio::test]
async fn a_persistent_session_is_shared_with_mqtt_by_client_id() {
    let app = sn_gateway("", "").await;
    let id = unique("shared-session");
    let c = Sn::new(sn_addr(&app)).await;
    assert_eq!(c.connect_as(&id, 60, false).await, ReturnCode::ACCEPTED);
    assert_eq!(
        c.subscribe(TopicSpec::Name("keep/#".into()), SnQos::One, 1).await.1,
        ReturnCode::ACCEPTED
    );
    c.send(&Packet::Disconnect { duration: None }).await;
    assert_eq!(c.recv().await, Packet::Disconnect { duration: None });
    let mut p = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    crate::support::publish_qos1(&mut p, "keep/a", 1, b"while away").await;
    // The same client id over MQTT (persistent session) finds the subscription and the message.
    let mut m = RawClient::tcp(app.mqtt_addr, V311).await;
    let mut connect = crate::support::connect_packet(V311, &id);
    connect.clean_start = false;
    m.send(&MqttPacket::Connect(Box::new(connect))).await;
    match m.recv().await {
        Some(MqttPacket::ConnAck(a)) => assert!(a.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let got = expect_publish(&mut m).await;
    assert_eq!((got.topic.as_str(), &got.payload[..]), ("keep/a", &b"while away"[..]));
    app.stop().await;
}

#[tokio::test]
async fn the_mqtt_sn_12_client_from_pypi_publishes_and_subscribes() {
    let app = sn_gateway("", "").await;
    let port = sn_addr(&app).port().to_string();
    let python = std::env::var("MQGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python).args(["-c", "import mqttsn12"]).status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "the mqtt-sn-12 package is missing for {python}: run scripts/test.sh (ensure_mqttsn_client) or `{python} -m pip install mqtt-sn-12`"
    );
    let mut m = mqtt_sub(&app, "pypi/#", QoS::AtLeastOnce).await;
    let out = tokio::process::Command::new(&python)
        .args(["-m", "mqttsn12.mqtt_sn_pub", "-h", "127.0.0.1", "-p", &port, "-q", "1"])
        .args([
            "-t",
            "pypi/temp",
            "-m",
            "21.5",
            "-i",
            &format!("pub{}", std::process::id()),
            "--timeout",
            "10",
        ])
        .output()
        .await
        .expect("run mqtt_sn_pub");
    assert!(
        out.status.success(),
        "mqtt_sn_pub failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let p = expect_publish(&mut m).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("pypi/temp", &b"21.5"[..]));

    // Its subscriber: started, then an MQTT publish reaches it (the gateway REGISTERs the topic).
    let mut sub = tokio::process::Command::new(&python)
        .args(["-u", "-m", "mqttsn12.mqtt_sn_sub", "-h", "127.0.0.1", "-p", &port, "-q", "1"])
        .args(["-t", "pypi/cmd", "-i", &format!("sub{}", std::process::id())])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run mqtt_sn_sub");
    let mut got = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut stdout = sub.stdout.take().expect("stdout");
    let mut n = 0u16;
    while !got.contains("open-valve") && tokio::time::Instant::now() < deadline {
        n += 1;
        crate::support::publish_qos1(&mut p_client(&app).await, "pypi/cmd", n, b"open-valve").await;
        let mut buf = [0u8; 4096];
        use tokio::io::AsyncReadExt;
        if let Ok(Ok(k)) =
            tokio::time::timeout(Duration::from_millis(700), stdout.read(&mut buf)).await
        {
            got.push_str(&String::from_utf8_lossy(&buf[..k]));
        }
    }
    let _ = sub.kill().await;
    assert!(got.contains("open-valve"), "mqtt_sn_sub printed: {got:?}");
    app.stop().await;
}

async fn p_client(app: &App) -> RawClient {
    RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await
}

#[test]
fn mqttsn_config_errors_carry_file_line_and_column() {
    let yaml = "mqtt:\n  listen: \"127.0.0.1:0\"\n  allow_anonymous: false\nmqttsn:\n  listen: \"nowhere\"\n  predefined_topics:\n    0: \"a/#\"\n  retry_interval: 0s\n";
    let e = mqgate::config::Config::parse(std::path::Path::new("sn.yaml"), yaml)
        .expect_err("invalid")
        .to_string();
    assert!(e.contains("sn.yaml:5:11: mqttsn.listen: not an address:port"), "{e}");
    assert!(e.contains("sn.yaml:7:8: mqttsn.predefined_topics: topic id 0 is reserved"), "{e}");
    assert!(e.contains("sn.yaml:7:8: mqttsn.predefined_topics.0:"), "{e}");
    assert!(e.contains("sn.yaml:8:19: mqttsn.retry_interval must be > 0"), "{e}");
    assert!(
        e.contains(
            "sn.yaml:5:11: mqttsn.client_ids is required when mqtt.allow_anonymous is false"
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_sleeping_client_may_wake_from_another_address_or_connect_again() {
    let app = sn_gateway("", "").await;
    let mut m = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    let id = unique("mover");
    let c = Sn::connect(sn_addr(&app), &id).await;
    let (tid, _) = c.subscribe(TopicSpec::Name("move/t".into()), SnQos::Zero, 1).await;
    c.send(&Packet::Disconnect { duration: Some(60) }).await;
    assert_eq!(c.recv().await, Packet::Disconnect { duration: None });
    crate::support::publish_qos1(&mut m, "move/t", 1, b"for the new address").await;
    // The forwarder's port changed: the PINGREQ with its client id comes from elsewhere.
    let moved = Sn::new(sn_addr(&app)).await;
    moved.send(&Packet::PingReq { client_id: Some(id.clone()) }).await;
    match moved.recv().await {
        Packet::Publish(p) => {
            assert_eq!((p.topic, &p.data[..]), (TopicRef::Normal(tid), &b"for the new address"[..]))
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    assert_eq!(moved.recv().await, Packet::PingResp);
    c.silence(Duration::from_millis(200)).await;
    // Back to active with CONNECT (CleanSession 0, no will): session and topic ids kept.
    assert_eq!(moved.connect_as(&id, 60, false).await, ReturnCode::ACCEPTED);
    crate::support::publish_qos1(&mut m, "move/t", 2, b"active").await;
    match moved.recv().await {
        Packet::Publish(p) => {
            assert_eq!((p.topic, &p.data[..]), (TopicRef::Normal(tid), &b"active"[..]))
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    assert!(metrics(&app).await.contains("mqgate_mqttsn_clients_asleep 0"));
    app.stop().await;
}

#[tokio::test]
async fn a_delivery_waiting_for_its_regack_stays_with_the_session() {
    let app = sn_gateway("", "").await;
    let id = unique("regwait");
    let c = Sn::new(sn_addr(&app)).await;
    assert_eq!(c.connect_as(&id, 60, false).await, ReturnCode::ACCEPTED);
    assert_eq!(
        c.subscribe(TopicSpec::Name("rw/+".into()), SnQos::One, 1).await.1,
        ReturnCode::ACCEPTED
    );
    let mut p = RawClient::connect(app.mqtt_addr, V311, &unique("pub")).await;
    crate::support::publish_qos1(&mut p, "rw/a", 1, b"not lost").await;
    // The gateway REGISTERs the topic first; the client leaves without answering.
    match c.recv().await {
        Packet::Register { topic_name, .. } => assert_eq!(topic_name, "rw/a"),
        other => panic!("expected REGISTER, got {other:?}"),
    }
    c.send(&Packet::Disconnect { duration: None }).await;
    assert_eq!(c.recv().await, Packet::Disconnect { duration: None });
    // The session (persistent) kept the delivery: the same client id over MQTT gets it.
    let mut m = RawClient::tcp(app.mqtt_addr, V311).await;
    let mut connect = crate::support::connect_packet(V311, &id);
    connect.clean_start = false;
    m.send(&MqttPacket::Connect(Box::new(connect))).await;
    match m.recv().await {
        Some(MqttPacket::ConnAck(a)) => assert!(a.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let got = expect_publish(&mut m).await;
    assert_eq!((got.topic.as_str(), &got.payload[..]), ("rw/a", &b"not lost"[..]));
    app.stop().await;
}

/// `p` encapsulated by a forwarder for wireless node `node`.
fn encapsulated(node: &[u8], p: &Packet) -> Packet {
    let mut inner = BytesMut::new();
    codec::encode(p, &mut inner).expect("encode");
    Packet::Encapsulated { radius: 0, node_id: Bytes::copy_from_slice(node), inner: inner.freeze() }
}

/// The message inside an encapsulated answer for `node`.
fn unwrap_for(node: &[u8], p: Packet) -> Packet {
    match p {
        Packet::Encapsulated { node_id, inner, .. } => {
            assert_eq!(&node_id[..], node, "answered for another node");
            codec::decode(&inner).expect("the inner message decodes")
        }
        other => panic!("expected an encapsulated message, got {other:?}"),
    }
}

#[tokio::test]
async fn nodes_behind_a_forwarder_are_clients_of_their_own_answered_encapsulated() {
    let app = sn_gateway("", "").await;
    let mut m = mqtt_sub(&app, "fwd/#", QoS::AtMostOnce).await;
    // One forwarder (one UDP address), two wireless nodes.
    let f = Sn::new(sn_addr(&app)).await;
    for (node, id) in [(&b"\x00\x01"[..], unique("node-a")), (&b"\x00\x02"[..], unique("node-b"))] {
        let c = Connect { will: false, clean_session: true, duration: 60, client_id: id };
        f.send(&encapsulated(node, &Packet::Connect(c))).await;
        assert_eq!(
            unwrap_for(node, f.recv().await),
            Packet::ConnAck { code: ReturnCode::ACCEPTED }
        );
    }
    let node = &b"\x00\x02"[..];
    let reg = Packet::Register { topic_id: 0, msg_id: 1, topic_name: "fwd/b".into() };
    f.send(&encapsulated(node, &reg)).await;
    let Packet::RegAck { topic_id, code: ReturnCode::ACCEPTED, .. } =
        unwrap_for(node, f.recv().await)
    else {
        panic!("expected REGACK")
    };
    let p = Publish {
        dup: false,
        qos: SnQos::One,
        retain: false,
        topic: TopicRef::Normal(topic_id),
        msg_id: 2,
        data: Bytes::from_static(b"via forwarder"),
    };
    f.send(&encapsulated(node, &Packet::Publish(p))).await;
    assert_eq!(puback(unwrap_for(node, f.recv().await)), (topic_id, 2, ReturnCode::ACCEPTED));
    let got = expect_publish(&mut m).await;
    assert_eq!((got.topic.as_str(), &got.payload[..]), ("fwd/b", &b"via forwarder"[..]));
    // The other node has no such topic id: its own registrations, its own session.
    let p = Publish {
        dup: false,
        qos: SnQos::One,
        retain: false,
        topic: TopicRef::Normal(topic_id),
        msg_id: 3,
        data: Bytes::from_static(b"x"),
    };
    f.send(&encapsulated(b"\x00\x01", &Packet::Publish(p))).await;
    assert_eq!(puback(unwrap_for(b"\x00\x01", f.recv().await)).2, ReturnCode::INVALID_TOPIC_ID);
    app.stop().await;
}

/// `mqtt.max_subscribe_rate` holds for MQTT-SN clients too: a SUBSCRIBE over it is refused
/// with the protocol's "congestion" (counted), subscribes nothing, and the client may try
/// again once the bucket has refilled.
#[tokio::test]
async fn subscribes_beyond_the_subscribe_rate_are_refused_with_congestion() {
    let app = gateway(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n  max_subscribe_rate: 5\nadmin:\n  listen: \"127.0.0.1:0\"\nmqttsn:\n  listen: \"127.0.0.1:0\"\n",
    )
    .await;
    let c = Sn::connect(sn_addr(&app), &unique("sn-rate")).await;
    let mut codes = Vec::new();
    for i in 0..12u16 {
        let name = format!("rate/{i}");
        codes.push(c.subscribe(TopicSpec::Name(name), SnQos::One, i + 1).await.1);
    }
    let accepted = codes.iter().filter(|&&c| c == ReturnCode::ACCEPTED).count();
    let congested = codes.iter().filter(|&&c| c == ReturnCode::CONGESTION).count();
    assert!(codes[..5].iter().all(|&c| c == ReturnCode::ACCEPTED), "a second's burst: {codes:?}");
    assert!((5..=7).contains(&accepted), "{codes:?}");
    assert_eq!(accepted + congested, 12, "{codes:?}");
    wait_metric(&app, "mqgate_mqttsn_rejected_total{code=\"congestion\"}").await;

    // A refused filter was not subscribed.
    let last = codes.iter().rposition(|&c| c == ReturnCode::CONGESTION).expect("one refused");
    let mut publisher =
        RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, &unique("p")).await;
    publisher.publish(&format!("rate/{last}"), QoS::AtMostOnce, 0, b"not for you").await;
    c.silence(Duration::from_millis(500)).await;

    // Refilled: accepted again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, code) = c.subscribe(TopicSpec::Name("rate/again".into()), SnQos::One, 99).await;
    assert_eq!(code, ReturnCode::ACCEPTED);
}
