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
    /// The server's CPU time (user and system, all threads) from the first connect to the
    /// last CONNACK, seconds: what the connections cost the server itself, whoever is the
    /// bottleneck of the rate (the client and the kernel's loopback handshakes share the
    /// machine).
    pub server_cpu: f64,
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

    /// Server CPU per connection, microseconds.
    pub fn cpu_us(&self) -> f64 {
        self.server_cpu * 1e6 / self.connections.max(1) as f64
    }

    pub fn text_line(&self) -> String {
        format!(
            "{:<10} {:>7} conns in {:>6.2} s = {:>8.0} conn/s, server CPU {:>5.1} us/conn; RSS {:>7} -> {:>7} KiB = {:>6.0} B/conn",
            self.server,
            self.connections,
            self.seconds,
            self.rate(),
            self.cpu_us(),
            self.rss_before_kb,
            self.rss_after_kb,
            self.per_connection_bytes()
        )
    }

    pub fn json(&self) -> String {
        format!(
            "{{\"server\":{},\"connections\":{},\"seconds\":{:.3},\"conn_per_s\":{:.0},\
             \"rss_before_kb\":{},\"rss_after_kb\":{},\"bytes_per_conn\":{:.0},\"server_cpu_us_per_conn\":{:.1}}}",
            json_str(self.server),
            self.connections,
            self.seconds,
            self.rate(),
            self.rss_before_kb,
            self.rss_after_kb,
            self.per_connection_bytes(),
            self.cpu_us()
        )
    }
}

/// The CPU time `pid` has used (user and system, all its threads), seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // After the command name (in parentheses, which may hold spaces): state is field 3,
    // utime and stime fields 14 and 15, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| anyhow!("bad stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<f64> {
        Ok(fields.get(i).and_then(|f| f.parse::<u64>().ok()).ok_or_else(|| anyhow!("bad stat"))?
            as f64)
    };
    Ok((tick(11)? + tick(12)?) / 100.0)
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

/// What the bench's idle and storm clients send: keepalive and, optionally, a user name and
/// password (`--credentials`).
#[derive(Clone, Debug, Default)]
pub struct Login {
    /// Seconds (0: none; otherwise the run must end before 1.5 × keepalive).
    pub keepalive: u16,
    /// User name and password.
    pub credentials: Option<(String, String)>,
    /// No warm-up login before the clock starts (`--cold-login`).
    pub cold: bool,
}

/// CONNECT, MQTT 3.1.1, clean session, with `login`'s keepalive and credentials.
pub fn encode_connect(client_id: &str, login: &Login) -> Vec<u8> {
    let mut flags = 0x02u8;
    let mut payload = Vec::with_capacity(64);
    let put = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    };
    put(&mut payload, client_id.as_bytes());
    if let Some((user, password)) = &login.credentials {
        flags |= 0xC0;
        put(&mut payload, user.as_bytes());
        put(&mut payload, password.as_bytes());
    }
    let [ka_hi, ka_lo] = login.keepalive.to_be_bytes();
    let variable = [0, 4, b'M', b'Q', b'T', b'T', 4, flags, ka_hi, ka_lo];
    let mut len = variable.len() + payload.len();
    let mut out = Vec::with_capacity(len + 5);
    out.push(0x10);
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&variable);
    out.extend_from_slice(&payload);
    out
}

/// Ports each source address gives out before the next address is used.
const PORTS_PER_ADDRESS: usize = 20_000;
/// The first source port (below Linux's ephemeral range, 32768 and up).
const FIRST_PORT: u16 = 10_000;

/// Where the bench's client sockets connect from: every connection gets its own source
/// address and port, chosen here (127.A.B.C, C moving on every 20,000 connections; A and B
/// random per run so that the TIME_WAIT sockets of an earlier run are not in the way).
/// Left to the kernel, `connect()` searches the ephemeral range for a free port, which
/// grows costly as thousands are in use (it was most of the client's time, and the client
/// shares the CPUs with the server measured); a port given explicitly costs a lookup.
/// Beyond one address's 28,000 ephemeral ports, this is also what lets one machine open
/// more connections to one server port.
#[derive(Clone, Copy, Debug)]
pub struct Sources {
    a: u8,
    b: u8,
}

impl Sources {
    /// A fresh block of source addresses.
    pub fn new() -> Sources {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let r = h.finish();
        Sources { a: 1 + (r % 250) as u8, b: ((r >> 8) % 256) as u8 }
    }

    /// Connection `i` to `addr` (a loopback address), from its own source address and port.
    /// A port that is taken (a listener there) falls back to one the kernel picks.
    pub async fn connect(&self, addr: &str, i: usize) -> Result<TcpStream> {
        let dest: std::net::SocketAddr =
            addr.parse().with_context(|| format!("not an address: {addr}"))?;
        let c = u8::try_from(1 + i / PORTS_PER_ADDRESS).context("too many connections")?;
        let ip = std::net::Ipv4Addr::new(127, self.a, self.b, c);
        let port = FIRST_PORT + (i % PORTS_PER_ADDRESS) as u16;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        let bound = socket.bind((ip, port).into()).or_else(|_| socket.bind((ip, 0).into()));
        bound.with_context(|| format!("bind {ip}"))?;
        socket.connect(dest).await.with_context(|| format!("connect to {addr} from {ip}:{port}"))
    }
}

/// Opens one connection and waits for a successful CONNACK.
async fn open_one(
    addr: &str,
    from: Sources,
    i: usize,
    client_id: &str,
    login: &Login,
) -> Result<TcpStream> {
    let mut s = from.connect(addr, i).await?;
    s.write_all(&encode_connect(client_id, login)).await.context("send CONNECT")?;
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
    login: &Login,
) -> Result<IdleReport> {
    let tag = std::process::id();
    let from = Sources::new();
    // With a password, one login first, not counted: mqgate's login cache then holds the
    // check (`mqtt.login_cache_size`), so the figures are those of clients reconnecting
    // within `login_cache_ttl`; the full argon2 cost is `--login-cache 0`, a restart's
    // reconnect `--cold-login`.
    let warm = match &login.credentials {
        Some(_) if !login.cold => {
            Some(open_one(addr, from, n, &format!("idle-{tag}-warm"), login).await?)
        }
        _ => None,
    };
    let rss_before_kb = rss_kb(pid)?;
    let cpu_before = cpu_seconds(pid)?;
    let login = Arc::new(login.clone());
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut set = JoinSet::new();
    let mut streams = Vec::with_capacity(n);
    let start = Instant::now();
    let opened = timeout(OPEN_TIMEOUT, async {
        for i in 0..n {
            let permit = Arc::clone(&permits).acquire_owned().await?;
            let addr = addr.to_owned();
            let login = Arc::clone(&login);
            set.spawn(async move {
                let r = open_one(&addr, from, i, &format!("idle-{tag}-{i}"), &login).await;
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
    let server_cpu = cpu_seconds(pid)? - cpu_before;
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
    drop(warm);
    if closed > 0 {
        bail!("{server}: {closed} of {n} idle connections were closed by the server");
    }
    Ok(IdleReport { server, connections: n, seconds, rss_before_kb, rss_after_kb, server_cpu })
}
