//! The admin HTTP server (axum): `/healthz`, `/readyz`, `/metrics`, the dead-letter API
//! (`dead_letters`: list, show, replay, delete, purge), the route dry-run (`route`:
//! `POST /api/v1/route`), the HTTP publish API (`publish`: `POST /api/v1/publish`) and the
//! config reload (`POST /api/v1/reload`, `crate::reload`) and the web console (`console`: its
//! embedded files at `/`; its JSON routes in `overview`, `clients`, `retained`, `trace`:
//! snapshots and bounded pages of the broker's state, and a live trace of routed messages).
//! The routes are described in `docs/admin-api.yaml`.
//!
//! The dead-letter routes change only the dead letters: a replay hands a message to a target
//! like the spool does, never through a session. A publish goes through `routing::route` as
//! an MQTT PUBLISH does, with its own context (never a session's internals).

pub mod body;
mod clients;
pub mod console;
mod dead_letters;
pub mod guard;
mod overview;
pub mod publish;
mod reply;
mod retained;
mod route;
mod trace;

pub use dead_letters::iso8601;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::deadletters::DeadLetters;
use crate::metrics::Metrics;
use crate::store::Store;

/// What the admin routes read.
#[derive(Clone)]
pub struct AdminState {
    /// Encoded by `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The dead letters; `None` without a store.
    pub dead_letters: Option<DeadLetters>,
    /// Reads the config file again and swaps what it configures (`POST /api/v1/reload`).
    pub reloader: Arc<crate::reload::Reloader>,
    /// Named in `/readyz` (path and size), when configured.
    pub store: Option<Store>,
    /// Host, token and cross-site checks in front of every route.
    pub guard: guard::Guard,
    /// What sessions share (broker, the live config: rules, spools, users and ACL, systems'
    /// health; login backoff, limits): the publish API routes through it, the dry-run reads
    /// its rules and ACL, a replay its targets, `/readyz` its systems.
    pub gateway: Arc<crate::mqtt::session::SessionShared>,
    /// The publish API's rate buckets, per user and for the token.
    pub publishers: Arc<publish::Publishers>,
    /// The configured sources' names (the overview shows their state).
    pub sources: Vec<String>,
    /// When the gateway started (the overview's uptime).
    pub started: std::time::Instant,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(dead_letters::router())
        .route("/api/v1/route", post(route::route))
        .route("/api/v1/publish", post(publish::publish))
        .route("/api/v1/reload", post(reload))
        .route("/", get(console::index))
        .route("/console/{file}", get(console::asset))
        .route("/api/v1/overview", get(overview::overview))
        .route("/api/v1/rules", get(overview::rules))
        .route("/api/v1/clients", get(clients::list))
        .route("/api/v1/clients/{id}", get(clients::show).delete(clients::disconnect))
        .route("/api/v1/subscriptions", get(clients::subscriptions))
        .route("/api/v1/retained", get(retained::list).merge(delete(retained::remove)))
        .route("/api/v1/trace", get(trace::trace))
        .layer(axum::middleware::from_fn_with_state(state.guard.clone(), guard::check))
        .with_state(state)
}

/// Serves the admin routes on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// 200 when every AMQP broker is connected (the listeners are bound before this server
/// starts) and the store can write, 503 otherwise; the body lists each broker's state and, with a store, how many
/// dead letters are kept (not a readiness condition).
async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let live = state.gateway.live.load();
    let mut body = String::from("mqtt: listening\n");
    if !live.hash.is_empty() {
        body.push_str(&format!("config: sha256 {}\n", live.hash));
    }
    let mut ready = true;
    if let Some(store) = &state.store {
        body.push_str(&format!(
            "store: {} ({} bytes)\n",
            store.path().display(),
            store.file_size()
        ));
        // Disk full: writes wait, nothing that needs the store is acknowledged.
        if let Some(failure) = store.failure() {
            ready = false;
            body.push_str(&format!("store: not writable: {failure}\n"));
        }
    }
    for system in &live.health {
        let text = match system.state() {
            Ok(text) => text,
            Err(text) => {
                ready = false;
                text
            }
        };
        body.push_str(&format!("{}: {text}\n", system.name()));
    }
    if let Some(cluster) = state.gateway.broker.cluster() {
        let text = cluster.state().unwrap_or_else(|why| {
            ready = false;
            why
        });
        body.push_str(&format!("cluster: {text}\n"));
    }
    if let Some(dl) = &state.dead_letters {
        body.push_str(&format!("dead letters: {}\n", dl.count()));
    }
    for s in live.spools.iter() {
        let (messages, bytes) = s.depth();
        body.push_str(&format!("spool {}: {messages} messages, {bytes} bytes\n", s.id()));
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body)
}

/// `POST /api/v1/reload`: reads the config file again (as SIGHUP does). 200
/// `{"result":"ok","hash":…,"changed":{…}}`, 400 `{"result":"invalid","error":"file:line:column: …"}`,
/// 409 `{"result":"needs_restart","keys":[…]}`, 500 `{"result":"failed","error":…}`; nothing
/// changes unless the answer is 200.
async fn reload(State(state): State<AdminState>) -> impl IntoResponse {
    let (status, body) = state.reloader.reload().await.to_json();
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut text = body.to_string();
    text.push('\n');
    (status, [(header::CONTENT_TYPE, "application/json")], text)
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.metrics.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("cannot encode metrics: {e}\n"),
        ),
    }
}
