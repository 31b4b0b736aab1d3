//! `--mode tls`: devices on a real network, mqgate against a Mosquitto the bench spawns with
//! the same certificates (made here: one ECDSA P-256 CA, an ECDSA P-256 and an RSA 2048 server
//! certificate), in one run:
//!
//! * new TLS connections per second up to CONNACK (full handshakes, `--tls-connections` per
//!   server and key type, 64 at a time);
//! * QoS 1 fan-in (`--publishers` → 1 subscriber) through mqgate over plain TCP, TLS,
//!   WebSocket and WebSocket over TLS, and through Mosquitto over TCP and TLS (medians of
//!   `--repeat` runs, alternating);
//! * resident memory per idle TLS connection (`--connections` per server).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, RsaKeySize,
    PKCS_RSA_SHA256,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::dial;
use super::idle::rss_kb;
use super::stats::RunReport;

/// Handshakes in progress at once in the connection-rate runs.
const CONCURRENCY: usize = 64;

/// The bench's certificate files.
pub struct Certs {
    /// The CA every client trusts.
    pub ca: PathBuf,
    /// ECDSA P-256 server certificate and key.
    pub ec: (PathBuf, PathBuf),
    /// RSA 2048 server certificate and key.
    pub rsa: (PathBuf, PathBuf),
}

impl Certs {
    /// Makes the CA and both server certificates in `dir`.
    pub fn make(dir: &Path) -> Result<Certs> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, "mqgate-bench CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem())?;
        let leaf = |name: &str, key: KeyPair| -> Result<(PathBuf, PathBuf)> {
            let params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
            let cert = params.signed_by(&key, &ca)?;
            let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
            std::fs::write(&c, cert.pem())?;
            std::fs::write(&k, key.serialize_pem())?;
            Ok((c, k))
        };
        let ec = leaf("server-ec", KeyPair::generate()?)?;
        let rsa =
            leaf("server-rsa", KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048)?)?;
        Ok(Certs { ca: ca_path, ec, rsa })
    }
}

/// The ports of the run: mqgate's extra listeners and the bench Mosquitto's listeners.
pub struct Ports {
    pub mqgate_tls_ec: u16,
    pub mqgate_tls_rsa: u16,
    pub mqgate_ws: u16,
    pub mqgate_wss: u16,
    pub mosquitto_tcp: u16,
    pub mosquitto_tls_ec: u16,
    pub mosquitto_tls_rsa: u16,
}

impl Ports {
    /// Free loopback ports.
    pub fn pick() -> Result<Ports> {
        let f = super::gateway::free_port;
        Ok(Ports {
            mqgate_tls_ec: f()?,
            mqgate_tls_rsa: f()?,
            mqgate_ws: f()?,
            mqgate_wss: f()?,
            mosquitto_tcp: f()?,
            mosquitto_tls_ec: f()?,
            mosquitto_tls_rsa: f()?,
        })
    }
}

/// mqgate's `mqtt.listeners` for the run (indented for the `mqtt:` section).
pub fn mqgate_listeners(p: &Ports, c: &Certs) -> String {
    let tls = |kind: &str, name: &str, port: u16, (cert, key): &(PathBuf, PathBuf)| {
        format!(
            "    - kind: {kind}\n      name: {name}\n      listen: \"127.0.0.1:{port}\"\n      tls:\n        cert: \"{}\"\n        key: \"{}\"\n",
            cert.display(),
            key.display()
        )
    };
    format!(
        "  listeners:\n{}{}    - kind: ws\n      name: ws\n      listen: \"127.0.0.1:{}\"\n{}",
        tls("tls", "tls-ec", p.mqgate_tls_ec, &c.ec),
        tls("tls", "tls-rsa", p.mqgate_tls_rsa, &c.rsa),
        p.mqgate_ws,
        tls("wss", "wss", p.mqgate_wss, &c.ec),
    )
}

/// The bench Mosquitto's config: plain TCP and both TLS listeners, anonymous, loopback only.
pub fn mosquitto_conf(p: &Ports, c: &Certs) -> String {
    format!(
        "per_listener_settings false\nallow_anonymous true\nmax_connections -1\n\
         listener {} 127.0.0.1\n\
         listener {} 127.0.0.1\ncertfile {}\nkeyfile {}\n\
         listener {} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
        p.mosquitto_tcp,
        p.mosquitto_tls_ec,
        c.ec.0.display(),
        c.ec.1.display(),
        p.mosquitto_tls_rsa,
        c.rsa.0.display(),
        c.rsa.1.display(),
    )
}

/// CONNECT (3.1.1, clean session, keepalive 0) for `id`.
fn connect_packet(id: &str) -> Vec<u8> {
    let len = 10 + 2 + id.len();
    let mut out = vec![0x10, len as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    out.extend_from_slice(&(id.len() as u16).to_be_bytes());
    out.extend_from_slice(id.as_bytes());
    out
}

/// Opens a connection to `addr` and completes CONNECT/CONNACK.
async fn connack(addr: &str, id: &str) -> Result<(dial::Rd, dial::Wr)> {
    let (mut rd, mut wr) = dial::open(addr).await?;
    wr.write_all(&connect_packet(id)).await?;
    wr.flush().await?;
    let mut ack = [0u8; 4];
    rd.read_exact(&mut ack).await.context("read CONNACK")?;
    if ack[0] >> 4 != 2 || ack[3] != 0 {
        bail!("{addr}: bad CONNACK {ack:?}");
    }
    Ok((rd, wr))
}

/// New connections per second to `addr`: `n` full handshakes up to CONNACK, closed again.
pub async fn connection_rate(addr: &str, n: usize, tag: &str) -> Result<f64> {
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut set = JoinSet::new();
    let start = Instant::now();
    for i in 0..n {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let (addr, id) = (addr.to_owned(), format!("rate-{tag}-{i}"));
        set.spawn(async move {
            let r = connack(&addr, &id).await.map(drop);
            drop(permit);
            r
        });
        while let Some(r) = set.try_join_next() {
            r??;
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Resident memory per idle connection of process `pid` holding `n` connections to `addr`
/// (bytes), and the connections' open rate.
pub async fn idle_memory(addr: &str, pid: u32, n: usize, tag: &str) -> Result<(f64, f64)> {
    let before = rss_kb(pid)?;
    let permits = Arc::new(Semaphore::new(CONCURRENCY * 4));
    let mut set = JoinSet::new();
    let mut held = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let permit = Arc::clone(&permits).acquire_owned().await?;
        let (addr, id) = (addr.to_owned(), format!("idle-{tag}-{i}"));
        set.spawn(async move {
            let r = connack(&addr, &id).await;
            drop(permit);
            r
        });
        while let Some(r) = set.try_join_next() {
            held.push(r??);
        }
    }
    while let Some(r) = set.join_next().await {
        held.push(r??);
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kb(pid)?;
    drop(held);
    Ok((after.saturating_sub(before) as f64 * 1024.0 / n as f64, rate))
}

/// The median delivered rate of `reports`.
pub fn median_rate(reports: &[RunReport]) -> f64 {
    let mut r: Vec<f64> = reports.iter().filter(|r| r.error.is_none()).map(|r| r.rate).collect();
    r.sort_by(f64::total_cmp);
    if r.is_empty() {
        0.0
    } else {
        r[r.len() / 2]
    }
}
