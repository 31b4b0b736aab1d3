//! Session state that outlives a connection, and the registry of connected client ids.
//!
//! A session is the subscriber side of a client: its queue of messages to deliver (a bounded
//! [`Queue`] fed by `Broker::publish`), its unacknowledged QoS 1/2 deliveries in the order they
//! were sent, and its filters (which stay in the subscription tree while it is away). When a
//! connection ends, its session task parks that state here; when the client id connects again
//! without a clean start, the new session task takes it. While parked, messages keep arriving
//! in the same bounded queue: "queued while away" is exactly the queue's content, bounded
//! by its capacity (`mqtt.max_queued_messages` for a persistent session).
//!
//! The registry is in memory; with a store, a persistent session is also written to it
//! (`persist.rs`: its record when it subscribes, connects and parks, its QoS 1/2 deliveries
//! as they are queued, sent and acknowledged) and parked here again at start (`restore.rs`).
//! It does no I/O and no `.await`; its lock is held for a map operation only, and never while
//! the subscription lock is taken.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::persist::SessionKey;
use super::queue::Queue;
use super::SubscribeOptions;
use crate::message::Message;
use crate::mqtt::codec::{ProtocolVersion, QoS};

/// Who a session belongs to: the identity that created it. A CONNECT for its client id from
/// another identity is refused (`mqtt.client_id_takeover: same_identity`, the default).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Owner {
    /// A client without a user name (or certificate identity).
    Anonymous,
    /// A user name (from CONNECT, checked) or a client certificate's identity.
    User(Arc<str>),
    /// A session restored from a store written before sessions recorded their owner: the
    /// first client to resume it becomes its owner.
    #[default]
    Unknown,
}

impl Owner {
    /// The owner for a client with `user` (or none).
    pub fn of(user: Option<&str>) -> Owner {
        match user {
            Some(u) => Owner::User(Arc::from(u)),
            None => Owner::Anonymous,
        }
    }

    /// Whether a client of identity `other` may take a session owned by `self`.
    pub fn admits(&self, other: &Owner) -> bool {
        matches!(self, Owner::Unknown) || self == other
    }
}

/// Where the broker hands messages for one session, shared by all its subscriptions.
#[derive(Debug)]
pub struct Subscriber {
    /// The session's bounded queue of messages to deliver; its task receives from it.
    pub queue: Queue,
    /// False while the session is parked (no connection): QoS 0 is then not queued unless
    /// `mqtt.queue_qos0`, and a full queue counts as `session_queue_full`.
    online: AtomicBool,
    /// For a persistent session when there is a store: where its records are kept (its QoS
    /// 1/2 deliveries are stored). Boxed: one pointer for every other session.
    stored: Option<Box<SessionKey>>,
    /// In a cluster, a persistent session's messages come through its durable queue in
    /// RabbitMQ (`cluster::psession`), not from local routing: set before it subscribes.
    queued: AtomicBool,
}

impl Subscriber {
    /// Whether the session's messages come through its cluster session queue (local routing
    /// skips its subscriptions).
    pub fn is_queued(&self) -> bool {
        self.queued.load(Ordering::Relaxed)
    }

    /// Makes the session's messages come through its cluster session queue (before its
    /// subscriptions are added).
    pub fn set_queued(&self) {
        self.queued.store(true, Ordering::Relaxed);
    }

    /// Whether a connection holds the session now.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    /// Where the session is stored, if it is.
    pub fn stored(&self) -> Option<&SessionKey> {
        self.stored.as_deref()
    }
}

/// Where one unacknowledged outbound QoS 1/2 delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlightStage {
    /// PUBLISH sent; waiting for PUBACK (QoS 1) or PUBREC (QoS 2). Resent as PUBLISH DUP.
    Published,
    /// QoS 2: PUBREC received and PUBREL sent; waiting for PUBCOMP. Resent as PUBREL.
    Released,
}

/// One outbound QoS 1/2 delivery not yet completed by the client.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// Our packet id.
    pub packet_id: u16,
    /// The message, kept for a resend.
    pub msg: Arc<Message>,
    /// QoS it was sent at (1 or 2).
    pub qos: QoS,
    /// RETAIN flag it was sent with.
    pub retain: bool,
    /// Published or released.
    pub stage: InFlightStage,
    /// The shared subscription it was delivered for (see [`super::Outbound::shared`]).
    pub shared: Option<Arc<str>>,
    /// MQTT 5 subscription identifiers it was sent with (kept for a resend).
    pub subscription_ids: Vec<u32>,
    /// A tracked delivery's ticket, finished by the PUBACK/PUBCOMP (see `tracking`).
    pub ticket: Option<super::tracking::Ticket>,
    /// Its sequence number in the store, for a delivery of a stored session.
    pub stored: Option<u64>,
}

/// The state of one session that a connection owns while connected and parks when it ends.
#[derive(Debug)]
pub struct SessionState {
    /// Stable id of the session: keys its subscriptions (and No Local) across reconnects.
    pub id: u64,
    /// What the subscriptions in the tree point at.
    pub subscriber: Arc<Subscriber>,
    /// Unacknowledged QoS 1/2 deliveries, in the order they were first sent.
    pub inflight: VecDeque<InFlight>,
    /// The packet ids of `inflight`, to pick a free one.
    pub inflight_ids: HashSet<u16>,
    /// Last packet id used.
    pub last_id: u16,
    /// Filters of this session (in the broker's tree under `id`), with their options (kept
    /// in the session's stored record).
    pub filters: HashMap<String, SubscribeOptions>,
    /// Inbound QoS 2 packet ids the client was sent PUBREC for and has not released with
    /// PUBREL: a resent PUBLISH with one of them is not forwarded again after a reconnect.
    pub awaiting_rel: HashSet<u16>,
    /// The protocol of the connection that has (or last had) the session.
    pub version: ProtocolVersion,
    /// The identity that created the session (kept in its stored record).
    pub owner: Owner,
}

impl SessionState {
    /// A new, empty session whose queue holds `capacity` messages; `stored` for a persistent
    /// session kept in the store.
    pub fn new(id: u64, capacity: usize, stored: Option<SessionKey>) -> Self {
        SessionState::with_bytes(id, capacity, usize::MAX, stored)
    }

    /// A new session whose queue holds at most `capacity` messages and `max_bytes` bytes.
    pub fn with_bytes(
        id: u64,
        capacity: usize,
        max_bytes: usize,
        stored: Option<SessionKey>,
    ) -> Self {
        SessionState {
            id,
            subscriber: Arc::new(Subscriber {
                queue: Queue::with_bytes(capacity, max_bytes),
                online: AtomicBool::new(true),
                stored: stored.map(Box::new),
                queued: AtomicBool::new(false),
            }),
            inflight: VecDeque::new(),
            inflight_ids: HashSet::new(),
            last_id: 0,
            filters: HashMap::new(),
            awaiting_rel: HashSet::new(),
            version: ProtocolVersion::V311,
            owner: Owner::Unknown,
        }
    }
}

/// How long a parked session is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Not kept: the session ends with its connection (clean session, expiry interval 0).
    Now,
    /// Kept this many seconds after the connection ends.
    After(u32),
    /// Kept until the client connects with a clean start (3.1.1 clean session 0, or MQTT 5
    /// Session Expiry Interval 0xFFFFFFFF).
    Never,
}

impl Expiry {
    /// The MQTT 5 Session Expiry Interval as an [`Expiry`].
    pub fn from_interval(seconds: u32) -> Self {
        match seconds {
            0 => Expiry::Now,
            u32::MAX => Expiry::Never,
            s => Expiry::After(s),
        }
    }

    /// As a Session Expiry Interval (0 now, `u32::MAX` never).
    pub fn seconds(self) -> u32 {
        match self {
            Expiry::Now => 0,
            Expiry::After(s) => s,
            Expiry::Never => u32::MAX,
        }
    }
}

/// Why the registry tells a connection to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Another connection registered the same client id.
    Takeover,
    /// The gateway is shutting down.
    Shutdown,
    /// A config reload took the client's right to be connected away (its user removed, its
    /// client id no longer allowed, anonymous clients no longer allowed).
    Revoked,
    /// An operator disconnected it (admin API, `DELETE /api/v1/clients/{id}`).
    Admin,
}

/// What the admin API shows of a connection: set once, when its CONNECT is accepted.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address (an `IpAddr` and a port: 12 bytes less than a `SocketAddr`).
    pub peer_ip: std::net::IpAddr,
    /// The client's port.
    pub peer_port: u16,
    /// MQTT 3.1.1, MQTT 5.0 or MQTT-SN.
    pub protocol: ConnProtocol,
    /// The keepalive granted, seconds (0: none).
    pub keep_alive: u16,
    /// When the CONNECT was accepted, ms since the Unix epoch.
    pub connected_at_ms: u64,
    /// The session's id (its subscriptions are under it in the broker's tree).
    pub session_id: u64,
}

/// The protocol a connection speaks, as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnProtocol {
    /// MQTT 3.1.1.
    Mqtt311,
    /// MQTT 5.0.
    Mqtt5,
    /// MQTT-SN 1.2 (over UDP, `src/mqttsn/`).
    MqttSn,
}

impl ConnProtocol {
    /// `3.1.1`, `5.0` or `MQTT-SN 1.2`.
    pub fn name(self) -> &'static str {
        match self {
            ConnProtocol::Mqtt311 => "3.1.1",
            ConnProtocol::Mqtt5 => "5.0",
            ConnProtocol::MqttSn => "MQTT-SN 1.2",
        }
    }
}

impl From<ProtocolVersion> for ConnProtocol {
    fn from(v: ProtocolVersion) -> ConnProtocol {
        match v {
            ProtocolVersion::V311 => ConnProtocol::Mqtt311,
            ProtocolVersion::V5 => ConnProtocol::Mqtt5,
        }
    }
}

/// One client id as the admin API lists it: a snapshot taken under the registry's lock.
#[derive(Debug, Clone)]
pub struct ClientSnapshot {
    /// The client id.
    pub client_id: Arc<str>,
    /// Its owner: the user name, if any.
    pub user: Option<Arc<str>>,
    /// The connection holding it, if connected (`None` until its CONNECT completes).
    pub conn: Option<ConnInfo>,
    /// Whether a connection holds it (also true during its handshake).
    pub connected: bool,
    /// A parked session: its id, its filters, messages queued, seconds until it expires.
    pub parked: Option<ParkedSnapshot>,
}

/// A parked session as the admin API shows it.
#[derive(Debug, Clone)]
pub struct ParkedSnapshot {
    /// The session's id.
    pub session_id: u64,
    /// Its subscriptions (filter, granted QoS), sorted.
    pub filters: Vec<(String, QoS)>,
    /// Messages queued for it.
    pub queued: usize,
    /// Seconds until it expires (`None`: never).
    pub expires_in: Option<u64>,
}

/// The link between one connection and the registry, shared by both (one small allocation per
/// connection): the registry uses it to tell the connection to close (takeover, shutdown), the
/// connection uses it to say that its session state is parked, which a connection taking its
/// client id over waits for.
///
/// Polled rather than awaited: an idle session's future stores no waiter for it, only the
/// session task's waker is kept here. Each side has one waiter at most: the connection itself
/// for [`poll_close`](Self::poll_close), and the one connection that replaced it in the
/// registry for [`parked`](Self::parked).
#[derive(Debug)]
pub struct ConnLink {
    /// The connection's id (unique per connection) in the low 56 bits ([`CONN_ID_BITS`]);
    /// above it the close reason (3 bits: 0 while open, then `1 + CloseReason as u8`, the
    /// first reason set wins) and whether the session state is parked ([`DONE`]). One word
    /// rather than three fields: it keeps the link in mimalloc's 128-byte class.
    state: AtomicU64,
    /// The identity of the connection's client.
    owner: Owner,
    /// The two waiters and the admin API's view, under one small lock (the link is taken by
    /// the connection, a connection that took its client id over and the registry, each
    /// briefly): 40 bytes less than two `AtomicWaker`s and a `OnceLock`.
    shared: Mutex<LinkShared>,
}

/// The bits of [`ConnLink::state`] that hold the connection's id: ids are counters
/// (`Broker::next_id`), 2^56 of them last thousands of years at a million a second.
const CONN_ID_BITS: u32 = 56;
const CONN_ID_MASK: u64 = (1 << CONN_ID_BITS) - 1;
/// Where the close reason's code starts in [`ConnLink::state`].
const CLOSE_SHIFT: u32 = CONN_ID_BITS;
const CLOSE_MASK: u64 = 0b111 << CLOSE_SHIFT;
/// Set in [`ConnLink::state`] once the connection's session state is parked or discarded.
const DONE: u64 = 1 << 63;

/// What a [`ConnLink`] keeps under its lock.
#[derive(Debug, Default)]
struct LinkShared {
    /// The connection's task, woken when a close reason is set (or on a reload).
    close_waker: Option<Waker>,
    /// The connection that took the client id over, woken when the state is parked.
    done_waker: Option<Waker>,
    /// What the admin API shows of the connection, set once its CONNECT is accepted.
    info: Option<ConnInfo>,
}

impl ConnLink {
    fn new(conn_id: u64, owner: Owner) -> Self {
        debug_assert!(conn_id <= CONN_ID_MASK, "connection id {conn_id} out of range");
        ConnLink {
            state: AtomicU64::new(conn_id & CONN_ID_MASK),
            owner,
            shared: Mutex::new(LinkShared::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkShared> {
        // Nothing under this lock can panic halfway (a field set or taken): go on.
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The connection's id (unique per connection).
    pub fn conn_id(&self) -> u64 {
        self.state.load(Ordering::Relaxed) & CONN_ID_MASK
    }

    /// Records what the admin API shows of the connection (once; later calls are ignored).
    pub fn describe(&self, info: ConnInfo) {
        let mut shared = self.lock();
        if shared.info.is_none() {
            shared.info = Some(info);
        }
    }

    /// The identity of the connection's client.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// What the admin API shows of the connection, once its CONNECT is accepted.
    fn info(&self) -> Option<ConnInfo> {
        self.lock().info.clone()
    }

    /// Tells the connection to close for `reason` (a no-op if it was told already).
    pub fn close(&self, reason: CloseReason) {
        let code = u64::from(1 + reason as u8) << CLOSE_SHIFT;
        let set = self.state.fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
            (s & CLOSE_MASK == 0).then_some(s | code)
        });
        if set.is_ok() {
            self.nudge();
        }
    }

    /// Why the connection must close, once it must; registers the task's waker until then.
    pub fn poll_close(&self, cx: &mut Context<'_>) -> Poll<CloseReason> {
        if let Some(reason) = self.close_reason() {
            return Poll::Ready(reason);
        }
        register(&mut self.lock().close_waker, cx.waker());
        match self.close_reason() {
            Some(reason) => Poll::Ready(reason),
            None => Poll::Pending,
        }
    }

    /// Why the connection was told to close, if it was.
    pub fn close_reason(&self) -> Option<CloseReason> {
        match (self.state.load(Ordering::Acquire) & CLOSE_MASK) >> CLOSE_SHIFT {
            0 => None,
            1 => Some(CloseReason::Takeover),
            2 => Some(CloseReason::Shutdown),
            3 => Some(CloseReason::Revoked),
            _ => Some(CloseReason::Admin),
        }
    }

    /// Whether the connection's session state is parked (or discarded).
    pub fn is_parked(&self) -> bool {
        self.state.load(Ordering::Acquire) & DONE != 0
    }

    /// Waits until the connection has parked (or discarded) its session state.
    pub async fn parked(&self) {
        poll_fn(|cx| {
            if self.is_parked() {
                return Poll::Ready(());
            }
            register(&mut self.lock().done_waker, cx.waker());
            if self.is_parked() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
    }

    /// Wakes the connection's task without telling it to close: it then sees that the
    /// config was reloaded and takes the new ACL.
    pub fn nudge(&self) {
        let waker = self.lock().close_waker.take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn set_parked(&self) {
        self.state.fetch_or(DONE, Ordering::Release);
        let waker = self.lock().done_waker.take();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Keeps `waker` in `slot` (unless the one there would wake the same task).
fn register(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

/// A parked session and when it expires.
#[derive(Debug)]
struct Parked {
    state: SessionState,
    /// `None`: never.
    expires: Option<Instant>,
}

/// The registry's maps, under one lock: connected client ids and parked sessions apart, so
/// that a connection's slot is a key and one pointer (a slot with room for a parked session
/// too was 8 bytes more for every connection, and the map keeps up to twice as many slots as
/// entries).
#[derive(Debug, Default)]
struct Maps {
    /// The connection holding each connected client id.
    conns: HashMap<Arc<str>, Arc<ConnLink>>,
    /// Parked sessions. Boxed: a spare slot of this map is then one pointer, not a session.
    parked: HashMap<Arc<str>, Box<Parked>>,
    /// Client ids in both maps (a connection taking over or resuming its parked session),
    /// so that [`Maps::len`] counts each client id once.
    both: usize,
}

impl Maps {
    /// Client ids connected or parked.
    fn len(&self) -> usize {
        self.conns.len() + self.parked.len() - self.both
    }

    fn contains(&self, client_id: &str) -> bool {
        self.conns.contains_key(client_id) || self.parked.contains_key(client_id)
    }

    /// The string of `client_id` as one of the maps holds it, if one does.
    fn key(&self, client_id: &str) -> Option<Arc<str>> {
        let key = self.conns.get_key_value(client_id).map(|(k, _)| k);
        key.or_else(|| self.parked.get_key_value(client_id).map(|(k, _)| k)).cloned()
    }

    /// Who holds `client_id`: its connection's owner, else its parked session's.
    fn owner(&self, client_id: &str) -> Option<&Owner> {
        match self.conns.get(client_id) {
            Some(conn) => Some(&conn.owner),
            None => self.parked.get(client_id).map(|p| &p.state.owner),
        }
    }

    /// Removes the connection of `client_id`.
    fn remove_conn(&mut self, client_id: &str) {
        if self.conns.remove(client_id).is_some() && self.parked.contains_key(client_id) {
            self.both -= 1;
        }
    }
}

/// The bytes one connected client id's slot in the registry's map takes (its key and link;
/// the map keeps up to twice as many slots as entries), for the resting connection's budget
/// test (`mqtt/session/rest.rs`).
#[cfg(test)]
pub(crate) fn registry_slot_bytes() -> usize {
    std::mem::size_of::<(Arc<str>, Arc<ConnLink>)>()
}

/// What [`SessionStore::take`] found.
#[derive(Debug)]
pub enum Taken {
    /// No parked session.
    Nothing,
    /// A parked session, now owned by the caller.
    Resumed(SessionState),
    /// A parked session that had expired (the periodic check had not seen it yet): the
    /// caller discards it.
    Expired(SessionState),
}

/// What [`SessionStore::register`] gives a new connection.
#[derive(Debug)]
pub struct Registration {
    /// Unique per connection (for `unregister`).
    pub conn_id: u64,
    /// This connection's link: told to close on takeover and shutdown; marked parked when
    /// the guard is dropped.
    pub link: DoneGuard,
    /// The previous connection's link: wait for [`ConnLink::parked`] before `take`.
    pub previous: Option<Arc<ConnLink>>,
}

/// Why [`SessionStore::register`] refused a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The client id's session belongs to this other identity.
    Owned(Owner),
    /// `mqtt.max_sessions` client ids are connected or parked.
    Full,
}

/// Marks the link parked when dropped, so a connection signals "my state is parked" on every
/// path out of its task, even a panic.
#[derive(Debug)]
pub struct DoneGuard(pub Arc<ConnLink>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        self.0.set_parked();
    }
}

/// Connected client ids and parked sessions, in memory. Keyed by the same `Arc<str>` the
/// session holds, so a connection's entry costs a map slot and no string of its own.
#[derive(Debug, Default)]
pub struct SessionStore {
    entries: Mutex<Maps>,
}

impl SessionStore {
    /// Registers a new connection of identity `owner` for `client_id`, telling the connection
    /// that held it to close (takeover). With `same_identity`, a client id held (connected or
    /// parked) by another identity is refused: `Err` with that owner, nothing changed. A new
    /// client id when `max_sessions` client ids (connected or parked) exist is refused too.
    pub fn register(
        &self,
        client_id: &Arc<str>,
        conn_id: u64,
        owner: Owner,
        same_identity: bool,
        max_sessions: usize,
    ) -> Result<Registration, Refused> {
        let mut maps = self.lock();
        if max_sessions > 0 && maps.len() >= max_sessions && !maps.contains(client_id) {
            return Err(Refused::Full);
        }
        if same_identity {
            if let Some(holder) = maps.owner(client_id).filter(|h| !h.admits(&owner)) {
                return Err(Refused::Owned(holder.clone()));
            }
        }
        let link = Arc::new(ConnLink::new(conn_id, owner));
        let previous = match maps.conns.get_mut(&**client_id) {
            Some(held) => Some(std::mem::replace(held, Arc::clone(&link))),
            None => {
                // The parked session's string if it has one: one string per client id.
                let key = maps.key(client_id).unwrap_or_else(|| Arc::clone(client_id));
                if maps.parked.contains_key(client_id) {
                    maps.both += 1;
                }
                maps.conns.insert(key, Arc::clone(&link));
                None
            }
        };
        if let Some(old) = &previous {
            old.close(CloseReason::Takeover);
        }
        Ok(Registration { conn_id, link: DoneGuard(link), previous })
    }

    /// Tells every registered connection to close (shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        for link in self.lock().conns.values() {
            link.close(reason);
        }
    }

    /// After a config reload: every connection for which `revoked(client_id, owner)` holds is
    /// told to close ([`CloseReason::Revoked`]), every other one is woken to take the new
    /// ACL. Returns how many were told to close.
    pub fn reloaded(&self, revoked: &dyn Fn(&str, &Owner) -> bool) -> usize {
        let mut closed = 0;
        for (client_id, link) in &self.lock().conns {
            if revoked(client_id, &link.owner) {
                link.close(CloseReason::Revoked);
                closed += 1;
            } else {
                link.nudge();
            }
        }
        closed
    }

    /// Forgets the connection `conn_id` if it still holds `client_id`.
    pub fn unregister(&self, client_id: &str, conn_id: u64) {
        let mut maps = self.lock();
        if maps.conns.get(client_id).is_some_and(|c| c.conn_id() == conn_id) {
            maps.remove_conn(client_id);
        }
    }

    /// Takes the parked session of `client_id`, if there is one.
    pub fn take(&self, client_id: &str, now: Instant) -> Taken {
        let mut maps = self.lock();
        let Some(parked) = maps.parked.remove(client_id) else {
            return Taken::Nothing;
        };
        if maps.conns.contains_key(client_id) {
            maps.both -= 1;
        }
        parked.state.subscriber.online.store(true, Ordering::Relaxed);
        if parked.expires.is_some_and(|t| t <= now) {
            return Taken::Expired(parked.state);
        }
        Taken::Resumed(parked.state)
    }

    /// Parks `state` for `client_id` until `expires` (`None`: never). Returns the state it
    /// replaced, if any, for the caller to discard (only when two connections raced).
    pub fn park(
        &self,
        client_id: &str,
        state: SessionState,
        expires: Option<Instant>,
    ) -> Option<SessionState> {
        state.subscriber.online.store(false, Ordering::Relaxed);
        let mut maps = self.lock();
        let parked = Box::new(Parked { state, expires });
        if let Some(held) = maps.parked.get_mut(client_id) {
            return Some(std::mem::replace(held, parked).state);
        }
        let key = maps.key(client_id).unwrap_or_else(|| Arc::from(client_id));
        if maps.conns.contains_key(client_id) {
            maps.both += 1;
        }
        maps.parked.insert(key, parked);
        None
    }

    /// Removes and returns every parked session expired at `now` with its client id, for the
    /// caller to discard.
    pub fn expired(&self, now: Instant) -> Vec<(Arc<str>, SessionState)> {
        let mut maps = self.lock();
        let Maps { conns, parked, both } = &mut *maps;
        let mut gone = Vec::new();
        for (client_id, p) in parked.extract_if(|_, p| p.expires.is_some_and(|t| t <= now)) {
            if conns.contains_key(&client_id) {
                *both -= 1;
            }
            gone.push((client_id, p.state));
        }
        gone
    }

    /// Number of connected client ids.
    pub fn connected(&self) -> usize {
        self.lock().conns.len()
    }

    /// Number of parked sessions.
    pub fn parked(&self) -> usize {
        self.lock().parked.len()
    }

    /// At most `limit` client ids (connected or parked) after `after` in client-id order
    /// whose id or user contains `search` (ASCII case-insensitive), and how many matched in
    /// all. One pass over the registry under its lock, keeping only the page (O(n log limit)).
    pub fn clients(
        &self,
        search: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<ClientSnapshot>, usize) {
        let needle = search.to_ascii_lowercase();
        let contains = |s: &str| {
            needle.is_empty()
                || s.as_bytes()
                    .windows(needle.len())
                    .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
        };
        let now = Instant::now();
        let maps = self.lock();
        let mut page: std::collections::BTreeSet<&Arc<str>> = Default::default();
        let mut matched = 0;
        // Every client id once: the connected ones, then the parked ones not connected.
        let ids =
            maps.conns.keys().chain(maps.parked.keys().filter(|k| !maps.conns.contains_key(*k)));
        for id in ids {
            let user = maps.owner(id).and_then(owner_name);
            if !(contains(id) || user.is_some_and(&contains)) {
                continue;
            }
            matched += 1;
            if after.is_some_and(|a| &**id <= a) || limit == 0 {
                continue;
            }
            if page.len() == limit {
                match page.last() {
                    Some(last) if *last > id => {
                        page.pop_last();
                    }
                    _ => continue,
                }
            }
            page.insert(id);
        }
        let list = page.into_iter().map(|id| snapshot(&maps, id, now)).collect();
        (list, matched)
    }

    /// The client id `client_id`, if it is connected or parked.
    pub fn client(&self, client_id: &str) -> Option<ClientSnapshot> {
        let maps = self.lock();
        let id = maps.key(client_id)?;
        Some(snapshot(&maps, &id, Instant::now()))
    }

    /// Tells the connection holding `client_id` to close for `reason`; its link (to wait for
    /// it to park its session), if a connection held it.
    pub fn close_conn(&self, client_id: &str, reason: CloseReason) -> Option<Arc<ConnLink>> {
        let link = self.lock().conns.get(client_id).cloned()?;
        link.close(reason);
        Some(link)
    }

    /// Tells the connection of `client_id` to close (an operator's disconnect); false when it
    /// is not connected.
    pub fn disconnect(&self, client_id: &str) -> bool {
        match self.lock().conns.get(client_id) {
            Some(link) => {
                link.close(CloseReason::Admin);
                true
            }
            None => false,
        }
    }

    /// The client ids of the sessions `ids` (connected or parked), in the same order.
    pub fn client_ids_of(&self, ids: &[u64]) -> Vec<Option<Arc<str>>> {
        let mut out = vec![None; ids.len()];
        let maps = self.lock();
        let conns = maps.conns.iter().map(|(k, c)| (k, c.info().map(|i| i.session_id)));
        let parked = maps.parked.iter().filter(|(k, _)| !maps.conns.contains_key(*k));
        for (client_id, session) in conns.chain(parked.map(|(k, p)| (k, Some(p.state.id)))) {
            if let Some(session) = session {
                for (i, id) in ids.iter().enumerate() {
                    if *id == session {
                        out[i] = Some(Arc::clone(client_id));
                    }
                }
            }
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn owner_name(owner: &Owner) -> Option<&str> {
    match owner {
        Owner::User(u) => Some(u),
        Owner::Anonymous | Owner::Unknown => None,
    }
}

fn snapshot(maps: &Maps, id: &Arc<str>, now: Instant) -> ClientSnapshot {
    let user = match maps.owner(id) {
        Some(Owner::User(u)) => Some(Arc::clone(u)),
        _ => None,
    };
    let conn = maps.conns.get(id);
    let parked = maps.parked.get(id).map(|p| {
        let mut filters: Vec<(String, QoS)> =
            p.state.filters.iter().map(|(f, o)| (f.clone(), o.qos)).collect();
        filters.sort();
        ParkedSnapshot {
            session_id: p.state.id,
            filters,
            queued: p.state.subscriber.queue.len(),
            expires_in: p.expires.map(|t| t.saturating_duration_since(now).as_secs()),
        }
    });
    ClientSnapshot {
        client_id: Arc::clone(id),
        user,
        conn: conn.and_then(|c| c.info()),
        connected: conn.is_some(),
        parked,
    }
}

/// How often parked sessions are checked for expiry.
const EXPIRY_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Discards expired parked sessions (and their subscriptions) every second until `shutdown`.
/// A session is also checked when its client id reconnects, so expiry is exact for the client.
/// At shutdown it tells every connected session to close (as the MQTT listener does), so that
/// sessions of any listener hear of it.
pub async fn expire(broker: Arc<super::Broker>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(EXPIRY_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                broker.close_connections();
                return;
            }
            _ = tick.tick() => {}
        }
        let n = broker.expire_sessions();
        if n > 0 {
            tracing::debug!(n, "expired parked sessions");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_link_stays_small() {
        // Every connection has one (in an `Arc`): 112 bytes with the admin API's `ConnInfo`
        // (the `Arc`'s allocation: 128 bytes, a mimalloc size class; the next is 160).
        let size = std::mem::size_of::<ConnLink>();
        assert!(size <= 112, "ConnLink grew to {size} bytes");
    }
    use std::time::Duration;

    #[test]
    fn take_returns_a_parked_session_once_and_reports_an_expired_one() {
        let store = SessionStore::default();
        let now = Instant::now();
        assert!(matches!(store.take("c", now), Taken::Nothing));
        let state = SessionState::new(7, 4, None);
        assert!(store.park("c", state, Some(now + Duration::from_secs(5))).is_none());
        assert!(!store.lock().parked["c"].state.subscriber.is_online());
        match store.take("c", now) {
            Taken::Resumed(s) => {
                assert_eq!(s.id, 7);
                assert!(s.subscriber.is_online(), "a resumed session is online again");
                store.park("c", s, Some(now + Duration::from_secs(5)));
            }
            other => panic!("expected the parked session, got {other:?}"),
        }
        assert!(matches!(store.take("c", now + Duration::from_secs(6)), Taken::Expired(_)));
        assert!(matches!(store.take("c", now), Taken::Nothing));
    }

    #[test]
    fn a_client_id_connected_and_parked_at_once_counts_once() {
        let store = SessionStore::default();
        let now = Instant::now();
        let a: Arc<str> = Arc::from("a");
        let reg = store.register(&a, 1, Owner::Anonymous, false, 0).expect("registered");
        store.park("a", SessionState::new(1, 4, None), None);
        let len = store.lock().len();
        assert_eq!((len, store.connected(), store.parked()), (1, 1, 1));
        let strings = Arc::strong_count(&a);
        assert_eq!(strings, 3, "one string: ours, the connection's and the parked session's");
        // Full at one client id: "a" again is let in, "b" is not.
        assert!(store.register(&a, 2, Owner::Anonymous, false, 1).is_ok());
        let b: Arc<str> = Arc::from("b");
        assert!(matches!(store.register(&b, 3, Owner::Anonymous, false, 1), Err(Refused::Full)));
        assert!(matches!(store.take("a", now), Taken::Resumed(_)));
        assert_eq!(store.lock().len(), 1);
        store.unregister("a", 2);
        assert_eq!(store.lock().len(), 0);
        drop(reg);
        // Parked first, then connected, then expired while connected.
        store.park("b", SessionState::new(2, 4, None), Some(now));
        let _reg = store.register(&b, 4, Owner::Anonymous, false, 0).expect("registered");
        assert_eq!(store.lock().len(), 1);
        assert_eq!(store.expired(now).len(), 1);
        let len = store.lock().len();
        assert_eq!((len, store.connected(), store.parked()), (1, 1, 0));
        assert_eq!(store.clients("", None, 10).1, 1);
    }

    #[test]
    fn expired_removes_only_expired_sessions_and_empty_entries() {
        let store = SessionStore::default();
        let now = Instant::now();
        store.park("short", SessionState::new(1, 1, None), Some(now + Duration::from_secs(1)));
        store.park("never", SessionState::new(2, 1, None), None);
        let gone = store.expired(now + Duration::from_secs(2));
        assert_eq!(
            gone.iter().map(|(id, s)| (&**id, s.id)).collect::<Vec<_>>(),
            vec![("short", 1)]
        );
        assert_eq!(store.parked(), 1);
        assert!(!store.lock().contains("short"));
    }

    #[test]
    fn a_parked_session_is_kept_for_its_owner() {
        let store = SessionStore::default();
        let c: Arc<str> = Arc::from("c");
        let mut state = SessionState::new(1, 4, None);
        state.owner = Owner::of(Some("alice"));
        store.park("c", state, None);
        assert!(store.register(&c, 1, Owner::Anonymous, true, 0).is_err());
        assert!(store.register(&c, 2, Owner::of(Some("bob")), true, 0).is_err());
        assert!(store.register(&c, 3, Owner::of(Some("alice")), true, 0).is_ok());
        // Restored from an old store: whoever resumes first.
        let d: Arc<str> = Arc::from("d");
        store.park("d", SessionState::new(2, 4, None), None);
        assert!(store.register(&d, 4, Owner::Anonymous, true, 0).is_ok());
    }

    #[test]
    fn the_admin_list_pages_searches_and_disconnects() {
        let store = SessionStore::default();
        let mut links = Vec::new();
        for (i, (id, user)) in
            [("d", None), ("b", Some("Alice")), ("a", None), ("c", Some("bob"))].iter().enumerate()
        {
            let r = store.register(&Arc::from(*id), i as u64, Owner::of(*user), true, 0);
            links.push(r.expect("free"));
        }
        links[0].link.0.describe(ConnInfo {
            peer_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            peer_port: 1883,
            protocol: ConnProtocol::Mqtt5,
            keep_alive: 30,
            connected_at_ms: 1,
            session_id: 7,
        });
        // "e" is only parked.
        store.park("e", SessionState::new(8, 4, None), None);
        let ids =
            |v: Vec<ClientSnapshot>| v.iter().map(|c| c.client_id.to_string()).collect::<Vec<_>>();
        let (page, matched) = store.clients("", None, 2);
        assert_eq!((ids(page), matched), (vec!["a".to_owned(), "b".to_owned()], 5));
        let (page, _) = store.clients("", Some("b"), 10);
        assert_eq!(ids(page), ["c", "d", "e"]);
        let (page, matched) = store.clients("ALICE", None, 10);
        assert_eq!((ids(page), matched), (vec!["b".to_owned()], 1), "by user, any case");
        let d = store.client("d").expect("d");
        assert_eq!(d.conn.as_ref().map(|i| (i.session_id, i.peer_port)), Some((7, 1883)));
        let e = store.client("e").expect("e");
        assert!(!e.connected && e.parked.as_ref().is_some_and(|p| p.expires_in.is_none()));
        assert_eq!(
            store.client_ids_of(&[8, 7, 99]),
            [Some(Arc::from("e")), Some(Arc::from("d")), None]
        );
        assert!(!store.disconnect("e"), "parked: no connection to close");
        assert!(store.disconnect("d"));
        assert_eq!(links[0].link.0.close_reason(), Some(CloseReason::Admin));
        assert_eq!(links[1].link.0.close_reason(), None);
    }

    #[test]
    fn register_closes_the_holder_and_hands_out_its_link() {
        let store = SessionStore::default();
        let c: Arc<str> = Arc::from("c");
        let alice = || Owner::of(Some("alice"));
        let first = store.register(&c, 1, alice(), true, 0).expect("free");
        assert!(first.previous.is_none());
        assert_eq!(first.link.0.close_reason(), None);
        // Another identity may not take it over; the same one may.
        assert_eq!(
            store.register(&c, 9, Owner::Anonymous, true, 0).err(),
            Some(Refused::Owned(alice()))
        );
        assert_eq!(first.link.0.close_reason(), None, "a refused CONNECT changes nothing");
        let second = store.register(&c, 2, alice(), true, 0).expect("same identity");
        assert_eq!(first.link.0.close_reason(), Some(CloseReason::Takeover));
        let previous = second.previous.clone().expect("the first connection's link");
        assert!(!previous.is_parked());
        drop(first.link);
        assert!(previous.is_parked(), "dropping the guard signals the state is parked");
        store.close_all(CloseReason::Shutdown);
        assert_eq!(second.link.0.close_reason(), Some(CloseReason::Shutdown));
        store.unregister("c", 1);
        assert_eq!(store.connected(), 1, "a stale unregister leaves the new holder");
        store.unregister("c", 2);
        assert_eq!(store.connected(), 0);
    }

    #[tokio::test]
    async fn parked_wakes_the_waiting_connection_and_close_wakes_the_holder() {
        let store = SessionStore::default();
        let c: Arc<str> = Arc::from("c");
        let first = store.register(&c, 1, Owner::Anonymous, true, 0).expect("free");
        // `any`: another identity takes over.
        let second = store.register(&c, 2, Owner::of(Some("bob")), false, 0).expect("any");
        let previous = second.previous.clone().expect("the first connection's link");
        let waiter = tokio::spawn(async move { previous.parked().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "not parked yet");
        drop(first.link);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("the waiter is woken when the guard is dropped")
            .expect("waiter task");
        let link = Arc::clone(&second.link.0);
        let holder = tokio::spawn(async move { poll_fn(|cx| link.poll_close(cx)).await });
        tokio::task::yield_now().await;
        assert!(!holder.is_finished(), "not told to close yet");
        store.close_all(CloseReason::Shutdown);
        let reason = tokio::time::timeout(Duration::from_secs(1), holder)
            .await
            .expect("the holder is woken by close_all")
            .expect("holder task");
        assert_eq!(reason, CloseReason::Shutdown);
        second.link.0.close(CloseReason::Takeover);
        assert_eq!(second.link.0.close_reason(), Some(CloseReason::Shutdown), "first reason wins");
    }
}
