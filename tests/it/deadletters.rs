//! Dead letters: a message that fails for good (a mandatory publish RabbitMQ returns as
//! unroutable, an HTTP 404, a rule that cannot be evaluated) is kept in the store with its
//! reason, rule and target; the admin API and `mqgate dead-letters` list, show, replay (to
//! its own or another target) and purge them; ids survive a restart.

use std::net::SocketAddr;
use std::process::Command;

use std::time::Duration;

use crate::support::webhook::{Reply, Webhook};
use crate::support::*;
use axum::body::Bytes;
use mqgate::mqtt::codec::{Packet, Properties, ProtocolVersion, QoS, ReasonCode};
use serde_json::Value;

/// The admin API: method, path, optional JSON body; the status and the JSON answer.
async fn api(app: &mqgate::app::App, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let url = format!("http://{}{path}", app.admin_addr);
    let client = reqwest::Client::new();
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let write = method != reqwest::Method::GET;
    let mut req = client.request(method, &url);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_owned());
    } else if write {
        req = req.header("content-type", "application/json");
    }
    let resp = req.send().await.expect("admin API reachable");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")))
}

/// Waits until the API lists `n` dead letters (they are recorded without waiting for the
/// disk); returns the list.
async fn wait_letters(app: &mqgate::app::App, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = api(app, "GET", "/dead-letters", None).await;
        assert_eq!(status, 200, "{v}");
        let letters = v["dead_letters"].as_array().cloned().unwrap_or_default();
        if letters.len() == n {
            assert_eq!(v["count"], n, "{v}");
            return letters;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {n} dead letters, have {}: {v}",
            letters.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `mqgate dead-letters --admin URL ARGS...`: exit code, stdout, stderr.
fn cli_at(admin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["dead-letters", "--admin", admin])
        .args(args)
        .output()
        .expect("run mqgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `cli` from a blocking thread (the test's runtime keeps serving the gateway).
async fn cli_async(app: &mqgate::app::App, args: &[&str]) -> (i32, String, String) {
    let admin = format!("http://{}", app.admin_addr);
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli_at(&admin, &args)
    })
    .await
    .expect("cli thread")
}

/// A config with a store in `dir`, the local RabbitMQ as `rabbit`, and `rest` (more
/// top-level sections, e.g. `rules:`).
fn config(dir: &std::path::Path, rest: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\namqp:\n  rabbit:\n    url: \"{AMQP_URL}\"\n{rest}",
        dir.display()
    )
}

/// Rules `lost` (dl/# → `exchange`, routing key `nowhere`, mandatory: unroutable) and `good`
/// (never/# → `exchange`, routing key `good.1`, which the test's queue is bound to).
fn amqp_rules(exchange: &str) -> String {
    format!(
        "rules:\n  - name: lost\n    from: \"dl/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{exchange}\"\n          routing_key: \"nowhere\"\n          mandatory: true\n          id: lost/0\n  - name: good\n    from: \"never/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{exchange}\"\n          routing_key: \"good.1\"\n          id: good/0\n"
    )
}

#[tokio::test]
async fn an_unroutable_mandatory_publish_is_kept_shown_replayed_elsewhere_and_purged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "good.#").await;
    let app = gateway(&config(dir.path(), &amqp_rules(&exchange))).await;
    wait_ready(&app).await;

    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "dl-amqp").await;
    let mut p = publish_packet("dl/1", QoS::AtLeastOnce, 1, b"{\"lost\":true}");
    p.properties = Properties {
        user_properties: vec![("site".into(), "north".into())],
        content_type: Some("application/json".into()),
        ..Properties::default()
    }
    .into();
    c.send(&Packet::Publish(p)).await;
    match c.recv().await {
        // The device is told as before (0x10: no queue took it) ...
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::NO_MATCHING_SUBSCRIBERS),
        other => panic!("expected PUBACK 0x10, got {other:?}"),
    }
    // ... and the operator has the message.
    let letters = wait_letters(&app, 1).await;
    let l = &letters[0];
    let id = l["id"].as_u64().expect("id");
    assert_eq!(l["rule"], "lost");
    assert_eq!(l["target"], "lost/0");
    assert_eq!(l["topic"], "dl/1");
    assert_eq!(l["qos"], 1);
    assert_eq!(l["payload_bytes"], 13);
    assert_eq!(l["payload_preview"], "{\"lost\":true}");
    assert!(l["reason"].as_str().expect("reason").contains("unroutable"), "{l}");

    let (status, d) = api(&app, "GET", &format!("/dead-letters/{id}"), None).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["payload_base64"], "eyJsb3N0Ijp0cnVlfQ==");
    assert_eq!(d["client_id"], "dl-amqp");
    assert_eq!(d["packet_id"], 1);
    assert_eq!(d["properties"]["content_type"], "application/json");
    assert_eq!(d["properties"]["user_properties"][0][0], "site");
    assert_eq!(d["properties"]["user_properties"][0][1], "north");

    // The CLI: a table, and the letter in full.
    let (code, out, err) = cli_async(&app, &["list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID "), "{out}");
    assert!(out.contains("lost/0") && out.contains("unroutable") && out.contains("dl/1"), "{out}");
    let (code, out, err) = cli_async(&app, &["show", &id.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("{\"lost\":true}") && out.contains("north"), "{out}");

    // Replayed to its own target it fails again: kept, with the new reason; exit status 1.
    let (code, _, err) = cli_async(&app, &["replay", &id.to_string()]).await;
    assert_eq!(code, 1, "a failed replay must fail the command: {err}");
    assert!(err.contains("not delivered") && err.contains("unroutable"), "{err}");
    let letters = wait_letters(&app, 1).await;
    assert!(letters[0]["reason"].as_str().expect("reason").starts_with("replay to lost/0 failed"));

    // Replayed to a target that works: delivered, removed.
    let (code, out, err) = cli_async(&app, &["replay", &id.to_string(), "--to", "good/0"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("delivered to good/0"), "{out}");
    let m = get(&ch, &queue, Duration::from_secs(5)).await.expect("replayed message in the queue");
    assert_eq!(m.data, b"{\"lost\":true}");
    assert_eq!(header(&m, "site").as_deref(), Some("north"));
    wait_letters(&app, 0).await;
    let (status, e) = api(&app, "GET", &format!("/dead-letters/{id}"), None).await;
    assert_eq!(status, 404, "{e}");
    let (code, _, err) = cli_async(&app, &["show", &id.to_string()]).await;
    assert_eq!(code, 1);
    assert!(err.contains(&format!("no dead letter {id}")), "{err}");

    // Two more, then purge: empty.
    c.publish("dl/2", QoS::AtLeastOnce, 2, b"a").await;
    c.publish("dl/3", QoS::AtLeastOnce, 3, b"b").await;
    for _ in 0..2 {
        assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    }
    let letters = wait_letters(&app, 2).await;
    assert!(letters[0]["id"].as_u64() > Some(id), "ids are never reused");
    let (code, out, err) = cli_async(&app, &["purge"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "removed 2 dead letters\n");
    wait_letters(&app, 0).await;
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_dead_letters 0"), "{m}");
    assert!(m.contains("mqgate_dead_lettered_total{rule=\"lost\",target=\"lost/0\"} 3"), "{m}");
    app.stop().await;
}

/// What a webhook server took: path and body.
/// A webhook server: `/missing` answers 404, anything else 200.
async fn webhook() -> (SocketAddr, Webhook) {
    let hook = Webhook::start(|r, _| match r.path.as_str() {
        "/missing" => Reply::Status(404),
        _ => Reply::Status(200),
    })
    .await;
    (hook.addr, hook)
}

/// What the server took (answered 2xx): path and body.
fn taken(hook: &Webhook) -> Vec<(String, Bytes)> {
    hook.taken().into_iter().map(|r| (r.path, r.body)).collect()
}

fn http_rules(addr: SocketAddr) -> String {
    format!(
        "http:\n  api:\n    url: \"http://{addr}\"\nrules:\n  - name: hooks\n    from: \"h/#\"\n    to:\n      - http:\n          endpoint: api\n          path: /missing\n  - name: hooks_ok\n    from: \"never/#\"\n    to:\n      - http:\n          endpoint: api\n          path: /ok\n"
    )
}

#[tokio::test]
async fn an_http_404_is_kept_and_replayed_to_a_working_target_through_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, seen) = webhook().await;
    let app = gateway(&config(dir.path(), &http_rules(addr))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "dl-http").await;
    c.publish("h/1", QoS::AtLeastOnce, 1, b"hook me").await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert!(!a.code.is_success(), "a 404 is not a success: {a:?}"),
        other => panic!("expected a failed PUBACK, got {other:?}"),
    }
    let letters = wait_letters(&app, 1).await;
    let id = letters[0]["id"].as_u64().expect("id");
    assert_eq!(letters[0]["target"], "hooks/http:api/missing");
    assert!(letters[0]["reason"].as_str().expect("reason").contains("404"), "{}", letters[0]);

    // An unknown target, an unknown id, a bad body: clear errors, nothing changes.
    let (status, e) = api(
        &app,
        "POST",
        &format!("/dead-letters/{id}/replay"),
        Some(r#"{"to":"nope/http:api/x"}"#),
    )
    .await;
    assert_eq!(status, 404, "{e}");
    let (status, _) = api(&app, "POST", "/dead-letters/999999/replay", None).await;
    assert_eq!(status, 404);
    let (status, _) = api(&app, "POST", &format!("/dead-letters/{id}/replay"), Some("{x")).await;
    assert_eq!(status, 400);
    assert!(taken(&seen).is_empty());

    let (status, r) = api(
        &app,
        "POST",
        &format!("/dead-letters/{id}/replay"),
        Some(r#"{"to":"hooks_ok/http:api/ok"}"#),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["delivered"], true);
    assert_eq!(taken(&seen), vec![("/ok".to_owned(), Bytes::from_static(b"hook me"))]);
    wait_letters(&app, 0).await;

    // Replay of all with a filter: only the matching letters go.
    c.publish("h/2", QoS::AtLeastOnce, 2, b"two").await;
    c.publish("h/3", QoS::AtLeastOnce, 3, b"three").await;
    for _ in 0..2 {
        assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    }
    wait_letters(&app, 2).await;
    let (status, r) = api(
        &app,
        "POST",
        "/dead-letters/replay",
        Some(r#"{"rule":"other","to":"hooks_ok/http:api/ok"}"#),
    )
    .await;
    assert_eq!((status, r["delivered"].as_u64()), (200, Some(0)), "{r}");
    let (code, out, err) =
        cli_async(&app, &["replay", "--all", "--to", "hooks_ok/http:api/ok"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("replayed: 2 delivered, 0 failed"), "{out}");
    let bodies: Vec<Bytes> = taken(&seen).into_iter().map(|s| s.1).collect();
    assert_eq!(bodies[1..], [Bytes::from_static(b"two"), Bytes::from_static(b"three")]);
    wait_letters(&app, 0).await;
    app.stop().await;
}

#[tokio::test]
async fn a_replay_to_an_ack_spool_target_goes_through_its_spool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, seen) = webhook().await;
    let rules = http_rules(addr)
        + "  - name: spooled\n    from: \"never/#\"\n    ack: spool\n    to:\n      - http:\n          endpoint: api\n          path: /spooled\n";
    let app = gateway(&config(dir.path(), &rules)).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "dl-spool").await;
    c.publish("h/1", QoS::AtLeastOnce, 1, b"via the spool").await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(a)) if !a.code.is_success()));
    let id = wait_letters(&app, 1).await[0]["id"].as_u64().expect("id");
    let (code, out, err) =
        cli_async(&app, &["replay", &id.to_string(), "--to", "spooled/http:api/spooled"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("spooled for spooled/http:api/spooled"), "{out}");
    wait_letters(&app, 0).await;
    // The spool's forwarder delivers it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !taken(&seen).iter().any(|(p, _)| p == "/spooled") {
        assert!(tokio::time::Instant::now() < deadline, "the spool never forwarded it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn a_311_resend_of_a_failed_message_is_kept_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, _seen) = webhook().await;
    let app = gateway(&config(dir.path(), &http_rules(addr))).await;
    for attempt in 0..3 {
        let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "dl-311").await;
        let mut p = publish_packet("h/1", QoS::AtLeastOnce, 42, b"same");
        p.dup = attempt > 0;
        c.send(&Packet::Publish(p)).await;
        // MQTT 3.1.1 has no negative PUBACK: the connection is closed.
        assert!(c.recv().await.is_none(), "attempt {attempt}: expected the connection closed");
    }
    wait_letters(&app, 1).await;
    // A different message (another packet id) is another letter.
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "dl-311").await;
    c.publish("h/1", QoS::AtLeastOnce, 43, b"same").await;
    assert!(c.recv().await.is_none());
    wait_letters(&app, 2).await;
    app.stop().await;
}

#[tokio::test]
async fn a_rule_error_is_kept_for_each_target_of_the_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, _seen) = webhook().await;
    let rules = format!(
        "http:\n  api:\n    url: \"http://{addr}\"\nrules:\n  - name: hot\n    from: \"t/#\"\n    when: \"json.temp > 30\"\n    to:\n      - http:\n          endpoint: api\n          path: /a\n      - http:\n          endpoint: api\n          path: /b\n"
    );
    let app = gateway(&config(dir.path(), &rules)).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "dl-rule").await;
    c.publish("t/1", QoS::AtLeastOnce, 1, b"not json").await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(a)) if !a.code.is_success()));
    let letters = wait_letters(&app, 2).await;
    let targets: Vec<&str> = letters.iter().filter_map(|l| l["target"].as_str()).collect();
    assert_eq!(targets, ["hot/http:api/a", "hot/http:api/b"]);
    assert!(letters[0]["reason"].as_str().expect("reason").contains("could not be evaluated"));
    app.stop().await;
}

/// Starts the gateway again on the store the last one used: its writer thread lets go of the
/// file just after the last handle is dropped.
async fn restart(yaml: &str) -> mqgate::app::App {
    let config =
        mqgate::config::Config::parse(std::path::Path::new("test.yaml"), yaml).expect("config");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match mqgate::app::App::start(config.clone()).await {
            Ok(app) => return app,
            Err(e) if e.to_string().contains("locked") => {
                assert!(tokio::time::Instant::now() < deadline, "still locked: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("restart: {e:#}"),
        }
    }
}

#[tokio::test]
async fn ids_and_letters_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, _seen) = webhook().await;
    let yaml = config(dir.path(), &http_rules(addr));
    let first = {
        let app = gateway(&yaml).await;
        let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "dl-restart").await;
        for id in 1..=2u16 {
            c.publish("h/1", QoS::AtLeastOnce, id, format!("m{id}").as_bytes()).await;
            assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
        }
        let letters = wait_letters(&app, 2).await;
        // The newest is removed: its id must not be given again after the restart.
        let newest = letters[1]["id"].as_u64().expect("id");
        assert_eq!(api(&app, "DELETE", &format!("/dead-letters/{newest}"), None).await.0, 200);
        app.stop().await;
        (letters[0].clone(), newest)
    };
    let app = restart(&yaml).await;
    let letters = wait_letters(&app, 1).await;
    assert_eq!(letters[0], first.0, "the same letter after the restart");
    let (_, ready) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
    assert!(ready.contains("dead letters: 1\n"), "{ready}");
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "dl-restart").await;
    c.publish("h/1", QoS::AtLeastOnce, 3, b"m3").await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    let letters = wait_letters(&app, 2).await;
    assert!(letters[1]["id"].as_u64().expect("id") > first.1, "ids keep growing: {letters:?}");
    app.stop().await;
}

#[tokio::test]
async fn without_a_store_nothing_is_kept_and_the_api_and_cli_say_why() {
    let (addr, _seen) = webhook().await;
    let yaml = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n{}",
        http_rules(addr)
    );
    let app = gateway(&yaml).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "dl-none").await;
    c.publish("h/1", QoS::AtLeastOnce, 1, b"x").await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(a)) if !a.code.is_success()));
    let (status, e) = api(&app, "GET", "/dead-letters", None).await;
    assert_eq!(status, 503, "{e}");
    let (code, _, err) = cli_async(&app, &["list"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no store is configured"), "{err}");
    app.stop().await;
}

#[test]
fn the_cli_says_when_the_gateway_is_not_reachable() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("a");
    let (code, out, err) = cli_at(&format!("http://{port}"), &["list"]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("cannot reach the mqgate admin API") && err.contains("--admin"), "{err}");
}
