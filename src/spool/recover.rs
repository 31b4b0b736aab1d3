//! At start: the spools found in the store, restored (sequence range and entry sizes) for the
//! targets still configured; entries of a target id no longer configured are reported.
//! And the hand-over of spooled messages to the dead letters.

use std::collections::HashMap;

use redb::ReadableTable;
use tracing::{error, warn};

use super::state::State;
use super::{entry_size, parse_key};
use crate::message::Message;
use crate::store::{Store, StoreError, Table, WriteBatch};

/// Scans the spool table once; returns the state of every spool whose target id is in
/// `wanted`. Other target ids' entries are left in the table and logged (see README).
pub(super) async fn restore<V: Send + Sync + 'static>(
    store: &Store,
    wanted: &HashMap<String, V>,
) -> Result<HashMap<String, State>, StoreError> {
    let store = store.clone();
    let scan = tokio::task::spawn_blocking(move || scan(&store))
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
                bytes = state.bytes,
                "spooled messages for a target that is no longer configured (rule removed or its targets reordered); kept in the store, not forwarded: configure the target id again to forward them"
            );
        }
    }
    Ok(restored)
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

/// Adds spooled message `msg` (sequence `seq` of spool `id`) to the dead letters, with
/// `reason`, in `batch` (which also deletes it from the spool).
pub(super) fn dead_letter(batch: &mut WriteBatch, id: &str, seq: u64, msg: &Message, reason: &str) {
    // Until the dead-letter store is merged, a final failure is logged and counted only.
    let _ = batch;
    error!(target_id = %id, seq, topic = %msg.topic, %reason, "spooled message failed for good (dead letter)");
}
