//! Retained messages: the last value of each topic, sent to new subscribers.
//!
//! In memory, bounded by `mqtt.max_retained` (topics), `mqtt.max_retained_bytes` (topics and
//! payloads) and `mqtt.max_retained_per_client` (topics one client id owns: a topic belongs to
//! the client that last set its value, the `client_id` of the message kept); with a store, the broker also writes each change
//! to it (`persist.rs`) and loads them back at start (`restore.rs`). No I/O, and the lock is
//! held for one map operation or one bounded scan, never across an `.await`. Topics are kept
//! sorted, so a filter is looked up by its literal prefix (the levels before its first
//! wildcard) rather than by a scan of every topic, and a subscriber's lookup stops once it has
//! as many messages as its queue has room for.

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
    /// Messages by topic, and how many topics each client id owns.
    by_topic: RwLock<Topics>,
    /// Most topics held.
    max: usize,
    /// Most bytes (topics and payloads) held (`mqtt.max_retained_bytes`).
    max_bytes: usize,
    /// Bytes held now (changed under the write lock).
    bytes: std::sync::atomic::AtomicUsize,
    /// Most topics one client id owns (`mqtt.max_retained_per_client`).
    max_per_client: usize,
}

/// Why a retained message would not be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// `mqtt.max_retained_bytes`.
    Bytes,
    /// `mqtt.max_retained_per_client`.
    PerClient,
}

impl NoRoom {
    /// The `messages_dropped` reason label.
    pub fn reason(self) -> &'static str {
        match self {
            NoRoom::Bytes => "retained_bytes_full",
            NoRoom::PerClient => "retained_per_client_full",
        }
    }
}

/// The retained messages and their owners' counts, under one lock.
#[derive(Debug, Default)]
struct Topics {
    /// Messages by topic, sorted (lookups by a filter's literal prefix); a topic's owner is
    /// its message's `client_id`.
    map: std::collections::BTreeMap<String, Arc<Message>>,
    /// Topics owned, by client id (no entry for none).
    owned: HashMap<Arc<str>, usize>,
}

impl Topics {
    fn own(&mut self, client: &Arc<str>) {
        *self.owned.entry(Arc::clone(client)).or_default() += 1;
    }

    fn disown(&mut self, client: &Arc<str>) {
        if let Some(n) = self.owned.get_mut(client) {
            *n -= 1;
            if *n == 0 {
                self.owned.remove(client);
            }
        }
    }

    /// Whether `client` may own one more topic, `topic` (which it may own already).
    fn share_left(&self, client: &str, topic: &str, max: usize) -> bool {
        max == usize::MAX
            || self.map.get(topic).is_some_and(|m| &*m.client_id == client)
            || self.owned.get(client).copied().unwrap_or(0) < max
    }
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
        RetainedStore::with_limits(max, max_bytes, usize::MAX)
    }

    /// An empty store holding at most `max` topics, `max_bytes` bytes and `max_per_client`
    /// topics owned by one client id (0: no limit).
    pub fn with_limits(max: usize, max_bytes: usize, max_per_client: usize) -> Self {
        RetainedStore {
            by_topic: RwLock::new(Topics::default()),
            max,
            max_bytes,
            bytes: std::sync::atomic::AtomicUsize::new(0),
            max_per_client: if max_per_client == 0 { usize::MAX } else { max_per_client },
        }
    }

    /// Whether a retained message of `payload_len` bytes on `topic` would fit the byte
    /// budget now (replacing the topic's current one).
    pub fn has_room(&self, topic: &str, payload_len: usize) -> bool {
        self.room_for(None, topic, payload_len).is_ok()
    }

    /// Whether a retained message of `payload_len` bytes on `topic` from `client` (when
    /// known) would be kept now: the byte budget and the client's share of topics.
    pub fn room_for(
        &self,
        client: Option<&str>,
        topic: &str,
        payload_len: usize,
    ) -> Result<(), NoRoom> {
        use std::sync::atomic::Ordering;
        if payload_len == 0 || (self.max_bytes == usize::MAX && self.max_per_client == usize::MAX) {
            return Ok(());
        }
        let topics = self.by_topic.read().unwrap_or_else(|p| p.into_inner());
        let old = topics.map.get(topic).map_or(0, |m| size(&m.topic, m.payload.len()));
        if self.bytes.load(Ordering::Relaxed) - old + size(topic, payload_len) > self.max_bytes {
            return Err(NoRoom::Bytes);
        }
        match client {
            Some(c) if !topics.share_left(c, topic, self.max_per_client) => Err(NoRoom::PerClient),
            _ => Ok(()),
        }
    }

    /// Stores `msg` as its topic's value, or clears the topic if the payload is empty.
    pub fn set(&self, msg: &Message) -> Retained {
        let mut topics = self.by_topic.write().unwrap_or_else(|p| p.into_inner());
        use std::sync::atomic::Ordering;
        if msg.payload.is_empty() {
            return match topics.map.remove(&msg.topic) {
                Some(old) => {
                    self.bytes.fetch_sub(size(&old.topic, old.payload.len()), Ordering::Relaxed);
                    topics.disown(&old.client_id);
                    Retained::Cleared
                }
                None => Retained::Unchanged,
            };
        }
        if topics.map.len() >= self.max && !topics.map.contains_key(&msg.topic) {
            return Retained::Full;
        }
        if !topics.share_left(&msg.client_id, &msg.topic, self.max_per_client) {
            return Retained::Full;
        }
        let old = topics.map.get(&msg.topic).map_or(0, |m| size(&m.topic, m.payload.len()));
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
        if let Some(previous) = topics.map.insert(msg.topic.clone(), Arc::new(kept)) {
            topics.disown(&previous.client_id);
        }
        topics.own(&msg.client_id);
        Retained::Stored
    }

    /// The retained messages whose topics match `filter`.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let topics = self.by_topic.read().unwrap_or_else(|p| p.into_inner());
        topics
            .map
            .values()
            .filter(|m| crate::mqtt::topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }

    /// At most `limit` retained messages whose topics match `filter`: a filter without
    /// wildcards is one lookup; one with wildcards scans only the topics that start with its
    /// literal prefix, and stops at `limit` matches. The lock is held for that walk only.
    pub fn matching_at_most(&self, filter: &str, limit: usize) -> Vec<Arc<Message>> {
        if limit == 0 {
            return Vec::new();
        }
        let topics = self.by_topic.read().unwrap_or_else(|p| p.into_inner());
        let map = &topics.map;
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

    /// One step of a subscriber's walk over the retained messages matching `filter` (see
    /// `mqtt::session::retained`): the matches among at most `max_looked` topics from `from`
    /// (from the filter's literal prefix when `Unbounded`), no more than `max_matches` of
    /// them, and the last topic looked at when more may follow (`None`: the walk is done;
    /// the next step starts after it).
    /// The read lock is held for those `max_looked` topics only, however few of them match,
    /// so a filter that covers many topics but matches few is walked in bounded steps.
    pub fn walk(
        &self,
        filter: &str,
        from: std::ops::Bound<&str>,
        max_matches: usize,
        max_looked: usize,
    ) -> (Vec<Arc<Message>>, Option<String>) {
        // At least one of each: a step always moves on.
        let (max_matches, max_looked) = (max_matches.max(1), max_looked.max(1));
        let topics = self.by_topic.read().unwrap_or_else(|p| p.into_inner());
        if !filter.contains(['+', '#']) {
            let found = match from {
                std::ops::Bound::Unbounded => topics.map.get(filter).cloned(),
                _ => None,
            };
            return (found.into_iter().collect(), None);
        }
        let prefix = literal_prefix(filter);
        let start = match from {
            std::ops::Bound::Unbounded => std::ops::Bound::Included(prefix),
            bound => bound,
        };
        let mut found = Vec::new();
        let mut last: Option<&str> = None;
        let range = topics.map.range::<str, _>((start, std::ops::Bound::Unbounded));
        for (looked, (topic, m)) in range.enumerate() {
            if !topic.starts_with(prefix) {
                return (found, None);
            }
            if looked == max_looked || found.len() == max_matches {
                // More may follow: resume after the last topic looked at.
                return (found, last.map(str::to_owned));
            }
            last = Some(topic);
            if crate::mqtt::topic::matches(filter, topic) {
                found.push(Arc::clone(m));
            }
        }
        (found, None)
    }

    /// The admin API's page: at most `limit` retained messages whose topics match `filter`
    /// and sort after `after`, in topic order; and whether more follow. One bounded scan
    /// under the read lock (the topics from the filter's literal prefix on).
    pub fn page(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Arc<Message>>, bool) {
        let topics = self.by_topic.read().unwrap_or_else(|p| p.into_inner());
        let prefix = literal_prefix(filter);
        let start = match after {
            Some(a) if a >= prefix => std::ops::Bound::Excluded(a),
            _ => std::ops::Bound::Included(prefix),
        };
        let mut page: Vec<Arc<Message>> = topics
            .map
            .range::<str, _>((start, std::ops::Bound::Unbounded))
            .take_while(|(topic, _)| topic.starts_with(prefix))
            .filter(|(topic, _)| crate::mqtt::topic::matches(filter, topic))
            .take(limit.saturating_add(1))
            .map(|(_, m)| Arc::clone(m))
            .collect();
        let more = page.len() > limit;
        page.truncate(limit);
        (page, more)
    }

    /// Whether `topic` has a retained message.
    pub fn contains(&self, topic: &str) -> bool {
        self.by_topic.read().unwrap_or_else(|p| p.into_inner()).map.contains_key(topic)
    }

    /// Number of topics with a retained message.
    pub fn len(&self) -> usize {
        self.by_topic.read().unwrap_or_else(|p| p.into_inner()).map.len()
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
    use crate::mqtt::codec::QoS;

    fn msg(client: &str, topic: &str, payload: &'static [u8]) -> Message {
        Message {
            charge: Default::default(),
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            qos: QoS::AtMostOnce,
            retain: true,
            client_id: Arc::from(client),
            username: None,
            properties: crate::mqtt::codec::Properties::default().into(),
            received: std::time::Instant::now(),
            packet_id: None,
        }
    }

    #[test]
    fn a_client_owns_the_topics_it_set_last() {
        let r = RetainedStore::with_limits(100, usize::MAX, 2);
        assert_eq!(r.set(&msg("a", "t/1", b"x")), Retained::Stored);
        assert_eq!(r.set(&msg("a", "t/2", b"x")), Retained::Stored);
        assert_eq!(r.room_for(Some("a"), "t/3", 1), Err(NoRoom::PerClient));
        assert_eq!(r.set(&msg("a", "t/3", b"x")), Retained::Full);
        // Its own topics can be replaced; others still have their share.
        assert_eq!(r.room_for(Some("a"), "t/1", 1), Ok(()));
        assert_eq!(r.set(&msg("a", "t/1", b"y")), Retained::Stored);
        // b takes t/1 over: a owns one topic now, b one.
        assert_eq!(r.set(&msg("b", "t/1", b"z")), Retained::Stored);
        assert_eq!(r.set(&msg("a", "t/3", b"x")), Retained::Stored);
        // Clearing gives the share back.
        assert_eq!(r.set(&msg("a", "t/3", b"")), Retained::Cleared);
        assert_eq!(r.room_for(Some("a"), "t/4", 1), Ok(()));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_walk_in_small_steps_finds_what_a_full_scan_finds() {
        use std::ops::Bound;
        let r = RetainedStore::new(10_000);
        for i in 0..300 {
            r.set(&msg("a", &format!("w/{}/x", i % 17), b"v"));
            r.set(&msg("a", &format!("w/{i}/y"), b"v"));
            r.set(&msg("a", &format!("wz/{i}"), b"v"));
        }
        r.set(&msg("a", "$SYS/w", b"v"));
        r.set(&msg("a", "w", b"v"));
        for filter in ["#", "w/#", "w/+/x", "w/+/nomatch", "+/1", "w", "w/3/y", "nothing/#"] {
            let mut all: Vec<String> =
                r.matching(filter).iter().map(|m| m.topic.to_string()).collect();
            all.sort();
            for (matches, looked) in [(1, 1), (3, 7), (1000, 5), (5, 1000)] {
                let mut got = Vec::new();
                let mut after: Option<String> = None;
                let mut steps = 0;
                loop {
                    let from = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
                    let (found, next) = r.walk(filter, from, matches, looked);
                    assert!(found.len() <= matches);
                    got.extend(found.iter().map(|m| m.topic.to_string()));
                    steps += 1;
                    assert!(steps < 2_000, "{filter}: the walk does not end");
                    match next {
                        Some(n) => after = Some(n),
                        None => break,
                    }
                }
                assert_eq!(got, all, "{filter} in steps of {matches}/{looked}");
            }
        }
        // A filter matching few of many topics under its prefix takes bounded steps.
        let (found, next) = r.walk("w/+/nomatch", Bound::Unbounded, 10, 50);
        assert!(found.is_empty());
        assert!(next.is_some(), "stopped after 50 topics looked at");
    }

    #[test]
    fn lookup_by_filter_matches_a_full_scan_and_stops_at_the_limit() {
        let store = RetainedStore::new(100_000);
        for t in ["a", "a/b", "a/b/c", "a/bc", "a/b/c/d", "b/x", "$SYS/up", "ab/c"] {
            store.set(&msg("c", t, b"v"));
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
            store.set(&msg("c", &format!("other/{i}"), b"v"));
        }
        store.set(&msg("c", "mine/1", b"v"));
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
