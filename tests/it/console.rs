//! The web console end to end, in Debian's headless Chromium driven by playwright-core
//! (tests/console/console.mjs): log in with the token, watch a real MQTT client appear in the
//! clients list and disconnect it (it gets DISCONNECT 0x98), view and delete a retained
//! message, show and replay a dead letter (a webhook that refused it with 400 takes it the
//! second time) and see it gone, run the rule tester, trace a published message live, press
//! Reload config. Screenshots go to target/console-artifacts/. Missing node, Chromium or the
//! npm packages fail the test with what to install (scripts/test.sh installs them).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::admin_api::{gateway_from_file, publish_retained, wait_dead_letters};
use crate::support::webhook::{Reply, Webhook};
use crate::support::*;

const TOKEN: &str = "console-test-token-0123456789";
const CHROMIUM: &str = "/usr/bin/chromium";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the test needs on the machine, or a failure saying how to get it.
fn prerequisites() -> PathBuf {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's chromium and chromium-driver (scripts/test.sh does: ensure_chromium)"
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "node is missing: install nodejs and npm (scripts/test.sh does: ensure_node)"
    );
    let dir = repo().join("tests/console");
    assert!(
        dir.join("node_modules/playwright-core/package.json").exists(),
        "playwright-core is not installed: run `npm ci --prefix tests/console` (scripts/test.sh does: ensure_console_deps)"
    );
    dir
}

fn config(dir: &Path, hook: std::net::SocketAddr) -> String {
    format!(
        r#"mqtt:
  listen: "127.0.0.1:0"
admin:
  listen: "127.0.0.1:0"
  token: "{TOKEN}"
store:
  path: "{}"
amqp:
  rabbit:
    url: "{AMQP_URL}"
http:
  hook:
    url: "http://{hook}"
rules:
  - name: hook
    from: "hook/#"
    to:
      - http:
          endpoint: hook
          path: /in
          id: hook/0
  - name: lab
    from: "lab/#"
    to:
      - amqp:
          broker: rabbit
          exchange: "amq.topic"
          routing_key: "mqgate.console.lab"
          id: lab/0
"#,
        dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_headless_chromium() {
    let started = std::time::Instant::now();
    let script_dir = prerequisites();
    let artifacts = repo().join("target/console-artifacts");
    let _ = std::fs::remove_dir_all(&artifacts);
    // The webhook refuses a message the first time (400: final, a dead letter) and takes it
    // when it comes again (the replay).
    let hook = Webhook::start(
        |_, before| if before == 0 { Reply::Status(400) } else { Reply::Status(200) },
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let app = gateway_from_file(dir.path(), &config(dir.path(), hook.addr)).await;
    wait_ready(&app).await;

    let mut setter = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "console-setter").await;
    publish_retained(&mut setter, "lab/console/state", 1, b"console-retained-42").await;
    publish_qos1(&mut setter, "hook/dead", 2, b"console-dead-7").await;
    wait_dead_letters(&app, 1).await;
    let dl = app.dead_letters.as_ref().expect("a store");
    // Counted at once, readable once the store's writer has committed it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let letter = loop {
        if let Some((id, _)) = dl.list(None, 10).expect("list").first() {
            break *id;
        }
        assert!(tokio::time::Instant::now() < deadline, "the dead letter is not readable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    let mut child = tokio::process::Command::new("node")
        .arg("console.mjs")
        .current_dir(&script_dir)
        .env("MQGATE_ADMIN", format!("http://{}", app.admin_addr))
        .env("MQGATE_TOKEN", TOKEN)
        .env("ARTIFACTS", &artifacts)
        .env("DEAD_LETTER", letter.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run node");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let stderr = child.stderr.take().expect("stderr");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            text.push_str(&l);
            text.push('\n');
        }
        text
    });

    let mut watched: Option<RawClient> = None;
    let mut steps = Vec::new();
    let mut tracer_task: Option<tokio::task::JoinHandle<()>> = None;
    let run = async {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("console.mjs: {line}");
            let Some(step) = line.strip_prefix("STEP ") else { continue };
            steps.push(step.to_owned());
            match step {
                "clients-open" => {
                    let mut c =
                        RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "console-watch")
                            .await;
                    c.subscribe("lab/#", QoS::AtLeastOnce).await;
                    watched = Some(c);
                }
                "trace-started" => {
                    // The trace's registration races the page's status line: publish until
                    // the page has seen one.
                    let addr = app.mqtt_addr;
                    tracer_task = Some(tokio::spawn(async move {
                        let mut p =
                            RawClient::connect(addr, ProtocolVersion::V5, "console-tracer").await;
                        for id in 1..=60u16 {
                            publish_qos1(&mut p, "lab/trace/1", id, b"traced-payload-9").await;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }));
                }
                "trace-seen" => {
                    if let Some(t) = tracer_task.take() {
                        t.abort();
                    }
                }
                _ => {}
            }
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(180), run).await;
    if let Some(t) = tracer_task.take() {
        t.abort();
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let stderr = errors.await.unwrap_or_default();
    assert!(finished.is_ok(), "console.mjs did not finish within 180 s; steps {steps:?}\n{stderr}");
    let status = status.expect("node exits").expect("node status");
    assert!(
        status.success() && steps.last().map(String::as_str) == Some("done"),
        "console.mjs failed ({status}); steps {steps:?}; screenshots in {}\n{stderr}",
        artifacts.display()
    );

    // What the page did, seen from the other side.
    let mut c = watched.expect("the watched client connected");
    loop {
        match c.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::Disconnect(d))) => {
                assert_eq!(d.code.0, 0x98, "administrative action");
                break;
            }
            Ok(Some(Packet::Publish(_))) => continue,
            other => panic!("the disconnected client expected DISCONNECT 0x98, got {other:?}"),
        }
    }
    let (status, body) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
    assert_eq!(status, 200, "{body}");
    assert_eq!(dl.count(), 0, "the replayed dead letter is gone");
    let replayed = hook.taken();
    assert!(
        replayed.iter().any(|r| r.path == "/in"),
        "the webhook took the replayed message: {replayed:?}"
    );
    let shots = std::fs::read_dir(&artifacts).map(|d| d.count()).unwrap_or(0);
    assert!(shots >= 10, "screenshots in {}: {shots}", artifacts.display());
    eprintln!(
        "console test: {:?}, {shots} screenshots in {}",
        started.elapsed(),
        artifacts.display()
    );
    app.stop().await;
}
