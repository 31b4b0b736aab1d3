//! Spawning mqgate for a bench: a temp config on free ports, the child
//! process with its output in a log file, readiness by polling `/readyz`,
//! and a guard that stops the child however the bench ends.

use std::fs::{self, File};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::stats::json_str;

/// A running mqgate child; stopped (and reaped) on drop.
pub struct Gateway {
    child: Option<Child>,
    pub mqtt_addr: String,
    pub admin_addr: String,
    pub log_path: PathBuf,
    dir: PathBuf,
}

/// Settings of the spawned gateway.
pub struct GatewaySpec<'a> {
    pub binary: &'a Path,
    pub amqp_url: &'a str,
    pub exchange: &'a str,
    pub receive_maximum: usize,
    /// `mqtt.max_connections`.
    pub max_connections: usize,
    /// `mqtt.outbound_queue`: messages queued for one subscriber before new ones are dropped.
    pub outbound_queue: usize,
    pub ready_timeout: Duration,
    /// `--mode spool`: the store directory, for the `ack: spool` rule (see [`spool_yaml`]).
    pub store: Option<&'a Path>,
    /// Lines added to the `mqtt:` section (indented two spaces, each ending in a newline).
    pub extra_mqtt: &'a str,
    /// `--mode bridge`: the upstream broker (`host:port`) of a bridge `up`, and a rule sending
    /// `mqgate-bench/#` to it at QoS 1.
    pub bridge_to: Option<String>,
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind a free port")?;
    Ok(listener.local_addr().context("read the free port")?.port())
}

/// Topic prefix of `--mode templates`' templated runs: `benchT/<i>`, matched only by the
/// templated rule.
pub const TEMPLATED_PREFIX: &str = "benchT";

/// Topic prefix of `--mode spool`'s spooled runs: `benchS/<i>`, matched only by the
/// `ack: spool` rule.
pub const SPOOL_PREFIX: &str = "benchS";

/// What `--mode spool` adds to [`config_yaml`]: a store in `store`, and a rule that spools
/// every `benchS/#` message (acknowledged once fsynced into the spool) and forwards it to
/// `exchange` with the routing key `bench.s`, so the run's consumer gets them too.
pub fn spool_yaml(store: &Path, exchange: &str) -> String {
    format!(
        "\x20 - name: bench-spool\n    from: \"{SPOOL_PREFIX}/#\"\n    ack: spool\n    spool:\n      replay_rate: 0\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: {}\n          routing_key: \"bench.s\"\n\
         store:\n  path: {}\n",
        json_str(exchange),
        json_str(&store.display().to_string()),
    )
}

/// The gateway config for a bench: every `bench/#` topic to `exchange` (a plain rule), and
/// every `benchT/#` topic to the same exchange through a rule with a `when:` condition and a
/// `routing_key` template that give the same routing as the plain one (`bench.<i>`).
pub fn config_yaml(
    mqtt: &str,
    admin: &str,
    amqp_url: &str,
    exchange: &str,
    rx_max: usize,
    max_connections: usize,
    outbound_queue: usize,
) -> String {
    // JSON strings are valid YAML double-quoted scalars.
    format!(
        "# Written by mqgate-bench.\n\
         mqtt:\n  listen: {}\n  receive_maximum: {rx_max}\n  max_connections: {max_connections}\n  outbound_queue: {outbound_queue}\n\
         admin:\n  listen: {}\n\
         amqp:\n  rabbit:\n    url: {}\n\
         rules:\n  - name: bench\n    from: \"bench/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: {}\n\
         \x20 - name: bench-templated\n    from: \"{TEMPLATED_PREFIX}/+\"\n    when: \"qos < 2 and levels[0] == '{TEMPLATED_PREFIX}' and not retain\"\n    to:\n      - amqp:\n          broker: rabbit\n          exchange: {}\n          routing_key: \"bench.{{{{ levels[1] }}}}\"\n",
        json_str(mqtt),
        json_str(admin),
        json_str(amqp_url),
        json_str(exchange),
        json_str(exchange),
    )
}

impl Gateway {
    /// Writes the config, starts mqgate and waits until `/readyz` says 200.
    pub async fn start(spec: &GatewaySpec<'_>) -> Result<Gateway> {
        Gateway::start_with(spec.binary, spec.ready_timeout, |mqtt_addr, admin_addr| {
            let mut yaml = config_yaml(
                mqtt_addr,
                admin_addr,
                spec.amqp_url,
                spec.exchange,
                spec.receive_maximum,
                spec.max_connections,
                spec.outbound_queue,
            );
            if let Some(store) = spec.store {
                yaml.push_str(&spool_yaml(store, spec.exchange));
            }
            if let Some(up) = &spec.bridge_to {
                yaml.push_str(&format!(
                    "  - name: bridged\n    from: \"mqgate-bench/#\"\n    to:\n      - mqtt: {{ bridge: up, qos: 1 }}\nbridges:\n  up:\n    url: \"mqtt://{up}\"\n    client_id: \"mqgate-bench-bridge\"\n    clean_start: true\n    connections: 4\n"
                ));
            }
            if !spec.extra_mqtt.is_empty() {
                yaml = yaml.replacen("admin:\n", &format!("{}admin:\n", spec.extra_mqtt), 1);
            }
            yaml
        })
        .await
    }

    /// Starts mqgate with the config `yaml(mqtt_addr, admin_addr)` returns (free ports are
    /// picked here) and waits until `/readyz` says 200.
    pub async fn start_with(
        binary: &Path,
        ready_timeout: Duration,
        yaml: impl FnOnce(&str, &str) -> String,
    ) -> Result<Gateway> {
        if !binary.is_file() {
            bail!(
                "mqgate binary {} not found (build it with `cargo build --release --bins`, \
                 pass --mqgate PATH, or use --mqtt-addr for a running gateway)",
                binary.display()
            );
        }
        let dir = std::env::temp_dir().join(format!("mqgate-bench-{}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mqtt_addr = format!("127.0.0.1:{}", free_port()?);
        let admin_addr = format!("127.0.0.1:{}", free_port()?);
        let config_path = dir.join("mqgate.yaml");
        fs::write(&config_path, yaml(&mqtt_addr, &admin_addr))
            .with_context(|| format!("write {}", config_path.display()))?;
        let log_path = dir.join("mqgate.log");
        let log =
            File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
        let log_err = log.try_clone().context("clone log file handle")?;
        // mqgate inherits the bench's environment: `MIMALLOC_PURGE_DELAY=0 mqgate-bench --mode
        // idle` measures idle memory with pages given back at once (docs/benchmarks.md).
        let child = Command::new(binary)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        let mut gw = Gateway { child: Some(child), mqtt_addr, admin_addr, log_path, dir };
        gw.wait_ready(ready_timeout).await?;
        Ok(gw)
    }

    async fn wait_ready(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("poll mqgate")? {
                    self.child = None;
                    bail!(
                        "mqgate exited with {status} before it was ready; log {}:\n{}",
                        self.log_path.display(),
                        self.log_tail(20)
                    );
                }
            }
            let last = match http_get_status(&self.admin_addr, "/readyz").await {
                Ok(200) => return Ok(()),
                Ok(code) => format!("/readyz answered {code}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "mqgate not ready after {limit:?} ({last}); log {}:\n{}",
                    self.log_path.display(),
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// CPU time (user + system) the child has used so far, from `/proc/PID/stat` (Linux; clock
    /// ticks of 10 ms, the USER_HZ of every mainstream Linux build). `None` when unreadable.
    pub fn cpu_time(&self) -> Option<Duration> {
        let pid = self.pid()?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces: fields are counted after its ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        Some(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `n` lines of mqgate's log.
    pub fn log_tail(&self, n: usize) -> String {
        match fs::read(&self.log_path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(n)..].join("\n")
            }
            Err(e) => format!("(cannot read log: {e})"),
        }
    }

    /// Whether mqgate is still running; `Err` with its exit status and log
    /// tail if it died.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = child.try_wait().context("poll mqgate")? {
                self.child = None;
                bail!(
                    "mqgate exited with {status} during the bench; log {}:\n{}",
                    self.log_path.display(),
                    self.log_tail(20)
                );
            }
        }
        Ok(())
    }

    /// Asks mqgate to stop (SIGTERM), waits up to `grace`, then kills it.
    /// Returns a note when the shutdown was not clean.
    pub async fn stop(mut self, grace: Duration) -> Option<String> {
        let mut child = self.child.take()?;
        let pid = child.id().to_string();
        let _ = Command::new("kill")
            .args(["-TERM", &pid])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        let note = loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => break None,
                Ok(Some(status)) => {
                    break Some(format!(
                        "mqgate exited with {status} on SIGTERM; log {}",
                        self.log_path.display()
                    ))
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Some(format!(
                        "mqgate did not exit within {grace:?} of SIGTERM and was killed; log {}",
                        self.log_path.display()
                    ));
                }
                Err(e) => break Some(format!("waiting for mqgate: {e}")),
            }
        };
        if note.is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
        note
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `GET path` over plain HTTP/1.0; returns the status code.
pub async fn http_get_status(addr: &str, path: &str) -> Result<u16> {
    let io = async {
        let mut stream =
            TcpStream::connect(addr).await.with_context(|| format!("connect to admin {addr}"))?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .context("send HTTP request")?;
        let mut response = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        // The status line is all that is needed.
        while !response.contains(&b'\n') && response.len() < 8192 {
            let n = stream.read(&mut chunk).await.context("read HTTP response")?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&chunk[..n]);
        }
        anyhow::Ok(response)
    };
    let response = timeout(Duration::from_secs(2), io)
        .await
        .map_err(|_| anyhow!("admin {addr} did not answer within 2 s"))??;
    let line = response.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next().and_then(|c| c.parse::<u16>().ok())) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => bail!("not an HTTP response from {addr}: {:?}", line.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_the_documented_shape() {
        let y =
            config_yaml("127.0.0.1:1", "127.0.0.1:2", "amqp://g:g@h/%2f", "ex-1", 1024, 500, 2000);
        assert!(y.contains(
            "mqtt:\n  listen: \"127.0.0.1:1\"\n  receive_maximum: 1024\n  max_connections: 500\n  outbound_queue: 2000\n"
        ));
        assert!(y.contains("admin:\n  listen: \"127.0.0.1:2\"\n"));
        assert!(y.contains("amqp:\n  rabbit:\n    url: \"amqp://g:g@h/%2f\"\n"));
        assert!(y.contains("from: \"bench/#\""));
        assert!(y.contains("          broker: rabbit\n          exchange: \"ex-1\"\n"));
        // What mqgate itself accepts, templated rule included (`--mode templates`).
        let config = mqgate::config::Config::parse(Path::new("bench.yaml"), &y)
            .unwrap_or_else(|e| panic!("bench config invalid: {e}\n{y}"));
        let templated = config.rules.iter().find(|r| r.name.value == "bench-templated");
        assert!(templated.is_some_and(|r| r.when.is_some()), "{y}");
        let spooled = format!("{y}{}", spool_yaml(Path::new("/tmp/x"), "ex-1"));
        let config = mqgate::config::Config::parse(Path::new("bench.yaml"), &spooled)
            .unwrap_or_else(|e| panic!("bench spool config invalid: {e}\n{spooled}"));
        let rule = config.rules.iter().find(|r| r.name.value == "bench-spool");
        assert!(rule.is_some_and(|r| r.ack_policy() == mqgate::config::AckPolicy::Spool));
        assert!(config.store.is_some());
    }

    #[tokio::test]
    async fn reads_http_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready").await.unwrap();
        });
        assert_eq!(http_get_status(&addr, "/readyz").await.unwrap(), 503);
        server.await.unwrap();
    }
}
