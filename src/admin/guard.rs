//! The admin API's door: every request passes here first (an axum middleware).
//!
//! - **Host**: the `Host` header must name this server (loopback names, the listen address,
//!   `admin.allowed_hosts`): a page on another site that resolves its name to the gateway (DNS
//!   rebinding) is refused (421).
//! - **Token**: with `admin.token`, every route but `/healthz` and `/readyz`, the web
//!   console's static files (`/`, `/console/*`: no data in them) and `/metrics` with
//!   `admin.metrics_public` needs `Authorization: Bearer TOKEN` (401, compared in
//!   constant time). Without a token the API is open, which the config allows only on a
//!   loopback `admin.listen`. `POST /api/v1/publish` also takes `Authorization: Basic` (a
//!   `users:` entry, checked by the publish handler as an MQTT CONNECT is) instead.
//! - **Cross-site writes**: a state-changing request (any method but GET, HEAD, OPTIONS) needs
//!   `Content-Type: application/json` (415: a cross-origin form post cannot send it without a
//!   preflight, which this server never grants) and no `Origin` or a same-origin one (403).
//!
//! Every refusal is counted: `mqgate_admin_refused_total{reason}`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::metrics::ReasonLabels;

/// What the guard checks against.
#[derive(Clone)]
pub struct Guard {
    inner: Arc<Inner>,
}

struct Inner {
    token: Option<String>,
    metrics_public: bool,
    /// Host names (lower case, no port) a request may name.
    hosts: Vec<String>,
    refused: Family<ReasonLabels, Counter>,
}

impl Guard {
    /// A guard for a server on `listen` with `token` (resolved), allowing `extra_hosts`.
    pub fn new(
        listen: SocketAddr,
        token: Option<String>,
        metrics_public: bool,
        extra_hosts: &[String],
        refused: Family<ReasonLabels, Counter>,
    ) -> Guard {
        let mut hosts: Vec<String> =
            ["localhost", "127.0.0.1", "[::1]", "::1"].iter().map(|h| (*h).to_owned()).collect();
        if !listen.ip().is_unspecified() {
            hosts.push(match listen.ip() {
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            });
        }
        hosts.extend(extra_hosts.iter().map(|h| h.to_ascii_lowercase()));
        Guard { inner: Arc::new(Inner { token, metrics_public, hosts, refused }) }
    }

    fn refuse(&self, status: StatusCode, reason: &'static str) -> Response {
        self.inner.refused.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
        (status, format!("{reason}\n")).into_response()
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        // Strip the port: `[::1]:9090`, `localhost:9090`.
        let name = match host.rfind(':') {
            Some(i)
                if host[i + 1..].chars().all(|c| c.is_ascii_digit()) && !host.ends_with(']') =>
            {
                &host[..i]
            }
            _ => host.as_str(),
        };
        self.inner.hosts.iter().any(|h| h == name)
    }

    fn token_ok(&self, req: &Request) -> bool {
        let Some(token) = &self.inner.token else { return true };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(given.as_bytes(), token.as_bytes())
    }
}

/// Equal without an early exit that would tell how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// The middleware.
pub async fn check(State(guard): State<Guard>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = matches!(path, "/healthz" | "/readyz");
    if open {
        return next.run(req).await;
    }
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !guard.host_allowed(host) {
        return guard.refuse(StatusCode::MISDIRECTED_REQUEST, "host");
    }
    // The console's files hold no data; the page sends the token on its API calls.
    if super::console::is_asset(path) && matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let public_metrics = path == "/metrics" && guard.inner.metrics_public;
    // A user's password is checked by the publish handler (argon2, backoff, ACL).
    let user_publish = path == "/api/v1/publish"
        && req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().get(..6))
            .is_some_and(|s| s.eq_ignore_ascii_case(b"basic "));
    if !public_metrics && !user_publish && !guard.token_ok(&req) {
        let mut r = guard.refuse(StatusCode::UNAUTHORIZED, "token");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return r;
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return guard.refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, "content_type");
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| o.split_once("://").map(|(_, rest)| rest.trim_end_matches('/')))
                .is_some_and(|o| o.eq_ignore_ascii_case(host));
            if !same {
                return guard.refuse(StatusCode::FORBIDDEN, "origin");
            }
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_and_tokens() {
        let g = Guard::new(
            "0.0.0.0:9090".parse().expect("addr"),
            Some("s3cret".into()),
            false,
            &["gw.example.com".into()],
            Family::default(),
        );
        for ok in ["localhost:9090", "127.0.0.1", "[::1]:9090", "GW.example.com:9090"] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in ["", "evil.example", "0.0.0.0:9090", "localhost.evil:9090"] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret") && !constant_time_eq(b"", b"x"));
    }
}
