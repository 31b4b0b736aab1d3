//! What the broker keeps in the store: retained messages (`Table::Retained`), persistent
//! sessions (`Table::Sessions`) and the messages queued for or in flight to them
//! (`Table::SessionQueue`). Only present when the config has `store:`; without it the broker
//! holds no [`Persist`] and makes no call here.
//!
//! The broker's paths are synchronous (a PUBLISH is routed without an `.await`), so writes are
//! not committed where they are made: they are appended, in order, to a backlog under a std
//! mutex (held for a push), and one feeder task takes the whole backlog, commits it as one
//! batch (`Store::commit`, group-committed with everyone else's) and then tells whoever waits
//! ([`Persist::durable`]: a publisher's pending PUBACK, a held SUBACK; or a source delivery's
//! ticket). While one commit is on its way the next backlog builds up: many writes, one fsync.
//!
//! The backlog is bounded by what produces it: retained writes are coalesced per topic (the
//! newest value wins, at most one entry per topic, and topics are bounded by
//! `mqtt.max_retained`), a session queue write is made for a QoS 1/2 message whose publisher
//! waits for it (its inbound window bounds how many), and every delete follows an earlier put.
//!
//! Key layouts: retained: the topic; sessions: the client id; session queue: client id, `0x00`,
//! a sequence number (u64 BE, one counter for the gateway, carried on from the store at start),
//! so that a prefix range gives one session's messages in the order they were queued (MQTT
//! client ids have no U+0000).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{error, warn};

use super::sessions::{InFlightStage, Owner, SessionState};
use super::tracking::{Fate, Ticket};
use super::SubscribeOptions;
use crate::message::Message;
use crate::mqtt::codec::{ProtocolVersion, QoS};
use crate::store::{codec, Store, StoreError, Table, WriteBatch};
use crate::targets::{Failure, Outcome};

/// The broker's handle on the store: appends writes to the backlog the feeder commits.
#[derive(Debug, Clone)]
pub struct Persist {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// The open store.
    store: Store,
    /// Writes not yet handed to the store, and who waits for them.
    backlog: Mutex<Backlog>,
    /// Wakes the feeder when the backlog gets something (a permit is kept if it is busy).
    wake: Notify,
    /// Next sequence number of a session queue key.
    seq: AtomicU64,
    /// Set by [`Persist::close`]: the feeder ends once the backlog is empty.
    closed: AtomicBool,
}

/// Writes in the order they were made, plus the retained ones coalesced per topic.
#[derive(Debug, Default)]
struct Backlog {
    /// Retained writes by topic: the message to keep, or `None` to delete.
    retained: HashMap<String, Option<Arc<Message>>>,
    /// Session and session queue writes, in order (a delete always after its put).
    ops: WriteBatch,
    /// Told once everything appended before them is durable.
    waiters: Vec<Waiter>,
}

impl Backlog {
    fn is_empty(&self) -> bool {
        self.retained.is_empty() && self.ops.is_empty() && self.waiters.is_empty()
    }
}

/// Someone waiting for writes to be durable.
#[derive(Debug)]
enum Waiter {
    /// A pending acknowledgement (a publisher's PUBACK, a held SUBACK): told the outcome.
    Ack(oneshot::Sender<Outcome>),
    /// A source delivery queued in a persistent session: taken once durable.
    Ticket(Ticket),
}

impl Waiter {
    fn finish(self, result: &Result<(), StoreError>) {
        match (self, result) {
            (Waiter::Ack(tx), Ok(())) => {
                let _ = tx.send(Outcome::Delivered);
            }
            (Waiter::Ack(tx), Err(e)) => {
                let _ = tx.send(Outcome::Failed(Failure::retryable(format!("not stored: {e}"))));
            }
            (Waiter::Ticket(t), Ok(())) => t.finish(Fate::Taken),
            (Waiter::Ticket(t), Err(_)) => t.finish(Fate::Failed),
        }
    }
}

impl Persist {
    /// A handle on `store` and its feeder task (spawned here, on the current runtime); await
    /// the handle after [`Persist::close`] so that nothing appended is left behind.
    pub fn start(store: Store) -> (Persist, JoinHandle<()>) {
        let inner = Arc::new(Shared {
            store,
            backlog: Mutex::new(Backlog::default()),
            wake: Notify::new(),
            seq: AtomicU64::new(1),
            closed: AtomicBool::new(false),
        });
        let task = tokio::spawn(feed(Arc::clone(&inner)));
        (Persist { inner }, task)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Tells the feeder to end once it has committed what is appended (at shutdown, after
    /// the sessions are parked).
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.wake.notify_one();
    }

    /// Makes sure the next sequence number is above `seq` (what the store holds at start).
    pub fn sequence_after(&self, seq: u64) {
        self.inner.seq.fetch_max(seq.saturating_add(1), Ordering::Relaxed);
    }

    /// A fresh sequence number for a session queue key.
    pub fn next_seq(&self) -> u64 {
        self.inner.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn append(&self, f: impl FnOnce(&mut Backlog)) {
        {
            let mut backlog = self.inner.backlog.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut backlog);
        }
        self.inner.wake.notify_one();
    }

    /// Keeps `msg` as its topic's retained message (`None`: deletes the topic's).
    pub fn retained(&self, topic: &str, msg: Option<Arc<Message>>) {
        self.append(|b| {
            b.retained.insert(topic.to_owned(), msg);
        });
    }

    /// Stores one delivery of a persistent session (see [`delivery_value`]).
    pub fn put_delivery(&self, key: &SessionKey, seq: u64, value: Vec<u8>) {
        self.append(|b| b.ops.put(Table::SessionQueue, key.delivery(seq), value));
    }

    /// Forgets one delivery of a persistent session (acknowledged, dropped or expired).
    pub fn delete_delivery(&self, key: &SessionKey, seq: u64) {
        self.append(|b| b.ops.delete(Table::SessionQueue, key.delivery(seq)));
    }

    /// Stores the record of a persistent session (see [`SessionRecord`]).
    pub fn put_session(&self, key: &SessionKey, value: Vec<u8>) {
        self.append(|b| b.ops.put(Table::Sessions, key.client_id.as_bytes(), value));
    }

    /// Forgets a session: its record and every message stored for it.
    pub fn delete_session(&self, key: &SessionKey) {
        self.append(|b| {
            b.ops.delete(Table::Sessions, key.client_id.as_bytes());
            let (from, to) = key.range();
            b.ops.delete_range(Table::SessionQueue, from, to);
        });
    }

    /// Resolves once everything appended so far is durable (`Delivered`), or could not be
    /// written (`Failed`, retryable).
    pub fn durable(&self) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.append(|b| b.waiters.push(Waiter::Ack(tx)));
        rx
    }

    /// Finishes `ticket` as taken once everything appended so far is durable (as failed if
    /// it could not be written).
    pub fn finish_when_durable(&self, ticket: Ticket) {
        self.append(|b| b.waiters.push(Waiter::Ticket(ticket)));
    }
}

/// The feeder: commits the backlog, one batch at a time, until closed and empty.
async fn feed(shared: Arc<Shared>) {
    // A waiter appended after its writes were taken by the previous commit gets that
    // commit's result (never a success the store did not give).
    let mut last: Result<(), StoreError> = Ok(());
    loop {
        let taken = {
            let mut backlog = shared.backlog.lock().unwrap_or_else(|p| p.into_inner());
            if backlog.is_empty() {
                None
            } else {
                Some(std::mem::take(&mut *backlog))
            }
        };
        let Some(taken) = taken else {
            if shared.closed.load(Ordering::Acquire) {
                return;
            }
            shared.wake.notified().await;
            continue;
        };
        let Backlog { retained, mut ops, waiters } = taken;
        for (topic, msg) in retained {
            match msg.map(|m| codec::encode_message(&m)) {
                None => ops.delete(Table::Retained, topic.into_bytes()),
                Some(Ok(value)) => ops.put(Table::Retained, topic.into_bytes(), value),
                Some(Err(e)) => {
                    warn!(topic = %crate::logtext::LogText(&topic), error = %e, "retained message not stored")
                }
            }
        }
        if !ops.is_empty() {
            last = shared.store.commit(ops).await;
            if let Err(e) = &last {
                error!(error = %e, "broker state not stored");
            }
        }
        for w in waiters {
            w.finish(&last);
        }
    }
}

/// Where a persistent session's records live: its client id, and the prefix of its session
/// queue keys. Held by the session's `Subscriber` (`None` for sessions not stored).
#[derive(Debug)]
pub struct SessionKey {
    /// The client id: the key of its record.
    pub client_id: Arc<str>,
    /// Client id and `0x00`: the prefix of its session queue keys.
    prefix: Vec<u8>,
}

impl SessionKey {
    /// The key of the session of `client_id`.
    pub fn new(client_id: &Arc<str>) -> Self {
        let mut prefix = Vec::with_capacity(client_id.len() + 1);
        prefix.extend_from_slice(client_id.as_bytes());
        prefix.push(0);
        SessionKey { client_id: Arc::clone(client_id), prefix }
    }

    /// The session queue key of delivery `seq`.
    pub fn delivery(&self, seq: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + 8);
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    /// `[from, to)` covering every session queue key of this session.
    pub fn range(&self) -> (Vec<u8>, Vec<u8>) {
        let mut to = self.prefix.clone();
        if let Some(last) = to.last_mut() {
            *last = 1;
        }
        (self.prefix.clone(), to)
    }

    /// The sequence number of a session queue key of this session.
    pub fn seq_of(&self, key: &[u8]) -> Option<u64> {
        let rest = key.strip_prefix(self.prefix.as_slice())?;
        Some(u64::from_be_bytes(rest.try_into().ok()?))
    }
}

const DELIVERY_VERSION: u8 = 1;
const SESSION_VERSION: u8 = 1;

/// Where a stored delivery stands: queued, or sent with a packet id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStage {
    /// Not sent yet.
    Queued,
    /// Sent as `packet_id`, at this stage.
    Sent(u16, InFlightStage),
}

/// One stored delivery, decoded.
#[derive(Debug)]
pub struct StoredDelivery {
    /// QoS it is delivered at (1 or 2).
    pub qos: QoS,
    /// RETAIN flag it is delivered with.
    pub retain: bool,
    /// MQTT 5 subscription identifiers.
    pub subscription_ids: Vec<u32>,
    /// Queued or sent.
    pub stage: DeliveryStage,
    /// The message.
    pub msg: Message,
}

/// The stored value of one delivery: version, QoS, flags (1 retain, 2 sent, 4 released),
/// packet id (u16 BE), subscription identifiers (u8 count, u32 BE each), then the message
/// in the store's message encoding (`encoded`, made once for every session it goes to).
pub fn delivery_value(
    qos: QoS,
    retain: bool,
    subscription_ids: &[u32],
    stage: DeliveryStage,
    encoded: &[u8],
) -> Vec<u8> {
    let mut v = Vec::with_capacity(6 + 4 * subscription_ids.len() + encoded.len());
    v.put_u8(DELIVERY_VERSION);
    v.put_u8(qos as u8);
    let (flags, packet_id) = match stage {
        DeliveryStage::Queued => (0, 0),
        DeliveryStage::Sent(id, InFlightStage::Published) => (2, id),
        DeliveryStage::Sent(id, InFlightStage::Released) => (2 | 4, id),
    };
    v.put_u8(flags | u8::from(retain));
    v.put_u16(packet_id);
    let ids = &subscription_ids[..subscription_ids.len().min(255)];
    v.put_u8(ids.len() as u8);
    for id in ids {
        v.put_u32(*id);
    }
    v.extend_from_slice(encoded);
    v
}

/// A stored delivery's value, decoded.
pub fn decode_delivery(bytes: &[u8]) -> Result<StoredDelivery, StoreError> {
    let bad = |what: &str| StoreError::Decode(format!("stored delivery: {what}"));
    let mut b = bytes;
    if b.remaining() < 6 || b.get_u8() != DELIVERY_VERSION {
        return Err(bad("unknown format version"));
    }
    let qos = match b.get_u8() {
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return Err(bad("QoS")),
    };
    let flags = b.get_u8();
    let packet_id = b.get_u16();
    let n = usize::from(b.get_u8());
    if b.remaining() < 4 * n {
        return Err(bad("subscription identifiers"));
    }
    let subscription_ids = (0..n).map(|_| b.get_u32()).collect();
    let stage = match (flags & 2 != 0, flags & 4 != 0) {
        (false, _) => DeliveryStage::Queued,
        (true, false) => DeliveryStage::Sent(packet_id, InFlightStage::Published),
        (true, true) => DeliveryStage::Sent(packet_id, InFlightStage::Released),
    };
    if matches!(stage, DeliveryStage::Sent(0, _)) {
        return Err(bad("packet id 0"));
    }
    let msg = codec::decode_message(b)?;
    Ok(StoredDelivery { qos, retain: flags & 1 != 0, subscription_ids, stage, msg })
}

/// The stored record of a persistent session (`Table::Sessions`, version 1): version, MQTT
/// protocol level (4 or 5), session expiry interval (u32 BE, `u32::MAX` never), when its
/// connection ended (u64 BE, ms since the Unix epoch; 0 while connected), its subscriptions
/// (u16 count; each filter as u16 length + UTF-8, QoS, flags: 1 No Local, 2 Retain As
/// Published, 4 with a subscription identifier, then that identifier as u32 BE), and the
/// inbound QoS 2 packet ids awaiting PUBREL (u16 count, u16 each), then its owner: `0u8`
/// anonymous or `1u8` + u16 length + UTF-8 user name (absent in records written before
/// sessions had owners: [`Owner::Unknown`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// The protocol of its last connection.
    pub version: ProtocolVersion,
    /// Session Expiry Interval in seconds (`u32::MAX`: never).
    pub expiry: u32,
    /// When its connection ended; `None` while connected (or when mqgate was killed).
    pub disconnected: Option<SystemTime>,
    /// Filters and their options.
    pub subscriptions: Vec<(String, SubscribeOptions)>,
    /// Inbound QoS 2 packet ids PUBRECed and not released.
    pub awaiting_rel: Vec<u16>,
    /// Who created the session.
    pub owner: Owner,
}

impl SessionRecord {
    /// The record of `state`, kept `expiry` seconds after `disconnected`.
    pub fn of(
        state: &SessionState,
        expiry: u32,
        disconnected: Option<SystemTime>,
    ) -> SessionRecord {
        let mut subscriptions: Vec<_> =
            state.filters.iter().map(|(f, o)| (f.clone(), *o)).collect();
        subscriptions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut awaiting_rel: Vec<u16> = state.awaiting_rel.iter().copied().collect();
        awaiting_rel.sort_unstable();
        SessionRecord {
            version: state.version,
            expiry,
            disconnected,
            subscriptions,
            awaiting_rel,
            owner: state.owner.clone(),
        }
    }

    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(32 + 16 * self.subscriptions.len());
        v.put_u8(SESSION_VERSION);
        v.put_u8(match self.version {
            ProtocolVersion::V311 => 4,
            ProtocolVersion::V5 => 5,
        });
        v.put_u32(self.expiry);
        let ms = self
            .disconnected
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as u64);
        v.put_u64(ms);
        // Filters are bounded by the codec (u16 length) and counts by mqtt.max_subscriptions.
        let subs = &self.subscriptions[..self.subscriptions.len().min(usize::from(u16::MAX))];
        v.put_u16(subs.len() as u16);
        for (filter, o) in subs {
            let f = &filter.as_bytes()[..filter.len().min(usize::from(u16::MAX))];
            v.put_u16(f.len() as u16);
            v.put_slice(f);
            v.put_u8(o.qos as u8);
            let flags = u8::from(o.no_local)
                | (u8::from(o.retain_as_published) << 1)
                | (u8::from(o.subscription_id.is_some()) << 2);
            v.put_u8(flags);
            if let Some(id) = o.subscription_id {
                v.put_u32(id);
            }
        }
        let ids = &self.awaiting_rel[..self.awaiting_rel.len().min(usize::from(u16::MAX))];
        v.put_u16(ids.len() as u16);
        for id in ids {
            v.put_u16(*id);
        }
        match &self.owner {
            Owner::Anonymous => v.put_u8(0),
            Owner::User(name) => {
                let n = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
                v.put_u8(1);
                v.put_u16(n.len() as u16);
                v.put_slice(n);
            }
            // Not written: read back as unknown again.
            Owner::Unknown => {}
        }
        v
    }

    /// A record from its stored bytes.
    pub fn decode(bytes: &[u8]) -> Result<SessionRecord, StoreError> {
        let bad = |what: &str| StoreError::Decode(format!("stored session: {what}"));
        let mut b = bytes;
        if b.remaining() < 1 + 1 + 4 + 8 + 2 || b.get_u8() != SESSION_VERSION {
            return Err(bad("unknown format version"));
        }
        let version = match b.get_u8() {
            4 => ProtocolVersion::V311,
            5 => ProtocolVersion::V5,
            _ => return Err(bad("protocol version")),
        };
        let expiry = b.get_u32();
        let ms = b.get_u64();
        let disconnected = (ms != 0).then(|| UNIX_EPOCH + Duration::from_millis(ms));
        let n = b.get_u16();
        let mut subscriptions = Vec::with_capacity(usize::from(n).min(1024));
        for _ in 0..n {
            let len = usize::from(b.try_get_u16().map_err(|_| bad("filter"))?);
            if b.remaining() < len + 2 {
                return Err(bad("filter"));
            }
            let filter = std::str::from_utf8(&b[..len]).map_err(|_| bad("filter"))?.to_owned();
            b.advance(len);
            let qos = match b.get_u8() {
                0 => QoS::AtMostOnce,
                1 => QoS::AtLeastOnce,
                2 => QoS::ExactlyOnce,
                _ => return Err(bad("QoS")),
            };
            let flags = b.get_u8();
            let subscription_id = if flags & 4 != 0 {
                Some(b.try_get_u32().map_err(|_| bad("subscription identifier"))?)
            } else {
                None
            };
            let options = SubscribeOptions {
                qos,
                no_local: flags & 1 != 0,
                retain_as_published: flags & 2 != 0,
                subscription_id,
            };
            subscriptions.push((filter, options));
        }
        let n = b.try_get_u16().map_err(|_| bad("packet ids"))?;
        let mut awaiting_rel = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            awaiting_rel.push(b.try_get_u16().map_err(|_| bad("packet ids"))?);
        }
        let owner = match b.try_get_u8() {
            Err(_) => Owner::Unknown,
            Ok(0) => Owner::Anonymous,
            Ok(1) => {
                let len = usize::from(b.try_get_u16().map_err(|_| bad("owner"))?);
                if b.remaining() < len {
                    return Err(bad("owner"));
                }
                let name = std::str::from_utf8(&b[..len]).map_err(|_| bad("owner"))?;
                Owner::User(Arc::from(name))
            }
            Ok(_) => return Err(bad("owner")),
        };
        Ok(SessionRecord { version, expiry, disconnected, subscriptions, awaiting_rel, owner })
    }

    /// How long the session is still kept from now (`None`: never expires).
    pub fn remaining(&self, now: SystemTime) -> Option<Duration> {
        if self.expiry == u32::MAX {
            return None;
        }
        let total = Duration::from_secs(self.expiry.into());
        // A session whose connection was open when mqgate stopped ended with that stop: it
        // is kept from the restart on.
        let gone =
            self.disconnected.map_or(Duration::ZERO, |t| now.duration_since(t).unwrap_or_default());
        Some(total.saturating_sub(gone))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_session_record_round_trips() {
        let rec = SessionRecord {
            version: ProtocolVersion::V5,
            expiry: 3600,
            disconnected: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            subscriptions: vec![
                (
                    "a/+".into(),
                    SubscribeOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: false,
                        subscription_id: Some(77),
                    },
                ),
                (
                    "$share/g/b/#".into(),
                    SubscribeOptions {
                        qos: QoS::AtMostOnce,
                        no_local: false,
                        retain_as_published: true,
                        subscription_id: None,
                    },
                ),
            ],
            awaiting_rel: vec![3, 9],
            owner: Owner::User(Arc::from("alice")),
        };
        let bytes = rec.encode();
        assert_eq!(SessionRecord::decode(&bytes).expect("decode"), rec);
        // A record as written before sessions had owners: everything but the owner.
        let old = bytes.len() - (1 + 2 + "alice".len());
        let decoded = SessionRecord::decode(&bytes[..old]).expect("an old record");
        assert_eq!(decoded, SessionRecord { owner: Owner::Unknown, ..rec.clone() });
        for cut in (0..bytes.len()).filter(|c| *c != old) {
            assert!(SessionRecord::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let anonymous = SessionRecord { owner: Owner::Anonymous, ..rec };
        assert_eq!(SessionRecord::decode(&anonymous.encode()).expect("decode"), anonymous);
    }

    #[tokio::test]
    async fn writes_are_committed_in_order_and_waiters_told_once_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (p, feeder) = Persist::start(store.clone());
        let msg = |payload: &'static [u8]| {
            Arc::new(Message {
                charge: Default::default(),
                topic: "r/1".into(),
                payload: bytes::Bytes::from_static(payload),
                qos: QoS::AtLeastOnce,
                retain: true,
                client_id: Arc::from("c"),
                username: None,
                properties: Default::default(),
                received: Instant::now(),
                packet_id: Some(1),
            })
        };
        let key = SessionKey::new(&Arc::from("s"));
        // The newest retained value of a topic wins; a delete follows its put.
        p.retained("r/1", Some(msg(b"old")));
        p.put_delivery(&key, 1, vec![1]);
        p.put_delivery(&key, 2, vec![2]);
        p.retained("r/1", Some(msg(b"new")));
        p.delete_delivery(&key, 1);
        let durable = p.durable();
        assert!(matches!(durable.await, Ok(Outcome::Delivered)));
        let get = |t: Table, k: &[u8]| {
            let r = store.read().expect("read");
            let table = r.open_table(t.def()).expect("table");
            let v = table.get(k).expect("get").map(|v| v.value().to_vec());
            v
        };
        let kept = get(Table::Retained, b"r/1").expect("retained stored");
        assert_eq!(&codec::decode_message(&kept).expect("decode").payload[..], b"new");
        assert_eq!(get(Table::SessionQueue, &key.delivery(1)), None);
        assert_eq!(get(Table::SessionQueue, &key.delivery(2)), Some(vec![2]));
        p.delete_session(&key);
        p.retained("r/1", None);
        p.close();
        feeder.await.expect("feeder ends once closed and empty");
        assert_eq!(get(Table::SessionQueue, &key.delivery(2)), None, "closing flushes");
        assert_eq!(get(Table::Retained, b"r/1"), None);
    }

    #[test]
    fn a_delivery_round_trips_and_keys_sort_per_session() {
        let msg = Message {
            charge: Default::default(),
            topic: "t/1".into(),
            payload: bytes::Bytes::from_static(b"hello"),
            qos: QoS::ExactlyOnce,
            retain: false,
            client_id: Arc::from("pub"),
            username: None,
            properties: Default::default(),
            received: Instant::now(),
            packet_id: Some(5),
        };
        let encoded = codec::encode_message(&msg).expect("encode");
        let stage = DeliveryStage::Sent(42, InFlightStage::Released);
        let v = delivery_value(QoS::ExactlyOnce, true, &[1, 2], stage, &encoded);
        let d = decode_delivery(&v).expect("decode");
        assert_eq!((d.qos, d.retain, d.stage), (QoS::ExactlyOnce, true, stage));
        assert_eq!(d.subscription_ids, vec![1, 2]);
        assert_eq!(d.msg.payload, msg.payload);
        for cut in 0..v.len() {
            let _ = decode_delivery(&v[..cut]);
        }
        let key = SessionKey::new(&Arc::from("c"));
        let (from, to) = key.range();
        let k1 = key.delivery(1);
        let k2 = key.delivery(256);
        assert!(from <= k1 && k1 < k2 && k2 < to);
        let other = SessionKey::new(&Arc::from("c2")).delivery(0);
        assert!(!(from <= other && other < to), "another client id's keys are outside");
        assert_eq!(key.seq_of(&k2), Some(256));
    }
}
