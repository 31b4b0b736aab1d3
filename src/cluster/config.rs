//! `cluster:`: this node's id, the `amqp:` broker the nodes share, and the prefix of every
//! AMQP name the cluster uses. Pure: parsing and checks.

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

/// `cluster:` in the config. Without it mqgate is a single node and nothing here runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id, unique in the cluster (`[A-Za-z0-9_.-]`, at most 64 bytes): it names
    /// the node's queue (`{prefix}.node.{node_id}`), which only one running node may hold.
    pub node_id: Spanned<String>,
    /// The `amqp:` broker (its name under `amqp:`) the nodes exchange messages through.
    pub broker: Spanned<String>,
    /// Prefix of the exchange and queues (`[A-Za-z0-9_.-]`, at most 64 bytes): nodes with the
    /// same prefix on the same broker (and vhost) are one cluster.
    #[serde(default = "default_prefix")]
    pub prefix: Spanned<String>,
    /// Messages waiting to be sent to the other nodes; when full, publishers wait (as for a
    /// full `amqp.*.queue`).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Messages from the other nodes RabbitMQ keeps for this node (its queue's
    /// `x-max-length`); beyond it the oldest are dropped by RabbitMQ.
    #[serde(default = "default_inbound_max")]
    pub inbound_max: u32,
}

fn default_prefix() -> Spanned<String> {
    crate::config::unspanned("mqgate".to_owned())
}
const fn default_queue() -> usize {
    8192
}
const fn default_inbound_max() -> u32 {
    100_000
}

/// Whether `name` is usable in AMQP names as a part: `[A-Za-z0-9_.-]`, 1 to 64 bytes.
fn valid_part(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl ClusterConfig {
    /// Reports what is wrong: ids, the prefix, a broker not under `amqp:` (`brokers`).
    pub fn validate(&self, brokers: &[&str], err: &mut dyn FnMut(&Location, String)) {
        if !valid_part(&self.node_id.value) {
            err(
                &self.node_id.referenced,
                format!(
                    "cluster.node_id {:?}: 1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '-'",
                    self.node_id.value
                ),
            );
        }
        if !valid_part(&self.prefix.value) {
            err(
                &self.prefix.referenced,
                format!(
                    "cluster.prefix {:?}: 1 to 64 characters of A-Z, a-z, 0-9, '_', '.', '-'",
                    self.prefix.value
                ),
            );
        }
        if !brokers.contains(&self.broker.value.as_str()) {
            let known = if brokers.is_empty() { "none".to_owned() } else { brokers.join(", ") };
            err(
                &self.broker.referenced,
                format!(
                    "cluster.broker {:?} is not a broker under amqp: (defined: {known})",
                    self.broker.value
                ),
            );
        }
        if self.queue == 0 {
            err(&self.node_id.referenced, "cluster.queue must be at least 1".into());
        }
        if self.inbound_max == 0 {
            err(&self.node_id.referenced, "cluster.inbound_max must be at least 1".into());
        }
    }

    /// The topic exchange every node publishes to.
    pub fn exchange(&self) -> String {
        format!("{}.messages", self.prefix.value)
    }

    /// This node's queue.
    pub fn node_queue(&self) -> String {
        format!("{}.node.{}", self.prefix.value, self.node_id.value)
    }
}
