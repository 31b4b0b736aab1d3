//! The ZeroMQ target with pyzmq as the peer (`tests/it/python/zmq_peer.py`): a SUB connected to
//! mqgate's bound PUB socket, a PULL that mqgate's PUSH socket connects to, the `ack: receive`
//! rule the kind requires, a PUB socket that cannot drain dropping (counted), and a PUSH socket
//! without a peer holding its publisher back until the peer comes, losing nothing.

use std::process::Stdio;
use std::time::Duration;

use crate::support::*;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// The pyzmq peer, started; its `ready PORT` line read.
struct Peer {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    port: u16,
}

async fn peer(args: &[&str]) -> Peer {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/python/zmq_peer.py");
    let python = std::env::var("MQGATE_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into());
    let mut child = Command::new(&python)
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `{python}` ({e}): python3 with pyzmq is needed (scripts/test.sh installs it)"));
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the pyzmq peer did not start within 20 s")
        .expect("read the peer")
        .unwrap_or_else(|| {
            panic!(
                "the pyzmq peer exited at start (is pyzmq installed? scripts/test.sh installs it)"
            )
        });
    let port = first
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("peer said {first:?}"));
    Peer { _child: child, lines, port }
}

impl Peer {
    /// The next message's frames.
    async fn next(&mut self) -> Vec<String> {
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line())
            .await
            .expect("no message at the pyzmq peer within 20 s")
            .expect("read the peer")
            .expect("the pyzmq peer exited");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

fn config(socket: &str, ack: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\nzmq:\n  out:\n{socket}rules:\n  - name: z\n    from: \"zq/#\"\n    ack: {ack}\n    to:\n      - zmq: {{ socket: out }}\n"
    )
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bound_pub_socket_sends_topic_and_payload_frames_to_a_pyzmq_subscriber() {
    let port = free_port();
    let app = gateway(&config(
        &format!("    kind: pub\n    bind: \"tcp://127.0.0.1:{port}\"\n"),
        "receive",
    ))
    .await;
    let mut sub = peer(&["sub", &format!("tcp://127.0.0.1:{port}"), "zq/", "1000"]).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "zmq-pub").await;
    // ZeroMQ's slow joiner: what is published before the subscription reached the PUB socket
    // is not sent. Publish until the first one comes through.
    let mut id = 1;
    let warm = loop {
        publish_qos1(&mut c, "zq/warm", id, b"w").await;
        id += 1;
        let got = tokio::time::timeout(Duration::from_millis(200), sub.lines.next_line()).await;
        if let Ok(Ok(Some(line))) = got {
            break line;
        }
        assert!(id < 100, "the subscriber got nothing in 20 s");
    };
    assert_eq!(warm, r#"["zq/warm", "w"]"#);
    for i in 0..50u16 {
        publish_qos1(&mut c, &format!("zq/a/{i}"), 200 + i, format!("m{i}").as_bytes()).await;
    }
    let mut got = Vec::new();
    while got.len() < 50 {
        let f = sub.next().await;
        if f[0] != "zq/warm" {
            got.push(f);
        }
    }
    let want: Vec<Vec<String>> =
        (0..50).map(|i| vec![format!("zq/a/{i}"), format!("m{i}")]).collect();
    assert_eq!(got, want, "every message, in order, as [topic, payload]");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_socket_connects_to_a_pyzmq_pull_and_waits_for_it_losing_nothing() {
    // First with the peer up: the frames arrive in order.
    let mut pull = peer(&["pull", "0", "1000"]).await;
    let push = |port: u16| {
        format!("    kind: push\n    connect: \"tcp://127.0.0.1:{port}\"\n    sndhwm: 5\n")
    };
    let app = gateway(&config(&push(pull.port), "receive")).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "zmq-push").await;
    for i in 0..20u16 {
        publish_qos1(&mut c, "zq/p", i + 1, format!("{i}").as_bytes()).await;
    }
    for i in 0..20 {
        assert_eq!(pull.next().await, vec!["zq/p".to_owned(), format!("{i}")]);
    }
    app.stop().await;

    // Then with no peer: the queue (sndhwm 5) fills and the publisher is held back, nothing
    // dropped; once a PULL binds the port, everything arrives in order.
    let port = free_port();
    let app = gateway(&config(&push(port), "receive")).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "zmq-push-wait").await;
    for i in 0..30u16 {
        c.publish("zq/w", QoS::AtLeastOnce, i + 1, format!("{i}").as_bytes()).await;
    }
    let mut acked = 0;
    while let Ok(Some(Packet::PubAck(_))) = c.recv_within(Duration::from_millis(700)).await {
        acked += 1;
    }
    assert!(
        acked < 30,
        "the publisher was held back while no peer took messages ({acked} PUBACKs)"
    );
    let mut pull = peer(&["pull", &port.to_string(), "1000"]).await;
    for i in 0..30 {
        assert_eq!(pull.next().await, vec!["zq/w".to_owned(), format!("{i}")], "message {i}");
    }
    while acked < 30 {
        match c.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAck(_))) => acked += 1,
            other => panic!("expected the rest of the PUBACKs, got {other:?}"),
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pub_socket_that_cannot_send_drops_and_counts_without_holding_back_its_publisher() {
    // The port is taken: the PUB socket cannot bind (it retries), so nothing drains its queue.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let socket = format!("    kind: pub\n    bind: \"tcp://127.0.0.1:{port}\"\n    sndhwm: 5\n");
    let app = gateway(&config(&socket, "receive")).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "zmq-drop").await;
    for i in 0..40u16 {
        publish_qos1(&mut c, "zq/d", i + 1, b"x").await;
    }
    let m = metrics(&app).await;
    let dropped = m
        .lines()
        .find(|l| l.starts_with("mqgate_zmq_dropped_total{socket=\"out\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(dropped >= 34.0, "at most sndhwm (+1 in the task's hands) kept, the rest dropped and counted: {dropped}\n{m}");
    // /readyz says why once the socket has tried to bind (its task may not have run yet).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
        assert_eq!(status, 503, "{body}");
        if body.contains("zmq out") && body.contains("not bound") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

#[test]
fn only_ack_receive_rules_may_use_a_zmq_target() {
    for ack in ["sink", "spool"] {
        let mut yaml = config("    kind: pub\n    bind: \"tcp://127.0.0.1:5556\"\n", ack);
        if ack == "spool" {
            yaml = yaml.replace("rules:", "store:\n  path: /tmp/never-created\nrules:");
        }
        let e = mqgate::config::Config::parse(std::path::Path::new("c.yaml"), &yaml)
            .expect_err("refused")
            .to_string();
        assert!(e.starts_with("c.yaml:"), "{e}");
        assert!(
            e.contains("confirms nothing")
                && e.contains("ack: receive")
                && e.contains(&format!("ack: {ack}")),
            "{e}"
        );
    }
    let both = config(
        "    kind: push\n    bind: \"tcp://127.0.0.1:5556\"\n    connect: \"tcp://h:1\"\n",
        "receive",
    );
    let e = mqgate::config::Config::parse(std::path::Path::new("c.yaml"), &both)
        .expect_err("refused")
        .to_string();
    assert!(e.contains("bind or connect, not both"), "{e}");
}
