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

    /// Starts Mosquitto on a free loopback port with one user (`password_file`, made with
    /// `mosquitto_passwd`) and no anonymous clients; its files go to a temp directory.
    pub async fn start_with_user(user: &str, password: &str) -> Result<Mosquitto> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("mqgate-bench-mosq-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let passwd = dir.join("passwd");
        let status = Command::new("mosquitto_passwd")
            .arg("-c")
            .arg("-b")
            .arg(&passwd)
            .arg(user)
            .arg(password)
            .stdout(Stdio::null())
            .status()
            .context("run mosquitto_passwd")?;
        if !status.success() {
            bail!("mosquitto_passwd failed: {status}");
        }
        let conf = dir.join("mosquitto.conf");
        let text =
            format!("listener {port}\nallow_anonymous false\npassword_file {}\n", passwd.display());
        std::fs::write(&conf, text).with_context(|| format!("write {}", conf.display()))?;
        Mosquitto::start_conf(&conf, port).await
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
