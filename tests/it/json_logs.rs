//! `mqgate run --log-format json`: the real binary's stdout is one JSON object per line (level,
//! target, message and the event's fields at the top level, the session span under `span`),
//! and a client id full of control characters stays escaped (`logtext::LogText`) inside it:
//! no raw newline or escape byte reaches the log, so a client cannot forge a line.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mqgate::mqtt::codec::{Packet, ProtocolVersion};
use serde_json::Value;

use crate::support::RawClient;

/// The gateway's stdout, line by line, read on a thread of its own.
struct LogLines {
    rx: mpsc::Receiver<String>,
    /// Every line read so far, for the failure messages.
    seen: Vec<String>,
}

impl LogLines {
    fn new(child: &mut Child) -> LogLines {
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        LogLines { rx, seen: Vec::new() }
    }

    /// The first line (parsed; every line read on the way must parse too) whose `message` is
    /// `message`, within 10 s.
    fn until(&mut self, message: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = self.rx.recv_timeout(left) else {
                panic!("no log line {message:?} within 10 s; got:\n{}", self.seen.join("\n"))
            };
            self.seen.push(line.clone());
            let v = parse_line(&line);
            if v["message"] == message {
                return v;
            }
        }
    }

    /// The remaining lines, until the process closes its stdout.
    fn rest(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(line) = self.rx.recv_timeout(Duration::from_secs(15)) {
            self.seen.push(line.clone());
            out.push(parse_line(&line));
        }
        out
    }
}

/// One log line as JSON: an object with a level, a target and a message.
fn parse_line(line: &str) -> Value {
    assert!(
        !line.chars().any(|c| c.is_control()),
        "a raw control character in a log line: {line:?}"
    );
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line:?}"));
    for field in ["timestamp", "level", "target", "message"] {
        assert!(v[field].is_string(), "no string {field:?} in {line}");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse_and_keep_client_text_escaped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mqgate.yaml");
    std::fs::write(
        &config,
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n",
    )
    .expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start mqgate");
    let mut logs = LogLines::new(&mut child);

    let started = logs.until("mqgate started");
    assert_eq!(started["level"], "INFO", "{started}");
    assert!(started["target"].as_str().is_some_and(|t| t.starts_with("mqgate")), "{started}");
    let addr: std::net::SocketAddr = started["mqtt_addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no mqtt_addr field with the bound address: {started}"));

    // A client id that would forge a log line and colour a terminal if written raw.
    let client_id = "dev\n{\"level\":\"ERROR\",\"message\":\"forged\"}\r\u{1b}[31m\\";
    let mut client = RawClient::connect(addr, ProtocolVersion::V5, client_id).await;
    let connected = logs.until("client connected");
    assert_eq!(connected["level"], "INFO", "{connected}");
    assert_eq!(connected["span"]["name"], "session", "{connected}");
    assert_eq!(
        connected["span"]["client_id"],
        mqgate::logtext::LogText(client_id).to_string(),
        "the client id as LogText escapes it: {connected}"
    );
    assert_eq!(
        connected["span"]["client_id"],
        "dev\\n{\"level\":\"ERROR\",\"message\":\"forged\"}\\r\\u{1b}[31m\\\\",
        "{connected}"
    );
    client.send(&Packet::Disconnect(Box::default())).await;
    logs.until("client disconnected");

    // SIGTERM: a graceful stop, logged in JSON to the end.
    let status =
        Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill -TERM");
    assert!(status.success());
    let rest = logs.rest();
    assert!(
        rest.iter().any(|v| v["message"] == "mqgate stopped"),
        "no \"mqgate stopped\" line:\n{}",
        logs.seen.join("\n")
    );
    let exit = child.wait().expect("wait for mqgate");
    assert!(exit.success(), "mqgate exited with {exit}");
    assert!(
        !logs.seen.iter().any(|l| l.contains("forged") && !l.contains("client_id")),
        "the forged line appeared on its own"
    );
}

#[test]
fn text_is_the_default_and_unknown_formats_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["run", "--log-format", "xml", "--config", "config/mqgate.yaml"])
        .output()
        .expect("run mqgate");
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("text") && err.contains("json"), "names the formats: {err}");
    let help = Command::new(env!("CARGO_BIN_EXE_mqgate"))
        .args(["run", "--help"])
        .output()
        .expect("run mqgate");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--log-format") && help.contains("default: text"), "{help}");
}
