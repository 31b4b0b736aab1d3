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
}

impl RetainedStore {
    /// An empty store holding at most `max` topics.
    pub fn new(max: usize) -> Self {
        RetainedStore { by_topic: RwLock::new(HashMap::new()), max }
    }

    /// Stores `msg` as its topic's value, or clears the topic if the payload is empty.
    pub fn set(&self, msg: &Message) -> Retained {
        let mut map = self.by_topic.write().unwrap_or_else(|p| p.into_inner());
        if msg.payload.is_empty() {
            return match map.remove(&msg.topic) {
                Some(_) => Retained::Cleared,
                None => Retained::Unchanged,
            };
        }
        if map.len() >= self.max && !map.contains_key(&msg.topic) {
            return Retained::Full;
        }
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
