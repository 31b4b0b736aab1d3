//! The AMQP 1.0 target (`amqp10:`) against RabbitMQ's AMQP 1.0 support on the machine's broker
//! (3.x: the `rabbitmq_amqp1_0` plugin, which scripts/test.sh enables; 4.x: native). Queues
//! are declared with unique names over AMQP 0-9-1 (lapin) and read back over AMQP 1.0
//! (an fe2o3-amqp receiver), so the mapped properties are seen as an AMQP 1.0 consumer sees
//! them. Faults come from the TCP proxy the test controls; RabbitMQ itself is never changed.

use std::time::Duration;

use bytes::Bytes;
use fe2o3_amqp::types::messaging::{Body, MessageId};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Session};
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use mqgate::mqtt::codec::{Packet, Properties, ProtocolVersion, QoS, ReasonCode};

use crate::support::proxy::Proxy;
use crate::support::*;

/// RabbitMQ's AMQP 1.0 listener (the same port as 0-9-1).
const AMQP10_URL: &str = "amqp://guest:guest@127.0.0.1:5672";

/// Declares a durable, non-exclusive queue (deleted by the returned guard) with `args`.
async fn queue(conn: &lapin::Connection, prefix: &str, args: FieldTable) -> (String, DeleteQueues) {
    let name = unique(prefix);
    let guard = delete_queues_on_drop(&[&name]);
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        ShortString::from(name.as_str()),
        QueueDeclareOptions { durable: true, ..Default::default() },
        args,
    )
    .await
    .expect("declare queue");
    (name, guard)
}

/// Checks that RabbitMQ speaks AMQP 1.0 here; fails (never skips) with how to fix it.
async fn amqp10_connection() -> fe2o3_amqp::connection::ConnectionHandle<()> {
    let open = Connection::open("mqgate-test", AMQP10_URL);
    match tokio::time::timeout(Duration::from_secs(10), open).await {
        Ok(Ok(c)) => c,
        other => panic!(
            "RabbitMQ does not speak AMQP 1.0 on 127.0.0.1:5672 ({other:?}); run scripts/test.sh, which enables the rabbitmq_amqp1_0 plugin on RabbitMQ 3.x"
        ),
    }
}

/// Receives `n` messages from queue `name` over AMQP 1.0 (accepting them), waiting up to
/// `wait` for each.
async fn receive(
    name: &str,
    n: usize,
    wait: Duration,
) -> Vec<fe2o3_amqp::types::messaging::Message<Body<Value>>> {
    // Every step bounded: a close the broker never answers must fail the test, not hang it.
    const STEP: Duration = Duration::from_secs(10);
    let mut conn = amqp10_connection().await;
    let mut session = tokio::time::timeout(STEP, Session::begin(&mut conn))
        .await
        .expect("session begins in time")
        .expect("session");
    let attach = Receiver::attach(&mut session, unique("rx"), format!("/amq/queue/{name}"));
    let mut rx = tokio::time::timeout(STEP, attach)
        .await
        .expect("receiver attaches in time")
        .expect("receiver");
    let mut got = Vec::new();
    while got.len() < n {
        let Ok(r) = tokio::time::timeout(wait, rx.recv::<Body<Value>>()).await else { break };
        let d = r.expect("delivery");
        tokio::time::timeout(STEP, rx.accept(&d)).await.expect("accept in time").expect("accept");
        got.push(d.into_message());
    }
    let _ = tokio::time::timeout(STEP, rx.close()).await;
    let _ = tokio::time::timeout(STEP, session.end()).await;
    let _ = tokio::time::timeout(STEP, conn.close()).await;
    got
}

fn body_text(m: &fe2o3_amqp::types::messaging::Message<Body<Value>>) -> String {
    match &m.body {
        Body::Data(batch) => {
            batch.iter().map(|d| String::from_utf8_lossy(&d.0).into_owned()).collect()
        }
        other => panic!("expected a data section, got {other:?}"),
    }
}

fn config(url: &str, store: Option<&std::path::Path>, rules: &str) -> String {
    let store = store.map_or(String::new(), |p| format!("store:\n  path: \"{}\"\n", p.display()));
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n{store}amqp10:\n  rabbit:\n    url: \"{url}\"\n    reconnect_max: 300ms\nrules:\n{rules}"
    )
}

async fn messages_in(conn: &lapin::Connection, name: &str) -> u32 {
    // Bounded, and the channel closed again: the callers poll this in a loop.
    let count = async {
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        let _ = ch.close(200, "ok".into()).await;
        q.message_count()
    };
    tokio::time::timeout(Duration::from_secs(10), count).await.expect("queue count in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_is_acknowledged_only_after_accepted_with_properties_mapped() {
    let conn = rabbit().await;
    let (q, _guard) = queue(&conn, "mqgate-test-a10", FieldTable::default()).await;
    let proxy = Proxy::start().await;
    let url = format!("amqp://guest:guest@{}", proxy.addr);
    let rules = "  - name: to-q\n    from: \"a10/#\"\n    to:\n      - amqp10: { broker: rabbit, address: \"/amq/queue/{{ topic[1] }}\", ttl: 60s }\n";
    let app = gateway(&config(&url, None, rules)).await;
    wait_ready(&app).await;

    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "a10-props").await;
    let publish = |id: u16| {
        let mut p = publish_packet(&format!("a10/{q}"), QoS::AtLeastOnce, id, b"{\"t\":21}");
        p.properties = Properties {
            content_type: Some("application/json".into()),
            correlation_data: Some(Bytes::from_static(b"req-7")),
            response_topic: Some("replies/dev-1".into()),
            user_properties: vec![("site".into(), "north".into())],
            ..Properties::default()
        }
        .into();
        Packet::Publish(p)
    };
    // The first message attaches the link.
    c.send(&publish(1)).await;
    match c.recv_within(Duration::from_secs(10)).await {
        Ok(Some(Packet::PubAck(a))) => assert_eq!((a.packet_id, a.code), (1, ReasonCode::SUCCESS)),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // Then the broker's answers are held: the next message reaches the queue, its outcome
    // does not reach mqgate, and the device hears nothing until it does.
    proxy.pause_to_client.send_replace(true);
    c.send(&publish(2)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while messages_in(&conn, &q).await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the message never reached the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    expect_silence(&mut c, Duration::from_millis(500)).await;
    proxy.pause_to_client.send_replace(false);
    match c.recv_within(Duration::from_secs(10)).await {
        Ok(Some(Packet::PubAck(a))) => assert_eq!((a.packet_id, a.code), (2, ReasonCode::SUCCESS)),
        other => panic!("expected PUBACK after the accepted outcome, got {other:?}"),
    }

    let got = receive(&q, 2, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 2, "the messages are in the queue");
    let m = &got[1];
    assert_eq!(body_text(m), "{\"t\":21}");
    let h = m.header.as_ref().expect("header");
    assert!(h.durable, "QoS 1 is durable");
    let ttl = h.ttl.expect("ttl from the target");
    assert!((1..=60_000).contains(&ttl), "{ttl}");
    let props = m.properties.as_ref().expect("properties");
    assert_eq!(props.content_type.as_ref().map(|s| s.0.as_str()), Some("application/json"));
    assert_eq!(props.correlation_id, Some(MessageId::String("req-7".into())));
    assert_eq!(props.reply_to.as_deref(), Some("replies/dev-1"));
    assert_eq!(props.subject.as_deref(), Some(format!("a10/{q}").as_str()));
    let app_props = &m.application_properties.as_ref().expect("application properties").0;
    assert_eq!(app_props.get("site"), Some(&SimpleValue::String("north".into())));
    assert_eq!(app_props.get("x-mqtt-topic"), Some(&SimpleValue::String(format!("a10/{q}"))));
    assert_eq!(app_props.get("x-mqtt-client-id"), Some(&SimpleValue::String("a10-props".into())));
    assert_eq!(app_props.get("x-mqtt-qos"), Some(&SimpleValue::Int(1)));
    let metrics = metrics(&app).await;
    assert!(
        metrics.contains("mqgate_amqp10_messages_total{broker=\"rabbit\",outcome=\"accepted\"} 2"),
        "{metrics}"
    );
    app.stop().await;
}

/// The dead letters the admin API lists, waiting until there are `n`.
async fn wait_letters(app: &mqgate::app::App, n: usize) -> Vec<serde_json::Value> {
    let url = format!("http://{}/dead-letters", app.admin_addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(&url).await.expect("API").text().await.expect("body");
        let v: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let letters = v["dead_letters"].as_array().cloned().unwrap_or_default();
        if letters.len() >= n {
            return letters;
        }
        assert!(tokio::time::Instant::now() < deadline, "expected {n} dead letters: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_the_broker_refuses_is_a_final_failure_with_its_reason_and_a_dead_letter() {
    let conn = rabbit().await;
    let (q, _guard) = queue(&conn, "mqgate-test-a10-after", FieldTable::default()).await;
    let missing = unique("mqgate-test-missing");
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = format!(
        "  - name: miss\n    from: \"miss/#\"\n    to:\n      - amqp10: {{ broker: rabbit, address: \"/exchange/{missing}/k\" }}\n  - name: ok\n    from: \"ok/#\"\n    to:\n      - amqp10: {{ broker: rabbit, address: \"/amq/queue/{q}\" }}\n"
    );
    let app = gateway(&config(AMQP10_URL, Some(dir.path()), &rules)).await;
    wait_ready(&app).await;

    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "a10-miss").await;
    c.publish("miss/1", QoS::AtLeastOnce, 1, b"lost").await;
    let ack = match c.recv_within(Duration::from_secs(10)).await {
        Ok(Some(Packet::PubAck(a))) => a,
        other => panic!("expected a negative PUBACK, got {other:?}"),
    };
    assert_eq!((ack.packet_id, ack.code), (1, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR));
    let reason = ack.properties.reason_string.clone().unwrap_or_default();
    assert!(reason.contains("amqp:not-found") && reason.contains(&missing), "{reason}");

    // Kept as a dead letter with the broker's reason and the target's id.
    let letters = wait_letters(&app, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let text = letters[0].to_string();
    assert!(text.contains("amqp:not-found"), "{text}");
    assert!(text.contains(&format!("miss/amqp10:rabbit//exchange/{missing}/k")), "{text}");

    // RabbitMQ 3.x ended the session for it: the next message (another address) is sent on
    // a new one. While that is being opened (slow under load) the message is a retryable
    // failure (DISCONNECT 0x89, "not connected; resend it"): the client resends, as a device
    // would, and it is delivered once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        c.publish("ok/1", QoS::AtLeastOnce, 2, b"fine").await;
        match c.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAck(a))) => {
                assert_eq!((a.packet_id, a.code), (2, ReasonCode::SUCCESS));
                break;
            }
            Ok(Some(Packet::Disconnect(d)))
                if d.code == ReasonCode::SERVER_BUSY
                    && tokio::time::Instant::now() < deadline
                    && d.properties
                        .reason_string
                        .as_deref()
                        .is_some_and(|r| r.contains("not connected")) =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "a10-miss").await;
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    assert_eq!(receive(&q, 1, Duration::from_secs(10)).await.len(), 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_without_an_outcome_is_never_acknowledged() {
    let conn = rabbit().await;
    // One message fits; RabbitMQ nacks the next (reject-publish). RabbitMQ 3.x's AMQP 1.0
    // plugin does not settle such a transfer at all (4.x answers `rejected`): the outcome
    // timeout turns it into a retryable failure, never a success.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    let (q, _guard) = queue(&conn, "mqgate-test-a10-full", args).await;
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\namqp10:\n  rabbit:\n    url: \"{AMQP10_URL}\"\n    outcome_timeout: 3s\nrules:\n  - name: full\n    from: \"full/#\"\n    to:\n      - amqp10: {{ broker: rabbit, address: \"/amq/queue/{q}\" }}\n"
    );
    let app = gateway(&yaml).await;
    wait_ready(&app).await;

    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "a10-full").await;
    c.publish("full/1", QoS::AtLeastOnce, 1, b"first").await;
    c.publish("full/1", QoS::AtLeastOnce, 2, b"second").await;
    match c.recv_within(Duration::from_secs(10)).await {
        Ok(Some(Packet::PubAck(a))) => assert_eq!((a.packet_id, a.code), (1, ReasonCode::SUCCESS)),
        other => panic!("expected PUBACK 1, got {other:?}"),
    }
    match c.recv_within(Duration::from_secs(10)).await {
        Ok(Some(Packet::Disconnect(d))) => {
            assert_eq!(d.code, ReasonCode::SERVER_BUSY, "{d:?}");
            let reason = d.properties.reason_string.clone().unwrap_or_default();
            assert!(reason.contains("outcome_timeout"), "{reason}");
        }
        other => panic!("expected DISCONNECT 0x89 (retryable), never PUBACK 2: {other:?}"),
    }
    let m = metrics(&app).await;
    assert!(
        m.contains("mqgate_amqp10_messages_total{broker=\"rabbit\",outcome=\"failed\"} 1"),
        "{m}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_messages_survive_an_amqp10_broker_unreachable_at_start_in_order() {
    let conn = rabbit().await;
    let (q, _guard) = queue(&conn, "mqgate-test-a10-spool", FieldTable::default()).await;
    let proxy = Proxy::start().await;
    proxy.cut();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("amqp://guest:guest@{}", proxy.addr);
    let rules = format!(
        "  - name: s\n    from: \"sensors/#\"\n    ack: spool\n    to:\n      - amqp10: {{ broker: rabbit, address: \"/amq/queue/{q}\" }}\n"
    );
    let app = gateway(&config(&url, Some(dir.path()), &rules)).await;
    let (status, body) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
    assert_eq!(status, 503, "not ready while the broker is unreachable: {body}");
    assert!(body.contains("amqp10 rabbit"), "{body}");

    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "a10-spool").await;
    let n = 200u16;
    for i in 0..n {
        let text = format!("{}:{}", i % 2, i / 2);
        c.publish(&format!("sensors/{}", i % 2), QoS::AtLeastOnce, i + 1, text.as_bytes()).await;
    }
    for _ in 0..n {
        match c.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAck(a))) => assert_eq!(a.code, ReasonCode::SUCCESS),
            other => panic!("expected PUBACK (spooled) while the broker is down, got {other:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    wait_ready(&app).await;

    let got = receive(&q, usize::from(n), Duration::from_secs(20)).await;
    let texts: Vec<String> = got.iter().map(body_text).collect();
    let mut seen = std::collections::HashSet::new();
    let mut last = [-1i64; 2];
    for t in &texts {
        if !seen.insert(t.clone()) {
            continue;
        }
        let (topic, i) = t.split_once(':').expect("topic:index");
        let (topic, i): (usize, i64) = (topic.parse().expect("topic"), i.parse().expect("index"));
        assert!(i > last[topic], "topic {topic}: {i} after {}", last[topic]);
        last[topic] = i;
    }
    assert_eq!(seen.len(), usize::from(n), "every message arrived ({} copies)", texts.len());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_link_holds_back_its_own_rule_only() {
    let conn = rabbit().await;
    let (slow_q, _g1) = queue(&conn, "mqgate-test-a10-slow", FieldTable::default()).await;
    let (fast_q, _g2) = queue(&conn, "mqgate-test-a10-fast", FieldTable::default()).await;
    let proxy = Proxy::start().await;
    // Two brokers entries: `slow` through the proxy (whose answers the test holds back, so no
    // outcome and no new credit arrive), `fast` direct. A small unsettled window and queue.
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\namqp10:\n  slow:\n    url: \"amqp://guest:guest@{}\"\n    max_unsettled: 2\n    queue: 4\n  fast:\n    url: \"{AMQP10_URL}\"\nrules:\n  - name: slow\n    from: \"slow/#\"\n    to:\n      - amqp10: {{ broker: slow, address: \"/amq/queue/{slow_q}\" }}\n  - name: fast\n    from: \"fast/#\"\n    to:\n      - amqp10: {{ broker: fast, address: \"/amq/queue/{fast_q}\" }}\n",
        proxy.addr
    );
    let app = gateway(&yaml).await;
    wait_ready(&app).await;

    proxy.pause_to_client.send_replace(true);
    let mut slow = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "a10-slow").await;
    for i in 1..=20u16 {
        slow.publish("slow/x", QoS::AtLeastOnce, i, b"s").await;
    }
    expect_silence(&mut slow, Duration::from_millis(500)).await;

    let mut fast = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "a10-fast").await;
    for i in 1..=50u16 {
        fast.publish("fast/x", QoS::AtLeastOnce, i, b"f").await;
    }
    for i in 1..=50u16 {
        match fast.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::PubAck(a))) => {
                assert_eq!((a.packet_id, a.code), (i, ReasonCode::SUCCESS))
            }
            other => panic!("the other rule stalled: {other:?}"),
        }
    }
    proxy.pause_to_client.send_replace(false);
    for _ in 1..=20u16 {
        match slow.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAck(a))) => assert_eq!(a.code, ReasonCode::SUCCESS),
            other => panic!("expected the held PUBACKs once the broker answers, got {other:?}"),
        }
    }
    app.stop().await;
}

#[test]
fn mqgate_route_explains_the_address_and_connects_nowhere() {
    let broker = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("route.yaml");
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\namqp10:\n  artemis:\n    url: \"amqp://user:pass@{}\"\nrules:\n  - name: to-artemis\n    from: \"sensors/#\"\n    to:\n      - amqp10: {{ broker: artemis, address: \"telemetry.{{{{ topic[1] }}}}\", ttl: 30s }}\n",
        broker.local_addr().expect("addr")
    );
    std::fs::write(&path, yaml).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["route", "--config"])
        .arg(&path)
        .args(["--topic", "sensors/dev1/temp", "--payload", "21", "--qos", "1", "--json"])
        .output()
        .expect("run mqgate route");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let t = &r["rules"][0]["targets"][0];
    assert_eq!(t["kind"], "amqp10", "{r:#}");
    assert_eq!(t["id"], "to-artemis/amqp10:artemis/telemetry.{{ topic[1] }}");
    assert_eq!(t["fields"]["broker"], "artemis");
    assert_eq!(t["fields"]["address"], "telemetry.dev1");
    assert_eq!(t["fields"]["durable"], true);
    assert_eq!(t["fields"]["ttl_ms"], 30_000);
    broker.set_nonblocking(true).expect("nonblocking");
    let touched = broker.accept();
    assert!(
        matches!(&touched, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the dry-run connected to the broker: {touched:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_anonymous_connects_and_a_refused_login_shows_in_readyz_without_the_password() {
    let _ = amqp10_connection().await;
    let yaml = "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\namqp10:\n  anon:\n    url: \"amqp://127.0.0.1:5672\"\n  bad:\n    url: \"amqp://guest:not-the-password@127.0.0.1:5672\"\n";
    let app = gateway(yaml).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (_, body) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
        if body.contains("amqp10 anon: connected") && body.contains("amqp10 bad: disconnected (") {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains("SASL"), "{body}");
    assert!(!body.contains("not-the-password"), "{body}");
    app.stop().await;
}

/// Polls `/metrics` until it holds `series` (10 s at most).
async fn wait_series(app: &mqgate::app::App, series: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(app).await;
        if m.contains(series) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {series} in\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An AMQP 1.0 source (a receiver link on `/amq/queue/Q`): a message sent to the queue over
/// AMQP 1.0 reaches an MQTT subscriber (topic from its `subject`, QoS from `x-mqtt-qos`); it is
/// `released` back to the queue when its subscriber leaves without PUBACK, delivered again
/// to the next one, and `accepted` only after that one's PUBACK: once mqgate has stopped, the
/// queue is empty (an unsettled delivery would have gone back to it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp10_source_publishes_to_mqtt_and_accepts_only_after_the_puback() {
    use fe2o3_amqp::types::messaging::{ApplicationProperties, Data, Message, Properties};
    use fe2o3_amqp::types::primitives::{Binary, OrderedMap};
    use fe2o3_amqp::Sender;
    let conn = rabbit().await;
    let (q, _guard) = queue(&conn, "a10-source", FieldTable::default()).await;
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\namqp10:\n  rabbit:\n    url: \"{AMQP10_URL}\"\nsources:\n  - name: cmds\n    amqp10: rabbit\n    address: \"/amq/queue/{q}\"\n    qos: 0\n    requeue_delay: 200ms\n"
    );
    let app = gateway(&yaml).await;
    wait_series(&app, "mqgate_source_connected{source=\"cmds\"} 1").await;

    let mut first = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("sub1")).await;
    first.subscribe("cmd/#", QoS::AtLeastOnce).await;
    // Sent over AMQP 1.0, as a device's back end would.
    let mut c = amqp10_connection().await;
    let mut session = Session::begin(&mut c).await.expect("session");
    let mut tx = Sender::attach(&mut session, unique("tx"), format!("/amq/queue/{q}"))
        .await
        .expect("sender");
    let mut app_props = OrderedMap::new();
    app_props.insert("x-mqtt-qos".to_owned(), SimpleValue::Int(1));
    let m = Message::builder()
        .properties(Properties { subject: Some("cmd/dev1".into()), ..Default::default() })
        .application_properties(ApplicationProperties(app_props))
        .body(Data(Binary::from(b"open the valve".to_vec())))
        .build();
    let outcome = tx.send(m).await.expect("send");
    assert!(outcome.is_accepted(), "{outcome:?}");
    let _ = tx.close().await;
    let _ = session.end().await;
    let _ = c.close().await;

    let p = expect_publish(&mut first).await;
    assert_eq!((p.topic.as_str(), &p.payload[..]), ("cmd/dev1", &b"open the valve"[..]));
    assert_eq!(p.qos, QoS::AtLeastOnce, "QoS from x-mqtt-qos, not the source's qos: 0");
    // Held unsettled by mqgate: not ready in the queue.
    assert_eq!(messages_in(&conn, &q).await, 0);
    // The subscriber leaves without PUBACK (clean session): released, and delivered again.
    drop(first);
    wait_series(&app, "mqgate_source_messages_total{source=\"cmds\",outcome=\"requeued\"}").await;
    let mut second = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("sub2")).await;
    second.subscribe("cmd/#", QoS::AtLeastOnce).await;
    let p = match second.recv_within(Duration::from_secs(10)).await {
        Ok(Some(Packet::Publish(p))) => p,
        other => panic!("expected the released message again, got {other:?}"),
    };
    assert_eq!(&p.payload[..], b"open the valve");
    second.send(&Packet::PubAck(mqgate::mqtt::codec::PubResponse::success(p.packet_id))).await;
    wait_series(&app, "mqgate_source_messages_total{source=\"cmds\",outcome=\"delivered\"} 1")
        .await;
    expect_silence(&mut second, Duration::from_millis(700)).await;
    app.stop().await;
    assert_eq!(messages_in(&conn, &q).await, 0, "accepted: nothing went back to the queue");
}

#[test]
fn amqp10_source_config_errors_have_positions() {
    let yaml = "mqtt:\n  listen: \"127.0.0.1:1883\"\namqp10:\n  rabbit:\n    url: \"amqp://h:5672\"\nsources:\n  - name: a\n    amqp10: nope\n    address: \"/amq/queue/x\"\n  - name: b\n    amqp10: rabbit\n    queue: q\n  - name: c\n    amqp10: rabbit\n    address: \"/q\"\n    topic: \"cmd/+\"\n";
    let e = mqgate::config::Config::parse(std::path::Path::new("c.yaml"), yaml)
        .unwrap_err()
        .to_string();
    assert!(e.contains("c.yaml:8:") && e.contains("no broker \"nope\" under amqp10:"), "{e}");
    assert!(e.contains("an AMQP 1.0 source needs `address:`"), "{e}");
    assert!(e.contains("c.yaml:12:") && e.contains("`queue:` is for AMQP 0-9-1 sources"), "{e}");
    assert!(e.contains("c.yaml:16:") && e.contains("topic"), "{e}");
}

/// `on_no_subscriber: dead_letter`: a message nobody subscribed to is `rejected`, which
/// RabbitMQ dead-letters into the queue's dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp10_source_rejects_what_nobody_subscribed_to_into_the_dead_letter_queue() {
    use fe2o3_amqp::types::messaging::{Data, Message, Properties};
    use fe2o3_amqp::types::primitives::Binary;
    use fe2o3_amqp::Sender;
    let conn = rabbit().await;
    let (dlq, _dlq_guard) = queue(&conn, "a10-dlq", FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(dlq.as_str().into()));
    let (q, _guard) = queue(&conn, "a10-source-dl", args).await;
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\namqp10:\n  rabbit:\n    url: \"{AMQP10_URL}\"\nsources:\n  - name: dl\n    amqp10: rabbit\n    address: \"/amq/queue/{q}\"\n    on_no_subscriber: dead_letter\n"
    );
    let app = gateway(&yaml).await;
    wait_series(&app, "mqgate_source_connected{source=\"dl\"} 1").await;
    let mut c = amqp10_connection().await;
    let mut session = Session::begin(&mut c).await.expect("session");
    let mut tx = Sender::attach(&mut session, unique("tx"), format!("/amq/queue/{q}"))
        .await
        .expect("sender");
    let m = Message::builder()
        .properties(Properties { subject: Some("nobody/here".into()), ..Default::default() })
        .body(Data(Binary::from(b"unheard".to_vec())))
        .build();
    assert!(tx.send(m).await.expect("send").is_accepted());
    let _ = tx.close().await;
    let _ = session.end().await;
    let _ = c.close().await;
    wait_series(&app, "mqgate_source_messages_total{source=\"dl\",outcome=\"dead_lettered\"} 1")
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while messages_in(&conn, &dlq).await < 1 {
        assert!(tokio::time::Instant::now() < deadline, "nothing dead-lettered into {dlq}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
    assert_eq!(messages_in(&conn, &q).await, 0, "rejected, not requeued");
    let got = receive(&dlq, 1, Duration::from_secs(5)).await;
    assert_eq!(body_text(&got[0]), "unheard");
}

/// A lost connection: what the source had not settled goes back to the queue with the link;
/// the source reconnects and delivers it again (at least once), and settles it after the
/// PUBACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp10_source_reconnects_and_gets_back_what_it_had_not_settled() {
    use fe2o3_amqp::types::messaging::{Data, Message, Properties};
    use fe2o3_amqp::types::primitives::Binary;
    use fe2o3_amqp::Sender;
    let conn = rabbit().await;
    let (q, _guard) = queue(&conn, "a10-source-lost", FieldTable::default()).await;
    let proxy = Proxy::start().await;
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\namqp10:\n  rabbit:\n    url: \"amqp://guest:guest@{}\"\n    reconnect_min: 50ms\n    reconnect_max: 200ms\nsources:\n  - name: lost\n    amqp10: rabbit\n    address: \"/amq/queue/{q}\"\n",
        proxy.addr
    );
    let app = gateway(&yaml).await;
    wait_series(&app, "mqgate_source_connected{source=\"lost\"} 1").await;
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("sub")).await;
    sub.subscribe("lost/#", QoS::AtLeastOnce).await;
    let mut c = amqp10_connection().await;
    let mut session = Session::begin(&mut c).await.expect("session");
    let mut tx = Sender::attach(&mut session, unique("tx"), format!("/amq/queue/{q}"))
        .await
        .expect("sender");
    let m = Message::builder()
        .properties(Properties { subject: Some("lost/1".into()), ..Default::default() })
        .body(Data(Binary::from(b"again".to_vec())))
        .build();
    assert!(tx.send(m).await.expect("send").is_accepted());
    let _ = tx.close().await;
    let _ = session.end().await;
    let _ = c.close().await;
    let first = expect_publish(&mut sub).await;
    assert_eq!(&first.payload[..], b"again");
    // No PUBACK yet: the delivery is unsettled when the connection goes.
    proxy.cut();
    wait_series(&app, "mqgate_source_connected{source=\"lost\"} 0").await;
    proxy.restore();
    wait_series(&app, "mqgate_source_connected{source=\"lost\"} 1").await;
    let again = match sub.recv_within(Duration::from_secs(10)).await {
        Ok(Some(Packet::Publish(p))) => p,
        other => panic!("expected the unsettled message again, got {other:?}"),
    };
    assert_eq!(&again.payload[..], b"again");
    sub.send(&Packet::PubAck(mqgate::mqtt::codec::PubResponse::success(again.packet_id))).await;
    wait_series(&app, "mqgate_source_messages_total{source=\"lost\",outcome=\"delivered\"} 1")
        .await;
    app.stop().await;
    assert_eq!(messages_in(&conn, &q).await, 0, "settled after the PUBACK");
}
