//! The MQTT-SN gateway's metric families (`mqgate_mqttsn_*`), registered once beside the others.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::ReasonLabels;

/// Labels of a negative acknowledgement: the MQTT-SN return code's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CodeLabels {
    /// `congestion`, `invalid_topic_id` or `not_supported`.
    pub code: &'static str,
}

/// The families.
#[derive(Debug, Default, Clone)]
pub struct MqttSnFamilies {
    /// Datagrams received on the gateway's socket.
    pub received: Counter,
    /// Datagrams sent.
    pub sent: Counter,
    /// Datagrams dropped without an answer, by reason.
    pub dropped: Family<ReasonLabels, Counter>,
    /// Clients connected (active, asleep or awake).
    pub clients: Gauge,
    /// Clients asleep (or awake for their buffered messages).
    pub asleep: Gauge,
    /// Clients taken as lost (keep alive, oversleeping, no answer after N_retry), by reason.
    pub lost: Family<ReasonLabels, Counter>,
    /// Messages the gateway sent again after T_retry (REGISTER, PUBLISH, PUBREL).
    pub retransmissions: Counter,
    /// PUBACK, REGACK, SUBACK and CONNACK with a rejection, by return code.
    pub rejected: Family<CodeLabels, Counter>,
}

impl MqttSnFamilies {
    /// Registers the families.
    pub fn register(registry: &mut Registry) -> MqttSnFamilies {
        let f = MqttSnFamilies::default();
        registry.register(
            "mqttsn_datagrams_received",
            "Datagrams received by the MQTT-SN gateway",
            f.received.clone(),
        );
        registry.register(
            "mqttsn_datagrams_sent",
            "Datagrams sent by the MQTT-SN gateway",
            f.sent.clone(),
        );
        registry.register(
            "mqttsn_datagrams_dropped",
            "MQTT-SN datagrams dropped without an answer, by reason",
            f.dropped.clone(),
        );
        registry.register("mqttsn_clients", "MQTT-SN clients connected", f.clients.clone());
        registry.register(
            "mqttsn_clients_asleep",
            "MQTT-SN clients asleep (their messages are buffered)",
            f.asleep.clone(),
        );
        registry.register(
            "mqttsn_clients_lost",
            "MQTT-SN clients taken as lost (their will published), by reason",
            f.lost.clone(),
        );
        registry.register(
            "mqttsn_retransmissions",
            "MQTT-SN messages sent again after mqttsn.retry_interval",
            f.retransmissions.clone(),
        );
        registry.register(
            "mqttsn_rejected",
            "MQTT-SN acknowledgements with a rejection return code, by code",
            f.rejected.clone(),
        );
        f
    }

    /// Counts a datagram dropped for `reason`.
    pub fn drop_for(&self, reason: &str) {
        self.dropped.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Counts a client lost for `reason`.
    pub fn lost_for(&self, reason: &str) {
        self.lost.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Counts a rejection with return code `code` (not for 0x00).
    pub fn rejected_with(&self, code: crate::mqttsn::codec::ReturnCode) {
        let code = match code.0 {
            0x00 => return,
            0x01 => "congestion",
            0x02 => "invalid_topic_id",
            _ => "not_supported",
        };
        self.rejected.get_or_create(&CodeLabels { code }).inc();
    }
}
