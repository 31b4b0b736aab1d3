//! Several mqgate nodes acting as one MQTT broker, with RabbitMQ as the backbone
//! (`cluster:` in the config; docs/cluster.md). Without `cluster:` nothing here exists and
//! routing pays one `OnceLock` load per message.
//!
//! Cross-node delivery: a message routed on a node (a PUBLISH, a will, an HTTP publish) that
//! another node's binding keys may match (`peers`: each node announces its keys to the others)
//! is also published, once, to the topic exchange `{prefix}.messages` with a coarse routing key
//! (`keys`). Each node consumes its own exclusive, auto-deleted queue
//! `{prefix}.node.{node_id}`, bound with one binding key per distinct coarse key of its
//! subscriptions (reference-counted here: a binding is added on the first subscription that
//! needs it and removed with the last), plus `r.#` so that every node keeps every retained
//! message. What arrives is handed to the local broker (`Broker::publish`), which matches the
//! topic exactly against the node's own subscriptions: the coarse keys only decide which nodes
//! see a message. Rules run only where the message arrived; a node drops its own messages when
//! they come back through its queue (it delivered them locally already).
//!
//! Layout: `config` (`cluster:`), `keys` (topics and filters as routing and binding keys,
//! pure), `peers` (the other nodes' binding keys: what to forward, when a SUBACK may go), `link` (the one task owning the node's AMQP connection: publishes with confirms,
//! binds, consumes), this file the handle the broker and routing hold.
//!
//! Bounded: the queue to the link (`cluster.queue`, full: publishers wait as for a full AMQP
//! sink), the node's RabbitMQ queue (`cluster.inbound_max`, RabbitMQ drops the oldest), the
//! unconfirmed publishes of the link; the interest map holds one entry per distinct binding.

pub mod config;
mod groups;
pub mod keys;
mod link;
pub mod metrics;
mod mux;
mod peers;
mod psession;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic;
use crate::targets::{AckSender, Blocked, Failure, Handoff, Outcome, Waits};
pub use config::ClusterConfig;
pub use psession::{Limits, Open, Opened};

/// Reason label of `messages_dropped` for messages not sent to the other nodes because this
/// node has no connection to RabbitMQ.
pub const DROPPED_UNAVAILABLE: &str = "cluster_unavailable";

/// One message for the other nodes.
#[derive(Debug)]
struct Forward {
    /// The message.
    msg: Arc<Message>,
    /// QoS 1/2: told `Delivered` once RabbitMQ confirmed the publish.
    ack: Option<AckSender>,
}

/// What sessions ask of the link besides forwarding: the client-id locks. A lock is the
/// exclusive queue `{prefix}.client.{sha256(client_id)}` declared on the node's connection:
/// RabbitMQ lets one connection hold it, and drops it with the connection.
#[derive(Debug)]
enum Command {
    /// Delete the session queue and record of `client_id` (a clean start: the persistent
    /// session it may have had on any node ends), and tell every node.
    DropSession { client_id: String },
    /// Tell every node that this one serves the persistent session of `client_id` (Session
    /// Expiry Interval `expiry`) with binding keys `keys`.
    SessionKeys { client_id: String, expiry: u32, keys: Vec<String> },
    /// Take the lock of `client_id`; `Err` holds the broker's reason (405: another node
    /// holds it).
    Claim { client_id: String, reply: oneshot::Sender<Result<(), String>> },
    /// Give the lock of `client_id` back.
    Release { client_id: String },
    /// Tell every node that this one took `client_id` (`released: false`: a session parked
    /// elsewhere is discarded) or needs its holder to let go (`released: true`: the holder
    /// closes its connection, 0x8E).
    Notice { client_id: String, release: bool },
    /// Tell every node the will of `client_id` connected here (`Some`: in the store's
    /// encoding), or that it no longer waits here (`None`): the others publish the wills of a
    /// node that died.
    Will { client_id: String, will: Option<Vec<u8>> },
}

/// Wills by client id, in the store's encoding.
type Wills = HashMap<String, Vec<u8>>;

/// What [`Cluster::claim`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node holds the client id: no other node has it connected.
    Held,
    /// The lock could not be asked for (no connection to the broker): why.
    Unavailable(String),
    /// Another node still holds it at the deadline (its connection did not close in time).
    Busy,
}

/// How long a claim waits between attempts while another node still holds the client id.
const CLAIM_RETRY: std::time::Duration = std::time::Duration::from_millis(25);

/// The bindings this node's subscriptions need.
#[derive(Debug, Default)]
struct Interest {
    /// Subscriptions (and share-group memberships) per binding key.
    counts: HashMap<String, usize>,
    /// Keys whose count went to or from zero since the link last looked.
    dirty: HashSet<String>,
    /// Keys the node's queue is bound with now (bind-ok received on this connection).
    applied: HashSet<String>,
    /// SUBACKs waiting for their key's bind-ok (told `Delivered` then, also when the key is
    /// no longer wanted or the link goes down: the subscription works locally anyway).
    waiters: HashMap<String, Vec<oneshot::Sender<Outcome>>>,
}

impl Interest {
    /// Lets every SUBACK waiting for `key` go.
    fn release_waiters(&mut self, key: &str) {
        for w in self.waiters.remove(key).unwrap_or_default() {
            let _ = w.send(Outcome::Delivered);
        }
    }
}

/// The cluster as the broker and routing see it: where messages for the other nodes go and
/// where subscriptions register their interest. One per node, shared.
#[derive(Debug)]
pub struct Cluster {
    /// This node's id (also in every message it sends, to recognise them coming back).
    node_id: Arc<str>,
    /// The queue in front of the link task.
    tx: mpsc::Sender<Forward>,
    /// Binding keys and their subscriptions.
    interest: Mutex<Interest>,
    /// This node's share groups (`$share/{group}/{filter}` as subscribed) and their members
    /// here: each is served through its share queue (one member cluster-wide).
    groups: Mutex<Interest>,
    /// Told when `interest.dirty` gained a key.
    changed: Notify,
    /// True while the link is connected and consuming.
    connected: AtomicBool,
    /// Why the link is down, for `/readyz` (`None` while connected).
    down: Mutex<Option<String>>,
    /// Drops are counted here.
    metrics: Arc<Metrics>,
    /// Lock requests to the link. Unbounded: at most one claim and one release per
    /// connection (`mqtt.max_connections`) and one notice per CONNECT in the handshake.
    commands: mpsc::UnboundedSender<Command>,
    /// The client ids whose lock this node holds, with the connections that claimed it (a
    /// local takeover overlaps two): released when the last one ends.
    locks: Mutex<HashMap<String, Vec<u64>>>,
    /// The wills of this node's connected clients (client id → connection, encoded will), as
    /// announced to the other nodes.
    wills: Mutex<HashMap<String, (u64, Vec<u8>)>>,
    /// The wills other nodes announced: (node, its epoch) → client id → encoded will. One
    /// entry per connected client with a will in the cluster (bounded by the nodes'
    /// `mqtt.max_connections` and `mqtt.max_packet_size`).
    remote_wills: Mutex<HashMap<(String, u64), Wills>>,
    /// This process's epoch (start time): wills announced by an older epoch of a node are
    /// those of a dead incarnation.
    epoch: u64,
    /// What the other nodes' subscriptions can match (`peers`): a live message goes to
    /// RabbitMQ only when this says another node may want it. Written by the link.
    remote: RwLock<peers::View>,
    /// A copy of `remote` as of its last change, which forwarding threads keep (numbered by
    /// `view_gen`): reading it costs an atomic load, not a lock, per message.
    snapshot: RwLock<Arc<peers::View>>,
    /// Bumped after each change of `remote` (once `snapshot` holds it).
    view_gen: AtomicU64,
    /// This handle's id in the process (the forwarding threads' copies name it).
    uid: u64,
    /// The sequence number of this node's last announcement of its binding keys (monotonic
    /// over the process, across reconnects).
    announced: AtomicU64,
    /// The clients connected on the other nodes (client id → node, when this node heard of
    /// it, ms since the Unix epoch), for the admin API: one entry per client holding a lock
    /// on another node (bounded by their `mqtt.max_connections`).
    directory: Mutex<BTreeMap<String, (Arc<str>, u64)>>,
    /// Where the persistent sessions' queues are (`psession`).
    psettings: Arc<psession::Settings>,
    /// The tasks of this node's connected persistent sessions, by session id.
    psessions: Mutex<HashMap<u64, psession::Handle>>,
    /// The persistent sessions other nodes announced (client id → entry): their keys are
    /// forwarded to while no node serves them (their node died or left), until they expire
    /// or another node announces them. One entry per persistent session in the cluster.
    sticky: Mutex<HashMap<String, Sticky>>,
}

/// A persistent session another node announced.
#[derive(Debug)]
struct Sticky {
    /// The node that serves (or served) it.
    node: String,
    /// Its Session Expiry Interval.
    expiry: u32,
    /// Its binding keys.
    keys: Vec<String>,
    /// Once its node is gone: when its queue expires (`None`: never, or the node is there).
    deadline: Option<std::time::Instant>,
}

/// A client connected on another node, as this node knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteClient {
    /// Its client id.
    pub client_id: String,
    /// The node it is connected to.
    pub node: Arc<str>,
    /// When this node heard of its connection (ms since the Unix epoch).
    pub since_ms: u64,
}

impl Cluster {
    /// Attaches a cluster to `broker` (its current subscriptions become the first bindings)
    /// and returns the link of this node to the cluster's broker `broker_cfg`, to spawn: it
    /// runs until `shutdown`.
    pub fn start(
        cfg: &ClusterConfig,
        broker_cfg: &crate::config::AmqpBrokerConfig,
        broker: &Arc<Broker>,
        metrics: &Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let cluster = Arc::new(Cluster {
            psettings: Arc::new(psession::Settings::new(cfg, broker_cfg)),
            psessions: Mutex::new(HashMap::new()),
            sticky: Mutex::new(HashMap::new()),
            wills: Mutex::new(HashMap::new()),
            remote_wills: Mutex::new(HashMap::new()),
            epoch,
            remote: RwLock::new(peers::View { all: true, ..Default::default() }),
            snapshot: RwLock::new(Arc::new(peers::View { all: true, ..Default::default() })),
            view_gen: AtomicU64::new(1),
            uid: next_uid(),
            announced: AtomicU64::new(0),
            directory: Mutex::new(BTreeMap::new()),
            commands,
            locks: Mutex::new(HashMap::new()),
            node_id: Arc::from(cfg.node_id.value.as_str()),
            tx,
            interest: Mutex::new(Interest::default()),
            groups: Mutex::new(Interest::default()),
            changed: Notify::new(),
            connected: AtomicBool::new(false),
            down: Mutex::new(Some("connecting".into())),
            metrics: Arc::clone(metrics),
        });
        broker.attach_cluster(Arc::clone(&cluster));
        let settings = link::Settings::new(cfg, broker_cfg);
        link::run(settings, cluster, Arc::clone(broker), (rx, commands_rx), shutdown)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// For `/readyz`: `Ok` while connected, else why not.
    pub fn state(&self) -> Result<String, String> {
        match self.down.lock().ok().and_then(|d| d.clone()) {
            None => Ok(format!("node {} connected", self.node_id)),
            Some(why) => Err(format!("node {} not connected: {why}", self.node_id)),
        }
    }

    /// Records whether the link is up (and if not, why).
    fn set_down(&self, why: Option<String>) {
        let down = why.is_some();
        self.connected.store(!down, Ordering::Release);
        self.metrics.cluster.connected.set(i64::from(!down));
        if let Ok(mut d) = self.down.lock() {
            *d = why;
        }
        if down {
            // Until the link is back and in step with the others, nothing is skipped.
            self.set_remote(|v| v.all = true);
            for interest in [&self.interest, &self.groups] {
                let mut i = interest.lock().unwrap_or_else(|p| p.into_inner());
                i.applied.clear();
                for (_, waiters) in i.waiters.drain() {
                    for w in waiters {
                        let _ = w.send(Outcome::Delivered);
                    }
                }
            }
        }
    }

    /// Whether share groups are served through RabbitMQ now (one member cluster-wide); while
    /// the link is down each node's groups take what reaches the node.
    pub fn serves_groups(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// For a SUBACK: a receiver resolved once the node's queue is bound for `filter` (so a
    /// message published on another node after the SUBACK reaches the subscription); `None`
    /// when it is bound already, or the link is down (nothing to wait for).
    pub fn bound(&self, filter: &str) -> Option<oneshot::Receiver<Outcome>> {
        if !self.connected.load(Ordering::Acquire) {
            return None;
        }
        let mut waits: Vec<_> = waiter(&self.interest, binding_of(filter)).into_iter().collect();
        if is_shared(filter) {
            // And the group's share queue bound and consumed.
            waits.extend(waiter(&self.groups, filter.to_owned()));
        }
        all_of(waits)
    }

    /// The broker confirmed the binding `key` (`true`), or it is being removed (`false`).
    fn applied(&self, key: &str, bound: bool) {
        applied_in(&self.interest, key, bound);
    }

    /// The share queue of group `key` is consumed (`true`), or it is being closed.
    fn group_applied(&self, key: &str, ready: bool) {
        applied_in(&self.groups, key, ready);
    }

    /// The share groups whose membership here started or ended since the last call.
    fn take_group_changes(&self) -> Vec<(String, bool)> {
        take_changes_in(&self.groups)
    }

    /// Every share group with members here (after a reconnect); clears the changes.
    fn all_groups(&self) -> Vec<String> {
        let mut i = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        i.dirty.clear();
        i.counts.keys().cloned().collect()
    }
}

/// Whether `filter` is a shared subscription.
fn is_shared(filter: &str) -> bool {
    matches!(topic::parse_subscription(filter), Ok(f) if f.group.is_some())
}

/// A receiver resolved once `key` is applied in `interest`; `None` when it is already, or not
/// wanted.
fn waiter(interest: &Mutex<Interest>, key: String) -> Option<oneshot::Receiver<Outcome>> {
    let mut i = interest.lock().unwrap_or_else(|p| p.into_inner());
    if i.applied.contains(&key) || !i.counts.contains_key(&key) {
        return None;
    }
    let (tx, rx) = oneshot::channel();
    i.waiters.entry(key).or_default().push(tx);
    Some(rx)
}

/// `key` of `interest` is applied (`true`) or being removed; its waiters go.
fn applied_in(interest: &Mutex<Interest>, key: &str, bound: bool) {
    {
        let mut i = interest.lock().unwrap_or_else(|p| p.into_inner());
        if bound {
            i.applied.insert(key.to_owned());
        } else {
            i.applied.remove(key);
        }
        i.release_waiters(key);
    }
}

/// Counts a subscription to `key` in `interest` in (`add`) or out; true when it went to or
/// from zero (the link is to look).
fn count_in(interest: &Mutex<Interest>, key: String, add: bool) -> bool {
    let mut i = interest.lock().unwrap_or_else(|p| p.into_inner());
    if add {
        let n = i.counts.entry(key.clone()).or_insert(0);
        *n += 1;
        if *n == 1 {
            i.dirty.insert(key);
            return true;
        }
        return false;
    }
    let Some(n) = i.counts.get_mut(&key) else { return false };
    *n -= 1;
    if *n > 0 {
        return false;
    }
    i.counts.remove(&key);
    i.release_waiters(&key);
    i.dirty.insert(key);
    true
}

/// The changed keys of `interest` since the last call, each with whether it is wanted now.
fn take_changes_in(interest: &Mutex<Interest>) -> Vec<(String, bool)> {
    let mut i = interest.lock().unwrap_or_else(|p| p.into_inner());
    let dirty = std::mem::take(&mut i.dirty);
    dirty
        .into_iter()
        .map(|k| {
            let wanted = i.counts.contains_key(&k);
            (k, wanted)
        })
        .collect()
}

impl Cluster {
    /// Sends `msg`, routed on this node, to the other nodes when another node's subscriptions
    /// may match it (a retained message: always, every node keeps them); for QoS 1/2 its
    /// outcome (the broker's confirm) goes into `waits`. Never waits: a full queue puts the
    /// send into `blocked` (the publisher's backpressure). While this node has no connection
    /// to the broker, the message is not sent (counted as `cluster_unavailable`): local
    /// delivery goes on. `$SYS/` topics describe this node and stay here. `true` when it was
    /// sent (or waits in `blocked`).
    pub fn forward(&self, msg: &Arc<Message>, waits: &mut Waits, blocked: &mut Blocked) -> bool {
        if msg.topic.starts_with("$SYS/") {
            return false;
        }
        if !self.connected.load(Ordering::Acquire) {
            self.metrics.dropped(DROPPED_UNAVAILABLE);
            return false;
        }
        if !msg.retain && !self.remote_wants(&msg.topic) {
            return false;
        }
        let mut hand = Handoff::new(waits, blocked, msg.qos != QoS::AtMostOnce, None);
        let fwd = Forward { msg: Arc::clone(msg), ack: hand.ack() };
        let tx = self.tx.clone();
        hand.offer(
            fwd,
            |fwd| match self.tx.try_send(fwd) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(fwd)) => Err(fwd),
                // The link is gone (shutdown): the dropped ack fails a QoS 1/2 message.
                Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
            },
            |fwd| {
                Box::pin(async move {
                    let _ = tx.send(fwd).await;
                })
            },
        );
        true
    }

    /// At most `limit` of the clients connected on other nodes whose client id contains
    /// `search` (ASCII case-insensitive), after `after` in client id order, and how many
    /// matched in all.
    pub fn remote_clients(
        &self,
        search: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<RemoteClient>, usize) {
        let needle = search.as_bytes();
        let contains = |s: &str| {
            needle.is_empty()
                || s.as_bytes().windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
        };
        let dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        let mut page = Vec::new();
        let mut matched = 0;
        for (id, (node, since_ms)) in dir.iter() {
            if !contains(id) {
                continue;
            }
            matched += 1;
            if page.len() < limit && after.is_none_or(|a| id.as_str() > a) {
                let node = Arc::clone(node);
                page.push(RemoteClient { client_id: id.clone(), node, since_ms: *since_ms });
            }
        }
        (page, matched)
    }

    /// The client `client_id` if it is connected on another node.
    pub fn remote_client(&self, client_id: &str) -> Option<RemoteClient> {
        let dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        dir.get(client_id).map(|(node, since_ms)| RemoteClient {
            client_id: client_id.to_owned(),
            node: Arc::clone(node),
            since_ms: *since_ms,
        })
    }

    /// `node` holds `client_id` now (`true`) or let it go (`false`: forgotten if it was
    /// there).
    fn client_at(&self, node: &str, client_id: &str, held: bool) {
        let mut dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        if held {
            dir.insert(client_id.to_owned(), (Arc::from(node), now_ms()));
        } else if dir.get(client_id).is_some_and(|(n, _)| &**n == node) {
            dir.remove(client_id);
        }
    }

    /// Replaces the clients of `node` (`None`: it left, they are forgotten).
    fn clients_of(&self, node: &str, clients: Option<Vec<String>>) {
        let mut dir = self.directory.lock().unwrap_or_else(|p| p.into_inner());
        dir.retain(|_, (n, _)| &**n != node);
        if let Some(clients) = clients {
            let (node, now) = (Arc::<str>::from(node), now_ms());
            for id in clients {
                dir.insert(id, (Arc::clone(&node), now));
            }
        }
    }

    /// Forgets every other node's clients (this node's link is new: they are sent again).
    fn clear_directory(&self) {
        self.directory.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Whether another node's subscriptions may match a live message on `topic`.
    fn remote_wants(&self, topic: &str) -> bool {
        thread_local! {
            /// This thread's copy of a cluster's view: (its uid, generation, view).
            static VIEW: std::cell::RefCell<Option<(u64, u64, Arc<peers::View>)>> =
                const { std::cell::RefCell::new(None) };
        }
        let gen = self.view_gen.load(Ordering::Acquire);
        VIEW.with(|cached| {
            let mut cached = cached.borrow_mut();
            match &*cached {
                Some((uid, g, view)) if *uid == self.uid && *g == gen => view.wants(topic),
                _ => {
                    let view = Arc::clone(&self.snapshot.read().unwrap_or_else(|p| p.into_inner()));
                    let wants = view.wants(topic);
                    *cached = Some((self.uid, gen, view));
                    wants
                }
            }
        })
    }

    /// Changes what forwarding reads (the link, after a change of the other nodes' keys; a
    /// share group here): the copy is replaced, then its generation bumped.
    fn set_remote<R>(&self, update: impl FnOnce(&mut peers::View) -> R) -> R {
        let mut view = self.remote.write().unwrap_or_else(|p| p.into_inner());
        let r = update(&mut view);
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view.clone());
        self.view_gen.fetch_add(1, Ordering::AcqRel);
        r
    }

    /// Makes the connection `conn_id` the cluster-wide holder of `client_id` (its handshake,
    /// after the local registration): takes the client id's lock; while another node holds
    /// it, asks that node to close its connection (once) and tries again until `deadline`.
    /// Once held, tells the other nodes to discard a session they keep parked for it. On
    /// [`Claim::Held`], [`Cluster::release`] when the connection ends (`Broker::unregister`
    /// does).
    pub async fn claim(
        &self,
        client_id: &str,
        conn_id: u64,
        deadline: tokio::time::Instant,
    ) -> Claim {
        {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(conns) = locks.get_mut(client_id) {
                // Held for another connection of this node (a local takeover).
                conns.push(conn_id);
                return Claim::Held;
            }
        }
        if !self.connected.load(Ordering::Acquire) {
            return Claim::Unavailable(self.state().err().unwrap_or_default());
        }
        let notice = |release| Command::Notice { client_id: client_id.to_owned(), release };
        let mut asked = false;
        loop {
            let (reply, answer) = oneshot::channel();
            let claim = Command::Claim { client_id: client_id.to_owned(), reply };
            if self.commands.send(claim).is_err() {
                return Claim::Unavailable("the cluster link stopped".into());
            }
            let result = match tokio::time::timeout_at(deadline, answer).await {
                Err(_) => None,
                Ok(Err(_)) => return Claim::Unavailable("the cluster link was lost".into()),
                Ok(Ok(result)) => Some(result),
            };
            match result {
                Some(Ok(())) => {
                    let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
                    locks.entry(client_id.to_owned()).or_default().push(conn_id);
                    drop(locks);
                    let _ = self.commands.send(notice(false));
                    return Claim::Held;
                }
                Some(Err(e)) if !e.contains("405") => return Claim::Unavailable(e),
                // Held by another node: it lets go once its connection has closed.
                Some(Err(_)) if !asked => {
                    asked = true;
                    let _ = self.commands.send(notice(true));
                }
                _ => {}
            }
            let retry = tokio::time::Instant::now() + CLAIM_RETRY;
            if result.is_none() || retry >= deadline {
                // The claim may still be granted after we stopped waiting: given back, unless
                // another connection of this node holds it by then.
                let locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
                if !locks.contains_key(client_id) {
                    let _ =
                        self.commands.send(Command::Release { client_id: client_id.to_owned() });
                }
                return Claim::Busy;
            }
            tokio::time::sleep_until(retry).await;
        }
    }

    /// The connection `conn_id` of `client_id` ended: the lock goes back when no other
    /// connection of this node holds it.
    pub fn release(&self, client_id: &str, conn_id: u64) {
        self.will_clear(client_id, conn_id);
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        let Some(conns) = locks.get_mut(client_id) else { return };
        conns.retain(|c| *c != conn_id);
        if conns.is_empty() {
            locks.remove(client_id);
            let _ = self.commands.send(Command::Release { client_id: client_id.to_owned() });
        }
    }

    /// The connection `conn_id` of `client_id` has a will (`msg`): announced to the other
    /// nodes, which publish it if this node dies while the connection is up. Cleared by
    /// [`Cluster::release`] (the connection ended: this node publishes it or not, as usual).
    pub fn will_set(&self, client_id: &str, conn_id: u64, msg: &Message) {
        let Ok(encoded) = crate::store::codec::encode_message(msg) else { return };
        let mut wills = self.wills.lock().unwrap_or_else(|p| p.into_inner());
        wills.insert(client_id.to_owned(), (conn_id, encoded.clone()));
        drop(wills);
        let will = Command::Will { client_id: client_id.to_owned(), will: Some(encoded) };
        let _ = self.commands.send(will);
    }

    /// Forgets the will of `client_id` if the connection `conn_id` set it.
    fn will_clear(&self, client_id: &str, conn_id: u64) {
        let mut wills = self.wills.lock().unwrap_or_else(|p| p.into_inner());
        if wills.get(client_id).is_some_and(|(c, _)| *c == conn_id) {
            wills.remove(client_id);
            drop(wills);
            let _ =
                self.commands.send(Command::Will { client_id: client_id.to_owned(), will: None });
        }
    }

    /// The wills of this node's clients (announced again after a reconnect).
    fn local_wills(&self) -> Vec<(String, Vec<u8>)> {
        let wills = self.wills.lock().unwrap_or_else(|p| p.into_inner());
        wills.iter().map(|(k, (_, w))| (k.clone(), w.clone())).collect()
    }

    /// Another node announced (`Some`) or cleared (`None`) the will of `client_id`.
    fn remote_will(&self, node: &str, epoch: u64, client_id: &str, will: Option<Vec<u8>>) {
        let mut all = self.remote_wills.lock().unwrap_or_else(|p| p.into_inner());
        let key = (node.to_owned(), epoch);
        match will {
            Some(w) => {
                all.entry(key).or_default().insert(client_id.to_owned(), w);
            }
            None => {
                if let Some(m) = all.get_mut(&key) {
                    m.remove(client_id);
                    if m.is_empty() {
                        all.remove(&key);
                    }
                }
            }
        }
    }

    /// The (node, epoch) pairs holding wills: the ones to check for liveness.
    fn will_holders(&self) -> Vec<(String, u64)> {
        let all = self.remote_wills.lock().unwrap_or_else(|p| p.into_inner());
        all.keys().cloned().collect()
    }

    /// Takes the wills of (node, epoch) out (to publish them, or because another node does).
    fn take_wills(&self, node: &str, epoch: u64) -> Vec<Vec<u8>> {
        let mut all = self.remote_wills.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(&(node.to_owned(), epoch)).map(|m| m.into_values().collect()).unwrap_or_default()
    }

    /// Whether this node holds the lock of `client_id`.
    fn holds(&self, client_id: &str) -> bool {
        let locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.contains_key(client_id)
    }

    /// Forgets the lock of `client_id` (another node took it while this one was cut off).
    fn forget_lock(&self, client_id: &str) {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.remove(client_id);
    }

    /// The client ids whose lock this node holds (to take again after a reconnect).
    fn held(&self) -> Vec<String> {
        let locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.keys().cloned().collect()
    }

    /// Opens the queue of the persistent session `session_id` of `client_id` (see
    /// `psession`; `open` says how) and starts its task, held until
    /// [`Cluster::session_ended`]. Returns whether the session existed and, resumed from
    /// another node, its record. Consuming starts with [`Cluster::session_start`].
    pub async fn open_session(
        &self,
        broker: &Arc<Broker>,
        client_id: &Arc<str>,
        session_id: u64,
        open: Open,
        limits: Limits,
    ) -> Result<Opened, String> {
        if !self.connected.load(Ordering::Acquire) {
            return Err(self.state().err().unwrap_or_default());
        }
        let who = (Arc::clone(client_id), session_id);
        let settings = Arc::clone(&self.psettings);
        let (handle, opened) = psession::spawn(settings, Arc::clone(broker), who, open, limits);
        let opened = opened.await.unwrap_or_else(|_| Err("the session queue's task ended".into()));
        match &opened {
            Ok(_) => {
                let mut sessions = self.psessions.lock().unwrap_or_else(|p| p.into_inner());
                sessions.insert(session_id, handle);
            }
            Err(_) => handle.cancel.cancel(),
        }
        opened
    }

    /// The session `session_id`'s subscriptions are in place: its queue is consumed.
    pub fn session_start(&self, session_id: u64) {
        let sessions = self.psessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = sessions.get(&session_id) {
            let _ = h.tx.send(psession::Cmd::Start);
        }
    }

    /// The subscriptions (or expiry) of the queued session `state` changed: its queue is
    /// bound for them and its record written; with `wait`, a receiver resolved once both are
    /// done. `None` when the session has no task here (parked).
    pub fn session_update(
        &self,
        state: &crate::broker::SessionState,
        expiry: crate::broker::Expiry,
        wait: bool,
    ) -> Option<oneshot::Receiver<Outcome>> {
        let keys: HashSet<String> =
            state.filters.keys().filter(|f| !is_shared(f)).map(|f| binding_of(f)).collect();
        let record =
            crate::broker::persist::SessionRecord::of(state, expiry.seconds(), None).encode();
        let (reply, rx) = match wait {
            true => {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let mut keys: Vec<String> = keys.into_iter().collect();
        keys.sort();
        let mut sessions = self.psessions.lock().unwrap_or_else(|p| p.into_inner());
        let handle = sessions.get_mut(&state.id)?;
        let announce = (expiry.seconds(), keys.clone());
        if handle.announced.as_ref() != Some(&announce) {
            // Every node forwards what the session's keys match, even after this one is gone.
            let client_id = handle.client_id.to_string();
            let notice = Command::SessionKeys { client_id, expiry: announce.0, keys: keys.clone() };
            let _ = self.commands.send(notice);
            handle.announced = Some(announce);
        }
        let update = psession::Cmd::Update { keys, record, reply };
        handle.tx.send(update).ok()?;
        rx
    }

    /// The queued session `session_id` parks with Session Expiry Interval `expiry` (as its
    /// DISCONNECT left it): when that differs from what was announced, the other nodes hear
    /// it, so that they end the session at that interval should this node die first.
    pub fn session_parked(&self, session_id: u64, expiry: u32) {
        let mut sessions = self.psessions.lock().unwrap_or_else(|p| p.into_inner());
        let Some(handle) = sessions.get_mut(&session_id) else { return };
        let Some((announced, keys)) = handle.announced.as_mut() else { return };
        if *announced != expiry {
            *announced = expiry;
            let (client_id, keys) = (handle.client_id.to_string(), keys.clone());
            let _ = self.commands.send(Command::SessionKeys { client_id, expiry, keys });
        }
    }

    /// The persistent sessions this node serves now, as announced (after a reconnect).
    fn served_sessions(&self) -> Vec<(String, u32, Vec<String>)> {
        let sessions = self.psessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .values()
            .filter_map(|h| {
                let (expiry, keys) = h.announced.clone()?;
                Some((h.client_id.to_string(), expiry, keys))
            })
            .collect()
    }

    /// Every persistent session other nodes announced, as announced.
    fn sticky_all(&self) -> Vec<(String, u32, Vec<String>)> {
        let sticky = self.sticky.lock().unwrap_or_else(|p| p.into_inner());
        sticky.iter().map(|(id, e)| (id.clone(), e.expiry, e.keys.clone())).collect()
    }

    /// Node `node` serves the persistent session of `client_id` with `keys` now.
    fn sticky_set(&self, node: &str, client_id: &str, expiry: u32, keys: Vec<String>) {
        let mut sticky = self.sticky.lock().unwrap_or_else(|p| p.into_inner());
        let entry = Sticky { node: node.to_owned(), expiry, keys, deadline: None };
        let old = sticky.insert(client_id.to_owned(), entry);
        let new = sticky.get(client_id).map(|e| e.keys.clone()).unwrap_or_default();
        drop(sticky);
        self.set_remote(|v| {
            for k in old.iter().flat_map(|o| &o.keys) {
                v.session_key(k, false);
            }
            for k in &new {
                v.session_key(k, true);
            }
        });
    }

    /// The persistent session of `client_id` ended (a clean start somewhere).
    fn sticky_drop(&self, client_id: &str) {
        let old = self.sticky.lock().unwrap_or_else(|p| p.into_inner()).remove(client_id);
        if let Some(old) = old {
            self.set_remote(|v| old.keys.iter().for_each(|k| v.session_key(k, false)));
        }
    }

    /// Node `node` left or died: the sessions it served expire from now on.
    fn sticky_node_gone(&self, node: &str) {
        let now = std::time::Instant::now();
        let mut sticky = self.sticky.lock().unwrap_or_else(|p| p.into_inner());
        for e in sticky.values_mut().filter(|e| e.node == node && e.deadline.is_none()) {
            let secs = std::time::Duration::from_secs(u64::from(e.expiry));
            e.deadline = if e.expiry == u32::MAX { None } else { now.checked_add(secs) };
        }
    }

    /// Forgets the sessions of nodes that are gone whose expiry has passed by `now`, and
    /// deletes their queues and records (their `x-expires` may be longer: the interval the
    /// queue was declared with, before a DISCONNECT shortened it). Every surviving node does;
    /// deleting is idempotent.
    fn sticky_expire(&self, now: std::time::Instant) {
        let mut sticky = self.sticky.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone = Vec::new();
        let mut ended = Vec::new();
        sticky.retain(|id, e| {
            let keep = e.deadline.is_none_or(|d| d > now);
            if !keep {
                gone.append(&mut e.keys);
                ended.push(id.clone());
            }
            keep
        });
        drop(sticky);
        if !gone.is_empty() {
            self.set_remote(|v| gone.iter().for_each(|k| v.session_key(k, false)));
        }
        if self.connected.load(Ordering::Acquire) {
            for client_id in ended {
                let _ = self.commands.send(Command::DropSession { client_id });
            }
        }
    }

    /// The connection of the queued session `session_id` ended (it parks or is discarded):
    /// its task stops acknowledging and closes its connection, so what the client did not
    /// acknowledge goes back to the queue. Call before dropping the deliveries it holds.
    pub fn session_ended(&self, session_id: u64) {
        let handle = self.psessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&session_id);
        if let Some(h) = handle {
            h.closing.store(true, Ordering::Release);
            h.cancel.cancel();
        }
    }

    /// Whether this node's link to RabbitMQ is up (what it forwards is sent).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Whether another node announced a persistent session of `client_id` (it may be kept in
    /// RabbitMQ).
    pub fn knows_session(&self, client_id: &str) -> bool {
        self.sticky.lock().unwrap_or_else(|p| p.into_inner()).contains_key(client_id)
    }

    /// A clean start of `client_id`: the persistent session it may have had ends, its queue
    /// and record are deleted (not waited for) when it had one here (`here`) or another node
    /// announced one; every node forgets it. A client id no node announced costs nothing.
    pub fn drop_session(&self, client_id: &str, here: bool) {
        let known = self.knows_session(client_id);
        if (here || known) && self.connected.load(Ordering::Acquire) {
            self.sticky_drop(client_id);
            let _ = self.commands.send(Command::DropSession { client_id: client_id.to_owned() });
        }
    }

    /// A subscription of a session served through its session queue came (`add`) or went:
    /// this node forwards what its key may match even when no other node wants it (the
    /// session queue takes it).
    pub fn session_filter(&self, filter: &str, add: bool) {
        if !is_shared(filter) {
            let key = binding_of(filter);
            self.set_remote(|v| v.own_group(&key, add));
        }
    }

    /// A subscription to `filter` (`$share/{group}/` included) was added on this node.
    pub fn add_interest(&self, filter: &str) {
        self.interest_changed(filter, true);
    }

    /// A subscription to `filter` was removed from this node.
    pub fn remove_interest(&self, filter: &str) {
        self.interest_changed(filter, false);
    }

    /// Counts a subscription to `filter` in (`add`) or out: its binding key, and for a share
    /// group the group (whose key this node then forwards whoever else wants it: the share
    /// queue takes it).
    fn interest_changed(&self, filter: &str, add: bool) {
        let key = binding_of(filter);
        let mut changed = count_in(&self.interest, key.clone(), add);
        if is_shared(filter) && count_in(&self.groups, filter.to_owned(), add) {
            self.set_remote(|v| v.own_group(&key, add));
            changed = true;
        }
        if changed {
            self.changed.notify_one();
        }
    }

    /// The changed keys since the last call, each with whether it is wanted now.
    fn take_changes(&self) -> Vec<(String, bool)> {
        take_changes_in(&self.interest)
    }

    /// Every key wanted now (after a reconnect: the new queue has no bindings); clears the
    /// changes.
    fn all_wanted(&self) -> Vec<String> {
        let mut i = self.interest.lock().unwrap_or_else(|p| p.into_inner());
        i.dirty.clear();
        i.counts.keys().cloned().collect()
    }
}

/// A process-unique id for a [`Cluster`] handle.
fn next_uid() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Now, in ms since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One receiver for all of `waits`: `Delivered` once every one is, else the first failure
/// (a SUBACK waiting for the store and for the cluster's bindings). Spawns a task only for
/// more than one.
pub fn all_of(mut waits: Vec<oneshot::Receiver<Outcome>>) -> Option<oneshot::Receiver<Outcome>> {
    if waits.len() < 2 {
        return waits.pop();
    }
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut outcome = Outcome::Delivered;
        for w in waits {
            match w.await {
                Ok(Outcome::Delivered) => {}
                Ok(failed) => {
                    outcome = failed;
                    break;
                }
                Err(_) => {
                    outcome = Outcome::Failed(Failure::retryable("dropped before it was done"));
                    break;
                }
            }
        }
        let _ = tx.send(outcome);
    });
    Some(rx)
}

/// The binding key of a subscription to `filter` (a share group's: of its inner filter).
fn binding_of(filter: &str) -> String {
    match topic::parse_subscription(filter) {
        Ok(f) => keys::binding_key(f.filter),
        Err(_) => keys::binding_key(filter),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Cluster {
        let (tx, _rx) = mpsc::channel(1);
        Cluster {
            psettings: Arc::default(),
            psessions: Mutex::new(HashMap::new()),
            sticky: Mutex::new(HashMap::new()),
            commands: mpsc::unbounded_channel().0,
            locks: Mutex::new(HashMap::new()),
            wills: Mutex::new(HashMap::new()),
            remote_wills: Mutex::new(HashMap::new()),
            epoch: 1,
            remote: RwLock::new(peers::View::default()),
            snapshot: RwLock::new(Arc::default()),
            view_gen: AtomicU64::new(1),
            uid: next_uid(),
            announced: AtomicU64::new(0),
            directory: Mutex::new(BTreeMap::new()),
            node_id: Arc::from("a"),
            tx,
            interest: Mutex::new(Interest::default()),
            groups: Mutex::new(Interest::default()),
            changed: Notify::new(),
            connected: AtomicBool::new(false),
            down: Mutex::new(None),
            metrics: Metrics::new(),
        }
    }

    #[test]
    fn bindings_are_reference_counted() {
        let c = cluster();
        c.add_interest("a/b");
        c.add_interest("a/b/#"); // same coarse key m.la.lb
        c.add_interest("$share/g/a/b");
        assert_eq!(c.take_changes(), vec![("m.la.lb".to_owned(), true)]);
        c.remove_interest("a/b");
        c.remove_interest("$share/g/a/b");
        assert!(c.take_changes().is_empty(), "one subscription still needs it");
        c.remove_interest("a/b/#");
        assert_eq!(c.take_changes(), vec![("m.la.lb".to_owned(), false)]);
        // Added and removed before the link looked: it sees the key unwanted.
        c.add_interest("x");
        c.remove_interest("x");
        assert_eq!(c.take_changes(), vec![("m.lx".to_owned(), false)]);
        c.remove_interest("never/added");
        assert!(c.all_wanted().is_empty());
    }

    #[test]
    fn a_persistent_session_s_keys_are_forwarded_to_after_its_node_left_until_it_expires() {
        let c = cluster();
        let wants = |c: &Cluster, topic: &str| c.remote.read().map(|v| v.wants(topic)).unwrap();
        assert!(!wants(&c, "s/1"));
        c.sticky_set("b", "dev", 10, vec!["m.ls.#".into()]);
        assert!(wants(&c, "s/1") && !wants(&c, "t/1"));
        // It moved to node d, with other keys.
        c.sticky_set("d", "dev", 10, vec!["m.lt.#".into()]);
        assert!(!wants(&c, "s/1") && wants(&c, "t/1"));
        c.sticky_node_gone("b");
        c.sticky_expire(std::time::Instant::now() + std::time::Duration::from_secs(60));
        assert!(wants(&c, "t/1"), "d is there: not expiring");
        c.sticky_node_gone("d");
        c.sticky_expire(std::time::Instant::now() + std::time::Duration::from_secs(5));
        assert!(wants(&c, "t/1"), "not yet expired");
        c.sticky_expire(std::time::Instant::now() + std::time::Duration::from_secs(11));
        assert!(!wants(&c, "t/1"), "expired");
        c.sticky_set("b", "other", u32::MAX, vec!["m.lu".into()]);
        c.sticky_drop("other");
        assert!(!wants(&c, "u"));
    }

    #[test]
    fn the_directory_pages_other_nodes_clients_by_id() {
        let c = cluster();
        c.clients_of("b", Some(vec!["dev-2".into(), "Dev-1".into(), "x".into()]));
        c.client_at("c", "dev-3", true);
        let (page, n) = c.remote_clients("DEV", None, 2);
        let ids: Vec<_> = page.iter().map(|r| (r.client_id.as_str(), &*r.node)).collect();
        assert_eq!((ids, n), (vec![("Dev-1", "b"), ("dev-2", "b")], 3));
        let (page, _) = c.remote_clients("dev", Some("dev-2"), 10);
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].client_id, "dev-3");
        // Only the node that holds a client id lets it go; a node leaving takes its own.
        c.client_at("b", "dev-3", false);
        assert!(c.remote_client("dev-3").is_some());
        c.client_at("c", "dev-3", false);
        assert!(c.remote_client("dev-3").is_none());
        c.clients_of("b", None);
        assert_eq!(c.remote_clients("", None, 10).1, 0);
    }
}
