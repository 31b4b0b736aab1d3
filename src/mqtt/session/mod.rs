//! The session task: one per client connection, from CONNECT to close.
//!
//! Owns the connection and everything about it: keepalive, both in-flight windows and the order
//! of acknowledgements. Nothing else writes to its socket. A QoS 1/2 PUBLISH becomes one entry
//! of the pending queue (`inbound.rs`); PUBACK/PUBREC leave only from its front, so they go out
//! in the order the PUBLISHes came. When the queue is full the task stops reading the socket:
//! that is the backpressure that reaches the device.
//!
//! - `connect.rs`: the CONNECT handshake and CONNACK.
//! - `inbound.rs`: PUBLISH from the client, routing, the pending-ack queue, QoS 2 state.
//! - `outbound.rs`: messages to the client as a subscriber, SUBSCRIBE and UNSUBSCRIBE.
//! - `rest.rs`: a quiet plain-TCP session set aside in the idle pool (`mqtt/idle.rs`) and
//!   resumed from it.

mod connect;
mod direct;
mod inbound;
mod outbound;
mod rest;
mod retained;

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::listeners::Transport;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::auth::acl::ClientAcl;
use crate::broker::sessions::DoneGuard;
use crate::broker::{Broker, CloseReason, Expiry, Outbound};
use crate::config::MqttConfig;
use crate::metrics::{Metrics, QosLabels};
use crate::mqtt::codec::{
    DecodeError, Disconnect, LastWill, Packet, Properties, ProtocolVersion, PubResponse,
    PublishProperties, ReasonCode,
};
use crate::mqtt::connection::Connection;
use crate::mqtt::listener::ConnSlot;
use crate::mqtt::topic::TopicLimits;
use crate::reload::{Live, LiveCell};
use prometheus_client::metrics::counter::Counter;

pub(crate) use direct::start as start_direct;
pub(crate) use inbound::{publish_will, Bucket, FrontDone, PendingQueue, PublishRate};
use outbound::OutboundState;
pub(crate) use rest::{IdleConnections, Resting};

/// Deliveries taken from the outbound queue before the next write.
const DELIVERY_BATCH: usize = 64;

/// The limits a session enforces, taken from `mqtt:` in the config.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// Largest packet accepted, bytes.
    pub max_packet_size: u32,
    /// Time allowed for the CONNECT to arrive.
    pub connect_timeout: Duration,
    /// Inbound window of unacknowledged QoS 1/2 PUBLISHes.
    pub receive_maximum: u16,
    /// Largest keepalive granted (0 = no limit).
    pub max_keepalive: u16,
    /// Capacity of the per-session queue of messages to deliver.
    pub outbound_queue: usize,
    /// Outbound window of incomplete QoS 1/2 deliveries.
    pub max_inflight_out: u16,
    /// Capacity of the queue of a persistent session (kept while the client is away).
    pub max_queued_messages: usize,
    /// Longest a write to the client may take before the connection is closed.
    pub write_timeout: Duration,
    /// MQTT 5 Topic Alias Maximum we accept from clients (0 = none).
    pub topic_alias_maximum: u16,
    /// Bounds on topic names and filters.
    pub topic_limits: TopicLimits,
    /// Most subscriptions per client.
    pub max_subscriptions: usize,
    /// `mqtt.client_id_takeover: same_identity`: a client id held by another identity is
    /// refused.
    pub same_identity: bool,
    /// `mqtt.max_queued_bytes`: bytes a session's queue holds (topics and payloads).
    pub max_queued_bytes: usize,
    /// `mqtt.max_sessions`: client ids connected or parked at once (0: no limit).
    pub max_sessions: usize,
    /// `mqtt.max_session_expiry` in seconds: the longest a session is kept after its
    /// connection ends, 3.1.1 persistent sessions included (0: no cap).
    pub max_session_expiry: u32,
    /// `mqtt.max_will_delay` in seconds: the longest an MQTT 5 will waits.
    pub max_will_delay: u32,
    /// `mqtt.packet_timeout`: a started packet must be complete within it (0: no limit).
    pub packet_timeout: Duration,
    /// `mqtt.idle_timeout`: the silence allowed of a client without keepalive (0: none).
    pub idle_timeout: Duration,
    /// At shutdown, how long the QoS 1/2 PUBLISHes already read may take to get their
    /// outcome and acknowledgement before the connection is closed anyway (`shutdown_timeout`).
    pub shutdown_timeout: Duration,
    /// `mqtt.max_publish_rate`: PUBLISHes per second per client (0: no limit).
    pub max_publish_rate: u32,
    /// `mqtt.max_publish_bytes_rate`: bytes per second per client (0: no limit).
    pub max_publish_bytes_rate: u64,
    /// `mqtt.max_retained_rate`: retained messages per second sent to one client for its
    /// SUBSCRIBEs (0: no limit).
    pub max_retained_rate: u32,
    /// `mqtt.max_subscribe_rate`: SUBSCRIBE/UNSUBSCRIBE topic filters per second per client.
    pub max_subscribe_rate: u32,
    /// `mqtt.max_user_properties`: MQTT 5 user properties per PUBLISH.
    pub max_user_properties: u16,
    /// `mqtt.max_connect_rate_per_address`: connections per second per IP (0: no limit).
    pub max_connect_rate_per_address: u32,
    /// `mqtt.connect_burst_per_address` (0: the rate).
    pub connect_burst_per_address: u32,
    /// `mqtt.login_*`: per-address failure backoff and the cache of successful checks.
    pub logins: crate::auth::backoff::LoginLimits,
    /// `mqtt.max_outbound_bytes`: deliveries (topics and payloads) in the write buffer.
    pub max_outbound_bytes: usize,
    /// `mqtt.max_memory`: message bytes held in memory (0: no budget).
    pub max_memory: u64,
}

impl SessionLimits {
    /// The limits configured under `mqtt:`.
    pub fn from_config(c: &MqttConfig) -> Self {
        SessionLimits {
            max_packet_size: c.max_packet_size,
            connect_timeout: c.connect_timeout.value.0,
            receive_maximum: c.receive_maximum.max(1),
            max_keepalive: c.max_keepalive,
            outbound_queue: c.outbound_queue.max(1),
            max_inflight_out: c.max_inflight_out.max(1),
            max_queued_messages: c.max_queued_messages.max(1),
            write_timeout: c.write_timeout.0,
            topic_alias_maximum: c.topic_alias_maximum,
            topic_limits: TopicLimits {
                max_length: c.max_topic_length.max(1),
                max_levels: c.max_topic_levels.max(1),
            },
            max_subscriptions: c.max_subscriptions,
            same_identity: c.client_id_takeover == crate::config::ClientIdTakeover::SameIdentity,
            packet_timeout: c.packet_timeout.0,
            max_sessions: c.max_sessions,
            max_queued_bytes: usize::try_from(c.max_queued_bytes.0).unwrap_or(usize::MAX),
            max_session_expiry: u32::try_from(c.max_session_expiry.0.as_secs())
                .unwrap_or(u32::MAX - 1),
            max_will_delay: u32::try_from(c.max_will_delay.0.as_secs()).unwrap_or(u32::MAX),
            idle_timeout: c.idle_timeout.0,
            shutdown_timeout: Duration::from_secs(10),
            max_publish_rate: c.max_publish_rate,
            max_publish_bytes_rate: c.max_publish_bytes_rate.0,
            max_retained_rate: c.max_retained_rate,
            max_subscribe_rate: c.max_subscribe_rate,
            max_user_properties: c.max_user_properties,
            max_connect_rate_per_address: c.max_connect_rate_per_address,
            connect_burst_per_address: c.connect_burst_per_address,
            logins: crate::auth::backoff::LoginLimits {
                failures_before_backoff: c.login_failures_before_backoff,
                backoff_max: c.login_backoff_max.0,
                cache_size: c.login_cache_size,
                cache_ttl: c.login_cache_ttl.0,
            },
            max_outbound_bytes: usize::try_from(c.max_outbound_bytes.0).unwrap_or(usize::MAX),
            max_memory: c.max_memory.0,
        }
    }
}

impl SessionShared {
    /// Everything sessions share, with metric handles resolved once.
    pub fn new(
        broker: Arc<Broker>,
        live: Arc<LiveCell>,
        metrics: Arc<Metrics>,
        limits: SessionLimits,
        shutdown: CancellationToken,
    ) -> Self {
        let received = [0u8, 1, 2].map(|q| {
            metrics.messages_received.get_or_create(&QosLabels { qos: q.to_string() }).clone()
        });
        let acl_denied_publish = metrics.acl_denied("publish");
        let acl_denied_subscribe = metrics.acl_denied("subscribe");
        let acl_denied_delivery = metrics.acl_denied("deliver");
        let logins = crate::auth::backoff::LoginGuard::new(limits.logins, &metrics);
        let memory =
            crate::memory::MemoryBudget::new(limits.max_memory, metrics.memory_bytes.clone());
        let memory_pauses = metrics.memory_pauses.clone();
        SessionShared {
            memory,
            memory_pauses,
            idle: std::sync::OnceLock::new(),
            broker,
            live,
            metrics,
            received,
            acl_denied_publish,
            acl_denied_subscribe,
            acl_denied_delivery,
            limits,
            shutdown,
            logins,
        }
    }
}

/// What every session shares.
#[derive(Debug)]
pub struct SessionShared {
    /// Subscriptions, retained messages and the client-id registry.
    pub broker: Arc<Broker>,
    /// The rules with their spools, the users and the ACL: swapped by a config reload.
    pub live: Arc<LiveCell>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// `messages_received` by QoS (0, 1, 2), resolved once.
    pub received: [Counter; 3],
    /// `acl_denied{action="publish"}`, resolved once.
    pub acl_denied_publish: Counter,
    /// `acl_denied{action="subscribe"}`, resolved once.
    pub acl_denied_subscribe: Counter,
    /// `acl_denied{action="deliver"}`: messages withheld from a filtered subscription.
    pub acl_denied_delivery: Counter,
    /// Limits from the config.
    pub limits: SessionLimits,
    /// Cancelled when the gateway shuts down.
    pub shutdown: CancellationToken,
    /// Per-address login backoff and the cache of successful password checks.
    pub logins: crate::auth::backoff::LoginGuard,
    /// `mqtt.max_memory`.
    pub memory: &'static crate::memory::MemoryBudget,
    /// `mqgate_memory_pauses_total`: publishers paused at the budget.
    pub memory_pauses: Counter,
    /// Where quiet plain-TCP connections rest (`mqtt/idle.rs`), set by the MQTT listener when
    /// it starts; without it nothing rests.
    pub(crate) idle: std::sync::OnceLock<IdleConnections>,
}

impl SessionShared {
    /// What routing a message reads: the broker and `live`'s rules and spools (a message
    /// is routed wholly by one snapshot).
    pub fn routing<'a>(&'a self, live: &'a Live) -> crate::routing::RoutingContext<'a> {
        crate::routing::RoutingContext {
            broker: &self.broker,
            rules: &live.rules,
            spools: &live.spools,
            metrics: &self.metrics,
        }
    }
}

/// The session's timer (keepalive or idle timeout, shutdown drain), when the partial
/// packet in the read buffer began and the publish rate limits, boxed together: an idle
/// session's future holds a pointer.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    partial_since: Option<Instant>,
    /// `mqtt.max_publish_rate` / `max_publish_bytes_rate`, when set.
    rate: Option<inbound::PublishRate>,
    /// Over the publish rate: the socket is not read until then.
    throttled_until: Option<Instant>,
    /// Paused at `mqtt.max_memory`: the socket is not read until this wait is over.
    memory_wait: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// `memory_wait` ends after `OWN_DELIVERIES_PAUSE` at the latest.
    memory_bounded: bool,
}

/// A timer that only the publish rate limits keep: it fires when they say.
const FAR: Duration = Duration::from_secs(86_400);

/// At `mqtt.max_memory`, the longest a publisher with unacknowledged deliveries of its own is
/// not read: those may be what holds the budget, and its PUBACKs are what frees them.
const OWN_DELIVERIES_PAUSE: Duration = Duration::from_millis(500);

impl Timer {
    fn new(after: Duration) -> Box<Timer> {
        Box::new(Timer {
            sleep: Box::pin(tokio::time::sleep(after)),
            partial_since: None,
            rate: None,
            throttled_until: None,
            memory_wait: None,
            memory_bounded: false,
        })
    }

    /// A PUBLISH of `bytes` was read: over the rate, reading stops until the buckets allow.
    fn charge(&mut self, bytes: usize) {
        let Some(rate) = &mut self.rate else { return };
        let now = Instant::now();
        if let Some(wait) = rate.take(now, bytes) {
            self.throttle(now + wait);
        }
    }

    /// Reading stops until `until` (or later, if a limit already said so).
    fn throttle(&mut self, until: Instant) {
        let until = self.throttled_until.map_or(until, |t| t.max(until));
        self.throttled_until = Some(until);
        if self.sleep.deadline() > until {
            self.sleep.as_mut().reset(until);
        }
    }

    /// A packet started arriving at `at` (the read's time): checked as more bytes come (no
    /// timer reset per read: that cost showed at a million messages a second).
    fn partial_started(&mut self, at: Instant) {
        self.partial_since = Some(at);
    }
}

/// Why a session ended; decides whether the will is published and what is logged.
#[derive(Debug)]
enum End {
    /// The client sent DISCONNECT (with "disconnect with will" in MQTT 5 when `with_will`).
    ClientDisconnect { with_will: bool },
    /// The client closed the socket without DISCONNECT.
    Closed,
    /// We closed it (protocol error, keepalive, takeover, shutdown, failed ack).
    ServerClose { reason: String },
    /// A config reload took the client's rights away (its user removed...): closed without
    /// its will.
    Revoked,
    /// The socket failed.
    Io(std::io::Error),
    /// Not an end: the session has been quiet and is set aside in the idle pool (`rest.rs`).
    Rest,
}

/// What woke the session's loop ([`Session::poll_event`]).
enum Event {
    /// The registry told this connection to close.
    Close(CloseReason),
    /// Every outcome of the front pending entry is in: acknowledge it.
    Acked(inbound::FrontDone),
    /// A socket read: `Ok(false)` on a clean close.
    Read(std::io::Result<bool>),
    /// A message to deliver.
    Deliver(Outbound),
    /// The keepalive timer fired.
    Keepalive,
    /// Message bytes held fell below `mqtt.max_memory`'s resume mark: read again.
    MemoryRoom,
    /// The config was reloaded: take the new ACL.
    Reloaded,
    /// A SUBSCRIBE's retained messages may go on (`retained.rs`).
    Retained,
    /// Quiet for a full tick of the idle pool with nothing under way: rest (`rest.rs`).
    Rest,
}

/// The state of one connected session (after a successful CONNECT).
struct Session<S> {
    /// The client's socket.
    conn: Connection<S>,
    /// The client's address, for logs.
    peer: SocketAddr,
    /// Shared state.
    shared: Arc<SessionShared>,
    /// 3.1.1 or 5.0.
    version: ProtocolVersion,
    /// The (possibly assigned) client identifier.
    client_id: Arc<str>,
    /// The user name from CONNECT (authenticated: only configured users get one).
    username: Option<Arc<str>>,
    /// What this client may publish and subscribe to (`%u`/`%c` already substituted).
    acl: ClientAcl,
    /// The config snapshot the session routes and checks with; replaced (with `acl`) when
    /// the cell's generation moves on (a reload).
    live: Arc<Live>,
    /// The session's stable id (keys its subscriptions, No Local); survives reconnects.
    session_id: u64,
    /// How long the session is kept after this connection (MQTT 5: DISCONNECT may change it).
    expiry: Expiry,
    /// Whether CONNECT asked for expiry 0 (then DISCONNECT may not ask for more, MQTT 5).
    expiry_zero_at_connect: bool,
    /// The link to the registry: tells this connection to close (takeover, shutdown), and
    /// tells a connection taking this client id over that the state is parked (on drop).
    link: Option<DoneGuard>,
    /// Time allowed between two packets from the client (1.5 × keepalive), `None` if disabled.
    keepalive: Option<Duration>,
    /// When the last packet arrived.
    last_packet: Instant,
    /// The will, published unless the client disconnects normally (boxed: most clients have
    /// none, and it is large).
    will: Option<Box<LastWill>>,
    /// MQTT 5 Request Problem Information (reason strings allowed on acks).
    problem_info: bool,
    /// Inbound QoS 1/2 acknowledgements in arrival order, and QoS 2 packet ids.
    pending: PendingQueue,
    /// Outbound deliveries: the queue other sessions feed and our in-flight window.
    out: OutboundState,
    /// A resumed session has deliveries to resend before anything new.
    resend_due: bool,
    /// Scratch space for the indexes of matching rules, reused for every PUBLISH.
    rule_hits: Vec<usize>,
    /// Topic aliases set by an MQTT 5 client.
    aliases: inbound::TopicAliases,
    /// Publish requests of the last PUBLISH that a sink could not take at once; the loop
    /// waits until they are queued before it reads on.
    blocked: crate::targets::Blocked,
    /// Shutting down: nothing more is read; the PUBLISHes already read get their outcomes
    /// and acknowledgements (until `shutdown_timeout`), then the connection is closed.
    draining: bool,
    /// A QoS 1/2 PUBLISH came at `mqtt.max_memory`: nothing more is read until the bytes
    /// held fall below its resume mark (deliveries and acknowledgements still go out).
    memory_paused: bool,
    /// Work done since the loop last yielded: one unit per packet, per KiB read, per
    /// user property and per session or share group a PUBLISH matched. Past [`WORK_YIELD`]
    /// the loop lets other tasks run before it reads on, so one client's large fan-outs or
    /// heavy packets do not hold a worker thread for many reads at once.
    work: u16,
    /// Retained messages still to send for SUBSCRIBEs (`retained.rs`), and the SUBACK/UNSUBACK
    /// of a stored session held until its record is durable (the loop waits for it before it
    /// reads on); `None` when there is neither.
    subscribe_work: Option<Box<retained::SubscribeWork>>,
    /// The idle pool's tick (`IdlePool::epoch`) at the session's last event: it rests once
    /// that is two ticks ago (`rest.rs`).
    quiet_epoch: u8,
    /// The tick at which the session last asked the pool to poll it again (both wrap: only
    /// differences of a few ticks matter).
    check_epoch: u8,
    /// Its transport can rest (`Transport::RESTS`: a plain socket).
    rests: bool,
    /// Its place under `mqtt.max_connections` (given back when the session ends, not when it
    /// rests).
    slot: ConnSlot,
}

/// Units of work after which the loop yields (see `Session::work`): about a millisecond of
/// decoding or fan-out on these machines. Small PUBLISHes yield once per ~4,000 of them: the
/// fan-in path does not notice.
const WORK_YIELD: u16 = 4096;

/// The work of handling `packet` before routing (see `Session::work`): the fan-out is added
/// by the PUBLISH's handler.
fn work_of(packet: &Packet, wire: usize) -> u16 {
    // Per KiB on the wire, not of payload: a PUBLISH whose 5,000 user properties the decoder
    // only stepped over (`mqtt.max_user_properties`) was still read and scanned.
    let units = 1 + wire / 1024;
    let units = match packet {
        Packet::Publish(p) => units + p.properties.user_properties.len(),
        _ => units,
    };
    u16::try_from(units).unwrap_or(u16::MAX)
}

/// Runs one client connection to its end. Errors are logged here and go no further.
///
/// Not an `async fn`: the arguments of one stay in its future for its whole life (about 80
/// bytes per connection here, even after they were moved out). They go straight into the
/// boxed handshake, so the future every idle connection carries holds a pointer to that
/// instead. The handshake and the end (`finish`, which may route a will) are boxed because
/// their state would otherwise be part of this future, and so of every idle connection's
/// memory; for the same reason the session is built in a plain function: what the handshake
/// returns is not kept in this future next to the session made of it.
pub fn run<S>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<SessionShared>,
    slot: ConnSlot,
) -> impl Future<Output = ()> + Send
where
    S: Transport,
{
    let conn = new_connection(stream, &shared);
    run_connection(conn, peer, shared, slot)
}

/// [`run`] on a connection that may hold bytes already (the start of a CONNECT read by the
/// direct handshake, `direct.rs`).
pub(crate) fn run_connection<S>(
    conn: Connection<S>,
    peer: SocketAddr,
    shared: Arc<SessionShared>,
    slot: ConnSlot,
) -> impl Future<Output = ()> + Send
where
    S: Transport,
{
    let handshake = Box::pin(connect(conn, peer, shared, slot));
    async move {
        let Some(mut session) = handshake.await else {
            return;
        };
        log_connected(&session.client_id, session.peer, session.version);
        let end = session.run().await;
        if let Some(end) = session.end(end) {
            end.await;
        }
    }
}

/// A new client connection on `stream`, with the limits its packets are read with.
fn new_connection<S>(stream: S, shared: &SessionShared) -> Connection<S> {
    let mut conn = Connection::new(stream, shared.limits.max_packet_size as usize);
    conn.cap_user_properties(shared.limits.max_user_properties);
    conn
}

/// Runs a connected session to its end (or until it rests). Not an `async fn`, whose
/// argument would keep a second copy of the session in the future (1,480 bytes instead of
/// 776 when `run_connection` awaited one).
#[allow(clippy::manual_async_fn)]
fn drive<S: Transport>(mut session: Session<S>) -> impl Future<Output = ()> + Send {
    async move {
        log_connected(&session.client_id, session.peer, session.version);
        let end = session.run().await;
        if let Some(end) = session.end(end) {
            end.await;
        }
    }
}

/// The "client connected" line, under the session's span.
fn log_connected(client_id: &str, peer: SocketAddr, version: ProtocolVersion) {
    if tracing::enabled!(tracing::Level::INFO) {
        let span = session_span(client_id, peer);
        info!(parent: &span, ?version, "client connected");
    }
}

/// A span naming a session (made only when something is logged).
fn session_span(client_id: &str, peer: SocketAddr) -> tracing::Span {
    tracing::info_span!("session", client_id = %crate::logtext::LogText(client_id), peer = %peer)
}

/// Runs the handshake; the session, or `None` when the connection closed.
async fn connect<S>(
    mut conn: Connection<S>,
    peer: SocketAddr,
    shared: Arc<SessionShared>,
    slot: ConnSlot,
) -> Option<Session<S>>
where
    S: Transport,
{
    // The address is what the login backoff keys on (`auth::backoff`).
    let handshake = connect::handshake(&mut conn, &shared, peer);
    match crate::auth::backoff::LOGIN_PEER.scope(peer.ip(), handshake).await {
        Ok(Some(c)) => Some(Session::new(conn, c, shared, peer, slot, S::RESTS)),
        Ok(None) => {
            conn.close().await;
            None
        }
        Err(e) => {
            debug!(%peer, error = %e, "connection closed before CONNECT completed");
            conn.close().await;
            None
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The session of a completed handshake.
    fn new(
        conn: Connection<S>,
        mut connected: connect::Connected,
        shared: Arc<SessionShared>,
        peer: SocketAddr,
        slot: ConnSlot,
        rests: bool,
    ) -> Self {
        let registration = connected.registration;
        let resend_due = !connected.state.inflight.is_empty();
        let mut pending = PendingQueue::new(shared.limits.receive_maximum);
        pending.resume(std::mem::take(&mut connected.state.awaiting_rel));
        let out =
            OutboundState::new(connected.state, connected.client_receive_maximum, &shared.limits);
        Session {
            conn,
            peer,
            version: connected.version,
            client_id: connected.client_id,
            username: connected.username,
            acl: connected.acl,
            live: connected.live,
            session_id: out.state.id,
            expiry: connected.expiry,
            expiry_zero_at_connect: connected.expiry == Expiry::Now,
            link: Some(registration.link),
            keepalive: connected.keepalive,
            last_packet: Instant::now(),
            will: connected.will.map(Box::new),
            problem_info: connected.problem_info,
            pending,
            out,
            resend_due,
            rule_hits: Vec::new(),
            aliases: inbound::TopicAliases::new(
                shared.limits.topic_alias_maximum,
                connected.client_topic_alias_maximum,
            ),
            blocked: Vec::new(),
            draining: false,
            memory_paused: false,
            work: 0,
            subscribe_work: None,
            // A new session may rest as soon as it is quiet: a device that says nothing after
            // its CONNACK gives its task back at once (`rest.rs`).
            quiet_epoch: shared.idle.get().map_or(0, |p| p.epoch().wrapping_sub(2)),
            check_epoch: u8::MAX,
            rests,
            slot,
            shared,
        }
    }

    /// A span naming this session, made only when something is logged: a span held for the
    /// whole connection cost about 1.5 KB per connection in the log subscriber.
    fn span(&self) -> tracing::Span {
        session_span(&self.client_id, self.peer)
    }

    /// The main loop: waits in one poll ([`Session::poll_event`]) for the registry link
    /// (takeover, shutdown), the front of the pending-ack queue, the socket, the outbound
    /// queue and keepalive; handles what came; writes what that queued.
    ///
    /// Nothing here awaits a stored sub-future but the keepalive timer: everything an idle
    /// session waits on is polled in place, so its future holds the session, the timer and
    /// little else. The rare waits (a full socket, a full sink queue) are boxed.
    async fn run(&mut self) -> End {
        // Boxed, and only with a keepalive (or idle timeout): the 112-byte timer inline would
        // push the task of every connection past a 128-byte step (1,024 -> 896 bytes without
        // it, and 896 + 112 with it is still less than 1,024). It also keeps when the packet
        // the buffer holds the start of began (`mqtt.packet_timeout`), off the future.
        // A resumed session (`rest.rs`) has been silent since `last_packet` already.
        let mut timer: Option<Box<Timer>> = self
            .keepalive
            .map(|k| Timer::new((self.last_packet + k).saturating_duration_since(Instant::now())));
        // Publish rate limits live in the timer too (nothing when unset).
        if let Some(rate) = inbound::PublishRate::new(&self.shared.limits) {
            timer.get_or_insert_with(|| Timer::new(FAR)).rate = Some(rate);
        }
        if std::mem::take(&mut self.resend_due) {
            if let Some(end) = self.resend() {
                return end;
            }
        }
        loop {
            // Decode what is buffered while the inbound window has room.
            let mut partial = false;
            while self.may_read()
                && !self.memory_paused
                && self.conn.has_buffered_input()
                && timer.as_ref().is_none_or(|t| t.throttled_until.is_none())
            {
                // The decoded packet is handled before any `.await`: a `match` on the decode
                // result around the await below would keep a whole `Packet` in the future.
                let buffered = self.conn.buffered_input();
                let packet = match self.conn.decode() {
                    Ok(Some(packet)) => packet,
                    Ok(None) => {
                        partial = true;
                        break;
                    }
                    Err(e) => return self.decode_error(e),
                };
                let wire = buffered - self.conn.buffered_input();
                if let Some(end) = self.handle_charged(packet, wire, &mut timer) {
                    return end;
                }
                if self.work >= WORK_YIELD {
                    self.work = 0;
                    tokio::task::yield_now().await;
                }
                if !self.blocked.is_empty() {
                    // A sink's queue is full: wait for room (rare; boxed so that its state is
                    // not part of every session's future).
                    Box::pin(crate::targets::send_blocked(std::mem::take(&mut self.blocked))).await;
                }
                if let Some(held) = self.take_held() {
                    // A stored session's SUBSCRIBE/UNSUBSCRIBE: answered once its record is
                    // durable (rare; boxed like the wait above).
                    if let Some(end) = Box::pin(self.release_held(held)).await {
                        return end;
                    }
                }
            }
            // A packet that has started must be complete within `mqtt.packet_timeout`: its
            // start is noted here and its age checked as bytes arrive (a client that stops
            // sending altogether is bounded by its keepalive or `mqtt.idle_timeout`).
            if !self.draining && !self.shared.limits.packet_timeout.is_zero() {
                match (&mut timer, partial) {
                    (Some(t), true) if t.partial_since.is_none() => {
                        t.partial_started(self.last_packet)
                    }
                    (Some(t), false) if t.partial_since.is_some() => t.partial_since = None,
                    (None, true) => {
                        // No keepalive and no idle timeout: a timer only to hold the clock.
                        let mut t = Timer::new(Duration::from_secs(86_400));
                        t.partial_started(self.last_packet);
                        timer = Some(t);
                    }
                    _ => {}
                }
            }
            if self.memory_paused {
                // `mqtt.max_memory`: wait (in the poll below, deliveries and acks going on)
                // until the bytes held fall below the resume mark, unless they already did.
                // A session holding unacknowledged deliveries of its own waits at most
                // OWN_DELIVERIES_PAUSE: those may be what holds the budget, and only its
                // PUBACKs (behind its next PUBLISH, perhaps) free them.
                let holds = !self.out.state.inflight.is_empty()
                    || !self.out.state.subscriber.queue.is_empty();
                let (waiting, bounded) = timer
                    .as_ref()
                    .map_or((false, false), |t| (t.memory_wait.is_some(), t.memory_bounded));
                if !waiting || (holds && !bounded) {
                    match self.shared.memory.wait_for_room() {
                        None => {
                            self.memory_paused = false;
                            if let Some(t) = &mut timer {
                                t.memory_wait = None;
                            }
                            continue;
                        }
                        Some(wait) => {
                            if !waiting {
                                self.shared.memory_pauses.inc();
                            }
                            let wait: Pin<Box<dyn Future<Output = ()> + Send>> = if holds {
                                Box::pin(async move {
                                    let _ = tokio::time::timeout(OWN_DELIVERIES_PAUSE, wait).await;
                                })
                            } else {
                                wait
                            };
                            let t = timer.get_or_insert_with(|| Timer::new(FAR));
                            t.memory_wait = Some(wait);
                            t.memory_bounded = holds;
                        }
                    }
                }
            }
            if self.conn.has_pending_writes() {
                // What the socket takes now is written at once; only a full socket waits
                // (boxed), and for at most `write_timeout`: a client that stops reading
                // would otherwise block this task forever.
                match poll_fn(|cx| Poll::Ready(self.conn.write_now(cx))).await {
                    Ok(true) => {}
                    Ok(false) => {
                        let limit = self.shared.limits.write_timeout;
                        match Box::pin(tokio::time::timeout(limit, self.conn.flush())).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return End::Io(e),
                            Err(_) => {
                                self.shared.metrics.protocol_error("write_timeout");
                                return End::ServerClose {
                                    reason: "client stopped reading (mqtt.write_timeout)".into(),
                                };
                            }
                        }
                    }
                    Err(e) => return End::Io(e),
                }
            }
            match poll_fn(|cx| self.poll_event(cx, timer.as_deref_mut())).await {
                Event::Close(CloseReason::Shutdown) => {
                    if self.pending.is_empty() {
                        return self.shutdown_disconnect();
                    }
                    // Let the PUBLISHes already read finish; the keepalive timer becomes the
                    // deadline (and no packet is read any more, so keepalive is moot).
                    self.draining = true;
                    let limit = self.shared.limits.shutdown_timeout;
                    timer = Some(Timer::new(limit));
                }
                Event::Close(CloseReason::Revoked) => return self.revoked(),
                Event::Reloaded => {
                    if let Some(end) = self.reloaded() {
                        return end;
                    }
                }
                Event::Close(CloseReason::Admin) => {
                    return self.server_disconnect(
                        ReasonCode::ADMINISTRATIVE_ACTION,
                        "disconnected by an operator (admin API)",
                    );
                }
                Event::Close(CloseReason::Takeover) => {
                    return self.server_disconnect(
                        ReasonCode::SESSION_TAKEN_OVER,
                        "another connection took over this client id",
                    );
                }
                Event::Acked(front) => {
                    if let Some(end) = self.complete_front(front) {
                        return end;
                    }
                    // Every following entry that is already complete goes out in the same write.
                    while let Some(done) = self.pending.try_front_done() {
                        if let Some(end) = self.complete_front(done) {
                            return end;
                        }
                    }
                    if self.draining && self.pending.is_empty() {
                        return self.shutdown_disconnect();
                    }
                }
                // One clock read per read, not per packet: keepalive and the messages'
                // receive time use it.
                Event::Read(Ok(true)) => {
                    self.last_packet = Instant::now();
                    let limit = self.shared.limits.packet_timeout;
                    let since = timer.as_ref().and_then(|t| t.partial_since);
                    if since.is_some_and(|s| self.last_packet - s > limit) && !limit.is_zero() {
                        self.shared.metrics.protocol_error("packet_timeout");
                        return self.server_disconnect(
                            ReasonCode::MAXIMUM_CONNECT_TIME,
                            "a packet was not completed within mqtt.packet_timeout",
                        );
                    }
                }
                Event::Read(Ok(false)) => return End::Closed,
                Event::Read(Err(e)) => return End::Io(e),
                Event::Deliver(out) => {
                    self.deliver(out);
                    // Take what else is queued (bounded) so it leaves in one write.
                    for _ in 1..DELIVERY_BATCH {
                        if !self.out.has_room() {
                            break;
                        }
                        // `mqtt.max_outbound_bytes`: what does not fit waits in the queue.
                        let room = self.outbound_room();
                        match self.out.state.subscriber.queue.try_recv_within(room) {
                            Some(out) => self.deliver(out),
                            None => break,
                        }
                    }
                    self.note_write_buffer();
                }
                Event::Retained => self.retained_step(),
                Event::Rest => return End::Rest,
                Event::MemoryRoom => {
                    self.memory_paused = false;
                    if let Some(t) = &mut timer {
                        t.memory_wait = None;
                    }
                }
                Event::Keepalive if self.draining => {
                    warn!(parent: &self.span(), unacknowledged = self.pending.len(),
                        "shutdown_timeout passed with messages still in flight; closing (the client resends them)");
                    return self.shutdown_disconnect();
                }
                Event::Keepalive => {
                    let now = Instant::now();
                    // Over the publish rate: what the client sent waits unread, so its silence
                    // is ours; the clock restarts when reading does.
                    let mut throttled_until = None;
                    if self.memory_paused {
                        // Not read at `mqtt.max_memory`: its silence is ours too.
                        self.last_packet = now;
                    }
                    if let Some(t) = &mut timer {
                        match t.throttled_until {
                            Some(until) if now >= until => {
                                t.throttled_until = None;
                                self.last_packet = now;
                            }
                            Some(until) => {
                                self.last_packet = now;
                                throttled_until = Some(until);
                            }
                            None => {}
                        }
                    }
                    if let Some(since) = timer.as_ref().and_then(|t| t.partial_since) {
                        if now >= since + self.shared.limits.packet_timeout {
                            self.shared.metrics.protocol_error("packet_timeout");
                            return self.server_disconnect(
                                ReasonCode::MAXIMUM_CONNECT_TIME,
                                "a packet was not completed within mqtt.packet_timeout",
                            );
                        }
                    }
                    // The timer is only moved forward when it fires, not on every packet.
                    let keepalive_due = self.keepalive.map(|k| self.last_packet + k);
                    if keepalive_due.is_some_and(|due| now >= due) {
                        return self.server_disconnect(
                            ReasonCode::KEEP_ALIVE_TIMEOUT,
                            "keepalive timeout",
                        );
                    }
                    if let Some(timer) = &mut timer {
                        let partial_due =
                            timer.partial_since.map(|s| s + self.shared.limits.packet_timeout);
                        // Nothing due (only a finished partial packet or the rate limits
                        // kept the timer): far away.
                        let due = [keepalive_due, partial_due, throttled_until]
                            .into_iter()
                            .flatten()
                            .min()
                            .unwrap_or(now + FAR);
                        timer.sleep.as_mut().reset(due);
                    }
                }
            }
        }
    }

    /// The next thing the loop must handle, in priority order: being told to close, the
    /// front acknowledgement, bytes from the client (while the inbound window has room), a
    /// delivery (while the outbound window has room), the keepalive timer. Every source not
    /// ready has `cx`'s waker registered.
    fn poll_event(&mut self, cx: &mut Context<'_>, mut timer: Option<&mut Timer>) -> Poll<Event> {
        let poll = self.poll_sources(cx, timer.as_deref_mut());
        if !self.rests {
            return poll;
        }
        let Some(pool) = self.shared.idle.get() else {
            return poll;
        };
        let epoch = pool.epoch();
        if poll.is_ready() {
            self.quiet_epoch = epoch;
            return poll;
        }
        // Quiet: once a full tick has passed with nothing under way, rest (`rest.rs`).
        let rests = self.may_rest(timer.as_deref());
        if rests && epoch.wrapping_sub(self.quiet_epoch) >= 2 {
            return Poll::Ready(Event::Rest);
        }
        // Polled again at the next tick to see whether it is still quiet; also while only
        // the SUBSCRIBE box is left (`retained.rs` drops it, when its buckets are full
        // again, only when the session wakes).
        if (rests || self.subscribe_work.is_some()) && self.check_epoch != epoch {
            self.check_epoch = epoch;
            pool.recheck(cx.waker());
        }
        Poll::Pending
    }

    /// [`poll_event`](Self::poll_event)'s sources, in priority order.
    fn poll_sources(&mut self, cx: &mut Context<'_>, mut timer: Option<&mut Timer>) -> Poll<Event> {
        let throttled = timer.as_ref().is_some_and(|t| t.throttled_until.is_some());
        if let (Some(link), false) = (&self.link, self.draining) {
            if let Poll::Ready(reason) = link.0.poll_close(cx) {
                return Poll::Ready(Event::Close(reason));
            }
            // A reload wakes every connection through its link (`ConnLink::nudge`).
            if self.live.generation != self.shared.live.generation() {
                return Poll::Ready(Event::Reloaded);
            }
        }
        if !self.pending.is_empty() {
            if let Poll::Ready(front) = self.pending.poll_front_done(cx) {
                return Poll::Ready(Event::Acked(front));
            }
        }
        if let Some(wait) = timer.as_mut().and_then(|t| t.memory_wait.as_mut()) {
            if wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::MemoryRoom);
            }
        } else if self.may_read() && !throttled {
            if let Poll::Ready(read) = self.conn.poll_fill(cx) {
                return Poll::Ready(Event::Read(read));
            }
        }
        if self.out.has_room() {
            // `None` (closed) cannot happen while this session holds its queue: nothing to do.
            if let Poll::Ready(Some(out)) = self.out.state.subscriber.queue.poll_recv(cx) {
                return Poll::Ready(Event::Deliver(out));
            }
        }
        if self.subscribe_work.is_some() && self.poll_retained(cx) {
            return Poll::Ready(Event::Retained);
        }
        if let Some(timer) = timer {
            if timer.sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Keepalive);
            }
        }
        Poll::Pending
    }

    /// The config was reloaded: routes with the new snapshot from now, and takes its ACL as
    /// a resuming client would (`connect.rs`): subscriptions it now refuses are removed
    /// (and what was queued for them and may not be read is dropped), ones overlapping a
    /// deny have their deliveries checked. Deliveries already sent stay in flight.
    ///
    /// A client the new users would not let in (its user removed, its client id no longer
    /// allowed, anonymous clients no longer allowed) is closed: the reload tells connected
    /// ones through the registry, this catches one whose CONNECT raced with it.
    fn reloaded(&mut self) -> Option<End> {
        let live = self.shared.live.load();
        let revoked = match self.username.as_deref() {
            None => !live.auth.allows_anonymous(),
            Some(u) => {
                (self.live.auth.has_user(u) && !live.auth.has_user(u))
                    || !live.auth.client_id_allowed(Some(u), &self.client_id)
            }
        };
        if revoked {
            self.live = live;
            return Some(self.revoked());
        }
        let mut acl = live.auth.acl.for_client(self.username.as_deref(), &self.client_id);
        let shared = &self.shared;
        let state = &mut self.out.state;
        let mut revoked = Vec::new();
        for filter in state.filters.keys() {
            match acl.grant(filter) {
                crate::auth::acl::Grant::Refused => revoked.push(filter.clone()),
                crate::auth::acl::Grant::Filtered => acl.set_filtering(),
                crate::auth::acl::Grant::Granted => {}
            }
        }
        if !revoked.is_empty() {
            for filter in &revoked {
                state.filters.remove(filter);
                shared.broker.unsubscribe(state.id, filter);
                shared.acl_denied_subscribe.inc();
                debug!(client_id = %crate::logtext::LogText(&self.client_id), filter = %crate::logtext::LogText(filter), "subscription no longer allowed by the reloaded ACL: removed");
            }
            let subscriber = Arc::clone(&state.subscriber);
            for out in subscriber.queue.remove_unless(|out| acl.may_receive(&out.msg.topic)) {
                shared.broker.unstore(&subscriber, out.stored);
                crate::broker::tracking::finish(out.ticket, crate::broker::tracking::Fate::Gone);
            }
            if self.expiry != Expiry::Now {
                shared.broker.store_session(state, self.expiry, false);
            }
        }
        self.acl = acl;
        self.live = live;
        None
    }

    /// Ends the session because a reload took its rights away (MQTT 5: DISCONNECT 0x87).
    fn revoked(&mut self) -> End {
        self.server_disconnect(
            ReasonCode::NOT_AUTHORIZED,
            "no longer authorized after a configuration reload",
        );
        End::Revoked
    }

    /// Whether to read from the client now. A 3.1.1 client cannot be told our window, so when
    /// it is full we stop reading (TCP pushes back). An MQTT 5 client was told our Receive
    /// Maximum in CONNACK; we keep reading so that one exceeding it gets DISCONNECT 0x93.
    fn may_read(&self) -> bool {
        !self.draining && (self.version == ProtocolVersion::V5 || self.pending.has_room())
    }

    /// Ends the session for shutdown (MQTT 5: DISCONNECT 0x8B).
    fn shutdown_disconnect(&mut self) -> End {
        self.server_disconnect(ReasonCode::SERVER_SHUTTING_DOWN, "server shutting down")
    }

    /// Handles one packet and charges a PUBLISH to the publish rate limits, if any (a plain
    /// function: its locals stay out of the session's future).
    fn handle_charged(
        &mut self,
        packet: Packet,
        wire: usize,
        timer: &mut Option<Box<Timer>>,
    ) -> Option<End> {
        self.work = self.work.saturating_add(work_of(&packet, wire));
        let filters = match &packet {
            Packet::Subscribe(s) => s.filters.len(),
            Packet::Unsubscribe(u) => u.filters.len(),
            _ => 0,
        };
        if filters > 0 {
            // `mqtt.max_subscribe_rate`: over it, nothing more is read until the bucket is
            // back at zero (the timer exists only for a client that got there).
            if let Some(until) = self.charge_subscribe(filters) {
                timer.get_or_insert_with(|| Timer::new(FAR)).throttle(until);
            }
        }
        let Some(timer) = timer.as_deref_mut().filter(|t| t.rate.is_some()) else {
            return self.handle(packet);
        };
        let cost = match &packet {
            Packet::Publish(p) => Some(p.topic.len() + p.payload.len()),
            _ => None,
        };
        let end = self.handle(packet);
        if let Some(cost) = cost {
            timer.charge(cost);
        }
        end
    }

    /// Handles one packet; `Some` ends the session.
    fn handle(&mut self, packet: Packet) -> Option<End> {
        match packet {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(r) => self.on_puback(r),
            Packet::PubRel(r) => self.on_pubrel(r),
            Packet::PubRec(r) => self.on_pubrec(r),
            Packet::PubComp(r) => {
                let stored = self.out.completed(r.packet_id);
                self.shared.broker.unstore(&self.out.state.subscriber, stored);
                None
            }
            Packet::Subscribe(s) => self.on_subscribe(*s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(*u),
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Disconnect(d) => {
                if let Some(interval) = d.properties.session_expiry_interval {
                    // MQTT 5 §3.14.2.2.2: from 0 at CONNECT to non-zero is a protocol error.
                    if self.expiry_zero_at_connect && interval != 0 {
                        self.shared.metrics.protocol_error("session_expiry_on_disconnect");
                        return Some(self.server_disconnect(
                            ReasonCode::PROTOCOL_ERROR,
                            "session expiry interval was 0 at CONNECT",
                        ));
                    }
                    debug!(
                        client_id = %crate::logtext::LogText(&self.client_id),
                        interval,
                        "session expiry interval changed by DISCONNECT"
                    );
                    self.expiry = Expiry::from_interval(interval);
                }
                Some(End::ClientDisconnect {
                    with_will: d.code == ReasonCode::DISCONNECT_WITH_WILL,
                })
            }
            Packet::Auth(_) => Some(self.server_disconnect(
                // 0x8C is not a DISCONNECT code; an AUTH without an authentication method
                // agreed at CONNECT is a protocol error (MQTT 5 §4.12).
                ReasonCode::PROTOCOL_ERROR,
                "enhanced authentication is not supported",
            )),
            Packet::Connect(_) => {
                self.shared.metrics.protocol_error("second_connect");
                Some(self.server_disconnect(ReasonCode::PROTOCOL_ERROR, "second CONNECT"))
            }
            other => {
                self.shared.metrics.protocol_error("unexpected_packet");
                let reason = format!("a client may not send {}", other.name());
                Some(self.server_disconnect(ReasonCode::PROTOCOL_ERROR, &reason))
            }
        }
    }

    /// Queues one packet to the client; an encode failure ends the session.
    fn send(&mut self, packet: &Packet) -> Option<End> {
        match self.conn.queue(packet) {
            Ok(()) => None,
            Err(e) => {
                Some(End::ServerClose { reason: format!("cannot send {}: {e}", packet.name()) })
            }
        }
    }

    /// The PUBREL/PUBCOMP for `packet_id`: MQTT 5 says 0x92 when the id is unknown; 3.1.1 has
    /// no way to say it and answers success.
    fn id_response(&self, packet_id: u16, known: bool) -> PubResponse {
        let code = if known || self.version == ProtocolVersion::V311 {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        };
        PubResponse { packet_id, code, properties: PublishProperties::none() }
    }

    /// Sends an MQTT 5 DISCONNECT with `code` (nothing on 3.1.1) and ends the session.
    fn server_disconnect(&mut self, code: ReasonCode, reason: &str) -> End {
        if self.version == ProtocolVersion::V5 {
            let mut properties = Properties::default();
            if self.problem_info {
                properties.reason_string = Some(reason.to_owned());
            }
            let _ = self.conn.queue(&Packet::Disconnect(Box::new(Disconnect { code, properties })));
        }
        End::ServerClose { reason: reason.to_owned() }
    }

    fn decode_error(&mut self, e: DecodeError) -> End {
        self.shared.metrics.protocol_error(e.kind());
        warn!(parent: &self.span(), error = %e, "bad packet from client");
        self.server_disconnect(e.reason_code(), &e.to_string())
    }

    /// A PUBACK answers one of our QoS 1 deliveries.
    fn on_puback(&mut self, r: PubResponse) -> Option<End> {
        let stored = self.out.acked(r.packet_id, r.code);
        self.shared.broker.unstore(&self.out.state.subscriber, stored);
        None
    }

    /// Cleans up after the loop: parks or discards the session state, releases the client id
    /// (and so lets a connection taking it over resume the state), closes the socket, and
    /// publishes the will.
    async fn finish(mut self, end: End) {
        let span = &self.span();
        // The will goes out on every end but a normal DISCONNECT (MQTT 5: unless it asked for it).
        let publish_will = match &end {
            End::ClientDisconnect { with_will } => *with_will,
            End::Revoked => false,
            _ => true,
        };
        match &end {
            End::ClientDisconnect { .. } => info!(parent: span, "client disconnected"),
            End::Closed => info!(parent: span, "client closed the connection without DISCONNECT"),
            End::ServerClose { reason } => {
                info!(parent: span, %reason, "connection closed by mqgate")
            }
            End::Io(e) => info!(parent: span, error = %e, "connection lost"),
            End::Revoked => {
                info!(parent: span, "connection closed: no longer authorized after a configuration reload (will not published)")
            }
            End::Rest => debug!(parent: span, "connection closed instead of resting"),
        }
        let will = self.will.take().filter(|will| {
            if !publish_will {
                return false;
            }
            if !self.acl.may_publish(&will.topic) {
                self.shared.acl_denied_publish.inc();
                info!(parent: span, topic = %crate::logtext::LogText(&will.topic), "will not published: denied by the ACL");
                return false;
            }
            true
        });
        // MQTT 5 Will Delay Interval: the will waits for the earlier of its delay and the end
        // of the session, unless the session is resumed first. It is recorded before the
        // client id is released, so that a connection resuming the session finds it.
        let delay = match (&will, self.version) {
            (Some(will), ProtocolVersion::V5) => will
                .properties
                .will_delay_interval
                .unwrap_or(0)
                .min(self.shared.limits.max_will_delay),
            _ => 0,
        };
        let delay = match self.expiry {
            Expiry::Now => 0,
            Expiry::After(seconds) => delay.min(seconds),
            Expiry::Never => delay,
        };
        let delayed = (delay > 0).then(|| self.shared.broker.delay_will(&self.client_id));
        // Park before closing the socket: a connection taking over waits for this.
        let mut state = self.out.state;
        state.awaiting_rel = self.pending.released_later();
        self.shared.broker.park_session(&self.client_id, state, self.expiry);
        if let Some(link) = self.link.take() {
            self.shared.broker.unregister(&self.client_id, link.0.conn_id());
        }
        self.conn.close().await;
        let Some(will) = will else { return };
        match delayed {
            None => {
                inbound::publish_will(&self.shared, &self.client_id, self.username, *will, span)
                    .await
            }
            Some((id, fate)) => {
                let delayed = inbound::DelayedWill {
                    shared: self.shared,
                    client_id: self.client_id,
                    username: self.username,
                    will: *will,
                    delay: Duration::from_secs(delay.into()),
                    id,
                    fate,
                    span: span.clone(),
                };
                tokio::spawn(delayed.run());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<A, B, C, D, F: Future>(_f: impl FnOnce(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every active connection carries one session future (plus tokio's ~130 bytes of task
    /// header and trailer). 776 bytes today: 760 before issue 19, whose `ConnSlot` (8) and
    /// resting bookkeeping (3) came in while the listener's `map(done)` wrapper around this
    /// future (24: the shared state and the permit) went, so the task itself got 8 bytes
    /// smaller. A quiet plain-TCP connection gives its task back altogether: `rest.rs` holds
    /// what it keeps to its own budget.
    /// Things that used to creep in: a `Packet` (408 bytes) kept by a `match` around an
    /// `.await`, an `async fn`'s arguments, futures of `select!` branches, a boxed path
    /// made inline.
    #[test]
    fn an_idle_session_future_stays_small() {
        let size = future_size(run::<tokio::net::TcpStream>);
        assert!(size <= 776, "the session future grew to {size} bytes (budget 776)");
    }
}
