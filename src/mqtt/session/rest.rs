//! A quiet session set aside: what a plain-TCP session keeps while it rests in the idle pool
//! (`mqtt/idle.rs`), and how it gets there and back.
//!
//! A session rests when, for a full tick of the pool, nothing happened and nothing is under
//! way ([`Session::may_rest`]): nothing buffered either way, no PUBLISH waiting for its
//! outcome, no delivery queued or unacknowledged, no retained walk, no pause. It then becomes
//! a [`Resting`] (its socket handed to the pool's epoll set, its task ended) and is made a
//! session again, in a new task, when its socket is readable, when a delivery is queued for it
//! or its registry link is told something (close, takeover, reload: the pool's waker is
//! registered with both before it can be resumed), or when its keepalive runs out. Only what
//! is not empty or not derivable is kept; scratch space and empty queues are made again.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::connect::Connected;
use super::outbound::OutboundState;
use super::{inbound, End, PendingQueue, Session, SessionShared, Timer};
use crate::auth::acl::ClientAcl;
use crate::broker::sessions::DoneGuard;
use crate::broker::sessions::{Owner, Subscriber};
use crate::broker::{Expiry, SessionState, SubscribeOptions};
use crate::listeners::Transport;
use crate::mqtt::codec::{LastWill, ProtocolVersion};
use crate::mqtt::connection::Connection;
use crate::mqtt::idle::IdlePool;
use crate::mqtt::listener::ConnSlot;
use crate::reload::Live;
use std::collections::{HashMap, HashSet, VecDeque};

/// The pool quiet MQTT connections rest in.
pub(crate) type IdleConnections = IdlePool<Resting>;

/// A boxed future, for what a session does after its loop.
type Boxed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A resting session: a [`Session`] without its socket (the pool holds that), its empty
/// buffers, queues and scratch space. The budget every resting connection pays for it is
/// held by `a_resting_session_stays_small`.
pub(crate) struct Resting {
    shared: Arc<SessionShared>,
    client_id: Arc<str>,
    // No user name: the registry link's owner is the same string (`ConnLink::owner`).
    acl: ClientAcl,
    live: Arc<Live>,
    link: Option<DoneGuard>,
    will: Option<Box<LastWill>>,
    /// The session state's id, subscriber and last packet id; its other parts are empty
    /// (no delivery in flight), one pointer each when empty, or made again from the rest (its
    /// version and owner: the connection's).
    session_id: u64,
    subscriber: Arc<Subscriber>,
    /// Boxed on purpose: a map inline is 48 bytes even when empty, a box one pointer.
    #[allow(clippy::box_collection)]
    filters: Option<Box<HashMap<String, SubscribeOptions>>>,
    /// Inbound QoS 2 ids PUBRECed and not yet released (the pending queue is otherwise empty);
    /// boxed like `filters`.
    #[allow(clippy::box_collection)]
    awaiting_rel: Option<Box<HashSet<u16>>>,
    last_id: u16,
    /// The topic alias tables, if the client used any; the client's Topic Alias Maximum is
    /// `client_alias_maximum`, ours the config's.
    alias_tables: Option<Box<inbound::AliasTables>>,
    client_alias_maximum: u16,
    slot: ConnSlot,
    /// When the last packet came, in whole seconds since [`origin`] rounded up (4 bytes where
    /// an `Instant` takes 16; a resumed session's keepalive then runs out up to a second
    /// late, as its check on the pool's tick is up to half a second late anyway).
    last_packet_s: u32,
    /// The keepalive in milliseconds, `u32::MAX` for none (MQTT's longest, 65,535 s, fits;
    /// a longer `mqtt.idle_timeout` is taken as 49 days).
    keepalive_ms: u32,
    /// The session expiry as its interval (`Expiry::seconds`, which round-trips).
    expiry_s: u32,
    window: u16,
    client_max_packet_size: u32,
    version: ProtocolVersion,
    /// [`PROBLEM_INFO`] and [`EXPIRY_ZERO_AT_CONNECT`].
    flags: u8,
}

/// [`Resting::flags`]: the client asked for reason strings and user properties on errors.
const PROBLEM_INFO: u8 = 1;
/// [`Resting::flags`]: the session expiry was 0 at CONNECT (MQTT 5 §3.14.2.2.2).
const EXPIRY_ZERO_AT_CONNECT: u8 = 2;

/// [`Resting::flags`] of a session's two flags.
fn flags(problem_info: bool, expiry_zero_at_connect: bool) -> u8 {
    (if problem_info { PROBLEM_INFO } else { 0 })
        | (if expiry_zero_at_connect { EXPIRY_ZERO_AT_CONNECT } else { 0 })
}

/// The origin of the resting sessions' compact timestamps (the first use in the process).
fn origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    Instant::from_std(*ORIGIN.get_or_init(std::time::Instant::now))
}

/// `at` as whole seconds since [`origin`], rounded up (an earlier `at` as the origin).
fn to_secs(at: Instant) -> u32 {
    let since = at.saturating_duration_since(origin());
    let secs = since.as_secs() + u64::from(since.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// The instant `secs` after [`origin`].
fn from_secs(secs: u32) -> Instant {
    origin() + Duration::from_secs(u64::from(secs))
}

/// A keepalive as [`Resting::keepalive_ms`] holds it.
fn keepalive_ms(keepalive: Option<Duration>) -> u32 {
    keepalive.map_or(u32::MAX, |k| u32::try_from(k.as_millis()).unwrap_or(u32::MAX - 1))
}

/// The reason logged if a session that asked to rest cannot (not expected).
const NO_REST: &str = "the connection could not rest";

/// Nothing under way for this long since the last PUBLISH: the publish rate's buckets (rate
/// = burst per second) are full again, so resting (which starts them full) gives nothing away.
const RATE_REFILLED: Duration = Duration::from_secs(1);

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Whether nothing is under way: the session could rest.
    pub(super) fn may_rest(&self, timer: Option<&Timer>) -> bool {
        !self.draining
            && !self.memory_paused
            && !self.resend_due
            && self.pending.is_empty()
            && self.blocked.is_empty()
            && self.subscribe_work.is_none()
            && !self.conn.has_buffered_input()
            && !self.conn.has_pending_writes()
            && self.out.state.inflight.is_empty()
            && self.out.state.inflight_ids.is_empty()
            && self.out.state.subscriber.queue.is_empty()
            && self.link.as_ref().is_some_and(|l| l.0.close_reason().is_none())
            && self.live.generation == self.shared.live.generation()
            && timer.is_none_or(|t| {
                t.partial_since.is_none()
                    && t.throttled_until.is_none()
                    && t.memory_wait.is_none()
                    && (t.rate.is_none() || self.last_packet.elapsed() >= RATE_REFILLED)
            })
    }
}

impl<S: Transport> Session<S> {
    /// After the loop: rest, or finish (what is left to await, boxed).
    pub(super) fn end(self, end: End) -> Option<Boxed> {
        match end {
            End::Rest => self.rest(),
            end => Some(Box::pin(self.finish(end))),
        }
    }

    /// Sets the session aside in the idle pool; `Some` (its end, to await) when it cannot.
    fn rest(self) -> Option<Boxed> {
        let shared = Arc::clone(&self.shared);
        let peer = self.peer;
        let due = self.keepalive.map(|k| (self.last_packet + k).into_std());
        let (conn, resting) = self.into_resting();
        let Some(pool) = shared.idle.get() else {
            // Not reached: a session only asks to rest when there is a pool.
            let conn = resting.connection(conn.into_stream());
            let session = Session::from_rest(resting, conn, peer);
            return Some(Box::pin(session.finish(End::ServerClose { reason: NO_REST.into() })));
        };
        let stream = match conn.into_stream().into_tcp() {
            Ok(stream) => stream,
            Err(stream) => {
                // Not reached either: only a plain socket says it `RESTS`.
                let conn = resting.connection(stream);
                let session = Session::from_rest(resting, conn, peer);
                return Some(Box::pin(session.finish(End::ServerClose { reason: NO_REST.into() })));
            }
        };
        let socket = match stream.into_std() {
            Ok(socket) => socket,
            Err(e) => {
                let conn = resting.connection(Closed);
                return Some(Box::pin(Session::from_rest(resting, conn, peer).finish(End::Io(e))));
            }
        };
        resting.set_aside(pool, socket, due);
        None
    }

    /// The session without its socket.
    fn into_resting(self) -> (Connection<S>, Resting) {
        let Session {
            conn,
            peer: _,
            shared,
            version,
            client_id,
            username,
            acl,
            live,
            session_id: _,
            expiry,
            expiry_zero_at_connect,
            link,
            keepalive,
            last_packet,
            will,
            problem_info,
            mut pending,
            out,
            resend_due: _,
            rule_hits: _,
            aliases,
            blocked: _,
            draining: _,
            memory_paused: _,
            work: _,
            subscribe_work: _,
            quiet_epoch: _,
            check_epoch: _,
            rests: _,
            slot,
        } = self;
        let (state, window) = out.into_parts();
        let awaiting_rel = pending.released_later();
        let SessionState {
            id: session_id,
            subscriber,
            last_id,
            filters,
            // Empty (`may_rest`), or made again from the connection's.
            inflight: _,
            inflight_ids: _,
            awaiting_rel: _,
            version: _,
            owner: _,
        } = state;
        // The same string as the link's owner (`from_rest` takes it from there).
        drop(username);
        let (alias_tables, client_alias_maximum) = aliases.into_parts();
        let resting = Resting {
            session_id,
            subscriber,
            last_id,
            filters: (!filters.is_empty()).then(|| Box::new(filters)),
            awaiting_rel: (!awaiting_rel.is_empty()).then(|| Box::new(awaiting_rel)),
            client_max_packet_size: conn.client_max_packet_size(),
            shared,
            client_id,
            acl,
            live,
            link,
            will,
            alias_tables,
            client_alias_maximum,
            slot,
            last_packet_s: to_secs(last_packet),
            keepalive_ms: keepalive_ms(keepalive),
            expiry_s: expiry.seconds(),
            window: u16::try_from(window).unwrap_or(u16::MAX),
            version,
            flags: flags(problem_info, expiry_zero_at_connect),
        };
        (conn, resting)
    }
}

impl<S: Transport> Session<S> {
    /// The session of a resting one and its socket.
    fn from_rest(r: Resting, conn: Connection<S>, peer: SocketAddr) -> Self {
        // The link is the connection's (a session rests only with one); its owner is the
        // user name the session had.
        let owner = r.link.as_ref().map_or(Owner::Anonymous, |l| l.0.owner().clone());
        let username = match &owner {
            Owner::User(name) => Some(Arc::clone(name)),
            Owner::Anonymous | Owner::Unknown => None,
        };
        let state = SessionState {
            id: r.session_id,
            subscriber: r.subscriber,
            inflight: VecDeque::new(),
            inflight_ids: HashSet::new(),
            last_id: r.last_id,
            filters: r.filters.map_or_else(HashMap::new, |f| *f),
            awaiting_rel: HashSet::new(),
            version: r.version,
            owner,
        };
        let mut pending = PendingQueue::new(r.shared.limits.receive_maximum);
        pending.resume(r.awaiting_rel.map_or_else(HashSet::new, |a| *a));
        Session {
            conn,
            peer,
            version: r.version,
            client_id: r.client_id,
            username,
            acl: r.acl,
            live: r.live,
            session_id: state.id,
            expiry: Expiry::from_interval(r.expiry_s),
            expiry_zero_at_connect: r.flags & EXPIRY_ZERO_AT_CONNECT != 0,
            link: r.link,
            keepalive: (r.keepalive_ms != u32::MAX)
                .then(|| Duration::from_millis(u64::from(r.keepalive_ms))),
            last_packet: from_secs(r.last_packet_s),
            will: r.will,
            problem_info: r.flags & PROBLEM_INFO != 0,
            pending,
            out: OutboundState::from_parts(state, usize::from(r.window)),
            resend_due: false,
            rule_hits: Vec::new(),
            aliases: inbound::TopicAliases::from_parts(
                r.alias_tables,
                r.shared.limits.topic_alias_maximum,
                r.client_alias_maximum,
            ),
            blocked: Vec::new(),
            draining: false,
            memory_paused: false,
            work: 0,
            subscribe_work: None,
            quiet_epoch: r.shared.idle.get().map_or(0, IdlePool::epoch),
            check_epoch: u8::MAX,
            rests: S::RESTS,
            slot: r.slot,
            shared: r.shared,
        }
    }
}

impl Resting {
    /// A session that has just been accepted (the direct handshake, `direct.rs`), at rest:
    /// what [`Session::new`] and then `into_resting` would make of it. Its deliveries in
    /// flight and its queue are empty (the caller checks).
    pub(super) fn connected(
        c: Connected,
        client_max_packet_size: u32,
        shared: Arc<SessionShared>,
        slot: ConnSlot,
    ) -> Resting {
        let SessionState { id, subscriber, last_id, filters, awaiting_rel, .. } = c.state;
        let window =
            c.client_receive_maximum.unwrap_or(u16::MAX).min(shared.limits.max_inflight_out).max(1);
        Resting {
            session_id: id,
            subscriber,
            last_id,
            filters: (!filters.is_empty()).then(|| Box::new(filters)),
            awaiting_rel: (!awaiting_rel.is_empty()).then(|| Box::new(awaiting_rel)),
            client_max_packet_size,
            alias_tables: None,
            client_alias_maximum: c.client_topic_alias_maximum,
            client_id: c.client_id,
            acl: c.acl,
            live: c.live,
            link: Some(c.registration.link),
            will: c.will.map(Box::new),
            slot,
            last_packet_s: to_secs(Instant::now()),
            keepalive_ms: keepalive_ms(c.keepalive),
            flags: flags(c.problem_info, c.expiry == Expiry::Now),
            expiry_s: c.expiry.seconds(),
            window,
            version: c.version,
            shared,
        }
    }

    /// Hands the session and its socket to the idle pool, its waker registered with its
    /// queue and its registry link first (`IdlePool::rest`).
    pub(super) fn set_aside(
        self,
        pool: &IdleConnections,
        socket: std::net::TcpStream,
        due: Option<std::time::Instant>,
    ) {
        let subscriber = Arc::clone(&self.subscriber);
        let link = self.link.as_ref().map(|l| Arc::clone(&l.0));
        let (cell, generation) = (Arc::clone(&self.shared.live), self.live.generation);
        pool.rest(socket, due, self, move |waker| {
            // Registered before anything can resume it; `false` if something came already.
            let closing =
                link.is_none_or(|l| l.poll_close(&mut Context::from_waker(waker)).is_ready());
            !closing && subscriber.queue.watch(waker) && cell.generation() == generation
        });
    }

    /// A connection on `stream` as this session's was.
    fn connection<T: Transport>(&self, stream: T) -> Connection<T> {
        let mut conn = Connection::new(stream, self.shared.limits.max_packet_size as usize);
        conn.set_version(self.version, Some(self.client_max_packet_size));
        conn
    }

    /// The session again, in the task the pool spawns (`IdlePool`'s `Resume`).
    pub(crate) fn resume(self, socket: std::net::TcpStream) -> Boxed {
        Box::pin(async move {
            let peer = socket.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
            match tokio::net::TcpStream::from_std(socket) {
                Ok(stream) => {
                    let conn = self.connection(stream);
                    let mut session = Session::from_rest(self, conn, peer);
                    let end = session.run().await;
                    if let Some(end) = session.end(end) {
                        end.await;
                    }
                }
                Err(e) => {
                    let conn = self.connection(Closed);
                    Box::pin(Session::from_rest(self, conn, peer).finish(End::Io(e))).await;
                }
            }
        })
    }
}

/// A socket that is gone (it could not be taken from tokio's reactor or given back): reads
/// end, writes vanish. Only for finishing such a session (its state parked, its will sent).
pub(super) struct Closed;

impl AsyncRead for Closed {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Transport for Closed {}

impl AsyncWrite for Closed {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every resting connection holds beyond what the broker keeps of any session (its
    /// registry link, subscriber, client id): the idle pool's slot (this plus ~40 bytes and
    /// the allocation's header). Things that would creep in: a buffer or a queue kept
    /// instead of made again, a `SocketAddr`, a second copy of what the link already has.
    /// The whole allocation is held to 192 bytes, one of mimalloc's size classes (the next is
    /// 224; 256 before: 184 bytes, with a user name that the link's owner holds too, an
    /// `Instant`, a `u64` keepalive, the expiry enum and the alias maximums inline).
    #[test]
    fn a_resting_session_stays_small() {
        let size = std::mem::size_of::<Resting>();
        assert!(size <= 136, "a resting session grew to {size} bytes (budget 136)");
        let slot = crate::mqtt::idle::slot_bytes::<Resting>();
        assert!(slot <= 192, "a resting connection's slot grew to {slot} bytes (budget 192)");
    }

    #[test]
    fn the_compact_timestamp_keepalive_and_expiry_round_trip() {
        let at = Instant::now() + Duration::from_millis(1_234);
        let back = from_secs(to_secs(at));
        assert!(back >= at && back - at < Duration::from_secs(1), "{at:?} {back:?}");
        for e in [Expiry::Now, Expiry::After(1), Expiry::After(u32::MAX - 1), Expiry::Never] {
            assert_eq!(Expiry::from_interval(e.seconds()), e);
        }
        for (p, z) in [(false, false), (true, false), (false, true), (true, true)] {
            let f = flags(p, z);
            assert_eq!((f & PROBLEM_INFO != 0, f & EXPIRY_ZERO_AT_CONNECT != 0), (p, z));
        }
        assert_eq!(keepalive_ms(None), u32::MAX);
        assert_eq!(keepalive_ms(Some(Duration::from_secs(65_535))), 65_535_000);
        assert_eq!(keepalive_ms(Some(Duration::from_secs(100 * 86_400))), u32::MAX - 1);
    }

    /// Everything a resting connection holds that is its own, in mimalloc's size classes: its
    /// slot in the idle pool (192), its registry link (`ConnLink` in an `Arc`: 128), its
    /// queue (`Subscriber` in an `Arc`: 80, its deque boxed and made on the first delivery)
    /// and its slot in the registry's map of connections (24, up to twice that with the map's
    /// spare room; parked sessions have a map of their own), 424 bytes (528 before: slot 256,
    /// `Subscriber` 112, map slot 32); then the client id (an `Arc<str>`, 32 for a short one).
    /// The whole process grows by more per connection (docs/benchmarks.md): the rest is the
    /// allocator's and the maps' spare room. A field added to one of these that crosses a
    /// size class shows here.
    #[test]
    fn a_resting_connection_holds_at_most_424_bytes_besides_its_client_id() {
        use crate::broker::sessions::{ConnLink, Subscriber};
        let arc = 2 * std::mem::size_of::<usize>();
        let parts = [
            ("the idle pool's slot", crate::mqtt::idle::slot_bytes::<Resting>(), 192),
            ("the registry link", arc + std::mem::size_of::<ConnLink>(), 128),
            ("the subscriber queue", arc + std::mem::size_of::<Subscriber>(), 80),
            ("the registry's map slot", crate::broker::sessions::registry_slot_bytes(), 24),
        ];
        for (what, size, class) in parts {
            assert!(size <= class, "{what} grew to {size} bytes (budget {class})");
        }
    }
}
