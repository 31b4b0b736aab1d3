//! `mqgate dead-letters ...`: the operator's side of the admin API's dead-letter routes.
//!
//! Talks HTTP to a running gateway (never opens the store itself: the gateway holds its lock),
//! prints a readable table or the API's JSON (`--json`), and exits non-zero with a clear
//! message when the gateway cannot be reached, an id or target is unknown, or a replay fails.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

/// What to do.
#[derive(Debug, Clone)]
pub enum Action {
    /// One page of the list.
    List {
        /// Only letters with ids above this.
        after: Option<u64>,
        /// At most this many.
        limit: Option<u64>,
    },
    /// One letter in full.
    Show(u64),
    /// Replay one letter (`Some`) or all (`None`), to `to` or each one's own target; `rule`
    /// and `target` filter a replay of all.
    Replay { id: Option<u64>, to: Option<String>, rule: Option<String>, target: Option<String> },
    /// Remove one letter (`Some`) or all.
    Purge(Option<u64>),
}

/// Why a command failed; printed as is, exit status 1.
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The admin API's base URL for a listen address (`0.0.0.0` and `::` mean this host).
pub fn admin_url(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    format!("http://{ip}:{}", listen.port())
}

/// Runs `action` against the admin API at `base`; returns what to print on stdout.
pub async fn run(base: &str, action: &Action, json: bool) -> Result<String, CliError> {
    let base = base.trim_end_matches('/');
    let client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| CliError(format!("cannot build an HTTP client: {e}")))?;
    let (method, path, body) = match action {
        Action::List { after, limit } => {
            let mut q = Vec::new();
            if let Some(a) = after {
                q.push(format!("after={a}"));
            }
            if let Some(l) = limit {
                q.push(format!("limit={l}"));
            }
            let q = if q.is_empty() { String::new() } else { format!("?{}", q.join("&")) };
            (reqwest::Method::GET, format!("/dead-letters{q}"), None)
        }
        Action::Show(id) => (reqwest::Method::GET, format!("/dead-letters/{id}"), None),
        Action::Replay { id, to, rule, target } => {
            let mut body = serde_json::Map::new();
            for (k, v) in [("to", to), ("rule", rule), ("target", target)] {
                if let Some(v) = v {
                    body.insert(k.to_owned(), v.clone().into());
                }
            }
            let path = match id {
                Some(id) => format!("/dead-letters/{id}/replay"),
                None => "/dead-letters/replay".to_owned(),
            };
            (reqwest::Method::POST, path, Some(Value::Object(body).to_string()))
        }
        Action::Purge(Some(id)) => (reqwest::Method::DELETE, format!("/dead-letters/{id}"), None),
        Action::Purge(None) => (reqwest::Method::DELETE, "/dead-letters".to_owned(), None),
    };
    let url = format!("{base}{path}");
    let mut req = client.request(method.clone(), &url);
    if let Some(token) = std::env::var("MQGATE_ADMIN_TOKEN").ok().filter(|t| !t.is_empty()) {
        req = req.bearer_auth(token);
    }
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    } else if method != reqwest::Method::GET {
        // Every write to the admin API is JSON (its cross-site guard).
        req = req.header("content-type", "application/json");
    }
    let resp = req.send().await.map_err(|e| {
        CliError(format!(
            "cannot reach the mqgate admin API at {base}: {} (is mqgate running? give its \
             admin address with --admin URL or its config with --config FILE)",
            root_cause(&e)
        ))
    })?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| CliError(format!("{url}: the answer could not be read: {e}")))?;
    let value: Value = serde_json::from_str(&text).map_err(|_| {
        CliError(format!("{url}: HTTP {status}, not a dead-letter API answer: {}", text.trim()))
    })?;
    // A replay that failed again answers 502 with its result: shown, then exit 1.
    let replay_failed = matches!(action, Action::Replay { id: Some(_), .. })
        && status == reqwest::StatusCode::BAD_GATEWAY;
    if !status.is_success() && !replay_failed {
        let msg = value.get("error").and_then(Value::as_str).unwrap_or(text.trim());
        return Err(CliError(format!("{msg} (HTTP {})", status.as_u16())));
    }
    let out = if json { text.clone() } else { render(action, &value) };
    let replay_failed =
        replay_failed || value.get("failed").and_then(Value::as_u64).is_some_and(|n| n > 0);
    if replay_failed {
        return Err(CliError(out.trim_end().to_owned()));
    }
    Ok(out)
}

/// The innermost cause of a request error (reqwest's own message hides it).
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The readable form of an answer.
fn render(action: &Action, v: &Value) -> String {
    match action {
        Action::List { .. } => render_list(v),
        Action::Show(_) => render_show(v),
        Action::Replay { id: Some(_), .. } => render_replayed(v),
        Action::Replay { id: None, .. } => {
            let mut out = format!(
                "replayed: {} delivered, {} failed\n",
                num(v, "delivered"),
                num(v, "failed")
            );
            for r in v.get("results").and_then(Value::as_array).into_iter().flatten() {
                out.push_str(&render_replayed(r));
            }
            out
        }
        Action::Purge(Some(id)) => format!("removed dead letter {id}\n"),
        Action::Purge(None) => format!("removed {} dead letters\n", num(v, "removed")),
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn render_replayed(r: &Value) -> String {
    let (id, to) = (num(r, "id"), text(r, "to"));
    if r.get("spooled").and_then(Value::as_bool) == Some(true) {
        format!("{id}: spooled for {to} (removed; the spool forwards it)\n")
    } else if r.get("delivered").and_then(Value::as_bool) == Some(true) {
        format!("{id}: delivered to {to} (removed)\n")
    } else {
        format!("{id}: not delivered: {} (kept)\n", text(r, "reason"))
    }
}

fn render_list(v: &Value) -> String {
    let empty = Vec::new();
    let letters = v.get("dead_letters").and_then(Value::as_array).unwrap_or(&empty);
    if letters.is_empty() {
        return format!("no dead letters ({} kept)\n", num(v, "count"));
    }
    let header = ["ID", "FAILED AT (UTC)", "RULE", "TARGET", "TOPIC", "QOS", "BYTES", "REASON"];
    let rows: Vec<[String; 8]> = letters
        .iter()
        .map(|l| {
            [
                num(l, "id").to_string(),
                text(l, "failed_at").replace('T', " ").chars().take(19).collect(),
                clip(text(l, "rule"), 24),
                clip(text(l, "target"), 24),
                clip(text(l, "topic"), 40),
                num(l, "qos").to_string(),
                num(l, "payload_bytes").to_string(),
                clip(text(l, "reason"), 80),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    let shown = letters.len();
    match v.get("next_after").and_then(Value::as_u64) {
        Some(next) => out
            .push_str(&format!("{shown} of {} shown; more with --after {next}\n", num(v, "count"))),
        None => out.push_str(&format!("{shown} of {} shown\n", num(v, "count"))),
    }
    out
}

fn render_show(v: &Value) -> String {
    let mut out = String::new();
    let mut field = |k: &str, val: String| out.push_str(&format!("{k:<16}{val}\n"));
    field("id", num(v, "id").to_string());
    field("failed at", text(v, "failed_at").to_owned());
    field("rule", text(v, "rule").to_owned());
    field("target", text(v, "target").to_owned());
    field("reason", text(v, "reason").to_owned());
    field("topic", text(v, "topic").to_owned());
    field("qos", num(v, "qos").to_string());
    field("retain", v.get("retain").and_then(Value::as_bool).unwrap_or(false).to_string());
    field("client id", text(v, "client_id").to_owned());
    if let Some(u) = v.get("username").and_then(Value::as_str) {
        field("username", u.to_owned());
    }
    if let Some(p) = v.get("packet_id").and_then(Value::as_u64) {
        field("packet id", p.to_string());
    }
    field("received at", text(v, "received_at").to_owned());
    if let Some(props) = v.get("properties").and_then(Value::as_object) {
        for (k, val) in props {
            match val {
                Value::Null => {}
                Value::Array(a) if a.is_empty() => {}
                Value::String(s) => field(k, s.clone()),
                other => field(k, other.to_string()),
            }
        }
    }
    field("payload bytes", num(v, "payload_bytes").to_string());
    match v.get("payload_utf8").and_then(Value::as_str) {
        Some(t) => field("payload", t.to_owned()),
        None => field("payload (base64)", text(v, "payload_base64").to_owned()),
    }
    out
}

/// `s` cut to `max` characters (with `…`).
fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_point_at_this_host() {
        assert_eq!(admin_url("0.0.0.0:9090".parse().expect("addr")), "http://127.0.0.1:9090");
        assert_eq!(admin_url("10.0.0.5:80".parse().expect("addr")), "http://10.0.0.5:80");
        assert_eq!(admin_url("[::]:9090".parse().expect("addr")), "http://[::1]:9090");
    }

    #[test]
    fn a_list_is_a_table_with_a_next_page_hint() {
        let v = serde_json::json!({
            "count": 3,
            "next_after": 2,
            "dead_letters": [
                {"id": 1, "failed_at": "2026-11-26T12:05:09.123Z", "rule": "r", "target": "r/0",
                 "topic": "a/b", "qos": 1, "payload_bytes": 3, "reason": "nacked by broker"},
                {"id": 2, "failed_at": "2026-11-26T12:05:10.000Z", "rule": "r", "target": "r/1",
                 "topic": "a/c", "qos": 0, "payload_bytes": 0, "reason": "HTTP 404"}
            ]
        });
        let out = render_list(&v);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("ID  FAILED AT (UTC)"), "{out}");
        assert!(lines[1].contains("2026-11-26 12:05:09") && lines[1].ends_with("nacked by broker"));
        assert!(lines[3].contains("--after 2"), "{out}");
    }
}
