//! `POST /api/v1/route`: the route dry-run on the running rule set (see [`crate::dryrun`]):
//! a message as `/api/v1/publish` takes it (plus `user` for the ACL decision) in, the report
//! out as JSON. Nothing is sent, counted or stored.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::body;
use super::AdminState;

/// The handler.
pub async fn route(State(state): State<AdminState>, bytes: Bytes) -> Response {
    let error = |status: StatusCode, message: String| {
        let body = serde_json::json!({ "error": message });
        (status, [(header::CONTENT_TYPE, "application/json")], format!("{body}\n")).into_response()
    };
    let m = match body::parse(&bytes) {
        Ok(body::Request::One(m)) => *m,
        Ok(body::Request::Batch(_)) => {
            return error(StatusCode::BAD_REQUEST, "one message, not an array".into())
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let user = m.user.clone();
    let client_id = m.client_id.clone().unwrap_or_else(|| super::publish::TOKEN_CLIENT_ID.into());
    let parts = match m.parts() {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.reason),
    };
    let msg = std::sync::Arc::new(crate::dryrun::message(
        parts.topic,
        parts.payload,
        parts.qos,
        parts.retain,
        user.as_deref(),
        &client_id,
        parts.properties,
    ));
    let shared = &state.gateway;
    let live = shared.live.load();
    let report = crate::dryrun::explain(&live.rules, &live.auth, &shared.limits.topic_limits, &msg);
    match serde_json::to_string_pretty(&report) {
        Ok(mut text) => {
            text.push('\n');
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], text).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode: {e}")),
    }
}
