//! The admin API against its description, docs/admin-api.yaml (OpenAPI 3): every path and
//! method in it is called on a running gateway (RabbitMQ, a store, a connected MQTT client, a
//! retained message, dead letters) with the parameters' and bodies' `example`s; the status must
//! be the one expected (`x-mqgate-expect`, else the first 2xx) and declared, and a JSON answer
//! must have every field its schema requires, of the declared type (`$ref`, `allOf`, `oneOf`,
//! `nullable`, `enum`, nested objects and arrays). Every operation that needs the token is also
//! called without it (401). An operation marked `x-mqgate-pending: true` (built on another
//! branch) is not called and is reported as skipped by design. Routes the server registers
//! that the description lacks fail the test too.

use std::time::Duration;

use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS};
use serde_json::Value;

use crate::support::*;

const TOKEN: &str = "admin-api-test-token-0123456789";

/// The gateway: a store in `dir`, RabbitMQ, rule `lost` (dl/# → a mandatory publish to
/// `exchange` that nothing routes: dead letters) and `good` (a target replays can reach).
fn config(dir: &std::path::Path, token: &str, exchange: &str) -> String {
    format!(
        r#"mqtt:
  listen: "127.0.0.1:0"
admin:
  listen: "127.0.0.1:0"
  token: "{token}"
store:
  path: "{}"
amqp:
  rabbit:
    url: "{AMQP_URL}"
rules:
  - name: lost
    from: "dl/#"
    to:
      - amqp:
          broker: rabbit
          exchange: "{exchange}"
          routing_key: "nowhere"
          mandatory: true
          id: lost/0
  - name: good
    from: "never/#"
    to:
      - amqp:
          broker: rabbit
          exchange: "{exchange}"
          routing_key: "good.1"
          id: good/0
"#,
        dir.display()
    )
}

/// Starts a gateway on `yaml` written to `dir/mqgate.yaml` (a file a config reload can read
/// again).
pub async fn gateway_from_file(dir: &std::path::Path, yaml: &str) -> mqgate::app::App {
    let path = dir.join("mqgate.yaml");
    std::fs::write(&path, yaml).expect("write the config");
    mqgate::app::App::start_file(&path).await.expect("gateway starts")
}

/// Waits until the gateway keeps `n` dead letters.
pub async fn wait_dead_letters(app: &mqgate::app::App, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if app.dead_letters.as_ref().is_some_and(|d| d.count() >= n) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} dead letters expected within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A retained QoS 1 PUBLISH, acknowledged.
pub async fn publish_retained(c: &mut RawClient, topic: &str, id: u16, payload: &[u8]) {
    let mut p = publish_packet(topic, QoS::AtLeastOnce, id, payload);
    p.retain = true;
    c.send(&Packet::Publish(p)).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.packet_id, id),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// `schema` resolved through `$ref` in `root`.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').unwrap_or(r);
            let target = root.pointer(pointer).unwrap_or_else(|| panic!("unresolved $ref {r}"));
            resolve(root, target)
        }
        None => schema,
    }
}

/// What is wrong with `value` against `schema` (empty: nothing), each prefixed with `at`.
fn check(root: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(root, schema);
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(root, s, value, at, errors);
        }
    }
    if let Some(any) = schema.get("oneOf").and_then(Value::as_array) {
        let fits = any.iter().any(|s| {
            let mut e = Vec::new();
            check(root, s, value, at, &mut e);
            e.is_empty()
        });
        if !fits {
            errors.push(format!("{at}: matches none of oneOf"));
        }
    }
    if value.is_null() {
        if !schema.get("nullable").and_then(Value::as_bool).unwrap_or(false)
            && schema.get("type").is_some()
        {
            errors.push(format!("{at}: null, not nullable"));
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let fits = match ty {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("boolean") => value.is_boolean(),
        Some(other) => panic!("{at}: unknown type {other} in the spec"),
    };
    if !fits {
        errors.push(format!("{at}: expected {}, got {value}", ty.unwrap_or("?")));
        return;
    }
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(value) {
            errors.push(format!("{at}: {value} not in {options:?}"));
        }
    }
    if let Some(obj) = value.as_object() {
        for name in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let name = name.as_str().unwrap_or_default();
            if !obj.contains_key(name) {
                errors.push(format!("{at}: required field {name:?} missing"));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, s) in props {
                if let Some(v) = obj.get(name) {
                    check(root, s, v, &format!("{at}.{name}"), errors);
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check(root, items, v, &format!("{at}[{i}]"), errors);
        }
    }
}

/// One operation of the spec.
struct Operation {
    method: String,
    path: String,
    op: Value,
}

/// The spec, parsed.
pub fn spec() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/admin-api.yaml");
    let text = std::fs::read_to_string(&path).expect("docs/admin-api.yaml");
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("docs/admin-api.yaml: {e}"))
}

fn operations(spec: &Value) -> Vec<Operation> {
    let mut ops = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in ["get", "post", "put", "patch", "delete"] {
            if let Some(op) = item.get(method) {
                ops.push(Operation { method: method.into(), path: path.clone(), op: op.clone() });
            }
        }
    }
    // Reads first, then changes, then removals (a longer path first: one letter before all).
    let rank = |m: &str| match m {
        "get" => 0,
        "post" | "put" | "patch" => 1,
        _ => 2,
    };
    ops.sort_by(|a, b| {
        rank(&a.method)
            .cmp(&rank(&b.method))
            .then(b.path.len().cmp(&a.path.len()))
            .then(a.path.cmp(&b.path))
    });
    ops
}

/// The URL of `op` with its parameters' examples.
fn url(spec: &Value, base: &str, op: &Operation) -> String {
    let mut path = op.path.clone();
    let mut query = Vec::new();
    for p in op.op.get("parameters").and_then(Value::as_array).into_iter().flatten() {
        let p = resolve(spec, p);
        let Some(example) = p.get("example") else { continue };
        let text = match example {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let encoded =
            percent_encoding::utf8_percent_encode(&text, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let name = p["name"].as_str().expect("parameter name");
        match p["in"].as_str() {
            Some("path") => path = path.replace(&format!("{{{name}}}"), &encoded),
            Some("query") => query.push(format!("{name}={encoded}")),
            other => panic!("{} {}: parameter in {other:?}", op.method, op.path),
        }
    }
    assert!(!path.contains('{'), "{} {}: a path parameter has no example", op.method, op.path);
    let q = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
    format!("{base}{path}{q}")
}

/// Calls every operation of the spec on `app` (authorised with `token`); returns the
/// operations skipped by design.
pub async fn walk(app: &mqgate::app::App, token: &str) -> Vec<String> {
    let spec = spec();
    let base = format!("http://{}", app.admin_addr);
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(20)).build().expect("client");
    let mut skipped = Vec::new();
    let mut failures = Vec::new();
    for op in operations(&spec) {
        let name = format!("{} {}", op.method.to_uppercase(), op.path);
        if op.op.get("x-mqgate-pending").and_then(Value::as_bool) == Some(true) {
            eprintln!("!!! SKIPPED BY DESIGN: {name} is marked x-mqgate-pending (built on another branch); not called");
            skipped.push(name);
            continue;
        }
        let responses = op.op["responses"].as_object().expect("responses");
        let expect = match op.op.get("x-mqgate-expect").and_then(Value::as_u64) {
            Some(s) => s.to_string(),
            None => responses
                .keys()
                .filter(|k| k.starts_with('2'))
                .min()
                .unwrap_or_else(|| panic!("{name}: no 2xx response"))
                .clone(),
        };
        let body =
            op.op.pointer("/requestBody/content/application~1json/example").map(|v| v.to_string());
        let send = |auth: bool| {
            let method =
                reqwest::Method::from_bytes(op.method.to_uppercase().as_bytes()).expect("method");
            let write = method != reqwest::Method::GET;
            let mut req = client.request(method, url(&spec, &base, &op));
            if auth {
                req = req.bearer_auth(token);
            }
            if write {
                req = req
                    .header("content-type", "application/json")
                    .body(body.clone().unwrap_or_default());
            }
            req.send()
        };
        let secured = op.op.get("security").and_then(Value::as_array).is_none_or(|s| !s.is_empty());
        if secured {
            let resp = send(false).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            if resp.status().as_u16() != 401 {
                failures
                    .push(format!("{name} without the token: {} (expected 401)", resp.status()));
            }
        }
        let resp = send(true).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = resp.status().as_u16().to_string();
        let content_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if !responses.contains_key(&status) {
            failures.push(format!("{name}: status {status} is not declared"));
        }
        if status != expect {
            let text = resp.text().await.unwrap_or_default();
            failures.push(format!("{name}: status {status}, expected {expect}: {text}"));
            continue;
        }
        let declared = resolve(&spec, &responses[&status]);
        let Some(content) = declared.get("content").and_then(Value::as_object) else {
            continue;
        };
        let (media, schema) = content.iter().next().expect("a media type");
        if !content_type.starts_with(media.as_str()) {
            failures.push(format!("{name}: content type {content_type:?}, declared {media}"));
            continue;
        }
        if media == "text/event-stream" {
            // A stream that does not end: its head is the answer; dropping it ends the trace.
            drop(resp);
            continue;
        }
        let text = resp.text().await.unwrap_or_else(|e| panic!("{name}: body: {e}"));
        if media == "application/json" {
            let value: Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    failures.push(format!("{name}: not JSON ({e}): {text}"));
                    continue;
                }
            };
            let mut errors = Vec::new();
            check(&spec, &schema["schema"], &value, &name, &mut errors);
            failures.extend(errors);
        } else if text.is_empty() && op.path != "/healthz" {
            failures.push(format!("{name}: empty {media} body"));
        }
    }
    assert!(
        failures.is_empty(),
        "the server does not answer as docs/admin-api.yaml says:\n{}",
        failures.join("\n")
    );
    skipped
}

/// The paths `src/admin*.rs` registers (`.route("PATH", ...)`), as OpenAPI writes them.
fn registered_routes() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![dir.join("admin.rs")];
    for e in std::fs::read_dir(dir.join("admin")).expect("src/admin").flatten() {
        if e.path().extension().is_some_and(|x| x == "rs") {
            files.push(e.path());
        }
    }
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for part in text.split(".route(\"").skip(1) {
            if let Some(end) = part.find('"') {
                out.push(part[..end].to_owned());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn the_description_names_every_registered_route() {
    let spec = spec();
    let paths = spec["paths"].as_object().expect("paths");
    let routes = registered_routes();
    assert!(routes.len() >= 15, "routes found: {routes:?}");
    let missing: Vec<_> = routes.iter().filter(|r| !paths.contains_key(r.as_str())).collect();
    assert!(missing.is_empty(), "docs/admin-api.yaml lacks {missing:?}");
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations.md"),
    )
    .expect("docs/operations.md");
    let unlisted: Vec<_> = routes
        .iter()
        .filter(|r| !doc.contains(&format!(" {r}`")) && !doc.contains(&format!(" {r}?")))
        .collect();
    assert!(unlisted.is_empty(), "docs/operations.md's route table lacks {unlisted:?}");
}

#[tokio::test]
async fn every_operation_answers_as_the_openapi_description_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rabbit().await;
    let (_ch, exchange, _queue) = exchange_with_queue(&conn, "good.#").await;
    let app = gateway_from_file(dir.path(), &config(dir.path(), TOKEN, &exchange)).await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "api-client").await;
    c.subscribe("api/#", QoS::AtLeastOnce).await;
    let mut setter = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "api-setter").await;
    publish_retained(&mut setter, "api/retained", 1, b"kept").await;
    // Three dead letters: 1 is shown and replayed elsewhere, 2 deleted, all purged.
    for (i, topic) in ["dl/1", "dl/2", "dl/3"].iter().enumerate() {
        publish_qos1(&mut setter, topic, 10 + i as u16, b"{\"lost\":true}").await;
    }
    wait_dead_letters(&app, 3).await;
    let skipped = walk(&app, TOKEN).await;
    assert!(skipped.is_empty(), "{skipped:?}");
    // What the calls did: the client was told to go, the letters are gone.
    match c.recv_within(Duration::from_secs(5)).await {
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.code.0, 0x98, "administrative action"),
        Ok(Some(_)) => {
            // Deliveries of api/publish may come first.
            let mut told = false;
            for _ in 0..10 {
                if let Ok(Some(Packet::Disconnect(d))) = c.recv_within(Duration::from_secs(5)).await
                {
                    assert_eq!(d.code.0, 0x98);
                    told = true;
                    break;
                }
            }
            assert!(told, "DISCONNECT 0x98 expected");
        }
        other => panic!("DISCONNECT 0x98 expected, got {other:?}"),
    }
    assert_eq!(app.dead_letters.as_ref().map(|d| d.count()), Some(0));
    app.stop().await;
}
