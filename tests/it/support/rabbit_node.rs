//! A RabbitMQ node of the test's own, beside the machine's (never touched: not stopped, not
//! reconfigured, no plugin enabled on it). Debian's `rabbitmq-server` is started straight from
//! `/usr/lib/rabbitmq/bin` as the test's user (the `/usr/sbin` wrappers switch to the
//! `rabbitmq` user and lose the environment) with its own node name, spare ports, and its
//! home, cookie, config, plugins file, database and logs in a temporary folder; epmd is shared.
//! The node is stopped and its folder removed when the guard is dropped, a failed assertion
//! included. Starting one takes about 4 s on an idle machine.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::mosquitto::spare_port;

/// Where Debian puts the real scripts.
const BIN: &str = "/usr/lib/rabbitmq/bin";
/// How long a node may take to start on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// The files of the node's TLS listener (PEM).
pub struct NodeTls<'a> {
    /// The CA that client certificates must chain to.
    pub ca: &'a Path,
    /// The node's certificate.
    pub cert: &'a Path,
    /// Its private key.
    pub key: &'a Path,
}

/// A running node; stopped and removed on drop.
pub struct RabbitNode {
    /// The `rabbitmq-server` script (the Erlang VM is its child), leader of its own process group.
    child: Option<Child>,
    /// `mqgate-ext-<pid>-<n>@localhost`.
    pub name: String,
    /// The plain AMQP listener (127.0.0.1).
    pub amqp_port: u16,
    /// The TLS listener (127.0.0.1): `verify_peer`, `fail_if_no_peer_cert`.
    pub amqps_port: u16,
    /// Everything the node writes; removed on drop.
    dir: tempfile::TempDir,
    /// The environment its scripts (server and `rabbitmqctl`) run with.
    env: Vec<(&'static str, OsString)>,
}

/// The config: a plain listener and, with `tls`, a TLS listener with EXTERNAL (and PLAIN, for
/// the test's own setup connection on the plain port) with the client certificate's CN as the
/// user name.
fn config(amqp: u16, amqps: u16, tls: Option<&NodeTls<'_>>) -> String {
    let mut conf = format!("listeners.tcp.1 = 127.0.0.1:{amqp}\nlog.file.level = info\n");
    if let Some(tls) = tls {
        conf.push_str(&format!(
            "listeners.ssl.1 = 127.0.0.1:{amqps}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n\
             auth_mechanisms.1 = EXTERNAL\n\
             auth_mechanisms.2 = PLAIN\n\
             ssl_cert_login_from = common_name\n",
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display(),
        ));
    }
    conf
}

impl RabbitNode {
    /// Starts a node with the `rabbitmq_auth_mechanism_ssl` plugin and a TLS listener from
    /// `tls`; returns once it has booted. Fails the test loudly when RabbitMQ is not installed
    /// or the node does not come up (with the node's log).
    pub fn start(tls: NodeTls<'_>) -> RabbitNode {
        RabbitNode::start_with(Some(tls))
    }

    /// Starts a node with a plain AMQP listener only (no plugin).
    pub fn start_plain() -> RabbitNode {
        RabbitNode::start_with(None)
    }

    fn start_with(tls: Option<NodeTls<'_>>) -> RabbitNode {
        assert!(
            Path::new(BIN).join("rabbitmq-server").exists(),
            "{BIN}/rabbitmq-server is missing: install Debian's rabbitmq-server (scripts/test.sh does)"
        );
        static N: AtomicU32 = AtomicU32::new(0);
        let mut last_log = String::new();
        // A spare port may be taken between choosing and binding it: try again with others.
        for _ in 0..3 {
            let name = format!(
                "mqgate-ext-{}-{}@localhost",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let mut node = RabbitNode::spawn(name, tls.as_ref());
            match node.wait_booted() {
                Ok(()) => return node,
                Err(log) if log.contains("eaddrinuse") => last_log = log,
                Err(log) => panic!("RabbitMQ node {} did not start:\n{log}", node.name),
            }
        }
        panic!("RabbitMQ node did not start (ports in use):\n{last_log}");
    }

    fn spawn(name: String, tls: Option<&NodeTls<'_>>) -> RabbitNode {
        let dir = tempfile::Builder::new().prefix("mqgate-rabbit-").tempdir().expect("temp dir");
        let path = |p: &str| dir.path().join(p);
        let (amqp_port, amqps_port, dist_port) = (spare_port(), spare_port(), spare_port());
        for d in ["home", "mnesia", "log"] {
            std::fs::create_dir(path(d)).expect("node folder");
        }
        // A cookie of its own (the CLI finds it through HOME): nothing written to ~.
        let cookie = path("home/.erlang.cookie");
        std::fs::write(&cookie, super::unique("cookie").replace('-', "")).expect("cookie");
        std::fs::set_permissions(&cookie, std::os::unix::fs::PermissionsExt::from_mode(0o400))
            .expect("cookie mode");
        std::fs::write(path("rabbitmq.conf"), config(amqp_port, amqps_port, tls)).expect("conf");
        let plugins = if tls.is_some() { "[rabbitmq_auth_mechanism_ssl].\n" } else { "[].\n" };
        std::fs::write(path("enabled_plugins"), plugins).expect("plugins file");
        // Instead of /etc/rabbitmq/rabbitmq-env.conf (the machine node's name and flags).
        std::fs::write(path("rabbitmq-env.conf"), "").expect("env file");
        let env: Vec<(&'static str, OsString)> = vec![
            ("HOME", path("home").into()),
            ("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf").into()),
            ("RABBITMQ_NODENAME", name.clone().into()),
            ("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1".into()),
            ("RABBITMQ_NODE_PORT", amqp_port.to_string().into()),
            ("RABBITMQ_DIST_PORT", dist_port.to_string().into()),
            ("RABBITMQ_MNESIA_BASE", path("mnesia").into()),
            ("RABBITMQ_LOG_BASE", path("log").into()),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf").into()),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config").into()),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins").into()),
            ("ERL_EPMD_ADDRESS", "127.0.0.1".into()),
            (
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}".into(),
            ),
        ];
        let mut node = RabbitNode { child: None, name, amqp_port, amqps_port, dir, env };
        node.launch();
        node
    }

    /// Runs `rabbitmq-server` with the node's environment (its output appended to `server.out`).
    fn launch(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.out"))
            .expect("server output file");
        let child = Command::new(Path::new(BIN).join("rabbitmq-server"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("server output file"))
            .stderr(out)
            // Its own group: the Erlang VM, a child of the script, can be killed with it.
            .process_group(0)
            .spawn()
            .expect("spawn rabbitmq-server");
        self.child = Some(child);
    }

    /// Stops the node: every connection to it ends; durable queues and their messages stay
    /// for [`RabbitNode::start_again`].
    pub fn stop(&mut self) {
        self.stop_now();
    }

    /// Starts a stopped node again on the same ports with the same database; returns once it
    /// has booted.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the node is running");
        self.launch();
        if let Err(log) = self.wait_booted() {
            panic!("RabbitMQ node {} did not start again:\n{log}", self.name);
        }
    }

    /// A clean stop (the CLI returns once the node halts), then the process group if it is
    /// still there after 15 s.
    fn stop_now(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let _ = self.try_ctl(&["stop"]);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => {
                    // Still running (not reaped, so the group is still ours): the whole group.
                    let group = format!("-{}", child.id());
                    let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
                    let _ = child.wait();
                    return;
                }
                _ => return,
            }
        }
    }

    /// Waits for the AMQP port, then for the node to report it has booted. `Err(log)` when
    /// the server ended or the time ran out.
    fn wait_booted(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.amqp_port));
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("rabbitmq-server exited ({status})\n{}", self.logs()));
                }
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("not listening within {START_TIMEOUT:?}\n{}", self.logs()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        match self.try_ctl(&["await_startup", "--timeout", "60"]) {
            Ok(_) => Ok(()),
            Err(e) => Err(format!("{e}\n{}", self.logs())),
        }
    }

    /// `rabbitmqctl -n <node> ARGS`: stdout, or what went wrong.
    pub fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(Path::new(BIN).join("rabbitmqctl"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path())
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "rabbitmqctl {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `rabbitmqctl -n <node> ARGS`; fails the test when it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adds `user` with every permission on `/` and no password: it can only log in with a
    /// certificate naming it (EXTERNAL).
    pub fn add_certificate_user(&self, user: &str) {
        self.ctl(&["add_user", user, &super::unique("unused-password")]);
        self.ctl(&["clear_password", user]);
        self.ctl(&["set_permissions", "-p", "/", user, ".*", ".*", ".*"]);
    }

    /// A PLAIN URL for the plain listener (the node's default `guest`, loopback only).
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The server's output and the node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut text =
            std::fs::read_to_string(self.dir.path().join("server.out")).unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) {
            for e in entries.flatten() {
                let p: PathBuf = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    text.push_str(&format!("\n--- {}\n", p.display()));
                    text.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
                }
            }
        }
        text
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        self.stop_now();
    }
}
