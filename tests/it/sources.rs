//! Sources (AMQP → MQTT) against the real RabbitMQ: broadcast and work modes, `$share`
//! groups as consumer groups, ack only after the subscriber's PUBACK, the prefetch bound, the
//! no-subscriber policies, QoS and properties from AMQP, request/response both ways, and a
//! source surviving a lost connection.

use std::path::Path;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};
use mqgate::app::App;
use mqgate::config::Config;
use mqgate::mqtt::codec::{
    Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode,
};

/// A gateway config with the local RabbitMQ as `rabbit` (at `url`), `rules` (YAML list
/// items, unindented, may be empty) and `sources` (likewise).
fn config(url: &str, rules: &str, sources: &str) -> String {
    let rules =
        if rules.is_empty() { "rules: []\n".to_owned() } else { format!("rules:\n{rules}") };
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\namqp:\n  rabbit:\n    url: \"{url}\"\n    reconnect_min: 50ms\n    reconnect_max: 200ms\n{rules}sources:\n{sources}"
    )
}

/// A source `s` on `queue`, declared (not durable, deleted by the test, and expiring a minute
/// after its last use in case the test fails first) and bound to `exchange` with `#`, plus
/// `extra` lines (indented four spaces).
fn source(queue: &str, exchange: &str, extra: &str) -> String {
    format!(
        "  - name: s\n    broker: rabbit\n    queue: \"{queue}\"\n    declare:\n      durable: false\n      arguments:\n        x-expires: {QUEUE_EXPIRES_MS}\n    bind:\n      - exchange: \"{exchange}\"\n        routing_key: \"#\"\n{extra}"
    )
}

/// `x-expires` of the test queues: RabbitMQ deletes a queue left unused this long (ms), so a
/// failed test (which skips its `delete_queue`) leaves nothing behind for good.
const QUEUE_EXPIRES_MS: u32 = 60_000;

/// What most tests start with: a connection (kept alive by the caller), a confirm-mode channel
/// on it, an auto-delete topic exchange and a unique name for the source's queue.
async fn setup() -> (Connection, Channel, String, String) {
    let conn = rabbit().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default()).await.expect("confirms");
    let x = exchange(&ch).await;
    (conn, ch, x, unique("mqgate-src-q"))
}

/// A topic exchange (auto-delete) for a test.
async fn exchange(ch: &Channel) -> String {
    let name = unique("mqgate-src-x");
    ch.exchange_declare(
        ShortString::from(name.as_str()),
        ExchangeKind::Topic,
        ExchangeDeclareOptions { auto_delete: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .expect("declare exchange");
    name
}

/// Starts the gateway and waits until the source consumes.
async fn start(yaml: &str) -> App {
    let _ = tracing_subscriber::fmt().with_env_filter("mqgate=info").with_test_writer().try_init();
    let app = gateway(yaml).await;
    wait_metric(&app, "mqgate_source_connected{source=\"s\"} 1").await;
    wait_ready(&app).await; // the sink too, for the tests with rules
    app
}

/// Waits until the gateway's metrics contain `line`.
async fn wait_metric(app: &App, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !metrics(app).await.lines().any(|l| l == line) {
        assert!(tokio::time::Instant::now() < deadline, "metric never became `{line}`");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `body` to `exchange` with `rk` and `props`.
async fn amqp_publish(ch: &Channel, exchange: &str, rk: &str, body: &[u8], props: BasicProperties) {
    ch.basic_publish(
        ShortString::from(exchange),
        ShortString::from(rk),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .expect("publish")
    .await
    .expect("publish confirmed");
}

/// Deletes a test queue (the sources declare theirs non-durable, not auto-delete).
async fn delete_queue(ch: &Channel, queue: &str) {
    let _ = ch.queue_delete(ShortString::from(queue), QueueDeleteOptions::default()).await;
}

/// Messages ready in `queue` (not counting unacked ones).
async fn ready(ch: &Channel, queue: &str) -> u32 {
    let q = ch
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    q.message_count()
}

/// A subscriber (clean session) on `filter` at `qos`.
async fn subscriber(app: &App, id: &str, filter: &str, qos: QoS) -> RawClient {
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, id).await;
    assert_eq!(c.subscribe(filter, qos).await, vec![ReasonCode(qos as u8)]);
    c
}

async fn puback(c: &mut RawClient, p: &Publish) {
    c.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
}

/// The next PUBLISH within `wait`, if any.
async fn maybe_publish(c: &mut RawClient, wait: Duration) -> Option<Publish> {
    match c.recv_within(wait).await {
        Ok(Some(Packet::Publish(p))) => Some(p),
        Ok(other) => panic!("expected PUBLISH, got {other:?}"),
        Err(()) => None,
    }
}

#[tokio::test]
async fn broadcast_reaches_every_subscriber_and_acks_after_both_pubacks() {
    let (_conn, ch, x, queue) = setup().await;
    let app = start(&config(AMQP_URL, "", &source(&queue, &x, ""))).await;
    let mut a = subscriber(&app, "bc-a", "cmd/#", QoS::AtLeastOnce).await;
    let mut b = subscriber(&app, "bc-b", "cmd/+/go", QoS::AtLeastOnce).await;

    amqp_publish(&ch, &x, "cmd.d1.go", b"hello", BasicProperties::default()).await;
    let pa = expect_publish(&mut a).await;
    let pb = expect_publish(&mut b).await;
    for p in [&pa, &pb] {
        assert_eq!(
            (p.topic.as_str(), &p.payload[..], p.qos),
            ("cmd/d1/go", &b"hello"[..], QoS::AtLeastOnce)
        );
    }
    puback(&mut a, &pa).await;
    // One PUBACK out of two: still unacked in RabbitMQ.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!metrics(&app)
        .await
        .contains("mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 1"));
    puback(&mut b, &pb).await;
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 1").await;
    app.stop().await;
    assert_eq!(ready(&ch, &queue).await, 0, "acked: nothing comes back after the gateway stops");
    delete_queue(&ch, &queue).await;
}

#[tokio::test]
async fn a_message_not_pubacked_stays_unacked_and_returns_when_the_gateway_stops() {
    let (_conn, ch, x, queue) = setup().await;
    let app = start(&config(AMQP_URL, "", &source(&queue, &x, ""))).await;
    let mut a = subscriber(&app, "noack", "t/#", QoS::AtLeastOnce).await;
    amqp_publish(&ch, &x, "t.1", b"keep me", BasicProperties::default()).await;
    let p = expect_publish(&mut a).await;
    assert_eq!(&p.payload[..], b"keep me");
    // A later message that is PUBACKed is acked without acking the older one with it.
    let mut b = subscriber(&app, "acks", "u/#", QoS::AtLeastOnce).await;
    amqp_publish(&ch, &x, "u.1", b"done", BasicProperties::default()).await;
    let pb = expect_publish(&mut b).await;
    puback(&mut b, &pb).await;
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ready(&ch, &queue).await, 0, "delivered to the gateway, unacked");
    app.stop().await;
    let back = get(&ch, &queue, Duration::from_secs(5)).await.expect("requeued by RabbitMQ");
    assert_eq!(back.data, b"keep me");
    assert!(back.redelivered);
    assert!(get(&ch, &queue, Duration::from_millis(300)).await.is_none(), "only that one");
    delete_queue(&ch, &queue).await;
}

#[tokio::test]
async fn qos0_is_acked_on_hand_off_and_persistent_sessions_count_as_taken() {
    let (_conn, ch, x, queue) = setup().await;
    let app = start(&config(AMQP_URL, "", &source(&queue, &x, ""))).await;
    // A persistent session whose client is away: the message is queued there, which is MQTT
    // taking responsibility, so RabbitMQ gets its ack without any PUBACK.
    let mut c = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V5).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "away");
    connect.properties.session_expiry_interval = Some(300);
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(_))));
    assert_eq!(c.subscribe("away/#", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    c.send(&Packet::Disconnect(Default::default())).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    amqp_publish(&ch, &x, "away.1", b"queued", BasicProperties::default()).await;
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 1").await;
    // QoS 0 subscriber: acked once handed over, no PUBACK exists.
    let mut q0 = subscriber(&app, "q0", "zero/#", QoS::AtMostOnce).await;
    amqp_publish(&ch, &x, "zero.1", b"z", BasicProperties::default()).await;
    let p = expect_publish(&mut q0).await;
    assert_eq!(p.qos, QoS::AtMostOnce);
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 2").await;
    // A persistent session that goes away with a delivery unacknowledged keeps it: taken.
    let mut c2 = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V5).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "leaves");
    connect.properties.session_expiry_interval = Some(300);
    c2.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c2.recv().await, Some(Packet::ConnAck(_))));
    assert_eq!(c2.subscribe("leaves/#", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    amqp_publish(&ch, &x, "leaves.1", b"in flight", BasicProperties::default()).await;
    assert_eq!(&expect_publish(&mut c2).await.payload[..], b"in flight");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(metrics(&app).await.contains("outcome=\"delivered\"} 2"), "no PUBACK yet");
    drop(c2);
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 3").await;
    // The away client comes back and gets its message.
    let mut c = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V5).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "away");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(300);
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.session_present));
    assert_eq!(&expect_publish(&mut c).await.payload[..], b"queued");
    app.stop().await;
    assert_eq!(ready(&ch, &queue).await, 0);
    delete_queue(&ch, &queue).await;
}

#[tokio::test]
async fn work_mode_gives_each_message_to_one_subscriber_and_redelivers_on_disconnect() {
    let (_conn, ch, x, queue) = setup().await;
    // `drop`: a redelivery must come from mqgate itself, not from a requeue by RabbitMQ.
    let extra = "    mode: work\n    on_no_subscriber: drop\n";
    let app = start(&config(AMQP_URL, "", &source(&queue, &x, extra))).await;
    let mut a = subscriber(&app, "w-a", "jobs/#", QoS::AtLeastOnce).await;
    let mut b = subscriber(&app, "w-b", "jobs/#", QoS::AtLeastOnce).await;

    for i in 0..6u8 {
        amqp_publish(&ch, &x, "jobs.x", &[i], BasicProperties::default()).await;
    }
    let mut got = Vec::new();
    for (c, n) in [(&mut a, 0), (&mut b, 1)] {
        while let Some(p) = maybe_publish(c, Duration::from_millis(500)).await {
            puback(c, &p).await;
            got.push((n, p.payload[0]));
        }
    }
    let mut payloads: Vec<u8> = got.iter().map(|g| g.1).collect();
    payloads.sort_unstable();
    assert_eq!(payloads, vec![0, 1, 2, 3, 4, 5], "each message exactly once: {got:?}");
    assert_eq!(got.iter().filter(|g| g.0 == 0).count(), 3, "round robin: {got:?}");
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 6").await;

    // The subscriber that gets the next job leaves without acknowledging: the other gets it.
    amqp_publish(&ch, &x, "jobs.y", b"retry", BasicProperties::default()).await;
    let (mut taker, mut other) = (a, b);
    if maybe_publish(&mut taker, Duration::from_millis(500)).await.is_none() {
        std::mem::swap(&mut taker, &mut other);
        assert!(maybe_publish(&mut taker, Duration::from_secs(5)).await.is_some());
    }
    drop(taker);
    let p = expect_publish(&mut other).await;
    assert_eq!(&p.payload[..], b"retry");
    puback(&mut other, &p).await;
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 7").await;
    expect_silence(&mut other, Duration::from_millis(300)).await;
    app.stop().await;
    assert_eq!(ready(&ch, &queue).await, 0);
    delete_queue(&ch, &queue).await;
}

#[tokio::test]
async fn a_share_group_is_a_consumer_group_of_the_queue() {
    let (_conn, ch, x, queue) = setup().await;
    let app = start(&config(AMQP_URL, "", &source(&queue, &x, ""))).await;
    let mut a = subscriber(&app, "g-a", "$share/workers/tasks/#", QoS::AtLeastOnce).await;
    let mut b = subscriber(&app, "g-b", "$share/workers/tasks/#", QoS::AtLeastOnce).await;
    for i in 0..4u8 {
        amqp_publish(&ch, &x, "tasks.t", &[i], BasicProperties::default()).await;
    }
    let mut seen = Vec::new();
    for c in [&mut a, &mut b] {
        let mut n = 0;
        while let Some(p) = maybe_publish(c, Duration::from_millis(500)).await {
            puback(c, &p).await;
            seen.push(p.payload[0]);
            n += 1;
        }
        assert_eq!(n, 2, "one member per message, round robin");
    }
    seen.sort_unstable();
    assert_eq!(seen, vec![0, 1, 2, 3]);
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 4").await;

    // A member that leaves without its PUBACK: the other member gets the message, and the
    // AMQP ack waits for that member's PUBACK.
    amqp_publish(&ch, &x, "tasks.t", b"again", BasicProperties::default()).await;
    let (mut taker, mut other) = (a, b);
    if maybe_publish(&mut taker, Duration::from_millis(500)).await.is_none() {
        std::mem::swap(&mut taker, &mut other);
        assert!(maybe_publish(&mut taker, Duration::from_secs(5)).await.is_some());
    }
    drop(taker);
    let p = expect_publish(&mut other).await;
    assert_eq!(&p.payload[..], b"again");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(metrics(&app).await.contains("outcome=\"delivered\"} 4"), "not acked before PUBACK");
    puback(&mut other, &p).await;
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 5").await;
    app.stop().await;
    assert_eq!(ready(&ch, &queue).await, 0);
    delete_queue(&ch, &queue).await;
}

#[tokio::test]
async fn prefetch_bounds_what_a_slow_subscriber_has_outstanding() {
    let (_conn, ch, x, queue) = setup().await;
    let app = start(&config(AMQP_URL, "", &source(&queue, &x, "    prefetch: 5\n"))).await;
    let mut a = subscriber(&app, "slow", "p/#", QoS::AtLeastOnce).await;
    for i in 0..20u8 {
        amqp_publish(&ch, &x, "p.1", &[i], BasicProperties::default()).await;
    }
    let mut first = Vec::new();
    while let Some(p) = maybe_publish(&mut a, Duration::from_millis(700)).await {
        first.push(p);
    }
    assert_eq!(first.len(), 5, "only prefetch deliveries before any PUBACK");
    assert_eq!(ready(&ch, &queue).await, 15, "the rest waits in RabbitMQ");
    for p in &first {
        puback(&mut a, p).await;
    }
    let mut total = first.len();
    while let Some(p) = maybe_publish(&mut a, Duration::from_millis(700)).await {
        puback(&mut a, &p).await;
        total += 1;
    }
    assert_eq!(total, 20);
    app.stop().await;
    delete_queue(&ch, &queue).await;
}

#[tokio::test]
async fn no_subscriber_dead_letters_requeues_or_drops_per_policy() {
    let conn = rabbit().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default()).await.expect("confirms");
    let x = exchange(&ch).await;
    // Dead letters go to a DLX exchange, bound to a queue we read.
    let (_, dlx, dlq) = exchange_with_queue(&conn, "#").await;
    let queue = unique("mqgate-src-q");
    let extra = format!(
        "    on_no_subscriber: dead_letter\n    declare:\n      durable: false\n      arguments:\n        x-dead-letter-exchange: \"{dlx}\"\n        x-expires: {QUEUE_EXPIRES_MS}\n"
    );
    let src = format!(
        "  - name: s\n    broker: rabbit\n    queue: \"{queue}\"\n    bind:\n      - exchange: \"{x}\"\n{extra}"
    );
    let app = start(&config(AMQP_URL, "", &src)).await;
    amqp_publish(&ch, &x, "nobody.here", b"dead", BasicProperties::default()).await;
    let dead = get(&ch, &dlq, Duration::from_secs(5)).await.expect("dead-lettered");
    assert_eq!(dead.data, b"dead");
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"dead_lettered\"} 1")
        .await;
    app.stop().await;
    delete_queue(&ch, &queue).await;

    // requeue (the default): held, nacked with requeue, and delivered once someone subscribes.
    // (A new exchange each time: an auto-delete one goes with its last binding.)
    let x = exchange(&ch).await;
    let queue = unique("mqgate-src-q");
    let app = start(&config(AMQP_URL, "", &source(&queue, &x, "    requeue_delay: 100ms\n"))).await;
    amqp_publish(&ch, &x, "later.on", b"wait", BasicProperties::default()).await;
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"requeued\"} 1").await;
    let mut c = subscriber(&app, "late", "later/#", QoS::AtLeastOnce).await;
    let p = expect_publish(&mut c).await;
    assert_eq!(&p.payload[..], b"wait");
    puback(&mut c, &p).await;
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 1").await;
    app.stop().await;
    delete_queue(&ch, &queue).await;

    // drop: acked, gone, as MQTT drops a message nobody subscribed to.
    let x = exchange(&ch).await;
    let queue = unique("mqgate-src-q");
    let app =
        start(&config(AMQP_URL, "", &source(&queue, &x, "    on_no_subscriber: drop\n"))).await;
    amqp_publish(&ch, &x, "void", b"gone", BasicProperties::default()).await;
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"dropped\"} 1").await;
    app.stop().await;
    assert_eq!(ready(&ch, &queue).await, 0);
    delete_queue(&ch, &queue).await;
}

#[tokio::test]
async fn qos_retain_and_mqtt5_properties_come_from_the_amqp_message() {
    let (_conn, ch, x, queue) = setup().await;
    let extra = "    qos: 2\n    topic: \"dev/{{ header.device }}/{{ routing_key }}\"\n";
    let app = start(&config(AMQP_URL, "", &source(&queue, &x, extra))).await;
    let mut c = subscriber(&app, "props", "dev/#", QoS::ExactlyOnce).await;

    let mut headers = FieldTable::default();
    headers.insert("device".into(), AMQPValue::LongString(LongString::from("d9")));
    headers.insert("x-mqtt-qos".into(), AMQPValue::LongInt(1));
    headers.insert("x-mqtt-payload-format".into(), AMQPValue::LongInt(1));
    headers.insert("site".into(), AMQPValue::LongString(LongString::from("north")));
    let props = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_correlation_id(ShortString::from("corr-7"))
        .with_reply_to(ShortString::from("svc.replies.d9"))
        .with_expiration(ShortString::from("60000"))
        .with_headers(headers);
    amqp_publish(&ch, &x, "cmd.set", b"{\"on\":true}", props).await;
    let p = expect_publish(&mut c).await;
    assert_eq!(p.topic, "dev/d9/cmd/set");
    assert_eq!(p.qos, QoS::AtLeastOnce, "x-mqtt-qos overrides the configured QoS 2");
    let pr = &p.properties;
    assert_eq!(pr.content_type.as_deref(), Some("application/json"));
    assert_eq!(pr.correlation_data.as_deref(), Some(&b"corr-7"[..]));
    assert_eq!(pr.response_topic.as_deref(), Some("svc/replies/d9"));
    assert!(matches!(pr.message_expiry_interval, Some(58..=60)), "{pr:?}");
    assert_eq!(pr.payload_format_indicator, Some(1));
    let user =
        vec![("device".to_owned(), "d9".to_owned()), ("site".to_owned(), "north".to_owned())];
    assert_eq!(pr.user_properties, user, "headers but mqgate's own become user properties");
    puback(&mut c, &p).await;

    // No header: the configured QoS 2, delivered PUBLISH → PUBREC → PUBREL → PUBCOMP; and
    // x-mqtt-retain makes it retained.
    let mut headers = FieldTable::default();
    headers.insert("device".into(), AMQPValue::LongString(LongString::from("d9")));
    headers.insert("x-mqtt-retain".into(), AMQPValue::Boolean(true));
    amqp_publish(&ch, &x, "state", b"s", BasicProperties::default().with_headers(headers)).await;
    let p = expect_publish(&mut c).await;
    assert_eq!((p.topic.as_str(), p.qos), ("dev/d9/state", QoS::ExactlyOnce));
    c.send(&Packet::PubRec(PubResponse::success(p.packet_id))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRel(_))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(metrics(&app).await.contains("outcome=\"delivered\"} 1"), "acked after PUBCOMP only");
    c.send(&Packet::PubComp(PubResponse::success(p.packet_id))).await;
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 2").await;
    let mut late = subscriber(&app, "late", "dev/+/state", QoS::AtMostOnce).await;
    let r = expect_publish(&mut late).await;
    assert!(r.retain && &r.payload[..] == b"s", "kept as the retained value: {r:?}");
    app.stop().await;
    delete_queue(&ch, &queue).await;
}

/// MQTT 5 request → rule → AMQP RPC server → reply exchange → source → the device's
/// response topic with its correlation data.
#[tokio::test]
async fn rpc_from_an_mqtt_device_to_an_amqp_server_and_back() {
    let conn = rabbit().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default()).await.expect("confirms");
    let (server_ch, req_x, req_q) = exchange_with_queue(&conn, "#").await;
    let reply_x = exchange(&ch).await;
    let queue = unique("mqgate-src-q");
    let rules = format!(
        "  - name: req\n    from: \"rpc/req/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{req_x}\"\n"
    );
    let app = start(&config(AMQP_URL, &rules, &source(&queue, &reply_x, ""))).await;
    let id = unique("dev").replace('-', "");
    let response_topic = format!("rpc/resp/{id}");
    let mut dev = subscriber(&app, &id, &response_topic, QoS::AtLeastOnce).await;

    let mut request = publish_packet("rpc/req/add", QoS::AtLeastOnce, 1, b"2+2");
    request.properties.response_topic = Some(response_topic.clone());
    request.properties.correlation_data = Some(Bytes::from_static(b"\x01corr"));
    dev.send(&Packet::Publish(request)).await;
    assert!(matches!(dev.recv().await, Some(Packet::PubAck(a)) if a.code.is_success()));

    // The RPC server: reads the request, answers to reply_to with the correlation id.
    let req = get(&server_ch, &req_q, Duration::from_secs(5)).await.expect("request reached AMQP");
    let reply_to = req.properties.reply_to().clone().expect("reply_to set").to_string();
    let corr = req.properties.correlation_id().clone().expect("correlation_id set");
    assert_eq!(reply_to, format!("rpc.resp.{id}"));
    assert_eq!(corr.as_str().as_bytes(), b"\x01corr");
    let answer = BasicProperties::default().with_correlation_id(corr);
    amqp_publish(&ch, &reply_x, &reply_to, b"4", answer).await;

    let p = expect_publish(&mut dev).await;
    assert_eq!(p.topic, response_topic);
    assert_eq!(&p.payload[..], b"4");
    assert_eq!(p.properties.correlation_data.as_deref(), Some(&b"\x01corr"[..]));
    puback(&mut dev, &p).await;
    app.stop().await;
    delete_queue(&ch, &queue).await;
}

/// AMQP client request (reply_to + correlation_id) → source → MQTT 5 device (response topic +
/// correlation data) → its answer → rule to the default exchange → the client's reply queue.
#[tokio::test]
async fn rpc_from_an_amqp_client_to_an_mqtt_device_and_back() {
    let (_conn, ch, x, queue) = setup().await;
    let reply_queue = format!("rpcr.{}", unique("c").replace('-', ""));
    ch.queue_declare(
        ShortString::from(reply_queue.as_str()),
        QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .expect("reply queue");
    let rules = "  - name: replies\n    from: \"rpcr/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"\"\n";
    let app = start(&config(AMQP_URL, rules, &source(&queue, &x, ""))).await;
    let mut dev = subscriber(&app, "rpc-dev", "devices/d1/req", QoS::AtLeastOnce).await;

    let request = BasicProperties::default()
        .with_reply_to(ShortString::from(reply_queue.as_str()))
        .with_correlation_id(ShortString::from("k-42"));
    amqp_publish(&ch, &x, "devices.d1.req", b"ping", request).await;
    let p = expect_publish(&mut dev).await;
    assert_eq!(&p.payload[..], b"ping");
    let response_topic = p.properties.response_topic.clone().expect("response topic");
    assert_eq!(response_topic, reply_queue.replace('.', "/"));
    let corr = p.properties.correlation_data.clone().expect("correlation data");
    assert_eq!(&corr[..], b"k-42");
    puback(&mut dev, &p).await;

    let mut answer = publish_packet(&response_topic, QoS::AtLeastOnce, 9, b"pong");
    answer.properties = Properties { correlation_data: Some(corr), ..Properties::default() }.into();
    dev.send(&Packet::Publish(answer)).await;
    match dev.recv().await {
        Some(Packet::PubAck(a)) => assert!(a.code.is_success(), "{a:?}"),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    let reply = get(&ch, &reply_queue, Duration::from_secs(5)).await.expect("reply reached AMQP");
    assert_eq!(reply.data, b"pong");
    let corr = reply.properties.correlation_id().clone().expect("correlation id");
    assert_eq!(corr.as_str(), "k-42");
    app.stop().await;
    delete_queue(&ch, &queue).await;
}

#[tokio::test]
async fn a_source_survives_a_lost_connection_and_unacked_messages_come_again() {
    let (_conn, ch, x, queue) = setup().await;
    let proxy = crate::support::proxy::Proxy::start().await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let app = start(&config(&url, "", &source(&queue, &x, ""))).await;
    let mut c = subscriber(&app, "rc", "rc/#", QoS::AtLeastOnce).await;
    amqp_publish(&ch, &x, "rc.1", b"one", BasicProperties::default()).await;
    let first = expect_publish(&mut c).await;
    assert_eq!(&first.payload[..], b"one");

    proxy.cut();
    wait_metric(&app, "mqgate_source_connected{source=\"s\"} 0").await;
    // Acking now reaches nobody: that delivery belonged to the lost connection.
    puback(&mut c, &first).await;
    amqp_publish(&ch, &x, "rc.2", b"two", BasicProperties::default()).await;
    proxy.restore();
    wait_metric(&app, "mqgate_source_connected{source=\"s\"} 1").await;
    let mut got = Vec::new();
    while let Some(p) = maybe_publish(&mut c, Duration::from_secs(2)).await {
        puback(&mut c, &p).await;
        got.push(p.payload.to_vec());
    }
    got.sort();
    assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()], "redelivered and new");
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"delivered\"} 2").await;
    app.stop().await;
    assert_eq!(ready(&ch, &queue).await, 0);
    delete_queue(&ch, &queue).await;
}

#[tokio::test]
async fn source_config_errors_have_line_and_column() {
    let text = "mqtt:\n  listen: \"127.0.0.1:0\"\namqp:\n  rabbit:\n    url: \"amqp://h\"\nsources:\n  - name: a\n    broker: nope\n    queue: q\n    prefetch: 0\n    topic: \"x/{{ what }}\"\n    qos: 3\n";
    let e = Config::parse(Path::new("s.yaml"), text).unwrap_err();
    let at: Vec<(u64, u64)> = e.0.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(at, vec![(8, 13), (10, 15), (12, 10), (11, 12)], "{e}");
    assert!(e.to_string().contains("no broker \"nope\""), "{e}");
    assert!(e.to_string().contains("unknown variable what"), "{e}");
    let text = text.replace("    qos: 3\n", "    mode: sometimes\n");
    let e = Config::parse(Path::new("s.yaml"), &text).unwrap_err();
    assert!(e.to_string().starts_with("s.yaml:12:"), "{e}");
}

/// mqgate's source is one consumer among others on a queue (competing consumers).
#[tokio::test]
async fn a_plain_amqp_consumer_and_the_source_share_a_queue_fairly() {
    // Competing consumers: mqgate's source is one consumer among others on the queue.
    let (conn, ch, x, queue) = setup().await;
    let app = start(&config(AMQP_URL, "", &source(&queue, &x, "    prefetch: 1\n"))).await;
    let mut c = subscriber(&app, "fair", "f/#", QoS::AtLeastOnce).await;
    let other = conn.create_channel().await.expect("channel");
    other.basic_qos(1, Default::default()).await.expect("qos");
    let mut consumer = other
        .basic_consume(
            ShortString::from(queue.as_str()),
            ShortString::from("other"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..4u8 {
        amqp_publish(&ch, &x, "f.1", &[i], BasicProperties::default()).await;
    }
    let mut mqtt = 0;
    while let Some(p) = maybe_publish(&mut c, Duration::from_millis(500)).await {
        puback(&mut c, &p).await;
        mqtt += 1;
    }
    let mut amqp = 0;
    use futures::StreamExt;
    while let Ok(Some(Ok(d))) =
        tokio::time::timeout(Duration::from_millis(500), consumer.next()).await
    {
        d.ack(BasicAckOptions::default()).await.expect("ack");
        amqp += 1;
    }
    assert_eq!(mqtt + amqp, 4);
    assert!(mqtt >= 1 && amqp >= 1, "both consumers got work: mqtt {mqtt}, amqp {amqp}");
    app.stop().await;
    delete_queue(&ch, &queue).await;
}

#[tokio::test]
async fn a_delivery_the_subscriber_refuses_goes_by_the_failure_policy() {
    let conn = rabbit().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default()).await.expect("confirms");
    let x = exchange(&ch).await;
    let (_, dlx, dlq) = exchange_with_queue(&conn, "#").await;
    let queue = unique("mqgate-src-q");
    let src = format!(
        "  - name: s\n    broker: rabbit\n    queue: \"{queue}\"\n    on_failure: dead_letter\n    declare:\n      durable: false\n      arguments:\n        x-dead-letter-exchange: \"{dlx}\"\n        x-expires: {QUEUE_EXPIRES_MS}\n    bind:\n      - exchange: \"{x}\"\n"
    );
    let app = start(&config(AMQP_URL, "", &src)).await;
    let mut c = subscriber(&app, "refuses", "r/#", QoS::AtLeastOnce).await;
    amqp_publish(&ch, &x, "r.1", b"no thanks", BasicProperties::default()).await;
    let p = expect_publish(&mut c).await;
    // MQTT 5 PUBACK 0x80 (unspecified error): the client did not take it.
    let refusal = PubResponse { code: ReasonCode(0x80), ..PubResponse::success(p.packet_id) };
    c.send(&Packet::PubAck(refusal)).await;
    let dead = get(&ch, &dlq, Duration::from_secs(5)).await.expect("dead-lettered");
    assert_eq!(dead.data, b"no thanks");
    wait_metric(&app, "mqgate_source_messages_total{source=\"s\",outcome=\"dead_lettered\"} 1")
        .await;
    assert!(!metrics(&app).await.contains("outcome=\"delivered\"} 1"), "a refusal is no success");
    app.stop().await;
    delete_queue(&ch, &queue).await;
}
