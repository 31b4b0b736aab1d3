//! The client as a subscriber: SUBSCRIBE/UNSUBSCRIBE, and messages delivered to it.
//!
//! Other sessions hand messages to this one through a bounded queue (see `broker`); this side
//! writes them as PUBLISH, keeping at most `max_inflight_out` QoS 1/2 deliveries incomplete
//! (and no more than the client's own Receive Maximum). While that window is full the queue is
//! not read, so it fills and the broker drops (and counts) further messages for this client.
//!
//! QoS 2 deliveries go PUBLISH → PUBREC → PUBREL → PUBCOMP; a delivery counts against the
//! window until its PUBACK or PUBCOMP. The queue, the incomplete deliveries (in send order)
//! and the filters are the session state (`broker::SessionState`) that outlives the
//! connection; a resumed session resends its incomplete deliveries first ([`Session::resend`]).

use crate::auth::acl::Grant;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::{End, Session, SessionLimits};
use crate::broker::sessions::{InFlight, InFlightStage};
use crate::broker::tracking::{self, Fate};
use crate::broker::{Outbound, SessionState, SubscribeOptions};
use crate::message::Message;
use crate::mqtt::codec::{
    Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode, SubAck, Subscribe,
    UnsubAck, Unsubscribe,
};
use crate::mqtt::connection::QueueError;
use crate::mqtt::topic::{self, TopicError};
use crate::targets::Outcome;

/// A SUBACK or UNSUBACK of a stored session waiting for its record to be durable.
pub(super) struct Held {
    /// Resolved once the record is durable.
    durable: oneshot::Receiver<Outcome>,
    /// The answer to send then.
    ack: Packet,
    /// A SUBSCRIBE's retained messages to send after it: filter and granted QoS.
    retained: Vec<(String, QoS)>,
    /// The SUBSCRIBE's subscription identifier, for those.
    subscription_id: Option<u32>,
}

/// Outbound half of a session.
pub(super) struct OutboundState {
    /// The queue, the incomplete deliveries and the filters: parked when the connection ends.
    pub(super) state: SessionState,
    /// Window size: min(config, client's Receive Maximum).
    window: usize,
}

impl OutboundState {
    pub(super) fn new(
        state: SessionState,
        client_receive_maximum: Option<u16>,
        limits: &SessionLimits,
    ) -> Self {
        let window = client_receive_maximum.unwrap_or(u16::MAX).min(limits.max_inflight_out);
        OutboundState { state, window: usize::from(window.max(1)) }
    }

    /// The session state and the window, for a resting session (`rest.rs`).
    pub(super) fn into_parts(self) -> (SessionState, usize) {
        (self.state, self.window)
    }

    /// [`into_parts`](Self::into_parts) back.
    pub(super) fn from_parts(state: SessionState, window: usize) -> Self {
        OutboundState { state, window }
    }

    /// True while another QoS 1/2 delivery may be sent.
    pub(super) fn has_room(&self) -> bool {
        self.state.inflight.len() < self.window
    }

    /// The incomplete delivery with `packet_id`, if any.
    fn find(&mut self, packet_id: u16) -> Option<&mut InFlight> {
        // Clients acknowledge mostly in order: the match is usually at the front.
        self.state.inflight.iter_mut().find(|f| f.packet_id == packet_id)
    }

    /// Removes the delivery with `packet_id` if `done` says it is complete; a tracked one's
    /// ticket is finished with `fate`. `Some` if it was there, with its sequence number in
    /// the store if it is stored (for the caller to delete).
    fn complete(
        &mut self,
        packet_id: u16,
        fate: Fate,
        done: impl Fn(&InFlight) -> bool,
    ) -> Option<Option<u64>> {
        let state = &mut self.state;
        let i = state.inflight.iter().position(|f| f.packet_id == packet_id && done(f))?;
        let f = state.inflight.remove(i)?;
        tracking::finish(f.ticket, fate);
        state.inflight_ids.remove(&packet_id);
        Some(f.stored)
    }

    /// A PUBACK from the client (MQTT 5: an error code means it refused the message). The
    /// completed delivery's sequence number in the store, if it is stored.
    pub(super) fn acked(&mut self, packet_id: u16, code: ReasonCode) -> Option<u64> {
        let fate = if code.is_success() { Fate::Taken } else { Fate::Failed };
        let done = self.complete(packet_id, fate, |f| f.qos == QoS::AtLeastOnce);
        if done.is_none() {
            debug!(session_id = self.state.id, packet_id, "PUBACK for an unknown packet id");
        }
        done.flatten()
    }

    /// A PUBCOMP from the client; as [`OutboundState::acked`].
    pub(super) fn completed(&mut self, packet_id: u16) -> Option<u64> {
        let done = self.complete(packet_id, Fate::Taken, |f| f.stage == InFlightStage::Released);
        if done.is_none() {
            debug!(session_id = self.state.id, packet_id, "PUBCOMP for an unknown packet id");
        }
        done.flatten()
    }

    fn next_packet_id(&mut self) -> u16 {
        let state = &mut self.state;
        loop {
            state.last_id = state.last_id.wrapping_add(1);
            if state.last_id != 0 && !state.inflight_ids.contains(&state.last_id) {
                return state.last_id;
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Writes one delivered message to the client. A delivery of a shared subscription this
    /// session has left since it was queued goes to another member of the group instead.
    pub(super) fn deliver(&mut self, out: Outbound) {
        if self.acl.is_filtering() && !self.acl.may_receive(&out.msg.topic) {
            // A filtered subscription (it overlaps a deny) matched a denied topic: withheld.
            self.shared.acl_denied_delivery.inc();
            tracking::finish(out.ticket, Fate::Gone);
            self.shared.broker.unstore(&self.out.state.subscriber, out.stored);
            return;
        }
        if let Some(key) = &out.shared {
            if !self.out.state.filters.contains_key(&**key) {
                if out.qos != QoS::AtMostOnce {
                    self.shared.broker.redeliver_shared_tracked(key, &out.msg, out.ticket);
                } else {
                    tracking::finish(out.ticket, Fate::Gone);
                }
                return;
            }
        }
        let packet_id = match out.qos {
            QoS::AtMostOnce => 0,
            _ => self.out.next_packet_id(),
        };
        let Some(mut publish) = self.publish_for(
            &out.msg,
            out.qos,
            out.retain,
            &out.subscription_ids,
            packet_id,
            false,
        ) else {
            // Expired: nobody is owed it any more.
            tracking::finish(out.ticket, Fate::Gone);
            self.shared.broker.unstore(&self.out.state.subscriber, out.stored);
            return;
        };
        // MQTT 5 server-to-client topic aliases (resends after a reconnect go by name).
        let new_alias = self.aliases.outbound(&mut publish);
        let sent = self.queue_publish(publish);
        if let (true, Some(alias)) = (sent, new_alias) {
            self.aliases.record(out.msg.topic.clone(), alias);
        }
        if !sent || packet_id == 0 {
            // QoS 0 is taken on hand-off; a PUBLISH that cannot be sent failed.
            tracking::finish(out.ticket, if sent { Fate::Taken } else { Fate::Failed });
            self.shared.broker.unstore(&self.out.state.subscriber, out.stored);
        } else {
            let f = InFlight {
                packet_id,
                msg: out.msg,
                qos: out.qos,
                retain: out.retain,
                stage: InFlightStage::Published,
                shared: out.shared,
                subscription_ids: out.subscription_ids,
                ticket: out.ticket,
                stored: out.stored,
            };
            // A stored delivery is recorded as sent: after a restart it is resent with DUP.
            self.shared.broker.store_sent(&self.out.state.subscriber, &f);
            let state = &mut self.out.state;
            state.inflight_ids.insert(packet_id);
            state.inflight.push_back(f);
        }
    }

    /// Resends the incomplete deliveries of a resumed session, in their original order:
    /// PUBLISH with DUP for those not yet PUBACKed/PUBRECed, PUBREL for those PUBRECed.
    pub(super) fn resend(&mut self) -> Option<End> {
        let pending: Vec<InFlight> = self.out.state.inflight.iter().cloned().collect();
        for f in pending {
            let sent = match f.stage {
                InFlightStage::Released => {
                    if let Some(end) = self.send(&Packet::PubRel(PubResponse::success(f.packet_id)))
                    {
                        return Some(end);
                    }
                    true
                }
                InFlightStage::Published => {
                    let ids = &f.subscription_ids;
                    match self.publish_for(&f.msg, f.qos, f.retain, ids, f.packet_id, true) {
                        Some(publish) => self.queue_publish(publish),
                        None => false,
                    }
                }
            };
            if !sent {
                let stored = self.out.complete(f.packet_id, Fate::Failed, |_| true).flatten();
                self.shared.broker.unstore(&self.out.state.subscriber, stored);
            }
        }
        None
    }

    /// The PUBLISH for one delivery, with the identifiers of the subscriptions it matched
    /// (MQTT 5); `None` (counted) if its message expired.
    fn publish_for(
        &self,
        msg: &Arc<Message>,
        qos: QoS,
        retain: bool,
        subscription_ids: &[u32],
        packet_id: u16,
        dup: bool,
    ) -> Option<Publish> {
        let mut properties = msg.properties.clone();
        // Only a message with properties, or a delivery that adds subscription ids, has a
        // property set to change (`DerefMut` would make one).
        if let Some(p) = properties.get_mut() {
            p.topic_alias = None;
            p.subscription_identifiers.clear();
        }
        if self.version == ProtocolVersion::V5 && !subscription_ids.is_empty() {
            properties.subscription_identifiers.extend_from_slice(subscription_ids);
        }
        if let Some(expiry) = properties.message_expiry_interval {
            let elapsed = msg.received.elapsed().as_secs();
            let Some(left) = u64::from(expiry).checked_sub(elapsed).filter(|l| *l > 0) else {
                self.shared.metrics.dropped("expired");
                return None;
            };
            properties.message_expiry_interval = Some(u32::try_from(left).unwrap_or(u32::MAX));
        }
        Some(Publish {
            dup,
            qos,
            retain,
            topic: msg.topic.clone(),
            packet_id,
            properties,
            payload: msg.payload.clone(),
        })
    }

    /// Bytes of deliveries the write buffer may still take before it is written
    /// (`mqtt.max_outbound_bytes`; the first delivery of a batch always goes).
    pub(super) fn outbound_room(&self) -> usize {
        self.shared.limits.max_outbound_bytes.saturating_sub(self.conn.pending_write_bytes())
    }

    /// Records the write buffer's size after a batch of deliveries in the high-water mark
    /// `mqgate_write_buffer_peak_bytes`.
    pub(super) fn note_write_buffer(&self) {
        let held = i64::try_from(self.conn.pending_write_bytes()).unwrap_or(i64::MAX);
        let peak = self.shared.metrics.write_buffer_peak.inner();
        peak.fetch_max(held, std::sync::atomic::Ordering::Relaxed);
    }

    /// Queues a PUBLISH to the client; false (counted) if it cannot be sent at all.
    fn queue_publish(&mut self, publish: Publish) -> bool {
        match self.conn.queue(&Packet::Publish(publish)) {
            Ok(()) => true,
            Err(QueueError::TooLargeForClient { .. }) => {
                self.shared.metrics.dropped("too_large_for_client");
                false
            }
            Err(QueueError::Encode(e)) => {
                debug!(client_id = %crate::logtext::LogText(&self.client_id), error = %e, "cannot encode a delivery");
                self.shared.metrics.dropped("unencodable");
                false
            }
        }
    }

    /// A PUBREC from the client answers one of our QoS 2 deliveries: answer PUBREL (again,
    /// for a repeated PUBREC). An MQTT 5 error code ends the delivery (no PUBREL, §4.3.3).
    pub(super) fn on_pubrec(&mut self, r: PubResponse) -> Option<End> {
        if !r.code.is_success() {
            let stored = self
                .out
                .complete(r.packet_id, Fate::Failed, |f| f.qos == QoS::ExactlyOnce)
                .flatten();
            self.shared.broker.unstore(&self.out.state.subscriber, stored);
            debug!(
                client_id = %crate::logtext::LogText(&self.client_id),
                packet_id = r.packet_id,
                code = ?r.code,
                "client refused a QoS 2 delivery"
            );
            return None;
        }
        let known = match self.out.find(r.packet_id) {
            Some(f) if f.qos == QoS::ExactlyOnce => {
                if f.stage != InFlightStage::Released {
                    f.stage = InFlightStage::Released;
                    // After a restart it is resent as PUBREL, not as the message.
                    let f = f.clone();
                    self.shared.broker.store_sent(&self.out.state.subscriber, &f);
                }
                true
            }
            _ => false,
        };
        self.send(&Packet::PubRel(self.id_response(r.packet_id, known)))
    }

    /// SUBSCRIBE: one answer per filter.
    pub(super) fn on_subscribe(&mut self, s: Subscribe) -> Option<End> {
        if self.live.generation != self.shared.live.generation() {
            if let Some(end) = self.reloaded() {
                return Some(end);
            }
        }
        // MQTT 5 §3.8.2.1.2: at most one Subscription Identifier (0 is refused by the codec).
        if s.properties.subscription_identifiers.len() > 1 {
            self.shared.metrics.protocol_error("subscription_identifier");
            return Some(self.server_disconnect(
                ReasonCode::PROTOCOL_ERROR,
                "more than one subscription identifier on SUBSCRIBE",
            ));
        }
        let subscription_id = s.properties.subscription_identifiers.first().copied();
        // MQTT 5 §3.8.3.1: No Local on a shared subscription is a protocol error.
        let no_local_shared = s.filters.iter().any(|f| {
            f.options.no_local
                && matches!(topic::parse_subscription(&f.filter), Ok(p) if p.group.is_some())
        });
        if no_local_shared && self.version == ProtocolVersion::V5 {
            self.shared.metrics.protocol_error("no_local_shared");
            return Some(self.server_disconnect(
                ReasonCode::PROTOCOL_ERROR,
                "No Local on a shared subscription",
            ));
        }
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained = Vec::new();
        let mut changed = false;
        // In a cluster: the bindings the new subscriptions need, before the SUBACK.
        let mut bound = Vec::new();
        for f in &s.filters {
            let parsed = topic::parse_subscription(&f.filter).and_then(|p| {
                self.shared.limits.topic_limits.check(p.filter)?;
                Ok(p)
            });
            let code = match parsed {
                Err(e) => self.filter_refusal(&e),
                Ok(_)
                    if !self.out.state.filters.contains_key(&f.filter)
                        && self.out.state.filters.len() >= self.shared.limits.max_subscriptions =>
                {
                    debug!(
                        client_id = %crate::logtext::LogText(&self.client_id),
                        filter = %crate::logtext::LogText(&f.filter),
                        "SUBSCRIBE refused: mqtt.max_subscriptions reached"
                    );
                    match self.version {
                        ProtocolVersion::V311 => ReasonCode::UNSPECIFIED_ERROR,
                        ProtocolVersion::V5 => ReasonCode::QUOTA_EXCEEDED,
                    }
                }
                // The ACL sees the filter a shared subscription matches topics with (and the
                // group, for `$share/` entries).
                Ok(_) if self.acl.grant(&f.filter) == Grant::Refused => {
                    self.shared.acl_denied_subscribe.inc();
                    debug!(
                        client_id = %crate::logtext::LogText(&self.client_id),
                        filter = %crate::logtext::LogText(&f.filter),
                        "SUBSCRIBE denied by the ACL"
                    );
                    match self.version {
                        ProtocolVersion::V311 => ReasonCode::UNSPECIFIED_ERROR,
                        ProtocolVersion::V5 => ReasonCode::NOT_AUTHORIZED,
                    }
                }
                Ok(p) => {
                    if self.acl.grant(&f.filter) == Grant::Filtered {
                        // It overlaps a deny: this session's deliveries are checked from now.
                        self.acl.set_filtering();
                    }
                    let granted = f.options.qos;
                    let options = SubscribeOptions {
                        qos: granted,
                        no_local: self.version == ProtocolVersion::V5 && f.options.no_local,
                        retain_as_published: f.options.retain_as_published,
                        subscription_id,
                    };
                    let existed =
                        self.out.state.filters.insert(f.filter.clone(), options).is_some();
                    changed = true;
                    self.shared.broker.subscribe(
                        self.session_id,
                        &f.filter,
                        options,
                        &self.out.state.subscriber,
                    );
                    if let Some(cluster) = self.shared.broker.cluster() {
                        bound.extend(cluster.bound(&f.filter));
                    }
                    // Retained messages are not sent on a shared subscription (§4.8.2).
                    let send_retained = p.group.is_none()
                        && match f.options.retain_handling {
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
        let ack = Packet::SubAck(Box::new(suback));
        // A stored session's subscriptions are durable before its SUBACK (and in a cluster,
        // the node's queue bound for them).
        let expiry = self.expiry;
        let stored =
            changed.then(|| self.shared.broker.store_session(&self.out.state, expiry, true));
        let wait = match stored.flatten() {
            Some(durable) if bound.is_empty() => Some(durable),
            durable => crate::cluster::all_of(durable.into_iter().chain(bound).collect()),
        };
        match wait {
            Some(durable) => {
                self.hold(Held { durable, ack, retained, subscription_id });
                None
            }
            _ => self.answer(&ack, retained, subscription_id),
        }
    }

    /// Waits until the record of a stored session is durable, then sends the SUBACK or
    /// UNSUBACK held for it (and a SUBSCRIBE's retained messages). A record that cannot be
    /// written ends the connection: the client subscribes again when it reconnects.
    pub(super) async fn release_held(&mut self, held: Box<Held>) -> Option<End> {
        let Held { durable, ack, retained, subscription_id } = *held;
        match durable.await {
            Ok(Outcome::Delivered) => self.answer(&ack, retained, subscription_id),
            Ok(Outcome::Failed(f)) => {
                warn!(parent: &self.span(), reason = %f.reason, "subscriptions not stored");
                let reason = "the session's subscriptions could not be stored";
                Some(self.server_disconnect(ReasonCode::UNSPECIFIED_ERROR, reason))
            }
            Err(_) => Some(End::ServerClose { reason: "the store stopped".into() }),
        }
    }

    /// Sends a SUBACK or UNSUBACK, then the retained messages of a SUBSCRIBE's new
    /// subscriptions (after it, through the same bounded queue as live ones).
    fn answer(
        &mut self,
        ack: &Packet,
        retained: Vec<(String, QoS)>,
        subscription_id: Option<u32>,
    ) -> Option<End> {
        if let Some(end) = self.send(ack) {
            return Some(end);
        }
        for (filter, granted) in retained {
            self.start_retained(filter, granted, subscription_id);
        }
        // The first step at once: a few retained messages go out in the SUBACK's write.
        if self.poll_retained(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
            self.retained_step();
        }
        None
    }

    fn filter_refusal(&self, e: &TopicError) -> ReasonCode {
        match (self.version, e) {
            (ProtocolVersion::V311, _) => ReasonCode::UNSPECIFIED_ERROR,
            (ProtocolVersion::V5, _) => ReasonCode::TOPIC_FILTER_INVALID,
        }
    }

    /// UNSUBSCRIBE: one answer per filter (MQTT 5 only; 3.1.1 UNSUBACK has none).
    pub(super) fn on_unsubscribe(&mut self, u: Unsubscribe) -> Option<End> {
        let mut codes = Vec::with_capacity(u.filters.len());
        for filter in &u.filters {
            self.out.state.filters.remove(filter);
            // Deliveries already sent on it are completed with this client (MQTT 3.1.1
            // §3.10.4, 5.0 §3.10.4), shared or not; only what is still queued for a share
            // group goes to another member, when it comes out of the queue.
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
        let ack = Packet::UnsubAck(Box::new(unsuback));
        let expiry = self.expiry;
        match self.shared.broker.store_session(&self.out.state, expiry, true) {
            Some(durable) => {
                let retained = Vec::new();
                self.hold(Held { durable, ack, retained, subscription_id: None });
                None
            }
            None => self.send(&ack),
        }
    }
}
