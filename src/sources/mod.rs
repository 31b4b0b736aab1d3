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

mod acks;
pub mod amqp;
pub mod config;
pub mod mapping;

use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::SourceConfig;

use crate::broker::Broker;
use crate::config::Config;
use crate::metrics::Metrics;

/// Starts one task per configured source (the config is validated: every broker exists).
pub fn spawn_all(
    config: &Config,
    broker: &Arc<Broker>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for s in &config.sources {
        // Bridge sources run inside their bridge's connection (`targets::mqtt`).
        let Some(amqp_broker) = &s.broker else { continue };
        let Some(amqp) = config.amqp.get(&amqp_broker.value) else { continue };
        let settings = amqp::Settings::new(s, amqp);
        let m = metrics.source(&s.name.value);
        tasks.push(tokio::spawn(amqp::run(
            settings,
            Arc::clone(broker),
            m,
            shutdown.child_token(),
        )));
    }
    tasks
}
