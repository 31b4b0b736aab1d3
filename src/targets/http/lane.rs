//! One lane of an HTTP target: a task that takes messages from its bounded queue and sends
//! them one request at a time (one message, or one batch), retrying a request until it is
//! delivered, fails for good, or runs out of attempts or time. Because a lane never starts the
//! next request before the current one is settled, messages of one topic (always the same
//! lane) reach the endpoint in order.
//!
//! Every message taken from the queue gets exactly one outcome; at shutdown the lane finishes
//! the attempt in flight, retries nothing more, and fails what is still queued (retryable).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use minijinja::value::Value;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{Method, Url};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use url::Position;

use super::body::{self, BatchBody, BodySpec};
use super::conn::SendError;
use super::retry::{self, Verdict};
use super::template::Template;
use super::{join_url, HttpRequest, Spec, IDEMPOTENCY_KEY};
use crate::message::Message;
use crate::targets::{Explained, Failure, Outcome};
use crate::template::MessageContext;

/// Response bytes read (and dropped) so the connection can be reused; a longer body is cut.
const MAX_DRAIN: usize = 64 * 1024;

/// Runs one lane until shutdown or until every sender is gone.
pub(super) async fn run(
    spec: Arc<Spec>,
    rx: mpsc::Receiver<HttpRequest>,
    shutdown: CancellationToken,
) {
    let mut lane = Lane { spec, rx, shutdown, carry: None, size_hint: 0 };
    while let Some(first) = lane.next().await {
        if lane.spec.batch.is_some() && !lane.spec.is_state(&first.msg) {
            lane.batch(first).await;
        } else {
            lane.single(first).await;
        }
    }
    lane.reject_queued();
}

/// A lane's state.
struct Lane {
    /// The target's settings.
    spec: Arc<Spec>,
    /// The lane's queue.
    rx: mpsc::Receiver<HttpRequest>,
    /// The endpoint's shutdown.
    shutdown: CancellationToken,
    /// A message taken while filling a batch that could not join it (a state change, or one
    /// over `max_bytes`): the next one to send.
    carry: Option<HttpRequest>,
    /// The size of the last batch body: the next one's buffer starts a quarter larger (the
    /// last, not the largest, so one outsized batch does not make every later buffer large).
    size_hint: usize,
}

impl Lane {
    /// The next message: the carried one, or the next from the queue; `None` at shutdown or
    /// when the queue is closed and empty.
    async fn next(&mut self) -> Option<HttpRequest> {
        if let Some(r) = self.carry.take() {
            return Some(r);
        }
        let r = tokio::select! {
            biased;
            () = self.shutdown.cancelled() => None,
            r = self.rx.recv() => r,
        }?;
        self.spec.http.queue_depth.dec();
        Some(r)
    }

    /// Sends one message in its own request.
    async fn single(&mut self, req: HttpRequest) {
        let spec = Arc::clone(&self.spec);
        let outcome = self.deliver(|| spec.build_single(&req.msg)).await;
        self.resolve(vec![req], outcome);
    }

    /// Fills a batch starting with `first` (up to `max_messages`, `max_bytes`, or until
    /// `max_delay` passed), then sends it as one request. Each element is written straight
    /// into the body as its message is taken from the queue.
    async fn batch(&mut self, first: HttpRequest) {
        let Some(cfg) = self.spec.batch.clone() else { return self.single(first).await };
        let deadline = tokio::time::Instant::now() + cfg.max_delay.0;
        let mut reqs = Vec::with_capacity(cfg.max_messages.min(1024));
        // Room for the last body and a quarter more: a batch rarely reallocates.
        let hint = self.size_hint + self.size_hint / 4;
        let mut body = BatchBody::new(cfg.format, hint);
        let mut next = Some(first);
        // Taken from the queue but not yet counted out of its depth gauge (one update per
        // batch, not per message).
        let mut taken: i64 = 0;
        loop {
            if let Some(req) = next.take() {
                let ctx = match &self.spec.body {
                    BodySpec::Template(_) => self.spec.context(&req.msg),
                    _ => None,
                };
                match body.push(&self.spec.body, &req.msg, ctx.as_ref(), cfg.max_bytes) {
                    Ok(true) => reqs.push(req),
                    Ok(false) => {
                        self.carry = Some(req);
                        break;
                    }
                    Err(reason) => self.resolve(vec![req], Outcome::Failed(Failure::fatal(reason))),
                }
            }
            if reqs.len() >= cfg.max_messages || body.element_bytes() >= cfg.max_bytes {
                break;
            }
            let req = match self.rx.try_recv() {
                Ok(r) => r,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    let r = tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => None,
                        () = tokio::time::sleep_until(deadline) => None,
                        r = self.rx.recv() => r,
                    };
                    match r {
                        Some(r) => r,
                        None => break,
                    }
                }
            };
            taken += 1;
            if self.spec.is_state(&req.msg) {
                // Sent alone, after this batch: order per topic holds.
                self.carry = Some(req);
                break;
            }
            next = Some(req);
        }
        self.spec.http.queue_depth.dec_by(taken);
        if reqs.is_empty() {
            return;
        }
        let key = body::batch_key(reqs.iter().map(|r| &*r.msg));
        let body = body.finish();
        self.size_hint = body.len();
        let spec = Arc::clone(&self.spec);
        let outcome =
            self.deliver(|| spec.build_batch(body.clone(), cfg.format, key.clone())).await;
        self.resolve(reqs, outcome);
    }

    /// Sends the request until it is settled; the outcome of every message in it.
    /// The request is built by `build` for each attempt (a retry is rare, so this is cheaper
    /// than keeping a clone of every request for one); a build error is a permanent failure.
    async fn deliver(&mut self, build: impl Fn() -> Result<Outgoing, String>) -> Outcome {
        let spec = Arc::clone(&self.spec);
        let ep = &spec.endpoint.inner;
        let retry = &spec.retry;
        let started = Instant::now();
        let mut attempt = 1u32;
        loop {
            let req = match build() {
                Ok(req) => req,
                Err(reason) => return Outcome::Failed(Failure::fatal(reason)),
            };
            let (reason, after) = match self.attempt(req).await {
                Verdict::Delivered => return Outcome::Delivered,
                Verdict::Permanent(reason) => {
                    return Outcome::Failed(Failure::fatal(format!(
                        "http endpoint {}: {reason}",
                        ep.name
                    )))
                }
                Verdict::Retry { reason, after } => (reason, after),
            };
            let give_up = |why: &str| {
                Outcome::Failed(Failure::retryable(format!(
                    "http endpoint {}: {reason} (attempt {attempt}; {why})",
                    ep.name
                )))
            };
            if attempt >= retry.attempts {
                return give_up("no attempts left");
            }
            if self.shutdown.is_cancelled() {
                return give_up("shutting down");
            }
            let delay = after.unwrap_or_else(|| {
                retry::backoff(attempt, retry.initial_backoff.0, retry.max_backoff.0)
            });
            if started.elapsed() + delay > retry.max_time.0 {
                return give_up("the next retry would pass retry.max_time");
            }
            debug!(endpoint = %ep.name, rule = %spec.rule, %reason, attempt, ?delay, "HTTP request failed; retrying");
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.shutdown.cancelled() => return give_up("shutting down"),
            }
            attempt += 1;
            spec.http.retries.inc();
        }
    }

    /// One attempt: waits for a connection permit, sends, reads the status and drains the body.
    async fn attempt(&self, out: Outgoing) -> Verdict {
        let spec = &self.spec;
        let ep = &spec.endpoint.inner;
        let Ok(_permit) = ep.permits.acquire().await else {
            return Verdict::Retry { reason: "endpoint closed".into(), after: None };
        };
        spec.http.requests.inc();
        let t0 = Instant::now();
        let answer = match &ep.lean {
            Some(pool) => match out.into_hyper(&ep.default_headers) {
                Err(reason) => Err(Verdict::Permanent(reason)),
                Ok(req) => {
                    match tokio::time::timeout(ep.timeout, pool.send(req, MAX_DRAIN)).await {
                        Ok(Ok(a)) => Ok((a.status, a.retry_after)),
                        Ok(Err(SendError::Connect(e))) => Err(Verdict::Retry {
                            reason: format!("cannot connect: {e}"),
                            after: None,
                        }),
                        Ok(Err(SendError::Request(e))) => Err(Verdict::Retry {
                            reason: format!("request failed: {e}"),
                            after: None,
                        }),
                        Err(_) => Err(Verdict::Retry {
                            reason: format!("timeout: no answer within {:?}", ep.timeout),
                            after: None,
                        }),
                    }
                }
            },
            None => match ep.client.execute(out.into_reqwest()).await {
                Ok(mut resp) => {
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let mut read = 0;
                    while read < MAX_DRAIN {
                        match resp.chunk().await {
                            Ok(Some(c)) => read += c.len(),
                            _ => break,
                        }
                    }
                    Ok((status, retry_after))
                }
                Err(e) => Err(retry::classify_error(e)),
            },
        };
        let verdict = match answer {
            Ok((status, retry_after)) => {
                let class = match status.as_u16() {
                    200..=299 => 0,
                    300..=399 => 1,
                    400..=499 => 2,
                    _ => 3,
                };
                spec.http.responses[class].inc();
                retry::classify_status(status, retry_after.as_deref(), SystemTime::now())
            }
            Err(verdict) => {
                spec.http.responses[4].inc();
                verdict
            }
        };
        spec.http.latency.observe(t0.elapsed().as_secs_f64());
        verdict
    }

    /// Reports `outcome` for every message of a request, and counts them.
    fn resolve(&self, reqs: Vec<HttpRequest>, outcome: Outcome) {
        let spec = &self.spec;
        if let Outcome::Failed(f) = &outcome {
            warn!(endpoint = %spec.endpoint.inner.name, rule = %spec.rule, reason = %f.reason, retryable = f.retryable, messages = reqs.len(), "HTTP target did not take the message(s)");
        }
        let counter = match &outcome {
            Outcome::Delivered => &spec.target.forwarded,
            Outcome::Failed(_) => &spec.target.failed,
        };
        counter.inc_by(reqs.len() as u64);
        for req in reqs {
            if let (Outcome::Failed(f), Some(r)) = (&outcome, &req.dead_letter) {
                if !f.retryable {
                    r.record(&req.msg, &f.reason);
                }
            }
            if let Some(ack) = req.ack {
                let _ = ack.send(outcome.clone());
            }
        }
    }

    /// Stops taking messages and fails those still queued (retryable: resent by the client).
    fn reject_queued(&mut self) {
        self.rx.close();
        if let Some(req) = self.carry.take() {
            self.spec.fail(req, "is shutting down");
        }
        while let Ok(req) = self.rx.try_recv() {
            self.spec.http.queue_depth.dec();
            self.spec.fail(req, "is shutting down");
        }
    }
}

impl Spec {
    /// The template context of `msg`, when a template needs one.
    fn context(&self, msg: &Arc<Message>) -> Option<Value> {
        self.needs.map(|_| MessageContext::value(msg))
    }

    /// The request for `msg` alone.
    fn build_single(&self, msg: &Arc<Message>) -> Result<Outgoing, String> {
        let ctx = self.context(msg);
        let url = match (&self.static_url, &self.path) {
            (Some(u), _) => u.clone(),
            (None, Some(t)) => {
                let ctx = ctx.as_ref().ok_or("no template context")?;
                let path = t.render(ctx).map_err(|e| format!("path {e}"))?;
                join_url(&self.endpoint.inner, &path)?
            }
            (None, None) => self.endpoint.inner.base_url.clone(),
        };
        let (method, with_body) = match (self.is_state(msg), msg.payload.is_empty()) {
            (true, true) => (Method::DELETE, false),
            (true, false) => (Method::PUT, true),
            (false, _) => (self.method.clone(), true),
        };
        let mut req = Outgoing::new(method, url);
        let headers = &mut req.headers;
        for (name, t) in &self.headers {
            let value = match (t, &ctx) {
                (Template::Static(s), _) => HeaderValue::from_str(s),
                (_, Some(ctx)) => {
                    let v = t.render(ctx).map_err(|e| format!("header {name}: {e}"))?;
                    HeaderValue::from_str(&v)
                }
                (_, None) => return Err("no template context".into()),
            }
            .map_err(|_| {
                format!("header {name}: the rendered value is not a valid header value")
            })?;
            headers.insert(name.clone(), value);
        }
        if let Some(key) = body::idempotency_key(msg) {
            headers
                .insert(IDEMPOTENCY_KEY, HeaderValue::from_str(&key).map_err(|e| e.to_string())?);
        }
        if with_body {
            let content_type = match (&self.content_type, self.body.default_content_type(msg)) {
                (Some(ct), _) => ct.clone(),
                (None, Cow::Borrowed(ct)) => HeaderValue::from_static(ct),
                (None, Cow::Owned(ct)) => HeaderValue::from_str(&ct)
                    .unwrap_or(HeaderValue::from_static("application/octet-stream")),
            };
            headers.insert(CONTENT_TYPE, content_type);
            req.body = Some(self.body.single(msg, ctx.as_ref())?);
        }
        Ok(req)
    }

    /// The request carrying a batch (path and headers are static: checked at start).
    fn build_batch(
        &self,
        body: Bytes,
        format: super::config::BatchFormat,
        key: Option<String>,
    ) -> Result<Outgoing, String> {
        let url = self.static_url.clone().ok_or("a batch needs a fixed path")?;
        let mut req = Outgoing::new(self.method.clone(), url);
        let headers = &mut req.headers;
        for (name, t) in &self.headers {
            if let Template::Static(s) = t {
                let v = HeaderValue::from_str(s)
                    .map_err(|_| format!("header {name}: invalid value"))?;
                headers.insert(name.clone(), v);
            }
        }
        if let Some(key) = key {
            headers
                .insert(IDEMPOTENCY_KEY, HeaderValue::from_str(&key).map_err(|e| e.to_string())?);
        }
        let ct = match &self.content_type {
            Some(ct) => ct.clone(),
            None => HeaderValue::from_static(body::batch_content_type(format)),
        };
        headers.insert(CONTENT_TYPE, ct);
        req.body = Some(body);
        Ok(req)
    }
}

/// A request as a lane builds it, before it is handed to a client (see `conn.rs`).
struct Outgoing {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Bytes>,
}

impl Outgoing {
    fn new(method: Method, url: Url) -> Self {
        Outgoing { method, url, headers: HeaderMap::new(), body: None }
    }

    /// For reqwest (absolute URL; reqwest adds the endpoint's default headers itself).
    fn into_reqwest(self) -> reqwest::Request {
        let mut req = reqwest::Request::new(self.method, self.url);
        *req.headers_mut() = self.headers;
        if let Some(b) = self.body {
            *req.body_mut() = Some(b.into());
        }
        req
    }

    /// For our own HTTP/1.1 client: origin-form URI, the endpoint's default headers first
    /// (the request's own replace them).
    fn into_hyper(self, defaults: &HeaderMap) -> Result<hyper::Request<Full<Bytes>>, String> {
        let uri: hyper::Uri = self.url[Position::BeforePath..]
            .parse()
            .map_err(|e| format!("invalid request path: {e}"))?;
        let mut headers = defaults.clone();
        let mut last = None;
        for (name, value) in self.headers {
            // `None`: another value of the previous name.
            match (name, &last) {
                (Some(name), _) => {
                    headers.insert(name.clone(), value);
                    last = Some(name);
                }
                (None, Some(name)) => {
                    headers.append(name.clone(), value);
                }
                (None, None) => {}
            }
        }
        let mut req = hyper::Request::new(Full::new(self.body.unwrap_or_default()));
        *req.method_mut() = self.method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Ok(req)
    }
}

impl Spec {
    /// What [`Spec::build_single`] makes of `msg`, for the route dry-run: method, URL, the
    /// request's headers (the endpoint's own headers by name only: they may hold secrets),
    /// body.
    pub(super) fn explain(&self, id: &str, msg: &Arc<Message>) -> Explained {
        let ep = &self.endpoint.inner;
        let mut e = Explained::new(id, "http");
        e.field("endpoint", ep.name.as_str());
        match self.build_single(msg) {
            Ok(out) => {
                e.field("method", out.method.as_str());
                e.field("url", out.url.as_str());
                let mut headers = serde_json::Map::new();
                for (name, value) in &ep.default_headers {
                    let shown = if name == reqwest::header::USER_AGENT {
                        value.to_str().unwrap_or("").to_owned()
                    } else {
                        "(the endpoint's header: not shown)".to_owned()
                    };
                    headers.insert(name.as_str().to_owned(), shown.into());
                }
                for (name, value) in &out.headers {
                    let text = value.to_str().unwrap_or("(not printable)");
                    headers.insert(name.as_str().to_owned(), text.into());
                }
                e.field("headers", headers);
                match out.body.as_deref().map(std::str::from_utf8) {
                    None => e.field("body", serde_json::Value::Null),
                    Some(Ok(text)) => e.field("body", text),
                    Some(Err(_)) => {
                        use base64::Engine;
                        let bytes = out.body.unwrap_or_default();
                        e.field(
                            "body_base64",
                            base64::engine::general_purpose::STANDARD.encode(bytes),
                        );
                    }
                }
            }
            Err(reason) => e.error = Some(reason),
        }
        if msg.packet_id.is_none() && msg.qos != crate::mqtt::codec::QoS::AtMostOnce {
            e.note(
                "an MQTT QoS 1/2 PUBLISH also gets an Idempotency-Key header (from its packet id)",
            );
        }
        if let (Some(batch), false) = (&self.batch, self.is_state(msg)) {
            e.note(format!(
                "batched: this body is one element of a {} body of up to {} messages",
                match batch.format {
                    super::config::BatchFormat::Json => "JSON array",
                    super::config::BatchFormat::Ndjson => "NDJSON",
                },
                batch.max_messages
            ));
        }
        e
    }
}
