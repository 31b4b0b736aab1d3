//! The HTTP sink: rule targets that send messages to REST endpoints (webhooks).
//!
//! One [`HttpEndpoint`] per configured `http.NAME`: a reqwest client (rustls, HTTP/2 when the
//! server offers it by ALPN, no redirects unless configured, no proxy), its default headers
//! (secrets from the environment, marked sensitive so they are never printed), and a
//! semaphore of `max_connections` requests in flight over all its targets.
//!
//! One [`HttpTarget`] per `- http:` target of a rule: `concurrency` lanes, each a task with a
//! bounded queue that sends one request (one message, or one batch) at a time. A message goes
//! to the lane its topic hashes to, so the messages of one topic are sent in order, also across
//! retries; different topics go out in parallel. Every request with an ack gets exactly one
//! [`Outcome`]: `Delivered` only for a 2xx answer (see `retry` for the classification), never
//! for a 4xx. This module does not route and does not decide what a device is told.
//!
//! Layout: `config` (the config sections and their checks), `template` (minijinja), `body`
//! (raw / json envelope / template bodies, batches, idempotency keys), `retry` (status
//! classification, Retry-After, backoff), `lane` (the worker loop).

mod body;
pub mod config;
mod conn;
mod kind;
mod lane;
mod retry;
pub mod template;

use std::fmt;
use std::hash::BuildHasher;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};
use thiserror::Error;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::deadletters::Recorder;
use crate::message::Message;
use crate::metrics::{HttpMetrics, Metrics, ReasonLabels, TargetMetrics};
use crate::targets::{AckSender, Failure, Outcome};

use crate::config::env::substitute_env;
use body::BodySpec;
use config::{BatchConfig, HttpEndpointConfig, HttpTargetConfig, RetryConfig};
pub use kind::HttpKind;
use template::{Kind, Needs, Template};

/// Reason label of `messages_dropped` for QoS 0 messages that found the target's lane full.
pub const DROPPED_QUEUE_FULL: &str = "http_queue_full";
/// Reason label of `messages_dropped` for QoS 0 messages still queued at shutdown.
pub const DROPPED_SHUTDOWN: &str = "http_shutdown";
/// The header carrying a message's (or batch's) idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// An endpoint or target that cannot be set up.
#[derive(Debug, Error)]
pub enum HttpError {
    /// The endpoint's client cannot be built (URL, header, TLS file).
    #[error("http.{endpoint}: {reason}")]
    Endpoint {
        /// The endpoint's key.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// A target's template or setting is invalid.
    #[error("rule {rule:?}: http target: {reason}")]
    Target {
        /// The rule's name.
        rule: String,
        /// What is wrong.
        reason: String,
    },
}

/// One message for one HTTP target.
#[derive(Debug)]
pub struct HttpRequest {
    /// The message.
    pub msg: Arc<Message>,
    /// `Some` for QoS 1/2: exactly one [`Outcome`] is reported on it. `None` for QoS 0.
    pub ack: Option<AckSender>,
    /// Where the message is kept if it fails for good (a 4xx or 3xx answer, a body or path
    /// that cannot be built): set for a session's messages when a store is configured; `None`
    /// for `Target::send` (its caller handles the outcome) and without a store.
    pub dead_letter: Option<Arc<Recorder>>,
}

/// A cheap-to-clone handle on one configured endpoint.
#[derive(Clone)]
pub struct HttpEndpoint {
    inner: Arc<Endpoint>,
}

/// What the targets of one endpoint share.
struct Endpoint {
    /// The key under `http:`, for logs, reasons and metric labels.
    name: String,
    /// The connection pool (reqwest's), with the default headers and timeouts: for `https://`
    /// endpoints and those that follow redirects.
    client: reqwest::Client,
    /// Our own HTTP/1.1 connections (`conn.rs`) for a plain `http://` endpoint without
    /// redirects; `None`: requests go through `client`.
    lean: Option<conn::Pool>,
    /// The default headers (and User-Agent) that `lean` requests carry (`client` adds its own).
    default_headers: HeaderMap,
    /// The whole request's time limit (`timeout`).
    timeout: std::time::Duration,
    /// The base URL without a trailing `/`; paths are appended to it.
    base: String,
    /// The base URL parsed, for requests without a path and the origin check.
    base_url: Url,
    /// `max_connections` permits: a request holds one while in flight.
    permits: Semaphore,
    /// Cancelled at shutdown: lanes stop taking messages and stop retrying.
    shutdown: CancellationToken,
    /// The lanes of every target of this endpoint, waited for at shutdown.
    tracker: TaskTracker,
}

impl HttpEndpoint {
    /// Builds the client of endpoint `name` (reads TLS files, resolves `${env:...}`).
    pub fn new(
        name: &str,
        cfg: &HttpEndpointConfig,
        shutdown: CancellationToken,
    ) -> Result<HttpEndpoint, HttpError> {
        let fail = |reason: String| HttpError::Endpoint { endpoint: name.to_owned(), reason };
        let url = substitute_env(&cfg.url.value).map_err(|e| fail(format!("url: {e}")))?;
        let base_url = Url::parse(&url).map_err(|e| fail(format!("url: {e}")))?;
        let mut headers = HeaderMap::new();
        for (header, value) in &cfg.headers {
            let hname = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| fail(format!("invalid header name {header:?}")))?;
            let text =
                substitute_env(&value.value).map_err(|e| fail(format!("headers.{header}: {e}")))?;
            let mut hvalue = HeaderValue::from_str(&text)
                .map_err(|_| fail(format!("headers.{header}: not a valid header value")))?;
            // Keeps it out of any Debug output.
            hvalue.set_sensitive(true);
            headers.insert(hname, hvalue);
        }
        let redirects = match cfg.max_redirects {
            0 => reqwest::redirect::Policy::none(),
            n => reqwest::redirect::Policy::limited(n),
        };
        let user_agent = HeaderValue::from_static(concat!("mqgate/", env!("CARGO_PKG_VERSION")));
        let mut default_headers = headers.clone();
        default_headers.insert(reqwest::header::USER_AGENT, user_agent);
        let lean = match (base_url.scheme(), base_url.host_str(), cfg.max_redirects) {
            ("http", Some(host), 0) => conn::Pool::new(
                host,
                base_url.port_or_known_default().unwrap_or(80),
                cfg.connect_timeout.0,
            ),
            _ => None,
        };
        let mut builder = reqwest::Client::builder()
            .default_headers(headers)
            .user_agent(concat!("mqgate/", env!("CARGO_PKG_VERSION")))
            .timeout(cfg.timeout.0)
            .connect_timeout(cfg.connect_timeout.0)
            .pool_max_idle_per_host(cfg.max_connections)
            .redirect(redirects)
            .no_proxy()
            .tcp_nodelay(true);
        if let Some(ca) = &cfg.tls.ca {
            let pem = std::fs::read(&ca.value)
                .map_err(|e| fail(format!("tls.ca: cannot read {}: {e}", ca.value.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| fail(format!("tls.ca: {}: {e}", ca.value.display())))?;
            builder = if cfg.tls.ca_only {
                builder.tls_certs_only(certs)
            } else {
                builder.tls_certs_merge(certs)
            };
        }
        if let (Some(cert), Some(key)) = (&cfg.tls.cert, &cfg.tls.key) {
            let mut pem = std::fs::read(&cert.value).map_err(|e| {
                fail(format!("tls.cert: cannot read {}: {e}", cert.value.display()))
            })?;
            pem.push(b'\n');
            pem.extend(
                std::fs::read(&key.value).map_err(|e| {
                    fail(format!("tls.key: cannot read {}: {e}", key.value.display()))
                })?,
            );
            let identity = reqwest::Identity::from_pem(&pem)
                .map_err(|e| fail(format!("tls.cert/tls.key: {e}")))?;
            builder = builder.identity(identity);
        }
        let client = builder.build().map_err(|e| fail(format!("cannot build the client: {e}")))?;
        Ok(HttpEndpoint {
            inner: Arc::new(Endpoint {
                name: name.to_owned(),
                client,
                lean,
                default_headers,
                timeout: cfg.timeout.0,
                base: base_url.as_str().trim_end_matches('/').to_owned(),
                base_url,
                permits: Semaphore::new(cfg.max_connections.max(1)),
                shutdown,
                tracker: TaskTracker::new(),
            }),
        })
    }

    /// The endpoint's key under `http:`.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Resolves when every lane of every target of this endpoint has ended after shutdown.
    /// The tracker is closed only then: a reload may start lanes of new targets on a kept
    /// endpoint at any time before (closed earlier, `wait` could end while it was empty and
    /// those lanes would not be waited for).
    pub async fn finished(self) {
        self.inner.shutdown.cancelled().await;
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

impl fmt::Debug for HttpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not the headers: they may hold secrets.
        f.debug_struct("HttpEndpoint").field("name", &self.inner.name).finish()
    }
}

/// A cheap-to-clone handle on one rule's HTTP target: its lanes' queues. Built without its
/// lanes running ([`HttpTarget::build`]); `Target::start` starts them.
#[derive(Clone)]
pub struct HttpTarget {
    inner: Arc<TargetHandle>,
}

/// What the handle holds.
struct TargetHandle {
    /// One bounded queue per lane.
    lanes: Vec<mpsc::Sender<HttpRequest>>,
    /// The lanes' receiving ends until `Target::start` hands them to the lane tasks.
    idle: std::sync::Mutex<Vec<mpsc::Receiver<HttpRequest>>>,
    /// What the lanes share (for failing requests here).
    spec: Arc<Spec>,
    /// `messages_dropped{reason="http_queue_full"}`.
    dropped_full: Counter,
    /// The target's stable id.
    id: String,
}

/// A target's compiled settings, shared by its lanes.
pub(crate) struct Spec {
    /// The endpoint.
    endpoint: HttpEndpoint,
    /// The rule's name, for logs.
    rule: String,
    /// Method of ordinary requests.
    method: Method,
    /// The path template; `None`: the endpoint's URL.
    path: Option<Template>,
    /// The URL when the path is static (no template), parsed once.
    static_url: Option<Url>,
    /// Header templates.
    headers: Vec<(HeaderName, Template)>,
    /// What the body is.
    body: BodySpec,
    /// Content-Type from the config.
    content_type: Option<HeaderValue>,
    /// Retained publish → PUT, empty retained → DELETE.
    retained_as_state: bool,
    /// Batching, when configured.
    batch: Option<BatchConfig>,
    /// Retry settings.
    retry: RetryConfig,
    /// What the templates read; `None` when no template is dynamic (no context is built).
    needs: Option<Needs>,
    /// Per rule and endpoint HTTP metrics.
    http: HttpMetrics,
    /// The rule target's forwarded/failed counters.
    target: TargetMetrics,
    /// `messages_dropped{reason="http_shutdown"}`.
    dropped_shutdown: Counter,
}

impl HttpTarget {
    /// Compiles the target `cfg` (id `id`) of rule `rule` on `endpoint`, its lanes' queues
    /// made but no lane running: nothing is spawned until `Target::start`.
    pub fn build(
        endpoint: &HttpEndpoint,
        id: &str,
        rule: &str,
        cfg: &HttpTargetConfig,
        metrics: &Metrics,
    ) -> Result<HttpTarget, HttpError> {
        let fail = |reason: String| HttpError::Target { rule: rule.to_owned(), reason };
        let method = Method::from_bytes(cfg.method.value.as_bytes())
            .map_err(|_| fail(format!("invalid method {:?}", cfg.method.value)))?;
        let path = match &cfg.path {
            Some(p) => Some(
                Template::compile(Kind::Path, &p.value).map_err(|e| fail(format!("path: {e}")))?,
            ),
            None => None,
        };
        let mut headers = Vec::new();
        for (name, value) in &cfg.headers {
            let hname = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| fail(format!("invalid header name {name:?}")))?;
            let t = Template::compile(Kind::Text, &value.value)
                .map_err(|e| fail(format!("header {name}: {e}")))?;
            headers.push((hname, t));
        }
        let body = BodySpec::parse(&cfg.body.value).map_err(|e| fail(format!("body: {e}")))?;
        let content_type = match &cfg.content_type {
            Some(ct) => Some(
                HeaderValue::from_str(&ct.value)
                    .map_err(|_| fail("invalid content_type".into()))?,
            ),
            None => None,
        };
        let mut dynamic: Vec<&Template> =
            path.iter().chain(headers.iter().map(|(_, t)| t)).collect();
        if cfg.batch.is_some() && dynamic.iter().any(|t| matches!(t, Template::Dynamic { .. })) {
            return Err(fail(
                "with `batch`, path and headers cannot depend on the message (a batch mixes \
                 topics); use a fixed path"
                    .into(),
            ));
        }
        if let BodySpec::Template(t) = &body {
            dynamic.push(t);
        }
        let needs = dynamic
            .iter()
            .filter(|t| matches!(t, Template::Dynamic { .. }))
            .fold(None, |acc: Option<Needs>, t| Some(acc.unwrap_or_default().merge(t.needs())));
        let ep = &endpoint.inner;
        let static_url = match &path {
            None => Some(ep.base_url.clone()),
            Some(Template::Static(p)) => Some(join_url(ep, p).map_err(fail)?),
            Some(Template::Dynamic { .. }) => None,
        };
        let label = match &cfg.path {
            Some(p) => format!("http:{}{}", ep.name, p.value),
            None => format!("http:{}", ep.name),
        };
        let spec = Arc::new(Spec {
            endpoint: endpoint.clone(),
            rule: rule.to_owned(),
            method,
            path,
            static_url,
            headers,
            body,
            content_type,
            retained_as_state: cfg.retained_as_state,
            batch: cfg.batch.clone(),
            retry: cfg.retry.clone(),
            needs,
            http: metrics.http.target(rule, &ep.name),
            target: metrics.target(rule, &label),
            dropped_shutdown: dropped(metrics, DROPPED_SHUTDOWN),
        });
        let (lanes, idle) =
            (0..cfg.concurrency.max(1)).map(|_| mpsc::channel(cfg.queue.max(1))).unzip();
        let dropped_full = dropped(metrics, DROPPED_QUEUE_FULL);
        let id = id.to_owned();
        let idle = std::sync::Mutex::new(idle);
        Ok(HttpTarget { inner: Arc::new(TargetHandle { lanes, idle, spec, dropped_full, id }) })
    }

    /// The lane of `topic`: the same topic always gets the same lane (order per topic).
    fn lane(&self, topic: &str) -> &mpsc::Sender<HttpRequest> {
        let lanes = &self.inner.lanes;
        let i = foldhash::fast::FixedState::with_seed(0x6d71_6761_7465).hash_one(topic);
        &lanes[(i % lanes.len() as u64) as usize]
    }

    /// Queues a message if its lane has room, without waiting. A QoS 0 message that finds
    /// the lane full is dropped and counted; a QoS 1/2 one is handed back (then
    /// [`publish`](Self::publish) waits for room: the backpressure).
    pub fn try_publish(&self, req: HttpRequest) -> Result<(), HttpRequest> {
        let spec = &self.inner.spec;
        spec.http.queue_depth.inc();
        match self.lane(&req.msg.topic).try_send(req) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(req)) => {
                spec.http.queue_depth.dec();
                if req.ack.is_some() {
                    return Err(req);
                }
                self.inner.dropped_full.inc();
                spec.target.failed.inc();
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(req)) => {
                spec.http.queue_depth.dec();
                spec.fail(req, "is not running");
                Ok(())
            }
        }
    }

    /// Queues a message, waiting while its lane is full.
    pub async fn publish(&self, req: HttpRequest) {
        let spec = &self.inner.spec;
        spec.http.queue_depth.inc();
        if let Err(mpsc::error::SendError(req)) = self.lane(&req.msg.topic).send(req).await {
            spec.http.queue_depth.dec();
            spec.fail(req, "is not running");
        }
    }
}

impl crate::targets::Target for HttpTarget {
    fn id(&self) -> &str {
        &self.inner.id
    }

    /// Spawns the lanes (once; tracked by the endpoint, which waits for them at shutdown).
    fn start(&self) {
        let idle = match self.inner.idle.lock() {
            Ok(mut idle) => std::mem::take(&mut *idle),
            Err(_) => return,
        };
        let spec = &self.inner.spec;
        let ep = &spec.endpoint.inner;
        for rx in idle {
            ep.tracker.spawn(lane::run(Arc::clone(spec), rx, ep.shutdown.clone()));
        }
    }

    fn explain(
        &self,
        msg: &Arc<Message>,
        _ctx: &mut crate::rules::LazyContext,
    ) -> crate::targets::Explained {
        self.inner.spec.explain(&self.inner.id, msg)
    }

    /// Queues the message on its topic's lane; the lane renders the templates.
    fn hand_over(
        &self,
        msg: &Arc<Message>,
        _ctx: &mut crate::rules::LazyContext,
        hand: &mut crate::targets::Handoff<'_>,
    ) -> Result<(), crate::template::TemplateError> {
        let req =
            HttpRequest { msg: Arc::clone(msg), ack: hand.ack(), dead_letter: hand.dead_letter() };
        hand.offer(
            req,
            |req| self.try_publish(req),
            |req| {
                let target = self.clone();
                Box::pin(async move { target.publish(req).await })
            },
        );
        Ok(())
    }
}

impl fmt::Debug for HttpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spec = &self.inner.spec;
        f.debug_struct("HttpTarget")
            .field("rule", &spec.rule)
            .field("endpoint", &spec.endpoint.inner.name)
            .field("lanes", &self.inner.lanes.len())
            .finish()
    }
}

impl Spec {
    /// Fails a request that will not be sent (retryable: the target is stopping or gone); a
    /// QoS 0 one is counted as dropped.
    fn fail(&self, req: HttpRequest, why: &str) {
        self.target.failed.inc();
        match req.ack {
            Some(ack) => {
                let reason = format!("http endpoint {} target {why}", self.endpoint.inner.name);
                let _ = ack.send(Outcome::Failed(Failure::retryable(reason)));
            }
            None => {
                self.dropped_shutdown.inc();
            }
        }
    }

    /// True when `msg` is sent as a state change (PUT/DELETE) rather than the configured way.
    fn is_state(&self, msg: &Message) -> bool {
        self.retained_as_state && msg.retain
    }
}

/// `base` + `path` (a `/` between them), refused when it would leave the endpoint's origin.
fn join_url(ep: &Endpoint, path: &str) -> Result<Url, String> {
    let joined = if path.starts_with('/') {
        format!("{}{path}", ep.base)
    } else {
        format!("{}/{path}", ep.base)
    };
    let url = Url::parse(&joined).map_err(|e| format!("the URL {joined:?} is invalid: {e}"))?;
    if url.origin() != ep.base_url.origin() {
        return Err(format!("the path {path:?} leaves the endpoint's origin"));
    }
    Ok(url)
}

/// The `messages_dropped` counter for `reason`, resolved once.
fn dropped(metrics: &Metrics, reason: &str) -> Counter {
    metrics.messages_dropped.get_or_create(&ReasonLabels { reason: reason.to_owned() }).clone()
}
