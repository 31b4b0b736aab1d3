//! `cluster:`: three mqgate nodes on the machine's RabbitMQ acting as one broker (a unique
//! prefix per test, so tests never see each other's exchange or queues). Messages published on
//! one node reach the subscribers of the others with QoS, RETAIN, properties, subscription
//! identifiers and order kept; retained messages reach wildcard subscriptions on every node; a
//! node that loses RabbitMQ says so in `/readyz` and keeps serving its own clients.

use std::time::Duration;

use mqgate::app::App;
use mqgate::mqtt::codec::{
    self, Packet, Properties, ProtocolVersion, Publish, QoS, SubscribeFilter, SubscriptionOptions,
};

use crate::support::proxy::Proxy;
use crate::support::rabbit_node::RabbitNode;
use crate::support::{
    expect_publish, expect_silence, gateway, http_get, unique, wait_ready, RawClient, AMQP_URL,
};

/// A node's config: node `id` of cluster `prefix` on the broker at `url`.
pub(crate) fn node_config(prefix: &str, id: &str, url: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\namqp:\n  backbone:\n    url: \"{url}\"\n    reconnect_min: 100ms\n    reconnect_max: 500ms\n    connect_timeout: 3s\ncluster:\n  node_id: {id}\n  broker: backbone\n  prefix: {prefix}\n"
    )
}

/// Three nodes of a fresh cluster, each ready (its cluster link up).
async fn three_nodes() -> (App, App, App) {
    let prefix = unique("it-cluster");
    let a = gateway(&node_config(&prefix, "a", AMQP_URL)).await;
    let b = gateway(&node_config(&prefix, "b", AMQP_URL)).await;
    let c = gateway(&node_config(&prefix, "c", AMQP_URL)).await;
    for n in [&a, &b, &c] {
        wait_ready(n).await;
    }
    (a, b, c)
}

pub(crate) async fn v5(app: &App, id: &str) -> RawClient {
    RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, id).await
}

/// SUBSCRIBE with options and a subscription identifier; asserts it is granted.
pub(crate) async fn subscribe(
    c: &mut RawClient,
    filter: &str,
    options: SubscriptionOptions,
    id: Option<u32>,
) {
    let mut properties = Properties::default();
    properties.subscription_identifiers.extend(id);
    c.send(&Packet::Subscribe(Box::new(codec::Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter { filter: filter.into(), options }],
        properties,
    })))
    .await;
    match c.recv().await {
        Some(Packet::SubAck(s)) => assert!(s.codes.iter().all(|c| c.0 <= 2), "{s:?}"),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

/// Publishes QoS 0 probes on `topic` from `publisher` until `subscriber` gets one (the
/// subscriber's node has bound its queue), then drains what else came.
pub(crate) async fn until_bound(
    publisher: &mut RawClient,
    subscriber: &mut RawClient,
    topic: &str,
) {
    for _ in 0..100 {
        publisher.publish(topic, QoS::AtMostOnce, 0, b"probe").await;
        if let Ok(Some(Packet::Publish(_))) =
            subscriber.recv_within(Duration::from_millis(100)).await
        {
            while let Ok(Some(_)) = subscriber.recv_within(Duration::from_millis(300)).await {}
            return;
        }
    }
    panic!("no message on {topic} reached the other node within 10 s");
}

pub(crate) fn qos(q: QoS) -> SubscriptionOptions {
    SubscriptionOptions { qos: q, ..Default::default() }
}

#[tokio::test]
async fn a_message_reaches_the_subscribers_of_every_node_once_with_what_it_carries() {
    let (a, b, c) = three_nodes().await;
    let mut on_b = v5(&b, "sub-b").await;
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        retain_as_published: true,
        ..Default::default()
    };
    subscribe(&mut on_b, "dev/+/temp", options, Some(7)).await;
    let mut on_c = v5(&c, "sub-c").await;
    subscribe(&mut on_c, "dev/#", qos(QoS::AtMostOnce), None).await;
    // A local subscriber of the publishing node gets one copy, not a second one back through
    // RabbitMQ.
    let mut on_a = v5(&a, "sub-a").await;
    subscribe(&mut on_a, "dev/#", qos(QoS::AtLeastOnce), None).await;
    let mut publisher = v5(&a, "pub-a").await;
    until_bound(&mut publisher, &mut on_b, "dev/probe/temp").await;
    until_bound(&mut publisher, &mut on_c, "dev/probe/temp").await;
    for sub in [&mut on_a, &mut on_b, &mut on_c] {
        while let Ok(Some(p)) = sub.recv_within(Duration::from_millis(300)).await {
            if let Packet::Publish(p) = p {
                if p.qos != QoS::AtMostOnce {
                    sub.send(&Packet::PubAck(codec::PubResponse::success(p.packet_id))).await;
                }
            }
        }
    }

    // AMQP's '.' and '*' in a level, and a level far beyond the 255 bytes of a routing key.
    let long = "x".repeat(300);
    let topics = ["dev/a.b*c/temp".to_owned(), format!("dev/{long}/temp")];
    let n = 40u16;
    for i in 0..n {
        let mut p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: i == 0,
            topic: topics[usize::from(i % 2)].clone(),
            packet_id: i + 1,
            properties: Default::default(),
            payload: bytes::Bytes::from(i.to_string()),
        };
        let props = &mut *p.properties;
        props.user_properties = vec![("k".into(), "1".into()), ("k".into(), "2".into())];
        props.content_type = Some("text/plain".into());
        props.correlation_data = Some(bytes::Bytes::from(vec![0u8; 300]));
        publisher.send(&Packet::Publish(p)).await;
    }
    // Every PUBACK: QoS 1 waits for RabbitMQ's confirm of the copy for the other nodes.
    for i in 0..n {
        match publisher.recv().await {
            Some(Packet::PubAck(ack)) => assert_eq!(ack.packet_id, i + 1),
            other => panic!("expected PUBACK {}, got {other:?}", i + 1),
        }
    }
    for i in 0..n {
        let p = expect_publish(&mut on_b).await;
        assert_eq!(p.payload, i.to_string().as_bytes(), "order per publisher and topic");
        assert_eq!(p.topic, topics[usize::from(i % 2)]);
        assert_eq!(p.qos, QoS::AtLeastOnce);
        assert_eq!(p.retain, i == 0, "retain as published");
        assert_eq!(p.properties.subscription_identifiers, vec![7]);
        assert_eq!(
            p.properties.user_properties,
            vec![("k".to_owned(), "1".to_owned()), ("k".to_owned(), "2".to_owned())]
        );
        assert_eq!(p.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(p.properties.correlation_data.as_deref(), Some(&[0u8; 300][..]));
        on_b.send(&Packet::PubAck(codec::PubResponse::success(p.packet_id))).await;

        let p = expect_publish(&mut on_c).await;
        assert_eq!(p.payload, i.to_string().as_bytes());
        assert_eq!(p.qos, QoS::AtMostOnce, "the granted QoS of the node's subscription");
        assert!(!p.retain, "RETAIN cleared without retain-as-published");

        let p = expect_publish(&mut on_a).await;
        assert_eq!(p.payload, i.to_string().as_bytes());
        on_a.send(&Packet::PubAck(codec::PubResponse::success(p.packet_id))).await;
    }
    expect_silence(&mut on_a, Duration::from_millis(500)).await;
    expect_silence(&mut on_b, Duration::from_millis(100)).await;
    expect_silence(&mut on_c, Duration::from_millis(100)).await;
    // Counted: sent by a, delivered in by b, a's own copies back (it has a subscriber) dropped.
    let counter = |text: &str, direction: &str| -> u64 {
        let name = format!("mqgate_cluster_messages_total{{direction=\"{direction}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(name.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let (ma, mb) = (crate::support::metrics(&a).await, crate::support::metrics(&b).await);
    assert!(counter(&ma, "out") >= u64::from(n), "{ma}");
    assert!(counter(&mb, "in") >= u64::from(n), "{mb}");
    assert!(counter(&ma, "own") >= u64::from(n), "{ma}");
    assert!(ma.contains("mqgate_cluster_connected 1"), "{ma}");
}

#[tokio::test]
async fn a_suback_means_messages_from_every_node_arrive_and_unsubscribing_stops_them() {
    let (a, b, _c) = three_nodes().await;
    let mut publisher = v5(&a, "pub").await;
    let mut on_b = v5(&b, "sub").await;
    subscribe(&mut on_b, "room/1", qos(QoS::AtMostOnce), None).await;
    // The SUBACK came once B's queue was bound: what A takes after it reaches B.
    // A topic the filter does not match, with the same coarse key: matched exactly on B.
    publisher.publish("room/1/sub", QoS::AtMostOnce, 0, b"no").await;
    publisher.publish("room/1", QoS::AtMostOnce, 0, b"yes").await;
    assert_eq!(expect_publish(&mut on_b).await.payload, &b"yes"[..]);
    expect_silence(&mut on_b, Duration::from_millis(300)).await;
    on_b.send(&Packet::Unsubscribe(Box::new(codec::Unsubscribe {
        packet_id: 2,
        filters: vec!["room/1".into()],
        properties: Properties::default(),
    })))
    .await;
    assert!(matches!(on_b.recv().await, Some(Packet::UnsubAck(_))));
    tokio::time::sleep(Duration::from_millis(300)).await;
    publisher.publish("room/1", QoS::AtMostOnce, 0, b"gone").await;
    expect_silence(&mut on_b, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn retained_messages_reach_wildcard_subscriptions_on_every_node() {
    let (a, b, c) = three_nodes().await;
    let mut publisher = v5(&a, "pub").await;
    let mut p = crate::support::publish_packet("cfg/dev1/mode", QoS::AtLeastOnce, 1, b"eco");
    p.retain = true;
    publisher.send(&Packet::Publish(p)).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    for (node, name) in [(&b, "b"), (&c, "c")] {
        // Confirmed by RabbitMQ: in every node's queue; each node folds it into its store.
        let mut sub = None;
        for _ in 0..50 {
            let mut s = v5(node, &format!("late-{name}")).await;
            subscribe(&mut s, "cfg/+/mode", qos(QoS::AtLeastOnce), None).await;
            if let Ok(Some(Packet::Publish(r))) = s.recv_within(Duration::from_millis(100)).await {
                sub = Some(r);
                break;
            }
        }
        let r = sub.unwrap_or_else(|| panic!("node {name} never had the retained message"));
        assert_eq!(r.payload, &b"eco"[..]);
        assert!(r.retain);
        assert_eq!(r.topic, "cfg/dev1/mode");
    }
}

#[tokio::test]
async fn a_node_that_loses_rabbitmq_says_why_and_keeps_serving_its_clients() {
    let proxy = Proxy::start().await;
    let prefix = unique("it-cluster");
    let a = gateway(&node_config(&prefix, "a", &proxy.url())).await;
    let b = gateway(&node_config(&prefix, "b", AMQP_URL)).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    let mut local = v5(&a, "local").await;
    subscribe(&mut local, "x/#", qos(QoS::AtLeastOnce), None).await;
    let mut publisher = v5(&a, "pub").await;

    proxy.cut();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let body = loop {
        let (status, body) = http_get(a.admin_addr, "/readyz").await.expect("readyz");
        if status == 503 && body.contains("cluster: node a not connected") {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "readyz still says: {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.contains("cluster: node a not connected:"), "{body}");
    let (status, body) = http_get(b.admin_addr, "/readyz").await.expect("readyz");
    assert_eq!(status, 200, "the other node is fine: {body}");
    assert!(body.contains("cluster: node b connected"), "{body}");

    // Local delivery goes on; QoS 1 is acknowledged (not forwarded, counted).
    crate::support::publish_qos1(&mut publisher, "x/1", 1, b"still here").await;
    assert_eq!(expect_publish(&mut local).await.payload, &b"still here"[..]);
    let metrics = crate::support::metrics(&a).await;
    assert!(metrics.contains("reason=\"cluster_unavailable\""), "{metrics}");

    proxy.restore();
    wait_ready(&a).await;
}

#[test]
fn an_unknown_broker_is_named_with_its_position() {
    let yaml = "mqtt:\n  listen: \"127.0.0.1:0\"\namqp:\n  rabbit:\n    url: \"amqp://localhost\"\ncluster:\n  node_id: n1\n  broker: rabit\n";
    let err = mqgate::config::Config::parse(std::path::Path::new("c.yaml"), yaml)
        .expect_err("unknown broker");
    let text = err.to_string();
    assert!(
        text.contains(
            "c.yaml:8:11: cluster.broker \"rabit\" is not a broker under amqp: (defined: rabbit)"
        ),
        "{text}"
    );
    let yaml = yaml.replace("broker: rabit", "broker: rabbit").replace("n1", "\"n 1\"");
    let err = mqgate::config::Config::parse(std::path::Path::new("c.yaml"), &yaml)
        .expect_err("bad node id");
    assert!(err.to_string().contains("c.yaml:7:12: cluster.node_id \"n 1\""), "{err}");
}

#[tokio::test]
async fn a_connect_on_another_node_takes_the_client_id_over() {
    let (a, b, _c) = three_nodes().await;
    let mut first = v5(&a, "device-7").await;
    subscribe(&mut first, "cmd/7", qos(QoS::AtLeastOnce), None).await;
    let second = v5(&b, "device-7").await;
    crate::support::expect_disconnect(&mut first, codec::ReasonCode::SESSION_TAKEN_OVER).await;
    // Node A let go: a third CONNECT, back on A, takes it from B the same way.
    let mut second = second;
    let _third = v5(&a, "device-7").await;
    crate::support::expect_disconnect(&mut second, codec::ReasonCode::SESSION_TAKEN_OVER).await;
}

/// Sends a CONNECT for `id` to `addr`; the CONNACK's success and, if it succeeded, whether the
/// connection stays up for `hold`.
async fn try_connect(addr: std::net::SocketAddr, id: String, hold: Duration) -> (bool, bool) {
    let mut c = RawClient::tcp(addr, ProtocolVersion::V5).await;
    let connect = crate::support::connect_packet(ProtocolVersion::V5, &id);
    c.send(&Packet::Connect(Box::new(connect))).await;
    let accepted = match c.recv_within(Duration::from_secs(15)).await {
        Ok(Some(Packet::ConnAck(ack))) => ack.code.is_success(),
        other => panic!("expected CONNACK, got {other:?}"),
    };
    if !accepted {
        return (false, false);
    }
    let stays = matches!(c.recv_within(hold).await, Err(()));
    (true, stays)
}

#[tokio::test]
async fn simultaneous_connects_on_two_nodes_leave_exactly_one_connected() {
    let prefix = unique("it-cluster");
    let extra = "  connect_timeout: 3s\n";
    let with = |id: &str| {
        node_config(&prefix, id, AMQP_URL).replacen("mqtt:\n", &format!("mqtt:\n{extra}"), 1)
    };
    let a = gateway(&with("a")).await;
    let b = gateway(&with("b")).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    for round in 0..5 {
        let id = format!("twin-{round}");
        let hold = Duration::from_secs(4);
        let (on_a, on_b) = tokio::join!(
            try_connect(a.mqtt_addr, id.clone(), hold),
            try_connect(b.mqtt_addr, id.clone(), hold)
        );
        let connected = [on_a, on_b].iter().filter(|(_, stays)| *stays).count();
        assert_eq!(connected, 1, "round {round}: node a {on_a:?}, node b {on_b:?}");
    }
}

/// A node as the real binary (so that a test can SIGKILL it), its config and log in `dir`.
pub(crate) struct NodeProcess {
    pub(crate) child: std::process::Child,
    pub(crate) mqtt: std::net::SocketAddr,
    pub(crate) admin: std::net::SocketAddr,
}

impl NodeProcess {
    pub(crate) async fn start(dir: &std::path::Path, prefix: &str, id: &str) -> NodeProcess {
        let free = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let (mqtt, admin) = (free(), free());
        let yaml = node_config(prefix, id, AMQP_URL)
            .replacen("127.0.0.1:0", &mqtt.to_string(), 1)
            .replacen("127.0.0.1:0", &admin.to_string(), 1);
        let path = dir.join(format!("{id}.yaml"));
        std::fs::write(&path, yaml).expect("write config");
        let log = std::fs::File::create(dir.join(format!("{id}.log"))).expect("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mqgate"))
            .args(["run", "--config"])
            .arg(&path)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn mqgate");
        let node = NodeProcess { child, mqtt, admin };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !matches!(http_get(node.admin, "/readyz").await, Ok((200, _))) {
            let log = std::fs::read_to_string(dir.join(format!("{id}.log"))).unwrap_or_default();
            assert!(tokio::time::Instant::now() < deadline, "node {id} not ready: {log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_sigkilled_node_s_clients_reconnect_to_another_node_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique("it-cluster");
    let mut a = NodeProcess::start(dir.path(), &prefix, "a").await;
    let b = NodeProcess::start(dir.path(), &prefix, "b").await;
    let c = NodeProcess::start(dir.path(), &prefix, "c").await;
    let mut device = RawClient::connect(a.mqtt, ProtocolVersion::V5, "device-k").await;
    let mut watcher = RawClient::connect(c.mqtt, ProtocolVersion::V5, "watcher").await;
    subscribe(&mut watcher, "status/#", qos(QoS::AtLeastOnce), None).await;

    // SIGKILL: no DISCONNECT, no clean close of its AMQP connection.
    a.child.kill().expect("kill");
    a.child.wait().expect("reap");
    assert!(matches!(device.recv_within(Duration::from_secs(5)).await, Ok(None)), "closed");
    // Its lock went with its connection: the client id connects on b without waiting for a.
    let t0 = std::time::Instant::now();
    let mut moved = RawClient::connect(b.mqtt, ProtocolVersion::V5, "device-k").await;
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    // And what it publishes there reaches the subscriber on c.
    let mut p = None;
    for i in 0..50u16 {
        moved.publish("status/k", QoS::AtMostOnce, 0, format!("{i}").as_bytes()).await;
        if let Ok(Some(Packet::Publish(got))) =
            watcher.recv_within(Duration::from_millis(200)).await
        {
            p = Some(got);
            break;
        }
    }
    assert!(p.is_some(), "nothing from b reached c after a died");
    let (status, body) = http_get(b.admin, "/readyz").await.expect("readyz");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn the_suback_waits_until_the_node_s_queue_is_bound() {
    let proxy = Proxy::start().await;
    let prefix = unique("it-cluster");
    let a = gateway(&node_config(&prefix, "a", AMQP_URL)).await;
    let b = gateway(&node_config(&prefix, "b", &proxy.url())).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    let mut on_b = v5(&b, "sub").await;
    // B's queue.bind cannot reach RabbitMQ: no SUBACK yet.
    proxy.pause_to_broker.send_replace(true);
    on_b.send(&Packet::Subscribe(Box::new(codec::Subscribe {
        packet_id: 9,
        filters: vec![SubscribeFilter { filter: "late/+".into(), options: qos(QoS::AtLeastOnce) }],
        properties: Properties::default(),
    })))
    .await;
    expect_silence(&mut on_b, Duration::from_millis(700)).await;
    proxy.pause_to_broker.send_replace(false);
    match on_b.recv().await {
        Some(Packet::SubAck(s)) => assert_eq!(s.packet_id, 9),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let mut publisher = v5(&a, "pub").await;
    crate::support::publish_qos1(&mut publisher, "late/1", 1, b"first").await;
    assert_eq!(expect_publish(&mut on_b).await.payload, &b"first"[..]);
}

#[tokio::test]
async fn a_node_that_joins_later_gets_the_retained_messages_published_before() {
    let prefix = unique("it-cluster");
    let a = gateway(&node_config(&prefix, "a", AMQP_URL)).await;
    wait_ready(&a).await;
    let mut publisher = v5(&a, "pub").await;
    for (i, topic) in ["old/1", "old/2"].iter().enumerate() {
        let mut p = crate::support::publish_packet(topic, QoS::AtLeastOnce, i as u16 + 1, b"v1");
        p.retain = true;
        publisher.send(&Packet::Publish(p)).await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    let b = gateway(&node_config(&prefix, "b", AMQP_URL)).await;
    wait_ready(&b).await;
    let mut got = Vec::new();
    for _ in 0..50 {
        let mut s = v5(&b, "late").await;
        subscribe(&mut s, "old/#", qos(QoS::AtMostOnce), None).await;
        got.clear();
        while let Ok(Some(Packet::Publish(p))) = s.recv_within(Duration::from_millis(200)).await {
            assert!(p.retain);
            got.push(p.topic);
        }
        if got.len() == 2 {
            break;
        }
    }
    got.sort();
    assert_eq!(got, ["old/1", "old/2"], "node b has what was retained before it started");
}

#[tokio::test]
async fn the_wills_of_a_sigkilled_node_are_published_once_by_a_survivor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique("it-cluster");
    let mut a = NodeProcess::start(dir.path(), &prefix, "a").await;
    let b = NodeProcess::start(dir.path(), &prefix, "b").await;
    let c = NodeProcess::start(dir.path(), &prefix, "c").await;
    let mut watchers = Vec::new();
    for (node, id) in [(&b, "w-b"), (&c, "w-c")] {
        let mut w = RawClient::connect(node.mqtt, ProtocolVersion::V5, id).await;
        subscribe(&mut w, "wills/#", qos(QoS::AtLeastOnce), None).await;
        watchers.push(w);
    }
    let with_will = |id: &str, topic: &str| {
        let mut connect = crate::support::connect_packet(ProtocolVersion::V5, id);
        connect.will = Some(codec::LastWill {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
        });
        connect
    };
    let mut devices = Vec::new();
    for (id, topic) in [("dev-1", "wills/1"), ("dev-2", "wills/2")] {
        let mut d = RawClient::tcp(a.mqtt, ProtocolVersion::V5).await;
        d.send(&Packet::Connect(Box::new(with_will(id, topic)))).await;
        assert!(matches!(d.recv().await, Some(Packet::ConnAck(ack)) if ack.code.is_success()));
        devices.push(d);
    }
    // dev-2 leaves normally: its will is not published, now or when a dies.
    devices[1]
        .send(&Packet::Disconnect(Box::new(codec::Disconnect {
            code: codec::ReasonCode::SUCCESS,
            properties: Properties::default(),
        })))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    a.child.kill().expect("kill");
    a.child.wait().expect("reap");
    for w in &mut watchers {
        let p = match w.recv_within(Duration::from_secs(15)).await {
            Ok(Some(Packet::Publish(p))) => p,
            other => panic!("no will from the dead node: {other:?}"),
        };
        assert_eq!((p.topic.as_str(), &p.payload[..]), ("wills/1", &b"gone"[..]));
        w.send(&Packet::PubAck(codec::PubResponse::success(p.packet_id))).await;
    }
    // Once: not by both survivors, and not dev-2's.
    for w in &mut watchers {
        expect_silence(w, Duration::from_secs(3)).await;
    }
}

#[tokio::test]
async fn a_burst_on_topics_sharing_a_key_arrives_complete_and_in_order() {
    let (a, b, _c) = three_nodes().await;
    let mut on_b = v5(&b, "bulk-sub").await;
    subscribe(&mut on_b, "bulk/#", qos(QoS::AtLeastOnce), None).await;
    let mut publisher = v5(&a, "bulk-pub").await;
    // One routing key (bulk/k/...): sent to RabbitMQ as batches of messages.
    let n = 600u16;
    for i in 0..n {
        let topic = format!("bulk/k/{}", i % 3);
        let (q, id) = if i % 2 == 0 { (QoS::AtMostOnce, 0) } else { (QoS::AtLeastOnce, i) };
        let mut p = crate::support::publish_packet(&topic, q, id, i.to_string().as_bytes());
        p.properties.user_properties = vec![("i".into(), i.to_string())];
        publisher.send(&Packet::Publish(p)).await;
    }
    let mut acked = 0;
    while acked < n / 2 {
        match publisher.recv().await {
            Some(Packet::PubAck(_)) => acked += 1,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    for i in 0..n {
        let p = expect_publish(&mut on_b).await;
        assert_eq!(p.payload, i.to_string().as_bytes(), "in publish order");
        assert_eq!(p.topic, format!("bulk/k/{}", i % 3));
        assert_eq!(p.properties.user_properties, vec![("i".to_owned(), i.to_string())]);
        if p.qos != QoS::AtMostOnce {
            on_b.send(&Packet::PubAck(codec::PubResponse::success(p.packet_id))).await;
        }
    }
    expect_silence(&mut on_b, Duration::from_millis(300)).await;
}

/// `mqgate_cluster_messages_total{direction}` of a node.
async fn cluster_messages(app: &App, direction: &str) -> u64 {
    let text = crate::support::metrics(app).await;
    let name = format!("mqgate_cluster_messages_total{{direction=\"{direction}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(name.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Past a node's first moments in the cluster (it forwards everything until every other
/// node's heartbeat had time to arrive: 1.5 s).
pub(crate) async fn past_grace() {
    tokio::time::sleep(Duration::from_millis(2000)).await;
}

#[tokio::test]
async fn a_message_no_other_node_can_match_stays_on_its_node() {
    let (a, b, _c) = three_nodes().await;
    let mut local = v5(&a, "local").await;
    subscribe(&mut local, "here/#", qos(QoS::AtLeastOnce), None).await;
    let mut on_b = v5(&b, "far").await;
    subscribe(&mut on_b, "there/+", qos(QoS::AtMostOnce), None).await;
    past_grace().await;
    let mut publisher = v5(&a, "pub").await;
    let before = cluster_messages(&a, "out").await;
    // QoS 1: PUBACKed without a confirm from RabbitMQ (nothing was sent there).
    for i in 1..=30u16 {
        crate::support::publish_qos1(&mut publisher, "here/x", i, b"local").await;
        let p = expect_publish(&mut local).await;
        local.send(&Packet::PubAck(codec::PubResponse::success(p.packet_id))).await;
    }
    // No node subscribed to anything under `elsewhere`: it stays; `there/1` goes to B.
    publisher.publish("elsewhere/x", QoS::AtMostOnce, 0, b"nobody").await;
    publisher.publish("there/1", QoS::AtMostOnce, 0, b"far").await;
    assert_eq!(expect_publish(&mut on_b).await.payload, &b"far"[..]);
    let after = cluster_messages(&a, "out").await;
    assert_eq!(after - before, 1, "only the message B can match went to RabbitMQ");
    expect_silence(&mut on_b, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn the_suback_waits_until_the_other_nodes_know_the_new_subscription() {
    let proxy = Proxy::start().await;
    let prefix = unique("it-cluster");
    let a = gateway(&node_config(&prefix, "a", &proxy.url())).await;
    let b = gateway(&node_config(&prefix, "b", AMQP_URL)).await;
    wait_ready(&a).await;
    wait_ready(&b).await;
    past_grace().await;
    let mut publisher = v5(&a, "pub").await;
    let mut on_b = v5(&b, "sub").await;
    // A cannot acknowledge B's new key (nothing from A reaches RabbitMQ): no SUBACK yet.
    proxy.pause_to_broker.send_replace(true);
    on_b.send(&Packet::Subscribe(Box::new(codec::Subscribe {
        packet_id: 4,
        filters: vec![SubscribeFilter { filter: "fresh/+".into(), options: qos(QoS::AtMostOnce) }],
        properties: Properties::default(),
    })))
    .await;
    expect_silence(&mut on_b, Duration::from_millis(800)).await;
    proxy.pause_to_broker.send_replace(false);
    match on_b.recv().await {
        Some(Packet::SubAck(s)) => assert_eq!(s.packet_id, 4),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // A knows the key: what it takes right after the SUBACK goes to B.
    publisher.publish("fresh/1", QoS::AtMostOnce, 0, b"first").await;
    assert_eq!(expect_publish(&mut on_b).await.payload, &b"first"[..]);
}

#[tokio::test]
async fn what_is_published_right_after_a_suback_reaches_it_from_every_node() {
    let (a, b, c) = three_nodes().await;
    past_grace().await;
    let mut on_a = v5(&a, "pub-a").await;
    let mut on_c = v5(&c, "pub-c").await;
    let mut sub = v5(&b, "sub").await;
    for i in 0..20 {
        // A new coarse key each round: B announces it, A and C must have it by the SUBACK.
        let topic = format!("race{i}/x");
        subscribe(&mut sub, &topic, qos(QoS::AtMostOnce), None).await;
        on_a.publish(&topic, QoS::AtMostOnce, 0, b"a").await;
        on_c.publish(&topic, QoS::AtMostOnce, 0, b"c").await;
        let mut got =
            vec![expect_publish(&mut sub).await.payload, expect_publish(&mut sub).await.payload];
        got.sort();
        assert_eq!(got, [&b"a"[..], &b"c"[..]], "round {i}");
    }
}

#[tokio::test]
async fn a_node_that_joins_forwards_to_the_subscriptions_already_there() {
    let prefix = unique("it-cluster");
    let a = gateway(&node_config(&prefix, "a", AMQP_URL)).await;
    wait_ready(&a).await;
    let mut on_a = v5(&a, "sub-a").await;
    subscribe(&mut on_a, "join/#", qos(QoS::AtMostOnce), None).await;
    let d = gateway(&node_config(&prefix, "d", AMQP_URL)).await;
    wait_ready(&d).await;
    let mut on_d = v5(&d, "pub-d").await;
    // At once (D forwards everything until it heard from every node) and later (D has A's
    // keys), D's messages reach A's subscriber.
    on_d.publish("join/now", QoS::AtMostOnce, 0, b"1").await;
    assert_eq!(expect_publish(&mut on_a).await.payload, &b"1"[..]);
    past_grace().await;
    on_d.publish("join/later", QoS::AtMostOnce, 0, b"2").await;
    assert_eq!(expect_publish(&mut on_a).await.payload, &b"2"[..]);
    let out = cluster_messages(&d, "out").await;
    on_d.publish("other/x", QoS::AtMostOnce, 0, b"3").await;
    on_d.publish("join/again", QoS::AtMostOnce, 0, b"4").await;
    assert_eq!(expect_publish(&mut on_a).await.payload, &b"4"[..]);
    assert_eq!(cluster_messages(&d, "out").await - out, 1, "D knows what A wants");
    // A subscription on the new node: A's messages after the SUBACK reach it.
    let mut sub_d = v5(&d, "sub-d").await;
    subscribe(&mut sub_d, "back/#", qos(QoS::AtMostOnce), None).await;
    on_a.publish("back/1", QoS::AtMostOnce, 0, b"5").await;
    assert_eq!(expect_publish(&mut sub_d).await.payload, &b"5"[..]);
}

/// The clients `GET /api/v1/clients` of the node at `admin` lists: (client id, node, remote).
async fn listed(admin: std::net::SocketAddr, query: &str) -> Vec<(String, String, bool)> {
    let (status, body) =
        http_get(admin, &format!("/api/v1/clients{query}")).await.expect("clients");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let clients = v["clients"].as_array().cloned().unwrap_or_default();
    clients
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (s("client_id"), s("node"), c["remote"].as_bool().unwrap_or(false))
        })
        .collect()
}

/// Polls `GET /api/v1/clients` of `admin` until `done` says yes (10 s at most).
async fn until_listed(
    admin: std::net::SocketAddr,
    done: impl Fn(&[(String, String, bool)]) -> bool,
) -> Vec<(String, String, bool)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = listed(admin, "").await;
        if done(&list) {
            return list;
        }
        assert!(tokio::time::Instant::now() < deadline, "clients listed: {list:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn entry(id: &str, node: &str, remote: bool) -> (String, String, bool) {
    (id.to_owned(), node.to_owned(), remote)
}

#[tokio::test]
async fn the_admin_api_of_any_node_lists_the_cluster_s_clients() {
    let (a, b, c) = three_nodes().await;
    let _on_a = v5(&a, "cl-a").await;
    let mut on_b = v5(&b, "cl-b").await;
    let _on_c = v5(&c, "cl-c").await;
    let list = until_listed(a.admin_addr, |l| l.len() == 3).await;
    assert_eq!(
        list,
        [entry("cl-a", "a", false), entry("cl-b", "b", true), entry("cl-c", "c", true)]
    );
    // Each node's view is the same (only `remote` differs).
    let list = until_listed(c.admin_addr, |l| l.len() == 3).await;
    assert_eq!(
        list,
        [entry("cl-a", "a", true), entry("cl-b", "b", true), entry("cl-c", "c", false)]
    );
    // Searched and paged across nodes, by client id.
    assert_eq!(listed(a.admin_addr, "?search=CL-C").await, [entry("cl-c", "c", true)]);
    assert_eq!(listed(a.admin_addr, "?limit=1&after=cl-a").await, [entry("cl-b", "b", true)]);
    let (status, body) = http_get(a.admin_addr, "/api/v1/clients/cl-b").await.expect("client");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!((v["node"].as_str(), v["remote"].as_bool()), (Some("b"), Some(true)), "{body}");
    // A client that leaves its node leaves the others' lists; one that moves shows its new node.
    on_b.send(&Packet::Disconnect(Box::new(codec::Disconnect {
        code: codec::ReasonCode::SUCCESS,
        properties: Properties::default(),
    })))
    .await;
    until_listed(a.admin_addr, |l| !l.iter().any(|e| e.0 == "cl-b")).await;
    let _moved = v5(&a, "cl-c").await;
    until_listed(b.admin_addr, |l| l.contains(&entry("cl-c", "a", true)) && l.len() == 2).await;
}

#[tokio::test]
async fn the_clients_of_a_sigkilled_node_leave_the_others_lists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = unique("it-cluster");
    let a = NodeProcess::start(dir.path(), &prefix, "a").await;
    let mut b = NodeProcess::start(dir.path(), &prefix, "b").await;
    let _device = RawClient::connect(b.mqtt, ProtocolVersion::V5, "on-b").await;
    until_listed(a.admin, |l| l.contains(&entry("on-b", "b", true))).await;
    b.child.kill().expect("kill");
    b.child.wait().expect("reap");
    // Silent for 3.5 s, then its queue is found gone.
    until_listed(a.admin, |l| l.is_empty()).await;
}

/// Takes every PUBLISH `c` gets until it is quiet for `quiet`, acknowledging QoS 1 ones;
/// their payloads.
pub(crate) async fn drain(c: &mut RawClient, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Ok(Some(p)) = c.recv_within(quiet).await {
        if let Packet::Publish(p) = p {
            if p.qos != QoS::AtMostOnce {
                c.send(&Packet::PubAck(codec::PubResponse::success(p.packet_id))).await;
            }
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    got
}

#[tokio::test]
async fn a_share_group_gets_each_message_once_across_the_nodes() {
    let (a, b, c) = three_nodes().await;
    let mut members = Vec::new();
    for (node, id) in [(&a, "m-a"), (&b, "m-b"), (&c, "m-c")] {
        let mut m = v5(node, id).await;
        subscribe(&mut m, "$share/team/jobs/#", qos(QoS::AtLeastOnce), None).await;
        members.push(m);
    }
    // A plain subscriber still gets every message.
    let mut all = v5(&b, "all").await;
    subscribe(&mut all, "jobs/#", qos(QoS::AtMostOnce), None).await;
    past_grace().await;
    let mut publisher = v5(&a, "pub").await;
    let n = 60u16;
    for i in 1..=n {
        crate::support::publish_qos1(
            &mut publisher,
            &format!("jobs/{i}"),
            i,
            i.to_string().as_bytes(),
        )
        .await;
    }
    let mut got = Vec::new();
    let mut per_member = Vec::new();
    for m in &mut members {
        let mine = drain(m, Duration::from_millis(1500)).await;
        per_member.push(mine.len());
        got.extend(mine);
    }
    got.sort_by_key(|p| p.parse::<u16>().unwrap_or(0));
    let expected: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    assert_eq!(got, expected, "each message once in the group, cluster-wide ({per_member:?})");
    assert!(per_member.iter().filter(|k| **k > 0).count() >= 2, "shared: {per_member:?}");
    assert_eq!(drain(&mut all, Duration::from_millis(300)).await.len(), usize::from(n));

    // The member on C leaves: A's and B's members take all of it.
    let mut gone = members.pop().expect("c");
    gone.send(&Packet::Unsubscribe(Box::new(codec::Unsubscribe {
        packet_id: 2,
        filters: vec!["$share/team/jobs/#".into()],
        properties: Properties::default(),
    })))
    .await;
    assert!(matches!(gone.recv().await, Some(Packet::UnsubAck(_))));
    let mut p = crate::support::publish_packet("jobs/x", QoS::AtLeastOnce, 1, b"r");
    p.retain = true;
    publisher.send(&Packet::Publish(p)).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    for i in 1..=20u16 {
        crate::support::publish_qos1(&mut publisher, "jobs/y", i, b"y").await;
    }
    let mut total = 0;
    for m in &mut members {
        total += drain(m, Duration::from_millis(1500)).await.len();
    }
    assert_eq!(total, 21, "the retained one too, once");
    expect_silence(&mut gone, Duration::from_millis(100)).await;
}

/// Waits until `/readyz` of `app` answers `status` with `text` in its body (30 s at most).
async fn until_readyz(app: &App, status: u16, text: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (got, body) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
        if got == status && body.contains(text) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "readyz still says: {got} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `f` (which blocks for seconds) on `node` off the runtime, so the nodes in this
/// process go on meanwhile.
async fn off_runtime(mut node: RabbitNode, f: fn(&mut RabbitNode)) -> RabbitNode {
    tokio::task::spawn_blocking(move || {
        f(&mut node);
        node
    })
    .await
    .expect("RabbitMQ node")
}

/// RabbitMQ itself restarts (a node of the test's own: the machine's is never touched): every
/// mqgate node says so in `/readyz` and keeps serving its own clients, and once RabbitMQ is
/// back they act as one broker again without being restarted: cross-node delivery, the
/// cluster-wide client-id lock, retained messages to wildcard subscriptions on other nodes.
#[tokio::test]
async fn after_rabbitmq_restarts_the_nodes_act_as_one_broker_again() {
    let rabbit = tokio::task::spawn_blocking(RabbitNode::start_plain).await.expect("start");
    let url = rabbit.amqp_url();
    let prefix = unique("it-cluster");
    let a = gateway(&node_config(&prefix, "a", &url)).await;
    let b = gateway(&node_config(&prefix, "b", &url)).await;
    let c = gateway(&node_config(&prefix, "c", &url)).await;
    for n in [&a, &b, &c] {
        wait_ready(n).await;
    }
    let mut on_b = v5(&b, "sub-b").await;
    subscribe(&mut on_b, "plant/#", qos(QoS::AtLeastOnce), None).await;
    let mut local = v5(&a, "sub-a").await;
    subscribe(&mut local, "plant/#", qos(QoS::AtLeastOnce), None).await;
    let mut publisher = v5(&a, "pub-a").await;
    until_bound(&mut publisher, &mut on_b, "plant/probe").await;
    while let Ok(Some(_)) = local.recv_within(Duration::from_millis(300)).await {}

    let rabbit = off_runtime(rabbit, RabbitNode::stop).await;
    for n in [&a, &b, &c] {
        until_readyz(n, 503, "not connected").await;
    }
    // Down: a node still serves its own clients.
    crate::support::publish_qos1(&mut publisher, "plant/1", 1, b"while down").await;
    assert_eq!(expect_publish(&mut local).await.payload, &b"while down"[..]);

    let rabbit = off_runtime(rabbit, RabbitNode::start_again).await;
    for n in [&a, &b, &c] {
        until_readyz(n, 200, "connected").await;
    }
    // The subscription on b is bound again without a new SUBSCRIBE.
    until_bound(&mut publisher, &mut on_b, "plant/probe").await;
    while let Ok(Some(_)) = local.recv_within(Duration::from_millis(300)).await {}
    for i in 0..20u16 {
        crate::support::publish_qos1(&mut publisher, "plant/2", i + 2, format!("{i}").as_bytes())
            .await;
    }
    for i in 0..20u16 {
        let got = expect_publish(&mut on_b).await;
        assert_eq!(got.payload, format!("{i}").as_bytes(), "in order, each once");
        assert_eq!(expect_publish(&mut local).await.payload, format!("{i}").as_bytes());
    }
    expect_silence(&mut on_b, Duration::from_millis(500)).await;

    // One client id, one connection, across the nodes again.
    let mut first = v5(&a, "device-r").await;
    let _second = v5(&c, "device-r").await;
    crate::support::expect_disconnect(&mut first, codec::ReasonCode::SESSION_TAKEN_OVER).await;

    // A retained message published on c reaches a new wildcard subscription on b.
    let mut on_c = v5(&c, "pub-c").await;
    on_c.send(&Packet::Publish(Publish {
        retain: true,
        ..crate::support::publish_packet("cfg/r/mode", QoS::AtLeastOnce, 9, b"eco")
    }))
    .await;
    assert!(matches!(on_c.recv().await, Some(Packet::PubAck(_))));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut late = v5(&b, &unique("late")).await;
        late.send(&Packet::Subscribe(Box::new(codec::Subscribe {
            packet_id: 1,
            filters: vec![SubscribeFilter {
                filter: "cfg/+/mode".into(),
                options: qos(QoS::AtLeastOnce),
            }],
            properties: Properties::default(),
        })))
        .await;
        assert!(matches!(late.recv().await, Some(Packet::SubAck(_))));
        if let Ok(Some(Packet::Publish(r))) = late.recv_within(Duration::from_millis(500)).await {
            assert!(r.retain);
            assert_eq!(r.payload, &b"eco"[..]);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the retained message never reached b");
    }
    drop(rabbit);
}

/// A persistent session parked while RabbitMQ restarts keeps what was queued for it: its
/// durable queue, its bindings on the (durable) cluster exchange and its QoS 1 messages
/// (published persistent) survive, and it resumes on another node once the nodes are back.
#[tokio::test]
async fn a_parked_persistent_session_keeps_its_queued_messages_across_a_rabbitmq_restart() {
    let rabbit = tokio::task::spawn_blocking(RabbitNode::start_plain).await.expect("start");
    let url = rabbit.amqp_url();
    let prefix = unique("it-cluster");
    let a = gateway(&node_config(&prefix, "a", &url)).await;
    let b = gateway(&node_config(&prefix, "b", &url)).await;
    for n in [&a, &b] {
        wait_ready(n).await;
    }
    let connect = |addr, clean| async move {
        let mut c = RawClient::tcp(addr, ProtocolVersion::V5).await;
        let mut p = crate::support::connect_packet(ProtocolVersion::V5, "keeper");
        p.clean_start = clean;
        p.properties.session_expiry_interval = Some(600);
        c.send(&Packet::Connect(Box::new(p))).await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) if ack.code.is_success() => (c, ack.session_present),
            other => panic!("expected a CONNACK accepting the session, got {other:?}"),
        }
    };
    let (mut device, _) = connect(a.mqtt_addr, true).await;
    subscribe(&mut device, "dev/#", qos(QoS::AtLeastOnce), None).await;
    device.send(&Packet::Disconnect(Box::default())).await;
    drop(device);
    // Parked: QoS 1 messages published now wait in its queue (PUBACK: RabbitMQ confirmed them).
    let mut publisher = v5(&a, "pub-a").await;
    for i in 0..5u16 {
        crate::support::publish_qos1(&mut publisher, "dev/1", i + 1, format!("m{i}").as_bytes())
            .await;
    }
    drop(publisher);

    let rabbit = off_runtime(rabbit, RabbitNode::stop).await;
    let rabbit = off_runtime(rabbit, RabbitNode::start_again).await;
    for n in [&a, &b] {
        until_readyz(n, 200, "connected").await;
    }
    let (mut device, present) = connect(b.mqtt_addr, false).await;
    assert!(present, "the session is still there after the restart");
    for i in 0..5u16 {
        let got = expect_publish(&mut device).await;
        assert_eq!(got.payload, format!("m{i}").as_bytes(), "in order, nothing lost");
        device.send(&Packet::PubAck(codec::PubResponse::success(got.packet_id))).await;
    }
    // Still subscribed: a message published after the restart arrives too.
    let mut publisher = v5(&a, "pub-a2").await;
    crate::support::publish_qos1(&mut publisher, "dev/2", 1, b"after").await;
    assert_eq!(expect_publish(&mut device).await.payload, &b"after"[..]);
    drop(rabbit);
}
