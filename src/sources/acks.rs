//! Coalescing a consumer's acks: deliveries settled in tag order are acked with one
//! `basic.ack multiple` per batch instead of one ack each (RabbitMQ's CPU is what limits the
//! downlink, and a multiple ack costs it about as much as a single one).
//!
//! Tracks the unsettled deliveries of one channel in tag order (tags are sequential per
//! channel). An ack whose delivery has only settled ones before it is deferred and covered by
//! the next multiple ack; any other (a slow subscriber holds an older one) is sent at once by
//! the caller, so no ack waits behind another delivery. Pure: no I/O. Bounded by the prefetch.

use std::collections::VecDeque;

/// Where one delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not settled (in MQTT, or held for a requeue).
    Pending,
    /// Taken; its ack is deferred to the next multiple ack.
    Acked,
    /// Acked or nacked on its own already.
    Settled,
}

/// The unsettled deliveries of one channel.
#[derive(Debug, Default)]
pub struct Acks {
    /// Deliveries in tag order, from the oldest not yet covered.
    entries: VecDeque<(u64, State)>,
    /// How many entries at the front are not pending (covered by the next multiple ack).
    ready: usize,
}

impl Acks {
    /// A delivery arrived.
    pub fn delivered(&mut self, tag: u64) {
        self.entries.push_back((tag, State::Pending));
    }

    /// The index of `tag`, if it is tracked.
    fn index(&self, tag: u64) -> Option<usize> {
        let front = self.entries.front()?.0;
        let i = usize::try_from(tag.checked_sub(front)?).ok()?;
        (self.entries.get(i)?.0 == tag).then_some(i)
    }

    /// `tag` is taken: `true` if its ack is deferred to [`Acks::take_multiple`], `false` if the
    /// caller must ack it now (then call [`Acks::settled`]).
    pub fn ack(&mut self, tag: u64) -> bool {
        match self.index(tag) {
            Some(i) if i == self.ready => {
                self.entries[i].1 = State::Acked;
                self.advance();
                true
            }
            _ => false,
        }
    }

    /// `tag` was acked or nacked on its own.
    pub fn settled(&mut self, tag: u64) {
        if let Some(i) = self.index(tag) {
            self.entries[i].1 = State::Settled;
            if i == self.ready {
                self.advance();
            }
        }
    }

    fn advance(&mut self) {
        while self.entries.get(self.ready).is_some_and(|e| e.1 != State::Pending) {
            self.ready += 1;
        }
    }

    /// Forgets the settled front; the tag for one `basic.ack multiple` covering the deferred
    /// acks among them (the newest deferred one), if any.
    pub fn take_multiple(&mut self) -> Option<u64> {
        let mut last = None;
        for (tag, state) in self.entries.drain(..self.ready) {
            if state == State::Acked {
                last = Some(tag);
            }
        }
        self.ready = 0;
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_acks_become_one_multiple_ack() {
        let mut a = Acks::default();
        for t in 1..=5 {
            a.delivered(t);
        }
        assert!(a.ack(1) && a.ack(2));
        assert!(!a.ack(4), "3 is still pending: 4 is acked on its own");
        a.settled(4);
        assert_eq!(a.take_multiple(), Some(2));
        a.settled(3); // nacked on its own
        assert_eq!(a.take_multiple(), None, "3 and 4 were sent on their own");
        assert!(a.ack(5));
        assert_eq!(a.take_multiple(), Some(5));
        assert!(a.entries.is_empty());
        assert!(!a.ack(9), "unknown tags are acked on their own");
    }
}
