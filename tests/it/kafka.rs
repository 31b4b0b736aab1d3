//! The Kafka target against librdkafka's mock cluster (`rdkafka::mocking::MockCluster`): a
//! real implementation of the Kafka protocol, in this test process, on a loopback port that the
//! gateway's producer connects to as to any broker. No Kafka server can be installed on these
//! machines; the mock speaks the produce path (idempotent producer included), metadata and
//! fetch, and lets a test take its broker down and up.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A config with cluster `events` at `bootstrap` (extra cluster lines indented four spaces),
/// and `rules`.
fn config(bootstrap: &str, cluster: &str, store: Option<&std::path::Path>, rules: &str) -> String {
    let store = store.map_or(String::new(), |p| format!("store:\n  path: \"{}\"\n", p.display()));
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n{store}{}",
        kafka_section(bootstrap, cluster, rules)
    )
}

/// The `kafka:` section (cluster `events`) and `rules`.
fn kafka_section(bootstrap: &str, cluster: &str, rules: &str) -> String {
    format!("kafka:\n  events:\n    bootstrap: [\"{bootstrap}\"]\n{cluster}rules:\n{rules}")
}

fn rule(topic: &str, ack: &str) -> String {
    format!("  - name: k\n    from: \"k/#\"\n    ack: {ack}\n    to:\n      - kafka: {{ cluster: events, topic: \"{topic}\" }}\n")
}

/// A mock cluster of one broker with `topic` (`partitions` partitions).
fn cluster(topic: &str, partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let mock = MockCluster::new(1).expect("librdkafka mock cluster");
    mock.create_topic(topic, partitions, 1).expect("create topic");
    mock
}

/// A record as read back: key, value, headers.
#[derive(Debug)]
struct Got {
    key: String,
    value: String,
    headers: Vec<(String, String)>,
}

/// Reads every record of `topic` (all `partitions`) until `want` arrived or `wait` passed, on a
/// blocking thread (librdkafka's poll blocks).
async fn read_all(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    want: usize,
    wait: Duration,
) -> Vec<Got> {
    read_all_with(bootstrap, &[], topic, partitions, want, wait).await
}

/// [`read_all`] with extra consumer properties (TLS, SASL).
async fn read_all_with(
    bootstrap: &str,
    properties: &[(String, String)],
    topic: &str,
    partitions: i32,
    want: usize,
    wait: Duration,
) -> Vec<Got> {
    let (bootstrap, topic, properties) =
        (bootstrap.to_owned(), topic.to_owned(), properties.to_vec());
    tokio::task::spawn_blocking(move || {
        let mut cc = ClientConfig::new();
        for (k, v) in &properties {
            cc.set(k, v);
        }
        let consumer: BaseConsumer = cc
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", unique("mqgate-kafka-test"))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, Offset::Beginning).expect("partition");
        }
        consumer.assign(&tpl).expect("assign");
        let deadline = std::time::Instant::now() + wait;
        let mut got = Vec::new();
        while got.len() < want && std::time::Instant::now() < deadline {
            let Some(r) = consumer.poll(Duration::from_millis(100)) else { continue };
            let m = r.expect("consume");
            let text =
                |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
            let headers = m
                .headers()
                .map(|h| h.iter().map(|h| (h.key.to_owned(), text(h.value))).collect())
                .unwrap_or_default();
            got.push(Got { key: text(m.key()), value: text(m.payload()), headers });
        }
        got
    })
    .await
    .expect("consumer thread")
}

/// Publishes `n` QoS 1 messages over `topics` MQTT topics (`k/<t>`, payload `<t>:<i>`) without
/// waiting, then the PUBACKs that come within `wait` of each other: the acknowledged ids.
async fn publish(
    c: &mut RawClient,
    n: usize,
    topics: usize,
    first_id: u16,
    wait: Duration,
) -> Vec<u16> {
    for i in 0..n {
        let t = i % topics;
        c.publish(
            &format!("k/{t}"),
            QoS::AtLeastOnce,
            first_id + i as u16,
            format!("{t}:{i}").as_bytes(),
        )
        .await;
    }
    let mut acked = Vec::new();
    while acked.len() < n {
        match c.recv_within(wait).await {
            Ok(Some(Packet::PubAck(a))) => {
                assert!(a.code.0 < 0x80, "PUBACK {:#04x} for {}", a.code.0, a.packet_id);
                acked.push(a.packet_id)
            }
            Ok(other) => panic!("expected PUBACK, got {other:?}"),
            Err(()) => break,
        }
    }
    acked
}

/// The payloads of each key, in the order read: each must be that topic's sequence in order.
fn assert_in_order_per_key(got: &[Got], n: usize, topics: usize) {
    let mut per_key: HashMap<&str, Vec<&str>> = HashMap::new();
    for g in got {
        per_key.entry(&g.key).or_default().push(&g.value);
    }
    for t in 0..topics {
        let want: Vec<String> =
            (0..n).filter(|i| i % topics == t).map(|i| format!("{t}:{i}")).collect();
        let have = per_key.get(format!("k/{t}").as_str()).cloned().unwrap_or_default();
        assert_eq!(have, want, "records of k/{t} (key) out of order or missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_is_acknowledged_after_the_cluster_and_keyed_by_topic_in_order() {
    let topic = unique("telemetry");
    let mock = cluster(&topic, 3);
    let bootstrap = mock.bootstrap_servers();
    let app = gateway(&config(&bootstrap, "", None, &rule(&topic, "sink"))).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "kafka-order").await;
    let (n, topics) = (300, 4);
    let acked = publish(&mut c, n, topics, 1, Duration::from_secs(10)).await;
    assert_eq!(acked.len(), n, "every QoS 1 PUBLISH acknowledged");
    assert_eq!(acked, (1..=n as u16).collect::<Vec<_>>(), "PUBACKs in order");

    let got = read_all(&bootstrap, &topic, 3, n, Duration::from_secs(20)).await;
    assert_eq!(got.len(), n, "each message once in Kafka");
    assert_in_order_per_key(&got, n, topics);
    let h: HashMap<_, _> = got[0].headers.iter().cloned().collect();
    assert_eq!(h.get("x-mqtt-topic"), Some(&got[0].key), "{h:?}");
    assert_eq!(h.get("x-mqtt-qos").map(String::as_str), Some("1"));
    assert_eq!(h.get("x-mqtt-client-id").map(String::as_str), Some("kafka-order"));
    let m = metrics(&app).await;
    let series =
        format!("mqgate_target_forwarded_total{{rule=\"k\",target=\"kafka:events/{topic}\"}} {n}");
    assert!(m.contains(&series), "{series} in\n{m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_cluster_refuses_is_a_final_failure_and_a_dead_letter() {
    let topic = unique("telemetry");
    let mock = cluster(&topic, 1);
    let bootstrap = mock.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    // librdkafka refuses a record over message.max.bytes for good (MSG_SIZE_TOO_LARGE).
    let app = gateway(&config(
        &bootstrap,
        "    options: { message.max.bytes: \"2000\" }\n",
        Some(dir.path()),
        &rule(&topic, "sink"),
    ))
    .await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "kafka-big").await;
    c.publish("k/big", QoS::AtLeastOnce, 7, &vec![b'x'; 5000]).await;
    match c.recv_within(Duration::from_secs(10)).await {
        Ok(Some(Packet::PubAck(a))) => {
            assert_eq!(a.packet_id, 7);
            assert!(
                a.code.0 >= 0x80,
                "a refused record is not acknowledged as delivered: {:#04x}",
                a.code.0
            );
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // A small one on the same target still goes through.
    publish_qos1(&mut c, "k/small", 8, b"ok").await;
    let dl = app.dead_letters.as_ref().expect("dead letters with a store");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while dl.count() == 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let letters = dl.list(None, 10).expect("list");
    assert_eq!(letters.len(), 1, "the refused record is a dead letter");
    assert!(letters[0].1.reason.contains("Kafka"), "{:?}", letters[0].1.reason);
    let got = read_all(&bootstrap, &topic, 1, 1, Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|g| g.value.as_str()).collect::<Vec<_>>(), ["ok"]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_with_ack_spool_loses_nothing_and_keeps_order() {
    let topic = unique("telemetry");
    let mock = cluster(&topic, 2);
    let bootstrap = mock.bootstrap_servers();
    let dir = tempfile::tempdir().expect("tempdir");
    let app = gateway(&config(
        &bootstrap,
        "    delivery_timeout: 1s\n",
        Some(dir.path()),
        &rule(&topic, "spool"),
    ))
    .await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "kafka-spool").await;
    let (n, topics) = (120, 3);
    assert_eq!(publish(&mut c, 40, topics, 1, Duration::from_secs(10)).await.len(), 40);
    mock.broker_down(1).expect("broker down");
    // The cluster is unreachable: the device is still acknowledged (spooled, on disk).
    let mut acked = 0;
    for i in 40..n {
        let t = i % topics;
        c.publish(&format!("k/{t}"), QoS::AtLeastOnce, 1 + i as u16, format!("{t}:{i}").as_bytes())
            .await;
    }
    while acked < n - 40 {
        match c.recv_within(Duration::from_secs(15)).await {
            Ok(Some(Packet::PubAck(_))) => acked += 1,
            other => panic!("expected PUBACK while Kafka is down, got {other:?}"),
        }
    }
    let m = metrics(&app).await;
    assert!(
        m.contains(&format!("mqgate_spool_depth_messages{{target=\"k/kafka:events/{topic}\"}}")),
        "{m}"
    );
    // Down until the spool's forwarder has seen a record fail (delivery_timeout: 1 s), so the
    // outage is one the target reports, not one librdkafka rides out by itself.
    let retries = format!("mqgate_spool_retries_total{{target=\"k/kafka:events/{topic}\"}}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while retried(&metrics(&app).await, &retries) == 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "no failed forward while Kafka was down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mock.broker_up(1).expect("broker up");
    let got = read_all(&bootstrap, &topic, 2, n, Duration::from_secs(60)).await;
    // At least once: a record whose report timed out may also have been written; order per
    // key must hold among the first copies.
    let mut seen = std::collections::HashSet::new();
    let firsts: Vec<Got> = got.into_iter().filter(|g| seen.insert(g.value.clone())).collect();
    assert_eq!(firsts.len(), n, "every message reached Kafka");
    assert_in_order_per_key(&firsts, n, topics);
    let m = metrics(&app).await;
    let retries = format!("mqgate_spool_retries_total{{target=\"k/kafka:events/{topic}\"}}");
    let line = m.lines().find(|l| l.starts_with(&retries)).unwrap_or_default();
    println!("{line}");
    assert!(
        line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0),
        "the outage was seen: {retries} in\n{m}"
    );
    app.stop().await;
}

/// The value of the series `name` (with its labels) in `metrics`, 0 when absent.
fn retried(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn config_errors_have_positions() {
    let bad = config(
        "localhost:9092",
        "    options: { acks: \"0\" }\n",
        None,
        &rule("bad/topic", "sink"),
    );
    let e = mqgate::config::Config::parse(std::path::Path::new("c.yaml"), &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("acks") && e.contains("set by mqgate"), "{e}");
    assert!(e.contains("'/' is not allowed in a Kafka topic"), "{e}");
    assert!(e.lines().all(|l| l.starts_with("c.yaml:")), "{e}");
    let unknown = config(
        "localhost:9092",
        "    options: { no.such.property: \"1\" }\n",
        None,
        &rule("t", "sink"),
    );
    let e = mqgate::config::Config::parse(std::path::Path::new("c.yaml"), &unknown)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no.such.property"), "{e}");
}

/// The real binary (its log is what the refusal tests read), on spare ports.
struct Spawned {
    /// Killed on drop.
    child: tokio::process::Child,
    mqtt: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    log: std::path::PathBuf,
}

impl Spawned {
    async fn start(dir: &std::path::Path, yaml_after_listeners: &str) -> Spawned {
        use crate::support::mosquitto::spare_port;
        let mqtt = std::net::SocketAddr::from(([127, 0, 0, 1], spare_port()));
        let admin = std::net::SocketAddr::from(([127, 0, 0, 1], spare_port()));
        let config = dir.join("mqgate.yaml");
        std::fs::write(
            &config,
            format!(
                "mqtt:\n  listen: \"{mqtt}\"\nadmin:\n  listen: \"{admin}\"\n{yaml_after_listeners}"
            ),
        )
        .expect("write config");
        let log = dir.join("mqgate.log");
        let out = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqgate"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn mqgate");
        let gw = Spawned { child, mqtt, admin, log };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while !matches!(http_get(admin, "/healthz").await, Ok((200, _))) {
            assert!(tokio::time::Instant::now() < deadline, "mqgate did not start:\n{}", gw.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gw
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `/readyz` until its body satisfies `done` (20 s at most); returns status and body.
    async fn readyz_until(&self, done: impl Fn(&str) -> bool) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = http_get(self.admin, "/readyz").await.expect("readyz");
            if done(&body) {
                return (status, body);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz never got there: {status} {body}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The `tls:`/`sasl:` lines of cluster `events` (indented four spaces).
fn security_yaml(ca: Option<&std::path::Path>, plain: Option<(&str, &str)>) -> String {
    let mut y = String::new();
    if let Some(ca) = ca {
        y.push_str(&format!("    tls:\n      ca: \"{}\"\n", ca.display()));
    }
    if let Some((u, p)) = plain {
        y.push_str(&format!(
            "    sasl:\n      mechanism: plain\n      username: \"{u}\"\n      password: \"{p}\"\n"
        ));
    }
    y
}

/// SASL_SSL (PLAIN over TLS) with the right password and a trusted broker certificate: QoS 1
/// is acknowledged after the cluster's acknowledgement, and the record is in Kafka (read back
/// by a consumer logging in the same way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_over_tls_with_good_credentials_delivers() {
    use crate::support::certs::Ca;
    use crate::support::kafka_front::{client_properties, SecureCluster, Security};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "kafka");
    let server = ca.server("kafka-broker");
    let topic = unique("secure");
    let login = ("mqgate", "s3cret");
    let cluster =
        SecureCluster::start(&topic, 1, Security { tls: Some(&server), plain: Some(login) }).await;
    let bootstrap = cluster.bootstrap();
    let yaml =
        config(&bootstrap, &security_yaml(Some(&ca.pem), Some(login)), None, &rule(&topic, "sink"));
    let app = gateway(&yaml).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "kafka-sasl-ssl").await;
    let acked = publish(&mut c, 20, 2, 1, Duration::from_secs(15)).await;
    assert_eq!(acked, (1..=20).collect::<Vec<u16>>(), "every QoS 1 PUBLISH acknowledged, in order");
    let (status, body) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
    assert_eq!(status, 200, "{body}");
    let props = client_properties(Some(&ca.pem), Some(login));
    let got = read_all_with(&bootstrap, &props, &topic, 1, 20, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 20, "each message once in Kafka");
    assert_in_order_per_key(&got, 20, 2);
    app.stop().await;
}

/// SASL/PLAIN with a wrong password: never acknowledged as delivered; `/readyz` (503) and the
/// log carry the broker's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_plain_with_a_wrong_password_is_refused_with_the_reason() {
    use crate::support::kafka_front::{SecureCluster, Security};
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = unique("secure");
    let cluster =
        SecureCluster::start(&topic, 1, Security { tls: None, plain: Some(("mqgate", "s3cret")) })
            .await;
    let yaml = kafka_section(
        &cluster.bootstrap(),
        &format!("    delivery_timeout: 2s\n{}", security_yaml(None, Some(("mqgate", "wrong")))),
        &rule(&topic, "sink"),
    );
    let gw = Spawned::start(dir.path(), &yaml).await;
    let (status, body) = gw.readyz_until(|b| b.contains("Authentication failed")).await;
    println!("/readyz: {status} {body}");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("SASL"), "/readyz names SASL: {body}");
    let log = gw.log();
    assert!(
        log.contains("Invalid username or password") && log.contains("SASL"),
        "the log has the broker's reason:\n{log}"
    );
    // A QoS 1 message is not acknowledged as delivered (MQTT 5: DISCONNECT 0x89 once its
    // delivery_timeout passed; never a success PUBACK).
    let mut c = RawClient::connect(gw.mqtt, ProtocolVersion::V5, "kafka-sasl-bad").await;
    c.publish("k/0", QoS::AtLeastOnce, 1, b"refused").await;
    match c.recv_within(Duration::from_secs(15)).await {
        Ok(Some(Packet::PubAck(a))) => assert!(a.code.0 >= 0x80, "PUBACK {:#04x}", a.code.0),
        Ok(Some(Packet::Disconnect(d))) => assert_eq!(d.code.0, 0x89, "{d:?}"),
        Ok(None) => {}
        other => panic!("expected no success, got {other:?}"),
    }
    drop(gw.child);
}

/// TLS to a broker whose certificate the configured CA did not sign: never connected;
/// `/readyz` (503) and the log say it is the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_an_untrusted_broker_is_refused_with_the_reason() {
    use crate::support::certs::Ca;
    use crate::support::kafka_front::{SecureCluster, Security};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new(dir.path(), "kafka");
    let other = Ca::new(dir.path(), "other");
    let server = other.server("kafka-broker");
    let topic = unique("secure");
    let cluster =
        SecureCluster::start(&topic, 1, Security { tls: Some(&server), plain: None }).await;
    let yaml = kafka_section(
        &cluster.bootstrap(),
        &security_yaml(Some(&ca.pem), None),
        &rule(&topic, "sink"),
    );
    let gw = Spawned::start(dir.path(), &yaml).await;
    let (status, body) = gw.readyz_until(|b| b.contains("certificate verify failed")).await;
    println!("/readyz: {status} {body}");
    assert_eq!(status, 503, "{body}");
    assert!(
        gw.log().contains("certificate verify failed"),
        "the log has the reason:\n{}",
        gw.log()
    );
    drop(gw.child);
}
