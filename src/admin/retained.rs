//! The retained-message routes (the web console's view; JSON):
//!
//! ```text
//! GET    /api/v1/retained?filter=&after=&limit=   topics matching the filter (default `#`), in order
//! DELETE /api/v1/retained?topic=                  clears one topic's message (and in the store)
//! ```
//!
//! A page is one bounded scan of the retained store under its read lock.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;

use super::reply::{self, error, json};
use super::AdminState;

/// One retained message as listed.
#[derive(Serialize)]
struct Retained {
    topic: String,
    qos: u8,
    /// Who set it.
    client_id: String,
    user: Option<String>,
    payload_bytes: usize,
    /// Its start as text, or `0x` and hex.
    payload_preview: String,
    content_type: Option<String>,
    message_expiry_interval: Option<u32>,
    user_properties: Vec<(String, String)>,
}

/// A page of retained messages.
#[derive(Serialize)]
struct Page {
    /// Topics with a retained message, in all.
    count: usize,
    retained: Vec<Retained>,
    /// The `after` of the next page (a topic); `null` on the last one.
    next_after: Option<String>,
}

pub(super) async fn list(State(state): State<AdminState>, RawQuery(q): RawQuery) -> Response {
    let params = match reply::query(q.as_deref(), &["filter", "after", "limit"]) {
        Ok(p) => p,
        Err(m) => return reply::bad(m),
    };
    let limit = match reply::limit(reply::get(&params, "limit")) {
        Ok(n) => n,
        Err(m) => return reply::bad(m),
    };
    let filter = reply::get(&params, "filter").filter(|f| !f.is_empty()).unwrap_or("#");
    if let Err(e) = crate::mqtt::topic::validate_filter(filter) {
        return error(StatusCode::BAD_REQUEST, &format!("filter: {e}"));
    }
    let broker = &state.gateway.broker;
    let (page, more) = broker.retained_page(filter, reply::get(&params, "after"), limit);
    let next_after = if more { page.last().map(|m| m.topic.clone()) } else { None };
    let retained = page
        .iter()
        .map(|m| Retained {
            topic: m.topic.clone(),
            qos: m.qos as u8,
            client_id: m.client_id.to_string(),
            user: m.username.as_deref().map(str::to_owned),
            payload_bytes: m.payload.len(),
            payload_preview: crate::trace::preview(&m.payload),
            content_type: m.properties.content_type.clone(),
            message_expiry_interval: m.properties.message_expiry_interval,
            user_properties: m.properties.user_properties.clone(),
        })
        .collect();
    json(StatusCode::OK, &Page { count: broker.retained_count(), retained, next_after })
}

pub(super) async fn remove(State(state): State<AdminState>, RawQuery(q): RawQuery) -> Response {
    let params = match reply::query(q.as_deref(), &["topic"]) {
        Ok(p) => p,
        Err(m) => return reply::bad(m),
    };
    let Some(topic) = reply::get(&params, "topic") else {
        return error(StatusCode::BAD_REQUEST, "topic: required");
    };
    if state.gateway.broker.clear_retained(topic) {
        tracing::info!(topic = %crate::logtext::LogText(topic), "retained message deleted by an operator (admin API)");
        json(StatusCode::OK, &serde_json::json!({ "removed": topic }))
    } else {
        error(StatusCode::NOT_FOUND, &format!("no retained message on {topic:?}"))
    }
}
