//! At start: the spools found in the store, restored (sequence range and entry sizes) for the
//! targets still configured; entries of a target id no longer configured are moved to the
//! dead letters (where an operator sees them and can replay them to another target). And the
//! hand-over of spooled messages to the dead letters.

use std::collections::HashMap;

use redb::ReadableTable;
use tracing::{error, warn};

use super::state::State;
use super::{entry_size, key, parse_key};
use crate::deadletters::{now_ms, DeadLetter, DeadLetters};
use crate::message::Message;
use crate::store::{codec, Store, StoreError, Table, WriteBatch};

/// Entries moved to the dead letters per commit at start.
const ORPHAN_BATCH: usize = 1024;

/// Scans the spool table once; returns the state of every spool whose target id is in
/// `wanted`. Other target ids' entries are moved to `dead_letters`.
pub(super) async fn restore<V: Send + Sync + 'static>(
    store: &Store,
    wanted: &HashMap<String, V>,
    dead_letters: &DeadLetters,
) -> Result<HashMap<String, State>, StoreError> {
    let reader = store.clone();
    let scan = tokio::task::spawn_blocking(move || scan(&reader))
        .await
        .map_err(|e| StoreError::Io(format!("spool scan task failed: {e}")))??;
    let mut restored = HashMap::new();
    for (id, state) in scan {
        if wanted.contains_key(&id) {
            restored.insert(id, state);
        } else {
            warn!(
                target_id = %id,
                messages = state.depth(),
                "spooled messages for a target that is no longer configured (rule removed, renamed, or its targets changed): moved to the dead letters"
            );
            move_orphans(store, dead_letters, &id, &state).await?;
        }
    }
    Ok(restored)
}

/// Scans the spool table once; returns the state of the spools in `wanted` only (a reload's
/// new spools: other entries belong to running spools).
pub(super) async fn restore_only<V: Send + Sync + 'static>(
    store: &Store,
    wanted: &HashMap<String, V>,
) -> Result<HashMap<String, State>, StoreError> {
    let reader = store.clone();
    let scan = tokio::task::spawn_blocking(move || scan(&reader))
        .await
        .map_err(|e| StoreError::Io(format!("spool scan task failed: {e}")))??;
    Ok(scan.into_iter().filter(|(id, _)| wanted.contains_key(id)).collect())
}

/// Moves every entry of spool `id` (no longer configured) to the dead letters, in batches
/// that each delete what they move.
async fn move_orphans(
    store: &Store,
    dead_letters: &DeadLetters,
    id: &str,
    state: &State,
) -> Result<(), StoreError> {
    // A target id is `RULE/KIND:ENDPOINT` unless it was set with `id:` (then this is a guess).
    let rule = id.split_once('/').map_or(id, |(rule, _)| rule);
    let reason = format!(
        "spooled for target {id}, which is no longer configured (rule removed, renamed, or its targets changed)"
    );
    move_to_dead_letters(store, dead_letters, (rule, id), &reason, state).await
}

/// Moves the entries `[state.head, state.end)` of spool `id` (of rule `rule`) to the dead
/// letters with `reason`, in batches that each delete what they move.
pub(super) async fn move_to_dead_letters(
    store: &Store,
    dead_letters: &DeadLetters,
    (rule, id): (&str, &str),
    reason: &str,
    state: &State,
) -> Result<(), StoreError> {
    let mut from = state.head;
    while from < state.end {
        let (s, i) = (store.clone(), id.to_owned());
        let entries = tokio::task::spawn_blocking(move || {
            super::forward::read_range(&s, &i, from, u64::MAX, ORPHAN_BATCH)
        })
        .await
        .map_err(|e| StoreError::Io(format!("spool read task failed: {e}")))??;
        let Some(last) = entries.last().map(|(seq, _)| *seq) else { break };
        let mut batch = WriteBatch::new();
        for (seq, value) in &entries {
            match codec::decode_message(value) {
                Ok(message) => {
                    let letter = DeadLetter {
                        rule: rule.to_owned(),
                        target: id.to_owned(),
                        reason: reason.to_owned(),
                        failed_at_ms: now_ms(),
                        message,
                    };
                    dead_letters.add_to(&mut batch, &letter)?;
                }
                Err(e) => {
                    error!(target_id = %id, seq, error = %e, "spooled entry cannot be decoded; deleted")
                }
            }
        }
        batch.delete_range(Table::Spool, key(id, from), key(id, last + 1));
        store.commit(batch).await?;
        from = last + 1;
    }
    Ok(())
}

/// Every spool in the table, by target id.
fn scan(store: &Store) -> Result<HashMap<String, State>, StoreError> {
    let io = |e: &dyn std::fmt::Display| StoreError::Io(e.to_string());
    let txn = store.read()?;
    let table = txn.open_table(Table::Spool.def()).map_err(|e| io(&e))?;
    let mut spools: HashMap<String, State> = HashMap::new();
    for entry in table.iter().map_err(|e| io(&e))? {
        let (k, v) = entry.map_err(|e| io(&e))?;
        let Some((id, seq)) = parse_key(k.value()) else {
            error!(key = ?k.value(), "a spool key that mqgate did not write; ignored");
            continue;
        };
        let size = u32::try_from(entry_size(id, v.value().len())).unwrap_or(u32::MAX);
        let state = spools.entry(id.to_owned()).or_insert_with(|| State::starting_at(seq));
        // Keys come in order; a gap (never expected) counts as empty entries.
        while state.end < seq {
            state.sizes.push_back(0);
            state.end += 1;
        }
        state.sizes.push_back(size);
        state.bytes += u64::from(size);
        state.end = seq + 1;
    }
    Ok(spools)
}

/// Adds spooled message `msg` of rule `rule`'s target `id` to the dead letters, with
/// `reason`, in `batch` (which also deletes it from the spool: one atomic move).
pub(super) fn dead_letter(
    dead_letters: &DeadLetters,
    batch: &mut WriteBatch,
    (rule, id): (&str, &str),
    msg: &Message,
    reason: &str,
) {
    warn!(target_id = %id, topic = %crate::logtext::LogText(&msg.topic), %reason, "spooled message failed for good: moved to the dead letters");
    let letter = DeadLetter {
        rule: rule.to_owned(),
        target: id.to_owned(),
        reason: reason.to_owned(),
        failed_at_ms: now_ms(),
        message: msg.clone(),
    };
    if let Err(e) = dead_letters.add_to(batch, &letter) {
        error!(target_id = %id, topic = %crate::logtext::LogText(&msg.topic), error = %e, "dead letter cannot be kept; the message is deleted from the spool");
    }
}
