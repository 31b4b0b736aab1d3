//! The `bridges:` section (upstream MQTT brokers) and the `- mqtt:` rule targets, and their
//! checks.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::config::types::{defined, HumanDuration, Report};
use crate::targets::amqp::tls::AmqpTlsConfig;
use crate::template;

/// `bridges.NAME:`: one upstream MQTT broker, one connection carrying both directions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeConfig {
    /// `mqtt://host:1883`, `mqtts://host:8883`, `ws://host:8080/mqtt`, `wss://host:8443/mqtt`.
    pub url: Spanned<String>,
    /// The MQTT version spoken upstream: `5` (default) or `3.1.1`.
    #[serde(default)]
    pub version: BridgeVersion,
    /// The client id mqgate connects with (keep it stable for a persistent upstream session).
    pub client_id: Spanned<String>,
    /// User name, if the upstream wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password; may be `${env:NAME}` (resolved at start, never logged).
    #[serde(default)]
    pub password: Option<Spanned<String>>,
    /// With `mqtts://`/`wss://`: CAs (default: the system's roots), client certificate and key,
    /// the server name to verify (default: the URL's host).
    #[serde(default)]
    pub tls: Option<AmqpTlsConfig>,
    /// Clean Start (3.1.1: Clean Session). Default false: a persistent upstream session, so
    /// messages published upstream while the bridge was down arrive when it is back.
    #[serde(default)]
    pub clean_start: bool,
    /// MQTT 5 Session Expiry Interval asked for (default 1 day).
    #[serde(default = "default_session_expiry")]
    pub session_expiry: HumanDuration,
    /// Keep alive (default 30 s; 0 disables).
    #[serde(default = "default_keepalive")]
    pub keepalive: HumanDuration,
    /// Time allowed for TCP, TLS, WebSocket and the CONNECT/CONNACK exchange.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// First reconnect delay; doubles after each failure up to `reconnect_max`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    /// Longest reconnect delay.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
    /// Unacknowledged QoS 1/2 PUBLISHes upstream at once (also bounded by the upstream's
    /// Receive Maximum, MQTT 5).
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Connections to the upstream (default 1): messages are spread over them by topic
    /// (order per topic kept), each with its own in-flight window (the upstream's Receive
    /// Maximum is per connection). More than one only for a bridge without `bridge:` sources
    /// (No Local works per connection).
    #[serde(default = "default_connections")]
    pub connections: usize,
    /// Messages queued for the upstream (count, per connection); at the bound, QoS 1/2 publishers wait
    /// (backpressure) and QoS 0 messages are dropped (counted).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Bytes (payloads and topics) queued for the upstream; the same policy at the bound.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: crate::config::ByteSize,
    /// Largest packet accepted from the upstream.
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: u32,
}

/// The MQTT version spoken upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BridgeVersion {
    /// MQTT 5.0 (No Local subscriptions, reason codes passed back to MQTT 5 devices).
    #[default]
    V5,
    /// MQTT 3.1.1.
    V311,
}

impl<'de> Deserialize<'de> for BridgeVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Float(f64),
            Text(String),
        }
        let bad = |v: &str| serde::de::Error::custom(format!("version {v}: write 5 or \"3.1.1\""));
        match Raw::deserialize(d)? {
            Raw::Int(5) => Ok(BridgeVersion::V5),
            Raw::Int(n) => Err(bad(&n.to_string())),
            Raw::Float(f) => Err(bad(&f.to_string())),
            Raw::Text(t) => match t.as_str() {
                "5" | "5.0" => Ok(BridgeVersion::V5),
                "3.1.1" | "4" => Ok(BridgeVersion::V311),
                _ => Err(bad(&t)),
            },
        }
    }
}

/// `retain:` of an MQTT target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetainPolicy {
    /// The RETAIN flag as the device published it.
    #[default]
    AsPublished,
    /// Always set.
    True,
    /// Never set.
    False,
}

/// `- mqtt:` target: publish to an upstream broker through a bridge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTargetConfig {
    /// Key of a bridge under `bridges:`.
    pub bridge: Spanned<String>,
    /// The upstream topic: a template (`site-1/{{ topic_name }}`); default the topic as is.
    #[serde(default)]
    pub topic: Option<Spanned<String>>,
    /// QoS of the upstream PUBLISH: 0, 1 or 2; default the message's own.
    #[serde(default)]
    pub qos: Option<Spanned<u8>>,
    /// RETAIN upstream: `as_published` (default), `true` or `false`.
    #[serde(default)]
    pub retain: RetainPolicy,
    /// The target's stable id; default `RULE/mqtt:BRIDGE/TOPIC`.
    #[serde(default)]
    pub id: Option<Spanned<String>>,
}

fn default_session_expiry() -> HumanDuration {
    HumanDuration(Duration::from_secs(86_400))
}
fn default_keepalive() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(100))
}
fn default_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
const fn default_max_inflight() -> u16 {
    256
}
const fn default_connections() -> usize {
    1
}
const fn default_queue() -> usize {
    1024
}
fn default_max_queued_bytes() -> crate::config::ByteSize {
    crate::config::ByteSize(16 * 1024 * 1024)
}
const fn default_max_packet_size() -> u32 {
    1024 * 1024
}

/// The parts of a bridge URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeUrl {
    /// `mqtt`, `mqtts`, `ws` or `wss`.
    pub scheme: String,
    /// Host name or address.
    pub host: String,
    /// Port (default 1883, 8883, 80, 443).
    pub port: u16,
    /// The WebSocket path (default `/mqtt`).
    pub path: String,
}

impl BridgeUrl {
    /// Parses `url`.
    pub fn parse(url: &str) -> Result<BridgeUrl, String> {
        let (scheme, rest) =
            url.split_once("://").ok_or("no scheme (mqtt://, mqtts://, ws://, wss://)")?;
        let default_port = match scheme {
            "mqtt" => 1883,
            "mqtts" => 8883,
            "ws" => 80,
            "wss" => 443,
            _ => return Err(format!("scheme {scheme:?}: mqtt, mqtts, ws or wss")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err("no user or password in the URL: use username: and password:".into());
        }
        let port_of = |p: &str| p.parse::<u16>().map_err(|_| format!("port {p:?}"));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, rest) = v6.split_once(']').ok_or("unclosed `[` in the host")?;
            match rest.strip_prefix(':') {
                Some(p) => (host, port_of(p)?),
                None if rest.is_empty() => (host, default_port),
                None => return Err(format!("{rest:?} after the host")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, port_of(p)?),
                None => (authority, default_port),
            }
        };
        if host.is_empty() {
            return Err("no host".into());
        }
        let path = match (scheme, path) {
            ("ws" | "wss", "") => "/mqtt".to_owned(),
            ("ws" | "wss", p) => p.to_owned(),
            (_, "" | "/") => String::new(),
            (_, p) => return Err(format!("an mqtt:// URL has no path ({p:?})")),
        };
        Ok(BridgeUrl { scheme: scheme.to_owned(), host: host.to_owned(), port, path })
    }

    /// Whether the connection is TLS.
    pub fn tls(&self) -> bool {
        matches!(self.scheme.as_str(), "mqtts" | "wss")
    }

    /// Whether it is a WebSocket.
    pub fn websocket(&self) -> bool {
        matches!(self.scheme.as_str(), "ws" | "wss")
    }
}

impl BridgeConfig {
    /// Makes relative TLS file names relative to the config file's folder.
    pub fn resolve_paths(&mut self, config_file: &Path) {
        if let Some(tls) = &mut self.tls {
            tls.resolve_paths(config_file);
        }
    }
}

/// The checks of bridge `bridges.NAME`.
pub fn validate_bridge(name: &str, b: &BridgeConfig, err: &mut Report<'_>) {
    let at = &b.url.referenced;
    match BridgeUrl::parse(&b.url.value) {
        Err(e) => err(at, format!("bridges.{name}.url: {e}")),
        Ok(u) => {
            if b.tls.is_some() && !u.tls() {
                err(at, format!("bridges.{name}: tls: needs an mqtts:// or wss:// URL"));
            }
        }
    }
    if let Some(tls) = &b.tls {
        if tls.cert.is_some() != tls.key.is_some() {
            err(at, format!("bridges.{name}.tls: cert and key go together"));
        }
        for p in [&tls.ca, &tls.cert, &tls.key].into_iter().flatten() {
            if let Err(e) = std::fs::metadata(&p.value) {
                err(
                    &p.referenced,
                    format!("bridges.{name}.tls: cannot read {}: {e}", p.value.display()),
                );
            }
        }
    }
    if b.client_id.value.is_empty() || b.client_id.value.len() > 65_535 {
        err(&b.client_id.referenced, format!("bridges.{name}.client_id: 1 to 65535 bytes"));
    }
    if let Some(p) = &b.password {
        if let Err(e) = crate::config::env::substitute_env(&p.value) {
            err(&p.referenced, format!("bridges.{name}.password: {e}"));
        }
    }
    if b.max_inflight == 0 || b.queue == 0 || b.max_queued_bytes.0 == 0 {
        err(
            at,
            format!("bridges.{name}: max_inflight, queue and max_queued_bytes must be at least 1"),
        );
    }
    if b.connections == 0 || b.connections > 64 {
        err(at, format!("bridges.{name}.connections: 1 to 64"));
    }
    if b.keepalive.0.as_secs() > u64::from(u16::MAX) {
        err(at, format!("bridges.{name}.keepalive: at most 65535 s"));
    }
}

/// The checks of an MQTT target of rule `rule`.
pub fn validate_target(
    rule: &str,
    t: &MqttTargetConfig,
    bridges: &BTreeMap<String, BridgeConfig>,
    err: &mut Report<'_>,
) {
    if !bridges.contains_key(&t.bridge.value) {
        err(
            &t.bridge.referenced,
            format!(
                "rule {rule:?}: no bridge {:?} under bridges: (defined: {})",
                t.bridge.value,
                defined(bridges.keys())
            ),
        );
    }
    if let Some(topic) = &t.topic {
        if template::is_template(&topic.value) {
            if let Err(e) = template::check_template(&topic.value) {
                err(&topic.referenced, format!("rule {rule:?}: topic: {e}"));
            }
        } else if let Err(e) = crate::mqtt::topic::validate_name(&topic.value) {
            err(&topic.referenced, format!("rule {rule:?}: topic: {e}"));
        }
    }
    if let Some(q) = &t.qos {
        if q.value > 2 {
            err(&q.referenced, format!("rule {rule:?}: qos must be 0, 1 or 2"));
        }
    }
}

/// Where a target's problems are reported.
pub fn location(t: &MqttTargetConfig) -> &Location {
    &t.bridge.referenced
}
