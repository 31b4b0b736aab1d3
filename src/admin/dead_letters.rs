//! The dead-letter routes of the admin API: list, show, replay, delete, purge.
//!
//! ```text
//! GET    /dead-letters?after=ID&limit=N   a page, oldest first: {"count", "dead_letters": [..], "next_after"}
//! GET    /dead-letters/{id}               one letter in full (payload base64, MQTT 5 properties)
//! POST   /dead-letters/{id}/replay        body (optional): {"to": "rule/index"}
//! POST   /dead-letters/replay             body (optional): {"rule", "target", "to"}
//! DELETE /dead-letters/{id}
//! DELETE /dead-letters                    purge
//! ```
//!
//! A replay hands the message to a target with `rules::Target::send` and waits for its real
//! outcome: delivered removes the letter; a failure keeps it with the new reason. A target of
//! an `ack: spool` rule gets it through its spool instead: durably spooled removes the letter
//! (the spool forwards it, and moves it back here if it fails for good). It never goes through
//! a session, so nothing is recorded twice and no device is told anything.
//! Errors are JSON too: `{"error": "..."}` with 400 (bad request), 404 (unknown id or target),
//! 503 (no store configured) or 500 (the store failed).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use serde::{Deserialize, Serialize};
use tracing::info;

use super::AdminState;
use crate::config::AckPolicy;
use crate::deadletters::{DeadLetter, DeadLetters};
use crate::message::Message;
use crate::rules::RuleSet;
use crate::spool::{Append, Spools};
use crate::targets::Outcome;

/// Letters in a page when `limit` is not given.
const DEFAULT_PAGE: usize = 100;
/// Most letters in one page.
const MAX_PAGE: usize = 10_000;
/// Payload characters in a list entry's preview.
const PREVIEW: usize = 64;
/// Letters a replay of all sends before it waits for their outcomes (pipelining).
const REPLAY_WINDOW: usize = 256;

/// The dead-letter routes.
pub fn router() -> Router<AdminState> {
    Router::new()
        .route("/dead-letters", get(list).delete(purge))
        .route("/dead-letters/replay", post(replay_all))
        .route("/dead-letters/{id}", get(show).delete(remove))
        .route("/dead-letters/{id}/replay", post(replay_one))
}

/// An answer: JSON with a status.
struct Answer(StatusCode, String);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.0, [(header::CONTENT_TYPE, "application/json")], self.1).into_response()
    }
}

fn json(status: StatusCode, value: &impl Serialize) -> Answer {
    match serde_json::to_string_pretty(value) {
        Ok(mut s) => {
            s.push('\n');
            Answer(status, s)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &format!("cannot encode: {e}")),
    }
}

fn error(status: StatusCode, message: &str) -> Answer {
    let body = serde_json::json!({ "error": message });
    Answer(status, format!("{body}\n"))
}

fn store_error(e: impl std::fmt::Display) -> Answer {
    error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
}

/// The dead letters, or the answer saying there are none without a store.
fn dead_letters(state: &AdminState) -> Result<&DeadLetters, Answer> {
    state.dead_letters.as_ref().ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no store is configured (store.path): dead letters are not kept",
        )
    })
}

/// The id in a path.
fn parse_id(text: &str) -> Result<u64, Answer> {
    text.parse()
        .map_err(|_| error(StatusCode::BAD_REQUEST, &format!("not a dead-letter id: {text:?}")))
}

/// One entry of a list.
#[derive(Serialize)]
struct Summary {
    id: u64,
    failed_at: String,
    rule: String,
    target: String,
    reason: String,
    topic: String,
    qos: u8,
    retain: bool,
    payload_bytes: usize,
    payload_preview: String,
}

impl Summary {
    fn of(id: u64, l: &DeadLetter) -> Summary {
        let m = &l.message;
        Summary {
            id,
            failed_at: iso8601(l.failed_at_ms),
            rule: l.rule.clone(),
            target: l.target.clone(),
            reason: l.reason.clone(),
            topic: m.topic.clone(),
            qos: m.qos as u8,
            retain: m.retain,
            payload_bytes: m.payload.len(),
            payload_preview: preview(&m.payload),
        }
    }
}

/// A page of the list.
#[derive(Serialize)]
struct Page {
    /// Letters kept in all.
    count: usize,
    dead_letters: Vec<Summary>,
    /// The `after` of the next page; `null` on the last one.
    next_after: Option<u64>,
}

async fn list(State(state): State<AdminState>, RawQuery(query): RawQuery) -> Answer {
    let dl = match dead_letters(&state) {
        Ok(dl) => dl,
        Err(a) => return a,
    };
    let (mut after, mut limit) = (None, DEFAULT_PAGE);
    for pair in query.as_deref().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let n: Option<u64> = v.parse().ok();
        match (k, n) {
            ("after", Some(n)) => after = Some(n),
            ("limit", Some(n)) => limit = usize::try_from(n).unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("bad query parameter {pair:?}: use after=ID and limit=N"),
                )
            }
        }
    }
    match dl.list(after, limit + 1) {
        Ok(mut letters) => {
            let more = letters.len() > limit;
            letters.truncate(limit);
            let next_after = if more { letters.last().map(|(id, _)| *id) } else { None };
            let page = Page {
                count: dl.count(),
                dead_letters: letters.iter().map(|(id, l)| Summary::of(*id, l)).collect(),
                next_after,
            };
            json(StatusCode::OK, &page)
        }
        Err(e) => store_error(e),
    }
}

/// One letter in full.
#[derive(Serialize)]
struct Detail {
    id: u64,
    failed_at: String,
    failed_at_ms: u64,
    rule: String,
    target: String,
    reason: String,
    topic: String,
    qos: u8,
    retain: bool,
    client_id: String,
    username: Option<String>,
    packet_id: Option<u16>,
    received_at: String,
    payload_bytes: usize,
    payload_base64: String,
    /// The payload as text, when it is UTF-8.
    payload_utf8: Option<String>,
    properties: Props,
}

/// The MQTT 5 properties a message carries.
#[derive(Serialize)]
struct Props {
    payload_format_indicator: Option<u8>,
    message_expiry_interval: Option<u32>,
    content_type: Option<String>,
    response_topic: Option<String>,
    correlation_data_base64: Option<String>,
    user_properties: Vec<(String, String)>,
}

async fn show(State(state): State<AdminState>, Path(id): Path<String>) -> Answer {
    let (dl, id) = match dead_letters(&state).and_then(|dl| Ok((dl, parse_id(&id)?))) {
        Ok(v) => v,
        Err(a) => return a,
    };
    match dl.get(id) {
        Ok(Some(l)) => json(StatusCode::OK, &detail(id, l)),
        Ok(None) => unknown(id),
        Err(e) => store_error(e),
    }
}

fn unknown(id: u64) -> Answer {
    error(StatusCode::NOT_FOUND, &format!("no dead letter {id}"))
}

fn detail(id: u64, l: DeadLetter) -> Detail {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let m = l.message;
    let p = m.properties;
    Detail {
        id,
        failed_at: iso8601(l.failed_at_ms),
        failed_at_ms: l.failed_at_ms,
        rule: l.rule,
        target: l.target,
        reason: l.reason,
        received_at: iso8601(crate::store::codec::unix_millis(m.received)),
        topic: m.topic,
        qos: m.qos as u8,
        retain: m.retain,
        client_id: m.client_id.to_string(),
        username: m.username.map(|u| u.to_string()),
        packet_id: m.packet_id,
        payload_bytes: m.payload.len(),
        payload_base64: b64(&m.payload),
        payload_utf8: std::str::from_utf8(&m.payload).ok().map(str::to_owned),
        properties: Props {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data_base64: p.correlation_data.as_deref().map(b64),
            user_properties: p.user_properties.clone(),
        },
    }
}

async fn remove(State(state): State<AdminState>, Path(id): Path<String>) -> Answer {
    let (dl, id) = match dead_letters(&state).and_then(|dl| Ok((dl, parse_id(&id)?))) {
        Ok(v) => v,
        Err(a) => return a,
    };
    match dl.remove(&[id]).await {
        Ok(0) => unknown(id),
        Ok(n) => json(StatusCode::OK, &serde_json::json!({ "removed": n })),
        Err(e) => store_error(e),
    }
}

async fn purge(State(state): State<AdminState>) -> Answer {
    let dl = match dead_letters(&state) {
        Ok(dl) => dl,
        Err(a) => return a,
    };
    match dl.purge().await {
        Ok(n) => {
            info!(removed = n, "dead letters purged");
            json(StatusCode::OK, &serde_json::json!({ "removed": n }))
        }
        Err(e) => store_error(e),
    }
}

/// The body of a replay: where to, and (replay of all) which letters.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplayRequest {
    /// The target to send to (`rule/index`); default: each letter's own target.
    #[serde(default)]
    to: Option<String>,
    /// One letter: same as `to`. All: only letters of this target.
    #[serde(default)]
    target: Option<String>,
    /// All: only letters of this rule.
    #[serde(default)]
    rule: Option<String>,
}

fn parse_body(body: &Bytes) -> Result<ReplayRequest, Answer> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ReplayRequest::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("bad replay request: {e}")))
}

/// What became of one replayed letter.
#[derive(Serialize)]
struct Replayed {
    id: u64,
    to: String,
    delivered: bool,
    /// Into the target's spool (`ack: spool`): delivered means durably spooled.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    spooled: bool,
    /// Why it failed again (kept, with this reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

async fn replay_one(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let (dl, id, req) =
        match dead_letters(&state).and_then(|dl| Ok((dl, parse_id(&id)?, parse_body(&body)?))) {
            Ok(v) => v,
            Err(a) => return a,
        };
    if req.rule.is_some() {
        return error(StatusCode::BAD_REQUEST, "\"rule\" filters a replay of all; give \"to\"");
    }
    let letter = match dl.get(id) {
        Ok(Some(l)) => l,
        Ok(None) => return unknown(id),
        Err(e) => return store_error(e),
    };
    let to = req.to.or(req.target).unwrap_or_else(|| letter.target.clone());
    let live = state.gateway.live.load();
    if let Err(a) = known_target(&live.rules, &to) {
        return a;
    }
    let msg = Arc::new(letter.message);
    let pending = send(&live.rules, &live.spools, &to, &msg).await;
    match settle(dl, id, &to, pending).await {
        Ok(r) => {
            let status = if r.delivered { StatusCode::OK } else { StatusCode::BAD_GATEWAY };
            json(status, &r)
        }
        Err(e) => store_error(e),
    }
}

/// A summary of a replay of all.
#[derive(Serialize)]
struct ReplayReport {
    delivered: usize,
    failed: usize,
    results: Vec<Replayed>,
}

async fn replay_all(State(state): State<AdminState>, body: Bytes) -> Answer {
    let (dl, req) = match dead_letters(&state).and_then(|dl| Ok((dl, parse_body(&body)?))) {
        Ok(v) => v,
        Err(a) => return a,
    };
    if let Some(to) = &req.to {
        if let Err(a) = known_target(&state.gateway.live.load().rules, to) {
            return a;
        }
    }
    let mut report = ReplayReport { delivered: 0, failed: 0, results: Vec::new() };
    // Letters recorded while this runs (ids above the last one now) are left for later.
    let Some(last) = dl.last_id() else {
        return json(StatusCode::OK, &report);
    };
    let mut after = None;
    loop {
        let page = match dl.list(after, REPLAY_WINDOW) {
            Ok(p) => p,
            Err(e) => return store_error(e),
        };
        let Some(end) = page.last().map(|(id, _)| *id) else { break };
        after = Some(end);
        // Sent in id order (so in order per topic), then their outcomes awaited.
        let mut pending = Vec::new();
        for (id, l) in page.into_iter().filter(|(id, _)| *id <= last) {
            let wanted = req.rule.as_ref().is_none_or(|r| *r == l.rule)
                && req.target.as_ref().is_none_or(|t| *t == l.target);
            if !wanted {
                continue;
            }
            let to = req.to.clone().unwrap_or(l.target);
            let msg = Arc::new(l.message);
            let live = state.gateway.live.load();
            pending.push((id, to.clone(), send(&live.rules, &live.spools, &to, &msg).await));
        }
        for (id, to, p) in pending {
            match settle(dl, id, &to, p).await {
                Ok(r) => {
                    if r.delivered {
                        report.delivered += 1;
                    } else {
                        report.failed += 1;
                    }
                    report.results.push(r);
                }
                Err(e) => return store_error(e),
            }
        }
        if end >= last {
            break;
        }
    }
    info!(delivered = report.delivered, failed = report.failed, "dead letters replayed");
    json(StatusCode::OK, &report)
}

fn known_target(rules: &RuleSet, id: &str) -> Result<(), Answer> {
    match rules.target(id) {
        Some(_) => Ok(()),
        None => Err(error(
            StatusCode::NOT_FOUND,
            &format!(
                "no target {id:?}: targets are named rule/index (index from 0 in `to:` order)"
            ),
        )),
    }
}

/// A replay on its way: the pending delivery, or why it could not start.
enum Pending {
    /// Handed to the target's sink.
    Sent(crate::targets::Delivery),
    /// Appended to the target's spool (`ack: spool`): `Delivered` once durably spooled.
    Spooled(tokio::sync::oneshot::Receiver<Outcome>),
    NotSent(String),
}

/// Hands `msg` to target `to`: to its spool when its rule is `ack: spool`, else to its sink.
async fn send(rules: &RuleSet, spools: &Spools, to: &str, msg: &Arc<Message>) -> Pending {
    let Some((rule, target)) = rules.target(to) else {
        return Pending::NotSent(format!("no target {to:?}"));
    };
    if rule.ack == AckPolicy::Spool {
        if let Some(spool) = spools.iter().find(|s| s.id() == to) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            spool.append(Append { msg: Arc::clone(msg), ack: Some(tx) }).await;
            return Pending::Spooled(rx);
        }
    }
    Pending::Sent(crate::targets::send(target.as_ref(), msg).await)
}

/// Waits for a replay's outcome: delivered removes letter `id`, a failure keeps it with the
/// new reason.
async fn settle(
    dl: &DeadLetters,
    id: u64,
    to: &str,
    pending: Pending,
) -> Result<Replayed, crate::store::StoreError> {
    let spooled = matches!(pending, Pending::Spooled(_));
    let outcome = match pending {
        Pending::Sent(d) => d.outcome().await,
        Pending::Spooled(rx) => rx.await.unwrap_or_else(|_| {
            Outcome::Failed(crate::targets::Failure::retryable("the spool dropped the message"))
        }),
        Pending::NotSent(reason) => Outcome::Failed(crate::targets::Failure::fatal(reason)),
    };
    match outcome {
        Outcome::Delivered => {
            dl.remove(&[id]).await?;
            info!(id, %to, spooled, "dead letter replayed");
            Ok(Replayed { id, to: to.to_owned(), delivered: true, spooled, reason: None })
        }
        Outcome::Failed(f) => {
            let reason = format!("replay to {to} failed: {}", f.reason);
            dl.update_reason(id, &reason).await?;
            Ok(Replayed { id, to: to.to_owned(), delivered: false, spooled, reason: Some(reason) })
        }
    }
}

/// The start of a payload for a list: text when it is UTF-8 (control characters escaped),
/// else hex.
fn preview(payload: &[u8]) -> String {
    let text = match std::str::from_utf8(payload) {
        Ok(t) => t,
        // A multi-byte character cut at the end still counts as text.
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&payload[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => {
            let n = payload.len().min(PREVIEW / 2);
            let hex: String = payload[..n].iter().map(|b| format!("{b:02x}")).collect();
            let more = if payload.len() > n { "…" } else { "" };
            return format!("0x{hex}{more}");
        }
    };
    let mut out = String::with_capacity(PREVIEW);
    for c in text.chars().take(PREVIEW) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if text.chars().count() > PREVIEW {
        out.push('…');
    }
    out
}

/// `ms` since the Unix epoch as an ISO 8601 UTC time, e.g. `2026-11-26T12:05:09.123Z`.
pub fn iso8601(ms: u64) -> String {
    crate::timefmt::rfc3339(ms).as_str().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_iso8601_utc() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601(1_795_694_709_123), "2026-11-26T12:05:09.123Z");
    }

    #[test]
    fn previews_are_short_and_printable() {
        assert_eq!(preview(b"{\"t\":1}\n"), "{\"t\":1}\\n");
        assert_eq!(preview(&[0xff, 0x00]), "0xff00");
        let long = "x".repeat(100);
        assert_eq!(preview(long.as_bytes()).chars().count(), PREVIEW + 1);
        assert_eq!(preview("é".as_bytes()), "é");
        assert_eq!(preview(&"é".as_bytes()[..1]), "");
    }
}
