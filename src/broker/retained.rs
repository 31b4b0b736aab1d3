//! Retained messages: the last value of each topic, sent to new subscribers.
//!
//! In memory, bounded by `mqtt.max_retained`; with a store, the broker also writes each change
//! to it (`persist.rs`) and loads them back at start (`restore.rs`). No I/O, and the lock is
//! held for one map operation or one scan, never across an `.await`.

use std::collections::HashMap;
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

    /// Number of topics with a retained message.
    pub fn len(&self) -> usize {
        self.by_topic.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when no topic has a retained message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
