//! Target ids come from names, not positions (issue 14, item 4): reordering a rule's `to:`
//! keeps each spooled message with its target, and a store written by a version that named
//! targets by position (`rule/index`) is migrated at start.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqgate::mqtt::codec::{ProtocolVersion, QoS};

use crate::support::webhook::{Reply, Webhook};
use crate::support::*;

/// Written by mqgate at commit 015036d (positional ids) from `fixtures/positional_ids.yaml`
/// with the HTTP endpoint down: rule `spooled` (ack: spool) holds fx/1..fx/5 in the spools of
/// both its targets (`spooled/0` → /first, `spooled/1` → /second); rule `lost` has two dead
/// letters (dl/1, dl/2, unroutable) of target `lost/0`.
const FIXTURE: &[u8] = include_bytes!("fixtures/positional_ids.redb");
const FIXTURE_CONFIG: &str = include_str!("fixtures/positional_ids.yaml");

async fn dead_letter_targets(app: &mqgate::app::App) -> Vec<String> {
    let (code, body) = http_get(app.admin_addr, "/dead-letters").await.expect("dead letters");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["dead_letters"]
        .as_array()
        .expect("list")
        .iter()
        .map(|l| l["target"].as_str().expect("target").to_owned())
        .collect()
}

async fn wait_bodies(hook: &Webhook, path: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = hook.bodies(path);
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_with_positional_ids_is_migrated_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    std::fs::create_dir(&store).expect("store dir");
    std::fs::write(store.join("mqgate.redb"), FIXTURE).expect("fixture");
    let hook = Webhook::ok().await;
    let yaml = FIXTURE_CONFIG
        .replace("/tmp/fx/store.redb", &store.display().to_string())
        .replace("http://127.0.0.1:28839", &hook.url());
    let app = gateway(&yaml).await;
    for path in ["/first", "/second"] {
        let got = wait_bodies(&hook, path, 5).await;
        for i in 1..=5 {
            let want = format!("spooled-{i}");
            assert!(got.iter().any(|b| b.contains(&want)), "{path} lacks {want}: {got:?}");
        }
    }
    let targets = dead_letter_targets(&app).await;
    assert_eq!(targets, ["lost/amqp:rabbit/amq.topic"; 2], "dead letters renamed, no orphans");
    let m = metrics(&app).await;
    assert!(!m.contains("spooled/0") && !m.contains("spooled/1"), "no positional ids left:\n{m}");
    app.stop().await;
    // Once per store: a second start finds nothing to rename and nothing left to send.
    let before = hook.seen().len();
    let app = gateway_on_store(&yaml).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(dead_letter_targets(&app).await.len(), 2);
    app.stop().await;
    assert!(hook.seen().len() - before <= 10, "at most a resend of the unflushed tail");
}

fn reorder_config(store: &std::path::Path, url: &str, order: [&str; 2]) -> String {
    let target = |path: &str| {
        format!("      - http:\n          endpoint: hook\n          path: {path}\n          retry: {{ attempts: 1 }}\n")
    };
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nstore:\n  path: \"{}\"\nhttp:\n  hook:\n    url: \"{url}\"\nrules:\n  - name: r\n    from: \"ro/#\"\n    ack: spool\n    spool:\n      max_retry_time: 1h\n    to:\n{}{}",
        store.display(),
        target(order[0]),
        target(order[1]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordering_a_rules_targets_keeps_each_spool_with_its_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    // /b answers 503 until `b_up`: its spool keeps the messages; /a takes them at once.
    let b_up = Arc::new(AtomicBool::new(false));
    let up = Arc::clone(&b_up);
    let hook = Webhook::start(move |req, _| {
        if req.path == "/b" && !up.load(Ordering::SeqCst) {
            Reply::Status(503)
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let app = gateway(&reorder_config(dir.path(), &hook.url(), ["/a", "/b"])).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("reorder")).await;
    for i in 1..=3u16 {
        c.publish(&format!("ro/{i}"), QoS::AtLeastOnce, i, format!("m{i}").as_bytes()).await;
        let ack = c.recv().await.expect("puback");
        assert!(matches!(ack, mqgate::mqtt::codec::Packet::PubAck(_)), "{ack:?}");
    }
    assert_eq!(wait_bodies(&hook, "/a", 3).await.len(), 3);
    drop(c);
    app.stop().await;

    // The same targets, the other way round; /b is up now.
    b_up.store(true, Ordering::SeqCst);
    let a_before = hook.bodies("/a").len();
    // What /b was sent while it answered 503 (retries).
    let b_before = hook.bodies("/b").len();
    let app = gateway_on_store(&reorder_config(dir.path(), &hook.url(), ["/b", "/a"])).await;
    let got = wait_bodies(&hook, "/b", b_before + 3).await.split_off(b_before);
    for i in 1..=3 {
        assert!(got.iter().any(|b| b.contains(&format!("m{i}"))), "/b got its backlog: {got:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        hook.bodies("/a").len() - a_before <= 3,
        "/a gets at most an unflushed resend of its own, never /b's backlog twice"
    );
    let (_, ready) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
    assert!(
        ready.contains("spool r/http:hook/b:") && ready.contains("spool r/http:hook/a:"),
        "{ready}"
    );
    app.stop().await;
}
