//! The deliveries of the share groups this node serves through RabbitMQ (docs/cluster.md,
//! "Shared subscriptions"): a share queue `{prefix}.share.{hash}` per group, consumed by every
//! node with members, on a channel of the link's connection per group.
//!
//! A delivery (one forwarded message or batch) is acknowledged to RabbitMQ only once every
//! message in it is finished by the member it went to: PUBACK (QoS 1), PUBCOMP (QoS 2),
//! written (QoS 0), queued in a parked persistent session, dropped as on one node (too large
//! for the client, expired, denied), or matched nothing. Each delivery has a
//! [`Tracker`] ([`Mode::Group`]) whose children go with its messages to the members; its
//! summary comes back on the link's report channel. A member that leaves without
//! acknowledging hands its messages to another member here; when none is left they are
//! `Returned` and the whole delivery is nacked with requeue, so another node's member gets
//! it (what the member had acknowledged of it may come again: at least once). A node that
//! dies loses its connection: RabbitMQ requeues every delivery it had not acknowledged.
//!
//! Bounded: at most `GROUP_PREFETCH` deliveries per group are unacknowledged (each a
//! forwarded batch: up to 64 messages, about 256 KiB). While every member's queue here is
//! full, the messages wait here, in order, and are tried again (`STALL_RETRY`, and after each
//! report): nothing is dropped for a full queue. A `basic.ack multiple` covers only a front of
//! finished deliveries ([`Acks`]); a delivery finished before an older one is acked on its
//! own, so no ack covers an unfinished delivery and none waits behind a slow member.
//! No I/O: acks are encoded into the link's write buffer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use crate::broker::tracking::{Done, Fate, Mode, Summary, Ticket, Tracker};
use crate::broker::{Broker, Queued};
use crate::message::Message;
use crate::mqtt::topic;
use crate::sources::acks::Acks;
use crate::targets::amqp::wire::consume;

/// Deliveries of a share queue a node holds unacknowledged, at most.
pub(super) const GROUP_PREFETCH: u16 = 256;
/// While messages wait for room in the members' queues: how often they are tried again.
pub(super) const STALL_RETRY: Duration = Duration::from_millis(10);
/// Bits of a report's token that hold the delivery tag; the other 24 are the group's number.
const TAG_BITS: u32 = 40;
/// Group numbers are below this (they wrap; a number is reused only after 16 million other
/// groups were opened on the same connection).
pub(super) const GROUP_IDS: u32 = 1 << (64 - TAG_BITS);

/// The token of delivery `tag` of the group numbered `id` (`None`: a tag too large to carry,
/// never seen in practice: 2^40 deliveries on one channel).
fn token(id: u32, tag: u64) -> Option<u64> {
    (tag < 1 << TAG_BITS && id < GROUP_IDS).then(|| (u64::from(id) << TAG_BITS) | tag)
}

/// The group number and the delivery tag of a report's token.
pub(super) fn split(token: u64) -> (u32, u64) {
    ((token >> TAG_BITS) as u32, token & ((1 << TAG_BITS) - 1))
}

/// The link's counters of share-queue events, resolved once.
pub(super) struct ShareCounters {
    /// A message waited: every member's queue here was full.
    pub held: Counter,
    /// A delivery went back to RabbitMQ.
    pub returned: Counter,
}

/// A share group with members on this node: its channel consumes the group's share queue
/// `{prefix}.share.{hash of the whole filter}` (auto-deleted with its last consumer, bound with
/// the filter's key), which every node with members consumes: RabbitMQ gives each message to
/// one of them.
pub(super) struct GroupChannel {
    /// `$share/{group}/{filter}` as subscribed.
    pub key: String,
    /// The filter.
    pub filter: String,
    /// Its channel.
    ch: u16,
    /// Its number on this connection (channels are reused, numbers are not): a report whose
    /// number is not a live group's is of a channel closed since, whose deliveries RabbitMQ
    /// has requeued; it is ignored.
    id: u32,
    /// Unsettled deliveries in tag order, for in-order (multiple) acks.
    acks: Acks,
    /// Deliveries not yet wholly handed to members (their queues were full), in order: each
    /// with its root ticket and the messages left (at most `GROUP_PREFETCH` deliveries).
    backlog: VecDeque<(Ticket, VecDeque<Arc<Message>>)>,
    /// The first waiting message was counted as held (once, however often it is tried).
    front_held: bool,
}

impl GroupChannel {
    pub(super) fn new(key: String, filter: String, ch: u16, id: u32) -> GroupChannel {
        GroupChannel {
            key,
            filter,
            ch,
            id,
            acks: Acks::default(),
            backlog: VecDeque::new(),
            front_held: false,
        }
    }

    /// Messages are waiting for room in the members' queues.
    pub(super) fn is_stalled(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// A whole delivery `tag` of the share queue: its messages that the group's filter
    /// matches go to members here (after any that wait), each with a child of the
    /// delivery's tracker; the tracker reports on `report` once all are finished.
    pub(super) fn on_delivery(
        &mut self,
        tag: u64,
        body: &[u8],
        broker: &Broker,
        report: &mpsc::UnboundedSender<Done>,
        w: &mut BytesMut,
        counters: &ShareCounters,
    ) {
        let msgs: VecDeque<Arc<Message>> = super::link::messages_of(body)
            .into_iter()
            .filter(|m| topic::matches(&self.filter, &m.topic))
            .map(Arc::new)
            .collect();
        let Some(token) = token(self.id, tag) else {
            // Untracked, as before tracking: acknowledged on arrival.
            consume::basic_ack(w, self.ch, tag, false);
            for msg in msgs {
                let mut ticket = None;
                let _ = broker.deliver_to_group(&self.key, &self.filter, &msg, &mut ticket);
            }
            return;
        };
        self.acks.delivered(tag);
        let root = Tracker::root(token, Mode::Group, report.clone());
        self.backlog.push_back((root, msgs));
        self.drain(broker, counters);
    }

    /// Hands the waiting messages to members, in order, until every member's queue is full;
    /// a delivery whose messages are all handed over is done here (its root finished).
    pub(super) fn drain(&mut self, broker: &Broker, counters: &ShareCounters) {
        while let Some((root, msgs)) = self.backlog.front_mut() {
            while let Some(msg) = msgs.front() {
                let mut ticket = Some(root.child());
                if broker.deliver_to_group(&self.key, &self.filter, msg, &mut ticket)
                    == Queued::Full
                {
                    // Tried again later; this attempt counts for nothing.
                    if let Some(t) = ticket {
                        t.finish(Fate::Gone);
                    }
                    if !self.front_held {
                        self.front_held = true;
                        counters.held.inc();
                    }
                    return;
                }
                msgs.pop_front();
                self.front_held = false;
            }
            if let Some((root, _)) = self.backlog.pop_front() {
                root.finish(Fate::Gone);
            }
        }
    }

    /// The summary of delivery `tag`: acknowledged (taken, matched nothing, or dropped as on
    /// one node), or nacked with requeue (returned: no member here could take a message of
    /// it). An ack waits for the next multiple ack when only settled deliveries precede it.
    pub(super) fn on_report(
        &mut self,
        tag: u64,
        summary: Summary,
        w: &mut BytesMut,
        counters: &ShareCounters,
    ) {
        if summary == Summary::Returned {
            consume::basic_nack(w, self.ch, tag, false, true);
            self.acks.settled(tag);
            counters.returned.inc();
        } else if !self.acks.ack(tag) {
            consume::basic_ack(w, self.ch, tag, false);
            self.acks.settled(tag);
        }
    }

    /// One `basic.ack multiple` for the deliveries whose acks were deferred.
    pub(super) fn ack_settled(&mut self, w: &mut BytesMut) {
        if let Some(tag) = self.acks.take_multiple() {
            consume::basic_ack(w, self.ch, tag, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{SessionState, SubscribeOptions};
    use crate::metrics::Metrics;
    use crate::mqtt::codec::{PublishProperties, QoS};

    const KEY: &str = "$share/g/t/#";

    fn msg() -> Arc<Message> {
        Arc::new(Message {
            charge: Default::default(),
            topic: "t/1".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: false,
            client_id: Arc::from("p"),
            username: None,
            properties: PublishProperties::none(),
            received: std::time::Instant::now(),
            packet_id: None,
        })
    }

    /// A member (queue of one message) of the group.
    fn member(broker: &Broker, id: u64) -> SessionState {
        let options = SubscribeOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
        };
        let mut state = SessionState::new(id, 1, None);
        broker.subscribe(id, KEY, options, &state.subscriber);
        state.filters.insert(KEY.into(), options);
        state
    }

    #[test]
    fn a_delivery_follows_its_members_and_is_returned_when_none_is_left() {
        let broker = Broker::new(Metrics::new(), (1000, usize::MAX, 0), false, None);
        let (a, b) = (member(&broker, 1), member(&broker, 2));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let root = Tracker::root(9, Mode::Group, tx);
        let give =
            |ticket: &mut Option<Ticket>| broker.deliver_to_group(KEY, "t/#", &msg(), ticket);
        for _ in 0..2 {
            let mut t = Some(root.child());
            assert_eq!(give(&mut t), Queued::Taken);
            assert!(t.is_none(), "the ticket went with the message");
        }
        // Both queues are full: nothing done, the ticket stays with the caller (who holds
        // the message back).
        let mut t = Some(root.child());
        assert_eq!(give(&mut t), Queued::Full);
        t.take().expect("left in place").finish(Fate::Gone);
        root.finish(Fate::Gone);
        // b acknowledges its message.
        let out = b.subscriber.queue.try_recv().expect("b's message");
        out.ticket.expect("tracked").finish(Fate::Taken);
        assert!(rx.try_recv().is_err(), "a still holds one");
        // a leaves without acknowledging: its message goes to b.
        broker.discard_session(a);
        assert!(rx.try_recv().is_err(), "b holds it now");
        assert_eq!(b.subscriber.queue.len(), 1);
        // b leaves too: no member here, the delivery goes back.
        broker.discard_session(b);
        assert_eq!(rx.try_recv(), Ok(Done { token: 9, summary: Summary::Returned }));
        // And a delivery for the group that has no member here any more.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let root = Tracker::root(10, Mode::Group, tx);
        let mut t = Some(root.child());
        assert_eq!(give(&mut t), Queued::NoMatch);
        assert!(t.is_none(), "finished");
        root.finish(Fate::Gone);
        assert_eq!(rx.try_recv(), Ok(Done { token: 10, summary: Summary::Returned }));
    }

    #[test]
    fn tokens_carry_the_group_and_the_tag() {
        let t = token(7, 12345).expect("fits");
        assert_eq!(split(t), (7, 12345));
        let last = (GROUP_IDS - 1, (1 << TAG_BITS) - 1);
        assert_eq!(split(token(last.0, last.1).expect("fits")), last);
        assert_eq!(token(1, 1 << TAG_BITS), None);
        assert_eq!(token(GROUP_IDS, 1), None);
    }
}
