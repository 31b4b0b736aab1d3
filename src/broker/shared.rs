//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5 §4.8.2, also accepted from 3.1.1
//! clients): each matching message goes to one member of the group, round robin.
//!
//! A group is keyed by its whole filter as subscribed (`$share/g/a/#`), which also tags every
//! delivery it makes ([`super::Outbound::shared`]), so that when a member leaves, its
//! unacknowledged deliveries of that group can be handed to another member
//! ([`super::Broker::redeliver_shared`]). No I/O, no `.await`: a delivery is a `try_send` on the
//! member's bounded queue, made under the read lock of the groups (never held with the
//! subscription lock).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::queue::TrySendError;
use super::tracking::{self, Fate, Ticket};

use super::{Outbound, SubscribeOptions, Subscriber};
use crate::message::Message;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::TopicTree;

/// One session in a group.
#[derive(Debug)]
struct Member {
    /// The member session (stable across its connections).
    session_id: u64,
    /// Granted QoS and flags.
    options: SubscribeOptions,
    /// The session's outbound queue.
    subscriber: Arc<Subscriber>,
}

/// One share group: the sessions subscribed to the same `$share/{group}/{filter}`.
#[derive(Debug)]
pub(super) struct Group {
    /// The whole filter as subscribed; identifies the group and tags its deliveries.
    key: Arc<str>,
    /// The members in the order they joined.
    members: Vec<Member>,
    /// Round-robin position: where the next message starts looking for a member.
    next: AtomicUsize,
}

/// What happened to one message handed to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sent {
    /// Queued for one member.
    Delivered,
    /// Every member that could take it had a full (or closed) queue.
    Full,
    /// No member may take it: none left, or only parked ones and it is QoS 0 (not queued
    /// for parked sessions unless `mqtt.queue_qos0`).
    NoMember,
}

impl Group {
    /// Hands `msg` to one member, round robin, skipping full queues. Members with a connection
    /// come first; parked ones get it only when no connected member could. A tracked
    /// delivery's `ticket` goes with it (finished as taken at once when a parked member's
    /// session queues it); it stays in `ticket` when the message was not delivered.
    pub(super) fn send(
        &self,
        msg: &Arc<Message>,
        queue_qos0: bool,
        ticket: &mut Option<Ticket>,
    ) -> Sent {
        let n = self.members.len();
        if n == 0 {
            return Sent::NoMember;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut full = false;
        for online in [true, false] {
            for i in 0..n {
                let m = &self.members[start.wrapping_add(i) % n];
                if m.subscriber.is_online() != online {
                    continue;
                }
                let qos = msg.qos.min(m.options.qos);
                if !online && qos == QoS::AtMostOnce && !queue_qos0 {
                    continue;
                }
                let out = Outbound {
                    msg: Arc::clone(msg),
                    qos,
                    retain: msg.retain && m.options.retain_as_published,
                    shared: Some(Arc::clone(&self.key)),
                    subscription_ids: m.options.subscription_id.into_iter().collect(),
                    ticket: if online { ticket.take() } else { None },
                    stored: None,
                };
                match m.subscriber.queue.try_send(out) {
                    Ok(()) => {
                        // Queued in a parked (persistent) session: MQTT has taken it.
                        tracking::finish(ticket.take(), Fate::Taken);
                        return Sent::Delivered;
                    }
                    Err(TrySendError::Full(out) | TrySendError::Closed(out)) => {
                        if out.ticket.is_some() {
                            *ticket = out.ticket;
                        }
                        full = true;
                    }
                }
            }
        }
        if full {
            Sent::Full
        } else {
            Sent::NoMember
        }
    }
}

/// Every share group, in a tree by the filter after the group name.
#[derive(Debug, Default)]
pub(super) struct SharedGroups {
    tree: TopicTree<Group>,
}

impl SharedGroups {
    /// Adds `session_id` to the group `key` (`$share/{group}/{filter}`, valid) whose filter is
    /// `filter`, or replaces its options if it is a member already. True if it was not one.
    pub(super) fn join(
        &mut self,
        key: &str,
        filter: &str,
        session_id: u64,
        options: SubscribeOptions,
        subscriber: &Arc<Subscriber>,
    ) -> bool {
        let member = Member { session_id, options, subscriber: Arc::clone(subscriber) };
        match self.tree.find_mut(filter, |g| &*g.key == key) {
            Some(group) => match group.members.iter_mut().find(|m| m.session_id == session_id) {
                Some(m) => {
                    *m = member;
                    false
                }
                None => {
                    group.members.push(member);
                    true
                }
            },
            None => {
                self.tree.insert(
                    filter,
                    Group { key: key.into(), members: vec![member], next: AtomicUsize::new(0) },
                );
                true
            }
        }
    }

    /// Removes `session_id` from the group `key`; drops the group when it is empty. True if
    /// it was a member.
    pub(super) fn leave(&mut self, key: &str, filter: &str, session_id: u64) -> bool {
        let Some(group) = self.tree.find_mut(filter, |g| &*g.key == key) else {
            return false;
        };
        let before = group.members.len();
        group.members.retain(|m| m.session_id != session_id);
        let left = group.members.len() < before;
        if group.members.is_empty() {
            self.tree.remove(filter, |g| &*g.key == key);
        }
        left
    }

    /// The group `key` whose filter is `filter`.
    pub(super) fn get(&self, key: &str, filter: &str) -> Option<&Group> {
        self.tree.find(filter, |g| &*g.key == key)
    }

    /// Calls `found` for every group whose filter matches `topic`.
    pub(super) fn for_each_match<'a>(&'a self, topic: &str, found: impl FnMut(&'a Group)) {
        self.tree.for_each_match(topic, found);
    }

    /// True when there is no group (the common case: publishing skips the walk).
    /// Calls `found` with every member of every group: the group's key, the session, its
    /// options and queue (the admin API's listing).
    pub(super) fn for_each_member(
        &self,
        mut found: impl FnMut(&str, u64, SubscribeOptions, &Subscriber),
    ) {
        self.tree.for_each(|_, g| {
            for m in &g.members {
                found(&g.key, m.session_id, m.options, &m.subscriber);
            }
        });
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::SessionState;

    fn msg() -> Arc<Message> {
        Arc::new(Message {
            charge: Default::default(),
            topic: "a/b".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtLeastOnce,
            retain: false,
            client_id: "c".into(),
            username: None,
            properties: crate::mqtt::codec::PublishProperties::none(),
            received: std::time::Instant::now(),
            packet_id: None,
        })
    }

    #[test]
    fn round_robin_skips_full_members_and_reports_a_full_group() {
        let options = SubscribeOptions {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
        };
        let mut a = SessionState::new(1, 1, None);
        let mut b = SessionState::new(2, 2, None);
        let mut groups = SharedGroups::default();
        groups.join("$share/g/a/+", "a/+", 1, options, &a.subscriber);
        groups.join("$share/g/a/+", "a/+", 2, options, &b.subscriber);
        groups.join("$share/g/a/+", "a/+", 2, options, &b.subscriber);
        let group = groups.get("$share/g/a/+", "a/+").expect("the group");
        assert_eq!(group.members.len(), 2, "joining again replaces the membership");
        // a, b, then a again but a is full: b.
        for _ in 0..3 {
            assert_eq!(group.send(&msg(), false, &mut None), Sent::Delivered);
        }
        assert_eq!(group.send(&msg(), false, &mut None), Sent::Full);
        let count =
            |s: &mut SessionState| std::iter::from_fn(|| s.subscriber.queue.try_recv()).count();
        assert_eq!((count(&mut a), count(&mut b)), (1, 2));
        assert!(groups.leave("$share/g/a/+", "a/+", 1));
        assert!(!groups.leave("$share/g/a/+", "a/+", 1));
        assert!(groups.leave("$share/g/a/+", "a/+", 2));
        assert!(groups.is_empty(), "the last member leaving removes the group");
    }
}
