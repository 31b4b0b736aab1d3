//! The HTTP publish API (issue 15, item 3): `POST /api/v1/publish` with the admin token or a
//! `users:` entry (HTTP Basic), through the same routing as an MQTT PUBLISH: a real MQTT
//! subscriber and a real RabbitMQ queue get the messages; the answer carries the PUBACK's
//! reason code (ACL 0x87 → 403, wrong password → 401, a target that is down → 503, a target
//! that refuses → 502, over the rate → 429); the batch form answers each message.

use std::time::Duration;

use base64::Engine;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS};
use serde_json::{json, Value};

use crate::support::webhook::{Reply, Webhook};
use crate::support::*;

const TOKEN: &str = "publish-admin-token-0123456789";

fn basic(user: &str, password: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {encoded}")
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// A gateway config: `extra_mqtt` lines, alice (password "wonderland") may publish to
/// `dev/#` only (everyone may subscribe), and `rules`.
fn config(extra_mqtt: &str, rest: &str) -> String {
    let phc = mqgate::auth::passwd::hash_password(b"wonderland").expect("hash");
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n  login_failures_before_backoff: 0\n{extra_mqtt}admin:\n  listen: \"127.0.0.1:0\"\n  token: \"{TOKEN}\"\namqp:\n  rabbit:\n    url: \"{AMQP_URL}\"\nusers:\n  - username: alice\n    password_hash: \"{phc}\"\nacl:\n  - allow: publish\n    user: alice\n    topic: \"dev/#\"\n  - deny: publish\n    user: alice\n    topic: \"#\"\n{rest}"
    )
}

async fn publish(app: &mqgate::app::App, auth: &str, body: Value) -> (u16, String, Value) {
    let (status, head, text) =
        post(app.admin_addr, "/api/v1/publish", Some(auth), &body.to_string()).await;
    let v =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("JSON answer ({e}): {head}\n{text}"));
    (status, head, v)
}

async fn subscriber(app: &mqgate::app::App, filter: &str) -> RawClient {
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("sub")).await;
    c.subscribe(filter, QoS::AtLeastOnce).await;
    c
}

async fn next(c: &mut RawClient) -> (String, Vec<u8>) {
    let p = tokio::time::timeout(Duration::from_secs(5), expect_publish(c))
        .await
        .expect("a PUBLISH within 5 s");
    if p.qos != QoS::AtMostOnce {
        c.send(&Packet::PubAck(mqgate::mqtt::codec::PubResponse::success(p.packet_id))).await;
    }
    (p.topic.clone(), p.payload.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_the_token_or_as_a_user_reaches_subscribers_and_rabbitmq() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "dev.#").await;
    let rules = format!("rules:\n  - name: r1\n    from: \"dev/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{exchange}\"\n");
    let app = gateway(&config("", &rules)).await;
    wait_ready(&app).await;
    let mut sub = subscriber(&app, "dev/#").await;

    let (status, _, v) =
        publish(&app, &bearer(), json!({"topic": "dev/a", "payload": "by token", "qos": 1})).await;
    assert_eq!((status, v["reason_code"].clone()), (200, json!(0)), "{v}");
    assert_eq!(next(&mut sub).await, ("dev/a".to_owned(), b"by token".to_vec()));
    let d = get(&ch, &queue, Duration::from_secs(5)).await.expect("in RabbitMQ");
    assert_eq!((d.data.as_slice(), d.routing_key.as_str()), (&b"by token"[..], "dev.a"));

    let body = json!({"topic": "dev/b", "payload_base64": "AAEC", "qos": 1,
        "properties": {"user_properties": {"k": "v"}, "content_type": "application/octet-stream"}});
    let (status, _, v) = publish(&app, &basic("alice", "wonderland"), body).await;
    assert_eq!((status, v["reason_code"].clone()), (200, json!(0)), "{v}");
    assert_eq!(next(&mut sub).await, ("dev/b".to_owned(), vec![0, 1, 2]));
    let d = get(&ch, &queue, Duration::from_secs(5)).await.expect("in RabbitMQ");
    assert_eq!(d.data, vec![0, 1, 2]);
    assert_eq!(header(&d, "k").as_deref(), Some("v"));

    // QoS 0 is answered once handed over; a topic nobody wants gets 0x10, as a PUBACK would.
    let (status, _, v) = publish(&app, &bearer(), json!({"topic": "dev/c", "payload": "q0"})).await;
    assert_eq!((status, v["reason_code"].clone()), (200, json!(0)), "{v}");
    assert_eq!(next(&mut sub).await.1, b"q0");
    let (status, _, v) = publish(&app, &bearer(), json!({"topic": "nobody/here", "qos": 1})).await;
    assert_eq!((status, v["reason_code"].clone()), (200, json!(0x10)), "{v}");

    // Retained: a later subscriber gets it from the retained store.
    let (status, _, _) = publish(
        &app,
        &bearer(),
        json!({"topic": "dev/state", "payload": "on", "qos": 1, "retain": true}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(next(&mut sub).await.1, b"on");
    let mut late = subscriber(&app, "dev/state").await;
    assert_eq!(next(&mut late).await, ("dev/state".to_owned(), b"on".to_vec()));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refusals_carry_the_reason_code() {
    let webhook = Webhook::ok().await;
    let rules = format!("http:\n  hook:\n    url: \"{}\"\nrules:\n  - name: all\n    from: \"#\"\n    to:\n      - http: {{ endpoint: hook }}\n", webhook.url());
    let app = gateway(&config("", &rules)).await;
    let mut sub = subscriber(&app, "#").await;

    // The ACL: alice may not publish outside dev/ (never routed: no subscriber, no target).
    let (status, _, v) = publish(
        &app,
        &basic("alice", "wonderland"),
        json!({"topic": "ops/x", "payload": "no", "qos": 1}),
    )
    .await;
    assert_eq!((status, v["reason_code"].clone()), (403, json!(0x87)), "{v}");
    // Wrong password, unknown user, no password: 401 with the CONNACK's 0x86.
    for auth in [basic("alice", "wrong"), basic("mallory", "x"), "Basic bm9jb2xvbg==".to_owned()] {
        let (status, head, v) =
            publish(&app, &auth, json!({"topic": "dev/x", "payload": "no"})).await;
        assert_eq!((status, v["reason_code"].clone()), (401, json!(0x86)), "{auth}: {v}");
        assert!(head.to_ascii_lowercase().contains("www-authenticate: basic"), "{head}");
    }
    // A wrong token is the guard's 401.
    let (status, _, _) = post(
        app.admin_addr,
        "/api/v1/publish",
        Some("Bearer wrong-token-0123456789"),
        "{\"topic\": \"a\"}",
    )
    .await;
    assert_eq!(status, 401);
    // Topics as MQTT: no wildcards, no $SYS, not empty.
    for (topic, status_code, code) in
        [("dev/+", 400, 0x90), ("dev/#", 400, 0x90), ("", 400, 0x90), ("$SYS/x", 403, 0x87)]
    {
        let (status, _, v) =
            publish(&app, &bearer(), json!({"topic": topic, "payload": "no", "qos": 1})).await;
        assert_eq!((status, v["reason_code"].clone()), (status_code, json!(code)), "{topic}: {v}");
    }
    // Malformed: 400.
    let (status, _, v) = publish(&app, &bearer(), json!({"topic": "dev/x", "qos": 5})).await;
    assert_eq!((status, v["reason_code"].clone()), (400, json!(0x81)), "{v}");
    let (status, _, v) = publish(&app, &bearer(), json!({"topic": "dev/x", "payload_base64": "/w==", "properties": {"payload_format_indicator": 1}})).await;
    assert_eq!((status, v["reason_code"].clone()), (400, json!(0x99)), "{v}");
    expect_silence(&mut sub, Duration::from_millis(300)).await;
    assert!(webhook.seen().is_empty(), "a refused message reached a target");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_is_down_or_refuses_answers_5xx() {
    // Nothing listens on `down`; `refusing` answers 400 (a final failure).
    let down = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let down_url = format!("http://{}", down.local_addr().expect("addr"));
    drop(down);
    let refusing = Webhook::start(|_, _| Reply::Status(400)).await;
    let rules = format!(
        "http:\n  down:\n    url: \"{down_url}\"\n  refusing:\n    url: \"{}\"\nrules:\n  - name: d\n    from: \"down/#\"\n    to:\n      - http: {{ endpoint: down, retry: {{ attempts: 1 }} }}\n  - name: r\n    from: \"refuse/#\"\n    to:\n      - http: {{ endpoint: refusing }}\n",
        refusing.url()
    );
    let app = gateway(&config("", &rules)).await;
    let (status, head, v) =
        publish(&app, &bearer(), json!({"topic": "down/x", "payload": "p", "qos": 1})).await;
    assert_eq!((status, v["reason_code"].clone()), (503, json!(0x89)), "{v}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    assert!(v["reason"].as_str().is_some_and(|r| r.contains("http endpoint down")), "{v}");
    let (status, _, v) =
        publish(&app, &bearer(), json!({"topic": "refuse/x", "payload": "p", "qos": 1})).await;
    assert_eq!((status, v["reason_code"].clone()), (502, json!(0x83)), "{v}");
    assert_eq!(refusing.seen().len(), 1);
    // QoS 0 promises only the hand-over.
    let (status, _, v) = publish(&app, &bearer(), json!({"topic": "down/x", "payload": "p"})).await;
    assert_eq!((status, v["reason_code"].clone()), (200, json!(0)), "{v}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_form_answers_each_message() {
    let app = gateway(&config("", "")).await;
    let mut sub = subscriber(&app, "dev/#").await;
    let batch = json!([
        {"topic": "dev/1", "payload": "one", "qos": 1},
        {"topic": "ops/2", "payload": "denied", "qos": 1},
        {"topic": "dev/+", "payload": "bad topic"},
        {"topic": "dev/4", "payload": "four", "qos": 1},
    ]);
    let (status, _, v) = publish(&app, &basic("alice", "wonderland"), batch).await;
    assert_eq!(status, 207, "{v}");
    let codes: Vec<(u64, u64)> = v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| (r["status"].as_u64().unwrap_or(0), r["reason_code"].as_u64().unwrap_or(999)))
        .collect();
    assert_eq!(codes, [(200, 0), (403, 0x87), (400, 0x90), (200, 0)]);
    assert_eq!(next(&mut sub).await.1, b"one");
    assert_eq!(next(&mut sub).await.1, b"four", "in order, the refused ones left out");
    let (status, _, v) =
        publish(&app, &bearer(), json!([{"topic": "dev/5", "payload": "five"}])).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(next(&mut sub).await.1, b"five");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_are_rate_limited_like_clients() {
    let app = gateway(&config("  max_publish_rate: 2\n", "")).await;
    // A second's worth (2) goes through and one more may overdraw the bucket, as a PUBLISH
    // does; then 429 with 0x96 until it is back at zero.
    let batch: Vec<Value> =
        (0..6).map(|i| json!({"topic": format!("dev/{i}"), "payload": "x"})).collect();
    let (status, _, v) = publish(&app, &bearer(), Value::Array(batch)).await;
    assert_eq!(status, 207, "{v}");
    let codes: Vec<(u64, u64, u64)> = v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            let n = |k: &str| r[k].as_u64().unwrap_or(0);
            (n("status"), n("reason_code"), n("retry_after"))
        })
        .collect();
    let ok = (200, 0x10, 0);
    let over = (429, 0x96, 1);
    assert_eq!(codes, [ok, ok, ok, over, over, over]);
    let (status, head, v) =
        publish(&app, &bearer(), json!({"topic": "dev/x", "payload": "x"})).await;
    assert_eq!((status, v["reason_code"].clone()), (429, json!(0x96)), "{v}");
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    // Per publisher: alice has a bucket of her own.
    let (status, _, v) =
        publish(&app, &basic("alice", "wonderland"), json!({"topic": "dev/a", "payload": "x"}))
            .await;
    assert_eq!(status, 200, "{v}");
    // And the token's fills again.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (status, _, v) =
        publish(&app, &bearer(), json!({"topic": "dev/later", "payload": "x"})).await;
    assert_eq!(status, 200, "{v}");
    app.stop().await;
}
