//! The node's one AMQP connection to the cluster's broker, owned by one task: declares the
//! exchange and the node's queue, keeps the queue's bindings equal to the node's interest,
//! publishes what routing forwards (channel 1, confirm mode: a QoS 1/2 message's outcome is
//! the broker's confirm) and consumes the node's queue (channel 2, no-ack, exclusive),
//! handing each message from another node to the local broker. Reconnects with backoff; the
//! new queue is bound again from the whole interest.
//!
//! A message on the wire: `1u8`, the sending node's id (u8 length + bytes), then the message
//! in the store's encoding (`store::codec`: topic, QoS, RETAIN, payload, every MQTT 5
//! property, client id, user name): exact, whatever the topic or properties hold.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::groups::{self, GroupChannel, ShareCounters, GROUP_PREFETCH, STALL_RETRY};
use super::peers::{self, Peers, Then};
use super::{keys, Cluster, ClusterConfig, Command, Forward};
use crate::broker::tracking::Done;
use crate::broker::Broker;
use crate::config::AmqpBrokerConfig;
use crate::message::Message;
use crate::mqtt::topic;
use crate::sources::amqp::{close_connection, expect, jitter, keep_alive};
use crate::store::codec;
use crate::targets::amqp::transport::{self, describe, Transport, Uri};
use crate::targets::amqp::wire::consume::{self, ConsumerFrame, ConsumerMethod, Deliver};
use crate::targets::amqp::wire::frame;
use crate::targets::amqp::wire::methods::{self, Method, Properties, QueueFlags, REPLY_SUCCESS};
use crate::targets::amqp::wire::table::Value;
use crate::targets::{Failure, Outcome, Waits};

/// The confirm-mode channel messages are published on.
const PUBLISH_CHANNEL: u16 = 1;
/// The channel of declares, bindings and the consumer.
const CONSUME_CHANNEL: u16 = 2;
/// The channel of the client-id locks (a refused lock closes it; it is opened again).
const LOCK_CHANNEL: u16 = 3;
/// The routing key of takeover notices (every node binds it).
const NOTICE_KEY: &str = "c";
/// Kind byte of a notice "let go of this client id" on the wire (a message is
/// [`WIRE_VERSION`]).
const NOTICE_RELEASE: u8 = 2;
/// Kind byte of a notice "this node took this client id".
const NOTICE_ACQUIRED: u8 = 3;
/// Kind byte of a retained message sent to one node that asked for them (encoded as a
/// message), folded in only where its topic has none yet.
const SNAPSHOT: u8 = 4;
/// Kind byte of a notice "send me your retained messages" (a node that (re)connected).
const NOTICE_RETAINED: u8 = 5;
/// Kind byte of a notice "this client of mine has this will": the sender's epoch (u64), the
/// client id (u16 length + bytes), the will in the store's encoding.
const WILL_SET: u8 = 6;
/// Kind byte of a notice "this client's will no longer waits here": epoch and client id.
const WILL_CLEAR: u8 = 7;
/// Kind byte of several messages with one routing key in one AMQP message: a u32 count, then
/// each message as a u32 length and its store encoding.
const BATCH_KIND: u8 = 8;
/// Kind byte of a node's binding keys in full: its epoch (u64), sequence number (u64), a byte
/// (1: the receiver answers with its own keys, sent to this node alone), then each key (u8
/// length + bytes). Broadcast when the link comes up; sent to one node that asked.
const KEYS_FULL: u8 = 9;
/// Kind byte of a change of a node's binding keys: epoch, sequence number, then each change
/// (1 added / 0 removed, u8 length + key).
const KEYS_DELTA: u8 = 10;
/// Kind byte of an acknowledgement, sent to one node: the epoch of that node (u64) and the
/// sequence number of its keys the sender applied (u64).
const KEYS_ACK: u8 = 11;
/// Kind byte of a heartbeat: epoch, sequence number of the sender's latest keys.
const HEARTBEAT: u8 = 12;
/// Kind byte of "this node is leaving" (clean shutdown): epoch.
const GOODBYE: u8 = 13;
/// Kind byte of "this node no longer holds this client id" (its connection ended): the client
/// id. Its taking is the notice [`NOTICE_ACQUIRED`].
const CLIENT_GONE: u8 = 14;
/// Kind byte of every client id a node holds (sent with its binding keys in full): each as
/// u16 length + bytes.
const CLIENTS_FULL: u8 = 15;
/// Kind byte of "this node serves this persistent session, bound with these keys": its
/// Session Expiry Interval (u32), the client id (u16 length + bytes), each key (u8 length +
/// bytes). Every node forwards what they match until the session expires or moves.
const SESSION_KEYS: u8 = 16;
/// Kind byte of "this persistent session ended" (a clean start): the client id.
const SESSION_DROP: u8 = 17;
/// The first channel of the share groups' queues (one channel per group with members here).
const FIRST_GROUP_CHANNEL: u16 = 10;
/// Messages in one batch, at most.
const BATCH_MESSAGES: usize = 64;
/// Bytes of one batch's messages before it is closed (one message alone may be larger).
const BATCH_BYTES: usize = 256 * 1024;
/// Ticks between two checks of the nodes whose wills this node keeps.
const PROBE_TICKS: u32 = 8;
/// Publishes sent and not yet confirmed, at most.
const MAX_UNCONFIRMED: usize = 4096;
/// Forwards taken from the queue into one write, at most.
const BATCH: usize = 256;
/// How often heartbeats are looked at.
const TICK: Duration = Duration::from_millis(250);
/// Version byte of a message on the wire.
const WIRE_VERSION: u8 = 1;

/// The link's settings, from `cluster:` and its `amqp:` broker.
pub(super) struct Settings {
    /// The broker's URL (with credentials: never logged).
    url: String,
    /// TLS and SASL of the broker.
    security: transport::Security,
    /// The topic exchange.
    exchange: String,
    /// This node's queue.
    queue: String,
    /// The name of a client id's lock queue, before the hash of the client id.
    lock_prefix: String,
    /// Its `x-max-length`.
    inbound_max: u32,
    /// Time allowed for connecting and the setup.
    connect_timeout: Duration,
    /// First reconnect delay.
    reconnect_min: Duration,
    /// Longest reconnect delay.
    reconnect_max: Duration,
}

impl Settings {
    pub(super) fn new(cfg: &ClusterConfig, broker: &AmqpBrokerConfig) -> Settings {
        let reconnect_min = broker.reconnect_min.0.max(Duration::from_millis(1));
        Settings {
            url: broker.url.value.clone(),
            security: broker.security(),
            exchange: cfg.exchange(),
            queue: cfg.node_queue(),
            lock_prefix: format!("{}.client.", cfg.prefix.value),
            inbound_max: cfg.inbound_max,
            connect_timeout: broker.connect_timeout.0,
            reconnect_min,
            reconnect_max: broker.reconnect_max.0.max(reconnect_min),
        }
    }
}

impl Settings {
    /// The share queue of group `key` (`$share/{group}/{filter}`): the cluster's prefix,
    /// `share.` and 32 hex digits of the SHA-256 of the whole filter.
    fn share_queue(&self, key: &str) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(key.as_bytes());
        let mut name = format!("{}share.", self.lock_prefix.trim_end_matches("client."));
        for b in &digest[..16] {
            name.push_str(&format!("{b:02x}"));
        }
        name
    }

    /// The lock queue of `client_id`: the prefix and 32 hex digits of its SHA-256.
    fn lock_queue(&self, client_id: &str) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(client_id.as_bytes());
        let mut name = self.lock_prefix.clone();
        for b in &digest[..16] {
            name.push_str(&format!("{b:02x}"));
        }
        name
    }
}

/// Runs the link until `shutdown`: connect, set up, publish and consume, reconnect.
pub(super) async fn run(
    s: Settings,
    cluster: Arc<Cluster>,
    broker: Arc<Broker>,
    (mut rx, mut commands): (mpsc::Receiver<Forward>, mpsc::UnboundedReceiver<Command>),
    shutdown: CancellationToken,
) {
    let uri = match s.url.parse::<Uri>() {
        Ok(uri) => uri,
        Err(e) => {
            cluster.set_down(Some(format!("the broker's url is not a valid AMQP URI: {e}")));
            shutdown.cancelled().await;
            return;
        }
    };
    let endpoint = format!("{}:{} (vhost {:?})", uri.host, uri.port, uri.vhost);
    let node = Arc::clone(&cluster.node_id);
    let mut delay = s.reconnect_min;
    loop {
        let attempt = tokio::time::timeout(s.connect_timeout, setup(&uri, &s, &cluster));
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return,
            a = attempt => a,
        };
        let why = match attempt {
            Ok(Ok((t, bound))) => {
                delay = s.reconnect_min;
                info!(%node, %endpoint, queue = %s.queue, "cluster link up");
                cluster.set_down(None);
                let mut link = Link::new(&s, &cluster, &broker, t, bound);
                let ended = link.run(&mut rx, &mut commands, &shutdown).await;
                let reason = ended.clone().unwrap_or_else(|| "shutting down".into());
                cluster.set_down(Some(reason.clone()));
                link.fail_unconfirmed(&reason);
                let Some(reason) = ended else { return };
                warn!(%node, %endpoint, %reason, retry_in = ?delay, "cluster link lost");
                reason
            }
            Ok(Err(e)) => {
                warn!(%node, %endpoint, error = %e, retry_in = ?delay, "cluster link could not start");
                e
            }
            Err(_) => {
                let e = format!("no connection within {:?}", s.connect_timeout);
                warn!(%node, %endpoint, error = %e, retry_in = ?delay, "cluster link could not start");
                e
            }
        };
        cluster.set_down(Some(why.clone()));
        // While down, what was queued before fails (retryable): the publisher resends.
        let pause = tokio::time::sleep(jitter(delay));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = &mut pause => break,
                Some(fwd) = rx.recv() => fail(fwd.ack, &why),
                // A claim's dropped reply says "unavailable"; locks went with the connection.
                Some(_) = commands.recv() => {}
            }
        }
        delay = (delay * 2).min(s.reconnect_max);
    }
}

/// The messages of one forwarded delivery (one message or a batch) as a session queue holds
/// it, whichever node sent it; anything else (a notice) holds none.
pub(super) fn messages_of(body: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    let Some((&kind, rest)) = body.split_first() else { return out };
    let Some((&len, rest)) = rest.split_first() else { return out };
    let Some((_, encoded)) = rest.split_at_checked(usize::from(len)) else { return out };
    let mut one = |bytes: &[u8]| match codec::decode_message(bytes) {
        Ok(msg) => out.push(Message { received: std::time::Instant::now(), ..msg }),
        Err(e) => warn!(error = %e, "queued cluster message that cannot be read dropped"),
    };
    match kind {
        WIRE_VERSION => one(encoded),
        BATCH_KIND => {
            let Some((count, mut rest)) = encoded.split_at_checked(4) else { return out };
            let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]);
            for _ in 0..count {
                let Some((len, after)) = rest.split_at_checked(4) else { break };
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                let Some((bytes, after)) = after.split_at_checked(len) else { break };
                rest = after;
                one(bytes);
            }
        }
        _ => {}
    }
    out
}

/// The routing key of what is sent to node `node_id` alone (every node binds its own).
fn direct_key(node_id: &str) -> String {
    format!("n.{node_id}")
}

/// A lock queue: exclusive to the connection that declared it (deleted with it).
fn lock_flags() -> QueueFlags {
    QueueFlags { passive: false, durable: false, exclusive: true, auto_delete: false }
}

/// Reports a retryable failure on `ack`, if there is one.
fn fail(ack: Option<crate::targets::AckSender>, why: &str) {
    if let Some(ack) = ack {
        let reason = format!("cluster link down: {why}");
        let _ = ack.send(Outcome::Failed(Failure::retryable(reason)));
    }
}

/// Connects, declares the exchange and the node's queue, binds what the node needs and starts
/// consuming. Returns the transport and the bound keys.
async fn setup(
    uri: &Uri,
    s: &Settings,
    cluster: &Cluster,
) -> Result<(Transport, HashSet<String>), String> {
    let name = format!("cluster/{}", cluster.node_id);
    let link = transport::connect(uri, &s.security, &name, 1).await.map_err(|e| e.to_string())?;
    let mut t = link.transport;
    let ch = CONSUME_CHANNEL;
    let wire = |e: crate::targets::amqp::wire::WireError| e.to_string();
    // Durable and auto-deleted: it lives while a node's queue or a persistent session's
    // durable queue is bound to it, and with the session queues' bindings it survives a
    // RabbitMQ restart (an older version's non-durable one is refused with 406: stop every
    // node, or use another prefix).
    let flags = (true, true);
    methods::exchange_declare(&mut t.wbuf, ch, &s.exchange, "topic", flags).map_err(wire)?;
    expect(&mut t, ch, "exchange.declare", |m| {
        matches!(m, ConsumerMethod::Common(Method::ExchangeDeclareOk))
    })
    .await?;
    let flags = QueueFlags { passive: false, durable: false, exclusive: true, auto_delete: true };
    let max_length = i32::try_from(s.inbound_max).unwrap_or(i32::MAX);
    let args = [("x-max-length", Value::I32(max_length))];
    methods::queue_declare(&mut t.wbuf, ch, &s.queue, flags, &args).map_err(wire)?;
    expect(&mut t, ch, "queue.declare", |m| matches!(m, ConsumerMethod::QueueDeclareOk { .. }))
        .await
        .map_err(|e| {
            if e.contains("405") {
                format!("{e} (another running node uses node_id {})", cluster.node_id)
            } else {
                e
            }
        })?;
    methods::channel_open(&mut t.wbuf, LOCK_CHANNEL);
    expect(&mut t, LOCK_CHANNEL, "channel.open", |m| {
        matches!(m, ConsumerMethod::Common(Method::ChannelOpenOk))
    })
    .await?;
    let mut bound = HashSet::new();
    let wanted = cluster.all_wanted();
    let fixed =
        [keys::RETAINED_BINDING.to_owned(), NOTICE_KEY.to_owned(), direct_key(&cluster.node_id)];
    let all = fixed.into_iter().chain(wanted);
    for key in all {
        methods::queue_bind(&mut t.wbuf, ch, &s.queue, &s.exchange, &key).map_err(wire)?;
        bound.insert(key);
    }
    // Every bind-ok, in order (the binds went in one write).
    for _ in 0..bound.len() {
        expect(&mut t, ch, "queue.bind", |m| matches!(m, ConsumerMethod::QueueBindOk)).await?;
    }
    let tag = format!("mqgate-cluster/{}", cluster.node_id);
    consume::basic_consume_with(&mut t.wbuf, ch, &s.queue, &tag, true, true).map_err(wire)?;
    expect(&mut t, ch, "basic.consume", |m| matches!(m, ConsumerMethod::ConsumeOk(_))).await?;
    Ok((t, bound))
}

/// A delivery being assembled from its frames.
enum Assembly {
    /// Between messages.
    Idle,
    /// `basic.deliver` came; its content header is next.
    Header,
    /// Header came; body frames until `size` bytes.
    Body { size: usize, body: BytesMut },
}

/// The acknowledgements one publish resolves (a batch carries several; most one or none).
type Acks = smallvec::SmallVec<[crate::targets::AckSender; 1]>;

/// The lock request the broker is answering on [`LOCK_CHANNEL`].
enum LockWait {
    /// A session's claim.
    Claim(oneshot::Sender<Result<(), String>>),
    /// Taking a held lock again after a reconnect: refused, the client id is another node's.
    Reclaim(String),
    /// A release.
    Delete,
    /// Whether the node (of that epoch) that announced wills still holds its queue.
    Probe(String, u64),
    /// The right to publish a dead node's wills (one survivor gets it).
    ClaimWills(String, u64),
    /// Whether a silent node (forwarding filter) still holds its queue.
    PeerProbe(String),
    /// The channel is being opened again after a refused lock.
    Reopen,
    /// The deletion of a session queue (a clean start): its record queue's is next.
    DropSession(String),
}

/// A binding key of this node whose SUBACKs wait: for its bind-ok and for every other node's
/// acknowledgement of the delta that announced it.
struct Pending {
    /// The sequence number of that delta.
    seq: u64,
    /// Bind-ok received.
    bound: bool,
    /// When it was announced ([`peers::SUBACK_WAIT`] after it, it is ready anyway).
    since: Instant,
}

/// The link on one live connection.
struct Link<'a> {
    /// Settings.
    s: &'a Settings,
    /// The handle (interest, node id, metrics).
    cluster: &'a Cluster,
    /// Where messages from other nodes are delivered.
    broker: &'a Arc<Broker>,
    /// The lock request in progress (one at a time: a refusal closes the channel).
    lock_wait: Option<LockWait>,
    /// Held locks to take again on this new connection.
    reclaims: VecDeque<String>,
    /// Nodes (and epochs) whose wills this node keeps, to check.
    probes: VecDeque<(String, u64)>,
    /// Dead nodes whose wills to claim and publish.
    will_claims: VecDeque<(String, u64)>,
    /// Ticks since the last round of probes.
    ticks: u32,
    /// The socket and its buffers.
    t: Transport,
    /// Keys the queue is bound with now.
    bound: HashSet<String>,
    /// Publishes awaiting their confirm: delivery tag and the ack to tell, in tag order.
    unconfirmed: VecDeque<(u64, Acks)>,
    /// The delivery tag of the next publish.
    next_tag: u64,
    /// The delivery being assembled.
    assembly: Assembly,
    /// Scratch for encoding one message.
    body: BytesMut,
    /// Binds (`Some(key, its announcement's sequence number)`) and unbinds (`None`) sent and
    /// not yet answered, in order.
    binding: VecDeque<Option<(String, u64)>>,
    /// The other nodes' binding keys (what this node forwards to them).
    peers: Peers,
    /// Keys whose SUBACKs wait.
    pending: HashMap<String, Pending>,
    /// Silent nodes to check.
    peer_probes: VecDeque<String>,
    /// Ticks since the last heartbeat.
    beats: u32,
    /// The share groups with members here, by channel.
    groups: HashMap<u16, GroupChannel>,
    /// The channel of each share group (by its whole filter).
    group_channel: HashMap<String, u16>,
    /// Channels whose `channel.close` was sent, not yet answered.
    closing: HashSet<u16>,
    /// Channels free to use again.
    free_channels: Vec<u16>,
    /// The next channel never used.
    next_channel: u16,
    /// Deliveries of share queues being assembled: channel → (delivery tag, assembly).
    group_assembly: HashMap<u16, (u64, Assembly)>,
    /// The channel of each share group by its number (`groups::split` of a report's token).
    group_ids: HashMap<u32, u16>,
    /// The number of the next share group opened.
    next_group_id: u32,
    /// Where the share queues' deliveries report once finished (one report per
    /// unacknowledged delivery: bounded by the prefetch of each group).
    group_report_tx: mpsc::UnboundedSender<Done>,
    group_report_rx: mpsc::UnboundedReceiver<Done>,
    /// `cluster_share_deliveries` held and returned, resolved once.
    share_counters: ShareCounters,
    /// When messages waiting for room in members' queues are tried again next.
    stall_retry_at: tokio::time::Instant,
    /// `cluster_messages` out, in and own, resolved once.
    counted: [prometheus_client::metrics::counter::Counter; 3],
}

impl<'a> Link<'a> {
    fn new(
        s: &'a Settings,
        cluster: &'a Cluster,
        broker: &'a Arc<Broker>,
        t: Transport,
        bound: HashSet<String>,
    ) -> Self {
        let (group_report_tx, group_report_rx) = mpsc::unbounded_channel();
        Link {
            s,
            cluster,
            broker,
            lock_wait: None,
            reclaims: cluster.held().into(),
            probes: VecDeque::new(),
            will_claims: VecDeque::new(),
            ticks: 0,
            t,
            bound,
            unconfirmed: VecDeque::new(),
            next_tag: 1,
            assembly: Assembly::Idle,
            body: BytesMut::new(),
            binding: VecDeque::new(),
            peers: Peers::new(Instant::now()),
            pending: HashMap::new(),
            peer_probes: VecDeque::new(),
            beats: 0,
            groups: HashMap::new(),
            group_channel: HashMap::new(),
            closing: HashSet::new(),
            free_channels: Vec::new(),
            next_channel: FIRST_GROUP_CHANNEL,
            group_assembly: HashMap::new(),
            group_ids: HashMap::new(),
            next_group_id: 0,
            group_report_tx,
            group_report_rx,
            share_counters: ShareCounters {
                held: cluster.metrics.cluster.share("held"),
                returned: cluster.metrics.cluster.share("returned"),
            },
            stall_retry_at: tokio::time::Instant::now(),
            counted: ["out", "in", "own"].map(|d| cluster.metrics.cluster.direction(d)),
        }
    }

    /// Runs until the connection is lost (`Some(reason)`) or shutdown (`None`).
    async fn run(
        &mut self,
        rx: &mut mpsc::Receiver<Forward>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What the setup bound is in place (the fixed keys at once; the subscriptions' once
        // the other nodes acknowledged them); then the changes made while connecting.
        let now = Instant::now();
        let mut view = self.peers.view(now);
        self.cluster.set_remote(|v| {
            view.groups = std::mem::take(&mut v.groups);
            view.sessions = std::mem::take(&mut v.sessions);
            *v = view;
        });
        self.cluster.clear_directory();
        let seq = self.cluster.announced.fetch_add(1, Ordering::AcqRel) + 1;
        for key in &self.bound {
            if key.starts_with("m.") {
                self.pending.insert(key.clone(), Pending { seq, bound: true, since: now });
            } else {
                self.cluster.applied(key, true);
            }
        }
        self.send_keys(NOTICE_KEY.to_owned(), seq, true);
        for key in self.cluster.all_groups() {
            self.open_group(key);
        }
        self.apply_changes();
        // The retained messages published while this node was not there; the wills of its
        // clients, which the others may have missed.
        self.notice(NOTICE_RETAINED, b"");
        self.announce_wills();
        for (client_id, expiry, keys) in self.cluster.served_sessions() {
            self.session_keys_notice(&client_id, expiry, &keys);
        }
        loop {
            self.next_reclaim();
            let want_write = self.t.has_pending_writes();
            let room = self.unconfirmed.len() < MAX_UNCONFIRMED;
            let locks_free = self.lock_wait.is_none() && self.reclaims.is_empty();
            let stalled = self.groups.values().any(GroupChannel::is_stalled);
            let res = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.close().await;
                    return None;
                }
                r = self.t.stream.readable() => match r {
                    Ok(()) => self.on_readable(),
                    Err(e) => Err(format!("read failed: {e}")),
                },
                () = self.cluster.changed.notified() => {
                    self.apply_changes();
                    Ok(())
                }
                Some(done) = self.group_report_rx.recv() => {
                    self.on_group_reports(done);
                    Ok(())
                }
                () = tokio::time::sleep_until(self.stall_retry_at), if stalled => {
                    self.drain_groups();
                    Ok(())
                }
                Some(cmd) = commands.recv(), if locks_free => {
                    self.on_command(cmd);
                    Ok(())
                }
                Some(fwd) = rx.recv(), if room => {
                    let mut taken = vec![fwd];
                    while taken.len() < BATCH {
                        match rx.try_recv() {
                            Ok(fwd) => taken.push(fwd),
                            Err(_) => break,
                        }
                    }
                    self.publish(taken);
                    Ok(())
                }
                r = self.t.stream.writable(), if want_write => match r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(format!("write failed: {e}")),
                },
                _ = tick.tick() => self.on_tick(),
            };
            if let Err(reason) = res {
                return Some(reason);
            }
            if let Err(e) = self.t.try_flush() {
                return Some(format!("write failed: {e}"));
            }
        }
    }

    /// Starts the next request of the link's own on the lock channel, when none is in
    /// progress: taking a held lock again, claiming a dead node's wills, checking a node.
    fn next_reclaim(&mut self) {
        if self.lock_wait.is_some() {
            return;
        }
        let w = &mut self.t.wbuf;
        if let Some(client_id) = self.reclaims.pop_front() {
            let q = self.s.lock_queue(&client_id);
            if methods::queue_declare(w, LOCK_CHANNEL, &q, lock_flags(), &[]).is_ok() {
                self.lock_wait = Some(LockWait::Reclaim(client_id));
            }
        } else if let Some((node, epoch)) = self.will_claims.pop_front() {
            let q =
                format!("{}wills.{node}.{epoch}", self.s.lock_prefix.trim_end_matches("client."));
            if methods::queue_declare(w, LOCK_CHANNEL, &q, lock_flags(), &[]).is_ok() {
                self.lock_wait = Some(LockWait::ClaimWills(node, epoch));
            }
        } else if let Some(node) = self.peer_probes.pop_front() {
            let q = format!("{}node.{node}", self.s.lock_prefix.trim_end_matches("client."));
            let passive = QueueFlags { passive: true, ..QueueFlags::default() };
            if methods::queue_declare(w, LOCK_CHANNEL, &q, passive, &[]).is_ok() {
                self.lock_wait = Some(LockWait::PeerProbe(node));
            }
        } else if let Some((node, epoch)) = self.probes.pop_front() {
            let q = format!("{}node.{node}", self.s.lock_prefix.trim_end_matches("client."));
            let passive = QueueFlags { passive: true, ..QueueFlags::default() };
            if methods::queue_declare(w, LOCK_CHANNEL, &q, passive, &[]).is_ok() {
                self.lock_wait = Some(LockWait::Probe(node, epoch));
            }
        }
    }

    /// Announces the wills of this node's clients to every node.
    fn announce_wills(&mut self) {
        for (client_id, will) in self.cluster.local_wills() {
            self.will_notice(&client_id, Some(&will));
        }
    }

    /// A will notice about `client_id` (`will`: set, `None`: cleared).
    fn will_notice(&mut self, client_id: &str, will: Option<&[u8]>) {
        let mut subject = Vec::with_capacity(10 + client_id.len() + will.map_or(0, <[u8]>::len));
        subject.extend_from_slice(&self.cluster.epoch.to_be_bytes());
        subject
            .extend_from_slice(&(client_id.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        subject.extend_from_slice(client_id.as_bytes());
        if let Some(w) = will {
            subject.extend_from_slice(w);
        }
        self.notice(if will.is_some() { WILL_SET } else { WILL_CLEAR }, &subject);
    }

    /// A will notice from node `origin`.
    fn on_will(&mut self, origin: &str, kind: u8, subject: &[u8]) {
        let Some((epoch, rest)) = subject.split_at_checked(8) else { return };
        let Some((len, rest)) = rest.split_at_checked(2) else { return };
        let epoch = u64::from_be_bytes(epoch.try_into().unwrap_or([0; 8]));
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let Some((client_id, will)) = rest.split_at_checked(len) else { return };
        let Ok(client_id) = std::str::from_utf8(client_id) else { return };
        let will = (kind == WILL_SET).then(|| will.to_vec());
        self.cluster.remote_will(origin, epoch, client_id, will);
        // Wills of an older epoch of this node: that incarnation is dead.
        for (node, old) in self.cluster.will_holders() {
            if node == origin && old < epoch && !self.will_claims.contains(&(node.clone(), old)) {
                self.will_claims.push_back((node, old));
            }
        }
    }

    /// Publishes the wills of a dead node (this node won the right to): here as a local
    /// publish, and to the other nodes.
    fn publish_wills(&mut self, node: &str, epoch: u64) {
        let wills = self.cluster.take_wills(node, epoch);
        if !wills.is_empty() {
            info!(dead = %node, wills = wills.len(), "publishing the wills of a node that left the cluster");
        }
        for encoded in wills {
            let Ok(msg) = codec::decode_message(&encoded) else { continue };
            let msg = Arc::new(Message { received: std::time::Instant::now(), ..msg });
            self.broker.publish(&msg, None, &mut Waits::new());
            let own = self.cluster.node_id.as_bytes();
            self.body.clear();
            self.body.put_u8(WIRE_VERSION);
            self.body.put_u8(own.len() as u8);
            self.body.extend_from_slice(own);
            self.body.extend_from_slice(&encoded);
            let key = keys::routing_key(&msg.topic, msg.retain);
            self.send_body_acks(key, Acks::new(), msg.qos != crate::mqtt::codec::QoS::AtMostOnce);
            self.counted[0].inc();
        }
    }

    /// A session's lock request or takeover notice.
    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Claim { client_id, reply } => {
                let q = self.s.lock_queue(&client_id);
                let flags = lock_flags();
                match methods::queue_declare(&mut self.t.wbuf, LOCK_CHANNEL, &q, flags, &[]) {
                    Ok(()) => self.lock_wait = Some(LockWait::Claim(reply)),
                    Err(e) => {
                        let _ = reply.send(Err(e.to_string()));
                    }
                }
            }
            Command::Release { client_id } => {
                let q = self.s.lock_queue(&client_id);
                if methods::queue_delete(&mut self.t.wbuf, LOCK_CHANNEL, &q).is_ok() {
                    self.lock_wait = Some(LockWait::Delete);
                }
                self.notice(CLIENT_GONE, client_id.as_bytes());
            }
            Command::Notice { client_id, release } => {
                let kind = if release { NOTICE_RELEASE } else { NOTICE_ACQUIRED };
                self.notice(kind, client_id.as_bytes());
            }
            Command::Will { client_id, will } => self.will_notice(&client_id, will.as_deref()),
            Command::SessionKeys { client_id, expiry, keys } => {
                self.session_keys_notice(&client_id, expiry, &keys)
            }
            Command::DropSession { client_id } => {
                self.notice(SESSION_DROP, client_id.as_bytes());
                let (queue, _) = self.cluster.psettings.names(&client_id);
                if methods::queue_delete(&mut self.t.wbuf, LOCK_CHANNEL, &queue).is_ok() {
                    self.lock_wait = Some(LockWait::DropSession(client_id));
                }
            }
        }
    }

    /// Publishes a notice of `kind` about `subject` to every node.
    fn notice(&mut self, kind: u8, subject: &[u8]) {
        self.notice_to(NOTICE_KEY.to_owned(), kind, subject);
    }

    /// Publishes a notice of `kind` about `subject` with routing key `key` (every node, or one).
    fn notice_to(&mut self, key: String, kind: u8, subject: &[u8]) {
        self.body.clear();
        self.body.put_u8(kind);
        let node = self.cluster.node_id.as_bytes();
        self.body.put_u8(node.len() as u8);
        self.body.extend_from_slice(node);
        self.body.extend_from_slice(subject);
        self.send_body(key, None);
    }

    /// Sends this node's binding keys in full (sequence number `seq`) with routing key `to`;
    /// `ask`: the receivers answer with theirs.
    fn send_keys(&mut self, to: String, seq: u64, ask: bool) {
        let mut subject = Vec::with_capacity(17 + self.bound.len() * 24);
        subject.extend_from_slice(&self.cluster.epoch.to_be_bytes());
        subject.extend_from_slice(&seq.to_be_bytes());
        subject.push(u8::from(ask));
        for key in self.bound.iter().filter(|k| k.starts_with("m.")) {
            subject.push(key.len().min(255) as u8);
            subject.extend_from_slice(key.as_bytes());
        }
        self.notice_to(to.clone(), KEYS_FULL, &subject);
        // With them, the client ids this node holds (the admin API's cluster-wide list).
        let mut clients = Vec::new();
        for id in self.cluster.held() {
            let id = &id.as_bytes()[..id.len().min(usize::from(u16::MAX))];
            clients.extend_from_slice(&(id.len() as u16).to_be_bytes());
            clients.extend_from_slice(id);
        }
        self.notice_to(to, CLIENTS_FULL, &clients);
    }

    /// A forwarding-filter notice (`KEYS_*`, heartbeat, goodbye) from node `origin`.
    fn on_keys(&mut self, origin: &str, kind: u8, subject: &[u8]) {
        let now = Instant::now();
        let word = |b: &[u8]| b.try_into().map(u64::from_be_bytes).ok();
        let (Some(epoch), seq) =
            (subject.get(..8).and_then(word), subject.get(8..16).and_then(word))
        else {
            return;
        };
        let seq = seq.unwrap_or(0);
        let rest = subject.get(16..).unwrap_or_default();
        let cluster = self.cluster;
        let then = match kind {
            KEYS_FULL => {
                let (ask, mut rest) =
                    rest.split_first().map_or((false, &[][..]), |(a, r)| (*a == 1, r));
                let mut keys = HashSet::new();
                while let Some((&len, after)) = rest.split_first() {
                    let Some((key, after)) = after.split_at_checked(usize::from(len)) else {
                        break;
                    };
                    keys.extend(std::str::from_utf8(key).ok().map(str::to_owned));
                    rest = after;
                }
                let peers = &mut self.peers;
                let then =
                    cluster.set_remote(|v| peers.on_full(v, origin, (epoch, seq), keys, now));
                if ask {
                    let seq = self.cluster.announced.load(Ordering::Acquire);
                    self.send_keys(direct_key(origin), seq, false);
                    self.send_sessions(origin);
                }
                then
            }
            KEYS_DELTA => {
                let mut changes = Vec::new();
                let mut rest = rest;
                while let Some((&added, after)) = rest.split_first() {
                    let Some((&len, after)) = after.split_first() else { break };
                    let Some((key, after)) = after.split_at_checked(usize::from(len)) else {
                        break;
                    };
                    if let Ok(key) = std::str::from_utf8(key) {
                        changes.push((key.to_owned(), added == 1));
                    }
                    rest = after;
                }
                let peers = &mut self.peers;
                cluster.set_remote(|v| peers.on_delta(v, origin, (epoch, seq), &changes, now))
            }
            KEYS_ACK => {
                self.peers.on_ack(origin, epoch, seq, self.cluster.epoch, now);
                self.check_pending(now);
                return;
            }
            HEARTBEAT => {
                let peers = &mut self.peers;
                cluster.set_remote(|v| peers.on_heartbeat(v, origin, epoch, seq, now))
            }
            _ => {
                let peers = &mut self.peers;
                cluster.set_remote(|v| peers.remove(v, origin, now));
                self.cluster.clients_of(origin, None);
                self.cluster.sticky_node_gone(origin);
                Then::Nothing
            }
        };
        match then {
            Then::Nothing => {}
            Then::Ack { epoch, seq } => {
                let mut subject = [0u8; 16];
                subject[..8].copy_from_slice(&epoch.to_be_bytes());
                subject[8..].copy_from_slice(&seq.to_be_bytes());
                self.notice_to(direct_key(origin), KEYS_ACK, &subject);
            }
            Then::AskFull => {
                let seq = self.cluster.announced.load(Ordering::Acquire);
                self.send_keys(direct_key(origin), seq, true);
            }
        }
    }

    /// Lets the SUBACKs of every pending key go that may: bound, and acknowledged by every
    /// node this one knows (after the grace), or waiting for [`peers::SUBACK_WAIT`].
    fn check_pending(&mut self, now: Instant) {
        if self.pending.is_empty() {
            return;
        }
        let grace = self.peers.in_grace(now);
        let peers = &self.peers;
        let mut ready = Vec::new();
        self.pending.retain(|key, p| {
            let acked = !grace && peers.all_acked(p.seq);
            let go = p.bound && (acked || now.duration_since(p.since) >= peers::SUBACK_WAIT);
            if go {
                ready.push(key.clone());
            }
            !go
        });
        for key in ready {
            self.cluster.applied(&key, true);
        }
    }

    /// Publishes `self.body` with `key`; `ack` is told the confirm (a QoS 1/2 message: sent
    /// persistent).
    fn send_body(&mut self, key: String, ack: Option<crate::targets::AckSender>) {
        let persistent = ack.is_some();
        self.send_body_acks(key, ack.into_iter().collect(), persistent);
    }

    /// Publishes `self.body` with `key`; every one of `acks` is told the confirm. `persistent`
    /// (the body holds a QoS 1/2 message): RabbitMQ writes it to disk where it lands in a
    /// durable queue (a persistent session's), so a restart of RabbitMQ keeps it; the nodes'
    /// own queues are not durable and do not write it.
    fn send_body_acks(&mut self, key: String, acks: Acks, persistent: bool) {
        let properties =
            Properties { delivery_mode: if persistent { 2 } else { 1 }, ..Properties::default() };
        let sent = methods::publish_with(
            &mut self.t.wbuf,
            PUBLISH_CHANNEL,
            &self.s.exchange,
            &key,
            false,
            &properties,
            &self.body,
            self.t.frame_max,
        );
        match sent {
            Ok(()) => {
                self.unconfirmed.push_back((self.next_tag, acks));
                self.next_tag += 1;
            }
            Err(e) => {
                for ack in acks {
                    let reason = format!("cannot be sent to the cluster: {e}");
                    let _ = ack.send(Outcome::Failed(Failure::fatal(reason)));
                }
            }
        }
    }

    /// Sends every retained message of this node to node `to` (which just connected).
    fn send_retained(&mut self, to: &str) {
        let key = direct_key(to);
        let node = Arc::clone(&self.cluster.node_id);
        for msg in self.broker.retained_matching("#") {
            let Ok(encoded) = codec::encode_message(&msg) else { continue };
            self.body.clear();
            self.body.put_u8(SNAPSHOT);
            self.body.put_u8(node.len() as u8);
            self.body.extend_from_slice(node.as_bytes());
            self.body.extend_from_slice(&encoded);
            self.send_body(key.clone(), None);
        }
    }

    /// The broker's answer to the lock request in progress: `Ok` granted (or released, or
    /// the channel open again), `Err` refused (the channel was closed: opened again here).
    fn lock_answer(&mut self, answer: Result<(), String>) {
        let refused = answer.is_err();
        match (self.lock_wait.take(), answer) {
            (Some(LockWait::Claim(reply)), answer) => {
                let _ = reply.send(answer);
            }
            (Some(LockWait::Reclaim(client_id)), Err(_)) => {
                // Taken by another node while this one was cut off: the client goes.
                self.cluster.forget_lock(&client_id);
                self.taken_elsewhere(&client_id);
            }
            // The node's queue is gone: so is its connection to RabbitMQ (a node cut off
            // from RabbitMQ counts as gone; its clients' wills go out).
            (Some(LockWait::Probe(node, epoch)), Err(e)) if e.starts_with("404") => {
                self.will_claims.push_back((node, epoch));
            }
            (Some(LockWait::ClaimWills(node, epoch)), Ok(())) => self.publish_wills(&node, epoch),
            (Some(LockWait::PeerProbe(node)), answer) => {
                let gone = matches!(&answer, Err(e) if e.starts_with("404"));
                let now = Instant::now();
                let peers = &mut self.peers;
                let ask = self.cluster.set_remote(|v| peers.probed(v, &node, !gone, now));
                if gone {
                    info!(node = %node, "a silent node's queue is gone: not forwarding to it");
                    self.cluster.clients_of(&node, None);
                    self.cluster.sticky_node_gone(&node);
                    self.check_pending(now);
                } else if ask {
                    let seq = self.cluster.announced.load(Ordering::Acquire);
                    self.send_keys(direct_key(&node), seq, true);
                }
            }
            (Some(LockWait::DropSession(client_id)), _) if !refused => {
                let (_, record) = self.cluster.psettings.names(&client_id);
                if methods::queue_delete(&mut self.t.wbuf, LOCK_CHANNEL, &record).is_ok() {
                    self.lock_wait = Some(LockWait::Delete);
                }
            }
            (Some(LockWait::ClaimWills(node, epoch)), Err(_)) => {
                // Another node publishes them.
                self.cluster.take_wills(&node, epoch);
            }
            _ => {}
        }
        if refused {
            methods::channel_open(&mut self.t.wbuf, LOCK_CHANNEL);
            self.lock_wait = Some(LockWait::Reopen);
        }
    }

    /// Another node took `client_id` over: its connection here closes (0x8E) and what it
    /// leaves of its session is discarded once parked.
    fn taken_elsewhere(&self, client_id: &str) {
        let Some(link) = self.broker.taken_elsewhere(client_id) else { return };
        let broker = Arc::clone(self.broker);
        let client_id = client_id.to_owned();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), link.parked()).await;
            if let Some(state) = broker.take_session(&client_id) {
                broker.discard_session(state);
            }
        });
    }

    /// Opens the share queue of group `key` on a channel of its own: declared, bound,
    /// consumed with acknowledgements (the SUBACKs of its members wait for `consume-ok`).
    fn open_group(&mut self, key: String) {
        if self.group_channel.contains_key(&key) {
            return;
        }
        let filter = match topic::parse_subscription(&key) {
            Ok(f) if f.group.is_some() => f.filter.to_owned(),
            _ => return,
        };
        let ch = match self.free_channels.pop() {
            Some(ch) => ch,
            None if self.next_channel < self.t.channel_max => {
                self.next_channel += 1;
                self.next_channel - 1
            }
            None => {
                warn!(group = %key, "no AMQP channel left for another share group: served per node");
                self.cluster.group_applied(&key, false);
                return;
            }
        };
        let queue = self.s.share_queue(&key);
        let w = &mut self.t.wbuf;
        methods::channel_open(w, ch);
        consume::basic_qos(w, ch, GROUP_PREFETCH);
        let flags =
            QueueFlags { passive: false, durable: false, exclusive: false, auto_delete: true };
        let max_length = i32::try_from(self.s.inbound_max).unwrap_or(i32::MAX);
        let args = [("x-max-length", Value::I32(max_length))];
        let binding = keys::binding_key(&filter);
        let retained = format!("r{}", &binding[1..]);
        let tag = format!("mqgate-cluster/{}", self.cluster.node_id);
        let sent = methods::queue_declare(w, ch, &queue, flags, &args)
            .and_then(|()| methods::queue_bind(w, ch, &queue, &self.s.exchange, &binding))
            // Retained messages are delivered live too (routing key `r.…`).
            .and_then(|()| methods::queue_bind(w, ch, &queue, &self.s.exchange, &retained))
            .and_then(|()| consume::basic_consume_with(w, ch, &queue, &tag, false, false));
        if let Err(e) = sent {
            warn!(group = %key, error = %e, "share queue not opened: served per node");
            self.cluster.group_applied(&key, false);
            return;
        }
        let id = self.next_group_id;
        self.next_group_id = (id + 1) % groups::GROUP_IDS;
        self.group_channel.insert(key.clone(), ch);
        self.group_ids.insert(id, ch);
        self.groups.insert(ch, GroupChannel::new(key, filter, ch, id));
    }

    /// Closes the channel of group `key` (its last member here left): RabbitMQ gives what it
    /// had delivered here and not acknowledged to another node's members (the reports of
    /// those deliveries, if any come, are ignored).
    fn close_group(&mut self, key: &str) {
        let Some(ch) = self.group_channel.remove(key) else { return };
        self.forget_group(ch);
        let start = frame::begin(&mut self.t.wbuf, 1, ch);
        self.t.wbuf.put_u16(20); // channel
        self.t.wbuf.put_u16(40); // close
        self.t.wbuf.put_u16(REPLY_SUCCESS);
        self.t.wbuf.put_u8(0); // reply text
        self.t.wbuf.put_u16(0);
        self.t.wbuf.put_u16(0);
        frame::end(&mut self.t.wbuf, start);
        self.closing.insert(ch);
    }

    /// Forgets the group on channel `ch` (closed or being closed): what waits here goes with
    /// it (RabbitMQ requeues every unacknowledged delivery of a closed channel).
    fn forget_group(&mut self, ch: u16) -> Option<GroupChannel> {
        self.group_assembly.remove(&ch);
        let g = self.groups.remove(&ch)?;
        self.group_ids.retain(|_, c| *c != ch);
        Some(g)
    }

    /// A whole delivery of a share queue on channel `ch`: each message whose topic the
    /// group's filter matches goes to one member here; acknowledged once all are finished.
    fn on_group_message(&mut self, ch: u16, tag: u64, body: &[u8]) {
        let Some(group) = self.groups.get_mut(&ch) else { return };
        let report = &self.group_report_tx;
        group.on_delivery(tag, body, self.broker, report, &mut self.t.wbuf, &self.share_counters);
    }

    /// Reports of finished share-queue deliveries (`first` and whatever else is there):
    /// acks and nacks, then one multiple ack per group; messages that waited are tried again.
    fn on_group_reports(&mut self, first: Done) {
        let mut done = Some(first);
        while let Some(d) = done.take().or_else(|| self.group_report_rx.try_recv().ok()) {
            let (id, tag) = groups::split(d.token);
            let Some(g) = self.group_ids.get(&id).and_then(|ch| self.groups.get_mut(ch)) else {
                continue;
            };
            g.on_report(tag, d.summary, &mut self.t.wbuf, &self.share_counters);
        }
        for g in self.groups.values_mut() {
            g.ack_settled(&mut self.t.wbuf);
        }
        self.drain_groups();
    }

    /// Hands what waits for room in the members' queues to them, as far as it goes.
    fn drain_groups(&mut self) {
        self.stall_retry_at = tokio::time::Instant::now() + STALL_RETRY;
        for g in self.groups.values_mut() {
            if g.is_stalled() {
                g.drain(self.broker, &self.share_counters);
            }
        }
    }

    /// Binds and unbinds as the interest changed.
    fn apply_changes(&mut self) {
        for (key, wanted) in self.cluster.take_group_changes() {
            if wanted {
                self.open_group(key);
            } else {
                self.close_group(&key);
            }
        }
        self.apply_binding_changes();
        let n = i64::try_from(self.bound.len()).unwrap_or(i64::MAX);
        self.cluster.metrics.cluster.bindings.set(n);
    }

    /// [`apply_changes`](Self::apply_changes) without the gauge.
    /// The keys added and removed go to the other nodes as one delta (one sequence number);
    /// an added key's SUBACKs wait for its bind-ok and the other nodes' acknowledgements.
    fn apply_binding_changes(&mut self) {
        let changes = self.cluster.take_changes();
        if changes.is_empty() {
            return;
        }
        let seq = self.cluster.announced.load(Ordering::Acquire) + 1;
        let mut delta = Vec::new();
        let now = Instant::now();
        for (key, wanted) in changes {
            let (q, x) = (&self.s.queue, &self.s.exchange);
            if wanted && !self.bound.contains(&key) {
                if methods::queue_bind(&mut self.t.wbuf, CONSUME_CHANNEL, q, x, &key).is_ok() {
                    self.binding.push_back(Some((key.clone(), seq)));
                    delta.push(1);
                    delta.push(key.len().min(255) as u8);
                    delta.extend_from_slice(key.as_bytes());
                    self.pending.insert(key.clone(), Pending { seq, bound: false, since: now });
                    self.bound.insert(key);
                }
            } else if !wanted && self.bound.remove(&key) {
                self.cluster.applied(&key, false);
                self.pending.remove(&key);
                if methods::queue_unbind(&mut self.t.wbuf, CONSUME_CHANNEL, q, x, &key).is_ok() {
                    self.binding.push_back(None);
                }
                delta.push(0);
                delta.push(key.len().min(255) as u8);
                delta.extend_from_slice(key.as_bytes());
            }
        }
        if delta.is_empty() {
            return;
        }
        self.cluster.announced.store(seq, Ordering::Release);
        let mut subject = Vec::with_capacity(16 + delta.len());
        subject.extend_from_slice(&self.cluster.epoch.to_be_bytes());
        subject.extend_from_slice(&seq.to_be_bytes());
        subject.extend_from_slice(&delta);
        self.notice(KEYS_DELTA, &subject);
    }

    /// Publishes `taken` to the exchange (one publish whoever wants them), in order:
    /// consecutive messages with one routing key go as one AMQP message (a batch), which
    /// RabbitMQ routes once.
    fn publish(&mut self, taken: Vec<Forward>) {
        let mut group: Vec<(Vec<u8>, Option<crate::targets::AckSender>)> = Vec::new();
        let (mut key, mut bytes) = (String::new(), 0);
        for fwd in taken {
            let encoded = match codec::encode_message(&fwd.msg) {
                Ok(encoded) => encoded,
                Err(e) => {
                    if let Some(ack) = fwd.ack {
                        let reason = format!("cannot be sent to the cluster: {e}");
                        let _ = ack.send(Outcome::Failed(Failure::fatal(reason)));
                    }
                    continue;
                }
            };
            let k = keys::routing_key(&fwd.msg.topic, fwd.msg.retain);
            if k != key || group.len() >= BATCH_MESSAGES || bytes >= BATCH_BYTES {
                self.send_group(&key, &mut group);
                (key, bytes) = (k, 0);
            }
            bytes += encoded.len();
            group.push((encoded, fwd.ack));
        }
        self.send_group(&key, &mut group);
    }

    /// Sends the messages of `group` (one routing key `key`) as one publish, and empties it.
    fn send_group(
        &mut self,
        key: &str,
        group: &mut Vec<(Vec<u8>, Option<crate::targets::AckSender>)>,
    ) {
        if group.is_empty() {
            return;
        }
        let node = self.cluster.node_id.as_bytes();
        self.body.clear();
        self.body.put_u8(if group.len() == 1 { WIRE_VERSION } else { BATCH_KIND });
        self.body.put_u8(node.len() as u8);
        self.body.extend_from_slice(node);
        if group.len() == 1 {
            self.body.extend_from_slice(&group[0].0);
        } else {
            self.body.put_u32(group.len() as u32);
            for (encoded, _) in group.iter() {
                self.body.put_u32(encoded.len() as u32);
                self.body.extend_from_slice(encoded);
            }
        }
        self.counted[0].inc_by(group.len() as u64);
        let acks: Acks = group.drain(..).filter_map(|(_, ack)| ack).collect();
        let persistent = !acks.is_empty();
        self.send_body_acks(key.to_owned(), acks, persistent);
    }

    /// Reads what is there and handles every complete frame.
    fn on_readable(&mut self) -> Result<(), String> {
        if !self.t.try_fill().map_err(|e| format!("read failed: {e}"))? {
            return Err("the broker closed the connection".into());
        }
        while let Some(frame) = self.t.next_consumer_frame().map_err(|e| e.to_string())? {
            self.on_frame(frame)?;
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: ConsumerFrame) -> Result<(), String> {
        match frame {
            ConsumerFrame::Heartbeat => {}
            ConsumerFrame::Method { channel, method } => return self.on_method(channel, method),
            ConsumerFrame::Header { channel, body_size, .. }
                if self.groups.contains_key(&channel) =>
            {
                let Some((tag, assembly)) = self.group_assembly.get_mut(&channel) else {
                    return Err("content header without basic.deliver".into());
                };
                let size = usize::try_from(body_size).map_err(|_| "body too large")?;
                if size == 0 {
                    let tag = *tag;
                    self.group_assembly.remove(&channel);
                    self.on_group_message(channel, tag, &[]);
                } else {
                    let body = BytesMut::with_capacity(size.min(self.t.frame_max as usize));
                    *assembly = Assembly::Body { size, body };
                }
            }
            ConsumerFrame::Body { channel, bytes } if self.groups.contains_key(&channel) => {
                let Some((tag, Assembly::Body { body, size })) =
                    self.group_assembly.get_mut(&channel)
                else {
                    return Err("content body without a header".into());
                };
                body.extend_from_slice(&bytes);
                if body.len() >= *size {
                    let tag = *tag;
                    if let Some((_, Assembly::Body { body, .. })) =
                        self.group_assembly.remove(&channel)
                    {
                        self.on_group_message(channel, tag, &body);
                    }
                }
            }
            ConsumerFrame::Header { channel: CONSUME_CHANNEL, body_size, .. } => {
                if !matches!(self.assembly, Assembly::Header) {
                    return Err("content header without basic.deliver".into());
                }
                let size = usize::try_from(body_size).map_err(|_| "body too large")?;
                if size == 0 {
                    self.assembly = Assembly::Idle;
                    self.on_message(&[]);
                } else {
                    let body = BytesMut::with_capacity(size.min(self.t.frame_max as usize));
                    self.assembly = Assembly::Body { size, body };
                }
            }
            ConsumerFrame::Body { channel: CONSUME_CHANNEL, bytes } => {
                let Assembly::Body { body, size } = &mut self.assembly else {
                    return Err("content body without a header".into());
                };
                body.extend_from_slice(&bytes);
                if body.len() >= *size {
                    if let Assembly::Body { body, .. } =
                        std::mem::replace(&mut self.assembly, Assembly::Idle)
                    {
                        self.on_message(&body);
                    }
                }
            }
            ConsumerFrame::Header { .. } | ConsumerFrame::Body { .. } => {}
        }
        Ok(())
    }

    fn on_method(&mut self, channel: u16, method: ConsumerMethod) -> Result<(), String> {
        match method {
            ConsumerMethod::Deliver(Deliver { .. }) if channel == CONSUME_CHANNEL => {
                self.assembly = Assembly::Header;
            }
            ConsumerMethod::Deliver(Deliver { delivery_tag, .. })
                if self.groups.contains_key(&channel) =>
            {
                self.group_assembly.insert(channel, (delivery_tag, Assembly::Header));
            }
            ConsumerMethod::ConsumeOk(_) if self.groups.contains_key(&channel) => {
                if let Some(g) = self.groups.get(&channel) {
                    self.cluster.group_applied(&g.key, true);
                }
            }
            ConsumerMethod::Common(Method::ChannelCloseOk) if self.closing.remove(&channel) => {
                self.free_channels.push(channel);
            }
            ConsumerMethod::Common(Method::ChannelClose(c))
                if self.groups.contains_key(&channel) || self.closing.contains(&channel) =>
            {
                methods::channel_close_ok(&mut self.t.wbuf, channel);
                self.closing.remove(&channel);
                if let Some(g) = self.forget_group(channel) {
                    warn!(group = %g.key, reason = %describe(&c), "share queue refused: served per node");
                    self.group_channel.remove(&g.key);
                    self.cluster.group_applied(&g.key, false);
                }
                self.free_channels.push(channel);
            }
            ConsumerMethod::Common(Method::BasicAck { tag, multiple }) => {
                self.confirmed(tag, multiple, true)
            }
            ConsumerMethod::Common(Method::BasicNack { tag, multiple }) => {
                self.confirmed(tag, multiple, false)
            }
            ConsumerMethod::Cancel(tag) => {
                consume::basic_cancel_ok(&mut self.t.wbuf, channel, &tag);
                return Err("the broker cancelled the node's consumer (queue deleted?)".into());
            }
            ConsumerMethod::Common(Method::ConnectionClose(c)) => {
                methods::connection_close_ok(&mut self.t.wbuf);
                let _ = self.t.try_flush();
                return Err(format!("the broker closed the connection: {}", describe(&c)));
            }
            ConsumerMethod::QueueBindOk
            | ConsumerMethod::Common(Method::Other { class: 50, method: 51 })
                if channel == CONSUME_CHANNEL =>
            {
                if let Some(Some((key, seq))) = self.binding.pop_front() {
                    if let Some(p) = self.pending.get_mut(&key).filter(|p| p.seq == seq) {
                        p.bound = true;
                        self.check_pending(Instant::now());
                    }
                }
            }
            ConsumerMethod::QueueDeclareOk { .. } if channel == LOCK_CHANNEL => {
                self.lock_answer(Ok(()))
            }
            ConsumerMethod::Common(Method::Other { class: 50, method: 41 })
            | ConsumerMethod::Common(Method::ChannelOpenOk)
                if channel == LOCK_CHANNEL =>
            {
                self.lock_answer(Ok(()))
            }
            ConsumerMethod::Common(Method::ChannelClose(c)) if channel == LOCK_CHANNEL => {
                methods::channel_close_ok(&mut self.t.wbuf, channel);
                self.lock_answer(Err(describe(&c)));
            }
            ConsumerMethod::Common(Method::ChannelClose(c)) => {
                methods::channel_close_ok(&mut self.t.wbuf, channel);
                return Err(format!("the broker closed channel {channel}: {}", describe(&c)));
            }
            ConsumerMethod::Common(Method::ChannelFlow(active)) => {
                methods::channel_flow_ok(&mut self.t.wbuf, channel, active);
            }
            // bind-ok, unbind-ok, blocked/unblocked (publishes wait in TCP and confirms).
            other => debug!(channel, ?other, "cluster link: method ignored"),
        }
        Ok(())
    }

    /// A confirm (`ok`) or nack of `tag` (and every lower one with `multiple`).
    fn confirmed(&mut self, tag: u64, multiple: bool, ok: bool) {
        let outcome = || {
            if ok {
                Outcome::Delivered
            } else {
                Outcome::Failed(Failure::retryable("the broker refused the message (nack)"))
            }
        };
        if multiple {
            while self.unconfirmed.front().is_some_and(|(t, _)| *t <= tag) {
                if let Some((_, acks)) = self.unconfirmed.pop_front() {
                    for ack in acks {
                        let _ = ack.send(outcome());
                    }
                }
            }
        } else if let Ok(i) = self.unconfirmed.binary_search_by_key(&tag, |(t, _)| *t) {
            if let Some((_, acks)) = self.unconfirmed.remove(i) {
                for ack in acks {
                    let _ = ack.send(outcome());
                }
            }
        }
    }

    /// One message from the cluster's exchange: another node's is delivered locally, this
    /// node's own (it came back through a binding) is dropped: delivered already.
    fn on_message(&mut self, body: &[u8]) {
        let kinds = [
            WIRE_VERSION,
            NOTICE_RELEASE,
            NOTICE_ACQUIRED,
            SNAPSHOT,
            NOTICE_RETAINED,
            WILL_SET,
            WILL_CLEAR,
            BATCH_KIND,
            KEYS_FULL,
            KEYS_DELTA,
            KEYS_ACK,
            HEARTBEAT,
            GOODBYE,
            CLIENT_GONE,
            CLIENTS_FULL,
            SESSION_KEYS,
            SESSION_DROP,
        ];
        let Some((&kind, rest)) = body.split_first().filter(|(k, _)| kinds.contains(k)) else {
            warn!("cluster message of an unknown format dropped");
            return;
        };
        let Some((&len, rest)) = rest.split_first() else { return };
        let Some((origin, encoded)) = rest.split_at_checked(usize::from(len)) else {
            warn!("truncated cluster message dropped");
            return;
        };
        if origin == self.cluster.node_id.as_bytes() {
            if kind == WIRE_VERSION {
                self.counted[2].inc();
            } else if let (BATCH_KIND, Some(n)) = (kind, encoded.get(..4)) {
                self.counted[2].inc_by(u64::from(u32::from_be_bytes([n[0], n[1], n[2], n[3]])));
            }
            return;
        }
        if kind == BATCH_KIND {
            let Some((count, mut rest)) = encoded.split_at_checked(4) else { return };
            let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]);
            for _ in 0..count {
                let Some((len, after)) = rest.split_at_checked(4) else { break };
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                let Some((one, after)) = after.split_at_checked(len) else { break };
                rest = after;
                self.deliver(one);
            }
            return;
        }
        if kind == NOTICE_RETAINED {
            if let Ok(to) = std::str::from_utf8(origin) {
                self.send_retained(to);
            }
            self.announce_wills();
            return;
        }
        if kind == SESSION_KEYS || kind == SESSION_DROP {
            if let Ok(origin) = std::str::from_utf8(origin) {
                self.on_session_keys(origin, kind, encoded);
            }
            return;
        }
        if kind == CLIENTS_FULL {
            let mut clients = Vec::new();
            let mut rest = encoded;
            while let Some((len, after)) = rest.split_at_checked(2) {
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                let Some((id, after)) = after.split_at_checked(len) else { break };
                clients.extend(std::str::from_utf8(id).ok().map(str::to_owned));
                rest = after;
            }
            if let Ok(origin) = std::str::from_utf8(origin) {
                self.cluster.clients_of(origin, Some(clients));
            }
            return;
        }
        if (KEYS_FULL..=GOODBYE).contains(&kind) {
            if let Ok(origin) = std::str::from_utf8(origin) {
                let origin = origin.to_owned();
                self.on_keys(&origin, kind, encoded);
            }
            return;
        }
        if kind == WILL_SET || kind == WILL_CLEAR {
            if let Ok(origin) = std::str::from_utf8(origin) {
                self.on_will(origin, kind, encoded);
            }
            return;
        }
        if kind == SNAPSHOT {
            if let Ok(msg) = codec::decode_message(encoded) {
                self.broker.retain_if_absent(&Arc::new(msg));
            }
            return;
        }
        if kind != WIRE_VERSION {
            let Ok(client_id) = std::str::from_utf8(encoded) else { return };
            if let (Ok(origin), NOTICE_ACQUIRED | CLIENT_GONE) = (std::str::from_utf8(origin), kind)
            {
                self.cluster.client_at(origin, client_id, kind == NOTICE_ACQUIRED);
            }
            if kind == NOTICE_RELEASE && self.cluster.holds(client_id) {
                self.taken_elsewhere(client_id);
            } else if kind == NOTICE_ACQUIRED && !self.cluster.holds(client_id) {
                if let Some(state) = self.broker.take_session(client_id) {
                    self.broker.discard_session(state);
                }
            }
            return;
        }
        self.deliver(encoded);
    }

    /// A persistent session's keys (or its end) announced by node `origin`.
    fn on_session_keys(&mut self, origin: &str, kind: u8, subject: &[u8]) {
        let (expiry, rest) = match kind {
            SESSION_KEYS => {
                let Some((e, rest)) = subject.split_at_checked(4) else { return };
                (u32::from_be_bytes([e[0], e[1], e[2], e[3]]), rest)
            }
            _ => (0, subject),
        };
        if kind == SESSION_DROP {
            if let Ok(client_id) = std::str::from_utf8(rest) {
                self.cluster.sticky_drop(client_id);
            }
            return;
        }
        let Some((len, rest)) = rest.split_at_checked(2) else { return };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let Some((client_id, mut rest)) = rest.split_at_checked(len) else { return };
        let Ok(client_id) = std::str::from_utf8(client_id) else { return };
        let mut keys = Vec::new();
        while let Some((&len, after)) = rest.split_first() {
            let Some((key, after)) = after.split_at_checked(usize::from(len)) else { break };
            keys.extend(std::str::from_utf8(key).ok().map(str::to_owned));
            rest = after;
        }
        self.cluster.sticky_set(origin, client_id, expiry, keys);
    }

    /// Announces that this node serves the persistent session of `client_id` with `keys`.
    fn session_keys_notice(&mut self, client_id: &str, expiry: u32, keys: &[String]) {
        self.session_keys_notice_to(NOTICE_KEY.to_owned(), client_id, expiry, keys);
    }

    /// Sends node `node` (one that joined or came back) the persistent sessions this node
    /// serves and those it knows of: it forwards to their keys too.
    fn send_sessions(&mut self, node: &str) {
        let known = self.cluster.served_sessions().into_iter().chain(self.cluster.sticky_all());
        for (client_id, expiry, keys) in known {
            self.session_keys_notice_to(direct_key(node), &client_id, expiry, &keys);
        }
    }

    /// [`Link::session_keys_notice`] with routing key `to` (every node, or one).
    fn session_keys_notice_to(
        &mut self,
        to: String,
        client_id: &str,
        expiry: u32,
        keys: &[String],
    ) {
        let id = &client_id.as_bytes()[..client_id.len().min(usize::from(u16::MAX))];
        let mut subject = Vec::with_capacity(6 + id.len() + 24 * keys.len());
        subject.extend_from_slice(&expiry.to_be_bytes());
        subject.extend_from_slice(&(id.len() as u16).to_be_bytes());
        subject.extend_from_slice(id);
        for key in keys {
            subject.push(key.len().min(255) as u8);
            subject.extend_from_slice(&key.as_bytes()[..key.len().min(255)]);
        }
        self.notice_to(to, SESSION_KEYS, &subject);
    }

    /// Delivers one message from another node (`encoded` in the store's encoding) here.
    fn deliver(&mut self, encoded: &[u8]) {
        match codec::decode_message(encoded) {
            Ok(msg) => {
                let msg = Arc::new(msg);
                self.counted[1].inc();
                self.broker.publish(&msg, None, &mut Waits::new());
            }
            Err(e) => warn!(error = %e, "cluster message that cannot be read dropped"),
        }
    }

    /// Heartbeats, the broker's silence, and now and then a check of the nodes whose wills
    /// this node keeps.
    fn on_tick(&mut self) -> Result<(), String> {
        let now = Instant::now();
        self.beats += 1;
        if self.beats as u128 * TICK.as_millis() >= peers::HEARTBEAT.as_millis() {
            self.beats = 0;
            let mut subject = [0u8; 16];
            subject[..8].copy_from_slice(&self.cluster.epoch.to_be_bytes());
            let seq = self.cluster.announced.load(Ordering::Acquire);
            subject[8..].copy_from_slice(&seq.to_be_bytes());
            self.notice(HEARTBEAT, &subject);
        }
        self.peer_probes.extend(self.peers.silent(now));
        // The grace period ends: from now on only what the other nodes want is forwarded.
        let all = self.peers.forward_all(now);
        if self.cluster.remote.read().unwrap_or_else(|p| p.into_inner()).all != all {
            self.cluster.set_remote(|v| v.all = all);
        }
        self.check_pending(now);
        self.cluster.sticky_expire(now);
        self.ticks += 1;
        if self.ticks >= PROBE_TICKS && self.probes.is_empty() {
            self.ticks = 0;
            self.probes.extend(self.cluster.will_holders());
        }
        keep_alive(&mut self.t, now)
    }

    /// Fails every publish still waiting for its confirm (the connection is gone: it may or
    /// may not have reached the other nodes; the publisher resends).
    fn fail_unconfirmed(&mut self, why: &str) {
        for (_, acks) in self.unconfirmed.drain(..) {
            for ack in acks {
                fail(Some(ack), why);
            }
        }
    }

    /// Closes the connection on shutdown.
    async fn close(&mut self) {
        self.notice(GOODBYE, &self.cluster.epoch.to_be_bytes());
        close_connection(&mut self.t, "mqgate node stopping").await;
    }
}
