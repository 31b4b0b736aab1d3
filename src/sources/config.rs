//! `sources:` in the config: AMQP queues (`broker:` + `queue:`) and upstream MQTT brokers
//! (`bridge:` + `subscribe:`) whose messages mqgate publishes to MQTT.
//!
//! The serde structs and their checks (called from `Config::validate`, so errors carry
//! file:line:column like every other config error). No I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use super::mapping::TopicTemplate;
use crate::config::HumanDuration;

/// One entry of `sources:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Unique name; labels the source's metrics and its AMQP connection.
    pub name: Spanned<String>,
    /// Key of a broker under `amqp:` (its URL and reconnect delays are used): an AMQP source.
    #[serde(default)]
    pub broker: Option<Spanned<String>>,
    /// The queue to consume (AMQP). Must exist unless `declare:` is given.
    #[serde(default)]
    pub queue: Option<Spanned<String>>,
    /// Key of a bridge under `bridges:`: an MQTT source (the bridge's upstream broker).
    #[serde(default)]
    pub bridge: Option<Spanned<String>>,
    /// Key of a broker under `amqp10:`: an AMQP 1.0 source (a receiver link on `address:`).
    #[serde(default)]
    pub amqp10: Option<Spanned<String>>,
    /// The address an AMQP 1.0 source receives from (e.g. `/amq/queue/commands` on RabbitMQ,
    /// a queue name on Artemis).
    #[serde(default)]
    pub address: Option<Spanned<String>>,
    /// Upstream topic filters to subscribe to (MQTT sources).
    #[serde(default)]
    pub subscribe: Vec<Spanned<String>>,
    /// Declare the queue (idempotent; a mismatch with an existing queue is a broker error).
    #[serde(default)]
    pub declare: Option<DeclareConfig>,
    /// Bindings made (after declaring) from exchanges to the queue.
    #[serde(default)]
    pub bind: Vec<BindConfig>,
    /// Unacknowledged deliveries at once (AMQP `basic.qos`), 1..=65535: what bounds the
    /// messages mqgate holds for this source.
    #[serde(default = "default_prefetch")]
    pub prefetch: Spanned<u32>,
    /// MQTT topic template: `{{ routing_key }}` (the routing key with '.' → '/'),
    /// `{{ exchange }}`, `{{ queue }}`, `{{ header.NAME }}`. Default: the routing key with
    /// '.' → '/' and '*' → '+' (RabbitMQ's MQTT plugin mapping, reversed).
    #[serde(default)]
    pub topic: Option<Spanned<String>>,
    /// QoS of the MQTT publish when the message has no `qos_header`.
    #[serde(default = "default_qos")]
    pub qos: Spanned<u8>,
    /// Header whose integer value (0, 1, 2) sets the QoS per message; "" to ignore headers.
    #[serde(default = "default_qos_header")]
    pub qos_header: String,
    /// RETAIN flag when the message has no `x-mqtt-retain` header.
    #[serde(default)]
    pub retain: bool,
    /// `broadcast` (every matching subscriber) or `work` (one of them).
    #[serde(default)]
    pub mode: SourceMode,
    /// With `cluster:`, where a broadcast source's messages go: `local` (this node's
    /// subscribers: run the source with a queue per node) or `forward` (every node's
    /// subscribers and every persistent session, parked or on another node, as an MQTT
    /// publish is: run it with one queue every node consumes).
    #[serde(default)]
    pub cluster: SourceCluster,
    /// A message that matches no subscriber: `requeue`, `dead_letter` or `drop`.
    #[serde(default)]
    pub on_no_subscriber: NackPolicy,
    /// A message that could not be delivered (full queue, refused, unusable topic).
    #[serde(default)]
    pub on_failure: NackPolicy,
    /// How long a message to requeue is held before the nack (so that a message nobody
    /// takes does not spin between RabbitMQ and mqgate).
    #[serde(default = "default_requeue_delay")]
    pub requeue_delay: HumanDuration,
}

/// `declare:` of a source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclareConfig {
    /// Survives a broker restart.
    #[serde(default = "default_true")]
    pub durable: bool,
    /// Deleted when the source's consumer goes.
    #[serde(default)]
    pub auto_delete: bool,
    /// Queue arguments, e.g. `x-queue-type: quorum`, `x-dead-letter-exchange: dlx`,
    /// `x-max-length: 10000`.
    #[serde(default)]
    pub arguments: BTreeMap<String, ArgumentValue>,
}

pub use crate::config::ArgumentValue;

/// One `bind:` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindConfig {
    /// The exchange to bind from (must exist).
    pub exchange: Spanned<String>,
    /// The binding key (e.g. `devices.*.commands`, `#`).
    #[serde(default = "default_binding_key")]
    pub routing_key: Spanned<String>,
}

/// How a source distributes messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceMode {
    /// Every matching subscription gets it (MQTT fan-out).
    #[default]
    Broadcast,
    /// One matching session (or share group) gets it, round robin (a job queue).
    Work,
}

/// Where a source's messages go in a cluster (`cluster:` of a source).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceCluster {
    /// This node's subscribers (and its persistent sessions while connected here).
    #[default]
    Local,
    /// Forwarded as an MQTT publish on this node is: every node's subscribers and every
    /// persistent session's queue; acknowledged once RabbitMQ confirmed it too.
    Forward,
}

/// What is done with a message that cannot be delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NackPolicy {
    /// `basic.nack` with requeue, after `requeue_delay`: RabbitMQ delivers it again.
    #[default]
    Requeue,
    /// `basic.nack` without requeue: RabbitMQ dead-letters it (the queue's
    /// `x-dead-letter-exchange`) or drops it.
    DeadLetter,
    /// `basic.ack`: dropped, as MQTT drops a message nobody subscribed to.
    Drop,
}

fn default_prefetch() -> Spanned<u32> {
    Spanned::new(256, Location::UNKNOWN, Location::UNKNOWN)
}
fn default_qos() -> Spanned<u8> {
    Spanned::new(1, Location::UNKNOWN, Location::UNKNOWN)
}
fn default_qos_header() -> String {
    "x-mqtt-qos".to_owned()
}
const fn default_true() -> bool {
    true
}
fn default_binding_key() -> Spanned<String> {
    Spanned::new("#".to_owned(), Location::UNKNOWN, Location::UNKNOWN)
}
const fn default_requeue_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}

/// Checks `sources` against the configured AMQP brokers and bridges; reports each problem
/// with where it is.
pub fn validate(
    sources: &[SourceConfig],
    brokers: &[&str],
    amqp10_brokers: &[&str],
    bridges: &[&str],
    err: &mut impl FnMut(&Location, String),
) {
    let mut names = std::collections::HashSet::new();
    for s in sources {
        let name = &s.name.value;
        if name.is_empty() {
            err(&s.name.referenced, "sources: empty name".into());
        }
        if !names.insert(name.as_str()) {
            err(&s.name.referenced, format!("duplicate source name {name:?}"));
        }
        if let Some(b) = &s.amqp10 {
            validate_amqp10(s, b, amqp10_brokers, err);
        } else if let Some(a) = &s.address {
            err(
                &a.referenced,
                format!("source {name:?}: `address:` is for AMQP 1.0 sources (`amqp10:`)"),
            );
        }
        match (&s.broker, &s.bridge) {
            _ if s.amqp10.is_some() => {}
            (Some(broker), None) => {
                if !brokers.contains(&broker.value.as_str()) {
                    let known = if brokers.is_empty() { "none".into() } else { brokers.join(", ") };
                    err(
                        &broker.referenced,
                        format!(
                            "source {name:?}: no broker {:?} under amqp: (defined: {known})",
                            broker.value
                        ),
                    );
                }
                match &s.queue {
                    Some(q) if q.value.is_empty() || q.value.len() > 255 => {
                        err(&q.referenced, format!("source {name:?}: queue must be 1 to 255 bytes"))
                    }
                    Some(_) => {}
                    None => err(
                        &s.name.referenced,
                        format!("source {name:?}: an AMQP source needs `queue:`"),
                    ),
                }
                if let Some(f) = s.subscribe.first() {
                    err(&f.referenced, format!("source {name:?}: `subscribe:` is for `bridge:` sources; an AMQP source consumes `queue:`"));
                }
            }
            (None, Some(bridge)) => {
                if !bridges.contains(&bridge.value.as_str()) {
                    let known = if bridges.is_empty() { "none".into() } else { bridges.join(", ") };
                    err(
                        &bridge.referenced,
                        format!(
                            "source {name:?}: no bridge {:?} under bridges: (defined: {known})",
                            bridge.value
                        ),
                    );
                }
                if s.subscribe.is_empty() {
                    err(&bridge.referenced, format!("source {name:?}: a bridge source needs `subscribe:` (upstream filters)"));
                }
                for f in &s.subscribe {
                    if let Err(e) = crate::mqtt::topic::validate_filter(&f.value) {
                        err(&f.referenced, format!("source {name:?}: subscribe: {e}"));
                    }
                }
                if let Some(q) = &s.queue {
                    err(
                        &q.referenced,
                        format!("source {name:?}: `queue:` is for AMQP sources (`broker:`)"),
                    );
                }
                if s.declare.is_some() || !s.bind.is_empty() {
                    err(
                        &bridge.referenced,
                        format!("source {name:?}: `declare:` and `bind:` are for AMQP sources"),
                    );
                }
            }
            _ => err(
                &s.name.referenced,
                format!(
                    "source {name:?}: give exactly one of `broker:` (AMQP), `amqp10:` (AMQP 1.0) or `bridge:` (MQTT)"
                ),
            ),
        }
        if !(1..=65_535).contains(&s.prefetch.value) {
            err(&s.prefetch.referenced, format!("source {name:?}: prefetch must be 1..=65535"));
        }
        if s.qos.value > 2 {
            err(&s.qos.referenced, format!("source {name:?}: qos must be 0, 1 or 2"));
        }
        if let Some(t) = &s.topic {
            let checked = if s.amqp10.is_some() {
                crate::mqtt::topic::validate_name(&t.value)
                    .map_err(|e| format!("{e} (an AMQP 1.0 source's topic is a topic name)"))
            } else if s.bridge.is_some() {
                crate::template::check_template(&t.value).map_err(|e| e.to_string())
            } else {
                TopicTemplate::parse(&t.value).map(|_| ()).map_err(|e| e.to_string())
            };
            if let Err(e) = checked {
                err(&t.referenced, format!("source {name:?}: topic: {e}"));
            }
        }
        for b in &s.bind {
            if b.exchange.value.len() > 255 {
                err(&b.exchange.referenced, format!("source {name:?}: exchange name too long"));
            }
            if b.routing_key.value.len() > 255 {
                err(&b.routing_key.referenced, format!("source {name:?}: routing_key too long"));
            }
        }
    }
}

/// The checks of an AMQP 1.0 source (`amqp10:` broker `b`).
fn validate_amqp10(
    s: &SourceConfig,
    b: &Spanned<String>,
    amqp10_brokers: &[&str],
    err: &mut impl FnMut(&Location, String),
) {
    let name = &s.name.value;
    if s.broker.is_some() || s.bridge.is_some() {
        err(
            &b.referenced,
            format!("source {name:?}: give exactly one of `broker:` (AMQP), `amqp10:` (AMQP 1.0) or `bridge:` (MQTT)"),
        );
    }
    if !amqp10_brokers.contains(&b.value.as_str()) {
        let known =
            if amqp10_brokers.is_empty() { "none".into() } else { amqp10_brokers.join(", ") };
        err(
            &b.referenced,
            format!("source {name:?}: no broker {:?} under amqp10: (defined: {known})", b.value),
        );
    }
    match &s.address {
        Some(a) => {
            if let Err(e) = crate::targets::amqp10::config::check_address(&a.value) {
                err(&a.referenced, format!("source {name:?}: address: {e}"));
            }
        }
        None => err(&b.referenced, format!("source {name:?}: an AMQP 1.0 source needs `address:`")),
    }
    if let Some(q) = &s.queue {
        err(&q.referenced, format!("source {name:?}: `queue:` is for AMQP 0-9-1 sources; an AMQP 1.0 source receives from `address:`"));
    }
    if let Some(f) = s.subscribe.first() {
        err(&f.referenced, format!("source {name:?}: `subscribe:` is for `bridge:` sources"));
    }
    if s.declare.is_some() || !s.bind.is_empty() {
        err(
            &b.referenced,
            format!("source {name:?}: `declare:` and `bind:` are for AMQP 0-9-1 sources"),
        );
    }
}
