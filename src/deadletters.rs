//! Dead letters: messages that failed for good (an AMQP nack, a mandatory publish returned as
//! unroutable, a job queue gone, an HTTP 4xx/3xx, a rule that cannot be evaluated), kept in the
//! store with the reason, the rule and the target, until an operator replays or purges them.
//!
//! Owns the `dead_letters` table of the store and nothing else: it never sends a message
//! anywhere (replay is the admin API's job, through `rules::Target::send`) and never decides
//! what a device is told.
//!
//! Keys are ids, `u64` big-endian, so the table reads in the order the letters were recorded;
//! ids only grow and are never reused, also across restarts: the next id is kept in the
//! `meta` table (key [`NEXT_ID_KEY`]) in the same batch as each letter, and at open the next
//! id is the larger of it and the largest key + 1.
//! A value is [`encode`]d: a small header (version, time, dedup key, rule, target, reason), then
//! the message as `store::codec` stores it.
//!
//! Memory: an index of the ids and their dedup keys (~50 bytes per letter), so the count, the
//! bound and duplicates are known without reading the disk. The table is bounded in count
//! (`store.max_dead_letters`) and in bytes of stored values (`store.max_dead_letter_bytes`):
//! a new letter beyond either evicts the oldest ones, counted in
//! `messages_dropped{reason="dead_letters_full"}`. The newest letter is always kept, so one
//! letter larger than the byte bound on its own (at most `mqtt.max_packet_size` and its
//! header) is kept alone.
//!
//! Duplicates: a QoS 1/2 message has an identity (`Message::identity`: client id, packet id,
//! topic, payload). An MQTT 3.1.1 client whose message failed for good is disconnected and
//! resends it, and it fails again: the same identity for the same target is kept once (the
//! first failure; later ones are not recorded again while it is kept).

pub mod cli;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use redb::{ReadableTable, ReadableTableMetadata};
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use crate::message::Message;
use crate::metrics::{DeadLetterLabels, Metrics, ReasonLabels};
use crate::store::codec::{decode_message, encode_message, get_str};
use crate::store::{Store, StoreError, Table, WriteBatch};

/// How many dead letters are kept by default (`store.max_dead_letters`).
pub const DEFAULT_LIMIT: usize = 100_000;
/// How many bytes of dead letters (stored values) are kept by default
/// (`store.max_dead_letter_bytes`): 256 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// Reason label of `messages_dropped` for the oldest dead letter evicted by a new one.
pub const DROPPED_FULL: &str = "dead_letters_full";
/// Reason label of `messages_dropped` for a dead letter not recorded because the store's
/// writer queue was full (a sink cannot wait for it).
pub const DROPPED_BUSY: &str = "dead_letters_busy";
/// The longest reason kept, in bytes (a longer one is cut at a character boundary).
const MAX_REASON: usize = 4096;
/// The value format version.
const VERSION: u8 = 1;
/// The `meta` key holding the next id (u64 BE).
pub const NEXT_ID_KEY: &[u8] = b"dead_letters.next_id";

/// One message that failed for good, with why and where.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The rule's `name`.
    pub rule: String,
    /// The target's id (`rules::target_id`: `rule/index`), what a replay sends it to.
    pub target: String,
    /// Why it failed (the sink's or the rule's reason).
    pub reason: String,
    /// When it failed, in milliseconds since the Unix epoch.
    pub failed_at_ms: u64,
    /// The message as received (topic, payload, QoS, RETAIN, MQTT 5 properties, publisher).
    pub message: Message,
}

/// A cheap-to-clone handle on the dead letters in the store.
#[derive(Clone)]
pub struct DeadLetters {
    inner: Arc<Inner>,
}

/// The dead letters open in this process, by store file: one index per store.
static OPEN: Mutex<Vec<(std::path::PathBuf, std::sync::Weak<Inner>)>> = Mutex::new(Vec::new());

struct Inner {
    /// Where they are kept.
    store: Store,
    /// Which ids exist, and the dedup keys: kept in step with the table.
    index: Mutex<Index>,
    /// Most letters kept; a new one beyond evicts the oldest.
    limit: usize,
    /// Most bytes (stored values) kept; a new letter beyond evicts the oldest ones.
    max_bytes: u64,
    /// `mqgate_dead_letters`: letters kept now.
    gauge: Gauge,
    /// `mqgate_dead_lettered{rule, target}`: letters recorded.
    recorded: Family<DeadLetterLabels, Counter>,
    /// `messages_dropped{reason="dead_letters_full"}`.
    evicted: Counter,
    /// `messages_dropped{reason="dead_letters_busy"}`.
    busy: Counter,
}

/// The ids kept and their dedup keys.
#[derive(Default)]
struct Index {
    /// The id the next letter gets.
    next_id: u64,
    /// Every id kept, with its dedup key (for a message with an identity) and its size.
    ids: BTreeMap<u64, (Option<u128>, u64)>,
    /// Bytes of the values kept (the sum of the sizes in `ids`).
    bytes: u64,
    /// Dedup key → id.
    dedup: HashMap<u128, u64>,
}

impl Index {
    /// Forgets `id`; true if it was kept.
    fn remove(&mut self, id: u64) -> bool {
        match self.ids.remove(&id) {
            Some((key, size)) => {
                self.bytes = self.bytes.saturating_sub(size);
                if let Some(key) = key {
                    if self.dedup.get(&key) == Some(&id) {
                        self.dedup.remove(&key);
                    }
                }
                true
            }
            None => false,
        }
    }
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").field("count", &self.count()).finish()
    }
}

impl DeadLetters {
    /// Opens the dead letters of `store`, keeping at most [`DEFAULT_LIMIT`]. While one is open
    /// for a store, opening again returns that one (two indexes would give out the same ids).
    pub fn new(store: Store, metrics: &Metrics) -> Result<Self, StoreError> {
        Self::with_limit(store, metrics, DEFAULT_LIMIT)
    }

    /// Opens the dead letters of `store`, keeping at most `limit` (at least 1): reads every
    /// key and header once to rebuild the index.
    pub fn with_limit(store: Store, metrics: &Metrics, limit: usize) -> Result<Self, StoreError> {
        Self::with_limits(store, metrics, limit, u64::MAX)
    }

    /// Like [`DeadLetters::with_limit`], also keeping at most `max_bytes` bytes of stored
    /// letters (`store.max_dead_letter_bytes`).
    pub fn with_limits(
        store: Store,
        metrics: &Metrics,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Self, StoreError> {
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|(_, w)| w.strong_count() > 0);
        let path = store.path().to_path_buf();
        if let Some(inner) = open.iter().find(|(p, _)| *p == path).and_then(|(_, w)| w.upgrade()) {
            return Ok(DeadLetters { inner });
        }
        let this = Self::open(store, metrics, limit, max_bytes)?;
        open.push((path, Arc::downgrade(&this.inner)));
        Ok(this)
    }

    fn open(
        store: Store,
        metrics: &Metrics,
        limit: usize,
        max_bytes: u64,
    ) -> Result<Self, StoreError> {
        let mut index = Index { next_id: 1, ..Index::default() };
        {
            let read = store.read()?;
            let meta = read.open_table(Table::Meta.def()).map_err(io_err)?;
            if let Some(v) = meta.get(NEXT_ID_KEY).map_err(io_err)? {
                index.next_id = id_of(v.value()).unwrap_or(1).max(1);
            }
            let table = read.open_table(Table::DeadLetters.def()).map_err(io_err)?;
            for entry in table.iter().map_err(io_err)? {
                let (k, v) = entry.map_err(io_err)?;
                let Some(id) = id_of(k.value()) else {
                    warn!(key = ?k.value(), "dead letters: a key that is not an id; ignored");
                    continue;
                };
                let key = Header::decode(v.value()).ok().and_then(|(h, _)| h.dedup);
                let size = v.value().len() as u64;
                index.ids.insert(id, (key, size));
                index.bytes += size;
                if let Some(key) = key {
                    index.dedup.insert(key, id);
                }
                index.next_id = index.next_id.max(id.saturating_add(1));
            }
        }
        let reason = |r: &str| {
            let labels = ReasonLabels { reason: r.to_owned() };
            metrics.messages_dropped.get_or_create(&labels).clone()
        };
        let inner = Inner {
            store,
            gauge: metrics.dead_letters.clone(),
            recorded: metrics.dead_lettered.clone(),
            evicted: reason(DROPPED_FULL),
            busy: reason(DROPPED_BUSY),
            limit: limit.max(1),
            max_bytes: max_bytes.max(1),
            index: Mutex::new(index),
        };
        let this = DeadLetters { inner: Arc::new(inner) };
        this.sync_gauge(&this.index());
        debug!(count = this.count(), "dead letters opened");
        Ok(this)
    }

    /// Puts `letter` into `batch` (for a caller that moves a message out of another table in
    /// the same atomic commit, e.g. the spool) and returns its id. The letter counts as kept
    /// from now on: commit the batch. A duplicate (same message identity, same target) of a
    /// letter already kept adds nothing and returns that letter's id.
    pub fn add_to(&self, batch: &mut WriteBatch, letter: &DeadLetter) -> Result<u64, StoreError> {
        let value = encode(letter)?;
        let (id, _) = self.put(batch, value, dedup_key(&letter.message, &letter.target));
        self.count_recorded(&letter.rule, &letter.target);
        Ok(id)
    }

    /// Keeps `letter` durably: returns its id once it is on disk.
    pub async fn add(&self, letter: DeadLetter) -> Result<u64, StoreError> {
        let mut batch = WriteBatch::new();
        let id = self.add_to(&mut batch, &letter)?;
        if !batch.is_empty() {
            self.inner.store.commit(batch).await?;
        }
        Ok(id)
    }

    /// Records `msg` as failed for good at target `target` of rule `rule`, without waiting:
    /// for a sink's loop, which must not await the disk. The write goes to the store's writer
    /// and is committed with the next group; nobody waits for it. Dropped (counted in
    /// `messages_dropped{reason="dead_letters_busy"}`) when the writer's queue is full.
    pub fn record(&self, rule: &str, target: &str, reason: &str, msg: &Message) {
        let value = match encode_parts(now_ms(), rule, target, reason, msg) {
            Ok(v) => v,
            Err(e) => {
                warn!(%rule, %target, error = %e, "dead letter cannot be encoded; not kept");
                return;
            }
        };
        let mut batch = WriteBatch::new();
        let (id, new) = self.put(&mut batch, value, dedup_key(msg, target));
        if !new {
            debug!(id, %rule, %target, "message already kept as a dead letter");
            return;
        }
        match self.inner.store.try_commit(batch) {
            Ok(()) => {
                self.count_recorded(rule, target);
                debug!(id, %rule, %target, %reason, "dead letter recorded");
            }
            Err(e) => {
                let mut index = self.index();
                index.remove(id);
                self.sync_gauge(&index);
                drop(index);
                self.inner.busy.inc();
                warn!(%rule, %target, topic = %crate::logtext::LogText(&msg.topic), error = %e, "dead letter not kept");
            }
        }
    }

    /// Up to `limit` letters with ids above `after` (from the first without), in id order.
    pub fn list(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, DeadLetter)>, StoreError> {
        let from = after.map_or(0, |a| a.saturating_add(1));
        let read = self.inner.store.read()?;
        let table = read.open_table(Table::DeadLetters.def()).map_err(io_err)?;
        let mut out = Vec::new();
        if after == Some(u64::MAX) {
            return Ok(out);
        }
        for entry in table.range(&from.to_be_bytes()[..]..).map_err(io_err)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = entry.map_err(io_err)?;
            let Some(id) = id_of(k.value()) else { continue };
            out.push((id, decode(v.value())?));
        }
        Ok(out)
    }

    /// The letter with id `id`, if kept.
    pub fn get(&self, id: u64) -> Result<Option<DeadLetter>, StoreError> {
        let read = self.inner.store.read()?;
        let table = read.open_table(Table::DeadLetters.def()).map_err(io_err)?;
        match table.get(&id.to_be_bytes()[..]).map_err(io_err)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    /// Whether `id` is kept (from the index: no disk read).
    pub fn contains(&self, id: u64) -> bool {
        self.index().ids.contains_key(&id)
    }

    /// Removes the letters `ids` (a replayed one, or at an operator's request); returns how
    /// many of them were kept. Durable when it returns.
    pub async fn remove(&self, ids: &[u64]) -> Result<usize, StoreError> {
        let mut batch = WriteBatch::new();
        let removed = {
            let mut index = self.index();
            let mut n = 0;
            for &id in ids {
                if index.remove(id) {
                    batch.delete(Table::DeadLetters, id.to_be_bytes().to_vec());
                    n += 1;
                }
            }
            self.sync_gauge(&index);
            n
        };
        if !batch.is_empty() {
            self.inner.store.commit(batch).await?;
        }
        Ok(removed)
    }

    /// Keeps letter `id` with a new reason and time (a replay failed again). False when it is
    /// not kept (any more).
    pub async fn update_reason(&self, id: u64, reason: &str) -> Result<bool, StoreError> {
        let Some(mut letter) = self.get(id)? else { return Ok(false) };
        reason.clone_into(&mut letter.reason);
        letter.failed_at_ms = now_ms();
        let value = encode(&letter)?;
        {
            // The reason's length changes the size (by at most MAX_REASON bytes).
            let mut index = self.index();
            let Some(entry) = index.ids.get_mut(&id) else { return Ok(false) };
            let old = std::mem::replace(&mut entry.1, value.len() as u64);
            index.bytes = index.bytes.saturating_sub(old).saturating_add(value.len() as u64);
        }
        let mut batch = WriteBatch::new();
        batch.put(Table::DeadLetters, id.to_be_bytes().to_vec(), value);
        self.inner.store.commit(batch).await?;
        Ok(true)
    }

    /// Removes every letter; returns how many there were. Durable when it returns. Letters
    /// recorded while this runs get later ids and are kept.
    pub async fn purge(&self) -> Result<usize, StoreError> {
        let mut batch = WriteBatch::new();
        let n = {
            let mut index = self.index();
            let n = index.ids.len();
            batch.delete_range(
                Table::DeadLetters,
                0u64.to_be_bytes().to_vec(),
                index.next_id.to_be_bytes().to_vec(),
            );
            index.ids.clear();
            index.dedup.clear();
            index.bytes = 0;
            self.sync_gauge(&index);
            n
        };
        self.inner.store.commit(batch).await?;
        Ok(n)
    }

    /// The id of the newest letter kept.
    pub fn last_id(&self) -> Option<u64> {
        self.index().ids.last_key_value().map(|(id, _)| *id)
    }

    /// How many letters are kept.
    pub fn count(&self) -> usize {
        self.index().ids.len()
    }

    /// How many letters the table holds on disk (a check of the index; reads the table).
    pub fn count_on_disk(&self) -> Result<u64, StoreError> {
        let read = self.inner.store.read()?;
        let table = read.open_table(Table::DeadLetters.def()).map_err(io_err)?;
        table.len().map_err(io_err)
    }

    /// Allocates an id and puts `value` under it into `batch`, evicting the oldest letter when
    /// full; returns the id and whether it is new (false: a duplicate of the letter returned).
    fn put(&self, batch: &mut WriteBatch, value: Vec<u8>, dedup: Option<u128>) -> (u64, bool) {
        let mut index = self.index();
        if let Some(&id) = dedup.as_ref().and_then(|k| index.dedup.get(k)) {
            return (id, false);
        }
        let size = value.len() as u64;
        while index.ids.len() >= self.inner.limit
            || (!index.ids.is_empty() && index.bytes.saturating_add(size) > self.inner.max_bytes)
        {
            let Some((&oldest, _)) = index.ids.iter().next() else { break };
            index.remove(oldest);
            batch.delete(Table::DeadLetters, oldest.to_be_bytes().to_vec());
            self.inner.evicted.inc();
        }
        let id = index.next_id;
        index.next_id += 1;
        batch.put(Table::Meta, NEXT_ID_KEY.to_vec(), index.next_id.to_be_bytes().to_vec());
        index.ids.insert(id, (dedup, size));
        index.bytes += size;
        if let Some(key) = dedup {
            index.dedup.insert(key, id);
        }
        batch.put(Table::DeadLetters, id.to_be_bytes().to_vec(), value);
        self.sync_gauge(&index);
        (id, true)
    }

    fn count_recorded(&self, rule: &str, target: &str) {
        let labels = DeadLetterLabels { rule: rule.to_owned(), target: target.to_owned() };
        self.inner.recorded.get_or_create(&labels).inc();
    }

    fn sync_gauge(&self, index: &Index) {
        self.inner.gauge.set(i64::try_from(index.ids.len()).unwrap_or(i64::MAX));
    }

    /// The index, also after a panic elsewhere poisoned the lock (it holds no invariant a
    /// half-done update could break beyond a count).
    fn index(&self) -> MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a sink needs to keep a message that failed for good at one rule target: the dead
/// letters and the rule and target names. One per target, shared (`Arc`) by its requests, so
/// a request carries one pointer and recording needs no lookup.
#[derive(Debug)]
pub struct Recorder {
    /// Where the letter goes.
    dead_letters: DeadLetters,
    /// The rule's `name`.
    rule: String,
    /// The target's id (`rule/index`).
    target: String,
}

impl Recorder {
    /// The recorder of target `target` (its id) of rule `rule`.
    pub fn new(dead_letters: DeadLetters, rule: &str, target: &str) -> Recorder {
        Recorder { dead_letters, rule: rule.to_owned(), target: target.to_owned() }
    }

    /// Keeps `msg` as a dead letter with `reason`, without waiting (see [`DeadLetters::record`]).
    pub fn record(&self, msg: &Message, reason: &str) {
        self.dead_letters.record(&self.rule, &self.target, reason, msg);
    }

    /// The target's id.
    pub fn target(&self) -> &str {
        &self.target
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A redb error while reading or writing.
fn io_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// The id a key stands for.
fn id_of(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// The dedup key of `msg` at `target`: 128 bits of SHA-256 over its identity and the target;
/// `None` for a message without identity (QoS 0, wills).
fn dedup_key(msg: &Message, target: &str) -> Option<u128> {
    let identity = msg.identity()?;
    let mut h = Sha256::new();
    h.update(identity.as_bytes());
    h.update([0u8]);
    h.update(target.as_bytes());
    let digest = h.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    Some(u128::from_be_bytes(key))
}

/// What precedes the message in a stored value.
struct Header {
    failed_at_ms: u64,
    dedup: Option<u128>,
    rule: String,
    target: String,
    reason: String,
}

impl Header {
    /// The header of `bytes`, and the rest (the stored message).
    fn decode(bytes: &[u8]) -> Result<(Header, &[u8]), StoreError> {
        let bad = |what: &str| StoreError::Decode(format!("dead letter: {what}"));
        let mut b = bytes;
        if b.try_get_u8().ok() != Some(VERSION) {
            return Err(bad("unknown format version"));
        }
        let failed_at_ms = b.try_get_u64().map_err(|_| bad("time"))?;
        let dedup = match b.try_get_u8().map_err(|_| bad("dedup flag"))? {
            0 => None,
            1 => Some(b.try_get_u128().map_err(|_| bad("dedup key"))?),
            _ => return Err(bad("dedup flag")),
        };
        let rule = get_str(&mut b).ok_or_else(|| bad("rule"))?;
        let target = get_str(&mut b).ok_or_else(|| bad("target"))?;
        let reason = get_str(&mut b).ok_or_else(|| bad("reason"))?;
        Ok((Header { failed_at_ms, dedup, rule, target, reason }, b))
    }
}

/// The stored bytes of `letter` (format version 1): `1u8`, failed-at (u64 BE ms), dedup key
/// (`0u8`, or `1u8` + 16 bytes), rule, target, reason (each u16 BE length + UTF-8), then the
/// message from [`encode_message`].
pub fn encode(letter: &DeadLetter) -> Result<Vec<u8>, StoreError> {
    let DeadLetter { rule, target, reason, failed_at_ms, message } = letter;
    encode_parts(*failed_at_ms, rule, target, reason, message)
}

fn encode_parts(
    failed_at_ms: u64,
    rule: &str,
    target: &str,
    reason: &str,
    msg: &Message,
) -> Result<Vec<u8>, StoreError> {
    let message = encode_message(msg)?;
    let reason = cut(reason, MAX_REASON);
    let mut buf = Vec::with_capacity(32 + rule.len() + target.len() + reason.len() + message.len());
    buf.put_u8(VERSION);
    buf.put_u64(failed_at_ms);
    match dedup_key(msg, target) {
        Some(k) => {
            buf.put_u8(1);
            buf.put_u128(k);
        }
        None => buf.put_u8(0),
    }
    for s in [rule, target, reason] {
        let s = cut(s, usize::from(u16::MAX));
        buf.put_u16(s.len() as u16);
        buf.put_slice(s.as_bytes());
    }
    buf.extend_from_slice(&message);
    Ok(buf)
}

/// The letter stored as `bytes`.
pub fn decode(bytes: &[u8]) -> Result<DeadLetter, StoreError> {
    let (h, rest) = Header::decode(bytes)?;
    Ok(DeadLetter {
        rule: h.rule,
        target: h.target,
        reason: h.reason,
        failed_at_ms: h.failed_at_ms,
        message: decode_message(rest)?,
    })
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::{Properties, QoS};
    use bytes::Bytes;
    use std::time::{Duration, Instant};

    fn msg(packet_id: Option<u16>, payload: &'static [u8]) -> Message {
        Message {
            charge: Default::default(),
            topic: "a/b".into(),
            payload: Bytes::from_static(payload),
            qos: if packet_id.is_some() { QoS::AtLeastOnce } else { QoS::AtMostOnce },
            retain: false,
            client_id: Arc::from("dev-1"),
            username: None,
            properties: Properties {
                user_properties: vec![("k".into(), "v".into())],
                ..Properties::default()
            }
            .into(),
            received: Instant::now(),
            packet_id,
        }
    }

    fn letter(packet_id: Option<u16>, payload: &'static [u8], target: &str) -> DeadLetter {
        DeadLetter {
            rule: "r".into(),
            target: target.into(),
            reason: "nacked by broker".into(),
            failed_at_ms: now_ms(),
            message: msg(packet_id, payload),
        }
    }

    async fn reopen(dir: &std::path::Path) -> Store {
        for _ in 0..100 {
            match Store::open(dir) {
                Ok(s) => return s,
                Err(StoreError::Locked { .. }) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
        panic!("the store stayed locked");
    }

    #[tokio::test]
    async fn add_list_get_remove_purge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new();
        let dl = DeadLetters::new(Store::open(dir.path()).expect("open"), &metrics).expect("dl");
        let a = dl.add(letter(Some(1), b"one", "r/0")).await.expect("add");
        let b = dl.add(letter(Some(2), b"two", "r/0")).await.expect("add");
        let c = dl.add(letter(None, b"three", "r/1")).await.expect("add");
        assert!(a < b && b < c, "ids grow: {a} {b} {c}");
        assert_eq!(dl.count(), 3);
        assert_eq!(metrics.dead_letters.get(), 3);
        let all = dl.list(None, 10).expect("list");
        assert_eq!(all.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![a, b, c]);
        assert_eq!(all[1].1.message.payload, Bytes::from_static(b"two"));
        assert_eq!(all[2].1.target, "r/1");
        let page = dl.list(Some(a), 1).expect("list");
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].0, b);
        let got = dl.get(b).expect("get").expect("kept");
        assert_eq!(got.reason, "nacked by broker");
        assert_eq!(got.message.properties.user_properties, vec![("k".into(), "v".into())]);
        assert_eq!(got.message.identity(), msg(Some(2), b"two").identity());
        assert!(dl.get(c + 100).expect("get").is_none());

        assert!(dl.update_reason(b, "still unroutable").await.expect("update"));
        assert_eq!(dl.get(b).expect("get").expect("kept").reason, "still unroutable");
        assert_eq!(dl.remove(&[b, b + 1000]).await.expect("remove"), 1);
        assert!(dl.get(b).expect("get").is_none());
        assert_eq!(dl.count(), 2);
        assert_eq!(dl.count_on_disk().expect("len"), 2);
        assert_eq!(dl.purge().await.expect("purge"), 2);
        assert_eq!(dl.count(), 0);
        assert_eq!(dl.count_on_disk().expect("len"), 0);
        assert_eq!(metrics.dead_letters.get(), 0);
        let labels = DeadLetterLabels { rule: "r".into(), target: "r/0".into() };
        assert_eq!(metrics.dead_lettered.get_or_create(&labels).get(), 2);
    }

    #[tokio::test]
    async fn opening_twice_shares_one_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let metrics = Metrics::new();
        let a = DeadLetters::new(store.clone(), &metrics).expect("dl");
        let b = DeadLetters::new(store, &metrics).expect("dl");
        let x = a.add(letter(Some(1), b"1", "r/0")).await.expect("add");
        let y = b.add(letter(Some(2), b"2", "r/0")).await.expect("add");
        assert_ne!(x, y, "two handles gave out the same id");
        assert_eq!((a.count(), b.count()), (2, 2));
    }

    #[tokio::test]
    async fn ids_keep_growing_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let last = {
            let dl = DeadLetters::new(Store::open(dir.path()).expect("open"), &Metrics::new())
                .expect("dl");
            dl.add(letter(Some(1), b"x", "r/0")).await.expect("add");
            let last = dl.add(letter(Some(2), b"y", "r/0")).await.expect("add");
            // The newest is removed: its id must not come back either.
            dl.remove(&[last]).await.expect("remove");
            last
        };
        let metrics = Metrics::new();
        let dl = DeadLetters::new(reopen(dir.path()).await, &metrics).expect("dl");
        assert_eq!(dl.count(), 1);
        assert_eq!(metrics.dead_letters.get(), 1);
        let next = dl.add(letter(Some(3), b"z", "r/0")).await.expect("add");
        assert!(next > last, "next {next} after {last}: an id was reused");
        // The kept one is still a duplicate after the restart.
        let again = dl.add(letter(Some(1), b"x", "r/0")).await.expect("add");
        assert_eq!(dl.count(), 2);
        assert!(again < next);
    }

    #[tokio::test]
    async fn a_resent_message_is_kept_once_per_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dl =
            DeadLetters::new(Store::open(dir.path()).expect("open"), &Metrics::new()).expect("dl");
        let first = dl.add(letter(Some(7), b"p", "r/0")).await.expect("add");
        let resend = dl.add(letter(Some(7), b"p", "r/0")).await.expect("add");
        assert_eq!(first, resend);
        let other_target = dl.add(letter(Some(7), b"p", "r/1")).await.expect("add");
        assert_ne!(first, other_target);
        // QoS 0 messages have no identity: each is kept.
        dl.add(letter(None, b"q", "r/0")).await.expect("add");
        dl.add(letter(None, b"q", "r/0")).await.expect("add");
        assert_eq!(dl.count(), 4);
        // Once removed (replayed), the same message failing again is kept again.
        dl.remove(&[first]).await.expect("remove");
        let later = dl.add(letter(Some(7), b"p", "r/0")).await.expect("add");
        assert!(later > first);
        assert_eq!(dl.count(), 4);
    }

    #[tokio::test]
    async fn record_without_waiting_is_committed_with_the_next_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let dl = DeadLetters::new(store.clone(), &Metrics::new()).expect("dl");
        let m = msg(Some(9), b"late");
        dl.record("r", "r/0", "unroutable", &m);
        dl.record("r", "r/0", "unroutable", &m);
        assert_eq!(dl.count(), 1);
        // An empty commit waits for every batch queued before it.
        store.commit(WriteBatch::new()).await.expect("flush");
        let all = dl.list(None, 10).expect("list");
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.reason, "unroutable");
        assert_eq!(all[0].1.message.payload, Bytes::from_static(b"late"));
    }

    #[tokio::test]
    async fn the_oldest_is_evicted_beyond_the_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new();
        let dl = DeadLetters::with_limit(Store::open(dir.path()).expect("open"), &metrics, 2)
            .expect("dl");
        let a = dl.add(letter(Some(1), b"1", "r/0")).await.expect("add");
        let b = dl.add(letter(Some(2), b"2", "r/0")).await.expect("add");
        let c = dl.add(letter(Some(3), b"3", "r/0")).await.expect("add");
        let ids: Vec<u64> = dl.list(None, 10).expect("list").into_iter().map(|e| e.0).collect();
        assert_eq!(ids, vec![b, c]);
        assert!(dl.get(a).expect("get").is_none());
        let labels = ReasonLabels { reason: DROPPED_FULL.into() };
        assert_eq!(metrics.messages_dropped.get_or_create(&labels).get(), 1);
    }

    #[tokio::test]
    async fn the_oldest_are_evicted_beyond_the_byte_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics = Metrics::new();
        let one = encode(&letter(Some(1), &[b'x'; 1000], "r/0")).expect("encode").len() as u64;
        // Room for two letters of ~1 KB, not three.
        let dl = DeadLetters::with_limits(
            Store::open(dir.path()).expect("open"),
            &metrics,
            100,
            2 * one + one / 2,
        )
        .expect("dl");
        let mut ids = Vec::new();
        for i in 1..=4u16 {
            ids.push(dl.add(letter(Some(i), &[b'x'; 1000], "r/0")).await.expect("add"));
        }
        let kept: Vec<u64> = dl.list(None, 10).expect("list").into_iter().map(|e| e.0).collect();
        assert_eq!(kept, ids[2..]);
        let labels = ReasonLabels { reason: DROPPED_FULL.into() };
        assert_eq!(metrics.messages_dropped.get_or_create(&labels).get(), 2);
        // After a restart the sizes are read back: the bound still holds.
        drop(dl);
        let metrics = Metrics::new();
        let dl =
            DeadLetters::with_limits(reopen(dir.path()).await, &metrics, 100, 2 * one + one / 2)
                .expect("dl");
        dl.add(letter(Some(9), &[b'x'; 1000], "r/0")).await.expect("add");
        assert_eq!(dl.count(), 2);
        assert_eq!(metrics.messages_dropped.get_or_create(&labels).get(), 1);
    }

    #[test]
    fn a_long_reason_is_cut_and_garbage_is_an_error() {
        let mut l = letter(Some(1), b"x", "r/0");
        l.reason = "é".repeat(5000);
        let bytes = encode(&l).expect("encode");
        let back = decode(&bytes).expect("decode");
        assert!(back.reason.len() <= MAX_REASON && back.reason.starts_with('é'));
        for n in 0..bytes.len() {
            let _ = decode(&bytes[..n]);
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(&[9, 9, 9]).is_err());
    }
}
