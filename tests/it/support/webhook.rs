//! The tests' webhook server: a real HTTP server (axum) on loopback that records every request
//! and answers what the test's script says.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use tokio::net::TcpListener;

/// One request the server got.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    pub version: Version,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// The status the server answered (200 after a hang).
    pub status: u16,
}

impl Request {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// How the server answers one request.
#[derive(Clone, Debug)]
pub enum Reply {
    /// This status, empty body.
    Status(u16),
    /// This status with a `Retry-After` header.
    RetryAfter(u16, String),
    /// No answer for this long, then 200.
    Hang(Duration),
    /// 302 to this location.
    Redirect(&'static str),
}

/// Decides the reply from the request and how many identical requests (same method, path and
/// body) came before it.
type Script = dyn Fn(&Request, usize) -> Reply + Send + Sync;

/// A running webhook server.
#[derive(Clone)]
pub struct Webhook {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Request>>>,
}

#[derive(Clone)]
struct ServerState {
    seen: Arc<Mutex<Vec<Request>>>,
    script: Arc<Script>,
}

impl Webhook {
    /// Starts a server on a fresh loopback port.
    pub async fn start(
        script: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind webhook server");
        Webhook::on(listener, script)
    }

    /// A server answering 200 to everything.
    pub async fn ok() -> Webhook {
        Webhook::start(|_, _| Reply::Status(200)).await
    }

    /// Starts a server on `listener` (e.g. a port reserved earlier).
    pub fn on(
        listener: TcpListener,
        script: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> Webhook {
        Webhook::on_listener(listener, script)
    }

    /// Starts a server on any listener axum can serve (a TLS one, say).
    pub fn on_listener<L>(
        listener: L,
        script: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static,
    ) -> Webhook
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = ServerState { seen: Arc::clone(&seen), script: Arc::new(script) };
        let app = Router::new().fallback(handle).with_state(state);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Webhook { addr, seen }
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Request> {
        self.seen.lock().expect("seen").clone()
    }

    /// The bodies of the requests to `path`, in arrival order.
    pub fn bodies(&self, path: &str) -> Vec<String> {
        self.seen().iter().filter(|r| r.path == path).map(Request::text).collect()
    }

    /// The requests answered 2xx (what the server took), in arrival order.
    pub fn taken(&self) -> Vec<Request> {
        self.seen().into_iter().filter(|r| (200..300).contains(&r.status)).collect()
    }

    /// The bodies of the requests answered 2xx, in arrival order.
    pub fn taken_bodies(&self) -> Vec<String> {
        self.taken().iter().map(Request::text).collect()
    }

    /// Waits until at least `n` requests came (10 s at most).
    pub async fn wait_for(&self, n: usize) -> Vec<Request> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} requests, got {}: {seen:#?}",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn handle(
    State(state): State<ServerState>,
    method: Method,
    version: Version,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let mut req = Request { method, version, path, headers, body, at: Instant::now(), status: 0 };
    // Decided and recorded under one lock: `before` counts earlier identical requests.
    let reply = {
        let mut seen = state.seen.lock().expect("seen");
        let before = seen
            .iter()
            .filter(|r| r.method == req.method && r.path == req.path && r.body == req.body)
            .count();
        let reply = (state.script)(&req, before);
        req.status = match &reply {
            Reply::Status(code) | Reply::RetryAfter(code, _) => *code,
            Reply::Hang(_) => 200,
            Reply::Redirect(_) => 302,
        };
        seen.push(req);
        reply
    };
    let status =
        |code: u16| StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match reply {
        Reply::Status(code) => status(code).into_response(),
        Reply::RetryAfter(code, after) => {
            (status(code), [(axum::http::header::RETRY_AFTER, after)]).into_response()
        }
        Reply::Hang(d) => {
            tokio::time::sleep(d).await;
            StatusCode::OK.into_response()
        }
        Reply::Redirect(to) => {
            (StatusCode::FOUND, [(axum::http::header::LOCATION, to)]).into_response()
        }
    }
}
