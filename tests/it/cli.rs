//! The `mqgate` binary: `check` and `run` refuse invalid configs with file, line and column, and
//! `run` names the address and the key when the MQTT port is taken.

use std::process::Command;

fn mqgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mqgate"))
}

#[test]
fn check_accepts_the_shipped_example() {
    let out = mqgate().args(["check", "--config", "config/mqgate.yaml"]).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn check_and_run_report_errors_with_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "mqtt:\n  listen: \"0.0.0.0:1883\"\nrules:\n  - name: r\n    from: \"a/#/b\"\n    to:\n      - amqp:\n          broker: missing\n          exchange: x\n",
    )
    .expect("write");
    for cmd in ["check", "run"] {
        let out = mqgate().args([cmd, "--config"]).arg(&path).output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{cmd} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        let file = path.display().to_string();
        assert!(err.contains(&format!("{file}:5:11:")), "{cmd}: {err}");
        assert!(err.contains(&format!("{file}:8:19:")), "{cmd}: {err}");
        assert!(err.contains("no broker \"missing\""), "{cmd}: {err}");
    }
}

#[test]
fn syntax_error_has_a_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("syntax.yaml");
    std::fs::write(&path, "mqtt:\n  listen: [unclosed\n").expect("write");
    let out = mqgate().args(["check", "--config"]).arg(&path).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with(&format!("{}:", path.display())), "{err}");
    assert!(!err.contains(":0:0:"), "position missing: {err}");
}

#[test]
fn run_names_the_address_and_key_when_the_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("taken.yaml");
    std::fs::write(
        &path,
        format!("mqtt:\n  listen: \"{addr}\"\nadmin:\n  listen: \"127.0.0.1:0\"\n"),
    )
    .expect("write");
    let out = mqgate().args(["run", "--config"]).arg(&path).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr.to_string()) && err.contains("mqtt.listen"), "{err}");
}
