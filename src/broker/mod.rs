//! The broker core shared by all sessions: local subscriptions, shared subscriptions
//! (`shared.rs`), retained messages (`retained.rs`), the registry of connected client ids
//! (takeover) and parked sessions (`sessions.rs`). With a store (`store:` in the config),
//! retained messages and persistent sessions are also written to it (`persist.rs`, which
//! hands the writes to the store's writer; the broker itself still does no I/O) and read back
//! at start (`restore.rs`).
//!
//! No I/O and no `.await` under a lock: subscriptions sit behind a std `RwLock` taken for the
//! length of one tree walk, and delivery to a subscriber is a `try_send` on its bounded queue
//! outside the lock. A full queue drops the message for that subscriber and counts it
//! (`subscriber_queue_full` while connected, `session_queue_full` while parked).

pub mod persist;
pub mod queue;
mod restore;
pub mod retained;
pub mod sessions;
mod shared;
pub mod sys;
pub mod tracking;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::message::Message;
use crate::metrics::Metrics;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::{self, SubscriptionFilter, TopicTree};
use crate::store::codec;
use crate::targets::Outcome;
use persist::{DeliveryStage, Persist, SessionRecord};
use queue::TrySendError;

pub use restore::Restored;
use retained::{Retained, RetainedStore};
pub use sessions::{CloseReason, Expiry, Registration, SessionState, Subscriber};
use sessions::{InFlightStage, SessionStore, Taken};
use shared::{Sent, SharedGroups};
use tracking::{Fate, Mode, Ticket};

/// Matching subscriptions a publish de-duplicates by scanning before it builds an index.
const DEDUP_SCAN: usize = 16;

/// A message on its way to one subscriber's session.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The message, shared with every other recipient.
    pub msg: Arc<Message>,
    /// The QoS to deliver at: the lower of the publish QoS and the granted QoS.
    pub qos: QoS,
    /// The RETAIN flag to deliver with: set for retained messages sent on subscribe, and for
    /// live ones only with MQTT 5 Retain As Published.
    pub retain: bool,
    /// For a delivery of a shared subscription: its filter (`$share/{group}/{filter}`), so
    /// that it goes to another member if this session leaves the group before acknowledging.
    pub shared: Option<Arc<str>>,
    /// MQTT 5 subscription identifiers of every subscription of the session that matched
    /// (§3.3.4: one copy for overlapping subscriptions carries all of them); empty if none.
    pub subscription_ids: Vec<u32>,
    /// For a tracked message (from an AMQP source): this delivery's ticket, finished when the
    /// subscriber has taken it (see `tracking`). `None` for every MQTT → MQTT delivery.
    pub ticket: Option<Ticket>,
    /// Its sequence number in the store, for a QoS 1/2 delivery to a stored (persistent)
    /// session: deleted from the store once acknowledged or dropped.
    pub stored: Option<u64>,
}

/// The options of one subscription that matter when delivering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Granted QoS.
    pub qos: QoS,
    /// MQTT 5 No Local: not delivered messages this session published itself.
    pub no_local: bool,
    /// MQTT 5 Retain As Published.
    pub retain_as_published: bool,
    /// MQTT 5 Subscription Identifier given with the SUBSCRIBE, put on deliveries.
    pub subscription_id: Option<u32>,
}

/// One subscription in the tree.
#[derive(Debug, Clone)]
struct Subscription {
    /// The subscribing session (stable across its connections).
    session_id: u64,
    /// Granted QoS and flags.
    options: SubscribeOptions,
    /// The session's outbound queue.
    subscriber: Arc<Subscriber>,
}

/// Shared state of the MQTT broker side. One per gateway, behind an `Arc`.
#[derive(Debug)]
pub struct Broker {
    /// Local subscriptions by filter.
    subs: RwLock<TopicTree<Subscription>>,
    /// Share groups by filter. Never locked together with `subs`.
    shared: RwLock<SharedGroups>,
    /// Connected client ids and parked sessions.
    sessions: SessionStore,
    /// Retained messages by topic.
    retained: RetainedStore,
    /// Queue QoS 0 messages for parked sessions (`mqtt.queue_qos0`).
    queue_qos0: bool,
    /// MQTT 5 wills waiting for their Will Delay Interval, by client id: the sender tells
    /// the waiting task to publish now (`true`, the session ended) or never (`false`, the
    /// session was resumed). Locked for a map operation only.
    delayed_wills: Mutex<HashMap<String, (u64, oneshot::Sender<bool>)>>,
    /// Source of session and connection ids.
    next_id: AtomicU64,
    /// Round-robin position of work-mode deliveries (`tracking::Mode::Work`).
    work_next: AtomicUsize,
    /// Where drops are counted.
    metrics: Arc<Metrics>,
    /// With a store: where retained messages and persistent sessions are written. `None`
    /// without `store:`, and then nothing here touches it.
    persist: Option<Persist>,
    /// Live traces of routed messages (the web console's): one relaxed load per message
    /// while none is open.
    tracer: crate::trace::Tracer,
    /// With `cluster:`: the other nodes (routing forwards to them; subscriptions register
    /// their interest). Set once at start, before clients connect.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

/// One subscription as the admin API lists it.
#[derive(Debug, Clone)]
pub struct SubscriptionSnapshot {
    /// The filter as subscribed (`$share/{group}/...` for a share group's member).
    pub filter: String,
    /// The subscribing session.
    pub session_id: u64,
    /// Granted QoS and flags.
    pub options: SubscribeOptions,
    /// Messages queued for the session now.
    pub queued: usize,
}

impl Broker {
    /// An empty broker; with `persist`, retained messages and persistent sessions are stored
    /// (restore what the store holds with [`Broker::restore`] before clients connect).
    pub fn new(
        metrics: Arc<Metrics>,
        (max_retained, max_retained_bytes, max_retained_per_client): (usize, usize, usize),
        queue_qos0: bool,
        persist: Option<Persist>,
    ) -> Arc<Broker> {
        Arc::new(Broker {
            subs: RwLock::new(TopicTree::default()),
            shared: RwLock::new(SharedGroups::default()),
            sessions: SessionStore::default(),
            retained: RetainedStore::with_limits(
                max_retained,
                max_retained_bytes,
                max_retained_per_client,
            ),
            queue_qos0,
            delayed_wills: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            work_next: AtomicUsize::new(0),
            tracer: crate::trace::Tracer::new(metrics.trace_dropped.clone()),
            metrics,
            persist,
            cluster: std::sync::OnceLock::new(),
        })
    }

    /// The cluster this node is part of, if any.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    /// Makes this broker a node of `cluster`: the subscriptions it holds now (restored ones)
    /// register their interest, later ones as they come. Called once, before clients connect.
    pub fn attach_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        {
            let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
            subs.for_each(|filter, _| cluster.add_interest(filter));
        }
        {
            let groups = self.shared.read().unwrap_or_else(|p| p.into_inner());
            groups.for_each_member(|filter, _, _, _| cluster.add_interest(filter));
        }
        let _ = self.cluster.set(cluster);
    }

    /// The live traces of routed messages.
    pub fn tracer(&self) -> &crate::trace::Tracer {
        &self.tracer
    }

    /// The admin API's client list: see [`SessionStore::clients`](sessions::SessionStore::clients).
    pub fn clients(
        &self,
        search: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<sessions::ClientSnapshot>, usize) {
        self.sessions.clients(search, after, limit)
    }

    /// The client id `client_id`, connected or parked.
    pub fn client(&self, client_id: &str) -> Option<sessions::ClientSnapshot> {
        self.sessions.client(client_id)
    }

    /// Tells the connection of `client_id` to close (MQTT 5: DISCONNECT 0x98); false when
    /// it is not connected.
    pub fn disconnect_client(&self, client_id: &str) -> bool {
        self.sessions.disconnect(client_id)
    }

    /// The client ids of sessions `ids`, in order.
    pub fn client_ids_of(&self, ids: &[u64]) -> Vec<Option<Arc<str>>> {
        self.sessions.client_ids_of(ids)
    }

    /// At most `limit` subscriptions (share groups' members included) whose filter contains
    /// `search`, after `after` in (filter, session) order, and how many matched in all. One
    /// walk of each tree under its read lock (not both at once), keeping only the page.
    pub fn subscriptions(
        &self,
        search: &str,
        after: Option<(&str, u64)>,
        limit: usize,
        session: Option<u64>,
    ) -> (Vec<SubscriptionSnapshot>, usize) {
        let mut page: std::collections::BTreeMap<(String, u64), SubscriptionSnapshot> =
            Default::default();
        let mut matched = 0;
        let mut consider = |filter: &str,
                            session_id: u64,
                            options: SubscribeOptions,
                            queued: &dyn Fn() -> usize| {
            if session.is_some_and(|s| s != session_id) || !filter.contains(search) {
                return;
            }
            matched += 1;
            if after.is_some_and(|(f, id)| (filter, session_id) <= (f, id)) || limit == 0 {
                return;
            }
            if page.len() == limit {
                match page.last_key_value() {
                    Some(((f, id), _)) if (f.as_str(), *id) > (filter, session_id) => {
                        page.pop_last();
                    }
                    _ => return,
                }
            }
            let snapshot = SubscriptionSnapshot {
                filter: filter.to_owned(),
                session_id,
                options,
                queued: queued(),
            };
            page.insert((filter.to_owned(), session_id), snapshot);
        };
        {
            let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
            subs.for_each(|filter, s| {
                consider(filter, s.session_id, s.options, &|| s.subscriber.queue.len())
            });
        }
        {
            let groups = self.shared.read().unwrap_or_else(|p| p.into_inner());
            groups.for_each_member(|filter, session_id, options, subscriber| {
                consider(filter, session_id, options, &|| subscriber.queue.len())
            });
        }
        (page.into_values().collect(), matched)
    }

    /// The admin API's page of retained messages (see [`RetainedStore::page`]).
    pub fn retained_page(
        &self,
        filter: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Arc<Message>>, bool) {
        self.retained.page(filter, after, limit)
    }

    /// Topics with a retained message.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Clears the retained message of `topic` (an operator's delete; in the store too, when
    /// there is one); false when it has none.
    pub fn clear_retained(&self, topic: &str) -> bool {
        if !self.retained.contains(topic) {
            return false;
        }
        let empty = Arc::new(Message {
            topic: topic.to_owned(),
            payload: bytes::Bytes::new(),
            qos: QoS::AtMostOnce,
            retain: true,
            client_id: Arc::from("mqgate-admin"),
            username: None,
            properties: crate::mqtt::codec::PublishProperties::none(),
            received: std::time::Instant::now(),
            packet_id: None,
            charge: Default::default(),
        });
        self.set_retained(&empty);
        true
    }

    /// A retained message another node of the cluster holds, sent to this node when it
    /// joined: kept only if its topic has none here (one published since is newer); delivered
    /// to nobody. True if kept.
    pub fn retain_if_absent(&self, msg: &Arc<Message>) -> bool {
        if msg.payload.is_empty() || self.retained.contains(&msg.topic) {
            return false;
        }
        self.set_retained(msg);
        true
    }

    /// Where retained messages and persistent sessions are stored, if anywhere.
    pub fn persist(&self) -> Option<&Persist> {
        self.persist.as_ref()
    }

    /// Writes the record of the stored session `state` (connected, kept `expiry` after its
    /// connection ends); with `wait`, a receiver resolved once it is durable. Nothing for a
    /// session that is not stored.
    pub fn store_session(
        &self,
        state: &SessionState,
        expiry: Expiry,
        wait: bool,
    ) -> Option<oneshot::Receiver<Outcome>> {
        // In a cluster, a persistent session's record and its queue's bindings in RabbitMQ.
        let clustered = match self.cluster.get() {
            Some(c) if state.subscriber.is_queued() => c.session_update(state, expiry, wait),
            _ => None,
        };
        let stored = self.persist.as_ref().zip(state.subscriber.stored()).and_then(|(p, key)| {
            p.put_session(key, SessionRecord::of(state, expiry.seconds(), None).encode());
            wait.then(|| p.durable())
        });
        crate::cluster::all_of(clustered.into_iter().chain(stored).collect())
    }

    /// Forgets the stored delivery `seq` of the session of `subscriber` (acknowledged,
    /// dropped or expired).
    pub fn unstore(&self, subscriber: &Subscriber, seq: Option<u64>) {
        if let (Some(p), Some(key), Some(seq)) = (&self.persist, subscriber.stored(), seq) {
            p.delete_delivery(key, seq);
        }
    }

    /// Records in the store that delivery `seq` of `subscriber`'s session was sent as
    /// `packet_id` (so that after a restart it is resent with DUP, with the same id) or, for
    /// QoS 2, released.
    pub fn store_sent(&self, subscriber: &Subscriber, f: &sessions::InFlight) {
        let (Some(p), Some(key), Some(seq)) = (&self.persist, subscriber.stored(), f.stored) else {
            return;
        };
        match codec::encode_message(&f.msg) {
            Ok(encoded) => {
                let stage = DeliveryStage::Sent(f.packet_id, f.stage);
                let value =
                    persist::delivery_value(f.qos, f.retain, &f.subscription_ids, stage, &encoded);
                p.put_delivery(key, seq, value);
            }
            Err(e) => tracing::warn!(error = %e, "delivery state not stored"),
        }
    }

    /// Stores `out` as a delivery of the stored session of `subscriber` (QoS 1/2, not of a
    /// share group); true if it was. `encoded` is the message in the store's encoding, made
    /// on the first call for every session it goes to.
    fn store_delivery(
        &self,
        subscriber: &Subscriber,
        out: &mut Outbound,
        encoded: &mut Option<Vec<u8>>,
    ) -> bool {
        let (Some(p), Some(key)) = (&self.persist, subscriber.stored()) else {
            return false;
        };
        if out.qos == QoS::AtMostOnce || out.shared.is_some() {
            return false;
        }
        if encoded.is_none() {
            match codec::encode_message(&out.msg) {
                Ok(v) => *encoded = Some(v),
                Err(e) => {
                    tracing::warn!(topic = %crate::logtext::LogText(&out.msg.topic), error = %e, "delivery not stored");
                    return false;
                }
            }
        }
        let Some(bytes) = encoded.as_deref() else {
            return false;
        };
        let seq = p.next_seq();
        let stage = DeliveryStage::Queued;
        let value =
            persist::delivery_value(out.qos, out.retain, &out.subscription_ids, stage, bytes);
        p.put_delivery(key, seq, value);
        out.stored = Some(seq);
        true
    }

    /// Stores or clears the retained message of `msg.topic`; true when the change goes to
    /// the store (`$SYS/` topics, which describe this process, are not stored).
    fn set_retained(&self, msg: &Arc<Message>) -> bool {
        let set = self.retained.set(msg);
        if set == Retained::Full {
            // Still delivered live; only not kept as the topic's last value.
            self.metrics.dropped("retained_store_full");
            return false;
        }
        match &self.persist {
            Some(p) if set != Retained::Unchanged && !msg.topic.starts_with("$SYS/") => {
                p.retained(&msg.topic, (set == Retained::Stored).then(|| Arc::clone(msg)));
                true
            }
            _ => false,
        }
    }

    /// Whether a retained `msg` fits `mqtt.max_retained_bytes` (always, for one that clears
    /// its topic or is not retained).
    pub fn retained_has_room(&self, topic: &str, payload_len: usize) -> bool {
        self.retained.has_room(topic, payload_len)
    }

    /// Why a retained PUBLISH from `client_id` would not be kept (`mqtt.max_retained_bytes`,
    /// `mqtt.max_retained_per_client`): the `messages_dropped` reason, or `None` when it fits.
    pub fn retained_refusal(
        &self,
        client_id: &str,
        topic: &str,
        payload_len: usize,
    ) -> Option<&'static str> {
        self.retained.room_for(Some(client_id), topic, payload_len).err().map(|r| r.reason())
    }

    /// A fresh id for a session or a connection.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a connection of identity `owner` for `client_id`, telling any connection
    /// that held it to close (takeover): see
    /// [`SessionStore::register`](sessions::SessionStore::register). Wait for `previous` to
    /// be parked before [`Broker::take_session`].
    pub fn register(
        &self,
        client_id: &Arc<str>,
        owner: sessions::Owner,
        same_identity: bool,
        max_sessions: usize,
    ) -> Result<Registration, sessions::Refused> {
        self.sessions.register(client_id, self.next_id(), owner, same_identity, max_sessions)
    }

    /// After a config reload: closes the connections `revoked` names (see
    /// [`SessionStore::reloaded`]), wakes the others to take the new ACL.
    pub fn reloaded(&self, revoked: &dyn Fn(&str, &sessions::Owner) -> bool) -> usize {
        self.sessions.reloaded(revoked)
    }

    /// Tells every registered connection to close because the gateway shuts down.
    pub fn close_connections(&self) {
        self.sessions.close_all(CloseReason::Shutdown);
    }

    /// Forgets `client_id` if it is still held by the connection `conn_id` (in a cluster:
    /// the connection's claim on the client id ends too).
    pub fn unregister(&self, client_id: &str, conn_id: u64) {
        self.sessions.unregister(client_id, conn_id);
        if let Some(c) = self.cluster.get() {
            c.release(client_id, conn_id);
        }
    }

    /// Another node of the cluster took `client_id` over: a connection holding it here is
    /// told to close (MQTT 5: DISCONNECT 0x8E) and a session parked here is discarded (the
    /// client's session is the other node's now). Returns the closing connection's link: once
    /// it has parked, [`Broker::take_session`] and discard what it left.
    pub fn taken_elsewhere(&self, client_id: &str) -> Option<Arc<sessions::ConnLink>> {
        let link = self.sessions.close_conn(client_id, CloseReason::Takeover);
        if let Some(state) = self.take_session(client_id) {
            self.discard_session(state);
        }
        link
    }

    /// Records that the will of `client_id` waits for its delay. Returns the entry's id (for
    /// [`Broker::will_done`]) and the receiver the waiting task selects on: `true` publish
    /// now, `false` drop it. A will still waiting for the same client id is told to publish
    /// now (its session has ended, or this one could not have started).
    pub fn delay_will(&self, client_id: &str) -> (u64, oneshot::Receiver<bool>) {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id();
        let mut wills = self.delayed_wills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, older)) = wills.insert(client_id.to_owned(), (id, tx)) {
            let _ = older.send(true);
        }
        (id, rx)
    }

    /// A connection of `client_id` completed its CONNECT: a will waiting for its delay is
    /// dropped if the session was resumed, and published now if it was not (the session
    /// ended: clean start, or expired; MQTT 5 §3.1.3.2.2).
    pub fn claim_will(&self, client_id: &str, resumed: bool) {
        let mut wills = self.delayed_wills.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, tx)) = wills.remove(client_id) {
            let _ = tx.send(!resumed);
        }
    }

    /// Forgets the delayed will `id` of `client_id` once its task is done with it.
    pub fn will_done(&self, client_id: &str, id: u64) {
        let mut wills = self.delayed_wills.lock().unwrap_or_else(|p| p.into_inner());
        if wills.get(client_id).is_some_and(|(current, _)| *current == id) {
            wills.remove(client_id);
        }
    }

    /// Number of connected sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.connected()
    }

    /// Number of parked (offline) sessions.
    pub fn parked_count(&self) -> usize {
        self.sessions.parked()
    }

    /// Takes the parked session of `client_id` for a connection that resumes it; `None` if
    /// there is none or it expired (then it is discarded here).
    pub fn take_session(&self, client_id: &str) -> Option<SessionState> {
        match self.sessions.take(client_id, Instant::now()) {
            Taken::Nothing => None,
            Taken::Resumed(state) => Some(state),
            Taken::Expired(state) => {
                self.end_session(client_id, state);
                None
            }
        }
    }

    /// [`Broker::take_session`] for a CONNECT: a parked session that expired is discarded
    /// here, but its cluster queue is left to the caller (`true`: one was there), which
    /// deletes it before it opens the client's new session (a deletion sent on its way here
    /// could overtake that and end the new one).
    pub fn take_session_for_connect(&self, client_id: &str) -> (Option<SessionState>, bool) {
        match self.sessions.take(client_id, Instant::now()) {
            Taken::Nothing => (None, false),
            Taken::Resumed(state) => (Some(state), false),
            Taken::Expired(state) => {
                let queued = state.subscriber.is_queued();
                self.discard_session(state);
                (None, queued)
            }
        }
    }

    /// Keeps `state` for `client_id` as `expiry` says, or discards it (`Expiry::Now`).
    pub fn park_session(&self, client_id: &str, state: SessionState, expiry: Expiry) {
        let expires = match expiry {
            Expiry::Now => return self.end_session(client_id, state),
            Expiry::After(s) => Some(Instant::now() + std::time::Duration::from_secs(s.into())),
            Expiry::Never => None,
        };
        let mut state = state;
        if state.subscriber.is_queued() {
            // A cluster session's unacknowledged messages go back to its queue in RabbitMQ
            // (its consumer is closed before their tickets drop): not kept here. An expiry
            // its DISCONNECT changed is told to the other nodes (they end the session if this
            // node dies before it expires).
            if let Some(c) = self.cluster.get() {
                c.session_parked(state.id, expiry.seconds());
                c.session_ended(state.id);
            }
            state.inflight.retain(|f| f.shared.is_some());
            state.inflight_ids = state.inflight.iter().map(|f| f.packet_id).collect();
            drop(state.subscriber.queue.remove_unless(|out| out.shared.is_some()));
        }
        // Tracked deliveries kept in the parked session (in flight or queued) are MQTT's now
        // (a stored session's once what it wrote so far is durable).
        let durable = self.persist.as_ref().filter(|_| state.subscriber.stored().is_some());
        let tickets = state.inflight.iter_mut().filter_map(|f| f.ticket.take());
        for t in tickets.chain(state.subscriber.queue.take_tickets()) {
            match durable {
                Some(p) => p.finish_when_durable(t),
                None => t.finish(Fate::Taken),
            }
        }
        if let (Some(p), Some(key)) = (&self.persist, state.subscriber.stored()) {
            let record = SessionRecord::of(&state, expiry.seconds(), Some(SystemTime::now()));
            p.put_session(key, record.encode());
        }
        if let Some(replaced) = self.sessions.park(client_id, state, expires) {
            // Two connections raced: the record in the store is the parked one's now.
            self.discard(replaced, false);
        }
    }

    /// Ends the session of `client_id` for good (it expired, or its expiry was 0 when its
    /// connection ended), as [`Broker::discard_session`]; in a cluster its queue and record in
    /// RabbitMQ go too and every node forgets it, whatever interval the queue was declared
    /// with.
    pub fn end_session(&self, client_id: &str, state: SessionState) {
        if state.subscriber.is_queued() {
            if let Some(c) = self.cluster.get() {
                c.drop_session(client_id, true);
            }
        }
        self.discard_session(state);
    }

    /// Ends a session: removes its subscriptions; its queued messages are dropped with it,
    /// except the QoS 1/2 deliveries of shared subscriptions not yet acknowledged (queued, or
    /// sent and not PUBACKed/PUBRECed): those go to another member of their group.
    /// A stored session's records go from the store.
    pub fn discard_session(&self, state: SessionState) {
        self.discard(state, true);
    }

    /// [`Broker::discard_session`]; the store is left alone unless `forget_stored`.
    fn discard(&self, mut state: SessionState, forget_stored: bool) {
        if state.subscriber.is_queued() {
            // Its queue in RabbitMQ stays (another node may resume it; `end_session` or
            // `x-expires` ends it); only this node's consumer goes, and the deliveries it
            // holds go back there.
            if let Some(c) = self.cluster.get() {
                c.session_ended(state.id);
            }
            state.inflight.retain(|f| f.shared.is_some());
            drop(state.subscriber.queue.remove_unless(|out| out.shared.is_some()));
        }
        if let (true, Some(p), Some(key)) =
            (forget_stored, &self.persist, state.subscriber.stored())
        {
            p.delete_session(key);
        }
        for filter in std::mem::take(&mut state.filters).into_keys() {
            self.unsubscribe(state.id, &filter);
        }
        // Nothing new arrives now; a late `try_send` sees the queue closed.
        state.subscriber.queue.close();
        let mut orphans = Vec::new();
        let mut work = Vec::new();
        for f in state.inflight.drain(..) {
            match (f.shared, f.stage) {
                // Released (PUBREC received): the client has the message; not sent again.
                (_, InFlightStage::Released) => tracking::finish(f.ticket, Fate::Taken),
                (Some(key), InFlightStage::Published) => orphans.push((key, f.msg, f.ticket)),
                (None, InFlightStage::Published) => work.push((f.msg, f.ticket)),
            }
        }
        while let Some(out) = state.subscriber.queue.try_recv() {
            match (out.shared, out.qos) {
                (Some(key), QoS::AtLeastOnce | QoS::ExactlyOnce) => {
                    orphans.push((key, out.msg, out.ticket))
                }
                _ => work.push((out.msg, out.ticket)),
            }
        }
        for (key, msg, ticket) in orphans {
            self.redeliver_shared_tracked(&key, &msg, ticket);
        }
        // Tracked deliveries of this session: a work-mode one goes to another subscriber;
        // a broadcast one had only this subscriber to reach, which is gone.
        for (msg, ticket) in work {
            match ticket {
                Some(t) if t.mode() == Mode::Work => self.redeliver_work(&msg, t),
                other => tracking::finish(other, Fate::Gone),
            }
        }
    }

    /// Hands `msg`, a work-mode delivery whose session left without acknowledging it, to
    /// another matching subscriber; finished as gone when there is none.
    fn redeliver_work(&self, msg: &Arc<Message>, ticket: Ticket) {
        let mut ticket = Some(ticket);
        self.deliver_work(msg, &mut ticket);
        match ticket {
            None => {
                tracing::debug!(topic = %crate::logtext::LogText(&msg.topic), "work delivery handed to another subscriber")
            }
            Some(t) => t.finish(Fate::Gone),
        }
    }

    /// Hands `msg`, a delivery of the shared subscription `key` that a member left without
    /// acknowledging, to another member of the group (a new delivery). Dropped and counted
    /// if no member is left (`shared_member_left`) or all are full (`shared_group_full`).
    pub fn redeliver_shared(&self, key: &str, msg: &Arc<Message>) {
        self.redeliver_shared_tracked(key, msg, None);
    }

    /// [`Broker::redeliver_shared`] of a delivery that may carry a ticket: it goes with the
    /// message to the new member, or is finished as gone (no member) or failed (all full).
    /// A cluster share queue's delivery ([`Mode::Group`]) that no member here can take is
    /// neither: it is finished as returned (its delivery goes back to RabbitMQ, for another
    /// node's members), and nothing is dropped.
    pub fn redeliver_shared_tracked(&self, key: &str, msg: &Arc<Message>, ticket: Option<Ticket>) {
        let mut ticket = ticket;
        let returns = ticket.as_ref().is_some_and(|t| t.mode() == Mode::Group);
        let sent = match topic::parse_subscription(key) {
            Ok(SubscriptionFilter { group: Some(_), filter }) => {
                let groups = self.shared.read().unwrap_or_else(|p| p.into_inner());
                groups.get(key, filter).map(|g| g.send(msg, self.queue_qos0, &mut ticket))
            }
            _ => None,
        };
        let fate = match sent {
            _ if returns => Fate::Returned,
            Some(Sent::Full) => Fate::Failed,
            _ => Fate::Gone,
        };
        tracking::finish(ticket, fate);
        match sent {
            Some(Sent::Delivered) => {
                self.metrics.messages_delivered_local.inc();
                tracing::debug!(%key, topic = %crate::logtext::LogText(&msg.topic), "shared delivery handed to another member");
            }
            _ if returns => {
                tracing::debug!(%key, topic = %crate::logtext::LogText(&msg.topic), "shared delivery goes back to the share queue")
            }
            Some(Sent::Full) => self.metrics.dropped("shared_group_full"),
            Some(Sent::NoMember) | None => self.metrics.dropped("shared_member_left"),
        }
    }

    /// Discards every parked session whose expiry has passed; returns how many.
    pub fn expire_sessions(&self) -> usize {
        let gone = self.sessions.expired(Instant::now());
        let n = gone.len();
        for (client_id, state) in gone {
            self.end_session(&client_id, state);
        }
        n
    }

    /// Adds (or replaces) the subscription of `session_id` to `filter` (valid for
    /// [`topic::parse_subscription`]); a `$share/{group}/{filter}` one joins the group.
    pub fn subscribe(
        &self,
        session_id: u64,
        filter: &str,
        options: SubscribeOptions,
        subscriber: &Arc<Subscriber>,
    ) {
        if let Ok(SubscriptionFilter { group: Some(_), filter: inner }) =
            topic::parse_subscription(filter)
        {
            let mut groups = self.shared.write().unwrap_or_else(|p| p.into_inner());
            let joined = groups.join(filter, inner, session_id, options, subscriber);
            drop(groups);
            self.interest(joined, true, filter);
            return;
        }
        let queued = subscriber.is_queued();
        let subscriber = Arc::clone(subscriber);
        let mut subs = self.subs.write().unwrap_or_else(|p| p.into_inner());
        let replaced = subs.remove(filter, |s| s.session_id == session_id) > 0;
        subs.insert(filter, Subscription { session_id, options, subscriber });
        drop(subs);
        self.interest(!replaced, true, filter);
        if let (Some(c), true, false) = (self.cluster.get(), queued, replaced) {
            c.session_filter(filter, true);
        }
    }

    /// Tells the cluster (if any) that a subscription to `filter` came (`added`) or went,
    /// when `changed`.
    fn interest(&self, changed: bool, added: bool, filter: &str) {
        match self.cluster.get() {
            Some(c) if changed && added => c.add_interest(filter),
            Some(c) if changed => c.remove_interest(filter),
            _ => {}
        }
    }

    /// Removes the subscription of `session_id` to `filter`; true if there was one. For a
    /// `$share/...` filter only that group membership goes.
    pub fn unsubscribe(&self, session_id: u64, filter: &str) -> bool {
        if let Ok(SubscriptionFilter { group: Some(_), filter: inner }) =
            topic::parse_subscription(filter)
        {
            let mut groups = self.shared.write().unwrap_or_else(|p| p.into_inner());
            let left = groups.leave(filter, inner, session_id);
            drop(groups);
            self.interest(left, false, filter);
            return left;
        }
        let mut queued = false;
        let mut subs = self.subs.write().unwrap_or_else(|p| p.into_inner());
        let removed = subs.remove(filter, |s| {
            let this = s.session_id == session_id;
            queued |= this && s.subscriber.is_queued();
            this
        }) > 0;
        drop(subs);
        self.interest(removed, false, filter);
        if let (Some(c), true) = (self.cluster.get(), queued) {
            c.session_filter(filter, false);
        }
        removed
    }

    /// A message from the cluster session queue of session `session_id` (client
    /// `client_id`): matched exactly against that session's own subscriptions and queued for
    /// it with a child of `root` (one copy, at the highest granted QoS, with every matching
    /// subscription identifier; No Local by client id). `Full`: the session's queue has no
    /// room now, nothing was done (the caller tries again later).
    pub fn deliver_queued(
        &self,
        session_id: u64,
        client_id: &str,
        msg: &Arc<Message>,
        root: &Ticket,
    ) -> Queued {
        let mut hit: Option<(SubscribeOptions, Arc<Subscriber>, Vec<u32>)> = None;
        {
            let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
            subs.for_each_match(&msg.topic, |s| {
                if s.session_id != session_id
                    || (s.options.no_local && &*msg.client_id == client_id)
                {
                    return;
                }
                match &mut hit {
                    Some((o, _, ids)) => {
                        o.qos = o.qos.max(s.options.qos);
                        o.retain_as_published |= s.options.retain_as_published;
                        ids.extend(s.options.subscription_id);
                    }
                    None => {
                        let ids = s.options.subscription_id.into_iter().collect();
                        hit = Some((s.options, Arc::clone(&s.subscriber), ids));
                    }
                }
            });
        }
        let Some((options, subscriber, subscription_ids)) = hit else { return Queued::NoMatch };
        let mut out = Outbound {
            msg: Arc::clone(msg),
            qos: msg.qos.min(options.qos),
            retain: msg.retain && options.retain_as_published,
            shared: None,
            subscription_ids,
            ticket: None,
            stored: None,
        };
        if !subscriber.queue.has_room_for(&out) {
            return Queued::Full;
        }
        out.ticket = Some(root.child());
        match subscriber.queue.try_send(out) {
            Ok(()) => {
                self.metrics.messages_delivered_local.inc();
            }
            // Dropped with its ticket (failed: the delivery is acknowledged, as a full queue
            // drops a message on one node), or the session is parking (its queue's consumer
            // is closed first: RabbitMQ delivers it again).
            Err(TrySendError::Full(_)) => self.metrics.dropped("subscriber_queue_full"),
            Err(TrySendError::Closed(_)) => {}
        }
        Queued::Taken
    }

    /// Stores or clears the retained message of `msg.topic` (when `msg.retain`), then hands
    /// `msg` to every local subscriber whose filter matches: one copy per session at the
    /// highest granted QoS, and one copy per matching share group to one of its members.
    /// `publisher` is the publishing session, for No Local. Returns how many sessions and
    /// groups matched (delivered or dropped).
    ///
    /// With a store, a QoS 1/2 message that changes a retained message or is queued for a
    /// stored session puts a receiver into `waits` that resolves once those writes are
    /// durable: the publisher's acknowledgement waits for it. Nothing is added otherwise.
    pub fn publish(
        &self,
        msg: &Arc<Message>,
        publisher: Option<u64>,
        waits: &mut crate::targets::Waits,
    ) -> usize {
        self.publish_inner(msg, publisher, None, Some(waits), true)
    }

    /// Publishes a tracked message (from an AMQP source): like [`Broker::publish`] in
    /// [`Mode::Broadcast`], to one matching session or share group in [`Mode::Work`]. Every
    /// delivery made carries a child of `root`, which the caller finishes afterwards (see
    /// `tracking`). Returns how many deliveries were made or attempted.
    pub fn publish_tracked(&self, msg: &Arc<Message>, root: &Ticket) -> usize {
        self.tracer.offer(msg, "source", Vec::new);
        match root.mode() {
            // A share queue's deliveries go through `deliver_to_group`, not here.
            Mode::Broadcast | Mode::Group => self.publish_inner(msg, None, Some(root), None, false),
            Mode::Work => {
                if msg.retain {
                    self.set_retained(msg);
                }
                let mut ticket = Some(root.child());
                let attempted = self.deliver_work(msg, &mut ticket);
                // Not delivered: dropped unfinished, a failure (all full), or gone (nobody).
                if attempted == 0 {
                    tracking::finish(ticket, Fate::Gone);
                }
                attempted
            }
        }
    }

    /// A source's message (`publish_tracked`); with `forward` (the source's `cluster:
    /// forward`) in a cluster that reaches RabbitMQ, a broadcast one is also forwarded as an
    /// MQTT publish on this node is (every node's subscribers, every persistent session's
    /// queue, retained on every node), and this node's persistent sessions get it through
    /// their queues, not here. The forward is a child of `root`: finished once RabbitMQ
    /// confirmed it (QoS 1/2), failed when it refused it or the forwarding queue was full
    /// (the source's `on_failure` applies: no wait in the source's task).
    pub fn publish_source(&self, msg: &Arc<Message>, root: &Ticket, forward: bool) -> usize {
        let cluster = self
            .cluster
            .get()
            .filter(|c| forward && root.mode() == Mode::Broadcast && c.is_connected());
        let Some(cluster) = cluster else { return self.publish_tracked(msg, root) };
        self.tracer.offer(msg, "source", Vec::new);
        let mut waits = crate::targets::Waits::new();
        let mut blocked = crate::targets::Blocked::new();
        if !cluster.forward(msg, &mut waits, &mut blocked) {
            // No node nor persistent session can match it: what this node does decides (and
            // with nobody here either, the source's `on_no_subscriber`).
            return self.publish_inner(msg, None, Some(root), None, true);
        }
        let child = root.child();
        if !blocked.is_empty() {
            // The forwarding queue is full: not forwarded (dropping the send drops its
            // outcome's sender), the delivery fails and is retried by the source's policy.
            drop(blocked);
            self.metrics.dropped("cluster_forward_full");
            tracking::finish(Some(child), Fate::Failed);
        } else if waits.is_empty() {
            tracking::finish(Some(child), Fate::Taken);
        } else {
            tokio::spawn(async move {
                let mut fate = Fate::Taken;
                for w in waits {
                    if !matches!(w.await, Ok(crate::targets::Outcome::Delivered)) {
                        fate = Fate::Failed;
                    }
                }
                child.finish(fate);
            });
        }
        1 + self.publish_inner(msg, None, Some(root), None, true)
    }

    /// Work mode: hands `msg` with `ticket` to one of the sessions and share groups matching
    /// its topic, round robin, connected ones first, skipping full queues. Returns how many
    /// candidates there were (0: nobody matches); `ticket` is left in place when no candidate
    /// took the message.
    fn deliver_work(&self, msg: &Arc<Message>, ticket: &mut Option<Ticket>) -> usize {
        let mut sessions: Vec<(u64, SubscribeOptions, Arc<Subscriber>)> = Vec::new();
        {
            let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
            subs.for_each_match(&msg.topic, |s| {
                if s.subscriber.is_queued() && !s.subscriber.is_online() {
                    return;
                }
                match sessions.iter_mut().find(|h| h.0 == s.session_id) {
                    Some(h) => h.1.qos = h.1.qos.max(s.options.qos),
                    None => sessions.push((s.session_id, s.options, Arc::clone(&s.subscriber))),
                }
            });
        }
        let groups = self.shared.read().unwrap_or_else(|p| p.into_inner());
        let mut matched_groups = Vec::new();
        if !groups.is_empty() {
            groups.for_each_match(&msg.topic, |g| matched_groups.push(g));
        }
        let n = sessions.len() + matched_groups.len();
        if n == 0 {
            return 0;
        }
        let start = self.work_next.fetch_add(1, Ordering::Relaxed);
        for online in [true, false] {
            for i in 0..n {
                let k = start.wrapping_add(i) % n;
                if let Some((_, options, subscriber)) = sessions.get(k) {
                    if subscriber.is_online() != online {
                        continue;
                    }
                    let qos = msg.qos.min(options.qos);
                    if !online && qos == QoS::AtMostOnce && !self.queue_qos0 {
                        continue;
                    }
                    let mut out = Outbound {
                        msg: Arc::clone(msg),
                        qos,
                        retain: msg.retain && options.retain_as_published,
                        shared: None,
                        subscription_ids: options.subscription_id.into_iter().collect(),
                        ticket: if online { ticket.take() } else { None },
                        stored: None,
                    };
                    let stored = self.store_delivery(subscriber, &mut out, &mut None);
                    match subscriber.queue.try_send(out) {
                        Ok(()) => {
                            match (ticket.take(), &self.persist) {
                                (Some(t), Some(p)) if stored => p.finish_when_durable(t),
                                (t, _) => tracking::finish(t, Fate::Taken),
                            }
                            self.metrics.messages_delivered_local.inc();
                            return n;
                        }
                        Err(TrySendError::Full(out) | TrySendError::Closed(out)) => {
                            self.unstore(subscriber, out.stored);
                            if out.ticket.is_some() {
                                *ticket = out.ticket;
                            }
                        }
                    }
                } else if online {
                    // A share group: its own round robin over its members (online first).
                    let g = matched_groups[k - sessions.len()];
                    if g.send(msg, self.queue_qos0, ticket) == Sent::Delivered {
                        self.metrics.messages_delivered_local.inc();
                        return n;
                    }
                }
            }
        }
        self.metrics.dropped("work_no_room");
        n
    }

    /// [`Broker::publish`], with a ticket per delivery when `tracked` is given.
    /// `queued_elsewhere`: the cluster's persistent sessions get `msg` through their queues
    /// (it was forwarded), so none here gets it directly; otherwise (a source's message not
    /// forwarded) those connected here do.
    fn publish_inner(
        &self,
        msg: &Arc<Message>,
        publisher: Option<u64>,
        tracked: Option<&Ticket>,
        waits: Option<&mut crate::targets::Waits>,
        queued_elsewhere: bool,
    ) -> usize {
        // Whether something was written to the store that the publisher must wait for.
        let mut durable = msg.retain && self.set_retained(msg);
        // The message in the store's encoding, made once if a stored session gets it.
        let mut encoded = None;
        let mut hits: Vec<(u64, SubscribeOptions, Arc<Subscriber>, Vec<u32>)> = Vec::new();
        // Sessions matching through several subscriptions get one copy: found by a scan while
        // the matches are few, through an index once they are many (linear, not quadratic,
        // in the number of matching subscriptions).
        let mut index: Option<IdMap<usize>> = None;
        {
            let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
            subs.for_each_match(&msg.topic, |s| {
                if s.options.no_local && publisher == Some(s.session_id) {
                    return;
                }
                // A cluster's persistent session gets its messages through its session queue
                // (`deliver_queued`); a source's not forwarded one only while connected.
                if s.subscriber.is_queued() && (queued_elsewhere || !s.subscriber.is_online()) {
                    return;
                }
                if index.is_none() && hits.len() >= DEDUP_SCAN {
                    index = Some(hits.iter().enumerate().map(|(i, h)| (h.0, i)).collect());
                }
                let found = match &mut index {
                    Some(index) => match index.entry(s.session_id) {
                        std::collections::hash_map::Entry::Occupied(e) => hits.get_mut(*e.get()),
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(hits.len());
                            None
                        }
                    },
                    None => hits.iter_mut().find(|h| h.0 == s.session_id),
                };
                match found {
                    Some(h) => {
                        h.1.qos = h.1.qos.max(s.options.qos);
                        h.1.retain_as_published |= s.options.retain_as_published;
                        h.3.extend(s.options.subscription_id);
                    }
                    None => hits.push((
                        s.session_id,
                        s.options,
                        Arc::clone(&s.subscriber),
                        s.options.subscription_id.into_iter().collect(),
                    )),
                }
            });
        }
        // Counted once per publish: a fan-out to thousands of full queues must not look a
        // metric label up thousands of times.
        let mut tally = Tally::default();
        for (_, options, subscriber, ids) in &mut hits {
            let qos = msg.qos.min(options.qos);
            let online = subscriber.is_online();
            // As Mosquitto: a parked session queues QoS 1/2 only, unless `mqtt.queue_qos0`.
            if !online && qos == QoS::AtMostOnce && !self.queue_qos0 {
                continue;
            }
            let ticket = tracked.map(Ticket::child);
            let mut out = Outbound {
                msg: Arc::clone(msg),
                qos,
                retain: msg.retain && options.retain_as_published,
                shared: None,
                subscription_ids: std::mem::take(ids),
                ticket: if online { ticket.clone() } else { None },
                stored: None,
            };
            // A full queue drops it now, before anything is written to the store for it (only
            // a stored session's deliveries: the others need no second look at the queue).
            let stores = qos != QoS::AtMostOnce && subscriber.stored().is_some();
            if stores && !subscriber.queue.has_room_for(&out) {
                if online {
                    tally.online_full += 1;
                } else {
                    tally.parked_full += 1;
                }
                continue;
            }
            // Stored before it is queued: its delete (after the PUBACK) comes after the put.
            let stored = self.store_delivery(subscriber, &mut out, &mut encoded);
            durable |= stored;
            match subscriber.queue.try_send(out) {
                Ok(()) => {
                    // Queued in a parked (persistent) session: MQTT has taken it (once it
                    // is durable, for a stored one).
                    if !online {
                        match (ticket, &self.persist) {
                            (Some(t), Some(p)) if stored => p.finish_when_durable(t),
                            (t, _) => tracking::finish(t, Fate::Taken),
                        }
                    }
                    tally.delivered += 1;
                }
                // Drop the newest: what is queued keeps its order and is delivered first.
                Err(TrySendError::Full(out)) if online => {
                    self.unstore(subscriber, out.stored);
                    tally.online_full += 1;
                }
                Err(TrySendError::Full(out)) => {
                    self.unstore(subscriber, out.stored);
                    tally.parked_full += 1;
                }
                // The session is ending; its subscriptions are about to be removed.
                Err(TrySendError::Closed(out)) => {
                    self.unstore(subscriber, out.stored);
                    tracking::finish(ticket, Fate::Gone);
                    tally.gone += 1;
                }
            }
        }
        self.metrics.messages_delivered_local.inc_by(tally.delivered);
        self.metrics.dropped_n("subscriber_queue_full", tally.online_full);
        self.metrics.dropped_n("session_queue_full", tally.parked_full);
        self.metrics.dropped_n("subscriber_gone", tally.gone);
        if let (true, Some(p), Some(waits)) = (durable, &self.persist, waits) {
            if msg.qos != QoS::AtMostOnce {
                waits.push(p.durable());
            }
        }
        hits.len() + self.publish_shared(msg, tracked)
    }

    /// Hands `msg` with `ticket` (of a [`Mode::Group`] tracker) to one member of the share
    /// group `key` (`$share/{group}/{filter}`) whose filter is `filter`: the cluster's share
    /// queue delivered it to this node. `Taken`: queued for a member (the ticket goes with
    /// it). `Full`: every member's queue is full: nothing done, `ticket` left in place (the
    /// caller holds the message back and tries again). `NoMatch`: the ticket is finished,
    /// as returned when the group has no member here any more (another node's may take
    /// it), as gone when its members here may not take it (QoS 0, only parked members:
    /// dropped, as on one node).
    pub fn deliver_to_group(
        &self,
        key: &str,
        filter: &str,
        msg: &Arc<Message>,
        ticket: &mut Option<Ticket>,
    ) -> Queued {
        let groups = self.shared.read().unwrap_or_else(|p| p.into_inner());
        let Some(g) = groups.get(key, filter) else {
            tracking::finish(ticket.take(), Fate::Returned);
            return Queued::NoMatch;
        };
        match g.send(msg, self.queue_qos0, ticket) {
            Sent::Delivered => {
                self.metrics.messages_delivered_local.inc();
                Queued::Taken
            }
            Sent::Full => Queued::Full,
            Sent::NoMember => {
                tracking::finish(ticket.take(), Fate::Gone);
                self.metrics.dropped("shared_group_gone");
                Queued::NoMatch
            }
        }
    }

    /// Hands `msg` to one member of every matching share group; returns how many matched.
    fn publish_shared(&self, msg: &Arc<Message>, tracked: Option<&Ticket>) -> usize {
        let groups = self.shared.read().unwrap_or_else(|p| p.into_inner());
        if groups.is_empty() {
            return 0;
        }
        // In a cluster that reaches RabbitMQ, share groups get their messages through it (one
        // member cluster-wide: `deliver_to_group`), not here.
        if self.cluster.get().is_some_and(|c| c.serves_groups()) {
            return 0;
        }
        let mut matched = 0;
        groups.for_each_match(&msg.topic, |g| {
            matched += 1;
            let mut ticket = tracked.map(Ticket::child);
            match g.send(msg, self.queue_qos0, &mut ticket) {
                Sent::Delivered => {
                    self.metrics.messages_delivered_local.inc();
                }
                Sent::Full => self.metrics.dropped("shared_group_full"),
                Sent::NoMember => tracking::finish(ticket, Fate::Gone),
            }
        });
        matched
    }

    /// The retained messages whose topics match `filter`.
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        self.retained.matching(filter)
    }

    /// One step of a SUBSCRIBE's walk over the retained messages (see
    /// [`RetainedStore::walk`]).
    pub fn retained_walk(
        &self,
        filter: &str,
        from: std::ops::Bound<&str>,
        max_matches: usize,
        max_looked: usize,
    ) -> (Vec<Arc<Message>>, Option<String>) {
        self.retained.walk(filter, from, max_matches, max_looked)
    }

    /// At most `limit` retained messages whose topics match `filter` (see
    /// [`RetainedStore::matching_at_most`]): a SUBSCRIBE asks for no more than its queue holds.
    pub fn retained_matching_at_most(&self, filter: &str, limit: usize) -> Vec<Arc<Message>> {
        self.retained.matching_at_most(filter, limit)
    }
}

/// What [`Broker::deliver_queued`] did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// Queued for the session (or dropped, counted, if its queue filled up meanwhile).
    Taken,
    /// None of the session's subscriptions matches it.
    NoMatch,
    /// The session's queue has no room now: nothing done.
    Full,
}

/// Hashes a session id (a counter, not chosen by clients) with one multiplication: the
/// fan-out's de-duplication looks one up per matching subscription, and SipHash was a tenth
/// of a large fan-out's time.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits (the table's control bytes) are well mixed.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by session id.
type IdMap<V> = HashMap<u64, V, std::hash::BuildHasherDefault<IdHasher>>;

/// What one fan-out did, added to the metrics once at its end.
#[derive(Default)]
struct Tally {
    delivered: u64,
    online_full: u64,
    parked_full: u64,
    gone: u64,
}

#[cfg(test)]
mod fanout_tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::mqtt::codec::PublishProperties;

    #[test]
    fn a_publish_to_many_sessions_is_linear_in_them() {
        let broker = Broker::new(Metrics::new(), (1000, usize::MAX, 0), false, None);
        let options = SubscribeOptions {
            qos: QoS::AtMostOnce,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
        };
        let mut sessions = Vec::new();
        for id in 0..30_000u64 {
            let state = SessionState::new(id + 1, 4, None);
            broker.subscribe(id + 1, "fan/out", options, &state.subscriber);
            // Overlapping subscriptions of the same session: one copy.
            if id % 100 == 0 {
                broker.subscribe(id + 1, "fan/+", options, &state.subscriber);
            }
            sessions.push(state);
        }
        let msg = Arc::new(Message {
            charge: Default::default(),
            topic: "fan/out".into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: false,
            client_id: Arc::from("p"),
            username: None,
            properties: PublishProperties::none(),
            received: std::time::Instant::now(),
            packet_id: None,
        });
        let start = Instant::now();
        let delivered = broker.publish(&msg, None, &mut crate::targets::Waits::new());
        let took = start.elapsed();
        eprintln!("publish to {delivered} sessions: {took:?}");
        assert_eq!(delivered, 30_000, "one copy per session");
        // Quadratic de-duplication took seconds here; linear takes milliseconds.
        assert!(took < Duration::from_millis(300), "{took:?}");
        assert!(sessions.iter().all(|s| s.subscriber.queue.len() == 1));
    }
}
