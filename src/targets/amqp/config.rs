//! The `amqp:` brokers and `- amqp:` rule targets of the config file, and their checks.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::config::types::{defined, unspanned, HumanDuration, Report};
use crate::rules::mapping::TopicMapping;
use crate::template;

/// `amqp.NAME:`: one AMQP 0-9-1 broker connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpBrokerConfig {
    /// amqp://user:pass@host:port/vhost (vhost URL-encoded, "%2f" for "/").
    pub url: Spanned<String>,
    /// Channels in confirm mode that publishes are spread over.
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Publishes awaiting a confirm, across the connection; at the bound, publishers wait.
    #[serde(default = "default_max_unconfirmed")]
    pub max_unconfirmed: usize,
    /// Publish requests queued in front of the connection.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Time allowed for the TCP and AMQP handshake.
    #[serde(default = "default_amqp_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// First reconnect delay; doubles after each failure up to `reconnect_max`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min: HumanDuration,
    /// Longest reconnect delay.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: HumanDuration,
    /// Default topic ↔ routing key mapping of this broker's targets (`plugin` or `lossless`).
    #[serde(default)]
    pub topic_mapping: TopicMapping,
    /// With `amqps://`: CAs, client certificate, server name (default: system roots, the
    /// URL's host, no client certificate).
    #[serde(default)]
    pub tls: Option<super::tls::AmqpTlsConfig>,
    /// `plain` (the URL's user and password) or `external` (the TLS client certificate).
    #[serde(default)]
    pub auth_mechanism: Option<Spanned<super::tls::AuthMechanism>>,
}

impl AmqpBrokerConfig {
    /// How the connection is secured and authenticated.
    pub(crate) fn security(&self) -> super::transport::Security {
        super::transport::Security {
            tls: self.tls.clone(),
            mechanism: self.auth_mechanism.as_ref().map(|m| m.value).unwrap_or_default(),
        }
    }
}

/// `unroutable:` of a `mandatory` target: what an MQTT 5 client is told when RabbitMQ returns
/// the message because no queue is bound for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnroutablePolicy {
    /// PUBACK/PUBREC 0x10 "No matching subscribers" (accepted, but nobody got it).
    #[default]
    NoMatchingSubscribers,
    /// PUBACK/PUBREC 0x80 "Unspecified error" with a reason string.
    Error,
}

/// A queue argument value (`arguments:` of a job-queue target).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ArgumentValue {
    /// A boolean.
    Bool(bool),
    /// An integer (e.g. `x-max-length`).
    Int(i64),
    /// A string (e.g. `x-queue-type: quorum`).
    Text(String),
}

/// `- amqp:` target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpTargetConfig {
    /// The target's stable id (spool keys, dead letters); default: derived from the rule's
    /// name and the broker and exchange or queue.
    #[serde(default)]
    pub id: Option<Spanned<String>>,
    /// Key of a broker under `amqp:`.
    pub broker: Spanned<String>,
    /// Exchange to publish to ("" is the default exchange); may be a template.
    #[serde(default = "default_exchange")]
    pub exchange: Spanned<String>,
    /// Fixed routing key or a template (`sensors.{{ levels[1] }}`). Default: the topic mapped
    /// by `topic_mapping` (sensors/a/telemetry -> sensors.a.telemetry).
    #[serde(default)]
    pub routing_key: Option<Spanned<String>>,
    /// Topic ↔ routing key mapping for this target; default: the broker's `topic_mapping`.
    #[serde(default)]
    pub topic_mapping: Option<TopicMapping>,
    /// Publish with AMQP's mandatory flag: a message no queue receives (basic.return) fails.
    #[serde(default)]
    pub mandatory: bool,
    /// With `mandatory`: what an MQTT 5 client is told about a returned message.
    #[serde(default)]
    pub unroutable: UnroutablePolicy,
    /// Also keep the topic's retained message in a durable per-topic last-value queue.
    #[serde(default)]
    pub last_value: bool,
    /// A job queue: publish through the default exchange to this durable queue, declared
    /// with `arguments`. Excludes `exchange` and `routing_key`.
    #[serde(default)]
    pub queue: Option<Spanned<String>>,
    /// Arguments of the `queue` declare (e.g. `x-queue-type: quorum`).
    #[serde(default)]
    pub arguments: BTreeMap<String, ArgumentValue>,
}

const fn default_channels() -> usize {
    2
}
const fn default_max_unconfirmed() -> usize {
    8192
}
const fn default_queue() -> usize {
    1024
}
const fn default_amqp_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
const fn default_reconnect_min() -> HumanDuration {
    HumanDuration(Duration::from_millis(100))
}
const fn default_reconnect_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_exchange() -> Spanned<String> {
    unspanned(String::new())
}

/// The checks of broker `amqp.NAME`.
pub fn validate_broker(name: &str, broker: &AmqpBrokerConfig, err: &mut Report<'_>) {
    let url = &broker.url.value;
    if !url.starts_with("amqp://") && !url.starts_with("amqps://") {
        err(&broker.url.referenced, format!("amqp.{name}.url must start with amqp:// or amqps://"));
    }
    super::tls::validate(
        &format!("amqp.{name}"),
        &broker.url,
        broker.tls.as_ref(),
        broker.auth_mechanism.as_ref(),
        &mut |at: &Location, m: String| err(at, m),
    );
    if broker.channels == 0 || broker.max_unconfirmed == 0 || broker.queue == 0 {
        err(
            &broker.url.referenced,
            format!("amqp.{name}: channels, max_unconfirmed and queue must be at least 1"),
        );
    }
}

/// The checks of an AMQP target of rule `name`: its broker, names, templates, job queue and
/// last-value options.
pub fn validate_target(
    name: &str,
    t: &AmqpTargetConfig,
    brokers: &BTreeMap<String, AmqpBrokerConfig>,
    err: &mut Report<'_>,
) {
    if !brokers.contains_key(&t.broker.value) {
        err(
            &t.broker.referenced,
            format!(
                "rule {name:?}: no broker {:?} under amqp: (defined: {})",
                t.broker.value,
                defined(brokers.keys())
            ),
        );
    }
    if t.exchange.value.len() > 255 {
        err(&t.exchange.referenced, "exchange name longer than 255 bytes".into());
    }
    if let Some(rk) = &t.routing_key {
        if rk.value.len() > 255 {
            err(&rk.referenced, "routing_key longer than 255 bytes".into());
        }
    }
    for (what, field) in [("exchange", Some(&t.exchange)), ("routing_key", t.routing_key.as_ref())]
    {
        let Some(field) = field else { continue };
        if template::is_template(&field.value) {
            if let Err(e) = template::check_template(&field.value) {
                err(&field.referenced, format!("rule {name:?}: {what}: {e}"));
            }
        }
    }
    match &t.queue {
        Some(q) => {
            if q.value.is_empty() || q.value.len() > 255 {
                err(&q.referenced, format!("rule {name:?}: queue: 1 to 255 bytes"));
            }
            if !t.exchange.value.is_empty() || t.routing_key.is_some() {
                err(
                    &q.referenced,
                    format!("rule {name:?}: a `queue:` target publishes through the default exchange; remove `exchange:` and `routing_key:`"),
                );
            }
        }
        None if !t.arguments.is_empty() => err(
            &t.broker.referenced,
            format!("rule {name:?}: `arguments:` needs `queue:` (they are the queue's declare arguments)"),
        ),
        None => {}
    }
}
