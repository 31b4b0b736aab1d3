//! The cluster's metric families (registered always, zero without `cluster:`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `direction` of `mqgate_cluster_messages_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `out` (sent to the other nodes), `in` (from another node, delivered here), `own` (this
    /// node's own, back through its bindings, dropped).
    pub direction: &'static str,
}

/// `event` of `mqgate_cluster_share_deliveries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShareLabels {
    /// `held` (a share queue's message waited: every member's queue here was full),
    /// `returned` (a share queue's delivery went back to RabbitMQ: no member here could take
    /// a message of it).
    pub event: &'static str,
}

/// The cluster's families.
#[derive(Clone, Default, Debug)]
pub struct ClusterFamilies {
    /// Messages by direction.
    pub messages: Family<DirectionLabels, Counter>,
    /// 1 while the node's cluster link is up.
    pub connected: Gauge,
    /// Binding keys of the node's queue (its distinct coarse subscription keys).
    pub bindings: Gauge,
    /// Share-queue deliveries held back or returned.
    pub share: Family<ShareLabels, Counter>,
}

impl ClusterFamilies {
    /// Registers the families.
    pub fn register(registry: &mut Registry) -> ClusterFamilies {
        let f = ClusterFamilies::default();
        registry.register(
            "cluster_messages",
            "Messages between this node and the cluster, by direction (out, in, own: this node's own back, dropped)",
            f.messages.clone(),
        );
        registry.register(
            "cluster_connected",
            "1 while the node's cluster link to RabbitMQ is up",
            f.connected.clone(),
        );
        registry.register(
            "cluster_bindings",
            "Binding keys of the node's cluster queue (distinct coarse keys of its subscriptions)",
            f.bindings.clone(),
        );
        registry.register(
            "cluster_share_deliveries",
            "Share-queue messages held back (every member's queue here full) and deliveries returned to RabbitMQ (no member here could take them)",
            f.share.clone(),
        );
        f
    }

    /// The counter of share-queue `event`, to resolve once.
    pub fn share(&self, event: &'static str) -> Counter {
        self.share.get_or_create(&ShareLabels { event }).clone()
    }

    /// The counter of `direction`, to resolve once.
    pub fn direction(&self, direction: &'static str) -> Counter {
        self.messages.get_or_create(&DirectionLabels { direction }).clone()
    }
}
