//! MQTT in, HTTP out: webhook targets against a real HTTP server (axum) started in each test,
//! which answers as the test says: 2xx, 404, 429 with Retry-After, 500, a redirect, a hang
//! past the timeout; plus a listener that closes every connection. The MQTT side is the raw
//! client on mqgate's codec, so the tests see the exact acks (MQTT 5 reason codes, 3.1.1
//! withheld PUBACKs).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::webhook::{Reply, Request as Seen, Webhook as Server};
use crate::support::*;
use mqgate::config::Config;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// A listener that accepts connections, reads a little and closes them; counts them.
async fn closer() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind closer");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
            drop(s);
        }
    });
    (addr, count)
}

/// A gateway config with endpoint `api` at `url` (extra endpoint lines indented four
/// spaces) and `rules` (a YAML list, unindented).
fn config(url: &str, endpoint_extra: &str, rules: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nhttp:\n  api:\n    url: \"{url}\"\n{endpoint_extra}rules:\n{rules}"
    )
}

/// One rule `r` from `filter` to endpoint `api` with the given target lines (indented ten).
fn rule(filter: &str, target: &str) -> String {
    format!("  - name: r\n    from: \"{filter}\"\n    to:\n      - http:\n          endpoint: api\n{target}")
}

/// The next PUBACK (panics on anything else).
async fn puback(c: &mut RawClient) -> mqgate::mqtt::codec::PubResponse {
    match c.recv().await {
        Some(Packet::PubAck(a)) => a,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// The value of a metric line starting with `prefix` (0 when absent).
async fn metric(app: &mqgate::app::App, prefix: &str) -> f64 {
    let text = metrics(app).await;
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn a_2xx_acknowledges_and_the_request_has_path_body_and_env_headers() {
    let server = Server::ok().await;
    // A variable no other test uses.
    std::env::set_var("MQGATE_TEST_WEBHOOK_TOKEN", "s3cret-token");
    let yaml = config(
        &server.url(),
        "    headers: { Authorization: \"Bearer ${env:MQGATE_TEST_WEBHOOK_TOKEN}\" }\n",
        &rule(
            "sensors/+/alerts",
            "          method: POST\n          path: \"/alerts/{{ topic[1] }}\"\n          headers: { X-Client: \"{{ client_id }}\" }\n          body: raw\n",
        ),
    );
    let app = gateway(&yaml).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "dev-7").await;
    c.publish("sensors/dev7/alerts", QoS::AtLeastOnce, 1, b"\x00fire\xff").await;
    let a = puback(&mut c).await;
    assert_eq!((a.packet_id, a.code), (1, ReasonCode::SUCCESS));
    c.publish("sensors/dev7/alerts", QoS::AtMostOnce, 0, b"zero").await;
    let seen = server.wait_for(2).await;
    let s = &seen[0];
    assert_eq!((s.method.as_str(), s.path.as_str()), ("POST", "/alerts/dev7"));
    assert_eq!(&s.body[..], b"\x00fire\xff", "raw body unchanged");
    assert_eq!(s.header("authorization").as_deref(), Some("Bearer s3cret-token"));
    assert_eq!(s.header("x-client").as_deref(), Some("dev-7"));
    assert_eq!(s.header("content-type").as_deref(), Some("application/octet-stream"));
    assert_eq!(s.header("idempotency-key").map(|k| k.len()), Some(32), "QoS 1 carries a key");
    assert_eq!(&seen[1].body[..], b"zero");
    assert_eq!(seen[1].header("idempotency-key"), None, "QoS 0 has no key");
    let text = metrics(&app).await;
    assert!(
        text.contains(r#"mqgate_http_responses_total{rule="r",endpoint="api",class="2xx"} 2"#),
        "{text}"
    );
    assert!(!text.contains("s3cret"), "the secret is in the metrics");
    app.stop().await;
}

#[tokio::test]
async fn a_404_is_never_acknowledged_as_delivered() {
    let server = Server::start(|_, _| Reply::Status(404)).await;
    let app = gateway(&config(&server.url(), "", &rule("t/#", "          path: /missing\n"))).await;

    // MQTT 5: an error reason code naming the status, and no retry of a 404.
    let mut c5 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "v5-404").await;
    c5.publish("t/a", QoS::AtLeastOnce, 1, b"m").await;
    let a = puback(&mut c5).await;
    assert_eq!(a.code, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR, "{a:?}");
    let reason = a.properties.reason_string.clone().unwrap_or_default();
    assert!(reason.contains("404"), "reason string should give the status: {reason}");
    assert_eq!(server.seen().len(), 1, "a 404 is not retried");

    // MQTT 3.1.1: no negative PUBACK exists, so none is sent and the connection closes.
    let mut c3 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "v3-404").await;
    c3.publish("t/a", QoS::AtLeastOnce, 1, b"m").await;
    match c3.recv().await {
        None => {}
        Some(p) => panic!("3.1.1 client got {p:?} for a 404"),
    }
    assert_eq!(
        metric(&app, r#"mqgate_target_failed_total{rule="r",target="http:api/missing"}"#).await,
        2.0
    );
    assert_eq!(metric(&app, r#"mqgate_target_forwarded_total{rule="r""#).await, 0.0);
    app.stop().await;
}

#[tokio::test]
async fn a_429_with_retry_after_and_a_500_are_retried_with_the_same_idempotency_key() {
    let server = Server::start(|_, before| match before {
        0 => Reply::RetryAfter(429, "1".into()),
        1 => Reply::Status(500),
        _ => Reply::Status(200),
    })
    .await;
    let target = "          path: /in\n          retry: { attempts: 5, initial_backoff: 50ms }\n";
    let app = gateway(&config(&server.url(), "", &rule("t/#", target))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "retry").await;
    let t0 = Instant::now();
    c.publish("t/a", QoS::AtLeastOnce, 9, b"m").await;
    let a = puback(&mut c).await;
    let took = t0.elapsed();
    assert_eq!(a.code, ReasonCode::SUCCESS, "{a:?}");
    assert!(took >= Duration::from_millis(950), "Retry-After: 1 not honoured ({took:?})");
    let seen = server.seen();
    assert_eq!(seen.len(), 3, "{seen:#?}");
    let keys: Vec<_> = seen.iter().map(|s| s.header("idempotency-key")).collect();
    assert!(keys[0].is_some() && keys.iter().all(|k| *k == keys[0]), "keys differ: {keys:?}");
    assert_eq!(metric(&app, r#"mqgate_http_retries_total{rule="r",endpoint="api"}"#).await, 2.0);

    // The client's resend of the same PUBLISH (same packet id) carries the same key.
    c.publish("t/a", QoS::AtLeastOnce, 9, b"m").await;
    assert_eq!(puback(&mut c).await.code, ReasonCode::SUCCESS);
    let seen = server.wait_for(4).await;
    assert_eq!(seen[3].header("idempotency-key"), keys[0]);
    app.stop().await;
}

#[tokio::test]
async fn exhausted_retries_fail_retryable_mqtt5_disconnect_and_311_close() {
    let server = Server::start(|_, _| Reply::Status(503)).await;
    let target = "          retry: { attempts: 3, initial_backoff: 10ms }\n";
    let app = gateway(&config(&server.url(), "", &rule("t/#", target))).await;
    let mut c5 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "v5-503").await;
    c5.publish("t/a", QoS::AtLeastOnce, 1, b"m").await;
    expect_disconnect(&mut c5, ReasonCode::SERVER_BUSY).await;
    assert_eq!(server.seen().len(), 3, "3 attempts");
    let mut c3 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "v3-503").await;
    c3.publish("t/a", QoS::AtLeastOnce, 1, b"m").await;
    assert!(c3.recv().await.is_none(), "3.1.1: connection closed, no PUBACK");
    app.stop().await;
}

#[tokio::test]
async fn a_hang_past_the_timeout_is_retried() {
    let server = Server::start(|_, before| {
        if before == 0 {
            Reply::Hang(Duration::from_secs(3))
        } else {
            Reply::Status(204)
        }
    })
    .await;
    let target = "          retry: { attempts: 3, initial_backoff: 10ms }\n";
    let app = gateway(&config(&server.url(), "    timeout: 300ms\n", &rule("t/#", target))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "hang").await;
    let t0 = Instant::now();
    c.publish("t/a", QoS::AtLeastOnce, 1, b"m").await;
    assert_eq!(puback(&mut c).await.code, ReasonCode::SUCCESS);
    assert!(t0.elapsed() < Duration::from_secs(2), "waited for the hanging answer");
    assert_eq!(server.seen().len(), 2);
    assert_eq!(
        metric(&app, r#"mqgate_http_responses_total{rule="r",endpoint="api",class="error"}"#).await,
        1.0
    );
    app.stop().await;
}

#[tokio::test]
async fn a_closed_connection_is_retried_then_fails_without_an_ack() {
    let (addr, count) = closer().await;
    let target = "          retry: { attempts: 3, initial_backoff: 10ms }\n";
    let url = format!("http://user:pa55word@{addr}");
    let app = gateway(&config(&url, "", &rule("t/#", target))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "closed").await;
    c.publish("t/a", QoS::AtLeastOnce, 1, b"m").await;
    match c.recv().await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.code, ReasonCode::SERVER_BUSY, "{d:?}");
            let reason = d.properties.reason_string.unwrap_or_default();
            assert!(reason.contains("http endpoint api"), "{reason}");
            assert!(!reason.contains("pa55word"), "the URL's password is in the reason: {reason}");
        }
        other => panic!("expected DISCONNECT 0x89, got {other:?}"),
    }
    assert_eq!(count.load(Ordering::SeqCst), 3, "one connection per attempt");
    app.stop().await;
}

#[tokio::test]
async fn messages_of_one_topic_arrive_in_order_across_lanes_and_retries() {
    // Every third message of each topic fails once: its topic's lane retries it before
    // sending anything after it.
    let server = Server::start(|s, before| {
        let n: u32 = s.text().rsplit(':').next().and_then(|n| n.parse().ok()).unwrap_or(0);
        if n.is_multiple_of(3) && before == 0 {
            Reply::Status(500)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let target = "          path: \"/t/{{ topic[1] }}\"\n          concurrency: 4\n          retry: { attempts: 5, initial_backoff: 5ms }\n";
    let app = gateway(&config(&server.url(), "", &rule("o/+", target))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "order").await;
    let topics = ["a", "b", "c", "d", "e"];
    let per_topic = 20u16;
    let mut id = 0u16;
    for i in 0..per_topic {
        for t in topics {
            id += 1;
            c.publish(&format!("o/{t}"), QoS::AtLeastOnce, id, format!("{t}:{i}").as_bytes()).await;
        }
    }
    for expect in 1..=id {
        let a = puback(&mut c).await;
        assert_eq!((a.packet_id, a.code), (expect, ReasonCode::SUCCESS), "acks in PUBLISH order");
    }
    // Every request as the server saw it, per topic: a failed attempt is followed directly by
    // its retry, so after removing adjacent repeats each topic reads 0, 1, 2, ...
    let mut seen_per_topic: HashMap<String, Vec<u32>> = HashMap::new();
    for s in server.seen() {
        let n: u32 = s.text().rsplit(':').next().unwrap().parse().unwrap();
        seen_per_topic.entry(s.path.clone()).or_default().push(n);
    }
    for t in topics {
        let got = &seen_per_topic[&format!("/t/{t}")];
        // Each message appears once, failing ones twice in a row (fail, retry); never out of order.
        let mut dedup = got.clone();
        dedup.dedup();
        assert_eq!(dedup, (0..u32::from(per_topic)).collect::<Vec<_>>(), "topic {t}: {got:?}");
    }
    assert!(metric(&app, r#"mqgate_http_retries_total{rule="r",endpoint="api"}"#).await >= 35.0);
    app.stop().await;
}

#[tokio::test]
async fn batches_are_json_arrays_or_ndjson_and_acknowledged_together() {
    let server = Server::ok().await;
    let rules = format!(
        "{}{}",
        rule(
            "b/json",
            "          path: /batch\n          body: json\n          concurrency: 1\n          batch: { max_messages: 10, max_delay: 300ms }\n"
        ),
        rule(
            "b/nd",
            "          path: /nd\n          body: raw\n          concurrency: 1\n          batch: { max_messages: 100, max_delay: 100ms, format: ndjson }\n"
        )
        .replace("name: r\n", "name: r2\n"),
    );
    let app = gateway(&config(&server.url(), "", &rules)).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "batcher").await;
    for i in 1..=25u16 {
        c.publish("b/json", QoS::AtLeastOnce, i, format!("{{\"n\":{i}}}").as_bytes()).await;
    }
    for i in 1..=25u16 {
        let a = puback(&mut c).await;
        assert_eq!((a.packet_id, a.code), (i, ReasonCode::SUCCESS));
    }
    let seen: Vec<Seen> = server.seen().into_iter().filter(|s| s.path == "/batch").collect();
    assert_eq!(seen.len(), 3, "25 messages in batches of at most 10: {seen:#?}");
    let mut all = Vec::new();
    for s in &seen {
        assert_eq!(s.header("content-type").as_deref(), Some("application/json"));
        assert!(s.header("idempotency-key").is_some());
        let v: serde_json::Value = serde_json::from_slice(&s.body).expect("a JSON array");
        let items = v.as_array().expect("array").clone();
        assert!(items.len() <= 10);
        all.extend(items.into_iter().map(|e| e["payload"]["n"].as_u64().unwrap()));
    }
    assert_eq!(all, (1..=25).collect::<Vec<u64>>(), "every message once, in order");

    c.publish("b/nd", QoS::AtLeastOnce, 100, b"{\"a\": 1}").await;
    c.publish("b/nd", QoS::AtLeastOnce, 101, b"[2]").await;
    assert_eq!(puback(&mut c).await.code, ReasonCode::SUCCESS);
    assert_eq!(puback(&mut c).await.code, ReasonCode::SUCCESS);
    let nd: Vec<Seen> = server.seen().into_iter().filter(|s| s.path == "/nd").collect();
    assert_eq!(nd.len(), 1, "{nd:#?}");
    assert_eq!(nd[0].text(), "{\"a\":1}\n[2]\n");
    assert_eq!(nd[0].header("content-type").as_deref(), Some("application/x-ndjson"));
    app.stop().await;
}

#[tokio::test]
async fn a_failed_batch_fails_every_message_in_it() {
    let server = Server::start(|_, _| Reply::Status(422)).await;
    let target = "          body: json\n          batch: { max_messages: 10, max_delay: 200ms }\n";
    let app = gateway(&config(&server.url(), "", &rule("b/#", target))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "batch-fail").await;
    for i in 1..=3u16 {
        c.publish("b/x", QoS::AtLeastOnce, i, b"1").await;
    }
    for i in 1..=3u16 {
        let a = puback(&mut c).await;
        assert_eq!((a.packet_id, a.code), (i, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR));
    }
    assert_eq!(server.seen().len(), 1, "one request for the batch, not retried (422)");
    app.stop().await;
}

#[tokio::test]
async fn retained_messages_become_put_and_delete_of_the_state() {
    let server = Server::ok().await;
    let target = "          path: \"/state/{{ topic_name }}\"\n          retained_as_state: true\n";
    let app = gateway(&config(&server.url(), "", &rule("s/#", target))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "state").await;
    let mut p = publish_packet("s/a/temp", QoS::AtLeastOnce, 1, b"21.5");
    p.retain = true;
    c.send(&Packet::Publish(p)).await;
    assert_eq!(puback(&mut c).await.code, ReasonCode::SUCCESS);
    let mut p = publish_packet("s/a/temp", QoS::AtLeastOnce, 2, b"");
    p.retain = true;
    c.send(&Packet::Publish(p)).await;
    assert_eq!(puback(&mut c).await.code, ReasonCode::SUCCESS);
    c.publish("s/a/temp", QoS::AtLeastOnce, 3, b"22").await;
    assert_eq!(puback(&mut c).await.code, ReasonCode::SUCCESS);
    let seen = server.wait_for(3).await;
    let got: Vec<(&str, &str, &[u8])> =
        seen.iter().map(|s| (s.method.as_str(), s.path.as_str(), &s.body[..])).collect();
    assert_eq!(
        got,
        vec![
            ("PUT", "/state/s/a/temp", &b"21.5"[..]),
            ("DELETE", "/state/s/a/temp", &b""[..]),
            ("POST", "/state/s/a/temp", &b"22"[..]),
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let server = Server::start(|s, _| {
        if s.path == "/moved" {
            Reply::Redirect("/elsewhere")
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let app = gateway(&config(&server.url(), "", &rule("t/#", "          path: /moved\n"))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "redir").await;
    c.publish("t/a", QoS::AtLeastOnce, 1, b"m").await;
    let a = puback(&mut c).await;
    assert_eq!(a.code, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR, "{a:?}");
    assert!(a.properties.reason_string.clone().unwrap_or_default().contains("302"));
    let paths: Vec<String> = server.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, vec!["/moved"], "the redirect was followed");
    app.stop().await;
}

#[tokio::test]
async fn the_json_envelope_carries_the_message() {
    let server = Server::ok().await;
    let app = gateway(&config(&server.url(), "", &rule("e/#", "          body: json\n"))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "env").await;
    let mut p = publish_packet("e/1", QoS::AtLeastOnce, 1, br#"{"t": 21.5}"#);
    p.properties.user_properties = vec![("site".into(), "north".into())];
    p.properties.content_type = Some("application/json".into());
    c.send(&Packet::Publish(p)).await;
    assert_eq!(puback(&mut c).await.code, ReasonCode::SUCCESS);
    c.publish("e/2", QoS::AtMostOnce, 0, b"\x01\x02binary").await;
    let seen = server.wait_for(2).await;
    let j: serde_json::Value = serde_json::from_slice(&seen[0].body).expect("JSON");
    assert_eq!(seen[0].header("content-type").as_deref(), Some("application/json"));
    assert_eq!(j["topic"], "e/1");
    assert_eq!(j["payload"], serde_json::json!({"t": 21.5}));
    assert_eq!(j["payload_encoding"], "json");
    assert_eq!((j["qos"].as_u64(), j["retain"].as_bool()), (Some(1), Some(false)));
    assert_eq!(j["client_id"], "env");
    assert!(j["username"].is_null());
    assert_eq!(j["user_properties"], serde_json::json!([["site", "north"]]));
    assert_eq!(j["content_type"], "application/json");
    assert!(j["received_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{j}");
    let j: serde_json::Value = serde_json::from_slice(&seen[1].body).expect("JSON");
    assert_eq!(j["payload"], "AQJiaW5hcnk=");
    assert_eq!(j["payload_encoding"], "base64");
    assert_eq!(j["qos"], 0);
    app.stop().await;
}

#[tokio::test]
async fn a_body_template_with_tojson_stays_json_whatever_the_payload_holds() {
    let server = Server::ok().await;
    let body = "          body: '{\"device\": {{ topic[1] | tojson }}, \"text\": {{ payload | tojson }}}'\n          content_type: application/json\n";
    let app = gateway(&config(&server.url(), "", &rule("j/#", body))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "tojson").await;
    let nasty = "quote \" backslash \\ newline \n tab \t ctrl \u{1} </script>";
    c.send(&Packet::Publish(publish_packet("j/dev\"1", QoS::AtLeastOnce, 1, nasty.as_bytes())))
        .await;
    assert_eq!(puback(&mut c).await.code, ReasonCode::SUCCESS);
    let seen = server.wait_for(1).await;
    let j: serde_json::Value = serde_json::from_slice(&seen[0].body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", seen[0].text()));
    assert_eq!(j["device"], "dev\"1");
    assert_eq!(j["text"], nasty);
    app.stop().await;
}

#[tokio::test]
async fn a_full_queue_drops_qos0_with_a_metric_and_makes_qos1_wait() {
    let server = Server::start(|s, _| {
        if s.path == "/slow" {
            Reply::Hang(Duration::from_millis(500))
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let target = "          path: /slow\n          concurrency: 1\n          queue: 2\n";
    let app = gateway(&config(&server.url(), "", &rule("q/#", target))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "full").await;
    for _ in 0..20 {
        c.publish("q/a", QoS::AtMostOnce, 0, b"x").await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&app, r#"mqgate_messages_dropped_total{reason="http_queue_full"}"#).await < 1.0 {
        assert!(Instant::now() < deadline, "no drop counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dropped = metric(&app, r#"mqgate_messages_dropped_total{reason="http_queue_full"}"#).await;
    assert!(dropped >= 15.0, "1 in flight + 2 queued of 20; dropped {dropped}");

    // QoS 1 waits for room instead (backpressure) and is then delivered.
    let mut q1 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "full-1").await;
    for i in 1..=5u16 {
        q1.publish("q/a", QoS::AtLeastOnce, i, b"y").await;
    }
    for i in 1..=5u16 {
        let a = puback(&mut q1).await;
        assert_eq!((a.packet_id, a.code), (i, ReasonCode::SUCCESS));
    }
    assert_eq!(
        metric(&app, r#"mqgate_messages_dropped_total{reason="http_queue_full"}"#).await,
        dropped
    );
    app.stop().await;
}

#[test]
fn config_errors_point_at_the_value() {
    let yaml = "mqtt:\n  listen: \"127.0.0.1:0\"\nhttp:\n  api:\n    url: \"http://127.0.0.1:1\"\nrules:\n  - name: r\n    from: \"t/#\"\n    to:\n      - http:\n          endpoint: nope\n          path: \"/a/{{ topic[1 }}\"\n";
    let e = Config::parse(Path::new("hooks.yaml"), yaml).unwrap_err().to_string();
    assert!(
        e.contains("hooks.yaml:11:21: rule \"r\": no endpoint \"nope\" under http: (defined: api)"),
        "{e}"
    );
    assert!(
        e.contains("hooks.yaml:12:17: rule \"r\": http path: template does not compile"),
        "{e}"
    );
    let yaml = "mqtt:\n  listen: \"127.0.0.1:0\"\nhttp:\n  api:\n    url: \"ftp://x\"\n    headers: { A: \"${env:MQGATE_TEST_SURELY_UNSET}\" }\n";
    let e = Config::parse(Path::new("h.yaml"), yaml).unwrap_err().to_string();
    assert!(e.contains("h.yaml:5:10: http.api.url must start with http:// or https://"), "{e}");
    assert!(e.contains("environment variable MQGATE_TEST_SURELY_UNSET is not set"), "{e}");
}

#[tokio::test]
async fn qos2_gets_its_pubrec_only_after_a_2xx() {
    let server =
        Server::start(
            |s, _| if s.path == "/gone" { Reply::Status(410) } else { Reply::Status(201) },
        )
        .await;
    let rules = format!(
        "{}{}",
        rule("ok/#", "          path: /ok\n"),
        rule("gone/#", "          path: /gone\n").replace("name: r\n", "name: r2\n")
    );
    let app = gateway(&config(&server.url(), "", &rules)).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "qos2").await;
    c.publish("ok/a", QoS::ExactlyOnce, 1, b"m").await;
    match c.recv().await {
        Some(Packet::PubRec(r)) => assert_eq!((r.packet_id, r.code), (1, ReasonCode::SUCCESS)),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    assert_eq!(server.seen().len(), 1, "PUBREC before the request was answered");
    c.publish("gone/a", QoS::ExactlyOnce, 2, b"m").await;
    match c.recv().await {
        Some(Packet::PubRec(r)) => {
            assert_eq!((r.packet_id, r.code), (2, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR))
        }
        other => panic!("expected a failing PUBREC, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn a_retry_after_beyond_max_time_gives_up_at_once() {
    let server = Server::start(|_, _| Reply::RetryAfter(503, "30".into())).await;
    let target = "          retry: { attempts: 10, max_time: 2s }\n";
    let app = gateway(&config(&server.url(), "", &rule("t/#", target))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "later").await;
    let t0 = Instant::now();
    c.publish("t/a", QoS::AtLeastOnce, 1, b"m").await;
    match c.recv().await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.code, ReasonCode::SERVER_BUSY, "{d:?}");
            let reason = d.properties.reason_string.unwrap_or_default();
            assert!(reason.contains("max_time"), "{reason}");
        }
        other => panic!("expected DISCONNECT 0x89, got {other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "waited for a retry it could not make");
    assert_eq!(server.seen().len(), 1);
    app.stop().await;
}
