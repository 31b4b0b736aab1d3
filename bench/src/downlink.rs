//! `--mode downlink`: AMQP → MQTT throughput, in the same run:
//!
//! * `direct`: a plain AMQP consumer (lapin, `basic.qos` = `--window`, manual acks, one
//!   `multiple` ack per quarter window) drains a queue of N messages — what RabbitMQ delivers
//!   to a consumer;
//! * `mqgate`: a spawned mqgate whose source (prefetch = `--window`, QoS 1) consumes the same
//!   kind of queue and publishes to one MQTT 3.1.1 subscriber (QoS 1), which PUBACKs every
//!   message; mqgate acks each AMQP delivery after the subscriber's PUBACK.
//!
//! Both start the same way: the consumer is registered (mqgate: started, subscriber
//! subscribed) before the queue is filled, and does not read until it is full, so each
//! side has `--window` deliveries waiting when the clock starts. Throughput is N over the time
//! from then to the last message. Sequence numbers in the payloads count loss and duplicates.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use mqgate::mqtt::codec::{
    self, Connect, Packet, Properties, ProtocolVersion, PubResponse, QoS, Subscribe,
    SubscribeFilter, SubscriptionOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::amqp;
use super::gateway::Gateway;
use super::stats::json_str;

/// What one downlink comparison needs.
pub struct Spec<'a> {
    /// Messages per run.
    pub messages: u64,
    /// Payload bytes (at least 8: the sequence number).
    pub payload: usize,
    /// AMQP prefetch of both consumers (and mqgate's `max_inflight_out`).
    pub window: u16,
    /// Runs of each side, alternating.
    pub repeat: u64,
    /// RabbitMQ.
    pub amqp_url: &'a str,
    /// The mqgate binary.
    pub binary: &'a Path,
    /// Seconds without a message before a run gives up.
    pub idle: Duration,
    /// One JSON document instead of text.
    pub json: bool,
}

/// One measured run.
struct Run {
    side: &'static str,
    rate: f64,
    secs: f64,
    lost: u64,
    duplicates: u64,
}

/// Runs both sides `repeat` times, alternating; prints the rates and the ratio of the medians.
/// `Ok(false)` when a run lost or duplicated messages.
pub async fn run(spec: &Spec<'_>) -> Result<bool> {
    let conn = amqp::connect(spec.amqp_url).await?;
    if !spec.json {
        println!(
            "mqgate-bench downlink: {} msgs x {} B per run, 1 queue -> 1 consumer, prefetch {}; \
             direct = lapin consumer, manual multiple acks, mqgate = source -> 1 MQTT QoS 1 subscriber",
            spec.messages, spec.payload, spec.window
        );
    }
    let mut runs = Vec::new();
    for i in 0..spec.repeat {
        for side in ["direct", "mqgate"] {
            let queue = format!("mqgate-bench-down-{}-{i}-{side}", std::process::id());
            let r = match side {
                "direct" => direct(&conn, spec, &queue).await,
                _ => through_mqgate(&conn, spec, &queue).await,
            };
            let ch = conn.create_channel().await.context("open AMQP channel")?;
            let _ = ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
            let r = r.with_context(|| format!("{side} run"))?;
            if !spec.json {
                println!(
                    "  {:<7} {:>10.0} msgs/s  {:>6.2} s  lost {}  dup {}",
                    r.side, r.rate, r.secs, r.lost, r.duplicates
                );
            }
            runs.push(r);
        }
    }
    let median = |side: &str| {
        let mut v: Vec<f64> = runs.iter().filter(|r| r.side == side).map(|r| r.rate).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (d, m) = (median("direct"), median("mqgate"));
    let ratio = if d > 0.0 { m / d } else { 0.0 };
    let clean = runs.iter().all(|r| r.lost == 0 && r.duplicates == 0);
    if spec.json {
        let list: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{{\"side\":{},\"msgs_per_s\":{:.0},\"secs\":{:.3},\"lost\":{},\"duplicates\":{}}}",
                    json_str(r.side), r.rate, r.secs, r.lost, r.duplicates
                )
            })
            .collect();
        println!(
            "{{\"downlink\":{{\"runs\":[{}],\"direct_median\":{d:.0},\"mqgate_median\":{m:.0},\"ratio\":{ratio:.3}}}}}",
            list.join(",")
        );
    } else {
        let verdict = if ratio >= 0.9 { "meets" } else { "below" };
        println!(
            "downlink QoS 1: direct {d:.0} msgs/s, mqgate {m:.0} msgs/s, ratio {ratio:.2}x \
             ({verdict} the 0.9x target; medians of {})",
            spec.repeat
        );
    }
    Ok(clean)
}

/// Declares the run's queue (not durable, not exclusive: mqgate consumes it too).
async fn declare(ch: &Channel, queue: &str) -> Result<()> {
    ch.queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .context("declare the bench queue")?;
    Ok(())
}

/// Publishes `n` messages (sequence number first) to `queue`, then waits until RabbitMQ has
/// them all (ready, or pushed to a consumer up to `window`).
async fn fill(ch: &Channel, queue: &str, spec: &Spec<'_>) -> Result<()> {
    let mut body = vec![0u8; spec.payload.max(8)];
    for seq in 0..spec.messages {
        body[..8].copy_from_slice(&seq.to_be_bytes());
        ch.basic_publish(
            ShortString::from(""),
            ShortString::from(queue),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .context("publish")?;
    }
    let want = spec.messages.saturating_sub(u64::from(spec.window));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .context("count the bench queue")?;
        if u64::from(q.message_count()) >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("queue has {} of {want} messages after 60 s", q.message_count());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts sequence numbers: loss and duplicates.
struct Seen {
    seen: Vec<bool>,
    count: u64,
    duplicates: u64,
}

impl Seen {
    fn new(n: u64) -> Seen {
        Seen { seen: vec![false; n as usize], count: 0, duplicates: 0 }
    }

    fn add(&mut self, payload: &[u8]) {
        let seq = payload
            .get(..8)
            .map_or(u64::MAX, |b| u64::from_be_bytes(b.try_into().unwrap_or([0xFF; 8])));
        match self.seen.get_mut(seq as usize) {
            Some(s) if !*s => {
                *s = true;
                self.count += 1;
            }
            _ => self.duplicates += 1,
        }
    }

    fn done(&self) -> bool {
        self.count as usize == self.seen.len()
    }

    fn run(&self, side: &'static str, elapsed: Duration) -> Run {
        let secs = elapsed.as_secs_f64().max(1e-9);
        Run {
            side,
            rate: self.count as f64 / secs,
            secs,
            lost: self.seen.len() as u64 - self.count,
            duplicates: self.duplicates,
        }
    }
}

/// The baseline: a lapin consumer with manual acks and prefetch `window`.
async fn direct(conn: &Connection, spec: &Spec<'_>, queue: &str) -> Result<Run> {
    let ch = conn.create_channel().await.context("open AMQP channel")?;
    declare(&ch, queue).await?;
    let cch = conn.create_channel().await.context("open AMQP channel")?;
    cch.basic_qos(spec.window, BasicQosOptions::default()).await.context("basic.qos")?;
    let mut consumer = cch
        .basic_consume(
            queue.into(),
            "mqgate-bench-down".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("basic.consume")?;
    fill(&ch, queue, spec).await?;
    let mut seen = Seen::new(spec.messages);
    // The strongest plain consumer: one `multiple` ack per quarter window (awaiting one ack
    // per delivery makes lapin several times slower; this is the ceiling to compare with).
    let ack_every = u64::from(spec.window / 4).max(1);
    let mut unacked = 0u64;
    let start = Instant::now();
    while !seen.done() {
        match timeout(spec.idle, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                seen.add(&d.data);
                unacked += 1;
                if unacked >= ack_every || seen.done() {
                    d.ack(BasicAckOptions { multiple: true }).await.context("ack")?;
                    unacked = 0;
                }
            }
            Ok(Some(Err(e))) => bail!("consumer: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    let elapsed = start.elapsed();
    let _ = cch.close(200, "done".into()).await;
    Ok(seen.run("direct", elapsed))
}

/// Through mqgate: a source on the queue, one MQTT QoS 1 subscriber.
async fn through_mqgate(conn: &Connection, spec: &Spec<'_>, queue: &str) -> Result<Run> {
    let ch = conn.create_channel().await.context("open AMQP channel")?;
    declare(&ch, queue).await?;
    let window = spec.window;
    let yaml = |mqtt: &str, admin: &str| {
        format!(
            "# Written by mqgate-bench (downlink).\n\
             mqtt:\n  listen: {}\n  max_inflight_out: {window}\n  outbound_queue: {}\n\
             admin:\n  listen: {}\n\
             amqp:\n  rabbit:\n    url: {}\n\
             sources:\n  - name: bench\n    broker: rabbit\n    queue: {}\n    prefetch: {window}\n    topic: \"bench/down\"\n    qos: 1\n    qos_header: \"\"\n",
            json_str(mqtt),
            2 * u32::from(window),
            json_str(admin),
            json_str(spec.amqp_url),
            json_str(queue),
        )
    };
    let gw = Gateway::start_with(spec.binary, Duration::from_secs(20), yaml).await?;
    let mut sub = subscribe(&gw.mqtt_addr).await?;
    // The source consumes once it is connected; make sure before filling.
    wait_consumer(&ch, queue).await?;
    fill(&ch, queue, spec).await?;
    let mut seen = Seen::new(spec.messages);
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let start = Instant::now();
    'read: while !seen.done() {
        match timeout(spec.idle, sub.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Err(e)) => bail!("subscriber read: {e}"),
            Ok(Ok(_)) => {}
        }
        loop {
            match codec::decode(&mut buf, Some(ProtocolVersion::V311), 1 << 20) {
                Ok(Some(Packet::Publish(p))) => {
                    seen.add(&p.payload);
                    let ack = Packet::PubAck(PubResponse::success(p.packet_id));
                    codec::encode(&ack, ProtocolVersion::V311, &mut out)
                        .context("encode PUBACK")?;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    eprintln!("mqgate-bench: subscriber got a bad packet: {e}");
                    break 'read;
                }
            }
        }
        if !out.is_empty() {
            sub.write_all(&out).await.context("subscriber write")?;
            out.clear();
        }
    }
    let elapsed = start.elapsed();
    let run = seen.run("mqgate", elapsed);
    drop(sub);
    if let Some(note) = gw.stop(Duration::from_secs(10)).await {
        eprintln!("mqgate-bench: {note}");
    }
    Ok(run)
}

/// Waits until the queue has a consumer (mqgate's source).
async fn wait_consumer(ch: &Channel, queue: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .context("look at the bench queue")?;
        if q.consumer_count() > 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("mqgate's source did not start consuming within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An MQTT 3.1.1 subscriber to `bench/down` at QoS 1.
async fn subscribe(addr: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    let mut out = BytesMut::new();
    let connect = Connect {
        protocol: ProtocolVersion::V311,
        clean_start: true,
        keep_alive: 0,
        client_id: "mqgate-bench-down".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    codec::encode(&Packet::Connect(Box::new(connect)), ProtocolVersion::V311, &mut out)?;
    let subscribe = Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter {
            filter: "bench/down".into(),
            options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
        }],
        properties: Properties::default(),
    };
    codec::encode(&Packet::Subscribe(Box::new(subscribe)), ProtocolVersion::V311, &mut out)?;
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    let mut acked = 0;
    while acked < 2 {
        if timeout(Duration::from_secs(5), s.read_buf(&mut buf)).await?? == 0 {
            bail!("mqgate closed the subscriber's connection");
        }
        while let Some(p) = codec::decode(&mut buf, Some(ProtocolVersion::V311), 1 << 20)? {
            match p {
                Packet::ConnAck(_) | Packet::SubAck(_) => acked += 1,
                other => bail!("unexpected {} before SUBACK", other.name()),
            }
        }
    }
    Ok(s)
}
