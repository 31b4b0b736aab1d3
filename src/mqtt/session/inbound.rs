//! PUBLISH from the client: route it, hand it to the targets, and acknowledge it honestly.
//!
//! Every QoS 1/2 PUBLISH gets one [`Pending`] entry, in arrival order, holding the outcome
//! receivers of its targets. Only the front entry is ever completed, so PUBACK/PUBREC leave in
//! the order the PUBLISHes came even when confirms arrive out of order. A failed outcome never
//! becomes a success: MQTT 5 gets an error reason code (final failures) or a DISCONNECT
//! (retryable ones, so the client resends); MQTT 3.1.1, which has no negative ack, gets the
//! connection closed with the PUBACK withheld.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::{End, Session, SessionShared};
use crate::message::Message;
use crate::mqtt::codec::{
    LastWill, Packet, Properties, ProtocolVersion, PubResponse, Publish, PublishProperties, QoS,
    ReasonCode,
};
use crate::routing::{route, route_counted};
use crate::targets::{send_blocked, Failure, Outcome, Waits};

/// One QoS 1/2 PUBLISH waiting for its acknowledgement.
#[derive(Debug)]
pub(super) struct Pending {
    /// The client's packet id.
    packet_id: u16,
    /// 1 → PUBACK, 2 → PUBREC.
    qos: QoS,
    /// Outcome receivers not yet resolved (popped as they resolve).
    waits: Waits,
    /// The first failure among resolved outcomes.
    failure: Option<Failure>,
    /// Whether any subscriber or rule matched (MQTT 5 reason 0x10 otherwise).
    matched: bool,
    /// Refused (the ACL: 0x87; a bound: 0x97): MQTT 5 gets the code; 3.1.1, which cannot
    /// say so, a plain ack.
    denied: Option<ReasonCode>,
}

/// The inbound window: pending acknowledgements in arrival order plus QoS 2 state. Also the
/// MQTT-SN gateway's (`mqttsn/client.rs`): the same ordered promise for its PUBACKs.
#[derive(Debug)]
pub(crate) struct PendingQueue {
    /// Entries in the order their PUBLISHes arrived.
    queue: VecDeque<Pending>,
    /// Our Receive Maximum.
    capacity: usize,
    /// QoS 2 packet ids received and not yet released by PUBREL (exactly-once dedup).
    awaiting_rel: HashSet<u16>,
}

/// The resolved front of the queue.
pub(crate) struct FrontDone {
    pub(crate) packet_id: u16,
    pub(crate) qos: QoS,
    /// The first failed outcome, if any.
    pub(crate) failure: Option<Failure>,
    /// Whether any subscriber or rule matched.
    pub(crate) matched: bool,
    /// Refused before routing (the ACL, a bound), with the MQTT 5 code.
    pub(crate) denied: Option<ReasonCode>,
}

impl PendingQueue {
    pub(crate) fn new(capacity: u16) -> Self {
        PendingQueue {
            queue: VecDeque::new(),
            capacity: usize::from(capacity),
            awaiting_rel: HashSet::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Entries waiting for their acknowledgement.
    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Takes over the QoS 2 packet ids a resumed session had PUBRECed and not seen released.
    pub(crate) fn resume(&mut self, awaiting_rel: HashSet<u16>) {
        self.awaiting_rel = awaiting_rel;
    }

    /// The QoS 2 packet ids to keep with a parked session: those whose PUBREC was sent. Ids
    /// still waiting for their outcome are left out, because that outcome is unknown: the
    /// client's resend must be forwarded again (a possible duplicate, never a loss).
    pub(crate) fn released_later(&mut self) -> HashSet<u16> {
        let mut ids = std::mem::take(&mut self.awaiting_rel);
        for p in self.queue.iter().filter(|p| p.qos == QoS::ExactlyOnce) {
            ids.remove(&p.packet_id);
        }
        ids
    }

    /// True while another QoS 1/2 PUBLISH may be read.
    pub(crate) fn has_room(&self) -> bool {
        self.queue.len() < self.capacity
    }

    /// Ready with the front entry, removed, once every one of its outcomes is in. A poll, not a
    /// future: the session's loop waits for all its events in one poll. Outcomes already
    /// received stay recorded in the entry; pending while the queue is empty.
    pub(crate) fn poll_front_done(&mut self, cx: &mut Context<'_>) -> Poll<FrontDone> {
        let Some(front) = self.queue.front_mut() else {
            return Poll::Pending;
        };
        while let Some(rx) = front.waits.last_mut() {
            let outcome = ready!(Pin::new(rx).poll(cx)).unwrap_or_else(|_| dropped());
            front.waits.pop();
            front.record(outcome);
        }
        match self.pop_front() {
            Some(done) => Poll::Ready(done),
            None => Poll::Pending,
        }
    }

    /// The front entry if every one of its outcomes is already in, without waiting: after one
    /// acknowledgement, the session sends every one that is ready in the same write.
    pub(crate) fn try_front_done(&mut self) -> Option<FrontDone> {
        let front = self.queue.front_mut()?;
        while let Some(rx) = front.waits.last_mut() {
            let outcome = match rx.try_recv() {
                Ok(outcome) => outcome,
                Err(oneshot::error::TryRecvError::Empty) => return None,
                Err(oneshot::error::TryRecvError::Closed) => dropped(),
            };
            front.waits.pop();
            front.record(outcome);
        }
        self.pop_front()
    }

    /// Appends the entry of a QoS 1/2 PUBLISH routed with `waits` (a front-end outside the
    /// session: the MQTT-SN gateway). A `denied` one waits for nothing.
    pub(crate) fn push(
        &mut self,
        packet_id: u16,
        qos: QoS,
        waits: Waits,
        matched: bool,
        denied: Option<ReasonCode>,
    ) {
        self.queue.push_back(Pending { packet_id, qos, waits, failure: None, matched, denied });
    }

    /// Whether a PUBLISH with `packet_id` is still waiting for its acknowledgement.
    pub(crate) fn contains(&self, packet_id: u16) -> bool {
        self.queue.iter().any(|p| p.packet_id == packet_id)
    }

    /// The QoS 2 packet ids received and not yet released by PUBREL.
    pub(crate) fn awaiting_rel(&mut self) -> &mut HashSet<u16> {
        &mut self.awaiting_rel
    }

    fn pop_front(&mut self) -> Option<FrontDone> {
        self.queue.pop_front().map(|p| FrontDone {
            packet_id: p.packet_id,
            qos: p.qos,
            failure: p.failure,
            matched: p.matched,
            denied: p.denied,
        })
    }
}

/// The outcome of a target whose sink dropped the ack sender: never a success.
fn dropped() -> Outcome {
    Outcome::Failed(Failure::retryable("the sink dropped the message"))
}

impl Pending {
    /// An entry with nothing to wait for (a QoS 2 resend, or a publish the ACL denied).
    fn settled(packet_id: u16, qos: QoS, denied: Option<ReasonCode>) -> Self {
        Pending { packet_id, qos, waits: Waits::new(), failure: None, matched: true, denied }
    }

    /// Keeps the first failure among the outcomes.
    fn record(&mut self, outcome: Outcome) {
        if let Outcome::Failed(f) = outcome {
            self.failure.get_or_insert(f);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Handles a PUBLISH from the client. Not async: a request a sink cannot take at once
    /// goes to `self.blocked`, which the loop waits on (so the common path adds nothing to
    /// the session's future, which every idle connection carries).
    pub(super) fn on_publish(&mut self, mut p: Publish) -> Option<End> {
        let shared = Arc::clone(&self.shared);
        shared.received[p.qos as usize].inc();
        if self.version == ProtocolVersion::V5 {
            if let Some(alias) = p.properties.take_topic_alias() {
                if let Err((code, reason)) = self.aliases.resolve(alias, &mut p.topic) {
                    shared.metrics.protocol_error("topic_alias");
                    return Some(self.server_disconnect(code, reason));
                }
            }
            if p.qos != QoS::AtMostOnce && !self.pending.has_room() {
                shared.metrics.protocol_error("receive_maximum_exceeded");
                return Some(self.server_disconnect(
                    ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                    "more unacknowledged QoS 1/2 PUBLISHes than Receive Maximum",
                ));
            }
            if p.properties.payload_format_indicator == Some(1)
                && std::str::from_utf8(&p.payload).is_err()
            {
                shared.metrics.protocol_error("payload_format_invalid");
                return Some(self.server_disconnect(
                    ReasonCode::PAYLOAD_FORMAT_INVALID,
                    "payload format indicator says UTF-8 but the payload is not",
                ));
            }
        }
        let max_user_properties = usize::from(shared.limits.max_user_properties);
        if p.properties.user_properties.len() > max_user_properties {
            // Refused whole, as a retained PUBLISH over its quota below: nothing is routed.
            shared.metrics.dropped("too_many_user_properties");
            debug!(
                client_id = %crate::logtext::LogText(&self.client_id),
                max = max_user_properties,
                "PUBLISH refused: more user properties than mqtt.max_user_properties"
            );
            if p.qos != QoS::AtMostOnce {
                if p.qos == QoS::ExactlyOnce {
                    self.pending.awaiting_rel.insert(p.packet_id);
                }
                let refused = Some(ReasonCode::QUOTA_EXCEEDED);
                self.pending.queue.push_back(Pending::settled(p.packet_id, p.qos, refused));
            }
            return None;
        }
        if let Err(e) = shared.limits.topic_limits.check(&p.topic) {
            shared.metrics.protocol_error("topic_limit");
            return Some(self.server_disconnect(ReasonCode::TOPIC_NAME_INVALID, &e.to_string()));
        }
        if p.qos == QoS::ExactlyOnce && self.pending.awaiting_rel.contains(&p.packet_id) {
            // A resend before PUBREL: already taken; acknowledge again without forwarding.
            debug!(
                client_id = %crate::logtext::LogText(&self.client_id),
                packet_id = p.packet_id,
                "QoS 2 PUBLISH resent before PUBREL; not forwarded again"
            );
            self.pending.queue.push_back(Pending::settled(p.packet_id, p.qos, None));
            return None;
        }
        // A reload since the last packet: this PUBLISH is checked and routed by the new
        // config (one atomic load when nothing changed).
        if self.live.generation != shared.live.generation() {
            if let Some(end) = self.reloaded() {
                return Some(end);
            }
        }
        if !self.acl.may_publish(&p.topic) {
            // Never routed: no local subscriber and no rule target sees it.
            shared.acl_denied_publish.inc();
            debug!(
                client_id = %crate::logtext::LogText(&self.client_id),
                topic = %crate::logtext::LogText(&p.topic),
                qos = p.qos as u8,
                "PUBLISH denied by the ACL"
            );
            if p.qos != QoS::AtMostOnce {
                if p.qos == QoS::ExactlyOnce && self.version == ProtocolVersion::V311 {
                    // 3.1.1 is told success, so its PUBREL must find the id.
                    self.pending.awaiting_rel.insert(p.packet_id);
                }
                self.pending.queue.push_back(Pending::settled(
                    p.packet_id,
                    p.qos,
                    Some(ReasonCode::NOT_AUTHORIZED),
                ));
            }
            return None;
        }
        let refused = if p.retain {
            shared.broker.retained_refusal(&self.client_id, &p.topic, p.payload.len())
        } else {
            None
        };
        if let Some(reason) = refused {
            shared.metrics.dropped(reason);
            if self.version == ProtocolVersion::V5 {
                // Refused whole: MQTT 5 can say why (0x97), nothing is routed.
                debug!(client_id = %crate::logtext::LogText(&self.client_id), "retained PUBLISH refused: mqtt.max_retained_bytes or max_retained_per_client");
                if p.qos != QoS::AtMostOnce {
                    if p.qos == QoS::ExactlyOnce {
                        self.pending.awaiting_rel.insert(p.packet_id);
                    }
                    let refused = Some(ReasonCode::QUOTA_EXCEEDED);
                    self.pending.queue.push_back(Pending::settled(p.packet_id, p.qos, refused));
                }
                return None;
            }
            // 3.1.1 cannot be told: delivered live, not kept as the topic's last value.
        }
        if shared.memory.over() {
            // `mqtt.max_memory`: QoS 0 is dropped; QoS 1/2 is taken and its publisher paused.
            if p.qos == QoS::AtMostOnce {
                shared.metrics.dropped("max_memory");
                return None;
            }
            self.memory_paused = true;
        }
        let charge = shared.memory.charge(p.topic.len() + p.payload.len());
        let msg = Arc::new(Message {
            charge,
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            client_id: Arc::clone(&self.client_id),
            username: self.username.clone(),
            properties: p.properties,
            received: self.last_packet.into_std(),
            packet_id: (p.qos != QoS::AtMostOnce).then_some(p.packet_id),
        });
        let mut hits = std::mem::take(&mut self.rule_hits);
        let (matched, waits, fanout) = route_counted(
            shared.routing(&self.live),
            &msg,
            Some(self.session_id),
            &mut hits,
            &mut self.blocked,
        );
        self.rule_hits = hits;
        self.work = self.work.saturating_add(u16::try_from(fanout).unwrap_or(u16::MAX));
        if p.qos != QoS::AtMostOnce {
            if p.qos == QoS::ExactlyOnce {
                self.pending.awaiting_rel.insert(p.packet_id);
            }
            self.pending.queue.push_back(Pending {
                packet_id: p.packet_id,
                qos: p.qos,
                waits,
                failure: None,
                matched,
                denied: None,
            });
        }
        None
    }

    /// Sends the acknowledgement for a resolved front entry, or ends the session if the
    /// message failed in a way the protocol version cannot express.
    pub(super) fn complete_front(&mut self, done: FrontDone) -> Option<End> {
        let code = match &done.failure {
            None if done.denied.is_some() && self.version == ProtocolVersion::V5 => {
                done.denied.unwrap_or(ReasonCode::NOT_AUTHORIZED)
            }
            None if !done.matched && self.version == ProtocolVersion::V5 => {
                ReasonCode::NO_MATCHING_SUBSCRIBERS
            }
            None => ReasonCode::SUCCESS,
            Some(f) => {
                self.shared.metrics.acks_failed.inc();
                // A success-range code (0x10 for an unroutable message) continues an MQTT 5
                // QoS 2 flow: its PUBREL must still find the id.
                let flow_goes_on = self.version == ProtocolVersion::V5
                    && !f.retryable
                    && f.code.is_some_and(ReasonCode::is_success);
                if done.qos == QoS::ExactlyOnce && !flow_goes_on {
                    self.pending.awaiting_rel.remove(&done.packet_id);
                }
                warn!(parent: &self.span(), packet_id = done.packet_id, reason = %f.reason, retryable = f.retryable, "message not delivered; not acknowledging it as delivered");
                match (self.version, f.retryable) {
                    (ProtocolVersion::V5, false) => {
                        f.code.unwrap_or(ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR)
                    }
                    (ProtocolVersion::V5, true) => {
                        let reason = format!(
                            "message {} not delivered: {}; resend it",
                            done.packet_id, f.reason
                        );
                        return Some(self.server_disconnect(ReasonCode::SERVER_BUSY, &reason));
                    }
                    (ProtocolVersion::V311, _) => {
                        return Some(End::ServerClose {
                            reason: format!(
                                "message {} not delivered ({}); MQTT 3.1.1 has no negative PUBACK, so the connection is closed and the client resends",
                                done.packet_id, f.reason
                            ),
                        });
                    }
                }
            }
        };
        let mut properties = PublishProperties::none();
        if let (Some(f), true) = (&done.failure, self.problem_info) {
            properties.reason_string = Some(f.reason.clone());
        }
        let response = PubResponse { packet_id: done.packet_id, code, properties };
        let packet = match done.qos {
            QoS::ExactlyOnce => Packet::PubRec(response),
            _ => Packet::PubAck(response),
        };
        self.send(&packet)
    }

    /// PUBREL releases a QoS 2 packet id: answer PUBCOMP.
    pub(super) fn on_pubrel(&mut self, r: PubResponse) -> Option<End> {
        let known = self.pending.awaiting_rel.remove(&r.packet_id);
        self.send(&Packet::PubComp(self.id_response(r.packet_id, known)))
    }
}

/// Publishes a will after an ungraceful end. Its outcomes have nobody to tell, so they are only
/// logged (and counted by the sinks). Also the MQTT-SN gateway's.
pub(crate) async fn publish_will(
    shared: &SessionShared,
    client_id: &Arc<str>,
    username: Option<Arc<str>>,
    will: LastWill,
    span: &tracing::Span,
) {
    let msg = Arc::new(Message {
        charge: Default::default(),
        topic: will.topic,
        payload: will.payload,
        qos: will.qos,
        retain: will.retain,
        client_id: Arc::clone(client_id),
        username,
        properties: Properties { will_delay_interval: None, ..will.properties }.into(),
        received: Instant::now(),
        packet_id: None,
    });
    debug!(parent: span, topic = %crate::logtext::LogText(&msg.topic), "publishing will");
    let mut blocked = Vec::new();
    let live = shared.live.load();
    let (_, waits) = route(shared.routing(&live), &msg, None, &mut Vec::new(), &mut blocked);
    drop(live);
    send_blocked(blocked).await;
    if !waits.is_empty() {
        let span = span.clone();
        tokio::spawn(async move {
            for rx in waits {
                if let Ok(Outcome::Failed(f)) = rx.await {
                    warn!(parent: &span, reason = %f.reason, "will message not delivered");
                }
            }
        });
    }
}

/// An MQTT 5 will waiting for its Will Delay Interval (already capped by the session expiry).
pub(super) struct DelayedWill {
    pub(super) shared: Arc<SessionShared>,
    pub(super) client_id: Arc<str>,
    pub(super) username: Option<Arc<str>>,
    pub(super) will: LastWill,
    /// How long to wait: the earlier of the will delay and the session's end.
    pub(super) delay: std::time::Duration,
    /// The broker's id of this entry (see `Broker::delay_will`).
    pub(super) id: u64,
    /// `true`: publish now (the session ended); `false`: drop it (the session resumed).
    pub(super) fate: oneshot::Receiver<bool>,
    pub(super) span: tracing::Span,
}

impl DelayedWill {
    /// Waits for the delay or for the session's fate, then publishes the will or drops it.
    /// At shutdown a waiting will is dropped: the gateway is not publishing any more.
    pub(super) async fn run(mut self) {
        let publish = tokio::select! {
            () = tokio::time::sleep(self.delay) => true,
            fate = &mut self.fate => fate.unwrap_or(false),
            () = self.shared.shutdown.cancelled() => false,
        };
        self.shared.broker.will_done(&self.client_id, self.id);
        if publish {
            publish_will(&self.shared, &self.client_id, self.username, self.will, &self.span).await;
        } else {
            debug!(parent: &self.span, "delayed will dropped: session resumed or shutdown");
        }
    }
}

/// The topic aliases of this MQTT 5 connection: the ones the client sets (at most
/// `mqtt.topic_alias_maximum`, advertised in CONNACK) and the ones we set on deliveries (at
/// most the client's Topic Alias Maximum from CONNECT; the first topics delivered get one,
/// later ones go by name once they are all taken).
#[derive(Debug, Default)]
pub(super) struct TopicAliases {
    /// Both tables, boxed together and made on the first alias: most clients use none, and
    /// every session carries this field.
    tables: Option<Box<AliasTables>>,
    /// Our Topic Alias Maximum.
    maximum: u16,
    /// The client's Topic Alias Maximum: aliases we may set on deliveries.
    client_maximum: u16,
}

#[derive(Debug, Default)]
pub(super) struct AliasTables {
    /// Client to server: topic by alias - 1; grows up to `maximum` as the client uses them.
    inbound: Vec<Option<String>>,
    /// Server to client: the alias of each topic given one.
    outbound: std::collections::HashMap<String, u16>,
}

impl TopicAliases {
    pub(super) fn new(maximum: u16, client_maximum: u16) -> Self {
        TopicAliases { tables: None, maximum, client_maximum }
    }

    /// What a resting session keeps: the tables (if any) and the client's maximum (ours is
    /// the config's, `mqtt.topic_alias_maximum`).
    pub(super) fn into_parts(self) -> (Option<Box<AliasTables>>, u16) {
        (self.tables, self.client_maximum)
    }

    /// The aliases of a resting session again.
    pub(super) fn from_parts(
        tables: Option<Box<AliasTables>>,
        maximum: u16,
        client_maximum: u16,
    ) -> Self {
        TopicAliases { tables, maximum, client_maximum }
    }

    /// For a delivery of `publish` (MQTT 5): the topic's alias replaces its name when it has
    /// one; a topic without one gets the next free alias, set on this PUBLISH (name and alias)
    /// and returned, to be recorded with [`record`](Self::record) once the PUBLISH is queued.
    pub(super) fn outbound(&mut self, publish: &mut Publish) -> Option<u16> {
        if self.client_maximum == 0 {
            return None;
        }
        let tables = self.tables.get_or_insert_with(Box::default);
        if let Some(alias) = tables.outbound.get(&publish.topic) {
            publish.properties.topic_alias = Some(*alias);
            publish.topic.clear();
            return None;
        }
        let next = u16::try_from(tables.outbound.len()).ok()?.checked_add(1)?;
        if next > self.client_maximum {
            return None;
        }
        publish.properties.topic_alias = Some(next);
        Some(next)
    }

    /// Records that `topic` now has `alias` on this connection (its PUBLISH was queued).
    pub(super) fn record(&mut self, topic: String, alias: u16) {
        self.tables.get_or_insert_with(Box::default).outbound.insert(topic, alias);
    }

    /// Sets (non-empty topic) or applies (empty topic) `alias`, per MQTT 5 §3.3.2.3.4.
    fn resolve(
        &mut self,
        alias: u16,
        topic: &mut String,
    ) -> Result<(), (ReasonCode, &'static str)> {
        if alias == 0 || alias > self.maximum {
            return Err((
                ReasonCode::TOPIC_ALIAS_INVALID,
                "topic alias 0 or above Topic Alias Maximum",
            ));
        }
        let slot = usize::from(alias - 1);
        let topics = &mut self.tables.get_or_insert_with(Box::default).inbound;
        if topic.is_empty() {
            match topics.get(slot).and_then(Option::as_ref) {
                Some(known) => topic.clone_from(known),
                None => {
                    return Err((ReasonCode::PROTOCOL_ERROR, "topic alias used before it was set"))
                }
            }
        } else {
            if topics.len() <= slot {
                topics.resize(slot + 1, None);
            }
            topics[slot] = Some(topic.clone());
        }
        Ok(())
    }
}

/// Per-client publish rate limits (`mqtt.max_publish_rate`, `mqtt.max_publish_bytes_rate`):
/// token buckets with a second's worth of burst. A PUBLISH may take a bucket below zero; the
/// session then reads nothing until it is back at zero (backpressure, not disconnect).
#[derive(Debug)]
pub(crate) struct PublishRate {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
}

#[derive(Debug)]
/// A token bucket: `rate` tokens per second, a second's worth of burst.
pub(crate) struct Bucket {
    /// Tokens per second (also the burst).
    rate: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    /// A full bucket; `None` for a rate of 0 (no limit).
    pub(crate) fn new(rate: f64) -> Option<Bucket> {
        (rate > 0.0).then(|| Bucket { rate, tokens: rate, at: tokio::time::Instant::now() })
    }

    /// Refills; how long until the bucket is back at zero while it is overdrawn.
    fn debt(&mut self, now: tokio::time::Instant) -> Option<std::time::Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        (self.tokens < 0.0).then(|| std::time::Duration::from_secs_f64(-self.tokens / self.rate))
    }

    /// Takes `n` tokens if the bucket holds them; false (nothing taken) when it does not.
    pub(crate) fn try_take(&mut self, now: tokio::time::Instant, n: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        let ok = self.tokens >= n;
        if ok {
            self.tokens -= n;
        }
        ok
    }

    /// Takes `n` tokens; how long until the bucket is back at zero when that overdraws it.
    fn take(&mut self, now: tokio::time::Instant, n: f64) -> Option<std::time::Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate) - n;
        (self.tokens < 0.0).then(|| std::time::Duration::from_secs_f64(-self.tokens / self.rate))
    }
}

impl PublishRate {
    /// The limits configured, `None` when there are none.
    pub(crate) fn new(limits: &super::SessionLimits) -> Option<PublishRate> {
        let messages = Bucket::new(f64::from(limits.max_publish_rate));
        // u64 to f64: exact for any sensible rate.
        #[allow(clippy::cast_precision_loss)]
        let bytes = Bucket::new(limits.max_publish_bytes_rate as f64);
        (messages.is_some() || bytes.is_some()).then_some(PublishRate { messages, bytes })
    }

    /// Charges one PUBLISH of `bytes`; how long to stop reading, if at all.
    pub(super) fn take(
        &mut self,
        now: tokio::time::Instant,
        bytes: usize,
    ) -> Option<std::time::Duration> {
        #[allow(clippy::cast_precision_loss)]
        let bytes = bytes as f64;
        let a = self.messages.as_mut().and_then(|b| b.take(now, 1.0));
        let b = self.bytes.as_mut().and_then(|b| b.take(now, bytes));
        a.max(b)
    }
}

impl PublishRate {
    /// For a publisher that is refused rather than made to wait (the HTTP publish API): a
    /// message is taken, and charged, only while no bucket is overdrawn; otherwise how long
    /// until they all are back at zero. One message may overdraw them, as a PUBLISH does.
    pub(crate) fn admit(
        &mut self,
        now: tokio::time::Instant,
        bytes: usize,
    ) -> Result<(), std::time::Duration> {
        let a = self.messages.as_mut().and_then(|b| b.debt(now));
        let b = self.bytes.as_mut().and_then(|b| b.debt(now));
        if let Some(wait) = a.max(b) {
            return Err(wait);
        }
        let _ = self.take(now, bytes);
        Ok(())
    }
}
