//! `--mode storm`: a reconnect storm. `STEADY` clients connected beforehand publish QoS 1
//! one at a time (each PUBACK's latency recorded, on a topic no rule or subscriber takes, so
//! the server answers at once); then N clients connect at once (`STORM_CONCURRENCY` opening
//! together), as after a network blip. Reports how long the storm took, how many connections
//! were refused or failed, and the steady clients' PUBACK latencies while it lasted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::idle::{encode_connect, Login, Sources};

/// Clients publishing during the storm.
const STEADY: usize = 4;
/// Connections being opened at once.
const STORM_CONCURRENCY: usize = 1024;
/// Longest the storm may take.
const STORM_TIMEOUT: Duration = Duration::from_secs(120);

/// What one server did in the storm.
pub struct StormReport {
    pub server: &'static str,
    pub connections: usize,
    pub seconds: f64,
    pub refused: usize,
    pub acks: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl StormReport {
    pub fn text_line(&self) -> String {
        format!(
            "{:<10} {:>6} conns at once in {:>6.2} s = {:>7.0} conn/s, {} refused; steady QoS 1 PUBACKs during it: {} (p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms)",
            self.server,
            self.connections,
            self.seconds,
            self.connections as f64 / self.seconds.max(1e-9),
            self.refused,
            self.acks,
            self.p50_ms,
            self.p99_ms,
            self.max_ms
        )
    }
}

async fn open(
    addr: &str,
    from: Sources,
    i: usize,
    client_id: &str,
    login: &Login,
) -> Result<TcpStream> {
    let mut s = from.connect(addr, i).await?;
    s.set_nodelay(true)?;
    s.write_all(&encode_connect(client_id, login)).await.context("send CONNECT")?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.context("read CONNACK")?;
    if connack[0] >> 4 != 2 || connack[3] != 0 {
        bail!("CONNACK refused: {connack:?}");
    }
    Ok(s)
}

/// One steady client: QoS 1 PUBLISH, wait for its PUBACK, record, until `stop`.
/// Only PUBACKs of PUBLISHes sent while `storming` are recorded.
async fn steady(
    mut s: TcpStream,
    storming: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Result<Histogram<u64>> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    let topic = b"storm/steady";
    let payload = [0u8; 64];
    let mut id: u16 = 0;
    while !stop.load(Ordering::Relaxed) {
        id = id.wrapping_add(1).max(1);
        let len = 2 + topic.len() + 2 + payload.len();
        let mut p = vec![0x32, len as u8];
        p.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        p.extend_from_slice(topic);
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&payload);
        let sent = Instant::now();
        let recorded = storming.load(Ordering::Relaxed);
        s.write_all(&p).await.context("send PUBLISH")?;
        let mut ack = [0u8; 4];
        s.read_exact(&mut ack).await.context("read PUBACK")?;
        if ack[0] != 0x40 || u16::from_be_bytes([ack[2], ack[3]]) != id {
            bail!("expected PUBACK {id}, got {ack:?}");
        }
        if recorded {
            h.record(u64::try_from(sent.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
        }
    }
    Ok(h)
}

/// The storm against one server at `addr`.
pub async fn measure(
    server: &'static str,
    addr: &str,
    n: usize,
    login: &Login,
) -> Result<StormReport> {
    let tag = std::process::id();
    let from = Sources::new();
    let login = Arc::new(login.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let storming = Arc::new(AtomicBool::new(false));
    let mut steady_set = JoinSet::new();
    for i in 0..STEADY {
        let s = open(addr, from, n + i, &format!("storm-steady-{tag}-{i}"), &login).await?;
        steady_set.spawn(steady(s, Arc::clone(&storming), Arc::clone(&stop)));
    }
    // Let the steady clients settle before the storm.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let permits = Arc::new(Semaphore::new(STORM_CONCURRENCY));
    let mut set = JoinSet::new();
    let mut streams = Vec::with_capacity(n);
    let mut refused = 0usize;
    let start = Instant::now();
    storming.store(true, Ordering::Relaxed);
    let storm = tokio::time::timeout(STORM_TIMEOUT, async {
        for i in 0..n {
            let permit = Arc::clone(&permits).acquire_owned().await?;
            let addr = addr.to_owned();
            let login = Arc::clone(&login);
            set.spawn(async move {
                let r = open(&addr, from, i, &format!("storm-{tag}-{i}"), &login).await;
                drop(permit);
                r
            });
            while let Some(r) = set.try_join_next() {
                match r? {
                    Ok(s) => streams.push(s),
                    Err(_) => refused += 1,
                }
            }
        }
        while let Some(r) = set.join_next().await {
            match r? {
                Ok(s) => streams.push(s),
                Err(_) => refused += 1,
            }
        }
        anyhow::Ok(())
    })
    .await;
    let seconds = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    while let Some(h) = steady_set.join_next().await {
        all.add(h??)?;
    }
    match storm {
        Ok(r) => r?,
        Err(_) => bail!("{server}: the storm took longer than {STORM_TIMEOUT:?}"),
    }
    drop(streams);
    let ms = |v: u64| v as f64 / 1e6;
    Ok(StormReport {
        server,
        connections: n,
        seconds,
        refused,
        acks: all.len(),
        p50_ms: ms(all.value_at_quantile(0.5)),
        p99_ms: ms(all.value_at_quantile(0.99)),
        max_ms: ms(all.max()),
    })
}
