//! What one spool's append task and forwarder share: the sequence range on disk with each
//! entry's size (for `max_bytes`), the in-memory tail of what was just appended, and the
//! wake-ups between the two tasks.
//!
//! The spool is always one contiguous range of sequences `[head, end)`: appends add at `end`
//! (after their commit), deliveries and drop-oldest remove from `head`. So the size of every
//! entry fits in a deque indexed by `seq - head` (4 bytes per entry), and releasing a prefix
//! is exact. A std `Mutex`: held for a few field updates, never across an `.await`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::config::SpoolConfig;
use super::metrics::SpoolMetrics;
use crate::message::Message;
use crate::metrics::Metrics;

/// Messages the in-memory tail holds at most.
const TAIL_MESSAGES: usize = 8192;
/// Bytes (stored size) the in-memory tail holds at most.
const TAIL_BYTES: u64 = 8 << 20;

/// The state of one spool.
#[derive(Debug, Default)]
pub(super) struct State {
    /// The oldest sequence still in the spool.
    pub head: u64,
    /// The next sequence to append; every one below it (and from `head`) is on disk.
    pub end: u64,
    /// Stored size of each entry in `[head, end)`.
    pub sizes: VecDeque<u32>,
    /// Sum of `sizes`.
    pub bytes: u64,
    /// The most recently appended entries, contiguous and ending at `end` (when not empty),
    /// for the forwarder to take without reading the disk.
    tail: VecDeque<(u64, Arc<Message>, u32)>,
    /// Sum of the tail's sizes.
    tail_bytes: u64,
}

impl State {
    /// An empty spool whose next sequence is `seq`.
    pub fn starting_at(seq: u64) -> State {
        State { head: seq, end: seq, ..State::default() }
    }

    /// Messages in the spool.
    pub fn depth(&self) -> u64 {
        self.end - self.head
    }

    /// Records entries appended (committed) at `end`, in order; the tail keeps them while it
    /// has room.
    pub fn appended(&mut self, entries: impl Iterator<Item = (Arc<Message>, u32)>) {
        for (msg, size) in entries {
            let seq = self.end;
            self.end += 1;
            self.sizes.push_back(size);
            self.bytes += u64::from(size);
            let contiguous = self.tail.back().is_none_or(|(s, _, _)| s + 1 == seq);
            if contiguous
                && self.tail.len() < TAIL_MESSAGES
                && self.tail_bytes + u64::from(size) <= TAIL_BYTES
            {
                self.tail.push_back((seq, msg, size));
                self.tail_bytes += u64::from(size);
            }
        }
    }

    /// Removes `[head, upto)` from the spool's accounting (delivered, dead-lettered or
    /// dropped); returns the messages and bytes removed (nothing if `upto <= head`).
    pub fn release(&mut self, upto: u64) -> (u64, u64) {
        let upto = upto.min(self.end);
        if upto <= self.head {
            return (0, 0);
        }
        let n = upto - self.head;
        let bytes: u64 = self.sizes.drain(..n as usize).map(u64::from).sum();
        self.bytes -= bytes;
        self.head = upto;
        self.trim_tail(upto);
        (n, bytes)
    }

    /// Drops tail entries below `seq`.
    fn trim_tail(&mut self, seq: u64) {
        while let Some((s, _, size)) = self.tail.front() {
            if *s >= seq {
                break;
            }
            self.tail_bytes -= u64::from(*size);
            self.tail.pop_front();
        }
    }

    /// The tail's entry for `seq` if it is the tail's first (older ones are dropped);
    /// otherwise `Err` with where the tail starts (`end` when it is empty): the forwarder
    /// reads `[seq, that)` from the disk.
    pub fn take_tail(&mut self, seq: u64) -> Result<Arc<Message>, u64> {
        self.trim_tail(seq);
        match self.tail.front() {
            Some((s, _, _)) if *s == seq => {
                let (_, msg, size) = self.tail.pop_front().ok_or(self.end)?;
                self.tail_bytes -= u64::from(size);
                Ok(msg)
            }
            Some((s, _, _)) => Err(*s),
            None => Err(self.end),
        }
    }
}

/// Shared by a spool's handle, append task and forwarder.
#[derive(Debug)]
pub(super) struct Shared {
    /// The target id (`rule/index`).
    pub id: String,
    /// See [`State`].
    state: Mutex<State>,
    /// Notified by the forwarder when it freed room (backpressure waits on it).
    pub space: Notify,
    /// Notified by the append task when entries were appended (an idle forwarder waits on it).
    pub appended: Notify,
    /// `max_bytes`.
    pub max_bytes: u64,
    /// The spool's metric handles.
    pub metrics: SpoolMetrics,
}

impl Shared {
    /// The shared state of spool `id`, starting from `state` (restored from the store).
    pub fn new(id: String, state: State, cfg: &SpoolConfig, metrics: &Metrics) -> Shared {
        let metrics = metrics.spool.target(&id);
        metrics.depth_messages.set(state.depth() as i64);
        metrics.depth_bytes.set(state.bytes as i64);
        Shared {
            id,
            state: Mutex::new(state),
            space: Notify::new(),
            appended: Notify::new(),
            max_bytes: cfg.max_bytes.0,
            metrics,
        }
    }

    /// The state, locked. A poisoned lock (a panic while held) is taken over: the state is
    /// plain counters, each update complete before any code that could panic.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages and bytes in the spool.
    pub fn depth(&self) -> (u64, u64) {
        let s = self.lock();
        (s.depth(), s.bytes)
    }

    /// Updates the depth gauges from `s`.
    pub fn gauges(&self, s: &State) {
        self.metrics.depth_messages.set(s.depth() as i64);
        self.metrics.depth_bytes.set(s.bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::{PublishProperties, QoS};

    fn msg(n: u8) -> Arc<Message> {
        Arc::new(Message {
            charge: Default::default(),
            topic: format!("t/{n}"),
            payload: bytes::Bytes::from(vec![n]),
            qos: QoS::AtLeastOnce,
            retain: false,
            client_id: Arc::from("c"),
            username: None,
            properties: PublishProperties::none(),
            received: std::time::Instant::now(),
            packet_id: Some(1),
        })
    }

    #[test]
    fn release_is_exact_and_the_tail_follows_the_head() {
        let mut s = State::default();
        s.appended((0..5).map(|n| (msg(n), 10 + u32::from(n))));
        assert_eq!((s.depth(), s.bytes), (5, 60));
        assert_eq!(s.take_tail(0).ok().map(|m| m.topic.clone()).as_deref(), Some("t/0"));
        assert_eq!(s.release(2), (2, 21));
        assert_eq!((s.head, s.bytes), (2, 39));
        // Entry 1 was released with the prefix: the tail starts at 2.
        assert_eq!(s.take_tail(2).ok().map(|m| m.topic.clone()).as_deref(), Some("t/2"));
        assert_eq!(s.release(1), (0, 0), "a release below the head changes nothing");
        assert_eq!(s.release(99), (3, 39), "a release stops at the end");
        assert_eq!(s.take_tail(5).err(), Some(5));
    }

    #[test]
    fn a_full_tail_leaves_a_gap_the_forwarder_reads_from_disk() {
        let mut s = State::default();
        s.appended((0..TAIL_MESSAGES + 3).map(|_| (msg(0), 1)));
        // Entries past the tail's bound were not kept in memory.
        for seq in 0..TAIL_MESSAGES as u64 {
            assert!(s.take_tail(seq).is_ok());
        }
        assert_eq!(s.take_tail(TAIL_MESSAGES as u64).err(), Some((TAIL_MESSAGES + 3) as u64));
        s.appended(std::iter::once((msg(1), 1)));
        let gap_end = (TAIL_MESSAGES + 3) as u64;
        assert_eq!(
            s.take_tail(TAIL_MESSAGES as u64).err(),
            Some(gap_end),
            "read the gap from disk"
        );
        assert!(s.take_tail(gap_end).is_ok(), "then the tail again");
    }
}
