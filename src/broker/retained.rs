//! Retained messages: the last value of each topic, sent to new subscribers.
//!
//! In memory, bounded by `mqtt.max_retained`; with a store, the broker also writes each change
//! to it (`persist.rs`) and loads them back at start (`restore.rs`). No I/O, and the lock is
//! held for one map operation or one bounded scan, never across an `.await`. Topics are kept
//! sorted, so a filter is looked up by its literal prefix (the levels before its first
//! wildcard) rather than by a scan of every topic, and a subscriber's lookup stops once it has
//! as many messages as its queue has room for.

use std::collections::BTreeMap as HashMap;
use std::sync::{Arc, RwLock};

use crate::message::Message;

/// What `set` did with a retained publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retained {
    /// Stored as the topic's value (or replaced the previous one).
    Stored,
    /// An empty payload cleared the topic.
    Cleared,
    /// An empty payload for a topic without a retained message: nothing changed.
    Unchanged,
    /// Not kept: the store is full and the topic is new. The message is still delivered live.
    Full,
}

/// The retained message of each topic.
#[derive(Debug)]
pub struct RetainedStore {
    /// Messages by topic.
    by_topic: RwLock<HashMap<String, Arc<Message>>>,
    /// Most topics held.
    max: usize,
    /// Most bytes (topics and payloads) held (`mqtt.max_retained_bytes`).
    max_bytes: usize,
    /// Bytes held now (changed under the write lock).
    bytes: std::sync::atomic::AtomicUsize,
}

/// What a retained message counts against `max_retained_bytes`.
fn size(topic: &str, payload_len: usize) -> usize {
    topic.len() + payload_len
}

impl RetainedStore {
    /// An empty store holding at most `max` topics.
    pub fn new(max: usize) -> Self {
        RetainedStore::with_bytes(max, usize::MAX)
    }

    /// An empty store holding at most `max` topics and `max_bytes` bytes.
    pub fn with_bytes(max: usize, max_bytes: usize) -> Self {
        RetainedStore {
            by_topic: RwLock::new(HashMap::new()),
            max,
            max_bytes,
            bytes: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Whether a retained message of `payload_len` bytes on `topic` would fit the byte
    /// budget now (replacing the topic's current one).
    pub fn has_room(&self, topic: &str, payload_len: usize) -> bool {
        use std::sync::atomic::Ordering;
        if payload_len == 0 || self.max_bytes == usize::MAX {
            return true;
        }
        let map = self.by_topic.read().unwrap_or_else(|p| p.into_inner());
        let old = map.get(topic).map_or(0, |m| size(&m.topic, m.payload.len()));
        self.bytes.load(Ordering::Relaxed) - old + size(topic, payload_len) <= self.max_bytes
    }

    /// Stores `msg` as its topic's value, or clears the topic if the payload is empty.
    pub fn set(&self, msg: &Message) -> Retained {
        let mut map = self.by_topic.write().unwrap_or_else(|p| p.into_inner());
        use std::sync::atomic::Ordering;
        if msg.payload.is_empty() {
            return match map.remove(&msg.topic) {
                Some(old) => {
                    self.bytes.fetch_sub(size(&old.topic, old.payload.len()), Ordering::Relaxed);
                    Retained::Cleared
                }
                None => Retained::Unchanged,
            };
        }
        if map.len() >= self.max && !map.contains_key(&msg.topic) {
            return Retained::Full;
        }
        let old = map.get(&msg.topic).map_or(0, |m| size(&m.topic, m.payload.len()));
        let new = size(&msg.topic, msg.payload.len());
        if self.bytes.load(Ordering::Relaxed) - old + new > self.max_bytes {
            return Retained::Full;
        }
        self.bytes.fetch_add(new, Ordering::Relaxed);
        self.bytes.fetch_sub(old, Ordering::Relaxed);
        // The payload is a slice of the connection's read buffer; copy it so a small retained
        // value does not keep a whole buffer alive.
        let mut kept = msg.clone();
        kept.payload = bytes::Bytes::copy_from_slice(&msg.payload);
        map.insert(msg.topic.clone(), Arc::new(kept));
        Retained::Stored
    }

    /// The retained messages whose topics match `filter`.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let map = self.by_topic.read().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|m| crate::mqtt::topic::matches(filter, &m.topic)).cloned().collect()
    }

    /// At most `limit` retained messages whose topics match `filter`: a filter without
    /// wildcards is one lookup; one with wildcards scans only the topics that start with its
    /// literal prefix, and stops at `limit` matches. The lock is held for that walk only.
    pub fn matching_at_most(&self, filter: &str, limit: usize) -> Vec<Arc<Message>> {
        if limit == 0 {
            return Vec::new();
        }
        let map = self.by_topic.read().unwrap_or_else(|p| p.into_inner());
        if !filter.contains(['+', '#']) {
            return map.get(filter).cloned().into_iter().collect();
        }
        let prefix = literal_prefix(filter);
        map.range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(topic, _)| topic.starts_with(prefix))
            .filter(|(topic, _)| crate::mqtt::topic::matches(filter, topic))
            .take(limit)
            .map(|(_, m)| Arc::clone(m))
            .collect()
    }

    /// Number of topics with a retained message.
    pub fn len(&self) -> usize {
        self.by_topic.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no topic has a retained message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The levels of a wildcard `filter` before its first wildcard, without the separator that
/// ends them ("a/b" for "a/b/+/c" and "a/b/#", "" for "#"): every topic it matches starts so.
fn literal_prefix(filter: &str) -> &str {
    let first = filter.find(['+', '#']).unwrap_or(filter.len());
    filter[..first].strip_suffix('/').unwrap_or(&filter[..first])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str) -> Message {
        Message {
            topic: topic.to_string(),
            payload: bytes::Bytes::from_static(b"v"),
            qos: crate::mqtt::codec::QoS::AtMostOnce,
            retain: true,
            client_id: "c".into(),
            username: None,
            properties: Default::default(),
            received: std::time::Instant::now(),
            packet_id: None,
        }
    }

    #[test]
    fn lookup_by_filter_matches_a_full_scan_and_stops_at_the_limit() {
        let store = RetainedStore::new(100_000);
        for t in ["a", "a/b", "a/b/c", "a/bc", "a/b/c/d", "b/x", "$SYS/up", "ab/c"] {
            store.set(&msg(t));
        }
        for filter in ["#", "a/#", "a/b/#", "a/+", "+/c", "a/b/+/d", "+", "a/b", "$SYS/#", "x/#"] {
            let mut want: Vec<String> =
                store.matching(filter).iter().map(|m| m.topic.clone()).collect();
            let mut got: Vec<String> = store
                .matching_at_most(filter, usize::MAX)
                .iter()
                .map(|m| m.topic.clone())
                .collect();
            want.sort();
            got.sort();
            assert_eq!(got, want, "{filter}");
        }
        assert_eq!(store.matching_at_most("#", 2).len(), 2);
        assert!(store.matching_at_most("#", 0).is_empty());
    }

    #[test]
    fn a_narrow_filter_does_not_walk_every_topic() {
        let store = RetainedStore::new(1_000_000);
        for i in 0..200_000 {
            store.set(&msg(&format!("other/{i}")));
        }
        store.set(&msg("mine/1"));
        let start = std::time::Instant::now();
        for _ in 0..10_000 {
            assert_eq!(store.matching_at_most("mine/#", 100).len(), 1);
            assert_eq!(store.matching_at_most("#", 100).len(), 100);
        }
        // 20,000 lookups among 200,000 topics; a full scan each would take minutes.
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    }
}
