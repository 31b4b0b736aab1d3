//! The `kafka:` section (Kafka clusters) and the `- kafka:` rule targets, and their checks.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use crate::config::types::{defined, HumanDuration, Report};
use crate::config::ByteSize;
use crate::targets::amqp::tls::AmqpTlsConfig;
use crate::template;

/// `kafka.NAME:`: one Kafka cluster, one idempotent producer (acks=all) shared by its targets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaClusterConfig {
    /// Bootstrap brokers, `host:port`.
    pub bootstrap: Spanned<Vec<String>>,
    /// SASL login (mechanism, username, password).
    #[serde(default)]
    pub sasl: Option<SaslConfig>,
    /// TLS to the brokers: `ca` (default: the system's roots), `cert` and `key` for a client
    /// certificate. `tls: {}` turns TLS on with the defaults.
    #[serde(default)]
    pub tls: Option<AmqpTlsConfig>,
    /// How long the producer waits to fill a batch (librdkafka `linger.ms`).
    #[serde(default = "default_linger")]
    pub linger: HumanDuration,
    /// Messages handed to the producer and not yet acknowledged by the cluster (count); at the
    /// bound, publishers wait (backpressure).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Bytes (payloads, keys, headers) handed to the producer and not yet acknowledged; the same
    /// policy at the bound.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: ByteSize,
    /// How long a message may take to be acknowledged, retries included, before it fails
    /// (retryable: the rule's ack policy decides; librdkafka `message.timeout.ms`).
    #[serde(default = "default_delivery_timeout")]
    pub delivery_timeout: HumanDuration,
    /// Batch compression: `none` (default), `gzip`, `snappy` or `lz4`.
    #[serde(default)]
    pub compression: Compression,
    /// Further librdkafka producer properties, as text (e.g. `client.id`, `batch.size`). Those
    /// mqgate sets for its promise (`acks`, `enable.idempotence`, the queue bounds) cannot be
    /// changed here.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

/// `kafka.NAME.sasl`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SaslConfig {
    /// `plain`, `scram-sha-256` or `scram-sha-512`.
    pub mechanism: Spanned<SaslMechanism>,
    /// User name.
    pub username: String,
    /// Password; may be `${env:NAME}` (resolved at start, never logged).
    pub password: Spanned<String>,
}

/// A SASL mechanism librdkafka speaks without Cyrus SASL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    /// SASL/PLAIN.
    #[serde(rename = "plain")]
    Plain,
    /// SCRAM-SHA-256.
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    /// SCRAM-SHA-512.
    #[serde(rename = "scram-sha-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's name of the mechanism.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Batch compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// None.
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
}

impl Compression {
    /// librdkafka's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
        }
    }
}

/// `- kafka:` in a rule's `to:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaTargetConfig {
    /// The cluster (a name under `kafka:`).
    pub cluster: Spanned<String>,
    /// The Kafka topic: text or a template over the message.
    pub topic: Spanned<String>,
    /// The record key: text or a template; default the MQTT topic name, so the records of one
    /// MQTT topic go to one partition, in order.
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    /// The target's stable id (spool keys, dead letters); default `RULE/kafka:CLUSTER/TOPIC`.
    #[serde(default)]
    pub id: Option<Spanned<String>>,
}

fn default_linger() -> HumanDuration {
    HumanDuration(Duration::from_millis(5))
}
const fn default_queue() -> usize {
    10_000
}
fn default_max_queued_bytes() -> ByteSize {
    ByteSize(64 * 1024 * 1024)
}
fn default_delivery_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// The librdkafka properties mqgate sets itself: `options:` may not change them.
pub const RESERVED_OPTIONS: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "linger.ms",
    "queue.buffering.max.ms",
    "compression.type",
    "compression.codec",
    "security.protocol",
    "sasl.mechanisms",
    "sasl.mechanism",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "enable.gapless.guarantee",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
];

/// The checks of cluster `kafka.NAME`.
pub fn validate_cluster(name: &str, c: &KafkaClusterConfig, err: &mut Report<'_>) {
    let at = &c.bootstrap.referenced;
    if c.bootstrap.value.is_empty() {
        err(at, format!("kafka.{name}.bootstrap: at least one host:port"));
    }
    for b in &c.bootstrap.value {
        let port = b.rsplit_once(':').and_then(|(h, p)| (!h.is_empty()).then_some(p));
        if port.and_then(|p| p.parse::<u16>().ok()).is_none_or(|p| p == 0) {
            err(at, format!("kafka.{name}.bootstrap: {b:?} is not host:port"));
        }
    }
    if c.queue == 0 || c.queue > 10_000_000 {
        err(at, format!("kafka.{name}.queue: 1 to 10000000"));
    }
    // librdkafka's byte bound is in KiB, at most 2 GiB.
    if c.max_queued_bytes.0 < 1024 || c.max_queued_bytes.0 > (1 << 31) {
        err(at, format!("kafka.{name}.max_queued_bytes: 1KiB to 2GiB"));
    }
    if c.delivery_timeout.0 < Duration::from_millis(100)
        || c.delivery_timeout.0.as_millis() > i32::MAX as u128
    {
        err(at, format!("kafka.{name}.delivery_timeout: 100ms to 24d"));
    }
    if c.linger.0 > Duration::from_secs(900) {
        err(at, format!("kafka.{name}.linger: at most 15m"));
    }
    if let Some(s) = &c.sasl {
        if let Err(e) = crate::config::env::substitute_env(&s.password.value) {
            err(&s.password.referenced, format!("kafka.{name}.sasl.password: {e}"));
        }
    }
    if let Some(tls) = &c.tls {
        if tls.server_name.is_some() {
            err(at, format!("kafka.{name}.tls.server_name: not supported (librdkafka verifies each broker's advertised host name)"));
        }
        if tls.cert.is_some() != tls.key.is_some() {
            err(at, format!("kafka.{name}.tls: cert and key go together"));
        }
        for p in [&tls.ca, &tls.cert, &tls.key].into_iter().flatten() {
            if let Err(e) = std::fs::metadata(&p.value) {
                err(&p.referenced, format!("kafka.{name}.tls: {}: {e}", p.value.display()));
            }
        }
    }
    for key in c.options.keys() {
        if RESERVED_OPTIONS.contains(&key.as_str()) {
            err(
                at,
                format!(
                    "kafka.{name}.options: {key:?} is set by mqgate (see the cluster's own keys)"
                ),
            );
        }
    }
}

/// The checks of a Kafka target of rule `rule`.
pub fn validate_target(
    rule: &str,
    t: &KafkaTargetConfig,
    clusters: &BTreeMap<String, KafkaClusterConfig>,
    err: &mut Report<'_>,
) {
    if !clusters.contains_key(&t.cluster.value) {
        err(
            &t.cluster.referenced,
            format!(
                "rule {rule:?}: no cluster {:?} under kafka: (defined: {})",
                t.cluster.value,
                defined(clusters.keys())
            ),
        );
    }
    if template::is_template(&t.topic.value) {
        if let Err(e) = template::check_template(&t.topic.value) {
            err(&t.topic.referenced, format!("rule {rule:?}: topic: {e}"));
        }
    } else if let Err(e) = check_topic_name(&t.topic.value) {
        err(&t.topic.referenced, format!("rule {rule:?}: topic: {e}"));
    }
    if let Some(key) = &t.key {
        if template::is_template(&key.value) {
            if let Err(e) = template::check_template(&key.value) {
                err(&key.referenced, format!("rule {rule:?}: key: {e}"));
            }
        }
    }
}

/// Kafka's rule for topic names: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err(format!("{name:?}: a Kafka topic has 1 to 249 characters"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a Kafka topic name"));
    }
    if let Some(c) =
        name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{name:?}: {c:?} is not allowed in a Kafka topic (letters, digits, '.', '_', '-')"
        ));
    }
    Ok(())
}

/// Where a target's problems are reported.
pub fn location(t: &KafkaTargetConfig) -> &Location {
    &t.cluster.referenced
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(check_topic_name("telemetry.a-b_c").is_ok());
        assert!(check_topic_name("").is_err());
        assert!(check_topic_name("..").is_err());
        assert!(check_topic_name("a/b").is_err());
        assert!(check_topic_name(&"x".repeat(250)).is_err());
    }
}
