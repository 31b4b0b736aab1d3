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
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{AckPolicy, Config};
use crate::deadletters::DeadLetters;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::rules::RuleSet;
use crate::store::{Store, StoreError};
use crate::targets::kinds::target_id;
use crate::targets::{AckSender, Failure, Outcome};
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

/// The handle of one target's spool: cheap to clone.
#[derive(Debug, Clone)]
pub struct Spool {
    /// The append task's queue.
    tx: mpsc::Sender<Append>,
    /// State shared with the append and forward tasks.
    shared: Arc<Shared>,
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
    let (Some(store), Some(dead_letters)) = (store, dead_letters) else {
        if let Some(r) = config.rules.iter().find(|r| r.ack_policy() == AckPolicy::Spool) {
            return Err(SpoolError::NoStore(r.name.value.clone()));
        }
        return Ok(Spools::default());
    };
    let mut wanted = HashMap::new();
    for (i, rc) in config.rules.iter().enumerate() {
        if rc.ack_policy() == AckPolicy::Spool {
            for t in &rc.to {
                wanted.insert(target_id(&rc.name.value, t), i);
            }
        }
    }
    let mut restored = recover::restore(store, &wanted, dead_letters).await?;
    let mut by_rule = Vec::with_capacity(config.rules.len());
    for (i, rc) in config.rules.iter().enumerate() {
        let mut spools = Vec::new();
        if rc.ack_policy() == AckPolicy::Spool {
            let cfg = rc.spool.as_ref().map(|s| s.value.clone()).unwrap_or_default();
            for (j, t) in rc.to.iter().enumerate() {
                let id = target_id(&rc.name.value, t);
                let state = restored.remove(&id).unwrap_or_default();
                if state.depth() > 0 {
                    info!(target_id = %id, messages = state.depth(), bytes = state.bytes, "spool restored; forwarding its backlog");
                }
                let shared = Arc::new(Shared::new(id, state, &cfg, metrics));
                let (tx, rx) = mpsc::channel(APPEND_QUEUE);
                tasks.spawn(append::run(
                    Arc::clone(&shared),
                    store.clone(),
                    rx,
                    cfg.on_full,
                    shutdown.clone(),
                ));
                let forwarder = forward::Forwarder::new(
                    Arc::clone(&shared),
                    store.clone(),
                    (rules, (i, j), dead_letters),
                    &cfg,
                );
                tasks.spawn(forwarder.run(shutdown.clone()));
                spools.push(Spool { tx, shared });
            }
        }
        by_rule.push(spools);
    }
    Ok(Spools { by_rule: Arc::new(by_rule) })
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
