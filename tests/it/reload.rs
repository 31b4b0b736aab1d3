//! Hot reload (`POST /api/v1/reload`, SIGHUP): rules, targets, users and the ACL swap while
//! clients stay connected; what needs a restart or does not validate changes nothing.

use std::collections::HashSet;
use std::time::Duration;

use mqgate::app::App;
use mqgate::mqtt::codec::{Connect, Packet, ProtocolVersion, QoS, ReasonCode};

use crate::support::{
    connect_packet, exchange_with_queue, expect_disconnect, expect_publish, expect_silence, get,
    http_get, metrics, post, rabbit, RawClient, AMQP_URL,
};

/// The config text: listeners on port 0, the local RabbitMQ as `rabbit`, then `rest`.
fn config(rest: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\namqp:\n  rabbit:\n    url: \"{AMQP_URL}\"\n{rest}"
    )
}

async fn reload(app: &App) -> (u16, serde_json::Value) {
    let (status, _, body) = post(app.admin_addr, "/api/v1/reload", None, "{}").await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

async fn readyz_hash(app: &App) -> String {
    let (_, body) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
    body.lines()
        .find_map(|l| l.strip_prefix("config: sha256 "))
        .unwrap_or_else(|| panic!("no config hash in /readyz: {body}"))
        .to_owned()
}

/// Every payload in `queue` now (waiting a little for the last ones).
async fn drain(ch: &lapin::Channel, queue: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    while let Some(d) = get(ch, queue, Duration::from_millis(500)).await {
        out.insert(String::from_utf8_lossy(&d.data).into_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_swaps_the_rules_under_a_publishing_client_and_keeps_the_broker_connection() {
    let conn = rabbit().await;
    let (ch, xa, qa) = exchange_with_queue(&conn, "#").await;
    let (_, xb, qb) = exchange_with_queue(&conn, "#").await;
    let (_, xc, qc) = exchange_with_queue(&conn, "#").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mqgate.yaml");
    let two = |x: &str, y: &str| {
        config(&format!("rules:\n  - name: r\n    from: \"t/#\"\n    to:\n      - amqp: {{broker: rabbit, exchange: \"{x}\", id: a}}\n      - amqp: {{broker: rabbit, exchange: \"{y}\", id: b}}\n"))
    };
    std::fs::write(&path, two(&xa, &xb)).expect("write");
    let app = App::start_file(&path).await.expect("start");
    crate::support::wait_ready(&app).await;
    let hash_before = readyz_hash(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "reload-pub").await;
    // The new rule: one target only, on another exchange.
    let one = config(&format!("rules:\n  - name: r\n    from: \"t/#\"\n    to:\n      - amqp: {{broker: rabbit, exchange: \"{xc}\", id: c}}\n"));
    let admin = app.admin_addr;
    let mut reloading = None;
    for i in 1..=300u16 {
        if i == 100 {
            std::fs::write(&path, &one).expect("write");
            reloading =
                Some(tokio::spawn(async move { post(admin, "/api/v1/reload", None, "{}").await }));
        }
        c.publish("t/x", QoS::AtLeastOnce, i, format!("m{i}").as_bytes()).await;
        match c.recv().await {
            Some(Packet::PubAck(a)) => {
                assert_eq!(a.packet_id, i);
                assert!(a.code.is_success(), "message {i} refused: {a:?}");
            }
            other => panic!("expected PUBACK {i}, got {other:?}"),
        }
    }
    let (status, _, body) = reloading.expect("spawned").await.expect("reload task");
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(answer["result"], "ok");
    assert_eq!(answer["changed"]["rules"]["changed"], serde_json::json!(["r"]));
    assert_eq!(answer["changed"]["systems"]["kept"], serde_json::json!(["amqp.rabbit"]));
    // After the answer: the new rules, for certain.
    for i in 301..=310u16 {
        crate::support::publish_qos1(&mut c, "t/x", i, format!("m{i}").as_bytes()).await;
    }
    let (a, b, cc) = (drain(&ch, &qa).await, drain(&ch, &qb).await, drain(&ch, &qc).await);
    for i in 1..=310u16 {
        let m = format!("m{i}");
        let old = a.contains(&m) && b.contains(&m) && !cc.contains(&m);
        let new = !a.contains(&m) && !b.contains(&m) && cc.contains(&m);
        assert!(
            old || new,
            "{m} routed by neither rule set wholly: A {} B {} C {}",
            a.contains(&m),
            b.contains(&m),
            cc.contains(&m)
        );
        if i < 100 {
            assert!(old, "{m} was published before the reload");
        }
        if i > 300 {
            assert!(new, "{m} was published after the reload answered");
        }
    }
    // Same socket throughout (no DISCONNECT, nothing else arrived), same AMQP connection.
    expect_silence(&mut c, Duration::from_millis(100)).await;
    let text = metrics(&app).await;
    assert!(text.contains("mqgate_amqp_connects_total{broker=\"rabbit\"} 1"), "{text}");
    assert!(text.contains("mqgate_config_reloads_total{result=\"ok\"} 1"), "{text}");
    let hash_after = readyz_hash(&app).await;
    assert_ne!(hash_before, hash_after);
    assert_eq!(answer["hash"], hash_after.as_str());
    assert!(text.contains(&format!("mqgate_config_info{{hash=\"{hash_after}\"}} 1")), "{text}");
    assert!(!text.contains(&hash_before), "the old hash is no longer a series");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_or_a_restart_key_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.yaml");
    let good = "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nrules: []\n";
    std::fs::write(&path, good).expect("write");
    let app = App::start_file(&path).await.expect("start");
    let hash = readyz_hash(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "reload-watch").await;
    assert_eq!(c.subscribe("a/#", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);

    // Invalid: an unknown key, and a rule denying what the client does.
    std::fs::write(&path, format!("{good}acl_default: deny\nbogus: 1\n")).expect("write");
    let (status, json) = reload(&app).await;
    assert_eq!(status, 400, "{json}");
    assert_eq!(json["result"], "invalid");
    let error = json["error"].as_str().expect("error");
    let prefix = format!("{}:7:1:", path.display());
    assert!(error.starts_with(&prefix), "file:line:column expected: {error}");

    // A listener change (and an ACL change beside it): refused whole, the keys listed.
    let moved = "mqtt:\n  listen: \"127.0.0.1:1\"\n  max_connections: 5\nadmin:\n  listen: \"127.0.0.1:0\"\nacl_default: deny\nrules: []\n";
    std::fs::write(&path, moved).expect("write");
    let (status, json) = reload(&app).await;
    assert_eq!(status, 409, "{json}");
    assert_eq!(
        json,
        serde_json::json!({"result": "needs_restart", "keys": ["mqtt.listen", "mqtt.max_connections"]})
    );

    // Nothing changed: same hash, the ACL still allows everything.
    assert_eq!(readyz_hash(&app).await, hash);
    let mut p = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "reload-pub2").await;
    crate::support::publish_qos1(&mut p, "a/1", 1, b"x").await;
    assert_eq!(expect_publish(&mut c).await.topic.as_ref() as &str, "a/1");
    let text = metrics(&app).await;
    assert!(text.contains("mqgate_config_reloads_total{result=\"invalid\"} 1"), "{text}");
    assert!(text.contains("mqgate_config_reloads_total{result=\"needs_restart\"} 1"), "{text}");
    assert!(text.contains(&format!("mqgate_config_info{{hash=\"{hash}\"}} 1")), "{text}");
    app.stop().await;
}

fn login(id: &str, user: &str, password: &str) -> Packet {
    let mut c: Connect = connect_packet(ProtocolVersion::V5, id);
    c.username = Some(user.into());
    c.password = Some(password.as_bytes().to_vec().into());
    Packet::Connect(Box::new(c))
}

async fn connect_as(app: &App, id: &str, user: &str, password: &str) -> RawClient {
    let mut c = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V5).await;
    c.send(&login(id, user, password)).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert!(a.code.is_success(), "{a:?}"),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_and_users_apply_to_connected_clients_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.yaml");
    let hash = mqgate::auth::passwd::hash_password(b"pw").expect("hash");
    let users = |with_bob: bool| {
        let mut u = format!("users:\n  - username: alice\n    password_hash: \"{hash}\"\n");
        if with_bob {
            u.push_str(&format!("  - username: bob\n    password_hash: \"{hash}\"\n"));
        }
        u
    };
    let head = "mqtt:\n  listen: \"127.0.0.1:0\"\n  allow_anonymous: false\nadmin:\n  listen: \"127.0.0.1:0\"\n";
    std::fs::write(&path, format!("{head}{}", users(true))).expect("write");
    let app = App::start_file(&path).await.expect("start");
    let mut alice = connect_as(&app, "alice-1", "alice", "pw").await;
    let mut bob = connect_as(&app, "bob-1", "bob", "pw").await;
    assert_eq!(alice.subscribe("secret/#", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    assert_eq!(bob.subscribe("secret/#", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);

    // alice may no longer read or write secret/#; bob is removed.
    let acl = "acl:\n  - deny: all\n    topic: \"secret/#\"\n    user: alice\n";
    std::fs::write(&path, format!("{head}{}{acl}", users(false))).expect("write");
    let (status, json) = reload(&app).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["changed"]["users"]["removed"], serde_json::json!(["bob"]));
    assert_eq!(json["changed"]["disconnected"], 1);
    assert_eq!(json["changed"]["acl"], true);

    // bob: told at once (0x87) and closed.
    let d = expect_disconnect(&mut bob, ReasonCode::NOT_AUTHORIZED).await;
    assert_eq!(d.code, ReasonCode::NOT_AUTHORIZED);
    assert!(bob.recv().await.is_none(), "closed after the DISCONNECT");
    // alice: still connected; her next publish and subscription see the new ACL, and her
    // old subscription is gone.
    alice.publish("secret/x", QoS::AtLeastOnce, 7, b"no").await;
    match alice.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::NOT_AUTHORIZED),
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    assert_eq!(
        alice.subscribe("secret/y", QoS::AtLeastOnce).await,
        vec![ReasonCode::NOT_AUTHORIZED]
    );
    let mut carol = connect_as(&app, "alice-2", "alice", "pw").await;
    carol.subscribe("open/#", QoS::AtMostOnce).await;
    drop(carol);
    let mut writer = connect_as(&app, "alice-3", "alice", "pw").await;
    writer.publish("open/1", QoS::AtMostOnce, 0, b"ok").await;
    expect_silence(&mut alice, Duration::from_millis(300)).await;
    // A removed user cannot come back.
    let mut again = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V5).await;
    again.send(&login("bob-2", "bob", "pw")).await;
    match again.recv().await {
        Some(Packet::ConnAck(a)) => assert!(!a.code.is_success()),
        other => panic!("expected a refused CONNACK, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_of_a_running_mqgate() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.yaml");
    let text = "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nrules: []\n";
    std::fs::write(&path, text).expect("write");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mqgate");
    // The admin address it bound (port 0) from its "mqgate started" line; the rest of its
    // output is drained so that it never blocks on a full pipe.
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let admin: std::net::SocketAddr = loop {
        let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
            .await
            .expect("mqgate started within 15 s")
            .expect("read")
            .expect("mqgate exited");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["message"] == "mqgate started" {
            break v["admin_addr"].as_str().and_then(|a| a.parse().ok()).expect("admin_addr");
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let hash_of = |t: &str| mqgate::reload::hash(t.as_bytes());
    let readyz = || async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok((200, body)) = http_get(admin, "/readyz").await {
                return body;
            }
            assert!(tokio::time::Instant::now() < deadline, "not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(readyz().await.contains(&hash_of(text)));
    let changed = format!("{text}acl_default: deny\n");
    std::fs::write(&path, &changed).expect("write");
    let pid = child.id().expect("pid").to_string();
    let status = std::process::Command::new("kill").args(["-HUP", &pid]).status().expect("kill");
    assert!(status.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = readyz().await;
        if body.contains(&hash_of(&changed)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "SIGHUP did not reload: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Counted once the reload has answered (just after the swap).
    loop {
        let (_, text) = http_get(admin, "/metrics").await.expect("metrics");
        if text.contains("mqgate_config_reloads_total{result=\"ok\"} 1") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not counted: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_targets_spool_goes_to_the_dead_letters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.yaml");
    // The endpoint refuses connections: the spool keeps what it took.
    let head = format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\nhttp:\n  hook:\n    url: \"http://127.0.0.1:1\"\n    connect_timeout: 1s\n",
        dir.path().join("store").display()
    );
    let spooled = format!("{head}rules:\n  - name: s\n    from: \"s/#\"\n    ack: spool\n    to:\n      - http:\n          endpoint: hook\n          retry: {{ attempts: 1 }}\n");
    std::fs::write(&path, &spooled).expect("write");
    let app = App::start_file(&path).await.expect("start");
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "reload-spool").await;
    for i in 1..=5u16 {
        crate::support::publish_qos1(&mut c, "s/1", i, format!("m{i}").as_bytes()).await;
    }
    std::fs::write(&path, format!("{head}rules: []\n")).expect("write");
    let (status, json) = reload(&app).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["changed"]["rules"]["removed"], serde_json::json!(["s"]));
    // Once no session routes with the old rules, the spool stops and what it held is a dead
    // letter each (the client stays connected).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let letters = loop {
        let (_, body) = http_get(app.admin_addr, "/dead-letters").await.expect("dead letters");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        // The count comes from the in-memory index, the list from the store: both.
        if v["count"] == 5 && v["dead_letters"].as_array().is_some_and(|l| l.len() == 5) {
            break v;
        }
        assert!(tokio::time::Instant::now() < deadline, "not moved: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reason = letters["dead_letters"][0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("removed by a config reload"), "{letters}");
    crate::support::publish_qos1(&mut c, "s/1", 6, b"after").await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reload_route_is_behind_the_admin_guard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.yaml");
    let token = "reload-token-0123456789";
    let text = format!("mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n  token: \"{token}\"\nrules: []\n");
    std::fs::write(&path, &text).expect("write");
    let app = App::start_file(&path).await.expect("start");
    let (status, _, _) = post(app.admin_addr, "/api/v1/reload", None, "{}").await;
    assert_eq!(status, 401, "no token");
    let plain = format!(
        "POST /api/v1/reload HTTP/1.0\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{{}}",
        app.admin_addr
    );
    let (status, _, _) = crate::support::raw_http(app.admin_addr, &plain).await;
    assert_eq!(status, 415, "a write without application/json");
    let bearer = format!("Bearer {token}");
    let (status, _, body) = post(app.admin_addr, "/api/v1/reload", Some(&bearer), "{}").await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_http_targets_on_a_kept_endpoint_and_starts_and_stops_sources() {
    use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
    use lapin::types::ShortString;
    let hook = crate::support::webhook::Webhook::ok().await;
    let conn = rabbit().await;
    let (ch, x, _) = exchange_with_queue(&conn, "unused").await;
    let queue = crate::support::unique("mqgate-reload-src");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.yaml");
    let head = config(&format!("http:\n  hook:\n    url: \"{}\"\n", hook.url()));
    let h1 = "  - name: h1\n    from: \"h/#\"\n    to:\n      - http: {endpoint: hook, path: /a}\n";
    let h2 = "  - name: h2\n    from: \"h/#\"\n    to:\n      - http: {endpoint: hook, path: /b}\n";
    let source = format!("sources:\n  - name: s\n    broker: rabbit\n    queue: \"{queue}\"\n    declare:\n      durable: false\n      arguments:\n        x-expires: 60000\n    bind:\n      - exchange: \"{x}\"\n        routing_key: \"#\"\n");
    std::fs::write(&path, format!("{head}rules:\n{h1}")).expect("write");
    let app = App::start_file(&path).await.expect("start");
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "reload-http").await;
    crate::support::publish_qos1(&mut c, "h/1", 1, b"one").await;
    assert_eq!(hook.bodies("/a").len(), 1);

    // A second rule on the same endpoint, and a source.
    std::fs::write(&path, format!("{head}rules:\n{h1}{h2}{source}")).expect("write");
    let (status, json) = reload(&app).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["changed"]["targets"], serde_json::json!({"kept": 1, "built": 1}));
    assert_eq!(json["changed"]["systems"]["kept"], serde_json::json!(["amqp.rabbit", "http.hook"]));
    assert_eq!(json["changed"]["sources"]["added"], serde_json::json!(["s"]));
    crate::support::publish_qos1(&mut c, "h/1", 2, b"two").await;
    assert_eq!(hook.bodies("/a").len(), 2, "the kept target");
    assert_eq!(hook.bodies("/b").len(), 1, "the new target's lanes run");
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "reload-sub").await;
    sub.subscribe("#", QoS::AtMostOnce).await;
    let publish = |body: &'static [u8]| {
        let ch = ch.clone();
        let x = x.clone();
        async move {
            ch.basic_publish(
                ShortString::from(x.as_str()),
                ShortString::from("cmd.1"),
                BasicPublishOptions::default(),
                body,
                Default::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        }
    };
    // The source consumes once it has declared and bound its queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        publish(b"down").await;
        if let Ok(Some(Packet::Publish(p))) = sub.recv_within(Duration::from_millis(300)).await {
            assert_eq!(p.topic.as_ref() as &str, "cmd/1");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the added source never delivered");
    }
    // Removed: it stops consuming.
    std::fs::write(&path, format!("{head}rules:\n{h1}{h2}")).expect("write");
    let (status, json) = reload(&app).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["changed"]["sources"]["removed"], serde_json::json!(["s"]));
    while sub.recv_within(Duration::from_millis(300)).await.is_ok() {}
    publish(b"after").await;
    expect_silence(&mut sub, Duration::from_millis(500)).await;
    app.stop().await;
    assert!(hook.bodies("/b").len() == 1);
    let _ = ch.queue_delete(ShortString::from(queue.as_str()), QueueDeleteOptions::default()).await;
}

/// Waits until `/metrics` contains `line`.
async fn wait_metric(app: &App, line: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = metrics(app).await;
        if text.contains(line) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {line} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_bridge_keeps_its_connection_and_a_changed_one_reconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let upstream = crate::support::mosquitto::Mosquitto::start(dir.path(), "").await;
    let mut sub = RawClient::tcp(upstream.addr(), ProtocolVersion::V311).await;
    sub.send(&Packet::Connect(Box::new(connect_packet(ProtocolVersion::V311, "reload-up")))).await;
    assert!(matches!(sub.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    sub.subscribe("site/#", QoS::AtMostOnce).await;
    let path = dir.path().join("gw.yaml");
    let bridge = |max: &str| {
        format!(
            "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nbridges:\n  cloud:\n    url: \"mqtt://127.0.0.1:{}\"\n    client_id: \"{}\"\n    reconnect_min: 50ms\n    reconnect_max: {max}\nrules:\n  - name: up\n    from: \"s/#\"\n    to:\n      - mqtt: {{ bridge: cloud, topic: \"site/{{{{ topic_name }}}}\", qos: 1 }}\n",
            upstream.port,
            "reload-edge"
        )
    };
    std::fs::write(&path, bridge("500ms")).expect("write");
    let app = App::start_file(&path).await.expect("start");
    wait_metric(&app, "mqgate_bridge_connects_total{bridge=\"cloud\"} 1").await;
    let mut dev = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "reload-dev").await;
    crate::support::publish_qos1(&mut dev, "s/1", 1, b"x").await;
    assert!(
        matches!(sub.recv().await, Some(Packet::Publish(p)) if p.topic.as_ref() as &str == "site/s/1")
    );

    // Another rule beside it: the bridge is the same connection.
    let more = format!(
        "{}  - name: other\n    from: \"o/#\"\n    to:\n      - mqtt: {{ bridge: cloud }}\n",
        bridge("500ms")
    );
    std::fs::write(&path, &more).expect("write");
    let (status, json) = reload(&app).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["changed"]["systems"]["kept"], serde_json::json!(["bridges.cloud"]));
    crate::support::publish_qos1(&mut dev, "s/1", 2, b"x").await;
    assert!(matches!(sub.recv().await, Some(Packet::Publish(_))));
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_metric(&app, "mqgate_bridge_connects_total{bridge=\"cloud\"} 1").await;

    // The bridge itself changed: a new connection, the old one closed.
    std::fs::write(&path, bridge("600ms")).expect("write");
    let (status, json) = reload(&app).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["changed"]["systems"]["started"], serde_json::json!(["bridges.cloud"]));
    wait_metric(&app, "mqgate_bridge_connects_total{bridge=\"cloud\"} 2").await;
    crate::support::publish_qos1(&mut dev, "s/1", 3, b"x").await;
    assert!(matches!(sub.recv().await, Some(Packet::Publish(_))));
    // The old connection is gone for good: with the same client id, two live bridges would
    // keep taking the session from each other (and reconnecting).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = metrics(&app).await;
    assert!(text.contains("mqgate_bridge_connects_total{bridge=\"cloud\"} 2"), "{text}");
    app.stop().await;
}
