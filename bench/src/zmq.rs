//! `--mode zmq`: MQTT → ZeroMQ throughput, mqgate against two baselines in the same run. One
//! PULL socket in the bench (the `zeromq` crate) counts what arrives:
//!
//! * `direct`: one PUSH socket (the same crate) connected to the PULL sends N two-frame messages
//!   (topic, payload) in a loop: the ceiling of the socket itself, with no MQTT at all;
//! * `devices`: `--publishers` PUSH sockets (the same crate), one per publisher, each sending
//!   its share in a task of its own: the devices speaking ZeroMQ themselves, as many
//!   producers as mqgate has MQTT publishers (the PULL fair-queues between them);
//! * `bridge`: the least a program must do for the same job, written here: the same MQTT
//!   publishers as for mqgate connect to a listener in the bench, whose task per connection
//!   decodes the PUBLISHes of each read (mqgate's codec), hands them to one PUSH socket as the
//!   same two frames, then writes their PUBACKs (`ack: receive`): no broker, no rules, no
//!   metrics. It pays for the MQTT ingest, and for the publishers sharing the 2 cores, as
//!   mqgate does;
//! * `mqgate`: `--publishers` MQTT 3.1.1 connections, each keeping `--window` QoS 1 PUBLISHes
//!   in flight, send N messages to a spawned mqgate whose `ack: receive` rule sends them through
//!   a PUSH socket connected to the same PULL.
//!
//! Each side is set up (mqgate started and ready, its PUSH connected; publishers connected)
//! before the clock starts. Throughput is N over the time from the first send to the N-th
//! message at the PULL. The mqgate side also reports mqgate's CPU time per message.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use mqgate::mqtt::codec::ReasonCode;
use mqgate::mqtt::codec::{self, ConnAck, Packet, Properties, ProtocolVersion, PubResponse, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use super::gateway::Gateway;
use super::kafka::{connect, publish};
use super::stats::json_str;

/// What one ZeroMQ comparison needs.
pub struct Spec<'a> {
    pub messages: u64,
    pub payload: usize,
    pub publishers: u64,
    pub window: u16,
    pub repeat: u64,
    pub binary: &'a Path,
    pub json: bool,
}

const SIDES: [&str; 4] = ["direct", "devices", "bridge", "mqgate"];

/// One side's run.
struct Run {
    side: &'static str,
    rate: f64,
    complete: bool,
    /// mqgate's CPU time per message (µs), mqgate side only.
    cpu_us: Option<f64>,
    /// The bench process's CPU time per message (µs): PUSH and PULL (direct), publishers,
    /// bridge and PULL (bridge), publishers and PULL (mqgate).
    bench_us: Option<f64>,
}

/// A side, set up and waiting for the clock.
enum Ready {
    Direct(zeromq::PushSocket),
    Devices(Vec<zeromq::PushSocket>),
    Bridge(Vec<TcpStream>, tokio::task::JoinHandle<Result<()>>),
    Mqgate(Gateway, Vec<TcpStream>),
}

/// Runs the sides `repeat` times, alternating; prints the rates and the ratios of the medians.
pub async fn run(spec: &Spec<'_>) -> Result<bool> {
    if spec.messages == 0 || spec.publishers == 0 {
        bail!("--messages and --publishers must be at least 1");
    }
    if !spec.json {
        println!(
            "mqgate-bench zmq: {} msgs x {} B per run; direct = zeromq PUSH -> PULL; bridge = {p} MQTT QoS 1 publishers x window {w} -> a minimal MQTT->PUSH bridge in the bench; mqgate = the same publishers -> ack: receive rule -> PUSH; all to the same PULL",
            spec.messages,
            spec.payload,
            p = spec.publishers,
            w = spec.window
        );
    }
    let mut runs: Vec<Run> = Vec::new();
    for _ in 0..spec.repeat {
        for side in SIDES {
            let run = run_side(spec, side).await.with_context(|| format!("{side} run"))?;
            if !spec.json {
                let cpu = run.cpu_us.map(|c| format!(" + mqgate {c:.2}")).unwrap_or_default();
                let bench = run.bench_us.map(|c| format!("{c:.2}")).unwrap_or_default();
                println!(
                    "  {side:<7} {:>10.0} msgs/s  CPU us/msg: bench {bench}{cpu}{}",
                    run.rate,
                    if run.complete { "" } else { "  (messages lost)" }
                );
            }
            runs.push(run);
        }
    }
    let median = |side: &str| {
        let mut v: Vec<f64> = runs.iter().filter(|r| r.side == side).map(|r| r.rate).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (d, b, m) = (median("direct"), median("bridge"), median("mqgate"));
    let n = median("devices");
    // CPU per message of everything a side runs (the bench process, plus mqgate).
    let cpu = |side: &str| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|r| r.side == side)
            .filter_map(|r| r.bench_us.map(|b| b + r.cpu_us.unwrap_or(0.0)))
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    if spec.json {
        let list: Vec<String> = runs
            .iter()
            .map(|r| {
                format!(
                    "{{\"mode\":{},\"rate\":{:.1},\"complete\":{}{}}}",
                    json_str(&format!("zmq-{}", r.side)),
                    r.rate,
                    r.complete,
                    r.cpu_us
                        .map(|c| format!(",\"mqgate_cpu_us_per_msg\":{c:.3}"))
                        .unwrap_or_default()
                        + &r.bench_us
                            .map(|c| format!(",\"bench_cpu_us_per_msg\":{c:.3}"))
                            .unwrap_or_default()
                )
            })
            .collect();
        println!(
            "{{\"zmq\":{{\"runs\":[{}],\"direct_median\":{d:.0},\"devices_median\":{n:.0},\"bridge_median\":{b:.0},\"mqgate_median\":{m:.0},\"mqgate_vs_bridge\":{:.3},\"mqgate_vs_direct\":{:.3},\"mqgate_vs_devices\":{:.3}}}}}",
            list.join(","),
            ratio(m, b),
            ratio(m, d),
            ratio(m, n)
        );
    } else {
        println!(
            "zmq (medians of {}): direct {d:.0} msgs/s, devices {n:.0} msgs/s, bridge {b:.0} msgs/s, mqgate {m:.0} msgs/s; mqgate/bridge {:.2}x, mqgate/direct {:.2}x, mqgate/devices {:.2}x",
            spec.repeat,
            ratio(m, b),
            ratio(m, d),
            ratio(m, n)
        );
        println!(
            "zmq CPU us/msg, all processes of a side (medians): direct {:.2}, devices {:.2}, bridge {:.2}, mqgate {:.2}",
            cpu("direct"),
            cpu("devices"),
            cpu("bridge"),
            cpu("mqgate")
        );
    }
    Ok(runs.iter().all(|r| r.complete))
}

/// Sets one side up, then times it.
async fn run_side(spec: &Spec<'_>, side: &'static str) -> Result<Run> {
    let mut pull = zeromq::PullSocket::new();
    let endpoint = pull.bind("tcp://127.0.0.1:0").await.context("bind the PULL")?.to_string();
    let counter = tokio::spawn(count(pull, spec.messages));
    let ready = match side {
        "direct" => {
            let mut push = zeromq::PushSocket::new();
            push.connect(&endpoint).await.context("connect the direct PUSH")?;
            Ready::Direct(push)
        }
        "devices" => {
            let mut pushes = Vec::new();
            for _ in 0..spec.publishers {
                let mut push = zeromq::PushSocket::new();
                push.connect(&endpoint).await.context("connect a device's PUSH")?;
                pushes.push(push);
            }
            Ready::Devices(pushes)
        }
        "bridge" => {
            let listener = TcpListener::bind("127.0.0.1:0").await.context("bind the bridge")?;
            let addr = listener.local_addr()?.to_string();
            let mut push = zeromq::PushSocket::new();
            push.connect(&endpoint).await.context("connect the bridge's PUSH")?;
            let bridge = tokio::spawn(bridge(listener, push, spec.publishers));
            Ready::Bridge(publishers(spec, &addr).await?, bridge)
        }
        _ => {
            // /readyz is 200 once the zmq socket is connected to the PULL.
            let gw = Gateway::start_with(spec.binary, Duration::from_secs(20), |mqtt, admin| {
                format!(
                    "mqtt:\n  listen: \"{mqtt}\"\n  receive_maximum: {}\nadmin:\n  listen: \"{admin}\"\nzmq:\n  out:\n    kind: push\n    connect: \"{endpoint}\"\n    sndhwm: 10000\nrules:\n  - name: bench\n    from: \"bench/#\"\n    ack: receive\n    to:\n      - zmq: {{ socket: out }}\n",
                    spec.window.max(1)
                )
            })
            .await?;
            let conns = publishers(spec, &gw.mqtt_addr).await?;
            Ready::Mqgate(gw, conns)
        }
    };
    let start = Instant::now();
    let bench0 = own_cpu_time();
    let bench_us = |n: u64| match (bench0, own_cpu_time()) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a)).as_secs_f64() * 1e6 / n as f64),
        _ => None,
    };
    let mut cpu_us = None;
    match ready {
        Ready::Direct(push) => direct(spec, push).await?,
        Ready::Devices(pushes) => devices(spec, pushes).await?,
        Ready::Bridge(conns, bridge) => {
            send_all(spec, conns).await?;
            bridge.await.context("bridge task")??;
        }
        Ready::Mqgate(gw, conns) => {
            let cpu0 = gw.cpu_time();
            send_all(spec, conns).await?;
            let got = counter.await.context("PULL task")?;
            let secs = start.elapsed().as_secs_f64();
            let bench_us = bench_us(spec.messages);
            if let (Some(a), Some(b)) = (cpu0, gw.cpu_time()) {
                cpu_us = Some((b - a).as_secs_f64() * 1e6 / spec.messages as f64);
            }
            if let Some(note) = gw.stop(Duration::from_secs(10)).await {
                eprintln!("mqgate-bench: {note}");
            }
            return Ok(Run {
                side,
                rate: got as f64 / secs,
                complete: got == spec.messages,
                cpu_us,
                bench_us,
            });
        }
    }
    let got = counter.await.context("PULL task")?;
    let secs = start.elapsed().as_secs_f64();
    let bench_us = bench_us(spec.messages);
    Ok(Run { side, rate: got as f64 / secs, complete: got == spec.messages, cpu_us, bench_us })
}

/// This process's CPU time (user + system) so far, from `/proc/self/stat` (Linux; ticks of
/// 10 ms). `None` when unreadable.
fn own_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// Receives until `n` messages arrived or 10 s pass without one; returns the count.
async fn count(mut pull: zeromq::PullSocket, n: u64) -> u64 {
    let mut got = 0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(10), pull.recv()).await {
            Ok(Ok(_)) => got += 1,
            _ => break,
        }
    }
    got
}

async fn direct(spec: &Spec<'_>, push: zeromq::PushSocket) -> Result<()> {
    send_n(push, spec.payload, spec.messages).await
}

/// Each PUSH sends its share of the messages in a task of its own (as `send_all` shares them
/// among the MQTT publishers).
async fn devices(spec: &Spec<'_>, pushes: Vec<zeromq::PushSocket>) -> Result<()> {
    let count = pushes.len() as u64;
    let per = spec.messages / count;
    let mut tasks = tokio::task::JoinSet::new();
    for (p, push) in pushes.into_iter().enumerate() {
        let n = per + u64::from((p as u64) < spec.messages % count);
        tasks.spawn(send_n(push, spec.payload, n));
    }
    while let Some(r) = tasks.join_next().await {
        r.context("device task")??;
    }
    Ok(())
}

/// Sends `n` two-frame messages (topic, `payload` bytes) through `push`.
async fn send_n(mut push: zeromq::PushSocket, payload: usize, n: u64) -> Result<()> {
    let payload = bytes::Bytes::from(vec![b'x'; payload]);
    let topic = bytes::Bytes::from_static(b"bench/0");
    for _ in 0..n {
        let msg = ZmqMessage::try_from(vec![topic.clone(), payload.clone()])
            .map_err(|_| anyhow::anyhow!("empty message"))?;
        push.send(msg).await.context("direct send")?;
    }
    Ok(())
}

/// `--publishers` MQTT connections to `addr`.
async fn publishers(spec: &Spec<'_>, addr: &str) -> Result<Vec<TcpStream>> {
    let mut conns = Vec::new();
    for p in 0..spec.publishers {
        conns.push(connect(addr, &format!("mqgate-bench-zmq-{p}")).await?);
    }
    Ok(conns)
}

/// Each connection publishes its share of N to `bench/P`; returns after the last PUBACK.
async fn send_all(spec: &Spec<'_>, conns: Vec<TcpStream>) -> Result<()> {
    let per = spec.messages / spec.publishers;
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
    Ok(())
}

/// The minimal MQTT → ZeroMQ bridge: accepts `conns` MQTT 3.1.1 connections, then forwards
/// their PUBLISHes to `push` until they close.
async fn bridge(listener: TcpListener, push: zeromq::PushSocket, conns: u64) -> Result<()> {
    let push = Arc::new(tokio::sync::Mutex::new(push));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (s, _) = listener.accept().await.context("bridge accept")?;
        s.set_nodelay(true)?;
        tasks.push(tokio::spawn(bridge_conn(s, Arc::clone(&push))));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// One connection of the bridge: CONNACK, then per read: every PUBLISH to the PUSH socket (one
/// lock), then their PUBACKs in one write.
async fn bridge_conn(
    mut s: TcpStream,
    push: Arc<tokio::sync::Mutex<zeromq::PushSocket>>,
) -> Result<()> {
    let v = Some(ProtocolVersion::V311);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut batch = Vec::new();
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        while let Some(p) = codec::decode(&mut buf, v, 1 << 20)? {
            match p {
                Packet::Connect(_) => {
                    let ack = ConnAck {
                        session_present: false,
                        code: ReasonCode::SUCCESS,
                        properties: Properties::default(),
                    };
                    codec::encode(
                        &Packet::ConnAck(Box::new(ack)),
                        ProtocolVersion::V311,
                        &mut out,
                    )?;
                }
                Packet::Publish(p) => batch.push(p),
                Packet::Disconnect(_) => return Ok(()),
                other => bail!("bridge: unexpected {}", other.name()),
            }
        }
        if !batch.is_empty() {
            let mut push = push.lock().await;
            for p in batch.drain(..) {
                let frames = vec![bytes::Bytes::from(p.topic.into_bytes()), p.payload];
                let msg = ZmqMessage::try_from(frames).map_err(|_| anyhow::anyhow!("empty"))?;
                push.send(msg).await.context("bridge send")?;
                if p.qos != QoS::AtMostOnce {
                    let ack = Packet::PubAck(PubResponse::success(p.packet_id));
                    codec::encode(&ack, ProtocolVersion::V311, &mut out)?;
                }
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
    }
}
