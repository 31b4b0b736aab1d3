//! Authentication and authorisation with real clients: CONNACK codes for good and bad
//! credentials (both versions), anonymous clients, and the ACL on SUBSCRIBE and PUBLISH,
//! including that a denied PUBLISH never reaches RabbitMQ.

use std::process::Stdio;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use mqgate::auth::passwd::hash_password;
use mqgate::mqtt::codec::{
    Packet, Properties, ProtocolVersion, PubResponse, QoS, ReasonCode, Subscribe, SubscribeFilter,
    SubscriptionOptions,
};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use ProtocolVersion::{V311, V5};

/// A `users:` section with one user, hashed the way `mqgate passwd` does.
fn users(name: &str, password: &str) -> String {
    let phc = hash_password(password.as_bytes()).expect("hash");
    format!("users:\n  - username: {name}\n    password_hash: \"{phc}\"\n")
}

/// Login backoff is off here: these tests send many wrong passwords from one address on
/// purpose (the backoff has its own tests in `slow_clients`).
fn config(allow_anonymous: bool, rest: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n  allow_anonymous: {allow_anonymous}\n  login_failures_before_backoff: 0\nadmin:\n  listen: \"127.0.0.1:0\"\n{rest}"
    )
}

/// Sends CONNECT with these credentials; returns the client and the CONNACK code.
async fn connect_as(
    addr: std::net::SocketAddr,
    version: ProtocolVersion,
    id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> (RawClient, ReasonCode) {
    let mut c = RawClient::tcp(addr, version).await;
    let mut connect = connect_packet(version, id);
    connect.username = user.map(str::to_owned);
    connect.password = password.map(|p| Bytes::copy_from_slice(p.as_bytes()));
    c.send(&Packet::Connect(Box::new(connect))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => (c, a.code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// The next PUBLISH payload a subscriber gets (acknowledging QoS 1).
async fn next_payload(c: &mut RawClient) -> Vec<u8> {
    match c.recv().await {
        Some(Packet::Publish(p)) => {
            if p.qos == QoS::AtLeastOnce {
                c.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
            }
            p.payload.to_vec()
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn passwords_are_checked_on_both_versions() {
    // allow_anonymous stays true: credentials that are given are still checked.
    let app = gateway(&config(true, &users("sensor-1", "right"))).await;
    for version in [V311, V5] {
        let (mut ok, code) =
            connect_as(app.mqtt_addr, version, "good", Some("sensor-1"), Some("right")).await;
        assert_eq!(code, ReasonCode::SUCCESS, "{version:?}");
        assert_eq!(ok.subscribe("x/#", QoS::AtMostOnce).await, vec![ReasonCode::GRANTED_QOS_0]);
        for (user, password) in [
            (Some("sensor-1"), Some("wrong")),
            (Some("sensor-1"), None),
            (Some("nobody"), Some("right")),
            (None, Some("right")),
        ] {
            if version == V311 && user.is_none() {
                continue; // 3.1.1 cannot encode a password without a user name
            }
            let (mut c, code) = connect_as(app.mqtt_addr, version, "bad", user, password).await;
            // 0x86 on MQTT 5; return code 4 on 3.1.1, which our codec reads back as 0x86.
            assert_eq!(
                code,
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                "{version:?} {user:?}/{password:?}"
            );
            assert_eq!(c.recv().await, None, "closed after the refusal");
        }
        // Without credentials: still fine, anonymous clients are allowed here.
        let (_, code) = connect_as(app.mqtt_addr, version, "anon", None, None).await;
        assert_eq!(code, ReasonCode::SUCCESS);
    }
    assert!(
        metrics(&app).await.contains(r#"mqgate_auth_refused_total{reason="bad_credentials"} 7"#),
        "refusals counted"
    );
    app.stop().await;
}

#[tokio::test]
async fn anonymous_clients_are_refused_when_not_allowed() {
    let app = gateway(&config(false, &users("u", "p"))).await;
    for version in [V311, V5] {
        let (mut c, code) = connect_as(app.mqtt_addr, version, "anon", None, None).await;
        // 0x87 on MQTT 5; return code 5 on 3.1.1.
        assert_eq!(code, ReasonCode::NOT_AUTHORIZED, "{version:?}");
        assert_eq!(c.recv().await, None);
        let (_, code) = connect_as(app.mqtt_addr, version, "named", Some("u"), Some("p")).await;
        assert_eq!(code, ReasonCode::SUCCESS, "{version:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn mosquitto_clients_with_good_and_bad_passwords() {
    let app = gateway(&config(false, &users("mosq", "s3cret pass"))).await;
    let port = app.mqtt_addr.port().to_string();
    let mut sub = RawClient::tcp(app.mqtt_addr, V311).await;
    let mut connect = connect_packet(V311, "watcher");
    connect.username = Some("mosq".into());
    connect.password = Some(Bytes::from_static(b"s3cret pass"));
    sub.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(sub.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    sub.subscribe("mosq/#", QoS::AtMostOnce).await;
    for version in ["mqttv311", "mqttv5"] {
        for (password, good) in [("wrong", false), ("s3cret pass", true)] {
            let out = Command::new("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "1"])
                .args(["-u", "mosq", "-P", password, "-t", "mosq/t", "-m"])
                .arg(format!("{version} {password}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .output()
                .await
                .expect("mosquitto_pub (install mosquitto-clients)");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.success(), good, "{version} {password}: {err}");
            if !good {
                assert!(
                    err.to_lowercase().contains("password") || err.contains("identifier"),
                    "{version}: mosquitto_pub should say why: {err}"
                );
            }
        }
        // Only the good one arrived.
        assert_eq!(next_payload(&mut sub).await, format!("{version} s3cret pass").into_bytes());
    }
    app.stop().await;
}

#[tokio::test]
async fn a_filter_inside_a_deny_gets_0x80_or_0x87_and_overlapping_ones_are_filtered() {
    let acl = "acl:\n  - deny: subscribe\n    topic: \"test/nosubscribe\"\n";
    let app = gateway(&config(true, acl)).await;
    for (version, refused) in
        [(V311, ReasonCode::UNSPECIFIED_ERROR), (V5, ReasonCode::NOT_AUTHORIZED)]
    {
        let mut c = RawClient::connect(app.mqtt_addr, version, "subber").await;
        let filters = ["test/nosubscribe", "test/other", "test/#", "other/+"];
        c.send(&Packet::Subscribe(Box::new(Subscribe {
            packet_id: 9,
            filters: filters
                .iter()
                .map(|f| SubscribeFilter {
                    filter: (*f).into(),
                    options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
                })
                .collect(),
            properties: Properties::default(),
        })))
        .await;
        match c.recv().await {
            Some(Packet::SubAck(s)) => assert_eq!(
                s.codes,
                // test/# overlaps the denied filter: granted, its messages withheld.
                vec![
                    refused,
                    ReasonCode::GRANTED_QOS_1,
                    ReasonCode::GRANTED_QOS_1,
                    ReasonCode::GRANTED_QOS_1
                ],
                "{version:?}"
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
        // The denied filter really is not subscribed; the granted one is.
        let mut p = RawClient::connect(app.mqtt_addr, V311, "pubber").await;
        p.publish("test/nosubscribe", QoS::AtMostOnce, 0, b"hidden").await;
        p.publish("test/other", QoS::AtMostOnce, 0, b"visible").await;
        // One copy for the session's overlapping subscriptions; never the hidden one.
        assert_eq!(next_payload(&mut c).await, b"visible");
        assert!(c.recv_within(std::time::Duration::from_millis(300)).await.is_err());
    }
    assert!(metrics(&app).await.contains(r#"mqgate_acl_denied_total{action="subscribe"} 2"#));
    app.stop().await;
}

#[tokio::test]
async fn a_denied_publish_gets_0x87_on_v5_and_is_dropped_on_v3() {
    let acl = "acl:\n  - deny: publish\n    topic: \"locked/#\"\n";
    let app = gateway(&config(true, acl)).await;
    let mut sub = RawClient::connect(app.mqtt_addr, V311, "watcher").await;
    sub.subscribe("locked/#", QoS::AtLeastOnce).await;
    sub.subscribe("open/#", QoS::AtLeastOnce).await;

    let mut v5 = RawClient::connect(app.mqtt_addr, V5, "v5").await;
    v5.publish("locked/a", QoS::AtMostOnce, 0, b"v5 qos0").await;
    v5.publish("locked/a", QoS::AtLeastOnce, 1, b"v5 qos1").await;
    v5.publish("locked/a", QoS::ExactlyOnce, 2, b"v5 qos2").await;
    match v5.recv().await {
        Some(Packet::PubAck(a)) => {
            assert_eq!((a.packet_id, a.code), (1, ReasonCode::NOT_AUTHORIZED))
        }
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    match v5.recv().await {
        Some(Packet::PubRec(a)) => {
            assert_eq!((a.packet_id, a.code), (2, ReasonCode::NOT_AUTHORIZED))
        }
        other => panic!("expected PUBREC 0x87, got {other:?}"),
    }

    // 3.1.1 cannot be told: it gets its PUBACK/PUBREC, as from mosquitto, but nothing goes out.
    let mut v3 = RawClient::connect(app.mqtt_addr, V311, "v3").await;
    v3.publish("locked/b", QoS::AtMostOnce, 0, b"v3 qos0").await;
    v3.publish("locked/b", QoS::AtLeastOnce, 3, b"v3 qos1").await;
    match v3.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!((a.packet_id, a.code), (3, ReasonCode::SUCCESS)),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    v3.publish("locked/b", QoS::ExactlyOnce, 4, b"v3 qos2").await;
    assert!(matches!(v3.recv().await, Some(Packet::PubRec(a)) if a.packet_id == 4));
    v3.send(&Packet::PubRel(PubResponse::success(4))).await;
    assert!(matches!(v3.recv().await, Some(Packet::PubComp(a)) if a.packet_id == 4));

    // The connection is fine and other topics flow; the subscriber saw none of the above.
    v3.publish("open/c", QoS::AtLeastOnce, 5, b"allowed").await;
    assert!(
        matches!(v3.recv().await, Some(Packet::PubAck(a)) if a.packet_id == 5 && a.code.is_success())
    );
    assert_eq!(next_payload(&mut sub).await, b"allowed", "a denied message was delivered");
    assert!(metrics(&app).await.contains(r#"mqgate_acl_denied_total{action="publish"} 6"#));
    app.stop().await;
}

#[tokio::test]
async fn user_and_client_substitution_gives_each_device_its_own_subtree() {
    let acl = "acl:\n  - allow: all\n    user: sensor-*\n    topic: \"devices/%c/#\"\n  - allow: publish\n    topic: \"users/%u/out\"\nacl_default: deny\n";
    let yaml = config(false, &format!("{}{acl}", users("sensor-1", "pw")));
    let app = gateway(&yaml).await;
    let (mut c, code) = connect_as(app.mqtt_addr, V5, "c1", Some("sensor-1"), Some("pw")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert_eq!(
        c.subscribe("devices/c1/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::GRANTED_QOS_1]
    );
    assert_eq!(
        c.subscribe("devices/c1/temp", QoS::AtMostOnce).await,
        vec![ReasonCode::GRANTED_QOS_0]
    );
    for wider in ["devices/#", "devices/+/temp", "devices/c2/temp", "#"] {
        assert_eq!(
            c.subscribe(wider, QoS::AtMostOnce).await,
            vec![ReasonCode::NOT_AUTHORIZED],
            "{wider}"
        );
    }
    c.publish("devices/c2/temp", QoS::AtLeastOnce, 1, b"theirs").await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.code, ReasonCode::NOT_AUTHORIZED),
        other => panic!("expected PUBACK 0x87, got {other:?}"),
    }
    c.publish("users/someone-else/out", QoS::AtLeastOnce, 2, b"x").await;
    assert!(
        matches!(c.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::NOT_AUTHORIZED)
    );
    c.publish("users/sensor-1/out", QoS::AtLeastOnce, 3, b"x").await;
    // Allowed; nobody subscribes, so MQTT 5 says "no matching subscribers".
    assert!(
        matches!(c.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::NO_MATCHING_SUBSCRIBERS)
    );
    c.publish("devices/c1/temp", QoS::AtLeastOnce, 4, b"mine").await;
    let mut got = Vec::new();
    while got.len() < 2 {
        match c.recv().await {
            Some(Packet::PubAck(a)) => {
                assert_eq!((a.packet_id, a.code), (4, ReasonCode::SUCCESS));
                got.push(b"ack".to_vec());
            }
            Some(Packet::Publish(p)) => {
                if p.packet_id != 0 {
                    c.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
                }
                got.push(p.payload.to_vec());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    got.sort();
    assert_eq!(
        got,
        vec![b"ack".to_vec(), b"mine".to_vec()],
        "one copy for overlapping subscriptions"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_denied_publish_matching_a_rule_never_reaches_rabbitmq() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let acl = "acl:\n  - deny: publish\n    topic: \"fwd/secret/#\"\n";
    let yaml = format!("{}{acl}", config_one_rule("fwd/#", &exchange, ""));
    let app = gateway(&yaml).await;
    wait_ready(&app).await;
    for version in [V311, V5] {
        let mut c = RawClient::connect(app.mqtt_addr, version, "fwd").await;
        c.publish("fwd/secret/x", QoS::AtMostOnce, 0, b"denied 0").await;
        c.publish("fwd/secret/x", QoS::AtLeastOnce, 1, b"denied 1").await;
        let want = if version == V5 { ReasonCode::NOT_AUTHORIZED } else { ReasonCode::SUCCESS };
        assert!(matches!(c.recv().await, Some(Packet::PubAck(a)) if a.code == want), "{version:?}");
        c.publish("fwd/open/x", QoS::AtLeastOnce, 2, b"allowed").await;
        assert!(matches!(c.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::SUCCESS));
        // The allowed message was confirmed by RabbitMQ before its PUBACK; the denied ones
        // were sent before it, so had they gone out they would be in the queue first.
        let m = get(&ch, &queue, Duration::from_secs(5)).await.expect("allowed message forwarded");
        assert_eq!(m.data, b"allowed", "{version:?}: a denied message reached RabbitMQ");
        assert!(get(&ch, &queue, Duration::from_millis(200)).await.is_none());
    }
    app.stop().await;
}

#[tokio::test]
async fn mqgate_passwd_output_lets_the_user_in() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mqgate passwd");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"from stdin\n").await.expect("write password");
    drop(stdin);
    let out = child.wait_with_output().await.expect("mqgate passwd");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let phc = String::from_utf8(out.stdout).expect("utf-8").trim().to_owned();
    assert!(phc.starts_with("$argon2id$v=19$"), "{phc}");
    let scripted = Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["passwd", "--password", "from flag"])
        .output()
        .await
        .expect("mqgate passwd --password");
    let phc2 = String::from_utf8(scripted.stdout).expect("utf-8").trim().to_owned();
    let yaml = config(
        false,
        &format!(
            "users:\n  - username: a\n    password_hash: \"{phc}\"\n  - username: b\n    password_hash: \"{phc2}\"\n"
        ),
    );
    let app = gateway(&yaml).await;
    for (user, password, want) in [
        ("a", "from stdin", ReasonCode::SUCCESS),
        ("b", "from flag", ReasonCode::SUCCESS),
        ("a", "from stdin\n", ReasonCode::BAD_USER_NAME_OR_PASSWORD),
    ] {
        let (_, code) = connect_as(app.mqtt_addr, V5, user, Some(user), Some(password)).await;
        assert_eq!(code, want, "{user} {password:?}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_connect_flood_neither_blocks_other_clients_nor_runs_unbounded() {
    let app = gateway(&config(true, &users("flood", "pw"))).await;
    let n = 16;
    let started = std::time::Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..n {
        let addr = app.mqtt_addr;
        flood.spawn(async move {
            let id = format!("flood-{i}");
            // Each a different guess: the same one would be checked once for all.
            connect_as(addr, V5, &id, Some("flood"), Some(&format!("wrong-{i}"))).await.1
        });
    }
    // Meanwhile an anonymous client connects and gets a QoS 1 PUBACK: the verifications run
    // on the blocking pool, two at a time, so the async workers stay free.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, "bystander").await;
    c.publish("a/b", QoS::AtLeastOnce, 1, b"x").await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    let bystander = started.elapsed();
    let mut codes = Vec::new();
    while let Some(code) = flood.join_next().await {
        codes.push(code.expect("task"));
    }
    let flood_time = started.elapsed();
    assert!(codes.iter().all(|c| *c == ReasonCode::BAD_USER_NAME_OR_PASSWORD), "{codes:?}");
    assert!(
        bystander < flood_time / 2,
        "bystander served in {bystander:?}, flood of {n} took {flood_time:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn connects_that_cannot_be_verified_within_the_connect_timeout_get_server_busy() {
    let yaml = config(true, &users("flood", "pw")).replace(
        "  allow_anonymous: true\n",
        "  allow_anonymous: true\n  connect_timeout: 200ms\n",
    );
    let app = gateway(&yaml).await;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..60 {
        let addr = app.mqtt_addr;
        let version = if i % 2 == 0 { V5 } else { V311 };
        flood.spawn(async move {
            let guess = format!("wrong-{i}");
            connect_as(addr, version, &format!("busy-{i}"), Some("flood"), Some(&guess)).await.1
        });
    }
    let mut codes = Vec::new();
    while let Some(code) = flood.join_next().await {
        codes.push(code.expect("task"));
    }
    // 60 verifications two at a time take far longer than 200 ms: the late ones are told to
    // come back (0x89 / 3.1.1 return code 3) instead of queueing without bound.
    // 3.1.1 return code 3 ("server unavailable") reads back as 0x88.
    let busy = codes
        .iter()
        .filter(|c| **c == ReasonCode::SERVER_BUSY || **c == ReasonCode::SERVER_UNAVAILABLE)
        .count();
    let bad = codes.iter().filter(|c| **c == ReasonCode::BAD_USER_NAME_OR_PASSWORD).count();
    assert!(busy > 0 && bad > 0 && busy + bad == codes.len(), "{codes:?}");
    assert!(metrics(&app).await.contains(r#"mqgate_auth_refused_total{reason="busy"}"#));
    app.stop().await;
}

/// A `users:` entry whose argon2 check takes ~10× the default's time (t=20), so a burst of
/// CONNECTs sent together all arrive while the first one's check is running.
fn slow_user(name: &str, password: &str) -> String {
    use argon2::password_hash::PasswordHasher;
    let params = argon2::Params::new(19_456, 20, 1, None).expect("params");
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let phc = argon.hash_password(password.as_bytes()).expect("hash").to_string();
    format!("users:\n  - username: {name}\n    password_hash: \"{phc}\"\n")
}

/// Opens `passwords.len()` connections first, then sends their CONNECTs all at once; returns
/// each one's CONNACK code, in order.
async fn burst(addr: std::net::SocketAddr, user: &str, passwords: &[&str]) -> Vec<ReasonCode> {
    let mut clients = Vec::new();
    for (i, password) in passwords.iter().enumerate() {
        let mut connect = connect_packet(V311, &format!("burst-{i}"));
        connect.username = Some(user.to_owned());
        connect.password = Some(Bytes::copy_from_slice(password.as_bytes()));
        clients.push((RawClient::tcp(addr, V311).await, connect));
    }
    let logins = clients.into_iter().map(|(mut c, connect)| async move {
        c.send(&Packet::Connect(Box::new(connect))).await;
        match c.recv().await {
            Some(Packet::ConnAck(a)) => a.code,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    });
    futures::future::join_all(logins).await
}

/// A counter's value from `/metrics` (0 when absent).
async fn counter(app: &mqgate::app::App, name: &str) -> u64 {
    let text = metrics(app).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn fifty_simultaneous_logins_of_one_user_cost_one_password_check() {
    // No login cache: a login that did not share the check in flight would run its own.
    let yaml = config(false, &slow_user("fleet", "pw"))
        .replace("  allow_anonymous: false\n", "  allow_anonymous: false\n  login_cache_size: 0\n");
    let app = gateway(&yaml).await;
    let codes = burst(app.mqtt_addr, "fleet", &["pw"; 50]).await;
    assert!(codes.iter().all(|c| *c == ReasonCode::SUCCESS), "{codes:?}");
    assert_eq!(counter(&app, "mqgate_password_checks_total").await, 1, "argon2 ran once");
    // Later, alone: checked again (no cache here, and nothing in flight).
    let (_, code) = connect_as(app.mqtt_addr, V311, "later", Some("fleet"), Some("pw")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert_eq!(counter(&app, "mqgate_password_checks_total").await, 2);
    app.stop().await;
}

#[tokio::test]
async fn a_wrong_password_in_a_burst_of_right_ones_is_refused() {
    let yaml = config(false, &slow_user("fleet", "pw"))
        .replace("  allow_anonymous: false\n", "  allow_anonymous: false\n  login_cache_size: 0\n");
    let app = gateway(&yaml).await;
    let mut passwords = vec!["pw"; 30];
    passwords[7] = "pw ";
    passwords[20] = "wrong";
    let codes = burst(app.mqtt_addr, "fleet", &passwords).await;
    for (i, code) in codes.iter().enumerate() {
        let want = if passwords[i] == "pw" {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::BAD_USER_NAME_OR_PASSWORD
        };
        assert_eq!(*code, want, "login {i} with {:?}", passwords[i]);
    }
    assert_eq!(counter(&app, "mqgate_password_checks_total").await, 3, "one per password");
    app.stop().await;
}

#[tokio::test]
async fn a_shared_wrong_password_still_counts_towards_each_logins_backoff() {
    let yaml = config(false, &slow_user("fleet", "pw"))
        .replace("  login_failures_before_backoff: 0\n", "  login_failures_before_backoff: 5\n");
    let app = gateway(&yaml).await;
    let codes = burst(app.mqtt_addr, "fleet", &["guess"; 10]).await;
    assert!(codes.iter().all(|c| *c == ReasonCode::BAD_USER_NAME_OR_PASSWORD), "{codes:?}");
    assert_eq!(counter(&app, "mqgate_password_checks_total").await, 1, "one check shared");
    // Ten failures from 127.0.0.1, not one: its next login is refused without a check.
    let (_, code) = connect_as(app.mqtt_addr, V311, "next", Some("fleet"), Some("pw")).await;
    // Backoff: 3.1.1 return code 3, read back as 0x88.
    assert_eq!(code, ReasonCode::SERVER_UNAVAILABLE);
    assert_eq!(counter(&app, "mqgate_password_checks_total").await, 1);
    app.stop().await;
}
