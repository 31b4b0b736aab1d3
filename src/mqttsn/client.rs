//! One MQTT-SN client: a task from CONNECT to its end, fed its datagrams by the gateway's
//! loop. The state machine of spec §6.14: active (keep alive), asleep (DISCONNECT with a
//! duration: deliveries wait in the session's bounded queue), awake (a PINGREQ: what waits is
//! sent, then PINGRESP and asleep again), lost (keep alive or sleep overrun, or no answer
//! after N_retry sends: the will is published).
//!
//! Its session is a broker session (`SessionState`: the queue, the unacknowledged
//! deliveries, the filters), parked and resumed by client id like an MQTT client's. A QoS 1/2
//! PUBLISH is routed by `routing::route` into the session's `PendingQueue`; its PUBACK (or
//! PUBREC) leaves from the front once every target has confirmed, in arrival order. A failure
//! is never acknowledged as accepted: PUBACK 0x01 (congestion: the client sends again later)
//! for a retryable one, 0x03 for a final one.
//!
//! - `connect.rs`: the handshake and the will exchange.
//! - `outbound.rs`: deliveries (REGISTER before a topic the client has no id for), their
//!   acknowledgements, T_retry/N_retry, sleeping and waking.

mod connect;
mod outbound;

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use super::codec::{self, Packet, Publish, ReturnCode, SnQos, Subscribe, TopicRef, TopicSpec};
use super::gateway::{Gateway, Peer};
use super::topics::Topics;
use crate::auth::acl::{ClientAcl, Grant};
use crate::broker::sessions::DoneGuard;
use crate::broker::{CloseReason, Expiry, Outbound, SessionState, SubscribeOptions};
use crate::message::Message;
use crate::mqtt::codec::{LastWill, PublishProperties, QoS, ReasonCode};
use crate::mqtt::session::{FrontDone, PendingQueue};
use crate::reload::Live;
use crate::routing::route;
use crate::targets::{send_blocked, Blocked, Outcome, Waits};

/// QoS 1 message ids acknowledged lately: a resend (DUP) of one whose PUBACK was lost is
/// acknowledged again, not routed again.
const RECENT_ACKS: usize = 16;

/// One datagram for a client's task.
pub(super) struct Datagram {
    /// Where it came from (a sleeping client may wake from another address).
    pub from: Peer,
    pub data: Bytes,
    /// Its bytes against `mqtt.max_memory` while it waits (the queues of all clients
    /// together are bounded by that budget, each by `mqttsn.client_queue`).
    pub _held: crate::memory::Charge,
}

/// Where the client stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Active,
    /// Asleep for this long; deliveries wait.
    Asleep(Duration),
    /// Woken by a PINGREQ: what waits is being sent.
    Awake(Duration),
}

/// Why a client ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT without a duration: no will.
    ClientDisconnect,
    /// Keep alive, sleep overrun or no answer (the reason label): the will is published.
    Lost(&'static str),
    /// We ended it (takeover, an operator, shutdown): the will is published.
    ServerClose(String),
    /// A reload took its right to connect away: no will.
    Revoked,
    /// A new CONNECT from the client: this connection ends without its will; the new one
    /// starts from this CONNECT.
    Reconnect(codec::Connect, Peer),
}

/// A topic the gateway is registering before a delivery.
#[derive(Debug)]
struct Registering {
    msg_id: u16,
    topic_id: u16,
    sent: Instant,
    tries: u8,
    /// What goes out once the client has the id.
    then: Then,
}

#[derive(Debug)]
enum Then {
    /// A new delivery.
    New(Outbound),
    /// An unacknowledged delivery to send again (its message id).
    Resend(u16),
}

/// A SUBACK or UNSUBACK of a stored session, waiting for its record to be durable.
struct Held {
    durable: oneshot::Receiver<Outcome>,
    ack: Packet,
    /// The SUBSCRIBE's retained messages to queue after it: filter, granted QoS.
    retained: Option<(String, QoS)>,
}

/// What woke the client's loop.
enum Event {
    Close(CloseReason),
    Acked(FrontDone),
    Datagram(Option<Datagram>),
    Deliver(Outbound),
    Timer,
}

/// A connected client.
pub(super) struct Client {
    gw: Arc<Gateway>,
    /// Where it is (its last datagram's address, and node id behind a forwarder).
    peer: Peer,
    client_id: Arc<str>,
    /// What it may publish and subscribe to (client id only: MQTT-SN has no user).
    acl: ClientAcl,
    /// The config snapshot it routes with; replaced when a reload is seen.
    live: Arc<Live>,
    session_id: u64,
    /// Clean session: `Now`; else `mqttsn.session_expiry`.
    expiry: Expiry,
    /// Its registry link (takeover, shutdown, operator).
    link: Option<DoneGuard>,
    /// The broker session.
    state: SessionState,
    /// 1.5 × its keep alive (`None`: none and no idle timeout).
    keepalive: Option<Duration>,
    last_heard: Instant,
    will: Option<Box<LastWill>>,
    topics: Topics,
    /// Its QoS 1/2 PUBLISHes waiting for their outcomes, in order.
    pending: PendingQueue,
    /// The topic id of each `pending` entry (the PUBACK repeats it), in the same order.
    pending_topics: VecDeque<u16>,
    /// QoS 1 message ids acknowledged lately (at most `RECENT_ACKS`).
    recent: VecDeque<u16>,
    mode: Mode,
    /// Asleep or awake: lost when nothing came by then.
    sleep_until: Option<Instant>,
    /// Unacknowledged deliveries: when each was last sent and how many times again.
    sent: HashMap<u16, (Instant, u8)>,
    registering: Option<Registering>,
    /// Unacknowledged deliveries to send again (a resumed session, a wake), in order.
    resend: VecDeque<u16>,
    /// Requests a full sink could not take: awaited before the next datagram.
    blocked: Blocked,
    hits: Vec<usize>,
    held: Option<Held>,
    /// Shutting down: its deadline for the pending acknowledgements.
    draining: Option<Instant>,
    /// Encoding buffer.
    buf: BytesMut,
    /// `mqtt.max_subscribe_rate` (SUBSCRIBEs per second; `None`: no limit). Over it, a
    /// SUBSCRIBE is refused with the protocol's "congestion" (the client tries again later).
    subscribes: Option<crate::mqtt::session::Bucket>,
}

/// The client task: the CONNECT in `rx` first, then connections until one ends for good.
/// `key` tells the gateway's loop which client ended.
pub(super) async fn run(gw: Arc<Gateway>, mut rx: mpsc::Receiver<Datagram>, key: u64) {
    let first = match rx.recv().await {
        Some(d) => match codec::decode(&d.data) {
            Ok(Packet::Connect(c)) => Some((c, d.from)),
            _ => None,
        },
        None => None,
    };
    let mut next = first;
    while let Some((connect, from)) = next.take() {
        let Some(mut client) = connect::handshake(&gw, &mut rx, connect, from).await else {
            break;
        };
        gw.metrics.clients.inc();
        let end = client.run(&mut rx).await;
        gw.metrics.clients.dec();
        if let End::Reconnect(c, from) = end {
            client.finish(End::Reconnect(c.clone(), from.clone())).await;
            next = Some((c, from));
        } else {
            client.finish(end).await;
        }
    }
    let _ = gw.ended.send(key);
}

impl Client {
    fn span(&self) -> tracing::Span {
        tracing::info_span!("mqttsn", client_id = %crate::logtext::LogText(&self.client_id), peer = %self.peer.addr)
    }

    /// Sends `p` to the client.
    fn send(&mut self, p: &Packet) {
        self.gw.send(p, &self.peer, &mut self.buf);
    }

    /// The loop: registry link, the front acknowledgement, datagrams, deliveries, timers.
    async fn run(&mut self, rx: &mut mpsc::Receiver<Datagram>) -> End {
        let mut sleep: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep_until(self.next_due()));
        if !self.resend.is_empty() {
            self.pump();
        }
        loop {
            if !self.blocked.is_empty() {
                send_blocked(std::mem::take(&mut self.blocked)).await;
            }
            if let Some(held) = self.held.take() {
                if let Some(end) = self.release_held(held).await {
                    return end;
                }
            }
            let due = self.next_due();
            if sleep.deadline() != due {
                sleep.as_mut().reset(due);
            }
            let event = poll_fn(|cx| self.poll_event(cx, rx, &mut sleep)).await;
            let end = match event {
                Event::Close(reason) => self.on_close(reason),
                Event::Acked(done) => {
                    self.complete_front(done);
                    while let Some(done) = self.pending.try_front_done() {
                        self.complete_front(done);
                    }
                    self.drained()
                }
                Event::Datagram(None) => Some(End::ServerClose("the gateway stopped".into())),
                Event::Datagram(Some(d)) => self.on_datagram(d),
                Event::Deliver(out) => {
                    self.deliver(out);
                    self.pump();
                    None
                }
                Event::Timer => self.on_timer(),
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// The next thing to handle, in priority order; every source not ready has `cx`'s
    /// waker registered.
    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        rx: &mut mpsc::Receiver<Datagram>,
        sleep: &mut Pin<Box<Sleep>>,
    ) -> Poll<Event> {
        if let (Some(link), None) = (&self.link, self.draining) {
            if let Poll::Ready(reason) = link.0.poll_close(cx) {
                return Poll::Ready(Event::Close(reason));
            }
        }
        if !self.pending.is_empty() {
            if let Poll::Ready(done) = self.pending.poll_front_done(cx) {
                return Poll::Ready(Event::Acked(done));
            }
        }
        if self.draining.is_none() {
            if let Poll::Ready(d) = rx.poll_recv(cx) {
                return Poll::Ready(Event::Datagram(d));
            }
        }
        if self.may_take() {
            if let Poll::Ready(Some(out)) = self.state.subscriber.queue.poll_recv(cx) {
                return Poll::Ready(Event::Deliver(out));
            }
        }
        if sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Event::Timer);
        }
        Poll::Pending
    }

    /// The registry says close.
    fn on_close(&mut self, reason: CloseReason) -> Option<End> {
        self.send(&Packet::Disconnect { duration: None });
        match reason {
            CloseReason::Shutdown if !self.pending.is_empty() => {
                // The PUBLISHes already read get their outcomes and acknowledgements first.
                self.draining = Some(Instant::now() + self.gw.shared.limits.shutdown_timeout);
                None
            }
            CloseReason::Shutdown => Some(End::ServerClose("server shutting down".into())),
            CloseReason::Revoked => Some(End::Revoked),
            CloseReason::Admin => Some(End::ServerClose("disconnected by an operator".into())),
            CloseReason::Takeover => {
                Some(End::ServerClose("another connection took over this client id".into()))
            }
        }
    }

    /// Shutting down and nothing pending any more: the end.
    fn drained(&self) -> Option<End> {
        (self.draining.is_some() && self.pending.is_empty())
            .then(|| End::ServerClose("server shutting down".into()))
    }

    /// One datagram from the client. Nothing in it ends the gateway; a bad one is counted.
    fn on_datagram(&mut self, d: Datagram) -> Option<End> {
        self.peer = d.from;
        self.last_heard = Instant::now();
        if let Mode::Asleep(duration) | Mode::Awake(duration) = self.mode {
            self.sleep_until = Some(self.last_heard + duration.mul_f32(1.5));
        }
        let packet = match codec::decode(&d.data) {
            Ok(p) => p,
            Err(e) => {
                self.gw.metrics.drop_for(e.kind());
                debug!(parent: &self.span(), error = %e, "bad MQTT-SN datagram");
                return None;
            }
        };
        match packet {
            Packet::Publish(p) => return self.on_publish(p),
            Packet::PubRel { msg_id } => {
                self.pending.awaiting_rel().remove(&msg_id);
                self.send(&Packet::PubComp { msg_id });
            }
            Packet::PubAck { topic_id, msg_id, code } => self.on_puback(topic_id, msg_id, code),
            Packet::PubRec { msg_id } => self.on_pubrec(msg_id),
            Packet::PubComp { msg_id } => self.on_pubcomp(msg_id),
            Packet::Register { msg_id, topic_name, .. } => self.on_register(msg_id, topic_name),
            Packet::RegAck { topic_id, msg_id, code } => self.on_regack(topic_id, msg_id, code),
            Packet::Subscribe(s) => return self.on_subscribe(s),
            Packet::Unsubscribe { msg_id, topic } => return self.on_unsubscribe(msg_id, topic),
            Packet::PingReq { .. } => self.on_pingreq(),
            Packet::Disconnect { duration: None } => {
                self.send(&Packet::Disconnect { duration: None });
                return Some(End::ClientDisconnect);
            }
            Packet::Disconnect { duration: Some(d) } => self.fall_asleep(d),
            Packet::Connect(c) => return self.on_connect(c, self.peer.clone()),
            Packet::WillTopicUpd(w) => self.on_will_topic_update(w),
            Packet::WillMsgUpd(m) => {
                let code = match &mut self.will {
                    Some(will) => {
                        will.payload = m;
                        ReturnCode::ACCEPTED
                    }
                    None => ReturnCode::NOT_SUPPORTED,
                };
                self.gw.metrics.rejected_with(code);
                self.send(&Packet::WillMsgResp { code });
            }
            Packet::SearchGw { .. } => {
                let p = Packet::GwInfo { gw_id: self.gw.config.gateway_id, gw_add: Bytes::new() };
                self.send(&p);
            }
            _ => self.gw.metrics.drop_for("unexpected"),
        }
        None
    }

    /// A CONNECT while connected: a sleeping client back to active (CleanSession 0, no will
    /// exchange: in place, its session and registrations kept), else a new connection.
    fn on_connect(&mut self, c: codec::Connect, from: Peer) -> Option<End> {
        if matches!(self.mode, Mode::Asleep(_) | Mode::Awake(_)) && !c.clean_session && !c.will {
            self.gw.metrics.asleep.dec();
            self.mode = Mode::Active;
            self.sleep_until = None;
            let max = self.gw.shared.limits.max_keepalive;
            let d = if max > 0 && c.duration > max { max } else { c.duration };
            self.keepalive = match d {
                0 => Some(self.gw.shared.limits.idle_timeout).filter(|d| !d.is_zero()),
                k => Some(Duration::from_millis(u64::from(k) * 1500)),
            };
            self.send(&Packet::ConnAck { code: ReturnCode::ACCEPTED });
            self.wake_resend();
            self.pump();
            return None;
        }
        Some(End::Reconnect(c, from))
    }

    /// WILLTOPICUPD: a new will topic (the message kept), or none (no will).
    fn on_will_topic_update(&mut self, w: Option<codec::WillTopic>) {
        let code = match w {
            None => {
                self.will = None;
                ReturnCode::ACCEPTED
            }
            Some(w) if crate::mqtt::topic::validate_name(&w.topic).is_err() => {
                ReturnCode::NOT_SUPPORTED
            }
            Some(w) => {
                let payload = self.will.take().map(|old| old.payload).unwrap_or_default();
                self.will = Some(Box::new(connect::will_of(w, payload)));
                ReturnCode::ACCEPTED
            }
        };
        self.gw.metrics.rejected_with(code);
        self.send(&Packet::WillTopicResp { code });
    }

    /// A reload since the client's last look: its new ACL (and snapshot) from now.
    fn check_reload(&mut self) -> Option<End> {
        if self.live.generation == self.gw.shared.live.generation() {
            return None;
        }
        let live = self.gw.shared.live.load();
        if self.gw.config.client_ids.is_empty() && !live.auth.allows_anonymous() {
            self.live = live;
            return Some(End::Revoked);
        }
        let mut acl = live.auth.acl.for_client(None, &self.client_id);
        connect::apply_acl(&self.gw.shared, &mut self.state, &mut acl);
        if self.expiry != Expiry::Now {
            self.gw.shared.broker.store_session(&self.state, self.expiry, false);
        }
        self.acl = acl;
        self.live = live;
        None
    }

    /// The topic of a PUBLISH's id (a valid topic name), if known. Registered and predefined
    /// topics were checked when they got their ids; a short name is checked here.
    fn topic_of(&self, r: TopicRef) -> Option<String> {
        match r {
            TopicRef::Normal(id) => self.topics.name(id).map(|n| n.to_string()),
            TopicRef::Predefined(id) => self.gw.predefined.name(id).map(|n| n.to_string()),
            TopicRef::Short(s) => {
                let name = std::str::from_utf8(&s).ok()?;
                (crate::mqtt::topic::validate_name(name).is_ok()
                    && self.gw.shared.limits.topic_limits.check(name).is_ok())
                .then(|| name.to_owned())
            }
        }
    }

    /// Answers a PUBLISH at once (a rejection, or a resend already acknowledged).
    fn puback(&mut self, topic_id: u16, msg_id: u16, code: ReturnCode) {
        self.gw.metrics.rejected_with(code);
        self.send(&Packet::PubAck { topic_id, msg_id, code });
    }

    /// A PUBLISH from the client: the checks an MQTT PUBLISH goes through, then routing;
    /// QoS 1/2 get their entry in the pending queue.
    fn on_publish(&mut self, p: Publish) -> Option<End> {
        let shared = Arc::clone(&self.gw.shared);
        let qos = p.qos.mqtt();
        let topic_id = u16::from_be_bytes(p.topic.id_bytes());
        let Some(topic) = self.topic_of(p.topic) else {
            self.puback(topic_id, p.msg_id, ReturnCode::INVALID_TOPIC_ID);
            return None;
        };
        shared.received[qos as usize].inc();
        match qos {
            QoS::AtLeastOnce if p.dup && self.pending.contains(p.msg_id) => return None,
            QoS::AtLeastOnce if p.dup && self.recent.contains(&p.msg_id) => {
                // Its PUBACK was lost: acknowledged again, not routed again.
                self.send(&Packet::PubAck {
                    topic_id,
                    msg_id: p.msg_id,
                    code: ReturnCode::ACCEPTED,
                });
                return None;
            }
            QoS::ExactlyOnce if self.pending.awaiting_rel().contains(&p.msg_id) => {
                // Taken already: PUBREC again (from the queue's front, in order).
                if !self.pending.contains(p.msg_id) {
                    self.push_pending(p.msg_id, qos, topic_id, Waits::new(), true, None);
                }
                return None;
            }
            _ => {}
        }
        if qos != QoS::AtMostOnce && !self.pending.has_room() {
            self.puback(topic_id, p.msg_id, ReturnCode::CONGESTION);
            return None;
        }
        if let Some(end) = self.check_reload() {
            return Some(end);
        }
        if !self.acl.may_publish(&topic) {
            shared.acl_denied_publish.inc();
            debug!(parent: &self.span(), topic = %crate::logtext::LogText(&topic), "MQTT-SN PUBLISH denied by the ACL");
            if qos != QoS::AtMostOnce {
                let denied = Some(ReasonCode::NOT_AUTHORIZED);
                self.push_pending(p.msg_id, qos, topic_id, Waits::new(), true, denied);
            }
            return None;
        }
        if p.retain {
            if let Some(reason) =
                shared.broker.retained_refusal(&self.client_id, &topic, p.data.len())
            {
                shared.metrics.dropped(reason);
                if qos != QoS::AtMostOnce {
                    let denied = Some(ReasonCode::QUOTA_EXCEEDED);
                    self.push_pending(p.msg_id, qos, topic_id, Waits::new(), true, denied);
                }
                return None;
            }
        }
        if shared.memory.over() {
            // `mqtt.max_memory`: QoS 0 dropped; QoS 1/2 told to come back (congestion).
            shared.metrics.dropped("max_memory");
            if qos != QoS::AtMostOnce {
                self.puback(topic_id, p.msg_id, ReturnCode::CONGESTION);
            }
            return None;
        }
        let charge = shared.memory.charge(topic.len() + p.data.len());
        let msg = Arc::new(Message {
            charge,
            topic,
            payload: p.data,
            qos,
            retain: p.retain,
            client_id: Arc::clone(&self.client_id),
            username: None,
            properties: PublishProperties::none(),
            received: std::time::Instant::now(),
            packet_id: (qos != QoS::AtMostOnce).then_some(p.msg_id),
        });
        let (matched, waits) = route(
            shared.routing(&self.live),
            &msg,
            Some(self.session_id),
            &mut self.hits,
            &mut self.blocked,
        );
        if qos != QoS::AtMostOnce {
            if qos == QoS::ExactlyOnce {
                self.pending.awaiting_rel().insert(p.msg_id);
            }
            self.push_pending(p.msg_id, qos, topic_id, waits, matched, None);
        }
        None
    }

    fn push_pending(
        &mut self,
        msg_id: u16,
        qos: QoS,
        topic_id: u16,
        waits: Waits,
        matched: bool,
        denied: Option<ReasonCode>,
    ) {
        self.pending.push(msg_id, qos, waits, matched, denied);
        self.pending_topics.push_back(topic_id);
    }

    /// The front PUBLISH has all its outcomes: PUBACK (or PUBREC) accepted only when every
    /// target took it; a failure is a rejection (0x01 retryable, 0x03 final), never accepted.
    fn complete_front(&mut self, done: FrontDone) {
        let topic_id = self.pending_topics.pop_front().unwrap_or(0);
        let code = match (&done.failure, done.denied) {
            (None, None) => ReturnCode::ACCEPTED,
            (None, Some(_)) => ReturnCode::NOT_SUPPORTED,
            (Some(f), _) => {
                self.gw.shared.metrics.acks_failed.inc();
                warn!(parent: &self.span(), msg_id = done.packet_id, reason = %f.reason, retryable = f.retryable, "message not delivered; not acknowledging it as accepted");
                if f.retryable {
                    ReturnCode::CONGESTION
                } else {
                    ReturnCode::NOT_SUPPORTED
                }
            }
        };
        let msg_id = done.packet_id;
        if code != ReturnCode::ACCEPTED && done.qos == QoS::ExactlyOnce {
            self.pending.awaiting_rel().remove(&msg_id);
        }
        match (code, done.qos) {
            (ReturnCode::ACCEPTED, QoS::ExactlyOnce) => self.send(&Packet::PubRec { msg_id }),
            (ReturnCode::ACCEPTED, _) => {
                if self.recent.len() >= RECENT_ACKS {
                    self.recent.pop_front();
                }
                self.recent.push_back(msg_id);
                self.send(&Packet::PubAck { topic_id, msg_id, code });
            }
            _ => self.puback(topic_id, msg_id, code),
        }
    }

    /// REGISTER from the client: its topic's id (0x03 for a name that is not a valid topic
    /// name, 0x01 when `mqttsn.max_topics` are taken).
    fn on_register(&mut self, msg_id: u16, name: String) {
        let valid = crate::mqtt::topic::validate_name(&name).is_ok()
            && self.gw.shared.limits.topic_limits.check(&name).is_ok();
        let (topic_id, code) = match valid.then(|| self.topics.register(&name)) {
            None => (0, ReturnCode::NOT_SUPPORTED),
            Some(None) => (0, ReturnCode::CONGESTION),
            Some(Some(id)) => (id, ReturnCode::ACCEPTED),
        };
        self.gw.metrics.rejected_with(code);
        self.send(&Packet::RegAck { topic_id, msg_id, code });
    }

    /// The filter a SUBSCRIBE or UNSUBSCRIBE names, or the return code refusing it.
    fn filter_of(&self, spec: TopicSpec) -> Result<String, ReturnCode> {
        let filter = match spec {
            TopicSpec::Name(f) => f,
            TopicSpec::Predefined(id) => match self.gw.predefined.name(id) {
                Some(n) => n.to_string(),
                None => return Err(ReturnCode::INVALID_TOPIC_ID),
            },
            TopicSpec::Short(s) => match std::str::from_utf8(&s) {
                Ok(s) => s.to_owned(),
                Err(_) => return Err(ReturnCode::INVALID_TOPIC_ID),
            },
        };
        let ok = crate::mqtt::topic::parse_subscription(&filter)
            .and_then(|p| self.gw.shared.limits.topic_limits.check(p.filter))
            .is_ok();
        if ok {
            Ok(filter)
        } else {
            Err(ReturnCode::NOT_SUPPORTED)
        }
    }

    /// SUBSCRIBE: one filter; the SUBACK carries the topic id the gateway will publish with
    /// (a name without wildcards is registered now; a predefined id is its own; 0 otherwise).
    fn on_subscribe(&mut self, s: Subscribe) -> Option<End> {
        if let Some(end) = self.check_reload() {
            return Some(end);
        }
        let shared = Arc::clone(&self.gw.shared);
        let granted = match s.qos {
            SnQos::Two => QoS::ExactlyOnce,
            SnQos::One => QoS::AtLeastOnce,
            SnQos::Zero | SnQos::MinusOne => QoS::AtMostOnce,
        };
        let predefined = match &s.topic {
            TopicSpec::Predefined(id) => Some(*id),
            _ => None,
        };
        let refuse = |this: &mut Client, code: ReturnCode| {
            this.gw.metrics.rejected_with(code);
            this.send(&Packet::SubAck { qos: s.qos, topic_id: 0, msg_id: s.msg_id, code });
            None
        };
        if let Some(bucket) = &mut self.subscribes {
            if !bucket.try_take(tokio::time::Instant::now(), 1.0) {
                return refuse(self, ReturnCode::CONGESTION);
            }
        }
        let filter = match self.filter_of(s.topic.clone()) {
            Ok(f) => f,
            Err(code) => return refuse(self, code),
        };
        if !self.state.filters.contains_key(&filter)
            && self.state.filters.len() >= shared.limits.max_subscriptions
        {
            return refuse(self, ReturnCode::CONGESTION);
        }
        match self.acl.grant(&filter) {
            Grant::Refused => {
                shared.acl_denied_subscribe.inc();
                return refuse(self, ReturnCode::NOT_SUPPORTED);
            }
            Grant::Filtered => self.acl.set_filtering(),
            Grant::Granted => {}
        }
        let options = SubscribeOptions {
            qos: granted,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
        };
        self.state.filters.insert(filter.clone(), options);
        shared.broker.subscribe(self.session_id, &filter, options, &self.state.subscriber);
        let wildcard = filter.contains(['+', '#']);
        let topic_id = match predefined {
            Some(id) => id,
            None if !wildcard && !filter.starts_with("$share/") && filter.len() != 2 => {
                self.topics.register(&filter).unwrap_or(0)
            }
            None => 0,
        };
        let shared_group = filter.starts_with("$share/");
        let ack = Packet::SubAck {
            qos: SnQos::from_mqtt(granted),
            topic_id,
            msg_id: s.msg_id,
            code: ReturnCode::ACCEPTED,
        };
        // Retained messages are not sent on a shared subscription.
        let retained = (!shared_group).then_some((filter, granted));
        match shared.broker.store_session(&self.state, self.expiry, true) {
            Some(durable) => self.held = Some(Held { durable, ack, retained }),
            None => self.answer(&ack, retained),
        }
        None
    }

    /// UNSUBSCRIBE: one filter.
    fn on_unsubscribe(&mut self, msg_id: u16, topic: TopicSpec) -> Option<End> {
        if let Ok(filter) = self.filter_of(topic) {
            self.state.filters.remove(&filter);
            self.gw.shared.broker.unsubscribe(self.session_id, &filter);
        }
        let ack = Packet::UnsubAck { msg_id };
        match self.gw.shared.broker.store_session(&self.state, self.expiry, true) {
            Some(durable) => self.held = Some(Held { durable, ack, retained: None }),
            None => self.send(&ack),
        }
        None
    }

    /// Waits until a stored session's record is durable, then answers.
    async fn release_held(&mut self, held: Held) -> Option<End> {
        match held.durable.await {
            Ok(Outcome::Delivered) => {
                self.answer(&held.ack, held.retained);
                None
            }
            Ok(Outcome::Failed(f)) => {
                warn!(parent: &self.span(), reason = %f.reason, "subscriptions not stored");
                Some(End::ServerClose("the session's subscriptions could not be stored".into()))
            }
            Err(_) => Some(End::ServerClose("the store stopped".into())),
        }
    }

    /// Sends a SUBACK or UNSUBACK, then queues a SUBSCRIBE's retained messages (through the
    /// same bounded queue as live ones).
    fn answer(&mut self, ack: &Packet, retained: Option<(String, QoS)>) {
        self.send(ack);
        let Some((filter, granted)) = retained else { return };
        let room = self.state.subscriber.queue.room();
        for msg in self.gw.shared.broker.retained_matching_at_most(&filter, room) {
            let out = Outbound {
                qos: msg.qos.min(granted),
                msg,
                retain: true,
                shared: None,
                subscription_ids: Vec::new(),
                ticket: None,
                stored: None,
            };
            if self.state.subscriber.queue.try_send(out).is_err() {
                self.gw.shared.metrics.dropped("subscriber_queue_full");
            }
        }
    }

    /// Cleans up: parks or discards the session, releases the client id, publishes the will
    /// (unless the client said DISCONNECT, or a reload revoked it, or it connected again).
    async fn finish(mut self, end: End) {
        let span = self.span();
        if matches!(self.mode, Mode::Asleep(_) | Mode::Awake(_)) {
            self.gw.metrics.asleep.dec();
        }
        let publish_will = match &end {
            End::ClientDisconnect | End::Revoked | End::Reconnect(..) => false,
            End::Lost(reason) => {
                self.gw.metrics.lost_for(reason);
                true
            }
            End::ServerClose(_) => true,
        };
        match &end {
            End::ClientDisconnect => info!(parent: &span, "MQTT-SN client disconnected"),
            End::Lost(reason) => info!(parent: &span, reason, "MQTT-SN client lost"),
            End::ServerClose(reason) => {
                info!(parent: &span, %reason, "MQTT-SN client closed by mqgate")
            }
            End::Revoked => info!(parent: &span, "MQTT-SN client no longer allowed after a reload"),
            End::Reconnect(..) => debug!(parent: &span, "MQTT-SN client connected again"),
        }
        let shared = Arc::clone(&self.gw.shared);
        let will = self.will.take().filter(|w| {
            if !publish_will {
                return false;
            }
            if !self.acl.may_publish(&w.topic) {
                shared.acl_denied_publish.inc();
                return false;
            }
            true
        });
        self.keep_registering();
        let mut state = self.state;
        state.awaiting_rel = self.pending.released_later();
        shared.broker.park_session(&self.client_id, state, self.expiry);
        if let Some(link) = self.link.take() {
            shared.broker.unregister(&self.client_id, link.0.conn_id());
        }
        if let Some(will) = will {
            crate::mqtt::session::publish_will(&shared, &self.client_id, None, *will, &span).await;
        }
    }
}
