//! `--mode zmq`: MQTT → ZeroMQ throughput against a direct ZeroMQ client, in the same run. One
//! PULL socket in the bench (the `zeromq` crate) counts what arrives:
//!
//! * `direct`: one PUSH socket (the same crate) connected to the PULL sends N two-frame messages
//!   (topic, payload);
//! * `mqgate`: `--publishers` MQTT 3.1.1 connections, each keeping `--window` QoS 1 PUBLISHes
//!   in flight, send N messages to a spawned mqgate whose `ack: receive` rule sends them through
//!   a PUSH socket connected to the same PULL.
//!
//! Throughput is N over the time from the first send to the N-th message at the PULL; sequence
//! numbers in the payloads count loss.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
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

/// Runs both sides `repeat` times, alternating; prints the rates and the ratio of the medians.
pub async fn run(spec: &Spec<'_>) -> Result<bool> {
    if !spec.json {
        println!(
            "mqgate-bench zmq: {} msgs x {} B per run; direct = zeromq PUSH -> PULL, mqgate = {} MQTT QoS 1 publishers x window {} -> ack: receive rule -> PUSH -> the same PULL",
            spec.messages, spec.payload, spec.publishers, spec.window
        );
    }
    let mut runs: Vec<(&str, f64, bool)> = Vec::new();
    for _ in 0..spec.repeat {
        for side in ["direct", "mqgate"] {
            let mut pull = zeromq::PullSocket::new();
            let endpoint =
                pull.bind("tcp://127.0.0.1:0").await.context("bind the PULL")?.to_string();
            let counter = tokio::spawn(count(pull, spec.messages));
            let start = Instant::now();
            let sending = match side {
                "direct" => direct(spec, &endpoint).await,
                _ => through_mqgate(spec, &endpoint).await,
            };
            let got = counter.await.context("PULL task")?;
            let secs = start.elapsed().as_secs_f64();
            let gw = sending.with_context(|| format!("{side} run"))?;
            if let Some(gw) = gw {
                if let Some(note) = gw.stop(Duration::from_secs(10)).await {
                    eprintln!("mqgate-bench: {note}");
                }
            }
            let rate = got as f64 / secs;
            let complete = got == spec.messages;
            if !spec.json {
                println!(
                    "  {side:<7} {rate:>10.0} msgs/s  {secs:>6.2} s  received {got}{}",
                    if complete { "" } else { "  (messages lost)" }
                );
            }
            runs.push((side, rate, complete));
        }
    }
    let median = |side: &str| {
        let mut v: Vec<f64> = runs.iter().filter(|r| r.0 == side).map(|r| r.1).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (d, m) = (median("direct"), median("mqgate"));
    let ratio = if d > 0.0 { m / d } else { 0.0 };
    if spec.json {
        let list: Vec<String> = runs
            .iter()
            .map(|(side, rate, complete)| {
                format!(
                    "{{\"side\":{},\"msgs_per_s\":{rate:.0},\"complete\":{complete}}}",
                    json_str(side)
                )
            })
            .collect();
        println!("{{\"zmq\":{{\"runs\":[{}],\"direct_median\":{d:.0},\"mqgate_median\":{m:.0},\"ratio\":{ratio:.3}}}}}", list.join(","));
    } else {
        let verdict = if ratio >= 0.9 { "meets" } else { "below" };
        println!(
            "zmq: direct {d:.0} msgs/s, mqgate {m:.0} msgs/s, ratio {ratio:.2}x ({verdict} the 0.9x target; medians of {})",
            spec.repeat
        );
    }
    Ok(runs.iter().all(|r| r.2))
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

async fn direct(spec: &Spec<'_>, endpoint: &str) -> Result<Option<Gateway>> {
    let mut push = zeromq::PushSocket::new();
    push.connect(endpoint).await.context("connect the direct PUSH")?;
    let payload = bytes::Bytes::from(vec![b'x'; spec.payload]);
    let topic = bytes::Bytes::from_static(b"bench/0");
    for _ in 0..spec.messages {
        let msg = ZmqMessage::try_from(vec![topic.clone(), payload.clone()])
            .map_err(|_| anyhow::anyhow!("empty message"))?;
        push.send(msg).await.context("direct send")?;
    }
    Ok(None)
}

async fn through_mqgate(spec: &Spec<'_>, endpoint: &str) -> Result<Option<Gateway>> {
    let gw = Gateway::start_with(spec.binary, Duration::from_secs(20), |mqtt, admin| {
        format!(
            "mqtt:\n  listen: \"{mqtt}\"\n  receive_maximum: {}\nadmin:\n  listen: \"{admin}\"\nzmq:\n  out:\n    kind: push\n    connect: \"{endpoint}\"\n    sndhwm: 10000\nrules:\n  - name: bench\n    from: \"bench/#\"\n    ack: receive\n    to:\n      - zmq: {{ socket: out }}\n",
            spec.window.max(1)
        )
    })
    .await?;
    let mut conns = Vec::new();
    for p in 0..spec.publishers {
        conns.push(connect(&gw.mqtt_addr, &format!("mqgate-bench-zmq-{p}")).await?);
    }
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
    if spec.messages == 0 {
        bail!("no messages");
    }
    Ok(Some(gw))
}
