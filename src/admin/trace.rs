//! `GET /api/v1/trace?filter=F&sample=N`: a live trace of the messages routed whose topic
//! matches `F`, one in `N` (default 1), as server-sent events (see [`crate::trace`]):
//!
//! ```text
//! event: message   data: {"at", "topic", "qos", "retain", "client_id", "user", "payload_bytes", "payload_preview", "rules", "origin"}
//! event: dropped   data: {"dropped": N}    (events this trace lost to a slow reader, when that grows)
//! ```
//!
//! 400 for a bad filter, 429 when `MAX_TRACES` traces are open. The trace ends when the client
//! goes away (its registration is dropped with the stream) or after `MAX_DURATION`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::reply::{self, error};
use super::AdminState;
use crate::trace::{Trace, TraceRefused, MAX_TRACES};

/// The longest one trace runs; the console offers to start it again.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 60);
/// How often a trace's lost-event count is checked (and sent when it grew).
const DROP_REPORT: Duration = Duration::from_secs(1);

/// The handler.
pub async fn trace(State(state): State<AdminState>, RawQuery(q): RawQuery) -> Response {
    let params = match reply::query(q.as_deref(), &["filter", "sample"]) {
        Ok(p) => p,
        Err(m) => return reply::bad(m),
    };
    let filter = reply::get(&params, "filter").filter(|f| !f.is_empty()).unwrap_or("#");
    if let Err(e) = crate::mqtt::topic::validate_filter(filter) {
        return error(StatusCode::BAD_REQUEST, &format!("filter: {e}"));
    }
    let sample = match reply::get(&params, "sample").map(str::parse::<u64>) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => return error(StatusCode::BAD_REQUEST, "sample: a whole number, 1 or more"),
    };
    let trace = match state.gateway.broker.tracer().open(filter, sample) {
        Ok(t) => t,
        Err(TraceRefused::Full) => {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("{MAX_TRACES} traces are open; close one first"),
            )
        }
    };
    tracing::info!(filter = %crate::logtext::LogText(filter), sample, "trace started");
    let deadline = tokio::time::Instant::now() + MAX_DURATION;
    let tick = tokio::time::interval(DROP_REPORT);
    let stream = futures::stream::unfold(
        (trace, tick, 0u64, deadline),
        |(mut trace, mut tick, reported, deadline)| async move {
            loop {
                tokio::select! {
                    event = trace.events.recv() => {
                        let event = event?;
                        let data = serde_json::to_string(&event).ok()?;
                        let sse = Event::default().event("message").data(data);
                        return Some((Ok::<_, Infallible>(sse), (trace, tick, reported, deadline)));
                    }
                    _ = tick.tick() => {
                        let dropped = trace.dropped.load(Ordering::Relaxed);
                        if dropped != reported {
                            let data = format!("{{\"dropped\":{dropped}}}");
                            let sse = Event::default().event("dropped").data(data);
                            return Some((Ok(sse), (trace, tick, dropped, deadline)));
                        }
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        end(&trace);
                        return None;
                    }
                }
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn end(_trace: &Trace) {
    tracing::info!("trace ended ({} min)", MAX_DURATION.as_secs() / 60);
}
