//! Sessions belong to identities: takeover refused across identities, client id patterns, resumed subscriptions re-checked (issue 13, item 1).

use std::time::Duration;

use bytes::Bytes;
use mqgate::auth::passwd::hash_password;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};

use crate::support::*;

use ProtocolVersion::{V311, V5};

/// `users:` alice (password "a") and bob ("b", client ids `%u` and `%u-*` only).
fn users() -> String {
    let a = hash_password(b"a").expect("hash");
    let b = hash_password(b"b").expect("hash");
    format!(
        "users:\n  - username: alice\n    password_hash: \"{a}\"\n  - username: bob\n    password_hash: \"{b}\"\n    client_ids: [\"%u\", \"%u-*\"]\n"
    )
}

/// Only alice may use `secret/#`; everything else is open. Anonymous clients are allowed.
const ACL: &str = "acl:\n  - allow: all\n    topic: \"secret/#\"\n    user: alice\n  - deny: all\n    topic: \"secret/#\"\n  - allow: all\n    topic: \"#\"\n";

fn config(mqtt_extra: &str, rest: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n  allow_anonymous: true\n{mqtt_extra}admin:\n  listen: \"127.0.0.1:0\"\n{}{rest}",
        users()
    )
}

/// CONNECT as `user` (password = first letter) with `clean`; the client and CONNACK.
async fn connect(
    addr: std::net::SocketAddr,
    version: ProtocolVersion,
    id: &str,
    user: Option<&str>,
    clean: bool,
) -> (RawClient, ReasonCode, bool) {
    let mut c = RawClient::tcp(addr, version).await;
    let mut connect = connect_packet(version, id);
    connect.clean_start = clean;
    if version == V5 && !clean {
        connect.properties.session_expiry_interval = Some(3600);
    }
    connect.username = user.map(str::to_owned);
    connect.password = user.map(|u| Bytes::copy_from_slice(&u.as_bytes()[..1]));
    c.send(&Packet::Connect(Box::new(connect))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => (c, a.code, a.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Publishes `payload` QoS 1 to `topic` as alice (allowed on `secret/#`), and waits for the
/// PUBACK.
async fn publish_as_alice(addr: std::net::SocketAddr, topic: &str, payload: &[u8]) {
    let (mut p, code, _) = connect(addr, V5, &unique("alice-pub"), Some("alice"), true).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    p.publish(topic, QoS::AtLeastOnce, 1, payload).await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(a)) if a.code.is_success()));
}

async fn publishes(c: &mut RawClient, wait: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(Some(p)) = c.recv_within(wait).await {
        if let Packet::Publish(p) = p {
            if p.qos == QoS::AtLeastOnce {
                c.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
            }
            got.push(p.topic.clone());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_identity_cannot_take_over_a_session() {
    let app = gateway(&config("", ACL)).await;
    for version in [V311, V5] {
        let id = unique("dev");
        // alice's persistent session, subscribed to her secret topics, then away.
        let (mut a, code, _) = connect(app.mqtt_addr, version, &id, Some("alice"), false).await;
        assert_eq!(code, ReasonCode::SUCCESS);
        assert!(a.subscribe("secret/#", QoS::AtLeastOnce).await[0].is_success());
        drop(a);
        tokio::time::sleep(Duration::from_millis(100)).await;
        publish_as_alice(app.mqtt_addr, "secret/x", b"for alice").await;

        // The attack: an anonymous client (then bob) with alice's client id.
        for (who, user) in [("anonymous", None), ("bob", Some("bob"))] {
            let (mut thief, code, present) =
                connect(app.mqtt_addr, version, &id, user, false).await;
            assert_eq!(code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, "{who} {version:?}");
            assert!(!present);
            assert_eq!(
                thief.recv_within(Duration::from_millis(300)).await,
                Ok(None),
                "{who} got nothing and was closed"
            );
        }
        // alice herself resumes it, and gets what was queued.
        let (mut a, code, present) =
            connect(app.mqtt_addr, version, &id, Some("alice"), false).await;
        assert_eq!((code, present), (ReasonCode::SUCCESS, true));
        assert_eq!(publishes(&mut a, Duration::from_millis(500)).await, vec!["secret/x"]);
        // While alice is connected, nobody else can take the id over either.
        let (_, code, _) = connect(app.mqtt_addr, version, &id, None, true).await;
        assert_eq!(code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        assert!(
            a.recv_within(Duration::from_millis(200)).await.is_err(),
            "alice kept her connection"
        );
    }
    let m = metrics(&app).await;
    // bob's attempts fail his client id patterns first (he may only use `bob`, `bob-*`).
    assert!(m.contains("mqgate_auth_refused_total{reason=\"client_id_owned\"} 4"), "{m}");
    assert!(m.contains("mqgate_auth_refused_total{reason=\"client_id_not_allowed\"} 2"), "{m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_any_restores_takeover_but_the_acl_is_checked_again() {
    let app = gateway(&config("  client_id_takeover: any\n", ACL)).await;
    let id = unique("dev");
    let (mut a, _, _) = connect(app.mqtt_addr, V311, &id, Some("alice"), false).await;
    assert!(a.subscribe("secret/#", QoS::AtLeastOnce).await[0].is_success());
    assert!(a.subscribe("public/#", QoS::AtLeastOnce).await[0].is_success());
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    publish_as_alice(app.mqtt_addr, "secret/x", b"for alice").await;
    publish_as_alice(app.mqtt_addr, "public/x", b"for anyone").await;
    // `any`: the anonymous client gets the session, but not alice's secret subscription.
    let (mut thief, code, present) = connect(app.mqtt_addr, V311, &id, None, false).await;
    assert_eq!((code, present), (ReasonCode::SUCCESS, true));
    let got = publishes(&mut thief, Duration::from_millis(500)).await;
    assert!(!got.contains(&"secret/x".to_owned()), "{got:?}");
    publish_as_alice(app.mqtt_addr, "secret/y", b"later").await;
    publish_as_alice(app.mqtt_addr, "public/y", b"later").await;
    let later = publishes(&mut thief, Duration::from_millis(500)).await;
    assert_eq!(later, vec!["public/y"], "the revoked subscription is gone from the tree");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_can_be_limited_to_client_id_patterns() {
    let app = gateway(&config("", "")).await;
    for version in [V311, V5] {
        for (id, want) in [
            ("bob".to_owned(), ReasonCode::SUCCESS),
            (unique("bob-"), ReasonCode::SUCCESS),
            (unique("alice-"), ReasonCode::CLIENT_IDENTIFIER_NOT_VALID),
            (unique("xbob"), ReasonCode::CLIENT_IDENTIFIER_NOT_VALID),
        ] {
            let (_, code, _) = connect(app.mqtt_addr, version, &id, Some("bob"), true).await;
            assert_eq!(code, want, "{id} {version:?}");
        }
        // alice has no patterns: any id.
        let (_, code, _) =
            connect(app.mqtt_addr, version, &unique("whatever"), Some("alice"), true).await;
        assert_eq!(code, ReasonCode::SUCCESS);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigned_client_ids_are_unpredictable() {
    let app = gateway(&config("", "")).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut c = RawClient::tcp(app.mqtt_addr, V5).await;
        c.send(&Packet::Connect(Box::new(connect_packet(V5, "")))).await;
        match c.recv().await {
            Some(Packet::ConnAck(a)) => {
                ids.push(a.properties.assigned_client_identifier.clone().expect("assigned"))
            }
            other => panic!("{other:?}"),
        }
    }
    for id in &ids {
        let hex = id.strip_prefix("mqgate-").expect("prefix");
        assert_eq!(hex.len(), 32, "128 random bits: {id}");
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
    assert!(ids[0] != ids[1] && ids[1] != ids[2]);
    // Not a counter: the ids share no long common prefix.
    let common = ids[0].chars().zip(ids[1].chars()).take_while(|(a, b)| a == b).count();
    assert!(common < 7 + 8, "{ids:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_session_is_owned_after_a_restart_and_rechecked_against_a_stricter_acl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = format!("store:\n  path: \"{}\"\n", dir.path().display());
    let open = format!("{store}acl:\n  - allow: all\n    topic: \"#\"\n");
    let app = gateway(&config("", &open)).await;
    let id = unique("dev");
    let (mut a, _, _) = connect(app.mqtt_addr, V5, &id, Some("alice"), false).await;
    assert!(a.subscribe("data/#", QoS::AtLeastOnce).await[0].is_success());
    assert!(a.subscribe("other/#", QoS::AtLeastOnce).await[0].is_success());
    drop(a);
    tokio::time::sleep(Duration::from_millis(100)).await;
    app.stop().await;

    // Restarted with an ACL that no longer lets alice read `data/#`.
    let strict = format!("{store}acl:\n  - deny: subscribe\n    topic: \"data/#\"\n    user: alice\n  - allow: all\n    topic: \"#\"\n");
    let app = gateway_on_store(&config("", &strict)).await;
    // The owner survived the restart.
    let (_, code, _) = connect(app.mqtt_addr, V5, &id, None, false).await;
    assert_eq!(code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    let (mut a, code, present) = connect(app.mqtt_addr, V5, &id, Some("alice"), false).await;
    assert_eq!((code, present), (ReasonCode::SUCCESS, true));
    publish_as_alice(app.mqtt_addr, "data/x", b"no longer hers").await;
    publish_as_alice(app.mqtt_addr, "other/x", b"still hers").await;
    assert_eq!(publishes(&mut a, Duration::from_millis(500)).await, vec!["other/x"]);
    app.stop().await;
}
