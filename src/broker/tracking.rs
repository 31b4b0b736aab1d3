//! Delivery tracking for messages whose publisher must know when MQTT has taken responsibility
//! (an AMQP source acks its delivery only then).
//!
//! A tracked message has one [`Tracker`]; each delivery made of it to one session carries a
//! [`Ticket`] in its `Outbound` (and, once sent, in the session's in-flight entry). A ticket is
//! finished once, with a [`Fate`]: `Taken` when the subscriber acknowledged (PUBACK, PUBCOMP;
//! QoS 0: written to its connection) or the message was queued in a persistent session whose
//! client is away; `Gone` when the subscriber went away without a session to keep it, or the
//! message expired; `Failed` when it was dropped (full queue, too large, refused by the
//! client); `Returned` when a share-queue delivery ([`Mode::Group`]) found no member here to
//! take it (its member left without acknowledging, none is left): the publisher gives it
//! back to RabbitMQ for another node's members. A ticket dropped without being finished counts as `Failed`: a lost delivery is
//! never taken for a success. When the last ticket (and the publisher's own, the root) is
//! finished, the tracker reports one [`Summary`] on the publisher's channel.
//!
//! Untracked messages (every MQTT → MQTT delivery) carry `None`: no allocation, no atomic.
//! No I/O and no lock: counters are atomics, the report is a `send` on an unbounded channel
//! whose length is bounded by the publisher (one report per tracked message it has
//! outstanding, which an AMQP source bounds by its prefetch).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// How one delivery of a tracked message ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The subscriber acknowledged it, or it is queued in a persistent session.
    Taken,
    /// Nobody is left to take it: a clean-session subscriber left, or it expired.
    Gone,
    /// It was dropped: a full queue, too large for the client, refused by the client.
    Failed,
    /// Not taken and not dropped: no member of its share group here could take it (only for
    /// [`Mode::Group`]); it goes back to where it came from.
    Returned,
}

/// What happened to a tracked message as a whole, once every delivery has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    /// At least one delivery was taken and none failed.
    Taken,
    /// No delivery was made or every one was `Gone`: the message reached nobody.
    NoSubscriber,
    /// At least one delivery failed.
    Failed,
    /// At least one delivery was returned (it wins over the others: what was returned must
    /// not be lost, so the message goes back whole, duplicates of the rest allowed).
    Returned,
}

/// How the broker picks the recipients of a tracked message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every matching subscription (one member of each matching share group), as MQTT does.
    Broadcast,
    /// Exactly one of the matching sessions and share groups, round robin; a delivery whose
    /// session leaves without acknowledging goes to another one.
    Work,
    /// One member of one share group (the cluster's share queue gave the message to this
    /// node for that group); a delivery whose member leaves without acknowledging goes to
    /// another member here, or is [`Fate::Returned`] when none can take it.
    Group,
}

/// The report of one tracked message: the publisher's token and the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// The token the publisher gave the tracker (an AMQP source: the delivery tag).
    pub token: u64,
    /// The outcome.
    pub summary: Summary,
}

/// The shared state of one tracked message.
#[derive(Debug)]
pub struct Tracker {
    /// Tickets not yet finished (the root included).
    pending: AtomicUsize,
    /// Deliveries taken.
    taken: AtomicUsize,
    /// Some delivery failed.
    failed: AtomicBool,
    /// Some delivery was returned.
    returned: AtomicBool,
    /// Broadcast or work.
    mode: Mode,
    /// The publisher's token.
    token: u64,
    /// Where the summary goes (a receiver that is gone — an old AMQP connection — is fine).
    report: mpsc::UnboundedSender<Done>,
}

impl Tracker {
    /// A new tracked message; returns its root ticket, held by the publisher while it hands
    /// the message out (so the tracker cannot complete before every delivery is made).
    /// Finish the root with [`Fate::Gone`] after publishing.
    pub fn root(token: u64, mode: Mode, report: mpsc::UnboundedSender<Done>) -> Ticket {
        let tracker = Arc::new(Tracker {
            pending: AtomicUsize::new(1),
            taken: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            returned: AtomicBool::new(false),
            mode,
            token,
            report,
        });
        Ticket(Arc::new(TicketInner { tracker, done: AtomicBool::new(false) }))
    }

    fn finish(&self, fate: Fate) {
        match fate {
            Fate::Taken => {
                self.taken.fetch_add(1, Ordering::Relaxed);
            }
            Fate::Failed => self.failed.store(true, Ordering::Relaxed),
            Fate::Returned => self.returned.store(true, Ordering::Relaxed),
            Fate::Gone => {}
        }
        // AcqRel: the last finisher sees every other finisher's counts.
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let summary = if self.returned.load(Ordering::Relaxed) {
                Summary::Returned
            } else if self.failed.load(Ordering::Relaxed) {
                Summary::Failed
            } else if self.taken.load(Ordering::Relaxed) > 0 {
                Summary::Taken
            } else {
                Summary::NoSubscriber
            };
            let _ = self.report.send(Done { token: self.token, summary });
        }
    }
}

/// One delivery of a tracked message. Clones share it (an in-flight entry may be cloned for a
/// resend); it is finished once, by [`Ticket::finish`] or, as `Failed`, when the last clone is
/// dropped unfinished.
#[derive(Debug, Clone)]
pub struct Ticket(Arc<TicketInner>);

#[derive(Debug)]
struct TicketInner {
    tracker: Arc<Tracker>,
    done: AtomicBool,
}

impl Drop for TicketInner {
    fn drop(&mut self) {
        if !*self.done.get_mut() {
            self.tracker.finish(Fate::Failed);
        }
    }
}

impl Ticket {
    /// A ticket for one more delivery of the same message.
    pub fn child(&self) -> Ticket {
        let tracker = Arc::clone(&self.0.tracker);
        tracker.pending.fetch_add(1, Ordering::Relaxed);
        Ticket(Arc::new(TicketInner { tracker, done: AtomicBool::new(false) }))
    }

    /// Ends this delivery with `fate`; later calls do nothing.
    pub fn finish(&self, fate: Fate) {
        if !self.0.done.swap(true, Ordering::AcqRel) {
            self.0.tracker.finish(fate);
        }
    }

    /// How the message is distributed.
    pub fn mode(&self) -> Mode {
        self.0.tracker.mode
    }
}

/// Finishes `ticket`, if there is one.
pub fn finish(ticket: Option<Ticket>, fate: Fate) {
    if let Some(t) = ticket {
        t.finish(fate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Ticket, mpsc::UnboundedReceiver<Done>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Tracker::root(7, Mode::Broadcast, tx), rx)
    }

    #[test]
    fn reports_once_when_the_last_ticket_finishes() {
        let (root, mut rx) = setup();
        let a = root.child();
        let b = root.child();
        root.finish(Fate::Gone);
        a.finish(Fate::Taken);
        a.finish(Fate::Failed); // ignored: a is finished
        assert!(rx.try_recv().is_err());
        let b2 = b.clone();
        drop(b);
        assert!(rx.try_recv().is_err(), "a clone keeps the delivery alive");
        b2.finish(Fate::Gone);
        assert_eq!(rx.try_recv(), Ok(Done { token: 7, summary: Summary::Taken }));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn no_delivery_is_no_subscriber_and_a_dropped_ticket_is_a_failure() {
        let (root, mut rx) = setup();
        root.finish(Fate::Gone);
        assert_eq!(rx.try_recv().map(|d| d.summary), Ok(Summary::NoSubscriber));
        let (root, mut rx) = setup();
        let a = root.child();
        root.child().finish(Fate::Taken);
        root.finish(Fate::Gone);
        drop(a);
        assert_eq!(rx.try_recv().map(|d| d.summary), Ok(Summary::Failed));
    }

    #[test]
    fn a_returned_delivery_sends_the_whole_message_back() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let root = Tracker::root(3, Mode::Group, tx);
        let (a, b, c) = (root.child(), root.child(), root.child());
        root.finish(Fate::Gone);
        a.finish(Fate::Taken);
        b.finish(Fate::Returned);
        drop(c);
        assert_eq!(rx.try_recv(), Ok(Done { token: 3, summary: Summary::Returned }));
    }
}
