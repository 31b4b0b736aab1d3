//! The `http:` endpoints and `- http:` rule targets of the config file, and their checks.
//!
//! Parsed by serde with the rest of [`crate::config`]; [`validate`] is called from
//! `Config::validate` so every problem is reported with its file, line and column. Secrets
//! written as `${env:NAME}` are resolved here ([`substitute_env`]) and never logged: an error
//! names the variable, never its value.

use crate::config::env::substitute_env;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::config::types::{defined, HumanDuration, Report};

use super::template;

/// `http.NAME:`: one HTTP endpoint (a base URL and how to talk to it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpEndpointConfig {
    /// Base URL, `http://` or `https://`; a target's `path` is appended to it. May contain
    /// `${env:NAME}`.
    pub url: Spanned<String>,
    /// Headers sent with every request; values may contain `${env:NAME}` (resolved at start,
    /// never logged).
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    /// Time allowed for one request, from sending to the end of the response.
    #[serde(default = "default_timeout")]
    pub timeout: HumanDuration,
    /// Time allowed to open a connection (TCP and TLS).
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Requests in flight to this endpoint at once, over all its targets (so at most this many
    /// connections); further requests wait for one to finish.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Redirects followed per request; 0 (the default) follows none: a 3xx answer is a
    /// permanent failure (a redirect could point the gateway anywhere: request forgery).
    #[serde(default)]
    pub max_redirects: usize,
    /// TLS settings for `https://` URLs (system roots unless `ca_only`).
    #[serde(default)]
    pub tls: HttpTlsConfig,
}

/// `http.NAME.tls:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTlsConfig {
    /// A PEM file of CA certificates trusted in addition to the system's roots.
    #[serde(default)]
    pub ca: Option<Spanned<PathBuf>>,
    /// Trust only `ca`, not the system's roots.
    #[serde(default)]
    pub ca_only: bool,
    /// A PEM client certificate (chain) for mutual TLS; needs `key`.
    #[serde(default)]
    pub cert: Option<Spanned<PathBuf>>,
    /// The PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<Spanned<PathBuf>>,
}

/// `- http:` target of a rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTargetConfig {
    /// The target's stable id (spool keys, dead letters); default: derived from the rule's
    /// name, the endpoint and the path.
    #[serde(default)]
    pub id: Option<Spanned<String>>,
    /// Key of an endpoint under `http:`.
    pub endpoint: Spanned<String>,
    /// HTTP method; default POST.
    #[serde(default = "default_method")]
    pub method: Spanned<String>,
    /// Path appended to the endpoint's URL: a template (`/alerts/{{ topic[1] }}`); values
    /// written with `{{ }}` are percent-encoded, `/` kept. Default: the endpoint URL as is.
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    /// Extra headers; values are templates.
    #[serde(default)]
    pub headers: BTreeMap<String, Spanned<String>>,
    /// `raw` (the payload as is), `json` (an envelope with topic, payload, QoS...), or a
    /// template that renders the body.
    #[serde(default = "default_body")]
    pub body: Spanned<String>,
    /// Content-Type of the body. Default: `raw` the MQTT 5 content type or
    /// `application/octet-stream`; `json` `application/json`; a template
    /// `text/plain; charset=utf-8`.
    #[serde(default)]
    pub content_type: Option<Spanned<String>>,
    /// A retained publish becomes a PUT of the resource at `path`, and a retained publish with
    /// an empty payload a DELETE of it (the topic's current value as REST state).
    #[serde(default)]
    pub retained_as_state: bool,
    /// Several messages per request; absent: one message per request.
    #[serde(default)]
    pub batch: Option<BatchConfig>,
    /// Worker lanes of this target: messages of one topic always go through the same lane, in
    /// order; different topics go through up to this many lanes at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Messages waiting per lane. When full, QoS 1/2 publishers wait (backpressure); QoS 0
    /// messages are dropped and counted (`messages_dropped{reason="http_queue_full"}`).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// How failed requests are retried.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// `batch:` of an HTTP target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most messages in one request.
    #[serde(default = "default_batch_messages")]
    pub max_messages: usize,
    /// Most body bytes in one request (a single larger message goes alone).
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: usize,
    /// Longest a message waits for others to fill its batch.
    #[serde(default = "default_batch_delay")]
    pub max_delay: HumanDuration,
    /// `json` (a JSON array, the default) or `ndjson` (one JSON document per line).
    #[serde(default)]
    pub format: BatchFormat,
}

/// How a batch body is framed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchFormat {
    /// `[m1, m2, ...]`, Content-Type `application/json`.
    #[default]
    Json,
    /// `m1\nm2\n...`, Content-Type `application/x-ndjson`.
    Ndjson,
}

/// `retry:` of an HTTP target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Requests per message (or batch) at most, the first included; 1 = no retry.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Longest time from the first attempt after which no retry is started.
    #[serde(default = "default_max_time")]
    pub max_time: HumanDuration,
    /// Delay before the first retry; doubles for each further one (with jitter).
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: HumanDuration,
    /// Longest delay between two attempts (a server's Retry-After is honoured above it, as
    /// long as `max_time` allows).
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: default_attempts(),
            max_time: default_max_time(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

const fn default_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
const fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
const fn default_max_connections() -> usize {
    64
}
fn default_method() -> Spanned<String> {
    Spanned::new("POST".to_owned(), Location::UNKNOWN, Location::UNKNOWN)
}
fn default_body() -> Spanned<String> {
    Spanned::new("raw".to_owned(), Location::UNKNOWN, Location::UNKNOWN)
}
const fn default_concurrency() -> usize {
    8
}
const fn default_queue() -> usize {
    256
}
const fn default_batch_messages() -> usize {
    100
}
const fn default_batch_bytes() -> usize {
    1024 * 1024
}
const fn default_batch_delay() -> HumanDuration {
    HumanDuration(Duration::from_millis(20))
}
const fn default_attempts() -> u32 {
    5
}
const fn default_max_time() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
const fn default_initial_backoff() -> HumanDuration {
    HumanDuration(Duration::from_millis(100))
}
const fn default_max_backoff() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// Checks the `http:` section and every `- http:` target; reports through `err`.
/// Checks every endpoint under `http:`.
pub fn validate_endpoints(endpoints: &BTreeMap<String, HttpEndpointConfig>, err: &mut Report<'_>) {
    for (name, ep) in endpoints {
        validate_endpoint(name, ep, &mut *err);
    }
}

fn validate_endpoint(name: &str, ep: &HttpEndpointConfig, err: &mut Report<'_>) {
    let at = &ep.url.referenced;
    match substitute_env(&ep.url.value) {
        Err(e) => err(at, format!("http.{name}.url: {e}")),
        Ok(url) => match reqwest::Url::parse(&url) {
            Err(e) => err(at, format!("http.{name}.url: not a URL ({e})")),
            Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                err(at, format!("http.{name}.url must start with http:// or https://"))
            }
            Ok(u) if u.query().is_some() || u.fragment().is_some() => {
                err(at, format!("http.{name}.url: no query or fragment in a base URL"))
            }
            Ok(_) => {}
        },
    }
    for (header, value) in &ep.headers {
        if reqwest::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
            err(&value.referenced, format!("http.{name}.headers: invalid header name {header:?}"));
        }
        match substitute_env(&value.value) {
            Err(e) => err(&value.referenced, format!("http.{name}.headers.{header}: {e}")),
            Ok(v) => {
                if reqwest::header::HeaderValue::from_str(&v).is_err() {
                    // The value may be a secret: never quote it.
                    err(
                        &value.referenced,
                        format!("http.{name}.headers.{header}: not a valid header value"),
                    );
                }
            }
        }
    }
    if ep.max_connections == 0 {
        err(at, format!("http.{name}.max_connections must be at least 1"));
    }
    if ep.timeout.0.is_zero() || ep.connect_timeout.0.is_zero() {
        err(at, format!("http.{name}: timeout and connect_timeout must be > 0"));
    }
    for (key, path) in [("ca", &ep.tls.ca), ("cert", &ep.tls.cert), ("key", &ep.tls.key)] {
        if let Some(p) = path {
            if let Err(e) = std::fs::metadata(&p.value) {
                err(
                    &p.referenced,
                    format!("http.{name}.tls.{key}: cannot read {}: {e}", p.value.display()),
                );
            }
        }
    }
    if ep.tls.cert.is_some() != ep.tls.key.is_some() {
        err(at, format!("http.{name}.tls: `cert` and `key` go together"));
    }
    if ep.tls.ca_only && ep.tls.ca.is_none() {
        err(at, format!("http.{name}.tls: `ca_only` needs `ca`"));
    }
}

/// The checks of an HTTP target of rule `rule`.
pub fn validate_target(
    rule: &str,
    t: &HttpTargetConfig,
    endpoints: &BTreeMap<String, HttpEndpointConfig>,
    err: &mut Report<'_>,
) {
    if !endpoints.contains_key(&t.endpoint.value) {
        err(
            &t.endpoint.referenced,
            format!(
                "rule {rule:?}: no endpoint {:?} under http: (defined: {})",
                t.endpoint.value,
                defined(endpoints.keys())
            ),
        );
    }
    if reqwest::Method::from_bytes(t.method.value.as_bytes()).is_err() {
        err(&t.method.referenced, format!("rule {rule:?}: invalid HTTP method"));
    }
    let check = |what: &str,
                 kind: template::Kind,
                 text: &Spanned<String>,
                 err: &mut dyn FnMut(&Location, String)| {
        match template::Template::compile(kind, &text.value) {
            Err(e) => {
                err(&text.referenced, format!("rule {rule:?}: http {what}: {e}"));
                false
            }
            Ok(t) => matches!(t, template::Template::Dynamic { .. }),
        }
    };
    let mut dynamic = false;
    if let Some(path) = &t.path {
        dynamic |= check("path", template::Kind::Path, path, err);
    }
    for (name, value) in &t.headers {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            err(&value.referenced, format!("rule {rule:?}: invalid header name {name:?}"));
        }
        dynamic |= check("header", template::Kind::Text, value, err);
    }
    if !matches!(t.body.value.as_str(), "raw" | "json") {
        check("body", template::Kind::Text, &t.body, err);
    }
    if dynamic && t.batch.is_some() {
        err(
            &t.endpoint.referenced,
            format!("rule {rule:?}: with http `batch`, path and headers cannot use templates (a batch mixes messages)"),
        );
    }
    if let Some(ct) = &t.content_type {
        if reqwest::header::HeaderValue::from_str(&ct.value).is_err() {
            err(&ct.referenced, format!("rule {rule:?}: invalid content_type"));
        }
    }
    let at = &t.endpoint.referenced;
    if t.concurrency == 0 || t.queue == 0 || t.retry.attempts == 0 {
        err(at, format!("rule {rule:?}: http concurrency, queue and retry.attempts must be >= 1"));
    }
    if let Some(b) = &t.batch {
        if b.max_messages == 0 || b.max_bytes == 0 {
            err(at, format!("rule {rule:?}: http batch max_messages and max_bytes must be >= 1"));
        }
    }
}
