//! A Mosquitto of the bench's own: `mosquitto -p PORT` as a child process on a free loopback
//! port (never the machine's instance), stopped and reaped however the bench ends.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::net::TcpStream;

use super::gateway::free_port;

/// A running Mosquitto child; killed (and reaped) on drop.
pub struct Mosquitto {
    child: Child,
    pub addr: String,
}

impl Mosquitto {
    /// Starts `mosquitto -p PORT` (Debian package, local-only mode: anonymous on loopback) and
    /// waits until it accepts connections.
    pub async fn start() -> Result<Mosquitto> {
        let port = free_port()?;
        Mosquitto::spawn(&["-p".into(), port.to_string()], port).await
    }

    /// Starts `mosquitto -c CONF` (the TLS bench's listeners), waiting until `port` accepts.
    pub async fn start_conf(conf: &std::path::Path, port: u16) -> Result<Mosquitto> {
        Mosquitto::spawn(&["-c".into(), conf.display().to_string()], port).await
    }

    /// Spawns `mosquitto ARGS` and waits (10 s at most) until `port` accepts connections.
    async fn spawn(args: &[String], port: u16) -> Result<Mosquitto> {
        let child = Command::new("mosquitto")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn mosquitto (is the mosquitto package installed?)")?;
        let mut m = Mosquitto { child, addr: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = m.child.try_wait().context("poll mosquitto")? {
                bail!("mosquitto {args:?} exited with {status} before it was ready");
            }
            if TcpStream::connect(&m.addr).await.is_ok() {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                bail!("mosquitto not accepting on {} after 10 s", m.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The child's process id (for its RSS).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
