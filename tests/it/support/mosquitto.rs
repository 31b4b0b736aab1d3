//! A Mosquitto of the test's own (Debian's `mosquitto`), on a spare loopback port, with its
//! own config and persistence folder: never the machine's instance on 1883. Stopped with
//! SIGTERM (it saves its persistence file) and restartable on the same port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// A running (or stopped) test Mosquitto.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A port free right now on loopback.
pub fn spare_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a spare port")
}

impl Mosquitto {
    /// Starts Mosquitto with `extra` config lines after `listener PORT 127.0.0.1`,
    /// anonymous clients allowed and persistence in `dir`.
    pub async fn start(dir: &Path, extra: &str) -> Mosquitto {
        let port = spare_port();
        let conf = dir.join(format!("mosquitto-{port}.conf"));
        let data = dir.join(format!("mosquitto-{port}-data/"));
        std::fs::create_dir_all(&data).expect("mosquitto data dir");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\n{user}persistence true\npersistence_location {}/\nautosave_interval 1\nmax_queued_messages 100000\nmax_inflight_messages 1000\n{extra}",
                data.display(),
                // Started as root, Mosquitto would switch to its own user, which cannot
                // write the test's private folder.
                user = if is_root() { "user root\n" } else { "" },
            ),
        )
        .expect("mosquitto conf");
        let mut m = Mosquitto { child: None, port, conf };
        m.restart().await;
        m
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Starts it again (after [`stop`](Self::stop)) on the same port and persistence.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = Command::new("mosquitto")
                .arg("-c")
                .arg(&self.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn mosquitto (is the mosquitto package installed? scripts/test.sh installs it)");
            loop {
                if TcpStream::connect(self.addr()).await.is_ok() {
                    self.child = Some(child);
                    return;
                }
                if let Ok(Some(_)) = child.try_wait() {
                    // The port may still be held by the previous instance's sockets: retry.
                    break;
                }
                assert!(Instant::now() < deadline, "mosquitto not accepting on {}", self.port);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(Instant::now() < deadline, "mosquitto did not start on {}", self.port);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM (Mosquitto saves its persistence) and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (5 s at most) until `addr` accepts connections (a second listener of a Mosquitto).
pub async fn wait_port(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "nothing accepting on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
