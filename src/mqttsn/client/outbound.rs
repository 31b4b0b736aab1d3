//! The client as a subscriber: deliveries from its session's queue, at most
//! `mqttsn.max_inflight` unacknowledged; a topic the client has no id for is REGISTERed first
//! (and the delivery waits for the REGACK). Unanswered REGISTER, PUBLISH and PUBREL are sent
//! again after T_retry (`mqttsn.retry_interval`), N_retry times (`mqttsn.max_retries`); then
//! the client is lost. Asleep, nothing is sent: the session's queue (bounded in messages and
//! bytes, drops counted) keeps what comes until a PINGREQ wakes the client.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::debug;

use super::{Client, End, Mode, Registering, Then};
use crate::broker::sessions::{InFlight, InFlightStage};
use crate::broker::tracking::{self, Fate};
use crate::broker::Outbound;
use crate::mqtt::codec::QoS;
use crate::mqttsn::codec::{Packet, Publish, ReturnCode, SnQos, TopicRef};

/// A day: the timer's "nothing due".
const FAR: Duration = Duration::from_secs(86_400);

impl Client {
    /// Whether a new delivery may go out now.
    pub(super) fn may_take(&self) -> bool {
        matches!(self.mode, Mode::Active | Mode::Awake(_))
            && self.draining.is_none()
            && self.registering.is_none()
            && self.resend.is_empty()
            && self.state.inflight.len() < usize::from(self.gw.config.max_inflight.max(1))
    }

    /// Sends what may go now: resends first, then the queue; an awake client whose messages
    /// are all out and acknowledged gets its PINGRESP and sleeps again.
    pub(super) fn pump(&mut self) {
        if !matches!(self.mode, Mode::Active | Mode::Awake(_)) {
            return;
        }
        while self.registering.is_none() {
            let Some(id) = self.resend.pop_front() else { break };
            self.resend_one(id, 0);
        }
        while self.may_take() {
            let Some(out) = self.state.subscriber.queue.try_recv() else { break };
            self.deliver(out);
        }
        if let Mode::Awake(duration) = self.mode {
            let done = self.state.subscriber.queue.is_empty()
                && self.state.inflight.is_empty()
                && self.registering.is_none()
                && self.resend.is_empty();
            if done {
                self.send(&Packet::PingResp);
                self.mode = Mode::Asleep(duration);
                self.sleep_until = Some(Instant::now() + duration.mul_f32(1.5));
            }
        }
    }

    /// How the client names `topic` without a REGISTER: a predefined id, an id it has, or a
    /// two-character short name.
    fn topic_ref(&self, topic: &str) -> Option<TopicRef> {
        if let Some(id) = self.gw.predefined.id(topic) {
            return Some(TopicRef::Predefined(id));
        }
        if let Some(id) = self.topics.id(topic) {
            return Some(TopicRef::Normal(id));
        }
        match topic.as_bytes() {
            [a, b] => Some(TopicRef::Short([*a, *b])),
            _ => None,
        }
    }

    /// A message id of ours that is free.
    fn next_msg_id(&mut self) -> u16 {
        loop {
            self.state.last_id = self.state.last_id.wrapping_add(1);
            let id = self.state.last_id;
            let registering = self.registering.as_ref().is_some_and(|r| r.msg_id == id);
            if id != 0 && !self.state.inflight_ids.contains(&id) && !registering {
                return id;
            }
        }
    }

    /// A delivery is finished without reaching the client.
    fn drop_delivery(&self, out: Outbound, fate: Fate) {
        tracking::finish(out.ticket, fate);
        self.gw.shared.broker.unstore(&self.state.subscriber, out.stored);
    }

    /// One delivery from the session's queue.
    pub(super) fn deliver(&mut self, out: Outbound) {
        let shared = Arc::clone(&self.gw.shared);
        if self.acl.is_filtering() && !self.acl.may_receive(&out.msg.topic) {
            shared.acl_denied_delivery.inc();
            return self.drop_delivery(out, Fate::Gone);
        }
        if let Some(key) = &out.shared {
            if !self.state.filters.contains_key(&**key) {
                if out.qos != QoS::AtMostOnce {
                    shared.broker.redeliver_shared_tracked(key, &out.msg, out.ticket);
                } else {
                    tracking::finish(out.ticket, Fate::Gone);
                }
                return;
            }
        }
        if let Some(expiry) = out.msg.properties.message_expiry_interval {
            if out.msg.received.elapsed().as_secs() >= u64::from(expiry) {
                shared.metrics.dropped("expired");
                return self.drop_delivery(out, Fate::Gone);
            }
        }
        if let Some(r) = self.topic_ref(&out.msg.topic) {
            return self.publish_new(out, r);
        }
        let Some(topic_id) = self.topics.register(&out.msg.topic) else {
            self.gw.metrics.drop_for("max_topics");
            shared.metrics.dropped("mqttsn_max_topics");
            return self.drop_delivery(out, Fate::Failed);
        };
        let msg_id = self.next_msg_id();
        let topic_name = out.msg.topic.clone();
        self.send(&Packet::Register { topic_id, msg_id, topic_name });
        self.registering = Some(Registering {
            msg_id,
            topic_id,
            sent: Instant::now(),
            tries: 0,
            then: Then::New(out),
        });
    }

    /// The PUBLISH of a delivery on `topic`; false (counted) if it is over
    /// `mqttsn.max_datagram_size`.
    fn send_publish(&mut self, p: Publish) -> bool {
        let packet = Packet::Publish(p);
        self.buf.clear();
        if crate::mqttsn::codec::encode(&packet, &mut self.buf).is_err()
            || self.buf.len() > self.gw.config.max_datagram_size.value
        {
            self.gw.shared.metrics.dropped("too_large_for_client");
            return false;
        }
        self.send(&packet);
        true
    }

    /// Sends a new delivery and, for QoS 1/2, keeps it until acknowledged.
    fn publish_new(&mut self, out: Outbound, topic: TopicRef) {
        let msg_id = if out.qos == QoS::AtMostOnce { 0 } else { self.next_msg_id() };
        let p = Publish {
            dup: false,
            qos: SnQos::from_mqtt(out.qos),
            retain: out.retain,
            topic,
            msg_id,
            data: out.msg.payload.clone(),
        };
        let sent = self.send_publish(p);
        if !sent || out.qos == QoS::AtMostOnce {
            return self.drop_delivery(out, if sent { Fate::Taken } else { Fate::Failed });
        }
        let f = InFlight {
            packet_id: msg_id,
            msg: out.msg,
            qos: out.qos,
            retain: out.retain,
            stage: InFlightStage::Published,
            shared: out.shared,
            subscription_ids: out.subscription_ids,
            ticket: out.ticket,
            stored: out.stored,
        };
        self.gw.shared.broker.store_sent(&self.state.subscriber, &f);
        self.state.inflight_ids.insert(msg_id);
        self.state.inflight.push_back(f);
        self.sent.insert(msg_id, (Instant::now(), 0));
    }

    /// Sends an unacknowledged delivery again (`tries`: how many times it was sent again so
    /// far): PUBREL for a released QoS 2 one, else PUBLISH with DUP (after a REGISTER when
    /// the client no longer has the topic's id).
    pub(super) fn resend_one(&mut self, id: u16, tries: u8) {
        let Some(f) = self.state.inflight.iter().find(|f| f.packet_id == id).cloned() else {
            return;
        };
        if f.stage == InFlightStage::Released {
            self.send(&Packet::PubRel { msg_id: id });
            self.sent.insert(id, (Instant::now(), tries));
            return;
        }
        let topic = match self.topic_ref(&f.msg.topic) {
            Some(t) => t,
            None if self.registering.is_some() => {
                self.resend.push_front(id);
                return;
            }
            None => {
                let Some(topic_id) = self.topics.register(&f.msg.topic) else {
                    self.gw.metrics.drop_for("max_topics");
                    self.complete(id, Fate::Failed, |_| true);
                    return;
                };
                let msg_id = self.next_msg_id();
                let topic_name = f.msg.topic.to_string();
                self.send(&Packet::Register { topic_id, msg_id, topic_name });
                self.registering = Some(Registering {
                    msg_id,
                    topic_id,
                    sent: Instant::now(),
                    tries: 0,
                    then: Then::Resend(id),
                });
                self.sent.remove(&id);
                return;
            }
        };
        let p = Publish {
            dup: true,
            qos: SnQos::from_mqtt(f.qos),
            retain: f.retain,
            topic,
            msg_id: id,
            data: f.msg.payload.clone(),
        };
        if self.send_publish(p) {
            self.sent.insert(id, (Instant::now(), tries));
        } else {
            self.complete(id, Fate::Failed, |_| true);
        }
    }

    /// Removes the delivery `msg_id` if `done` says it is complete, its ticket finished with
    /// `fate`, its stored copy deleted. Whether it was there.
    fn complete(&mut self, msg_id: u16, fate: Fate, done: impl Fn(&InFlight) -> bool) -> bool {
        let state = &mut self.state;
        let Some(i) = state.inflight.iter().position(|f| f.packet_id == msg_id && done(f)) else {
            return false;
        };
        let Some(f) = state.inflight.remove(i) else { return false };
        tracking::finish(f.ticket, fate);
        state.inflight_ids.remove(&msg_id);
        self.sent.remove(&msg_id);
        self.gw.shared.broker.unstore(&self.state.subscriber, f.stored);
        true
    }

    /// PUBACK from the client: a QoS 1 delivery done (or refused: 0x02 means it does not know
    /// the topic id, forgotten so the next delivery registers it again; 0x01 congestion: kept
    /// and sent again after T_retry); an error PUBACK also ends a QoS 2 delivery.
    pub(super) fn on_puback(&mut self, topic_id: u16, msg_id: u16, code: ReturnCode) {
        if code == ReturnCode::CONGESTION {
            return;
        }
        if code == ReturnCode::INVALID_TOPIC_ID {
            self.topics.forget(topic_id);
        }
        let (fate, known) = if code == ReturnCode::ACCEPTED {
            (Fate::Taken, self.complete(msg_id, Fate::Taken, |f| f.qos == QoS::AtLeastOnce))
        } else {
            self.gw.shared.metrics.dropped("mqttsn_client_refused");
            (Fate::Failed, self.complete(msg_id, Fate::Failed, |_| true))
        };
        if !known {
            debug!(parent: &self.span(), msg_id, ?fate, "PUBACK for an unknown message id");
        }
        self.pump();
    }

    /// PUBREC: answer PUBREL (again, for a repeated PUBREC).
    pub(super) fn on_pubrec(&mut self, msg_id: u16) {
        let mut release = None;
        if let Some(f) = self.state.inflight.iter_mut().find(|f| f.packet_id == msg_id) {
            if f.qos == QoS::ExactlyOnce && f.stage != InFlightStage::Released {
                f.stage = InFlightStage::Released;
                release = Some(f.clone());
            }
        }
        if let Some(f) = release {
            self.gw.shared.broker.store_sent(&self.state.subscriber, &f);
        }
        if self.state.inflight_ids.contains(&msg_id) {
            self.sent.insert(msg_id, (Instant::now(), 0));
        }
        self.send(&Packet::PubRel { msg_id });
    }

    /// PUBCOMP: a QoS 2 delivery done.
    pub(super) fn on_pubcomp(&mut self, msg_id: u16) {
        self.complete(msg_id, Fate::Taken, |f| f.stage == InFlightStage::Released);
        self.pump();
    }

    /// REGACK for our REGISTER: the waiting delivery goes out (or, refused, is dropped).
    pub(super) fn on_regack(&mut self, _topic_id: u16, msg_id: u16, code: ReturnCode) {
        if self.registering.as_ref().is_none_or(|r| r.msg_id != msg_id) {
            self.gw.metrics.drop_for("unexpected");
            return;
        }
        let Some(r) = self.registering.take() else { return };
        if code != ReturnCode::ACCEPTED {
            self.topics.forget(r.topic_id);
            self.gw.shared.metrics.dropped("mqttsn_register_refused");
            match r.then {
                Then::New(out) => self.drop_delivery(out, Fate::Failed),
                Then::Resend(id) => {
                    self.complete(id, Fate::Failed, |_| true);
                }
            }
        } else {
            match r.then {
                Then::New(out) => self.publish_new(out, TopicRef::Normal(r.topic_id)),
                Then::Resend(id) => self.resend_one(id, 0),
            }
        }
        self.pump();
    }

    /// PINGREQ: PINGRESP when active; a sleeping client wakes to take what waits for it.
    pub(super) fn on_pingreq(&mut self) {
        match self.mode {
            Mode::Active => self.send(&Packet::PingResp),
            Mode::Asleep(duration) => {
                self.mode = Mode::Awake(duration);
                self.wake_resend();
                self.pump();
            }
            // Still sending what waited: its PINGRESP comes when that is done.
            Mode::Awake(_) => {}
        }
    }

    /// The connection ends while a new delivery waits for its REGACK: a QoS 1/2 one is kept
    /// with the session as sent (the next connection, MQTT or MQTT-SN, sends it again first);
    /// a QoS 0 one is gone.
    pub(super) fn keep_registering(&mut self) {
        let Some(Registering { then: Then::New(out), .. }) = self.registering.take() else {
            return;
        };
        if out.qos == QoS::AtMostOnce {
            return self.drop_delivery(out, Fate::Gone);
        }
        let msg_id = self.next_msg_id();
        let f = InFlight {
            packet_id: msg_id,
            msg: out.msg,
            qos: out.qos,
            retain: out.retain,
            stage: InFlightStage::Published,
            shared: out.shared,
            subscription_ids: out.subscription_ids,
            ticket: out.ticket,
            stored: out.stored,
        };
        self.gw.shared.broker.store_sent(&self.state.subscriber, &f);
        self.state.inflight_ids.insert(msg_id);
        self.state.inflight.push_back(f);
    }

    /// On waking: every unacknowledged delivery and a REGISTER in progress go again.
    pub(super) fn wake_resend(&mut self) {
        self.resend = self.state.inflight.iter().map(|f| f.packet_id).collect();
        if let Some(r) = &mut self.registering {
            r.sent = Instant::now();
            r.tries = 0;
            let p = Packet::Register {
                topic_id: r.topic_id,
                msg_id: r.msg_id,
                topic_name: match &r.then {
                    Then::New(out) => out.msg.topic.clone(),
                    Then::Resend(id) => {
                        let id = *id;
                        match self.state.inflight.iter().find(|f| f.packet_id == id) {
                            Some(f) => f.msg.topic.clone(),
                            None => String::new(),
                        }
                    }
                },
            };
            self.send(&p);
        }
    }

    /// DISCONNECT with a duration: asleep (at most `mqttsn.max_sleep`); nothing is sent until
    /// it wakes, retries wait too.
    pub(super) fn fall_asleep(&mut self, seconds: u16) {
        let duration = Duration::from_secs(u64::from(seconds)).min(self.gw.config.max_sleep.0);
        if self.mode == Mode::Active {
            self.gw.metrics.asleep.inc();
        }
        self.send(&Packet::Disconnect { duration: None });
        self.mode = Mode::Asleep(duration);
        self.sleep_until = Some(Instant::now() + duration.mul_f32(1.5));
        self.sent.clear();
    }

    /// When the timer must fire next.
    pub(super) fn next_due(&self) -> Instant {
        let now = Instant::now();
        let mut due = now + FAR;
        if let Some(d) = self.draining {
            return d;
        }
        match self.mode {
            Mode::Active => {
                if let Some(k) = self.keepalive {
                    due = due.min(self.last_heard + k);
                }
            }
            Mode::Asleep(_) | Mode::Awake(_) => {
                if let Some(t) = self.sleep_until {
                    due = due.min(t);
                }
            }
        }
        if matches!(self.mode, Mode::Active | Mode::Awake(_)) {
            let retry = self.gw.config.retry_interval.value.0;
            if let Some(r) = &self.registering {
                due = due.min(r.sent + retry);
            }
            for (at, _) in self.sent.values() {
                due = due.min(*at + retry);
            }
        }
        due
    }

    /// The timer fired: keep alive, sleep overrun, retries, the shutdown deadline.
    pub(super) fn on_timer(&mut self) -> Option<End> {
        let now = Instant::now();
        if self.draining.is_some_and(|d| now >= d) {
            return Some(End::ServerClose(
                "shutdown_timeout passed with messages in flight".into(),
            ));
        }
        match self.mode {
            Mode::Active => {
                if self.keepalive.is_some_and(|k| now >= self.last_heard + k) {
                    return Some(End::Lost("keepalive"));
                }
            }
            Mode::Asleep(_) | Mode::Awake(_) => {
                if self.sleep_until.is_some_and(|t| now >= t) {
                    return Some(End::Lost("overslept"));
                }
                if matches!(self.mode, Mode::Asleep(_)) {
                    return None;
                }
            }
        }
        let retry = self.gw.config.retry_interval.value.0;
        let max = self.gw.config.max_retries;
        if let Some(r) = &mut self.registering {
            if now >= r.sent + retry {
                if r.tries >= max {
                    return Some(End::Lost("no_answer"));
                }
                r.tries += 1;
                r.sent = now;
                let (topic_id, msg_id) = (r.topic_id, r.msg_id);
                let topic_name = match &r.then {
                    Then::New(out) => out.msg.topic.clone(),
                    Then::Resend(id) => {
                        let id = *id;
                        self.state
                            .inflight
                            .iter()
                            .find(|f| f.packet_id == id)
                            .map(|f| f.msg.topic.clone())
                            .unwrap_or_default()
                    }
                };
                self.gw.metrics.retransmissions.inc();
                self.send(&Packet::Register { topic_id, msg_id, topic_name });
            }
        }
        let due: Vec<(u16, u8)> = self
            .sent
            .iter()
            .filter(|(_, (at, _))| now >= *at + retry)
            .map(|(id, (_, tries))| (*id, *tries))
            .collect();
        for (id, tries) in due {
            if tries >= max {
                return Some(End::Lost("no_answer"));
            }
            self.gw.metrics.retransmissions.inc();
            self.resend_one(id, tries + 1);
        }
        None
    }
}
