//! Sources: AMQP → MQTT (downlink). Each entry of `sources:` consumes one AMQP queue and
//! publishes its messages to the MQTT side, acking each AMQP delivery only once MQTT has taken
//! responsibility for it (see `broker::tracking`).
//!
//! - `config.rs`: the `sources:` config and its checks.
//! - `mapping.rs`: delivery → MQTT topic, QoS, RETAIN and MQTT 5 properties (pure).
//! - `amqp.rs`: the consumer task of one source (connection, consume loop, ack/nack,
//!   reconnect); `acks.rs` coalesces its acks into `multiple` ones.
//!
//! A source never routes to rules (AMQP → MQTT → AMQP loops cannot happen through it) and
//! never writes to a client's socket: it hands messages to the broker like any publisher.

pub(crate) mod acks;
pub mod amqp;
pub mod amqp10;
pub mod config;
pub mod mapping;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::SourceConfig;

use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::Metrics;

/// What a source kind starts its sources with.
pub struct SourceContext<'a> {
    /// Where their messages are published (tracked).
    pub broker: &'a Arc<Broker>,
    /// The metrics.
    pub metrics: &'a Metrics,
    /// Cancelled at shutdown.
    pub shutdown: &'a CancellationToken,
    /// The target kinds' running systems (a bridge carries its sources' subscriptions).
    pub systems: &'a crate::targets::kinds::Systems,
    /// The gateway's tasks.
    pub tasks: &'a mut tokio::task::JoinSet<()>,
}

/// One kind of source: where messages come in from another system. The contract every kind
/// keeps (the model is the AMQP source): each message is published into the broker tracked
/// (`broker::tracking`), and acknowledged to the other system only once MQTT has taken it.
pub trait SourceKind {
    /// Whether this kind runs `source` (by its keys: `broker:` AMQP, `bridge:` MQTT).
    fn claims(source: &SourceConfig) -> bool;

    /// Starts `source` (the config is validated).
    fn start(source: &SourceConfig, config: &Config, at: &mut SourceContext<'_>);
}

/// The registry of source kinds: one line per kind.
macro_rules! source_kinds {
    ($($kind:ty),* $(,)?) => {
        /// Starts every configured source with the kind that claims it.
        pub fn start_all(config: &Config, at: &mut SourceContext<'_>) {
            for s in &config.sources {
                start_one(s, config, at);
            }
        }

        /// Starts one source with the kind that claims it (a reload starts the sources it
        /// added or changed, each with a shutdown of its own).
        pub fn start_one(s: &SourceConfig, config: &Config, at: &mut SourceContext<'_>) {
            $(
                if <$kind>::claims(s) {
                    <$kind>::start(s, config, at);
                    return;
                }
            )*
        }
    };
}

source_kinds! {
    AmqpSourceKind,
    Amqp10SourceKind,
    crate::targets::mqtt::MqttSourceKind,
}

/// AMQP queues (`broker:` + `queue:`): one consumer task per source.
pub struct AmqpSourceKind;

impl SourceKind for AmqpSourceKind {
    fn claims(source: &SourceConfig) -> bool {
        source.broker.is_some()
    }

    fn start(s: &SourceConfig, config: &Config, at: &mut SourceContext<'_>) {
        let Some(amqp_broker) = &s.broker else { return };
        let Some(amqp) = config.amqp.get(&amqp_broker.value) else { return };
        let settings = amqp::Settings::new(s, amqp);
        let m = at.metrics.source(&s.name.value);
        let handle =
            tokio::spawn(amqp::run(settings, Arc::clone(at.broker), m, at.shutdown.child_token()));
        at.tasks.spawn(async move {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "source task failed");
            }
        });
    }
}

/// AMQP 1.0 addresses (`amqp10:` + `address:`): one receiver task per source.
pub struct Amqp10SourceKind;

impl SourceKind for Amqp10SourceKind {
    fn claims(source: &SourceConfig) -> bool {
        source.amqp10.is_some()
    }

    fn start(s: &SourceConfig, config: &Config, at: &mut SourceContext<'_>) {
        let Some(name) = &s.amqp10 else { return };
        let Some(b) = config.amqp10.get(&name.value) else { return };
        let settings = amqp10::Settings::new(s, &name.value, b);
        let m = at.metrics.source(&s.name.value);
        let handle = tokio::spawn(amqp10::run(
            settings,
            Arc::clone(at.broker),
            m,
            at.shutdown.child_token(),
        ));
        at.tasks.spawn(async move {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "source task failed");
            }
        });
    }
}
