//! `POST /api/v1/publish`: a backend publishes over HTTP, through the same routing as an MQTT
//! PUBLISH (local subscribers through the broker, retained store, rules and their targets),
//! and is answered with the same promise as a QoS 1 PUBACK.
//!
//! ```text
//! POST /api/v1/publish   {"topic", "payload" | "payload_base64", "qos", "retain", "properties", "client_id"}
//!                        or an array of those: each answered in "results", in order
//! ```
//!
//! Who publishes: the admin token (`Authorization: Bearer`, checked by the guard; no ACL) or
//! a `users:` entry (`Authorization: Basic`: its password checked as for an MQTT CONNECT,
//! with the same per-address backoff and cache; the ACL applied as that user). Each is
//! rate-limited like one MQTT client (`mqtt.max_publish_rate`, `max_publish_bytes_rate`):
//! over the rate a message is refused (429, Retry-After) rather than slowed down.
//!
//! The answer comes after the outcome: QoS 1/2 once every target has reported by its rule's
//! `ack:` policy (and a retained or persistent-session write is durable), QoS 0 once handed
//! over. The body carries the MQTT 5 reason code a PUBACK would: see [`Answer`] for the
//! status of each.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Serialize;
use tracing::debug;

use super::body::{self, MessageBody};
use super::AdminState;
use crate::auth::acl::ClientAcl;
use crate::auth::Refusal;
use crate::message::Message;
use crate::mqtt::codec::{QoS, ReasonCode};
use crate::mqtt::session::{PublishRate, SessionShared};
use crate::routing::route;
use crate::targets::{send_blocked, Blocked, Outcome, Waits};

/// The client id of messages published with the admin token (when the request names none).
pub const TOKEN_CLIENT_ID: &str = "mqgate-http";

/// The publish rate buckets: one per user, one for the admin token (a bounded map: the
/// configured users and the token).
#[derive(Debug, Default)]
pub struct Publishers {
    rates: Mutex<HashMap<Option<String>, PublishRate>>,
}

impl Publishers {
    /// Charges one message of `bytes` to `who` (`None`: the token); how long to wait when
    /// over the rate.
    fn admit(
        &self,
        shared: &SessionShared,
        who: Option<&str>,
        bytes: usize,
    ) -> Result<(), Duration> {
        let Ok(mut rates) = self.rates.lock() else { return Ok(()) };
        let key = who.map(str::to_owned);
        if !rates.contains_key(&key) {
            // No limits configured: nothing to keep.
            let Some(rate) = PublishRate::new(&shared.limits) else { return Ok(()) };
            rates.insert(key.clone(), rate);
        }
        match rates.get_mut(&key) {
            Some(rate) => rate.admit(tokio::time::Instant::now(), bytes),
            None => Ok(()),
        }
    }
}

/// One message's answer: the HTTP status and the MQTT 5 reason code.
#[derive(Debug, Serialize)]
pub struct Answer {
    /// The HTTP status: 200 delivered (or no matching subscribers, reason code 0x10), 400 an
    /// invalid message (0x81, 0x90 topic, 0x99 payload format), 401 wrong user or password
    /// (0x86), 403 refused by the ACL or client id (0x87), 413 too large (0x95), 429 over the
    /// publish rate (0x96), 502 a target refused it for good (its code, 0x83 by default), 503
    /// a target is unavailable or `mqtt.max_memory` is reached (0x89: try again), 507 the retained store's quota (0x97).
    pub status: u16,
    /// The MQTT 5 reason code a PUBACK (or CONNACK) would carry.
    pub reason_code: u8,
    /// Why, in words.
    pub reason: String,
    /// Seconds to wait before trying again (429, 503).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl Answer {
    fn new(status: StatusCode, code: ReasonCode, reason: impl Into<String>) -> Answer {
        Answer {
            status: status.as_u16(),
            reason_code: code.0,
            reason: reason.into(),
            retry_after: None,
        }
    }

    fn retry(mut self, after: Duration) -> Answer {
        self.retry_after = Some(after.as_secs_f64().ceil().max(1.0) as u64);
        self
    }

    fn malformed(reason: impl Into<String>) -> Answer {
        Answer::new(StatusCode::BAD_REQUEST, ReasonCode::MALFORMED_PACKET, reason)
    }
}

/// Who is publishing.
struct Publisher {
    /// The user (`None`: the admin token).
    user: Option<String>,
}

/// The handler.
pub async fn publish(State(state): State<AdminState>, req: Request) -> Response {
    let shared = Arc::clone(&state.gateway);
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let publisher = match authenticate(&shared, req.headers(), peer).await {
        Ok(p) => p,
        Err(answer) => return respond(answer),
    };
    let limit = body_limit(&shared);
    let bytes = match axum::body::to_bytes(req.into_body(), limit).await {
        Ok(b) => b,
        Err(_) => {
            let reason = format!("the request body is over {limit} bytes");
            return respond(Answer::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ReasonCode::PACKET_TOO_LARGE,
                reason,
            ));
        }
    };
    let messages = match body::parse(&bytes) {
        Ok(body::Request::One(m)) => vec![*m],
        Ok(body::Request::Batch(ms)) => {
            let most = usize::from(shared.limits.receive_maximum);
            if ms.len() > most {
                let reason =
                    format!("a batch holds at most mqtt.receive_maximum ({most}) messages");
                return respond(Answer::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                    reason,
                ));
            }
            return batch(&state, &shared, &publisher, ms).await;
        }
        Err(e) => return respond(Answer::malformed(e)),
    };
    let answers = publish_all(&state, &shared, &publisher, messages).await;
    let answer = answers.into_iter().next().unwrap_or_else(|| Answer::malformed("no message"));
    respond(answer)
}

/// The batch form: every message answered, in order; 200 when all were, else 207.
async fn batch(
    state: &AdminState,
    shared: &Arc<SessionShared>,
    publisher: &Publisher,
    messages: Vec<MessageBody>,
) -> Response {
    let answers = publish_all(state, shared, publisher, messages).await;
    let all_ok = answers.iter().all(|a| a.status == 200);
    let status = if all_ok { StatusCode::OK } else { StatusCode::MULTI_STATUS };
    let body = serde_json::json!({ "results": answers });
    json_response(status, &body, None)
}

/// Routes each message in order (waiting for room in full sink queues between them, as a
/// session stops reading), then waits for their outcomes.
async fn publish_all(
    state: &AdminState,
    shared: &Arc<SessionShared>,
    publisher: &Publisher,
    messages: Vec<MessageBody>,
) -> Vec<Answer> {
    let mut pending: Vec<Result<(QoS, bool, Waits), Answer>> = Vec::with_capacity(messages.len());
    let mut hits = Vec::new();
    // One config snapshot per message: checked and routed by the same one.
    for m in messages {
        let live = shared.live.load();
        let mut blocked = Blocked::new();
        let routed = admit(state, shared, &live, publisher, m).map(|msg| {
            let (matched, waits) =
                route(shared.routing(&live), &msg, None, &mut hits, &mut blocked);
            (msg.qos, matched, waits)
        });
        send_blocked(blocked).await;
        pending.push(routed);
    }
    let mut answers = Vec::with_capacity(pending.len());
    for p in pending {
        answers.push(match p {
            Err(answer) => answer,
            Ok((qos, matched, waits)) => outcome(qos, matched, waits).await,
        });
    }
    answers
}

/// The checks an MQTT PUBLISH goes through, in the session's order: the message as it
/// will be routed, or the answer refusing it.
fn admit(
    state: &AdminState,
    shared: &SessionShared,
    live: &crate::reload::Live,
    publisher: &Publisher,
    m: MessageBody,
) -> Result<Arc<Message>, Answer> {
    if m.user.is_some() {
        return Err(Answer::malformed("user: a publish is made as the authenticated user"));
    }
    let client_id = match (&m.client_id, &publisher.user) {
        (Some(c), _) => c.clone(),
        (None, Some(u)) => format!("{TOKEN_CLIENT_ID}-{u}"),
        (None, None) => TOKEN_CLIENT_ID.to_owned(),
    };
    let user = publisher.user.as_deref();
    if !live.auth.client_id_allowed(user, &client_id) {
        let reason = format!("client id {client_id:?} is not among the user's client_ids");
        return Err(Answer::new(
            StatusCode::FORBIDDEN,
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            reason,
        ));
    }
    let parts = m.parts().map_err(|e| {
        let code =
            if e.utf8 { ReasonCode::PAYLOAD_FORMAT_INVALID } else { ReasonCode::MALFORMED_PACKET };
        Answer::new(StatusCode::BAD_REQUEST, code, e.reason)
    })?;
    let topic_invalid =
        |e: String| Answer::new(StatusCode::BAD_REQUEST, ReasonCode::TOPIC_NAME_INVALID, e);
    crate::mqtt::topic::validate_name(&parts.topic)
        .map_err(|e| topic_invalid(format!("topic: {e}")))?;
    shared
        .limits
        .topic_limits
        .check(&parts.topic)
        .map_err(|e| topic_invalid(format!("topic: {e}")))?;
    let size = parts.topic.len() + parts.payload.len();
    if size > shared.limits.max_packet_size as usize {
        let reason = format!(
            "topic and payload are over mqtt.max_packet_size ({})",
            shared.limits.max_packet_size
        );
        return Err(Answer::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ReasonCode::PACKET_TOO_LARGE,
            reason,
        ));
    }
    if let Err(wait) = state.publishers.admit(shared, user, size) {
        let reason = "over mqtt.max_publish_rate or max_publish_bytes_rate";
        return Err(Answer::new(
            StatusCode::TOO_MANY_REQUESTS,
            ReasonCode::MESSAGE_RATE_TOO_HIGH,
            reason,
        )
        .retry(wait));
    }
    shared.received[parts.qos as usize].inc();
    let acl = match user {
        Some(u) => live.auth.acl.for_client(Some(u), &client_id),
        None => ClientAcl::allow_all(),
    };
    if !acl.may_publish(&parts.topic) {
        // Never routed: no local subscriber and no rule target sees it.
        shared.acl_denied_publish.inc();
        debug!(user = ?user, topic = %crate::logtext::LogText(&parts.topic), "HTTP publish denied by the ACL");
        return Err(Answer::new(
            StatusCode::FORBIDDEN,
            ReasonCode::NOT_AUTHORIZED,
            "the ACL does not allow publishing to this topic",
        ));
    }
    if parts.retain {
        if let Some(reason) =
            shared.broker.retained_refusal(&client_id, &parts.topic, parts.payload.len())
        {
            shared.metrics.dropped(reason);
            let why = "retained message refused: mqtt.max_retained, max_retained_bytes or max_retained_per_client";
            return Err(Answer::new(
                StatusCode::INSUFFICIENT_STORAGE,
                ReasonCode::QUOTA_EXCEEDED,
                why,
            ));
        }
    }
    if shared.memory.over() {
        // `mqtt.max_memory`: a client would be paused (QoS 1/2) or its message dropped (QoS 0);
        // an HTTP publisher is told to come back.
        shared.metrics.dropped("max_memory");
        let reason = "mqtt.max_memory reached: try again";
        return Err(Answer::new(StatusCode::SERVICE_UNAVAILABLE, ReasonCode::SERVER_BUSY, reason)
            .retry(Duration::from_secs(1)));
    }
    let mut msg = crate::dryrun::message(
        parts.topic,
        parts.payload,
        parts.qos,
        parts.retain,
        user,
        &client_id,
        parts.properties,
    );
    msg.charge = shared.memory.charge(size);
    Ok(Arc::new(msg))
}

/// Waits for a routed message's outcomes and answers as a PUBACK would.
async fn outcome(qos: QoS, matched: bool, waits: Waits) -> Answer {
    let mut failure = None;
    for rx in waits {
        let o = rx.await.unwrap_or_else(|_| {
            Outcome::Failed(crate::targets::Failure::retryable("the sink dropped the message"))
        });
        if let Outcome::Failed(f) = o {
            failure.get_or_insert(f);
        }
    }
    let Some(f) = failure else {
        return match (matched, qos) {
            (false, _) => Answer::new(
                StatusCode::OK,
                ReasonCode::NO_MATCHING_SUBSCRIBERS,
                "no matching subscribers or rules",
            ),
            (true, QoS::AtMostOnce) => {
                Answer::new(StatusCode::OK, ReasonCode::SUCCESS, "handed over (QoS 0)")
            }
            (true, _) => Answer::new(StatusCode::OK, ReasonCode::SUCCESS, "delivered"),
        };
    };
    if f.retryable {
        let reason = format!("not delivered: {}; try again", f.reason);
        return Answer::new(StatusCode::SERVICE_UNAVAILABLE, ReasonCode::SERVER_BUSY, reason)
            .retry(Duration::from_secs(1));
    }
    let code = f.code.unwrap_or(ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR);
    let status = if code.is_success() {
        // An unroutable message a target returned: MQTT 5 gets PUBACK 0x10 for it.
        StatusCode::OK
    } else if code == ReasonCode::QUOTA_EXCEEDED {
        StatusCode::INSUFFICIENT_STORAGE
    } else {
        StatusCode::BAD_GATEWAY
    };
    Answer::new(status, code, format!("not delivered: {}", f.reason))
}

/// The publisher: a `users:` entry by HTTP Basic, else the admin token (which the guard has
/// checked, or the API is open because no token is configured).
async fn authenticate(
    shared: &SessionShared,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Result<Publisher, Answer> {
    let Some(auth) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Ok(Publisher { user: None });
    };
    let Some(encoded) =
        auth.get(..6).filter(|s| s.eq_ignore_ascii_case("basic ")).map(|_| &auth[6..])
    else {
        return Ok(Publisher { user: None });
    };
    let bad = || {
        Answer::new(
            StatusCode::UNAUTHORIZED,
            ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            "bad user name or password",
        )
    };
    let decoded =
        base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| bad())?;
    let text = String::from_utf8(decoded).map_err(|_| bad())?;
    let (user, password) = text.split_once(':').ok_or_else(bad)?;
    let deadline = tokio::time::Instant::now() + shared.limits.connect_timeout;
    let live = shared.live.load();
    let check =
        shared.logins.authenticate(&live.auth, Some(user), Some(password.as_bytes()), deadline);
    let result = match peer {
        Some(addr) => crate::auth::backoff::LOGIN_PEER.scope(addr.ip(), check).await,
        None => check.await,
    };
    match result {
        Ok(()) => Ok(Publisher { user: Some(user.to_owned()) }),
        Err(Refusal::Busy) => Err(Answer::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ReasonCode::SERVER_BUSY,
            "too many failed logins or password checks: try later",
        )
        .retry(Duration::from_secs(1))),
        Err(Refusal::NotAuthorized) => {
            Err(Answer::new(StatusCode::FORBIDDEN, ReasonCode::NOT_AUTHORIZED, "not authorized"))
        }
        Err(Refusal::BadCredentials) => Err(bad()),
    }
}

/// The largest request body: one message of `mqtt.max_packet_size` as base64 (4/3) with
/// room for the JSON around it, and at least 4 MiB (a batch of smaller ones).
fn body_limit(shared: &SessionShared) -> usize {
    let one = (shared.limits.max_packet_size as usize).saturating_mul(4) / 3 + 64 * 1024;
    one.max(4 * 1024 * 1024)
}

/// One message's answer as the response.
fn respond(answer: Answer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let retry = answer.retry_after;
    let mut r = json_response(status, &answer, retry);
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"mqgate\""));
    }
    r
}

fn json_response(status: StatusCode, value: &impl Serialize, retry_after: Option<u64>) -> Response {
    let mut text = serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    let mut r =
        (status, [(header::CONTENT_TYPE, "application/json")], Body::from(text)).into_response();
    if let Some(s) = retry_after {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        respond(self)
    }
}
