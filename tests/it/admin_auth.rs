//! The admin API is protected: a bearer token, the Host header, no cross-site writes; a
//! non-loopback admin listener needs a token; `mqgate dead-letters` sends the token from
//! MQGATE_ADMIN_TOKEN (issue 13, item 6). Real HTTP over TCP, the real binary for the CLI.

use std::path::Path;

use crate::support::*;

const TOKEN: &str = "an-admin-token-0123456789";

/// One raw HTTP/1.0 request; (status, body).
async fn raw(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    let (status, _, body) = raw_http(addr, request).await;
    (status, body)
}

fn get(path: &str, host: &str, token: Option<&str>) -> String {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n{auth}\r\n")
}

fn write(method: &str, path: &str, host: &str, headers: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n{headers}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn config(dir: &Path, admin: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n{admin}store:\n  path: \"{}\"\n",
        dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_but_health_needs_the_token_and_the_right_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::env::set_var("MQGATE_TEST_ADMIN_TOKEN_A", TOKEN);
    let app = gateway(&config(dir.path(), "  token: \"${env:MQGATE_TEST_ADMIN_TOKEN_A}\"\n")).await;
    let a = app.admin_addr;
    let host = a.to_string();
    assert_eq!(raw(a, &get("/healthz", &host, None)).await.0, 200);
    assert_eq!(raw(a, &get("/readyz", "anything", None)).await.0, 200, "probes need no token");
    for path in ["/metrics", "/dead-letters"] {
        assert_eq!(raw(a, &get(path, &host, None)).await.0, 401, "{path} without a token");
        assert_eq!(raw(a, &get(path, &host, Some("wrong-token-0123456789"))).await.0, 401);
        assert_eq!(raw(a, &get(path, &host, Some(TOKEN))).await.0, 200, "{path}");
        // DNS rebinding: a page on another name that resolves to the gateway.
        assert_eq!(raw(a, &get(path, "evil.example:80", Some(TOKEN))).await.0, 421);
    }
    assert_eq!(
        raw(a, &get("/metrics", &format!("localhost:{}", a.port()), Some(TOKEN))).await.0,
        200
    );
    // Writes: JSON only, same origin or none.
    let purge = |headers: &str| write("DELETE", "/dead-letters", &host, headers, "");
    assert_eq!(raw(a, &purge("Content-Type: text/plain\r\n")).await.0, 415, "a form post");
    assert_eq!(raw(a, &purge("")).await.0, 415);
    let cross = "Content-Type: application/json\r\nOrigin: http://evil.example\r\n";
    assert_eq!(raw(a, &purge(cross)).await.0, 403);
    let same = format!("Content-Type: application/json\r\nOrigin: http://{host}\r\n");
    assert_eq!(raw(a, &purge(&same)).await.0, 200);
    assert_eq!(raw(a, &purge("Content-Type: application/json\r\n")).await.0, 200);
    let (_, m) = raw(a, &get("/metrics", &host, Some(TOKEN))).await;
    for (reason, n) in [("token", 4), ("host", 2), ("content_type", 2), ("origin", 1)] {
        let line = format!("mqgate_admin_refused_total{{reason=\"{reason}\"}} {n}");
        assert!(m.contains(&line), "{line}\n{m}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_metrics_and_an_open_loopback_api_without_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app =
        gateway(&config(dir.path(), &format!("  token: \"{TOKEN}\"\n  metrics_public: true\n")))
            .await;
    let host = app.admin_addr.to_string();
    assert_eq!(raw(app.admin_addr, &get("/metrics", &host, None)).await.0, 200);
    assert_eq!(raw(app.admin_addr, &get("/dead-letters", &host, None)).await.0, 401);
    app.stop().await;
    // No token: open, but only on loopback (the config refuses the rest), Host still checked.
    let app = gateway_on_store(&config(dir.path(), "")).await;
    let host = app.admin_addr.to_string();
    assert_eq!(raw(app.admin_addr, &get("/dead-letters", &host, None)).await.0, 200);
    assert_eq!(raw(app.admin_addr, &get("/dead-letters", "evil.example", None)).await.0, 421);
    app.stop().await;
}

#[test]
fn a_non_loopback_admin_listener_needs_a_token() {
    let text = "mqtt:\n  listen: \"127.0.0.1:1883\"\nadmin:\n  listen: \"0.0.0.0:9090\"\n";
    let e = mqgate::config::Config::parse(Path::new("a.yaml"), text).unwrap_err();
    assert!(e.to_string().starts_with("a.yaml:4:"), "{e}");
    assert!(e.to_string().contains("set admin.token"), "{e}");
    let ok = format!("{text}  token: \"{TOKEN}\"\n");
    mqgate::config::Config::parse(Path::new("a.yaml"), &ok).expect("with a token");
    let short = format!("{text}  token: short\n");
    let e = mqgate::config::Config::parse(Path::new("a.yaml"), &short).unwrap_err();
    assert!(e.to_string().contains("at least 16"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_the_token_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let app = gateway(&config(dir.path(), &format!("  token: \"{TOKEN}\"\n"))).await;
    let bin = env!("CARGO_BIN_EXE_mqgate");
    let url = format!("http://{}", app.admin_addr);
    let run = |token: Option<&str>| {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args(["dead-letters", "--admin", &url, "list"]);
        match token {
            Some(t) => cmd.env("MQGATE_ADMIN_TOKEN", t),
            None => cmd.env_remove("MQGATE_ADMIN_TOKEN"),
        };
        cmd.output()
    };
    let without = run(None).await.expect("run");
    assert!(!without.status.success(), "refused without the token");
    let with = run(Some(TOKEN)).await.expect("run");
    assert!(with.status.success(), "{}", String::from_utf8_lossy(&with.stderr));
    app.stop().await;
}
