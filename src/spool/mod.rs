//! The store-and-forward spool of `ack: spool` rules: one per target of such a rule, keyed by
//! its target id (`rule/index`, [`crate::rules::target_id`]).
//!
//! A message's path: the session hands it to [`Spool::try_append`] (a bounded queue); the
//! spool's append task (`append.rs`) gathers what is queued into one [`WriteBatch`] (one
//! `Table::Spool` put per message), commits it durably through the store's group-commit
//! writer, and only then reports `Delivered` to the session, which may PUBACK. The forwarder
//! task (`forward.rs`) sends the entries in sequence order with [`Target::send`], a bounded
//! window in flight, deletes what was delivered (batched), moves final failures to the dead
//! letters and retries retryable ones from the oldest undelivered entry, with backoff and,
//! while a backlog is replayed, at `replay_rate`. What was just appended is handed to the
//! forwarder through a bounded in-memory tail (`state.rs`), so a forwarder that keeps up
//! never reads the disk; one that is behind (or after a restart) reads the table.
//!
//! Key layout in `Table::Spool`: target id bytes, `0x00`, sequence (u64 big endian), so one
//! target's entries are one key range in order. Value: [`crate::store::codec`].
//!
//! Owns no socket; the store is the only disk it touches.
//!
//! [`WriteBatch`]: crate::store::WriteBatch
//! [`Target::send`]: crate::rules::Target::send

mod append;
pub mod config;
mod forward;
pub mod metrics;
mod recover;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{AckPolicy, Config};
use crate::deadletters::DeadLetters;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::rules::RuleSet;
use crate::store::{Store, StoreError};
use crate::targets::kinds::target_id;
use crate::targets::{AckSender, Failure, Outcome, Target};
use state::Shared;

/// Appends queued in front of one spool's append task at most; more make the sessions wait
/// (and so stop reading from their clients).
const APPEND_QUEUE: usize = 8192;

/// Why the spools cannot start.
#[derive(Debug, Error)]
pub enum SpoolError {
    /// The store cannot be read (while restoring the spools).
    #[error("spool: {0}")]
    Store(#[from] StoreError),
    /// An `ack: spool` rule without a store (the config validation catches this first).
    #[error("rule {0:?} has `ack: spool` but no `store:` is configured")]
    NoStore(String),
}

/// One message to spool, and where to report that it is on disk (QoS 1/2).
#[derive(Debug)]
pub struct Append {
    /// The message.
    pub msg: Arc<Message>,
    /// Gets `Delivered` once the message is durably spooled, a failure otherwise.
    pub ack: Option<AckSender>,
}

impl Append {
    /// Reports `failure` on the ack, if any.
    fn fail(self, failure: Failure) {
        if let Some(ack) = self.ack {
            let _ = ack.send(Outcome::Failed(failure));
        }
    }
}

/// The target a spool forwards to and its rule's name: set at start, replaced by a reload
/// that keeps the spool but rebuilt its target (the forwarder reads it per message; a std
/// `Mutex` held for a clone).
pub struct TargetSlot(Mutex<(String, Arc<dyn Target>)>);

impl TargetSlot {
    fn new(rule: &str, target: Arc<dyn Target>) -> Arc<TargetSlot> {
        Arc::new(TargetSlot(Mutex::new((rule.to_owned(), target))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (String, Arc<dyn Target>)> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The target.
    pub fn target(&self) -> Arc<dyn Target> {
        Arc::clone(&self.lock().1)
    }

    /// Its rule's name.
    pub fn rule(&self) -> String {
        self.lock().0.clone()
    }

    fn set(&self, rule: &str, target: Arc<dyn Target>) {
        *self.lock() = (rule.to_owned(), target);
    }
}

impl std::fmt::Debug for TargetSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TargetSlot").field(&self.lock().1.id()).finish()
    }
}

/// The handle of one target's spool: cheap to clone.
#[derive(Debug, Clone)]
pub struct Spool {
    /// The append task's queue.
    tx: mpsc::Sender<Append>,
    /// State shared with the append and forward tasks.
    shared: Arc<Shared>,
    /// The target the forwarder sends to.
    slot: Arc<TargetSlot>,
    /// Stops this spool's two tasks (a child of the sinks' shutdown): a reload that removes
    /// the spool's target cancels it.
    stop: CancellationToken,
    /// The spool's two tasks, waited for when a reload removes it.
    tracker: TaskTracker,
}

impl Spool {
    /// Queues an append if there is room, without waiting; hands it back when the queue is
    /// full (then [`append`](Self::append) waits for room: that is the backpressure).
    pub fn try_append(&self, a: Append) -> Result<(), Append> {
        match self.tx.try_send(a) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(a)) => Err(a),
            Err(mpsc::error::TrySendError::Closed(a)) => {
                a.fail(self.stopped());
                Ok(())
            }
        }
    }

    /// Queues an append, waiting while the queue is full.
    pub async fn append(&self, a: Append) {
        if let Err(mpsc::error::SendError(a)) = self.tx.send(a).await {
            a.fail(self.stopped());
        }
    }

    fn stopped(&self) -> Failure {
        Failure::retryable(format!("spool {} is not running (shutting down)", self.shared.id))
    }

    /// The target id (`rule/index`) this spool forwards to.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Messages and bytes in the spool now.
    pub fn depth(&self) -> (u64, u64) {
        self.shared.depth()
    }
}

/// Every spool, by rule index and target index (rules without `ack: spool` have none).
#[derive(Debug, Clone, Default)]
pub struct Spools {
    by_rule: Arc<Vec<Vec<Spool>>>,
}

impl Spools {
    /// The spools of rule `rule` (its index in the rule set), one per target in `to:` order;
    /// empty for a rule that is not `ack: spool`.
    pub fn for_rule(&self, rule: usize) -> &[Spool] {
        self.by_rule.get(rule).map_or(&[], Vec::as_slice)
    }

    /// Every spool.
    pub fn iter(&self) -> impl Iterator<Item = &Spool> {
        self.by_rule.iter().flatten()
    }

    /// The spool of target `id`.
    pub fn get(&self, id: &str) -> Option<&Spool> {
        self.iter().find(|s| s.id() == id)
    }
}

/// Restores the spools found in the store and starts an append and a forward task for each
/// target of every `ack: spool` rule. Entries of target ids no longer configured are moved to
/// the dead letters (`recover.rs`). Call after the rule set is compiled, inside the runtime.
/// `store` and `dead_letters` are both there when `store:` is configured.
pub async fn start(
    config: &Config,
    rules: &Arc<RuleSet>,
    store: Option<&Store>,
    dead_letters: Option<&DeadLetters>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    tasks: &mut JoinSet<()>,
) -> Result<Spools, SpoolError> {
    let at = SpoolContext { store, dead_letters, metrics, shutdown };
    start_reusing(config, rules, &at, None, tasks).await
}

/// What spools are started with.
pub struct SpoolContext<'a> {
    /// The store (with `store:`).
    pub store: Option<&'a Store>,
    /// The dead letters (with `store:`).
    pub dead_letters: Option<&'a DeadLetters>,
    /// The metrics.
    pub metrics: &'a Metrics,
    /// The sinks' shutdown: each spool stops on a child of it.
    pub shutdown: &'a CancellationToken,
}

/// [`start`], or for a reload (`previous`: the running spools): a spool whose target id is
/// still an `ack: spool` target is kept (its tasks go on; its forwarder sends to the target
/// of the new rule set), a new one is started from what the store holds for it. Spools of
/// `previous` not kept are left to [`retire`]. At start (`previous` is `None`), entries of
/// target ids not configured are moved to the dead letters.
pub async fn start_reusing(
    config: &Config,
    rules: &Arc<RuleSet>,
    at: &SpoolContext<'_>,
    previous: Option<&Spools>,
    tasks: &mut JoinSet<()>,
) -> Result<Spools, SpoolError> {
    let (Some(store), Some(dead_letters)) = (at.store, at.dead_letters) else {
        if let Some(r) = config.rules.iter().find(|r| r.ack_policy() == AckPolicy::Spool) {
            return Err(SpoolError::NoStore(r.name.value.clone()));
        }
        return Ok(Spools::default());
    };
    let mut wanted = HashMap::new();
    for (i, rc) in config.rules.iter().enumerate() {
        if rc.ack_policy() == AckPolicy::Spool {
            for t in &rc.to {
                let id = target_id(&rc.name.value, t);
                if previous.and_then(|p| p.get(&id)).is_none() {
                    wanted.insert(id, i);
                }
            }
        }
    }
    let mut restored = match previous {
        None => recover::restore(store, &wanted, dead_letters).await?,
        // A reload: only what the store holds for new spools; running ones keep their own.
        Some(_) if wanted.is_empty() => HashMap::new(),
        Some(_) => recover::restore_only(store, &wanted).await?,
    };
    let mut by_rule = Vec::with_capacity(config.rules.len());
    for (i, rc) in config.rules.iter().enumerate() {
        let mut spools = Vec::new();
        if rc.ack_policy() == AckPolicy::Spool {
            let cfg = rc.spool.as_ref().map(|s| s.value.clone()).unwrap_or_default();
            for (j, t) in rc.to.iter().enumerate() {
                let id = target_id(&rc.name.value, t);
                let Some(target) = rules.rule(i).and_then(|r| r.targets.get(j)).cloned() else {
                    continue;
                };
                if let Some(kept) = previous.and_then(|p| p.get(&id)) {
                    kept.slot.set(&rc.name.value, target);
                    spools.push(kept.clone());
                    continue;
                }
                let state = restored.remove(&id).unwrap_or_default();
                if state.depth() > 0 {
                    info!(target_id = %id, messages = state.depth(), bytes = state.bytes, "spool restored; forwarding its backlog");
                }
                let shared = Arc::new(Shared::new(id, state, &cfg, at.metrics));
                let (tx, rx) = mpsc::channel(APPEND_QUEUE);
                let stop = at.shutdown.child_token();
                let tracker = TaskTracker::new();
                let slot = TargetSlot::new(&rc.name.value, target);
                let append =
                    append::run(Arc::clone(&shared), store.clone(), rx, cfg.on_full, stop.clone());
                tasks.spawn(tracker.track_future(append));
                let forwarder = forward::Forwarder::new(
                    Arc::clone(&shared),
                    store.clone(),
                    (Arc::clone(&slot), dead_letters),
                    &cfg,
                );
                tasks.spawn(tracker.track_future(forwarder.run(stop.clone())));
                tracker.close();
                spools.push(Spool { tx, shared, slot, stop, tracker });
            }
        }
        by_rule.push(spools);
    }
    Ok(Spools { by_rule: Arc::new(by_rule) })
}

/// After a reload: stops `removed` spools (their targets are no longer `ack: spool` targets)
/// and moves what they still hold to the dead letters, as a restart would (reason: removed by
/// a reload). Call once no session routes with the rule set that had them.
pub async fn retire(removed: Vec<Spool>, store: &Store, dead_letters: &DeadLetters) {
    for spool in removed {
        spool.stop.cancel();
        spool.tracker.wait().await;
        let state = {
            let s = spool.shared.lock();
            let mut range = state::State::starting_at(s.head);
            range.end = s.end;
            range
        };
        if state.depth() == 0 {
            continue;
        }
        warn!(
            target_id = %spool.id(),
            messages = state.depth(),
            "spool of a target removed by a config reload: what it holds goes to the dead letters"
        );
        let rule = spool.slot.rule();
        let reason = format!(
            "spooled for target {}, removed by a config reload before it was forwarded",
            spool.id()
        );
        if let Err(e) =
            recover::move_to_dead_letters(store, dead_letters, (&rule, spool.id()), &reason, &state)
                .await
        {
            error!(target_id = %spool.id(), error = %e, "cannot move a removed spool to the dead letters; its entries stay in the store (moved at the next start)");
        }
    }
}

/// The first key of `id`'s entries.
fn key(id: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 9);
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The bytes an entry of `id` with a `value_len`-byte value counts against `max_bytes`.
fn entry_size(id: &str, value_len: usize) -> u64 {
    (id.len() + 9 + value_len) as u64
}

/// Splits a spool key into target id and sequence.
fn parse_key(k: &[u8]) -> Option<(&str, u64)> {
    let nul = k.iter().position(|b| *b == 0)?;
    let id = std::str::from_utf8(&k[..nul]).ok()?;
    let seq: [u8; 8] = k.get(nul + 1..)?.try_into().ok()?;
    Some((id, u64::from_be_bytes(seq)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_target_then_sequence_and_parse_back() {
        let a = key("r/0", 1);
        let b = key("r/0", 256);
        let c = key("r/0/1", 0);
        assert!(a < b && b < c, "one target's keys are one range, in order");
        assert_eq!(parse_key(&b), Some(("r/0", 256)));
        assert_eq!(parse_key(b"no-nul"), None);
        assert_eq!(parse_key(b"r/0\0short"), None);
    }
}
