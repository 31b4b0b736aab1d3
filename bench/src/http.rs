//! `--mode http`: HTTP webhook targets, against an axum sink this process serves on a free
//! loopback port, in the same run:
//!
//! 1. `direct`: a reqwest client loop, `--http-concurrency` requests in flight, one message per
//!    request: the ceiling;
//! 2. `mqgate`: `--publishers` MQTT 3.1.1 QoS 1 publishers through a spawned mqgate whose rule
//!    sends each message in its own request (`body: raw`, `concurrency` lanes = the same
//!    concurrency); a publisher spreads its messages over 1,024 topics so the lanes share the load evenly;
//! 3. `mqgate-batch`: the same with `batch: { max_messages: --http-batch, format: ndjson }`
//!    (`body: json`: the envelope of each message on its own line).
//!
//! The sink counts messages (a request to `/one` is one, a line to `/batch` is one); a run's
//! rate is its messages over the time from the go to the last one counted. The end compares
//! medians with the targets: mqgate >= 0.8x direct, batching >= 10x mqgate.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

use super::gateway::Gateway;
use super::load::{Phase, PubJob};
use super::mqtt;
use super::payload::{Clock, PayloadBuilder};
use super::stats::json_str;

/// Topics per publisher. A topic always uses the same lane, so the lanes share the load as
/// evenly as the topics hash: with few topics per lane the busiest lane decides the run.
const TOPICS_PER_PUBLISHER: usize = 1024;
/// A run that counts no new message for this long ends, the rest counted lost.
const IDLE: Duration = Duration::from_secs(10);

/// The settings of an HTTP bench.
pub struct HttpBench<'a> {
    /// The mqgate binary to spawn.
    pub binary: &'a Path,
    /// Messages per run.
    pub messages: u64,
    /// MQTT publishers.
    pub publishers: usize,
    /// Payload bytes.
    pub payload: usize,
    /// QoS 1 window per publisher (and the gateway's receive maximum).
    pub window: usize,
    /// Requests in flight: the direct loop's tasks, mqgate's lanes and max connections.
    pub concurrency: usize,
    /// Messages per batch in `mqgate-batch`.
    pub batch: usize,
    /// The batch's `max_delay` in milliseconds.
    pub batch_delay_ms: u64,
    /// Runs per mode (medians compared).
    pub repeat: u64,
    /// Messages of an unreported warm-up run per mode.
    pub warmup: u64,
    /// One JSON document instead of text.
    pub json: bool,
    /// The runs to make (`direct`, `mqgate`, `batch`); all three by default. The ratios need
    /// their two runs: one run alone is for profiling.
    pub runs: Vec<String>,
}

/// The sink's counter and when it last moved.
#[derive(Clone)]
struct Sink {
    /// Messages received.
    count: Arc<AtomicU64>,
}

async fn one(State(s): State<Sink>, _body: Bytes) -> StatusCode {
    s.count.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

async fn batch(State(s): State<Sink>, body: Bytes) -> StatusCode {
    let lines = body.iter().filter(|&&b| b == b'\n').count() as u64;
    s.count.fetch_add(lines, Ordering::Relaxed);
    StatusCode::OK
}

/// The modes, in run order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Direct,
    Mqgate,
    Batch,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Mqgate => "mqgate",
            Mode::Batch => "mqgate-batch",
        }
    }
}

/// Runs the HTTP bench; `Ok(false)` if a run failed.
pub async fn run(b: &HttpBench<'_>) -> Result<bool> {
    let listener = TcpListener::bind("127.0.0.1:0").await.context("bind the HTTP sink")?;
    let sink_addr = listener.local_addr()?;
    let sink = Sink { count: Arc::new(AtomicU64::new(0)) };
    let app = Router::new()
        .route("/one", post(one))
        .route("/batch", post(batch))
        .with_state(sink.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let c = b.concurrency;
    let yaml = |mqtt: &str, admin: &str| {
        format!(
            "# Written by mqgate-bench --mode http.\n\
             mqtt:\n  listen: {}\n  receive_maximum: {}\n\
             admin:\n  listen: {}\n\
             http:\n  sink:\n    url: \"http://{sink_addr}\"\n    max_connections: {c}\n\
             rules:\n\
             \x20 - name: one\n    from: \"bench/one/#\"\n    to:\n      - http:\n          endpoint: sink\n          path: /one\n          body: raw\n          concurrency: {c}\n          queue: 1024\n\
             \x20 - name: batch\n    from: \"bench/batch/#\"\n    to:\n      - http:\n          endpoint: sink\n          path: /batch\n          body: json\n          concurrency: {c}\n          queue: 4096\n          batch: {{ max_messages: {}, max_delay: {}ms, format: ndjson }}\n",
            json_str(mqtt),
            b.window,
            json_str(admin),
            b.batch,
            b.batch_delay_ms,
        )
    };
    let gw = Gateway::start_with(b.binary, Duration::from_secs(20), yaml).await?;
    if !b.json {
        println!(
            "mqgate-bench http: {} msgs x {} B, {} requests in flight, {} MQTT QoS 1 publishers \
             (window {}), batch {} (ndjson); sink on {sink_addr}, mqgate log {}",
            b.messages,
            b.payload,
            c,
            b.publishers,
            b.window,
            b.batch,
            gw.log_path.display()
        );
        println!(
            "{:<13} {:>7} {:>12} {:>8} {:>14}",
            "mode", "run", "msgs/s", "lost", "mqgate us/msg"
        );
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(c)
        .tcp_nodelay(true)
        .no_proxy()
        .build()
        .context("build the direct client")?;
    let clock = Clock::new();
    let modes: Vec<Mode> = [Mode::Direct, Mode::Mqgate, Mode::Batch]
        .into_iter()
        .filter(|m| b.runs.is_empty() || b.runs.iter().any(|r| m.name().ends_with(r.as_str())))
        .collect();
    let mut rates: Vec<(Mode, f64)> = Vec::new();
    let mut errors = Vec::new();
    let mut json_runs = Vec::new();
    for &mode in &modes {
        if b.warmup > 0 {
            let _ = run_one(b, mode, b.warmup, &sink, sink_addr, &gw, &client, clock).await;
        }
    }
    for r in 0..b.repeat {
        for &mode in &modes {
            let cpu0 = gw.cpu_time();
            match run_one(b, mode, b.messages, &sink, sink_addr, &gw, &client, clock).await {
                Ok((rate, lost)) => {
                    // mqgate's CPU (user + system) per message counted: what batching saves,
                    // less noisy than the rate on a shared machine. Not for `direct`.
                    let per_msg = match (mode, cpu0, gw.cpu_time()) {
                        (Mode::Mqgate | Mode::Batch, Some(a), Some(z)) if lost < b.messages => {
                            Some((z - a).as_secs_f64() * 1e6 / (b.messages - lost) as f64)
                        }
                        _ => None,
                    };
                    if !b.json {
                        let cpu = per_msg.map_or_else(|| "-".to_owned(), |c| format!("{c:.2}"));
                        println!(
                            "{:<13} {:>7} {:>12.0} {:>8} {:>14}",
                            mode.name(),
                            r + 1,
                            rate,
                            lost,
                            cpu
                        );
                    }
                    let cpu = per_msg.map_or_else(|| "null".to_owned(), |c| format!("{c:.3}"));
                    json_runs.push(format!(
                        "{{\"mode\":{},\"rate\":{rate:.1},\"lost\":{lost},\"mqgate_cpu_us_per_msg\":{cpu}}}",
                        json_str(mode.name())
                    ));
                    if lost > 0 {
                        errors.push(format!("{}: {lost} messages lost", mode.name()));
                    }
                    rates.push((mode, rate));
                }
                Err(e) => {
                    let e = format!("{}: {e:#}", mode.name());
                    if !b.json {
                        println!("{e}");
                    }
                    errors.push(e);
                }
            }
        }
    }
    let note = gw.stop(Duration::from_secs(10)).await;
    server.abort();
    let median = |m: Mode| {
        let mut v: Vec<f64> = rates.iter().filter(|(x, _)| *x == m).map(|(_, r)| *r).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    };
    let (direct, single, batched) =
        (median(Mode::Direct), median(Mode::Mqgate), median(Mode::Batch));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let vs_direct = ratio(single, direct);
    let batch_gain = ratio(batched, single);
    if b.json {
        let num = |x: Option<f64>| x.map_or_else(|| "null".to_owned(), |v| format!("{v:.3}"));
        println!(
            "{{\"http\":[{}],\"mqgate_vs_direct\":{},\"batch_vs_mqgate\":{},\"errors\":[{}]}}",
            json_runs.join(","),
            num(vs_direct),
            num(batch_gain),
            errors.iter().map(|e| json_str(e)).collect::<Vec<_>>().join(",")
        );
    } else {
        let show = |x: Option<f64>| x.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}x"));
        let verdict = |x: Option<f64>, target: f64| match x {
            Some(v) if v >= target => "ok",
            Some(_) => "BELOW TARGET",
            None => "no figure",
        };
        println!(
            "http: mqgate (1 msg/request) vs direct reqwest loop: {} (target >= 0.80x: {})",
            show(vs_direct),
            verdict(vs_direct, 0.8)
        );
        println!(
            "http: mqgate batched vs mqgate 1 msg/request: {} (target >= 10x: {})",
            show(batch_gain),
            verdict(batch_gain, 10.0)
        );
        if let Some(note) = note {
            println!("note: {note}");
        }
    }
    Ok(errors.is_empty())
}

/// One run of `mode`: its rate in msgs/s and the messages not counted by the sink.
#[allow(clippy::too_many_arguments)]
async fn run_one(
    b: &HttpBench<'_>,
    mode: Mode,
    messages: u64,
    sink: &Sink,
    sink_addr: std::net::SocketAddr,
    gw: &Gateway,
    client: &reqwest::Client,
    clock: Clock,
) -> Result<(f64, u64)> {
    sink.count.store(0, Ordering::SeqCst);
    let builder = PayloadBuilder::new(b.payload, 0);
    let (phase_tx, phase_rx) = watch::channel(Phase::Wait);
    let mut set = JoinSet::new();
    match mode {
        Mode::Direct => {
            let per = split(messages, b.concurrency);
            let url = format!("http://{sink_addr}/one");
            let body = Bytes::from(builder.build(0, 0));
            for n in per {
                let (client, url, body, mut phase) =
                    (client.clone(), url.clone(), body.clone(), phase_rx.clone());
                set.spawn(async move {
                    super::load::wait_go(&mut phase).await?;
                    for _ in 0..n {
                        let resp = client
                            .post(&url)
                            .header("content-type", "application/octet-stream")
                            .body(body.clone())
                            .send()
                            .await
                            .context("direct request")?;
                        if !resp.status().is_success() {
                            bail!("the sink answered {}", resp.status());
                        }
                        let _ = resp.bytes().await;
                    }
                    anyhow::Ok(())
                });
            }
        }
        Mode::Mqgate | Mode::Batch => {
            let prefix = if mode == Mode::Batch { "bench/batch" } else { "bench/one" };
            let (ready_tx, mut ready_rx) = mpsc::channel(b.publishers);
            let jobs = PubJob::split(messages, b.publishers, 1, b.window, 0, &builder, clock);
            for job in jobs {
                let i = job.index;
                let topics =
                    (0..TOPICS_PER_PUBLISHER).map(|t| format!("{prefix}/{i}/{t}")).collect();
                let client_id = format!("mqgate-bench-http-{}-{i}", std::process::id());
                let fut = mqtt::raw_publisher_topics(
                    gw.mqtt_addr.clone(),
                    client_id,
                    topics,
                    job,
                    ready_tx.clone(),
                    phase_rx.clone(),
                );
                set.spawn(async move { fut.await.map(|_| ()) });
            }
            drop(ready_tx);
            for _ in 0..b.publishers {
                if timeout(Duration::from_secs(15), ready_rx.recv()).await.ok().flatten().is_none()
                {
                    let _ = phase_tx.send(Phase::Stop);
                    bail!("publishers did not connect");
                }
            }
        }
    }
    let start = Instant::now();
    let _ = phase_tx.send(Phase::Go(clock.now_ns()));
    let mut last = (0, start);
    let end = loop {
        let n = sink.count.load(Ordering::Relaxed);
        let now = Instant::now();
        if n != last.0 {
            last = (n, now);
        }
        if n >= messages {
            break now;
        }
        if now - last.1 > IDLE {
            break last.1;
        }
        if let Some(Ok(Err(e))) = set.try_join_next() {
            let _ = phase_tx.send(Phase::Stop);
            return Err(e);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let _ = phase_tx.send(Phase::Stop);
    while let Ok(Some(j)) = timeout(Duration::from_secs(15), set.join_next()).await {
        if let Ok(Err(e)) = j {
            return Err(e);
        }
    }
    let got = sink.count.load(Ordering::Relaxed).min(messages);
    let secs = (end - start).as_secs_f64();
    Ok((if secs > 0.0 { got as f64 / secs } else { 0.0 }, messages - got))
}

/// `n` split over `parts` as evenly as possible.
fn split(n: u64, parts: usize) -> Vec<u64> {
    let p = parts.max(1) as u64;
    (0..p).map(|i| n / p + u64::from(i < n % p)).collect()
}
