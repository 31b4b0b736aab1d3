//! Target ids in the store. A target's id is its `id:` or `RULE/KIND:ENDPOINT`
//! ([`kinds::target_id`](super::kinds::target_id)); spool keys and dead letters name it, so
//! reordering a rule's `to:` keeps every spooled message with its target.
//!
//! Stores written before these ids named targets by position (`RULE/INDEX`). At start,
//! [`migrate_positional_ids`] renames them, once per store (a marker in the meta table), in
//! one atomic commit: spool keys get the new id, dead letters are rewritten with it. The
//! positions are read against the config the gateway starts with, so upgrade with the `to:`
//! lists as the old version ran them.

use std::collections::HashMap;

use redb::ReadableTable;
use tracing::info;

use crate::config::Config;
use crate::deadletters;
use crate::store::{Store, StoreError, Table, WriteBatch};

use super::kinds::target_id;

/// The meta key whose presence says the store's target ids are names, not positions.
pub const MARKER_KEY: &[u8] = b"target_ids";
/// Its value.
const MARKER: &[u8] = b"names";

/// What a migration renamed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    /// Spooled messages moved to their target's new id.
    pub spooled: usize,
    /// Dead letters rewritten with their target's new id.
    pub dead_letters: usize,
}

/// Renames positional target ids (`RULE/INDEX`) to the ids of `config`'s targets in the spool
/// and dead-letter tables, once per store. Does nothing on a store already migrated or new.
pub async fn migrate_positional_ids(
    store: &Store,
    config: &Config,
) -> Result<Migrated, StoreError> {
    let renames: HashMap<String, String> = config
        .rules
        .iter()
        .flat_map(|rule| {
            let name = &rule.name.value;
            rule.to
                .iter()
                .enumerate()
                .map(move |(i, t)| (format!("{name}/{i}"), target_id(name, t)))
        })
        .filter(|(old, new)| old != new)
        .collect();
    let reader = store.clone();
    let (batch, migrated) =
        tokio::task::spawn_blocking(move || plan(&reader, &renames))
            .await
            .map_err(|e| StoreError::Io(format!("target id migration task failed: {e}")))??;
    let Some(batch) = batch else { return Ok(Migrated::default()) };
    store.commit(batch).await?;
    if migrated != Migrated::default() {
        info!(
            spooled = migrated.spooled,
            dead_letters = migrated.dead_letters,
            "store migrated: positional target ids (rule/index) renamed to target ids"
        );
    }
    Ok(migrated)
}

/// The batch that renames, or `None` when the store is already migrated.
fn plan(
    store: &Store,
    renames: &HashMap<String, String>,
) -> Result<(Option<WriteBatch>, Migrated), StoreError> {
    let io = |e: &dyn std::fmt::Display| StoreError::Io(e.to_string());
    let txn = store.read()?;
    let meta = txn.open_table(Table::Meta.def()).map_err(|e| io(&e))?;
    if meta.get(MARKER_KEY).map_err(|e| io(&e))?.is_some() {
        return Ok((None, Migrated::default()));
    }
    let mut batch = WriteBatch::new();
    let mut migrated = Migrated::default();
    let spool = txn.open_table(Table::Spool.def()).map_err(|e| io(&e))?;
    for entry in spool.iter().map_err(|e| io(&e))? {
        let (k, v) = entry.map_err(|e| io(&e))?;
        let key = k.value();
        let Some(nul) = key.iter().position(|b| *b == 0) else { continue };
        let Some(new) = std::str::from_utf8(&key[..nul]).ok().and_then(|id| renames.get(id)) else {
            continue;
        };
        let mut renamed = new.as_bytes().to_vec();
        renamed.extend_from_slice(&key[nul..]);
        batch.delete(Table::Spool, key.to_vec());
        batch.put(Table::Spool, renamed, v.value().to_vec());
        migrated.spooled += 1;
    }
    let letters = txn.open_table(Table::DeadLetters.def()).map_err(|e| io(&e))?;
    for entry in letters.iter().map_err(|e| io(&e))? {
        let (k, v) = entry.map_err(|e| io(&e))?;
        // A letter that cannot be read is left as it is (listing it reports the problem).
        let Ok(mut letter) = deadletters::decode(v.value()) else { continue };
        let Some(new) = renames.get(&letter.target) else { continue };
        letter.target.clone_from(new);
        batch.put(Table::DeadLetters, k.value().to_vec(), deadletters::encode(&letter)?);
        migrated.dead_letters += 1;
    }
    batch.put(Table::Meta, MARKER_KEY.to_vec(), MARKER.to_vec());
    Ok((Some(batch), migrated))
}
