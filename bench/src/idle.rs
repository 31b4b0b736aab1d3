//! `--mode idle`: opens N idle MQTT 3.1.1 connections (CONNECT, CONNACK, then nothing;
//! keepalive 0 unless `--keepalive`) to a server process and reports its resident memory per
//! connection (VmRSS delta over N) and the rate at which they were accepted (connections/s
//! from the first connect to the last CONNACK).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::stats::json_str;

/// Connections being opened at once.
const CONCURRENCY: usize = 256;
/// Longest the whole opening phase may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Time given to the server to settle before its RSS is read.
const SETTLE: Duration = Duration::from_secs(2);

/// What one server did with N idle connections.
pub struct IdleReport {
    pub server: &'static str,
    pub connections: usize,
    pub seconds: f64,
    pub rss_before_kb: u64,
    pub rss_after_kb: u64,
}

impl IdleReport {
    pub fn per_connection_bytes(&self) -> f64 {
        self.rss_after_kb.saturating_sub(self.rss_before_kb) as f64 * 1024.0
            / self.connections.max(1) as f64
    }

    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.connections as f64 / self.seconds
        } else {
            0.0
        }
    }

    pub fn text_line(&self) -> String {
        format!(
            "{:<10} {:>7} conns in {:>6.2} s = {:>8.0} conn/s; RSS {:>7} -> {:>7} KiB = {:>6.0} B/conn",
            self.server,
            self.connections,
            self.seconds,
            self.rate(),
            self.rss_before_kb,
            self.rss_after_kb,
            self.per_connection_bytes()
        )
    }

    pub fn json(&self) -> String {
        format!(
            "{{\"server\":{},\"connections\":{},\"seconds\":{:.3},\"conn_per_s\":{:.0},\
             \"rss_before_kb\":{},\"rss_after_kb\":{},\"bytes_per_conn\":{:.0}}}",
            json_str(self.server),
            self.connections,
            self.seconds,
            self.rate(),
            self.rss_before_kb,
            self.rss_after_kb,
            self.per_connection_bytes()
        )
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kb(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))
}

/// CONNECT, MQTT 3.1.1, clean session, `keepalive` seconds (0: idle for as long as we like;
/// otherwise the run must end before 1.5 × keepalive).
fn encode_connect(client_id: &str, keepalive: u16) -> Vec<u8> {
    let len = 10 + 2 + client_id.len();
    let [ka_hi, ka_lo] = keepalive.to_be_bytes();
    let mut out = vec![0x10, len as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, ka_hi, ka_lo];
    out.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    out.extend_from_slice(client_id.as_bytes());
    out
}

/// Opens one connection and waits for a successful CONNACK.
async fn open_one(addr: &str, client_id: &str, keepalive: u16) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await.with_context(|| format!("connect to {addr}"))?;
    s.write_all(&encode_connect(client_id, keepalive)).await.context("send CONNECT")?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.context("read CONNACK")?;
    if connack[0] >> 4 != 2 || connack[3] != 0 {
        bail!("bad CONNACK {connack:?}");
    }
    Ok(s)
}

/// Opens `n` idle connections to `addr` (served by process `pid`), reads the server's RSS,
/// then closes them all.
pub async fn measure(
    server: &'static str,
    addr: &str,
    pid: u32,
    n: usize,
    keepalive: u16,
) -> Result<IdleReport> {
    let rss_before_kb = rss_kb(pid)?;
    let tag = std::process::id();
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut set = JoinSet::new();
    let mut streams = Vec::with_capacity(n);
    let start = Instant::now();
    let opened = timeout(OPEN_TIMEOUT, async {
        for i in 0..n {
            let permit = Arc::clone(&permits).acquire_owned().await?;
            let addr = addr.to_owned();
            set.spawn(async move {
                let r = open_one(&addr, &format!("idle-{tag}-{i}"), keepalive).await;
                drop(permit);
                r
            });
            while let Some(r) = set.try_join_next() {
                streams.push(r??);
            }
        }
        while let Some(r) = set.join_next().await {
            streams.push(r??);
        }
        anyhow::Ok(())
    })
    .await;
    let seconds = start.elapsed().as_secs_f64();
    match opened {
        Ok(r) => r.with_context(|| format!("{server}: after {} connections", streams.len()))?,
        Err(_) => {
            bail!("{server}: only {} of {n} connections within {OPEN_TIMEOUT:?}", streams.len())
        }
    }
    tokio::time::sleep(SETTLE).await;
    let rss_after_kb = rss_kb(pid)?;
    // Make sure the server still holds them: one more round trip would need a protocol
    // exchange; a closed socket shows as readable EOF, so check that none is.
    let mut closed = 0;
    for s in &streams {
        let mut b = [0u8; 1];
        if let Ok(0) = s.try_read(&mut b) {
            closed += 1;
        }
    }
    drop(streams);
    if closed > 0 {
        bail!("{server}: {closed} of {n} idle connections were closed by the server");
    }
    Ok(IdleReport { server, connections: n, seconds, rss_before_kb, rss_after_kb })
}
