//! `--mode amqp10`: MQTT → AMQP 1.0 throughput against RabbitMQ's AMQP 1.0 support, in the
//! same run and to the same address (`/amq/queue/Q`, a queue the bench declares and deletes):
//!
//! * `direct`: `--publishers` fe2o3-amqp clients (a connection, a session, a sender link
//!   each) sending unsettled with `send_batchable`, at most `--window` deliveries without an
//!   outcome per client, the same message mqgate sends (header, properties, `x-mqtt-*`
//!   application properties); a message counts when the broker `accepted` it — the ceiling;
//! * `mqgate`: `--publishers` MQTT 3.1.1 clients publishing QoS 1 (at most `--window`
//!   unacknowledged each) to a spawned mqgate whose `- amqp10:` target sends to the same
//!   address; a message counts at its PUBACK, which mqgate sends after `accepted`.
//!
//! Throughput is N over the time from the first send to the last outcome; each run checks
//! that the queue then holds N messages and purges it. Sides alternate over `--repeat` runs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Data, Header, Message, Outcome, Properties as AmqpProperties,
};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::types::primitives::{OrderedMap, SimpleValue, Timestamp};
use fe2o3_amqp::{Connection as Amqp10Connection, Sender, Session};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::Connection;
use mqgate::mqtt::codec::{self, Connect, Packet, Properties, ProtocolVersion, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::timeout;

use super::gateway::Gateway;
use super::stats::json_str;

/// What one comparison needs.
pub struct Spec<'a> {
    pub messages: u64,
    pub publishers: u64,
    pub payload: usize,
    pub window: usize,
    pub repeat: u64,
    /// RabbitMQ over AMQP 0-9-1 (declare, count, purge, delete).
    pub amqp_url: &'a str,
    /// RabbitMQ over AMQP 1.0.
    pub amqp10_url: &'a str,
    pub binary: &'a Path,
    pub idle: Duration,
    pub json: bool,
}

struct Run {
    side: &'static str,
    rate: f64,
    secs: f64,
    /// CPU time per message (µs) of the bench process, mqgate (mqgate side) and RabbitMQ, over
    /// the run; `None` where `/proc` could not tell.
    cpu: Cpu,
}

/// CPU time per message (µs) of each process over one run.
#[derive(Clone, Copy, Default)]
struct Cpu {
    bench: Option<f64>,
    mqgate: Option<f64>,
    rabbit: Option<f64>,
}

/// CPU time (user + system) of process `pid` (`self` for this one) so far, from
/// `/proc/PID/stat` (ticks of 10 ms).
fn proc_cpu(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// The machine's RabbitMQ node (the Debian service's `beam.smp`, HOME /var/lib/rabbitmq), if
/// found.
fn rabbit_pid() -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().to_string_lossy().into_owned();
        pid.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (cmd.contains("beam.smp") && cmd.contains("-home /var/lib/rabbitmq ")).then_some(pid)
    })
}

/// CPU readings at the start of a run.
struct CpuStart {
    bench: Option<Duration>,
    mqgate: Option<Duration>,
    rabbit: Option<Duration>,
}

impl CpuStart {
    fn now(mqgate: Option<&str>, rabbit: Option<&str>) -> CpuStart {
        CpuStart {
            bench: proc_cpu("self"),
            mqgate: mqgate.and_then(proc_cpu),
            rabbit: rabbit.and_then(proc_cpu),
        }
    }

    /// Per message since `self`.
    fn per_message(&self, n: u64, mqgate: Option<&str>, rabbit: Option<&str>) -> Cpu {
        let us = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64() * 1e6 / n.max(1) as f64),
            _ => None,
        };
        Cpu {
            bench: us(self.bench, proc_cpu("self")),
            mqgate: us(self.mqgate, mqgate.and_then(proc_cpu)),
            rabbit: us(self.rabbit, rabbit.and_then(proc_cpu)),
        }
    }
}

/// Runs the comparison; `Ok(false)` when mqgate's median is under 0.9× direct.
pub async fn run(spec: &Spec<'_>) -> Result<bool> {
    let conn = super::amqp::connect(spec.amqp_url).await?;
    let queue = format!("mqgate-bench-amqp10-{}", std::process::id());
    let ch = conn.create_channel().await.context("channel")?;
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
        .await
        .context("declare the bench queue")?;
    let address = format!("/amq/queue/{queue}");
    let result = compare(spec, &conn, &queue, &address).await;
    let _ = ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    result
}

async fn compare(spec: &Spec<'_>, conn: &Connection, queue: &str, address: &str) -> Result<bool> {
    let yaml = |mqtt: &str, admin: &str| {
        format!(
            "# Written by mqgate-bench (amqp10).\nmqtt:\n  listen: {}\n  receive_maximum: {}\nadmin:\n  listen: {}\namqp10:\n  rabbit:\n    url: {}\nrules:\n  - name: bench\n    from: \"bench/#\"\n    to:\n      - amqp10: {{ broker: rabbit, address: {} }}\n",
            json_str(mqtt),
            spec.window.clamp(1, 65_535),
            json_str(admin),
            json_str(spec.amqp10_url),
            json_str(address),
        )
    };
    let gw = Gateway::start_with(spec.binary, Duration::from_secs(20), yaml).await?;
    let mqgate_pid = gw.pid().map(|p| p.to_string());
    let rabbit = rabbit_pid();
    let mut runs = Vec::new();
    for _ in 0..spec.repeat {
        let mut run = direct(spec, address, rabbit.as_deref()).await?;
        settle_queue(conn, queue, spec.messages).await?;
        runs.push(run);
        run = through_mqgate(spec, &gw.mqtt_addr, mqgate_pid.as_deref(), rabbit.as_deref()).await?;
        settle_queue(conn, queue, spec.messages).await?;
        runs.push(run);
    }
    let log = gw.stop(Duration::from_secs(5)).await;
    let median = |side: &str| {
        let mut r: Vec<f64> = runs.iter().filter(|r| r.side == side).map(|r| r.rate).collect();
        r.sort_by(f64::total_cmp);
        r.get(r.len() / 2).copied().unwrap_or(0.0)
    };
    let (d, m) = (median("direct"), median("mqgate"));
    let ratio = if d > 0.0 { m / d } else { 0.0 };
    if spec.json {
        let list: Vec<String> = runs
            .iter()
            .map(|r| {
                let f = |v: Option<f64>| v.map_or("null".to_owned(), |v| format!("{v:.2}"));
                format!(
                    "{{\"mode\":\"amqp10-{}\",\"rate\":{:.1},\"secs\":{:.3},\"cpu_us_per_msg\":{{\"bench\":{},\"mqgate\":{},\"rabbitmq\":{}}}}}",
                    r.side,
                    r.rate,
                    r.secs,
                    f(r.cpu.bench),
                    f(r.cpu.mqgate),
                    f(r.cpu.rabbit)
                )
            })
            .collect();
        println!(
            "{{\"mode\":\"amqp10\",\"messages\":{},\"publishers\":{},\"payload\":{},\"window\":{},\"runs\":[{}],\"direct\":{d:.0},\"mqgate\":{m:.0},\"ratio\":{ratio:.3}}}",
            spec.messages,
            spec.publishers,
            spec.payload,
            spec.window,
            list.join(",")
        );
    } else {
        for r in &runs {
            let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
            println!(
                "amqp10 {:<7} {:>9.0} msgs/s  ({:.2} s)  CPU us/msg: bench {}, mqgate {}, RabbitMQ {}",
                r.side,
                r.rate,
                r.secs,
                f(r.cpu.bench),
                f(r.cpu.mqgate),
                f(r.cpu.rabbit)
            );
        }
        println!(
            "amqp10 median: direct {d:.0} msgs/s, mqgate {m:.0} msgs/s = {ratio:.2}x direct (target >= 0.9x)"
        );
        let cpu_median = |side: &str, pick: fn(&Cpu) -> Option<f64>| {
            let mut v: Vec<f64> =
                runs.iter().filter(|r| r.side == side).filter_map(|r| pick(&r.cpu)).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).map_or("-".to_owned(), |v| format!("{v:.1}"))
        };
        println!(
            "amqp10 CPU us/msg (medians): direct: bench {}, RabbitMQ {}; mqgate: bench {}, mqgate {}, RabbitMQ {}",
            cpu_median("direct", |c| c.bench),
            cpu_median("direct", |c| c.rabbit),
            cpu_median("mqgate", |c| c.bench),
            cpu_median("mqgate", |c| c.mqgate),
            cpu_median("mqgate", |c| c.rabbit)
        );
    }
    if let Some(e) = log {
        eprintln!("{e}");
    }
    Ok(ratio >= 0.9)
}

/// Waits until the queue holds `n` messages (every accepted message arrived), then purges it.
async fn settle_queue(conn: &Connection, queue: &str, n: u64) -> Result<()> {
    let ch = conn.create_channel().await.context("channel")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .context("count the bench queue")?;
        if u64::from(q.message_count()) >= n {
            break;
        }
        if Instant::now() > deadline {
            bail!("the queue holds {} of {n} messages", q.message_count());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ch.queue_purge(queue.into(), QueuePurgeOptions::default()).await.context("purge")?;
    let _ = ch.close(200, "done".into()).await;
    Ok(())
}

fn share(spec: &Spec<'_>, i: u64) -> u64 {
    spec.messages / spec.publishers + u64::from(i < spec.messages % spec.publishers)
}

/// The ceiling: fe2o3-amqp clients sending straight to the address.
async fn direct(spec: &Spec<'_>, address: &str, rabbit: Option<&str>) -> Result<Run> {
    let mut clients = Vec::new();
    for i in 0..spec.publishers {
        let mut conn = Amqp10Connection::open(format!("mqgate-bench-{i}"), spec.amqp10_url)
            .await
            .context("open an AMQP 1.0 connection")?;
        let mut session = Session::begin(&mut conn).await.context("begin")?;
        let sender =
            Sender::attach(&mut session, format!("bench-{i}"), address).await.context("attach")?;
        clients.push((conn, session, sender));
    }
    let payload = Bytes::from(vec![b'x'; spec.payload]);
    let start = Instant::now();
    let cpu = CpuStart::now(None, rabbit);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (conn, session, mut sender)) in clients.into_iter().enumerate() {
        let count = share(spec, i as u64);
        let payload = payload.clone();
        let window = Arc::new(Semaphore::new(spec.window.max(1)));
        let idle = spec.idle;
        let (topic, client_id) = (format!("bench/{i}"), format!("bench-a10-{i}"));
        tasks.spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let settler = tokio::spawn(async move {
                let mut accepted = 0u64;
                while let Some((fut, permit)) = rx.recv().await {
                    let fut: fe2o3_amqp::link::delivery::DeliveryFut<_> = fut;
                    let r: Result<Outcome, fe2o3_amqp::link::SendError> = fut.await;
                    drop(permit);
                    if matches!(r, Ok(Outcome::Accepted(_))) {
                        accepted += 1;
                    }
                }
                accepted
            });
            for _ in 0..count {
                let permit = Arc::clone(&window).acquire_owned().await.context("window")?;
                let msg = same_message(&topic, &client_id, &payload);
                let fut = timeout(idle, sender.send_batchable(msg))
                    .await
                    .context("no link credit")?
                    .context("send")?;
                let _ = tx.send((fut, permit));
            }
            drop(tx);
            let accepted = settler.await.context("settler")?;
            let _ = sender.close().await;
            drop((session, conn));
            anyhow::Ok(accepted)
        });
    }
    let mut accepted = 0;
    while let Some(r) = tasks.join_next().await {
        accepted += r.context("client task")??;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu.per_message(spec.messages, None, rabbit);
    if accepted != spec.messages {
        bail!("direct: {accepted} of {} accepted", spec.messages);
    }
    Ok(Run { side: "direct", rate: accepted as f64 / secs, secs, cpu })
}

/// The message mqgate sends for a QoS 1 PUBLISH of `payload` to `topic` by `client_id`
/// (`src/targets/amqp10/message.rs`): header `durable`, `subject` and `creation-time`, the
/// four `x-mqtt-*` application properties, one data section. The baseline sends the same
/// bytes, so the comparison measures mqgate, not a smaller message.
fn same_message(topic: &str, client_id: &str, payload: &Bytes) -> Message<Data> {
    let header = Header { durable: true, ..Header::default() };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let properties = AmqpProperties {
        subject: Some(topic.to_owned()),
        creation_time: Some(Timestamp::from_milliseconds(now)),
        ..AmqpProperties::default()
    };
    let mut app = OrderedMap::with_capacity(4);
    app.insert("x-mqtt-topic".to_owned(), SimpleValue::String(topic.to_owned()));
    app.insert("x-mqtt-qos".to_owned(), SimpleValue::Int(1));
    app.insert("x-mqtt-retain".to_owned(), SimpleValue::Bool(false));
    app.insert("x-mqtt-client-id".to_owned(), SimpleValue::String(client_id.to_owned()));
    Message {
        header: Some(header),
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(properties),
        application_properties: Some(ApplicationProperties(app)),
        body: Data(Binary::from(payload.to_vec())),
        footer: None,
    }
}

/// Through mqgate: MQTT 3.1.1 QoS 1 publishers; a message counts at its PUBACK.
async fn through_mqgate(
    spec: &Spec<'_>,
    addr: &str,
    mqgate: Option<&str>,
    rabbit: Option<&str>,
) -> Result<Run> {
    let mut socks = Vec::new();
    for i in 0..spec.publishers {
        socks.push(mqtt_connect(addr, &format!("bench-a10-{i}")).await?);
    }
    let payload = Bytes::from(vec![b'x'; spec.payload]);
    let start = Instant::now();
    let cpu = CpuStart::now(mqgate, rabbit);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, sock) in socks.into_iter().enumerate() {
        let count = share(spec, i as u64);
        let payload = payload.clone();
        let window = Arc::new(Semaphore::new(spec.window.max(1)));
        let idle = spec.idle;
        tasks.spawn(async move {
            let (mut rd, mut wr) = sock.into_split();
            let w = Arc::clone(&window);
            let reader = tokio::spawn(async move {
                let mut buf = BytesMut::with_capacity(64 * 1024);
                let mut acked = 0u64;
                while acked < count {
                    while let Some(p) =
                        codec::decode(&mut buf, Some(ProtocolVersion::V311), 1 << 20)
                            .map_err(|e| anyhow::anyhow!("bad packet: {e}"))?
                    {
                        if let Packet::PubAck(_) = p {
                            acked += 1;
                            w.add_permits(1);
                        }
                    }
                    if acked >= count {
                        break;
                    }
                    let n =
                        timeout(idle, rd.read_buf(&mut buf)).await.context("PUBACKs stopped")??;
                    if n == 0 {
                        bail!("mqgate closed the connection after {acked} PUBACKs");
                    }
                }
                anyhow::Ok(acked)
            });
            let mut out = BytesMut::with_capacity(64 * 1024);
            for k in 0..count {
                let permit = window.acquire().await.context("window")?;
                permit.forget();
                let p = Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: format!("bench/{i}"),
                    packet_id: (k % 65_535) as u16 + 1,
                    properties: Properties::default().into(),
                    payload: payload.clone(),
                };
                codec::encode(&Packet::Publish(p), ProtocolVersion::V311, &mut out)
                    .map_err(|e| anyhow::anyhow!("encode: {e}"))?;
                if window.available_permits() == 0 || k + 1 == count || out.len() > 32 * 1024 {
                    wr.write_all(&out).await.context("write")?;
                    out.clear();
                }
            }
            reader.await.context("reader")?
        });
    }
    let mut acked = 0;
    while let Some(r) = tasks.join_next().await {
        acked += r.context("publisher task")??;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu = cpu.per_message(spec.messages, mqgate, rabbit);
    Ok(Run { side: "mqgate", rate: acked as f64 / secs, secs, cpu })
}

async fn mqtt_connect(addr: &str, client_id: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    let c = Connect {
        protocol: ProtocolVersion::V311,
        clean_start: true,
        keep_alive: 0,
        client_id: client_id.to_owned(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    let mut out = BytesMut::new();
    codec::encode(&Packet::Connect(Box::new(c)), ProtocolVersion::V311, &mut out)
        .map_err(|e| anyhow::anyhow!("encode CONNECT: {e}"))?;
    s.write_all(&out).await?;
    let mut buf = BytesMut::new();
    loop {
        if let Some(p) = codec::decode(&mut buf, Some(ProtocolVersion::V311), 1 << 20)
            .map_err(|e| anyhow::anyhow!("bad CONNACK: {e}"))?
        {
            match p {
                Packet::ConnAck(a) if a.code.is_success() => return Ok(s),
                other => bail!("expected CONNACK, got {other:?}"),
            }
        }
        if s.read_buf(&mut buf).await? == 0 {
            bail!("mqgate closed before CONNACK");
        }
    }
}
