//! `--mode kafka`: MQTT → Kafka throughput against a direct Kafka producer, in the same run, on
//! librdkafka's mock cluster (`rdkafka::mocking`, in a child process of its own, on a loopback
//! port; no Kafka server can be installed on these machines):
//!
//! * `direct`: `--publishers` tasks, each keeping `--window` delivery futures in flight, send N
//!   records (key `bench/<publisher>`) through one librdkafka `FutureProducer` configured as
//!   mqgate's (idempotent, `acks=all`, `linger.ms=5`); a record counts when its delivery
//!   report says delivered; the records carry the headers mqgate's do (`x-mqtt-topic`,
//!   `x-mqtt-qos`, `x-mqtt-retain`, `x-mqtt-client-id`);
//! * `rskafka`: the same with the pure-Rust client (rskafka's `BatchProducer`, linger 5 ms, one
//!   per partition; publisher p writes partition p mod 4): what the other client choice would
//!   give;
//! * `mqgate`: `--publishers` MQTT 3.1.1 connections, each keeping `--window` QoS 1 PUBLISHes
//!   in flight, send N messages (topic `bench/<publisher>`) to a spawned mqgate whose rule
//!   sends them to the same cluster; a message counts at its PUBACK, which mqgate sends after
//!   the record's delivery report.
//!
//! Throughput is N over the time from the first send to the last acknowledgement. After each
//! run the topic's high watermarks must have grown by exactly N (nothing lost or doubled).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use mqgate::mqtt::codec::{self, Connect, Packet, Properties, ProtocolVersion, Publish, QoS};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::gateway::Gateway;
use super::stats::json_str;

/// What one Kafka comparison needs.
pub struct Spec<'a> {
    /// Messages per run.
    pub messages: u64,
    /// Payload bytes.
    pub payload: usize,
    /// Publishers (MQTT connections; producer tasks).
    pub publishers: u64,
    /// In-flight records (QoS 1 PUBLISHes) per publisher.
    pub window: u16,
    /// Runs of each side, alternating.
    pub repeat: u64,
    /// The mqgate binary.
    pub binary: &'a Path,
    /// One JSON document instead of text.
    pub json: bool,
}

const TOPIC: &str = "mqgate-bench";
/// The argument that makes this binary serve the mock cluster (see [`serve_mock`]).
pub const MOCK_ARG: &str = "--kafka-mock-cluster";

/// The child process: starts the mock cluster with the bench topic, prints its bootstrap
/// servers on one line and serves until its stdin closes (the parent went away).
pub fn serve_mock() -> Result<()> {
    use std::io::{Read, Write};
    let mock = MockCluster::new(1).context("start librdkafka's mock cluster")?;
    mock.create_topic(TOPIC, PARTITIONS, 1).context("create the bench topic")?;
    let mut out = std::io::stdout();
    writeln!(out, "{}", mock.bootstrap_servers())?;
    out.flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    Ok(())
}

/// Starts [`serve_mock`] in a child process; returns it (killed on drop) and the bootstrap.
async fn spawn_mock() -> Result<(tokio::process::Child, String)> {
    use tokio::io::AsyncBufReadExt;
    let exe = std::env::current_exe().context("this binary's path")?;
    let mut child = tokio::process::Command::new(exe)
        .arg(MOCK_ARG)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the mock cluster process")?;
    let stdout = child.stdout.take().context("mock cluster stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("the mock cluster did not start within 20 s")??;
    let bootstrap = line.trim().to_owned();
    if bootstrap.is_empty() {
        bail!("the mock cluster process printed no bootstrap servers");
    }
    Ok((child, bootstrap))
}
const PARTITIONS: i32 = 4;

/// Runs both sides `repeat` times, alternating; prints the rates and the ratio of the medians.
/// `Ok(false)` when a run's record count in the cluster was off.
pub async fn run(spec: &Spec<'_>) -> Result<bool> {
    let (_mock, bootstrap) = spawn_mock().await?;
    if !spec.json {
        println!(
            "mqgate-bench kafka: {} msgs x {} B per run, {} publishers x window {}, mock cluster (1 broker, {PARTITIONS} partitions, own process); \
             direct = librdkafka FutureProducer, idempotent (acks=all, linger 5 ms), mqgate = MQTT QoS 1 -> kafka target",
            spec.messages, spec.payload, spec.publishers, spec.window
        );
    }
    let mut runs: Vec<(&str, f64, f64, bool)> = Vec::new();
    for _ in 0..spec.repeat {
        for side in ["direct", "rskafka", "mqgate"] {
            let before = records(&bootstrap).await?;
            let secs = match side {
                "direct" => direct(spec, &bootstrap).await,
                "rskafka" => direct_rskafka(spec, &bootstrap).await,
                _ => through_mqgate(spec, &bootstrap).await,
            }
            .with_context(|| format!("{side} run"))?;
            let grown = records(&bootstrap).await? - before;
            let exact = grown == spec.messages;
            let rate = spec.messages as f64 / secs;
            if !spec.json {
                println!(
                    "  {side:<7} {rate:>10.0} msgs/s  {secs:>6.2} s  records written {grown}{}",
                    if exact { "" } else { "  (expected exactly the messages sent)" }
                );
            }
            runs.push((side, rate, secs, exact));
        }
    }
    let median = |side: &str| {
        let mut v: Vec<f64> = runs.iter().filter(|r| r.0 == side).map(|r| r.1).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (d, m, rs) = (median("direct"), median("mqgate"), median("rskafka"));
    let ratio = if d > 0.0 { m / d } else { 0.0 };
    if spec.json {
        let list: Vec<String> = runs
            .iter()
            .map(|(side, rate, secs, exact)| {
                format!(
                    "{{\"side\":{},\"msgs_per_s\":{rate:.0},\"secs\":{secs:.3},\"exact\":{exact}}}",
                    json_str(side)
                )
            })
            .collect();
        println!(
            "{{\"kafka\":{{\"runs\":[{}],\"direct_median\":{d:.0},\"rskafka_median\":{rs:.0},\"mqgate_median\":{m:.0},\"ratio\":{ratio:.3}}}}}",
            list.join(",")
        );
    } else {
        let verdict = if ratio >= 0.9 { "meets" } else { "below" };
        println!(
            "kafka QoS 1: direct {d:.0} msgs/s (rskafka {rs:.0}), mqgate {m:.0} msgs/s, ratio {ratio:.2}x ({verdict} the 0.9x target; medians of {})",
            spec.repeat
        );
    }
    Ok(runs.iter().all(|r| r.3))
}

/// The records in the bench topic: the sum of its partitions' high watermarks.
async fn records(bootstrap: &str) -> Result<u64> {
    let bootstrap = bootstrap.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", "mqgate-bench-watermarks")
            .create()
            .context("watermark consumer")?;
        let mut sum = 0u64;
        for p in 0..PARTITIONS {
            let (_, high) = consumer
                .fetch_watermarks(TOPIC, p, Duration::from_secs(10))
                .context("fetch watermarks")?;
            sum += u64::try_from(high).unwrap_or(0);
        }
        Ok(sum)
    })
    .await?
}

/// The direct side: one `FutureProducer` (what a Rust service writing to Kafka itself would
/// use), `publishers` tasks with `window` delivery futures in flight each.
async fn direct(spec: &Spec<'_>, bootstrap: &str) -> Result<f64> {
    use futures::stream::{FuturesUnordered, StreamExt};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .context("direct producer")?;
    let per = spec.messages / spec.publishers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..spec.publishers {
        let n = per + u64::from(p < spec.messages % spec.publishers);
        let (producer, window) = (producer.clone(), usize::from(spec.window.max(1)));
        let payload = vec![b'x'; spec.payload];
        tasks.push(tokio::spawn(async move {
            let key = format!("bench/{p}");
            let client = format!("mqgate-bench-kafka-{p}");
            let mut inflight = FuturesUnordered::new();
            for _ in 0..n {
                if inflight.len() >= window {
                    delivered(inflight.next().await)?;
                }
                let mut record = FutureRecord::to(TOPIC)
                    .key(&key)
                    .payload(&payload[..])
                    .headers(mqtt_headers(&key, &client));
                let delivery = loop {
                    match producer.send_result(record) {
                        Ok(d) => break d,
                        Err((_, back)) => {
                            record = back;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                };
                inflight.push(delivery);
            }
            while !inflight.is_empty() {
                delivered(inflight.next().await)?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The headers mqgate's records carry (topic, QoS, retain, client id), so both sides write
/// the same records.
fn mqtt_headers(topic: &str, client: &str) -> rdkafka::message::OwnedHeaders {
    use rdkafka::message::{Header, OwnedHeaders};
    OwnedHeaders::new_with_capacity(4)
        .insert(Header { key: "x-mqtt-topic", value: Some(topic) })
        .insert(Header { key: "x-mqtt-qos", value: Some("1") })
        .insert(Header { key: "x-mqtt-retain", value: Some("false") })
        .insert(Header { key: "x-mqtt-client-id", value: Some(client) })
}

/// A delivery future's result as an error when the record was not delivered.
fn delivered(
    r: Option<
        Result<
            rdkafka::producer::future_producer::OwnedDeliveryResult,
            futures::channel::oneshot::Canceled,
        >,
    >,
) -> Result<()> {
    match r {
        Some(Ok(Ok(_))) | None => Ok(()),
        Some(Ok(Err((e, _)))) => bail!("record not delivered: {e}"),
        Some(Err(_)) => bail!("the producer dropped a delivery report"),
    }
}

/// The rskafka side: one `BatchProducer` per partition, `publishers` tasks with `window`
/// produce calls in flight each.
async fn direct_rskafka(spec: &Spec<'_>, bootstrap: &str) -> Result<f64> {
    use futures::stream::{FuturesUnordered, StreamExt};
    use rskafka::client::partition::UnknownTopicHandling;
    use rskafka::client::producer::aggregator::RecordAggregator;
    use rskafka::client::producer::BatchProducerBuilder;
    let client = rskafka::client::ClientBuilder::new(vec![bootstrap.to_owned()])
        .build()
        .await
        .context("rskafka client")?;
    let mut producers = Vec::new();
    for p in 0..PARTITIONS {
        let pc = client
            .partition_client(TOPIC, p, UnknownTopicHandling::Retry)
            .await
            .context("rskafka partition client")?;
        producers.push(Arc::new(
            BatchProducerBuilder::new(Arc::new(pc))
                .with_linger(Duration::from_millis(5))
                .build(RecordAggregator::new(1 << 20)),
        ));
    }
    let per = spec.messages / spec.publishers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..spec.publishers {
        let n = per + u64::from(p < spec.messages % spec.publishers);
        let producer = Arc::clone(&producers[(p % PARTITIONS as u64) as usize]);
        let (window, payload) = (usize::from(spec.window.max(1)), vec![b'x'; spec.payload]);
        tasks.push(tokio::spawn(async move {
            let key = format!("bench/{p}").into_bytes();
            let headers: std::collections::BTreeMap<String, Vec<u8>> = [
                ("x-mqtt-topic", format!("bench/{p}")),
                ("x-mqtt-qos", "1".to_owned()),
                ("x-mqtt-retain", "false".to_owned()),
                ("x-mqtt-client-id", format!("mqgate-bench-kafka-{p}")),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.into_bytes()))
            .collect();
            let mut inflight = FuturesUnordered::new();
            for _ in 0..n {
                if inflight.len() >= window {
                    inflight.next().await.transpose().context("rskafka produce")?;
                }
                let record = rskafka::record::Record {
                    key: Some(key.clone()),
                    value: Some(payload.clone()),
                    headers: headers.clone(),
                    timestamp: chrono::Utc::now(),
                };
                let producer = Arc::clone(&producer);
                inflight.push(async move { producer.produce(record).await });
            }
            while let Some(r) = inflight.next().await {
                r.context("rskafka produce")?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The mqgate side: a spawned gateway with one rule `bench/#` → the bench topic.
async fn through_mqgate(spec: &Spec<'_>, bootstrap: &str) -> Result<f64> {
    let gw = Gateway::start_with(spec.binary, Duration::from_secs(20), |mqtt, admin| {
        format!(
            "mqtt:\n  listen: \"{mqtt}\"\n  receive_maximum: {}\nadmin:\n  listen: \"{admin}\"\nkafka:\n  bench:\n    bootstrap: [\"{bootstrap}\"]\nrules:\n  - name: bench\n    from: \"bench/#\"\n    to:\n      - kafka: {{ cluster: bench, topic: \"{TOPIC}\" }}\n",
            spec.window.max(1)
        )
    })
    .await?;
    let mut conns = Vec::new();
    for p in 0..spec.publishers {
        conns.push(connect(&gw.mqtt_addr, &format!("mqgate-bench-kafka-{p}")).await?);
    }
    let per = spec.messages / spec.publishers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (p, s) in conns.into_iter().enumerate() {
        let n = per + u64::from((p as u64) < spec.messages % spec.publishers);
        let (window, payload) =
            (u64::from(spec.window), bytes::Bytes::from(vec![b'x'; spec.payload]));
        tasks.push(tokio::spawn(publish(s, format!("bench/{p}"), n, window, payload)));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(note) = gw.stop(Duration::from_secs(10)).await {
        eprintln!("mqgate-bench: {note}");
    }
    Ok(secs)
}

/// An MQTT 3.1.1 connection, CONNACK read.
pub(crate) async fn connect(addr: &str, id: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    let mut out = BytesMut::new();
    let connect = Connect {
        protocol: ProtocolVersion::V311,
        clean_start: true,
        keep_alive: 0,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    codec::encode(&Packet::Connect(Box::new(connect)), ProtocolVersion::V311, &mut out)?;
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    loop {
        if tokio::time::timeout(Duration::from_secs(5), s.read_buf(&mut buf)).await?? == 0 {
            bail!("mqgate closed the connection before CONNACK");
        }
        if let Some(p) = codec::decode(&mut buf, Some(ProtocolVersion::V311), 1 << 20)? {
            match p {
                Packet::ConnAck(_) => return Ok(s),
                other => bail!("unexpected {} before CONNACK", other.name()),
            }
        }
    }
}

/// Publishes `n` QoS 1 messages to `topic` keeping `window` unacknowledged; returns after the
/// last PUBACK.
pub(crate) async fn publish(
    mut s: TcpStream,
    topic: String,
    n: u64,
    window: u64,
    payload: bytes::Bytes,
) -> Result<()> {
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while acked < n {
        while sent < n && sent - acked < window {
            let p = Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic.clone(),
                packet_id: (sent % 65_535) as u16 + 1,
                properties: Default::default(),
                payload: payload.clone(),
            };
            codec::encode(&Packet::Publish(p), ProtocolVersion::V311, &mut out)?;
            sent += 1;
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if tokio::time::timeout(Duration::from_secs(30), s.read_buf(&mut buf)).await?? == 0 {
            bail!("mqgate closed the publisher's connection after {acked} PUBACKs");
        }
        while let Some(p) = codec::decode(&mut buf, Some(ProtocolVersion::V311), 1 << 20)? {
            match p {
                Packet::PubAck(_) => acked += 1,
                other => bail!("unexpected {}", other.name()),
            }
        }
    }
    Ok(())
}
