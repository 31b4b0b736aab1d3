//! The forwarder of one spool: sends its entries in sequence order to the target, at most
//! [`WINDOW`] in flight, and settles them in that same order.
//!
//! - Delivered: released from the spool's accounting at once (room for appends), deleted
//!   from the table in batches (one `delete_range` per flush).
//! - Final failure (nack, 4xx, a template that cannot render), or retryable failures for
//!   longer than `max_retry_time`: moved to the dead letters in the same atomic batch that
//!   deletes it from the spool.
//! - Retryable failure: the forwarder stops sending, lets what is in flight settle (their
//!   outcomes are not used), backs off, and resends from that entry: so a topic's messages
//!   are never delivered out of order, and later entries that were delivered meanwhile are
//!   delivered again (at least once; duplicates are possible after any retry or crash).
//! - A backlog (after a failure, or restored at start) is replayed at most `replay_rate`
//!   messages per second, until the forwarder has caught up.
//!
//! Entries come from the in-memory tail while the forwarder keeps up, from the table (read
//! on the blocking pool) when it is behind.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::config::SpoolConfig;
use super::state::Shared;
use super::TargetSlot;
use super::{key, parse_key};
use crate::deadletters::DeadLetters;
use crate::message::Message;
use crate::store::{codec, Store, Table, WriteBatch};
use crate::targets::Outcome;

/// Messages sent and not yet settled, at most.
pub(super) const WINDOW: usize = 512;
/// Entries read from the table at once when the forwarder is behind.
const READ_BATCH: usize = 512;
/// Settled entries after which their deletion is committed without waiting for the timer.
const DELETE_BATCH: u64 = 2048;
/// How long settled entries wait for their deletion to be committed at most.
const DELETE_INTERVAL: Duration = Duration::from_millis(20);
/// First and longest delay before a resend after a retryable failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Credit a paced replay may build up while waiting (so pacing survives timer granularity
/// without allowing a burst).
const PACE_CREDIT: Duration = Duration::from_millis(50);

/// The outcome of one sent entry.
type Settled = (u64, Arc<Message>, Outcome);
type InFlight = Pin<Box<dyn Future<Output = Settled> + Send>>;

/// One spool's forwarder.
pub(super) struct Forwarder {
    shared: Arc<Shared>,
    store: Store,
    /// The target and its rule's name (what its dead letters record): a reload that keeps
    /// the spool may put a rebuilt target there.
    slot: Arc<TargetSlot>,
    /// Where final failures go.
    dead_letters: DeadLetters,
    /// `0` = no pacing.
    replay_rate: u32,
    /// Zero = retry forever.
    max_retry_time: Duration,
    /// The next sequence to send.
    next: u64,
    /// Entries read from the table, not yet sent.
    readahead: VecDeque<(u64, Arc<Message>)>,
    /// Sent, in sequence order.
    in_flight: FuturesOrdered<InFlight>,
    /// Every sequence below it is settled (delivered or dead-lettered).
    settled: u64,
    /// Every sequence below it has its deletion committed (or queued in `flushing`).
    deleted: u64,
    /// Dead letters to commit with the next deletion.
    dead: WriteBatch,
    /// When a flush is due (the first settled entry not yet deleted, plus the interval).
    flush_at: Option<Instant>,
    /// After a retryable failure: resend from `next` at this time, once nothing is in flight.
    halted_until: Option<Instant>,
    /// The delay of the next backoff.
    backoff: Duration,
    /// The entry that keeps failing and since when (for `max_retry_time`).
    failing: Option<(u64, Instant)>,
    /// Replaying a backlog: sends are paced.
    replaying: bool,
    /// When the next paced send may go.
    pace_at: Instant,
}

impl Forwarder {
    /// The forwarder of spool `shared`, sending to the target in `slot`.
    pub fn new(
        shared: Arc<Shared>,
        store: Store,
        (slot, dead_letters): (Arc<TargetSlot>, &DeadLetters),
        cfg: &SpoolConfig,
    ) -> Self {
        let (head, depth) = {
            let s = shared.lock();
            (s.head, s.depth())
        };
        Forwarder {
            shared,
            store,
            slot,
            dead_letters: dead_letters.clone(),
            replay_rate: cfg.replay_rate,
            max_retry_time: cfg.max_retry_time.0,
            next: head,
            readahead: VecDeque::new(),
            in_flight: FuturesOrdered::new(),
            settled: head,
            deleted: head,
            dead: WriteBatch::new(),
            flush_at: None,
            halted_until: None,
            backoff: BACKOFF_MIN,
            failing: None,
            replaying: depth > 0,
            pace_at: Instant::now(),
        }
    }

    /// Forwards until shutdown; then commits the deletions of what was settled.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if self.halted_until.is_none() {
                self.fill(&shutdown).await;
            }
            if shutdown.is_cancelled() {
                break;
            }
            let idle = self.halted_until.is_none() && self.in_flight.len() < WINDOW;
            let resume_at = self.halted_until.filter(|_| self.in_flight.is_empty());
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                Some((seq, msg, outcome)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    self.settle(seq, msg, outcome);
                }
                () = sleep_until(self.flush_at), if self.flush_at.is_some() => self.flush(),
                () = sleep_until(resume_at), if resume_at.is_some() => {
                    self.halted_until = None;
                    debug!(target_id = %self.shared.id, from = self.next, "spool resending");
                }
                () = self.shared.appended.notified(), if idle => {}
            }
            if self.settled.saturating_sub(self.deleted) >= DELETE_BATCH {
                self.flush();
            }
        }
        // At shutdown the last deletions are waited for: fewer resends after the restart.
        if let Some(batch) = self.take_flush() {
            commit_deletions(&self.store, &self.shared.id, batch).await;
        }
    }

    /// Sends entries while the window has room and there are entries to send.
    async fn fill(&mut self, shutdown: &CancellationToken) {
        while self.in_flight.len() < WINDOW
            && self.halted_until.is_none()
            && !shutdown.is_cancelled()
        {
            let Some((seq, msg)) = self.next_entry().await else {
                if self.replaying && self.in_flight.is_empty() {
                    self.replaying = false;
                    info!(target_id = %self.shared.id, "spool caught up");
                }
                return;
            };
            if self.replaying {
                self.pace().await;
            }
            let target = self.slot.target();
            let delivery = crate::targets::send(target.as_ref(), &msg).await;
            self.next = seq + 1;
            self.in_flight.push_back(Box::pin(async move {
                let outcome = delivery.outcome().await;
                (seq, msg, outcome)
            }));
        }
    }

    /// Waits for the replay pace.
    async fn pace(&mut self) {
        if self.replay_rate == 0 {
            return;
        }
        let now = Instant::now();
        self.pace_at = self.pace_at.max(now - PACE_CREDIT);
        if self.pace_at > now {
            tokio::time::sleep_until(self.pace_at).await;
        }
        self.pace_at += Duration::from_secs(1) / self.replay_rate;
    }

    /// The next entry to send: from what was read ahead, the in-memory tail, or the table.
    async fn next_entry(&mut self) -> Option<(u64, Arc<Message>)> {
        loop {
            let (head, limit) = {
                let mut state = self.shared.lock();
                self.next = self.next.max(state.head);
                if self.next >= state.end {
                    self.readahead.clear();
                    return None;
                }
                while self.readahead.front().is_some_and(|(s, _)| *s < self.next) {
                    self.readahead.pop_front();
                }
                if let Some(entry) = self.readahead.pop_front() {
                    return Some(entry);
                }
                match state.take_tail(self.next) {
                    Ok(msg) => return Some((self.next, msg)),
                    Err(limit) => (state.head, limit),
                }
            };
            if !self.read(self.next.max(head), limit).await {
                return None;
            }
            if self.readahead.is_empty() {
                // Entries missing from the table (deleted by drop_oldest meanwhile): skip.
                self.next = limit;
            }
        }
    }

    /// Reads up to [`READ_BATCH`] entries of `[from, to)` into `readahead`; `false` (and the
    /// forwarder halted, to try again after a backoff) when the table cannot be read.
    async fn read(&mut self, from: u64, to: u64) -> bool {
        let (store, id) = (self.store.clone(), self.shared.id.clone());
        let read =
            tokio::task::spawn_blocking(move || read_range(&store, &id, from, to, READ_BATCH))
                .await;
        match read {
            Ok(Ok(entries)) => {
                for (seq, value) in entries {
                    match codec::decode_message(&value) {
                        Ok(msg) => self.readahead.push_back((seq, Arc::new(msg))),
                        Err(e) => {
                            // Not a message any more: nothing to send or dead-letter.
                            error!(target_id = %self.shared.id, seq, error = %e, "spooled entry cannot be decoded; deleted");
                            self.shared.metrics.dropped.inc();
                        }
                    }
                }
                true
            }
            Ok(Err(e)) => {
                error!(target_id = %self.shared.id, error = %e, "cannot read the spool; retrying");
                self.halt();
                false
            }
            Err(e) => {
                error!(target_id = %self.shared.id, error = %e, "spool read task failed; retrying");
                self.halt();
                false
            }
        }
    }

    /// Handles the outcome of the oldest entry in flight.
    fn settle(&mut self, seq: u64, msg: Arc<Message>, outcome: Outcome) {
        if self.halted_until.is_some() || seq < self.settled {
            // Sent after an entry that failed: resent anyway, whatever this said.
            return;
        }
        match outcome {
            Outcome::Delivered => {
                self.shared.metrics.forwarded.inc();
                self.failing = None;
                self.backoff = BACKOFF_MIN;
                self.done(seq);
            }
            Outcome::Failed(f) if !f.retryable => {
                self.dead_letter(&msg, &f.reason);
                self.done(seq);
            }
            Outcome::Failed(f) => {
                let since = match self.failing {
                    Some((s, since)) if s == seq => since,
                    _ => Instant::now(),
                };
                self.failing = Some((seq, since));
                let elapsed = since.elapsed();
                if !self.max_retry_time.is_zero() && elapsed >= self.max_retry_time {
                    let reason = format!(
                        "retries exhausted after {:.0?} (spool.max_retry_time): {}",
                        elapsed, f.reason
                    );
                    self.failing = None;
                    self.backoff = BACKOFF_MIN;
                    self.dead_letter(&msg, &reason);
                    self.done(seq);
                    return;
                }
                self.shared.metrics.retries.inc();
                warn!(target_id = %self.shared.id, seq, reason = %f.reason, backoff = ?self.backoff, "spooled message not delivered; will resend from it");
                self.halt();
            }
        }
    }

    /// Stops sending until the backoff has passed and nothing is in flight; then resends from
    /// the oldest entry not settled, paced.
    fn halt(&mut self) {
        self.next = self.settled;
        self.readahead.clear();
        self.halted_until = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.replaying = true;
    }

    /// `seq` is settled: its room is released and its deletion is due.
    fn done(&mut self, seq: u64) {
        self.settled = seq + 1;
        {
            let mut state = self.shared.lock();
            state.release(seq + 1);
            self.shared.gauges(&state);
        }
        self.shared.space.notify_one();
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + DELETE_INTERVAL);
        }
    }

    /// Records `msg` as a dead letter, committed with the next deletion.
    fn dead_letter(&mut self, msg: &Message, reason: &str) {
        self.shared.metrics.dead_lettered.inc();
        let rule = self.slot.rule();
        let (rule, id) = (rule.as_str(), self.shared.id.as_str());
        super::recover::dead_letter(&self.dead_letters, &mut self.dead, (rule, id), msg, reason);
    }

    /// Commits the deletion of every settled entry (and the dead letters) in one batch, in
    /// the background: the forwarder does not wait for the disk. A lost deletion (crash)
    /// only means those entries are sent again after the restart.
    fn flush(&mut self) {
        let Some(batch) = self.take_flush() else { return };
        let (store, id) = (self.store.clone(), self.shared.id.clone());
        tokio::spawn(async move { commit_deletions(&store, &id, batch).await });
    }

    /// The batch of deletions and dead letters due, if any.
    fn take_flush(&mut self) -> Option<WriteBatch> {
        self.flush_at = None;
        if self.settled <= self.deleted && self.dead.is_empty() {
            return None;
        }
        let mut batch = std::mem::take(&mut self.dead);
        if self.settled > self.deleted {
            let id = &self.shared.id;
            batch.delete_range(Table::Spool, key(id, self.deleted), key(id, self.settled));
            self.deleted = self.settled;
        }
        Some(batch)
    }
}

/// Commits a batch of deletions (and dead letters), logging a failure.
async fn commit_deletions(store: &Store, id: &str, batch: WriteBatch) {
    if let Err(e) = store.commit(batch).await {
        error!(target_id = %id, error = %e, "cannot delete forwarded messages from the spool; they will be sent again after a restart");
    }
}

/// Sleeps until `at` (forever for `None`; the `select!` guards keep that branch off).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Up to `max` entries of spool `id` in `[from, to)`, in order.
pub(super) fn read_range(
    store: &Store,
    id: &str,
    from: u64,
    to: u64,
    max: usize,
) -> Result<Vec<(u64, Vec<u8>)>, crate::store::StoreError> {
    let io = crate::store::StoreError::Io;
    let txn = store.read()?;
    let table = txn.open_table(Table::Spool.def()).map_err(|e| io(e.to_string()))?;
    let (lo, hi) = (key(id, from), key(id, to));
    let mut out = Vec::new();
    for entry in table.range(lo.as_slice()..hi.as_slice()).map_err(|e| io(e.to_string()))? {
        let (k, v) = entry.map_err(|e| io(e.to_string()))?;
        if let Some((_, seq)) = parse_key(k.value()) {
            out.push((seq, v.value().to_vec()));
        }
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}
