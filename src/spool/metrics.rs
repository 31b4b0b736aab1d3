//! The spool's metric families, per target id (`rule/index`), registered once with the
//! others (`crate::metrics::Metrics::spool`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels naming a spool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpoolLabels {
    /// The target id, `rule/index`.
    pub target: String,
}

/// The spool families.
#[derive(Clone, Debug, Default)]
pub struct SpoolFamilies {
    /// Messages in the spool.
    pub depth_messages: Family<SpoolLabels, Gauge>,
    /// Bytes in the spool (stored size, what `max_bytes` bounds).
    pub depth_bytes: Family<SpoolLabels, Gauge>,
    /// Messages durably appended.
    pub appended: Family<SpoolLabels, Counter>,
    /// Messages the target took from the spool.
    pub forwarded: Family<SpoolLabels, Counter>,
    /// Messages deleted unsent because the spool was full (`on_full: drop_oldest`).
    pub dropped: Family<SpoolLabels, Counter>,
    /// Retryable failures that made the forwarder back off and resend.
    pub retries: Family<SpoolLabels, Counter>,
    /// Messages moved to the dead letters (final failure, retries past `max_retry_time`).
    pub dead_lettered: Family<SpoolLabels, Counter>,
}

/// Handles of one spool, resolved once.
#[derive(Clone, Debug)]
pub struct SpoolMetrics {
    /// See [`SpoolFamilies::depth_messages`].
    pub depth_messages: Gauge,
    /// See [`SpoolFamilies::depth_bytes`].
    pub depth_bytes: Gauge,
    /// See [`SpoolFamilies::appended`].
    pub appended: Counter,
    /// See [`SpoolFamilies::forwarded`].
    pub forwarded: Counter,
    /// See [`SpoolFamilies::dropped`].
    pub dropped: Counter,
    /// See [`SpoolFamilies::retries`].
    pub retries: Counter,
    /// See [`SpoolFamilies::dead_lettered`].
    pub dead_lettered: Counter,
}

impl SpoolFamilies {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> SpoolFamilies {
        let f = SpoolFamilies::default();
        registry.register(
            "spool_depth_messages",
            "Messages in a target's spool",
            f.depth_messages.clone(),
        );
        registry.register(
            "spool_depth_bytes",
            "Bytes in a target's spool (what spool.max_bytes bounds)",
            f.depth_bytes.clone(),
        );
        registry.register("spool_appended", "Messages durably spooled", f.appended.clone());
        registry.register(
            "spool_forwarded",
            "Spooled messages the target took",
            f.forwarded.clone(),
        );
        registry.register(
            "spool_dropped",
            "Spooled messages deleted unsent because the spool was full (on_full: drop_oldest)",
            f.dropped.clone(),
        );
        registry.register(
            "spool_retries",
            "Retryable failures after which the spool's forwarder backed off and resent",
            f.retries.clone(),
        );
        registry.register(
            "spool_dead_lettered",
            "Spooled messages moved to the dead letters",
            f.dead_lettered.clone(),
        );
        f
    }

    /// Handles for spool `target`.
    pub fn target(&self, target: &str) -> SpoolMetrics {
        let l = SpoolLabels { target: target.to_owned() };
        SpoolMetrics {
            depth_messages: self.depth_messages.get_or_create(&l).clone(),
            depth_bytes: self.depth_bytes.get_or_create(&l).clone(),
            appended: self.appended.get_or_create(&l).clone(),
            forwarded: self.forwarded.get_or_create(&l).clone(),
            dropped: self.dropped.get_or_create(&l).clone(),
            retries: self.retries.get_or_create(&l).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&l).clone(),
        }
    }
}
