//! The client as a subscriber: SUBSCRIBE/UNSUBSCRIBE, and messages delivered to it.
//!
//! Other sessions hand messages to this one through a bounded queue (see `broker`); this side
//! writes them as PUBLISH, keeping at most `max_inflight_out` QoS 1 deliveries unacknowledged
//! (and no more than the client's own Receive Maximum). While that window is full the queue is
//! not read, so it fills and the broker drops (and counts) further messages for this client.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tracing::debug;

use super::{End, Session, SessionLimits};
use crate::broker::{Broker, Outbound, SubscribeOptions};
use crate::message::Message;
use crate::mqtt::codec::{
    Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, SubAck, Subscribe, UnsubAck,
    Unsubscribe,
};
use crate::mqtt::connection::QueueError;
use crate::mqtt::topic::{self, TopicError};

/// Outbound half of a session.
pub(super) struct OutboundState {
    /// Given to the broker with each subscription.
    tx: mpsc::Sender<Outbound>,
    /// Messages waiting to be written to this client.
    pub(super) rx: mpsc::Receiver<Outbound>,
    /// QoS 1 deliveries awaiting PUBACK, by our packet id.
    inflight: HashMap<u16, Arc<Message>>,
    /// Window size: min(config, client's Receive Maximum).
    window: usize,
    /// Last packet id used.
    last_id: u16,
    /// Filters this session subscribed to (removed from the broker at the end).
    filters: HashSet<String>,
}

impl OutboundState {
    pub(super) fn new(
        tx: mpsc::Sender<Outbound>,
        rx: mpsc::Receiver<Outbound>,
        client_receive_maximum: Option<u16>,
        limits: &SessionLimits,
    ) -> Self {
        let window = client_receive_maximum.unwrap_or(u16::MAX).min(limits.max_inflight_out);
        OutboundState {
            tx,
            rx,
            inflight: HashMap::new(),
            window: usize::from(window.max(1)),
            last_id: 0,
            filters: HashSet::new(),
        }
    }

    /// True while another QoS 1 delivery may be sent.
    pub(super) fn has_room(&self) -> bool {
        self.inflight.len() < self.window
    }

    /// A PUBACK from the client.
    pub(super) fn acked(&mut self, packet_id: u16) {
        if self.inflight.remove(&packet_id).is_none() {
            debug!(packet_id, "PUBACK for an unknown packet id");
        }
    }

    fn next_packet_id(&mut self) -> u16 {
        loop {
            self.last_id = self.last_id.wrapping_add(1);
            if self.last_id != 0 && !self.inflight.contains_key(&self.last_id) {
                return self.last_id;
            }
        }
    }

    /// Removes every subscription of this session from the broker.
    pub(super) fn unsubscribe_all(&mut self, broker: &Broker, session_id: u64) {
        for filter in self.filters.drain() {
            broker.unsubscribe(session_id, &filter);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Writes one delivered message to the client.
    pub(super) fn deliver(&mut self, out: Outbound) {
        let packet_id = match out.qos {
            QoS::AtMostOnce => 0,
            _ => self.out.next_packet_id(),
        };
        let mut properties = out.msg.properties.clone();
        properties.topic_alias = None;
        properties.subscription_identifiers.clear();
        if let Some(expiry) = properties.message_expiry_interval {
            let elapsed = out.msg.received.elapsed().as_secs();
            let Some(left) = u64::from(expiry).checked_sub(elapsed).filter(|l| *l > 0) else {
                self.shared.metrics.dropped("expired");
                return;
            };
            properties.message_expiry_interval = Some(u32::try_from(left).unwrap_or(u32::MAX));
        }
        let publish = Publish {
            dup: false,
            qos: out.qos.min(QoS::AtLeastOnce),
            retain: out.retain,
            topic: out.msg.topic.clone(),
            packet_id,
            properties,
            payload: out.msg.payload.clone(),
        };
        match self.conn.queue(&Packet::Publish(publish)) {
            Ok(()) => {
                if packet_id != 0 {
                    self.out.inflight.insert(packet_id, out.msg);
                }
            }
            Err(QueueError::TooLargeForClient { .. }) => {
                self.shared.metrics.dropped("too_large_for_client");
            }
            Err(QueueError::Encode(e)) => {
                debug!(error = %e, "cannot encode a delivery");
                self.shared.metrics.dropped("unencodable");
            }
        }
    }

    /// SUBSCRIBE: one answer per filter.
    pub(super) fn on_subscribe(&mut self, s: Subscribe) -> Option<End> {
        if !s.properties.subscription_identifiers.is_empty() {
            self.shared.metrics.protocol_error("subscription_identifier");
            return Some(self.server_disconnect(
                ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
                "subscription identifiers are not supported",
            ));
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        for f in &s.filters {
            let code = match topic::validate_filter(&f.filter) {
                Err(e) => self.filter_refusal(&e),
                Ok(()) if !self.acl.may_subscribe(&f.filter) => {
                    self.shared.acl_denied_subscribe.inc();
                    debug!(filter = %f.filter, "SUBSCRIBE denied by the ACL");
                    match self.version {
                        ProtocolVersion::V311 => ReasonCode::UNSPECIFIED_ERROR,
                        ProtocolVersion::V5 => ReasonCode::NOT_AUTHORIZED,
                    }
                }
                Ok(()) => {
                    let granted = f.options.qos.min(QoS::AtLeastOnce);
                    let options = SubscribeOptions {
                        qos: granted,
                        no_local: self.version == ProtocolVersion::V5 && f.options.no_local,
                        retain_as_published: f.options.retain_as_published,
                    };
                    let existed = !self.out.filters.insert(f.filter.clone());
                    self.shared.broker.subscribe(
                        self.session_id,
                        &f.filter,
                        options,
                        self.out.tx.clone(),
                    );
                    let send_retained = match f.options.retain_handling {
                        crate::mqtt::codec::RetainHandling::SendAtSubscribe => true,
                        crate::mqtt::codec::RetainHandling::SendIfNew => !existed,
                        crate::mqtt::codec::RetainHandling::DoNotSend => false,
                    };
                    if send_retained {
                        retained.push((f.filter.clone(), granted));
                    }
                    ReasonCode(granted as u8)
                }
            };
            codes.push(code);
        }
        let suback = SubAck { packet_id: s.packet_id, codes, properties: Properties::default() };
        if let Some(end) = self.send(&Packet::SubAck(suback)) {
            return Some(end);
        }
        // Retained messages go after the SUBACK, through the same bounded queue as live ones.
        for (filter, granted) in retained {
            for msg in self.shared.broker.retained_matching(&filter) {
                let out = Outbound { qos: msg.qos.min(granted), msg, retain: true };
                if self.out.tx.try_send(out).is_err() {
                    self.shared.metrics.dropped("subscriber_queue_full");
                }
            }
        }
        None
    }

    fn filter_refusal(&self, e: &TopicError) -> ReasonCode {
        match (self.version, e) {
            (ProtocolVersion::V311, _) => ReasonCode::UNSPECIFIED_ERROR,
            (ProtocolVersion::V5, TopicError::SharedNotSupported) => {
                ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
            }
            (ProtocolVersion::V5, _) => ReasonCode::TOPIC_FILTER_INVALID,
        }
    }

    /// UNSUBSCRIBE: one answer per filter (MQTT 5 only; 3.1.1 UNSUBACK has none).
    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) -> Option<End> {
        let mut codes = Vec::with_capacity(u.filters.len());
        for filter in &u.filters {
            self.out.filters.remove(filter);
            let existed = self.shared.broker.unsubscribe(self.session_id, filter);
            codes.push(if existed {
                ReasonCode::SUCCESS
            } else {
                ReasonCode::NO_SUBSCRIPTION_EXISTED
            });
        }
        if self.version == ProtocolVersion::V311 {
            codes.clear();
        }
        let unsuback =
            UnsubAck { packet_id: u.packet_id, codes, properties: Properties::default() };
        self.send(&Packet::UnsubAck(unsuback))
    }
}
