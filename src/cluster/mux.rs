//! The persistent sessions' consumers as channels of a few shared AMQP connections (docs/cluster.md,
//! "Persistent sessions move between nodes").
//!
//! A [`Pool`] holds a node's session connections. Each connection is one task owning the
//! socket: channel 1 is the shared confirm channel the sessions' records are published on,
//! channels from [`FIRST`] up to [`PER_CONNECTION`] sessions are lent one to a session
//! ([`Chan`]). The task routes what the broker sends by channel to its session (a channel's
//! inbound traffic is bounded by the protocol: the replies to what its session asked, and at
//! most `prefetch` unacknowledged deliveries), writes what the sessions encode, answers the
//! heartbeats, and hands each session the confirm of its records (as `basic.ack`/`basic.nack`
//! on [`RECORD_CHANNEL`] with the session's own publish tag). A session's end closes only its
//! channel (RabbitMQ requeues what the channel had delivered and not acknowledged, in order); a
//! channel-level error closes only that channel. Losing the connection ends every session on it
//! (their inbound ends: the sessions disconnect their clients). When every connection is full
//! (or gone), the next session opens a new one. A connection with no channel lent for
//! [`IDLE_CLOSE`] is closed.
//!
//! Bounded both ways, in bytes and so in count:
//! - **Sessions to connection.** What a session hands its connection (the frames it encoded,
//!   its records) is charged to the connection's budget of [`INBOX_BYTES`]: a message costs
//!   its length, at least [`MIN_COST`]. `Chan::flush` and `Chan::publish` wait for room. The
//!   connection gives the room back as it takes the bytes into its write buffer, and it takes
//!   nothing while that buffer holds [`WBUF_MAX`] or more. So a broker that stops reading (a
//!   memory alarm) holds the sessions back, not the node's memory. What a session sends
//!   without waiting is its request for a channel (it then waits for the answer) and its end
//!   (`Done`, from `Drop`, carrying its last encoded frames: its final acks): one each.
//! - **Broker to session.** What the broker sends a channel is charged to that channel's own
//!   bound, at each frame's wire size (at least [`MIN_COST`]). The session gives it when the
//!   channel is lent: `prefetch` deliveries of a batch each, and room for replies. A channel
//!   past its bound is closed (RabbitMQ requeues what it had delivered) and its session ends:
//!   its client is disconnected and reconnects.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, warn};

use crate::targets::amqp::transport::{self, describe, Transport, Uri};
use crate::targets::amqp::wire::consume::{ConsumerFrame, ConsumerMethod};
use crate::targets::amqp::wire::methods::{self, Method, REPLY_SUCCESS};

/// The shared confirm-mode channel the sessions' records are published on; the sessions see
/// their confirms as arriving on it.
pub(super) const RECORD_CHANNEL: u16 = 1;
/// The first channel lent to a session (`transport::connect` opens 1 and 2).
const FIRST: u16 = 3;
/// Sessions on one connection at most (RabbitMQ's default `channel_max` is 2047; a broker
/// that allows fewer channels gets fewer: [`capacity`]).
pub(super) const PER_CONNECTION: usize = 1000;
/// How often heartbeats are looked at.
const TICK: Duration = Duration::from_millis(250);
/// Bytes the sessions may have handed a connection that it has not taken yet.
const INBOX_BYTES: usize = 1 << 20;
/// The least a message or frame costs of a budget (so the budgets bound the count too).
const MIN_COST: usize = 64;
/// A connection takes nothing more from its sessions while this much waits to be written.
const WBUF_MAX: usize = 1 << 20;
/// A connection with no channel lent this long is closed.
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// A channel's inbound as its session holds it: frames with their cost.
type Inbound = mpsc::UnboundedReceiver<(u32, ConsumerFrame)>;

/// What a session asks its connection.
enum ToConn {
    /// Lend a channel (opened: `channel.open` is written; its session awaits the open-ok)
    /// whose inbound may hold `max_inbound` bytes.
    Open { reply: oneshot::Sender<Option<(u16, Inbound, Arc<AtomicUsize>)>>, max_inbound: usize },
    /// Frames a session encoded on its channel, and what they were charged.
    Write { bytes: Bytes, cost: u32 },
    /// A record encoded on [`RECORD_CHANNEL`]: its confirm goes to `ch` with `tag`.
    Publish { ch: u16, tag: u64, bytes: Bytes, cost: u32 },
    /// The session ended: its last frames (`tail`, not charged) go, then its channel is
    /// closed (`open`) or just forgotten (the broker closed it).
    Done { ch: u16, open: bool, tail: Bytes },
}

/// One shared connection as the pool holds it.
struct Conn {
    tx: mpsc::UnboundedSender<ToConn>,
    /// The connection's budget of [`INBOX_BYTES`] (closed when the connection is gone).
    room: Arc<Semaphore>,
    /// Channels lent (and not yet given back).
    used: Arc<AtomicUsize>,
    /// Set when the connection's task ended.
    dead: Arc<AtomicBool>,
    /// Its largest frame (records are split to it).
    frame_max: u32,
    /// Channels it lends at most.
    capacity: usize,
}

/// A node's shared session connections.
#[derive(Default)]
pub(super) struct Pool {
    conns: Mutex<Vec<Conn>>,
    /// One new connection at a time (sessions connecting together share it).
    opening: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    /// A channel for a session: on a connection with room, or a new one.
    /// `max_inbound`: the bytes the broker may have sent the channel that its session has not
    /// taken yet.
    pub(super) async fn channel(
        &self,
        uri: &Uri,
        security: &transport::Security,
        max_inbound: usize,
    ) -> Result<Chan, String> {
        if let Some(c) = self.try_lend(max_inbound).await {
            return Ok(c);
        }
        let _one = self.opening.lock().await;
        if let Some(c) = self.try_lend(max_inbound).await {
            return Ok(c);
        }
        let n = self.conns.lock().unwrap_or_else(|p| p.into_inner()).len();
        let name = format!("sessions/{n}");
        let link = transport::connect(uri, security, &name, 1).await.map_err(|e| e.to_string())?;
        let conn = start(link.transport, IDLE_CLOSE);
        let lent = lend(&conn, max_inbound).await;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.dead.load(Ordering::Acquire));
        conns.push(conn);
        lent.ok_or_else(|| "the session connection was lost".to_owned())
    }

    /// A channel of a live connection with room, if there is one.
    async fn try_lend(&self, max_inbound: usize) -> Option<Chan> {
        loop {
            let pick = {
                let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
                conns
                    .iter()
                    .find(|c| {
                        !c.dead.load(Ordering::Acquire)
                            && c.used.load(Ordering::Acquire) < c.capacity
                    })
                    .map(|c| Conn {
                        tx: c.tx.clone(),
                        room: Arc::clone(&c.room),
                        used: Arc::clone(&c.used),
                        dead: Arc::clone(&c.dead),
                        frame_max: c.frame_max,
                        capacity: c.capacity,
                    })
            }?;
            if let Some(chan) = lend(&pick, max_inbound).await {
                return Some(chan);
            }
            // Full or gone meanwhile: the next one.
            if !pick.dead.load(Ordering::Acquire) {
                return None;
            }
        }
    }
}

/// Starts the task of a connection (`t`, set up) that closes it after `idle_close` with no
/// channel lent.
fn start(t: Transport, idle_close: Duration) -> Conn {
    let (tx, rx) = mpsc::unbounded_channel();
    let room = Arc::new(Semaphore::new(INBOX_BYTES));
    let used = Arc::new(AtomicUsize::new(0));
    let dead = Arc::new(AtomicBool::new(false));
    let frame_max = t.frame_max;
    let capacity = capacity(t.channel_max);
    let task = ConnTask {
        t,
        routes: HashMap::new(),
        free: (FIRST..).take(capacity).collect(),
        confirms: VecDeque::new(),
        next_tag: 1,
        used: Arc::clone(&used),
        room: Arc::clone(&room),
        idle_since: Some(Instant::now()),
        idle_close,
    };
    let dead2 = Arc::clone(&dead);
    tokio::spawn(async move {
        let room = Arc::clone(&task.room);
        let why = task.run(rx).await;
        dead2.store(true, Ordering::Release);
        // Sessions waiting for room learn that the connection is gone.
        room.close();
        match why {
            End::Idle => debug!("idle session connection closed"),
            End::Lost(why) => {
                warn!(%why, "session connection lost: its persistent clients are disconnected")
            }
        }
    });
    Conn { tx, room, used, dead, frame_max, capacity }
}

/// Channels a connection lends under the broker's `channel_max` (0: not negotiated, as in
/// the tests: no limit).
fn capacity(channel_max: u16) -> usize {
    match channel_max {
        0 => PER_CONNECTION,
        max => usize::from(max.saturating_sub(FIRST - 1)).min(PER_CONNECTION),
    }
}

/// Asks `conn` for a channel: `None` when it is full or gone.
async fn lend(conn: &Conn, max_inbound: usize) -> Option<Chan> {
    let (reply, got) = oneshot::channel();
    conn.tx.send(ToConn::Open { reply, max_inbound }).ok()?;
    let (ch, rx, held) = got.await.ok()??;
    Some(Chan {
        ch,
        wbuf: BytesMut::new(),
        frame_max: conn.frame_max,
        tx: conn.tx.clone(),
        room: Arc::clone(&conn.room),
        rx,
        held,
        open: true,
        next_tag: 1,
    })
}

/// The connection is gone (as a session sees it).
fn lost<T>(_: T) -> String {
    "the session connection was lost".to_owned()
}

/// A session's channel of a shared connection. Dropping it closes the channel (what it had
/// delivered and not acknowledged goes back to the queue).
pub(super) struct Chan {
    /// Its number.
    pub(super) ch: u16,
    /// Frames encoded and not yet handed to the connection.
    pub(super) wbuf: BytesMut,
    /// Largest frame for the record publishes.
    pub(super) frame_max: u32,
    tx: mpsc::UnboundedSender<ToConn>,
    /// Its connection's budget for what sessions hand it.
    room: Arc<Semaphore>,
    /// What the broker sent on the channel, and the confirms of its records (with their cost).
    rx: Inbound,
    /// The cost of what `rx` holds (the connection charges it, `recv` gives it back).
    held: Arc<AtomicUsize>,
    /// Open as far as this side knows (`false` once the broker closed it and close-ok went).
    open: bool,
    /// The session's own tag of its next record.
    next_tag: u64,
}

impl Chan {
    /// Hands what was encoded to the connection, once its budget has room. `Err`: the
    /// connection is gone.
    pub(super) async fn flush(&mut self) -> Result<(), String> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        // Charged first: a flush given up while it waits leaves the frames in `wbuf`.
        let cost = self.charge(self.wbuf.len()).await?;
        let bytes = self.wbuf.split().freeze();
        self.tx.send(ToConn::Write { bytes, cost }).map_err(lost)
    }

    /// Takes `len` bytes' worth of the connection's budget (at least [`MIN_COST`], at most
    /// all of it), waiting for room.
    async fn charge(&self, len: usize) -> Result<u32, String> {
        let cost = len.clamp(MIN_COST, INBOX_BYTES) as u32;
        self.room.acquire_many(cost).await.map_err(lost)?.forget();
        Ok(cost)
    }

    /// The next frame for this channel. `Err`: the connection is gone, or it closed the
    /// channel for holding more than its bound.
    pub(super) async fn recv(&mut self) -> Result<ConsumerFrame, String> {
        let (cost, frame) = self.rx.recv().await.ok_or_else(|| lost(()))?;
        self.held.fetch_sub(cost as usize, Ordering::AcqRel);
        Ok(frame)
    }

    /// The broker closed the channel: close-ok (the channel stays this session's).
    pub(super) fn closed_by_broker(&mut self) {
        methods::channel_close_ok(&mut self.wbuf, self.ch);
        self.open = false;
    }

    /// Opens the channel again after the broker closed it.
    pub(super) fn reopen(&mut self) {
        methods::channel_open(&mut self.wbuf, self.ch);
        self.open = true;
    }

    /// Publishes a record (encoded by `encode` on [`RECORD_CHANNEL`]); its confirm comes back
    /// as `basic.ack`/`basic.nack` on [`RECORD_CHANNEL`] with the returned tag.
    pub(super) async fn publish(
        &mut self,
        encode: impl FnOnce(&mut BytesMut, u32) -> Result<(), String>,
    ) -> Result<u64, String> {
        // What the channel encoded before goes first.
        self.flush().await?;
        let mut buf = BytesMut::new();
        encode(&mut buf, self.frame_max)?;
        let cost = self.charge(buf.len()).await?;
        let tag = self.next_tag;
        self.next_tag += 1;
        let msg = ToConn::Publish { ch: self.ch, tag, bytes: buf.freeze(), cost };
        self.tx.send(msg).map_err(lost)?;
        Ok(tag)
    }
}

impl Drop for Chan {
    fn drop(&mut self) {
        let tail = self.wbuf.split().freeze();
        let _ = self.tx.send(ToConn::Done { ch: self.ch, open: self.open, tail });
    }
}

/// Where a lent channel stands in its connection.
enum Route {
    /// Its session's inbound, the cost it holds, and its bound.
    Lent { tx: mpsc::UnboundedSender<(u32, ConsumerFrame)>, held: Arc<AtomicUsize>, max: usize },
    /// Its session ended and `channel.close` went: waiting for the close-ok.
    Closing,
}

/// The task of one shared connection.
struct ConnTask {
    t: Transport,
    routes: HashMap<u16, Route>,
    /// Channels free to lend.
    free: VecDeque<u16>,
    /// Records published and not yet confirmed, in order: (connection tag, channel, its tag).
    confirms: VecDeque<(u64, u16, u64)>,
    next_tag: u64,
    used: Arc<AtomicUsize>,
    /// The budget for what sessions hand this connection: given back as it is taken.
    room: Arc<Semaphore>,
    /// Since when no channel is lent (`None`: some are).
    idle_since: Option<Instant>,
    /// Closed after this long with no channel lent.
    idle_close: Duration,
}

/// Why a connection's task ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// Closed after [`IDLE_CLOSE`] with no channel lent.
    Idle,
    /// Lost, or closed as the node stopped: the reason.
    Lost(String),
}

impl ConnTask {
    /// Runs until the connection is lost (its reason) or no session can reach it any more.
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ToConn>) -> End {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let want_write = self.t.has_pending_writes();
            // Nothing more is taken from the sessions while the broker does not read.
            let take = self.t.wbuf.len() < WBUF_MAX;
            let res = tokio::select! {
                biased;
                r = self.t.stream.readable() => match r {
                    Ok(()) => self.on_readable(),
                    Err(e) => Err(format!("read failed: {e}")),
                },
                msg = rx.recv(), if take => match msg {
                    Some(msg) => {
                        self.on_msg(msg);
                        // A burst of acks and closes goes out in one write.
                        while self.t.wbuf.len() < WBUF_MAX {
                            let Ok(msg) = rx.try_recv() else { break };
                            self.on_msg(msg);
                        }
                        Ok(())
                    }
                    None => {
                        self.close("mqgate stopping").await;
                        return End::Lost("the node stopped".into());
                    }
                },
                r = self.t.stream.writable(), if want_write => match r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(format!("write failed: {e}")),
                },
                _ = tick.tick() => self.on_tick(),
            };
            if let Err(why) = res {
                return End::Lost(why);
            }
            if let Err(e) = self.t.try_flush() {
                return End::Lost(format!("write failed: {e}"));
            }
            self.idle_since =
                match (self.routes.is_empty() && self.confirms.is_empty(), self.idle_since) {
                    (false, _) => None,
                    (true, None) => Some(Instant::now()),
                    (true, since) => since,
                };
            if self.idle_since.is_some_and(|s| s.elapsed() >= self.idle_close) {
                // Out of the pool: a session asking meanwhile is refused and opens another.
                self.used.store(usize::MAX, Ordering::Release);
                rx.close();
                while let Ok(msg) = rx.try_recv() {
                    if let ToConn::Open { reply, .. } = msg {
                        let _ = reply.send(None);
                    }
                }
                self.close("idle").await;
                return End::Idle;
            }
        }
    }

    fn on_msg(&mut self, msg: ToConn) {
        match msg {
            ToConn::Open { reply, max_inbound } => {
                let Some(ch) = self.free.pop_front() else {
                    let _ = reply.send(None);
                    return;
                };
                let (tx, rx) = mpsc::unbounded_channel();
                let held = Arc::new(AtomicUsize::new(0));
                if reply.send(Some((ch, rx, Arc::clone(&held)))).is_err() {
                    self.free.push_front(ch);
                    return;
                }
                methods::channel_open(&mut self.t.wbuf, ch);
                self.routes.insert(ch, Route::Lent { tx, held, max: max_inbound });
                self.used.fetch_add(1, Ordering::AcqRel);
            }
            ToConn::Write { bytes, cost } => {
                self.t.wbuf.extend_from_slice(&bytes);
                self.room.add_permits(cost as usize);
            }
            ToConn::Publish { ch, tag, bytes, cost } => {
                self.t.wbuf.extend_from_slice(&bytes);
                self.room.add_permits(cost as usize);
                self.confirms.push_back((self.next_tag, ch, tag));
                self.next_tag += 1;
            }
            ToConn::Done { ch, open, tail } => match self.routes.get(&ch) {
                Some(Route::Lent { .. }) if open => {
                    self.t.wbuf.extend_from_slice(&tail);
                    methods::channel_close(&mut self.t.wbuf, ch, REPLY_SUCCESS, "session ended");
                    self.routes.insert(ch, Route::Closing);
                }
                // Closed here already (past its bound): its close-ok frees it.
                Some(Route::Closing) => {}
                _ => self.release(ch),
            },
        }
    }

    /// A channel is free again.
    fn release(&mut self, ch: u16) {
        if self.routes.remove(&ch).is_some() {
            self.free.push_back(ch);
            self.used.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn on_readable(&mut self) -> Result<(), String> {
        if !self.t.try_fill().map_err(|e| format!("read failed: {e}"))? {
            return Err("the broker closed the connection".into());
        }
        loop {
            let before = self.t.buffered();
            let Some(frame) = self.t.next_consumer_frame().map_err(|e| e.to_string())? else {
                return Ok(());
            };
            let size = before.saturating_sub(self.t.buffered());
            self.on_frame(frame, size)?;
        }
    }

    /// A frame of `size` bytes on the wire.
    fn on_frame(&mut self, frame: ConsumerFrame, size: usize) -> Result<(), String> {
        let ch = match &frame {
            ConsumerFrame::Heartbeat => return Ok(()),
            ConsumerFrame::Method { channel, .. }
            | ConsumerFrame::Header { channel, .. }
            | ConsumerFrame::Body { channel, .. } => *channel,
        };
        match (ch, frame) {
            (0, ConsumerFrame::Method { method, .. }) => match method {
                ConsumerMethod::Common(Method::ConnectionClose(c)) => {
                    methods::connection_close_ok(&mut self.t.wbuf);
                    let _ = self.t.try_flush();
                    Err(format!("the broker closed the connection: {}", describe(&c)))
                }
                other => {
                    debug!(?other, "session connection: method ignored");
                    Ok(())
                }
            },
            (RECORD_CHANNEL, ConsumerFrame::Method { method, .. }) => match method {
                ConsumerMethod::Common(Method::BasicAck { tag, multiple })
                | ConsumerMethod::Common(Method::BasicNack { tag, multiple }) => {
                    let ok = matches!(method, ConsumerMethod::Common(Method::BasicAck { .. }));
                    self.on_confirm(tag, multiple, ok);
                    Ok(())
                }
                ConsumerMethod::Common(Method::ChannelClose(c)) => {
                    Err(format!("the broker closed the record channel: {}", describe(&c)))
                }
                _ => Ok(()),
            },
            (ch, frame) => {
                match self.routes.get(&ch) {
                    Some(Route::Lent { tx, held, max }) => {
                        let cost = size.max(MIN_COST);
                        if held.load(Ordering::Acquire) + cost > *max {
                            // Its session does not keep up with what its prefetch allows:
                            // the channel is closed (RabbitMQ requeues its deliveries) and
                            // the session, its inbound ended, disconnects its client.
                            warn!(
                                channel = ch,
                                bound = max,
                                "a session's channel held more than its bound: closed"
                            );
                            let why = "session fell behind its bound";
                            methods::channel_close(&mut self.t.wbuf, ch, REPLY_SUCCESS, why);
                            self.routes.insert(ch, Route::Closing);
                            return Ok(());
                        }
                        held.fetch_add(cost, Ordering::AcqRel);
                        // A session that is gone sends `Done` next.
                        let _ = tx.send((cost as u32, frame));
                    }
                    Some(Route::Closing) => match frame {
                        ConsumerFrame::Method {
                            method: ConsumerMethod::Common(Method::ChannelCloseOk),
                            ..
                        } => self.release(ch),
                        // Both sides closed at once: answered; the close-ok of ours may
                        // still come, so the channel is not lent again (a few lost at most).
                        ConsumerFrame::Method {
                            method: ConsumerMethod::Common(Method::ChannelClose(_)),
                            ..
                        } => {
                            methods::channel_close_ok(&mut self.t.wbuf, ch);
                        }
                        _ => {}
                    },
                    None => {}
                }
                Ok(())
            }
        }
    }

    /// The broker confirmed (or refused) records up to `tag`: each to its session.
    fn on_confirm(&mut self, tag: u64, multiple: bool, ok: bool) {
        let mut rest = VecDeque::with_capacity(self.confirms.len());
        while let Some((t, ch, own)) = self.confirms.pop_front() {
            if t == tag || (multiple && t < tag) {
                if let Some(Route::Lent { tx, held, .. }) = self.routes.get(&ch) {
                    let m = Method::BasicAck { tag: own, multiple: false };
                    let m = if ok { m } else { Method::BasicNack { tag: own, multiple: false } };
                    let method = ConsumerMethod::Common(m);
                    // One per record the session published: bounded by its own pattern (one
                    // record in flight), charged like any frame.
                    held.fetch_add(MIN_COST, Ordering::AcqRel);
                    let frame = ConsumerFrame::Method { channel: RECORD_CHANNEL, method };
                    let _ = tx.send((MIN_COST as u32, frame));
                }
            } else {
                rest.push_back((t, ch, own));
            }
        }
        self.confirms = rest;
    }

    fn on_tick(&mut self) -> Result<(), String> {
        crate::sources::amqp::keep_alive(&mut self.t, Instant::now())
    }

    /// Closes the connection (the node is stopping, or it was idle).
    async fn close(&mut self, reason: &str) {
        crate::sources::amqp::close_connection(&mut self.t, reason).await;
    }
}

#[cfg(test)]
mod tests {
    //! A connection task against a peer of the test's own on a real socket (the "broker"),
    //! both ends with small kernel buffers so that what the node holds shows.

    use super::*;
    use crate::targets::amqp::wire::frame;
    use bytes::BufMut;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};
    use tokio::time::timeout;

    const WAIT: Duration = Duration::from_secs(5);

    async fn conn_with_peer(idle_close: Duration) -> (Conn, TcpStream) {
        let listen = TcpSocket::new_v4().expect("socket");
        listen.set_recv_buffer_size(4096).expect("rcvbuf");
        listen.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let listener = listen.listen(1).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let sock = TcpSocket::new_v4().expect("socket");
        sock.set_send_buffer_size(4096).expect("sndbuf");
        let (ours, theirs) = tokio::join!(sock.connect(addr), listener.accept());
        let t = Transport::plain_for_test(ours.expect("connect"));
        (start(t, idle_close), theirs.expect("accept").0)
    }

    fn short(out: &mut BytesMut, s: &[u8]) {
        out.put_u8(s.len() as u8);
        out.extend_from_slice(s);
    }

    /// `basic.deliver`, its header and one body frame, as RabbitMQ sends them.
    fn deliver(out: &mut BytesMut, ch: u16, tag: u64, body: &[u8]) {
        let f = frame::begin(out, 1, ch);
        out.put_u16(60);
        out.put_u16(60);
        short(out, b"mqgate-session");
        out.put_u64(tag);
        out.put_u8(0);
        short(out, b"x");
        short(out, b"m.a");
        frame::end(out, f);
        let f = frame::begin(out, 2, ch);
        out.put_u16(60);
        out.put_u16(0);
        out.put_u64(body.len() as u64);
        out.put_u16(0);
        frame::end(out, f);
        let f = frame::begin(out, 3, ch);
        out.extend_from_slice(body);
        frame::end(out, f);
    }

    /// A method frame with no arguments the test needs (`channel.close-ok`).
    fn method(out: &mut BytesMut, ch: u16, class: u16, id: u16) {
        let f = frame::begin(out, 1, ch);
        out.put_u16(class);
        out.put_u16(id);
        frame::end(out, f);
    }

    /// Reads the peer's socket until a method frame `class.id` arrives: its channel.
    async fn read_until_method(peer: &mut TcpStream, class: u16, id: u16) -> u16 {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let mut at = 0;
            while buf.len() >= at + 7 {
                let size = u32::from_be_bytes([buf[at + 3], buf[at + 4], buf[at + 5], buf[at + 6]]);
                let end = at + 7 + size as usize + 1;
                if buf.len() < end {
                    break;
                }
                let ch = u16::from_be_bytes([buf[at + 1], buf[at + 2]]);
                let p = &buf[at + 7..];
                if buf[at] == 1
                    && size >= 4
                    && p[..4] == [(class >> 8) as u8, class as u8, (id >> 8) as u8, id as u8]
                {
                    return ch;
                }
                at = end;
            }
            buf.drain(..at);
            let n = timeout(WAIT, peer.read(&mut chunk)).await.expect("in time").expect("read");
            assert!(n > 0, "the connection closed before {class}.{id}");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn a_broker_that_stops_reading_holds_the_sessions_back_within_the_budget() {
        let (conn, mut peer) = conn_with_peer(IDLE_CLOSE).await;
        let mut a = lend(&conn, 1 << 20).await.expect("a channel");
        let mut b = lend(&conn, 1 << 20).await.expect("a channel");
        // The peer reads nothing: a session hands its frames until it is held back.
        let chunk = vec![7u8; 16 * 1024];
        let mut handed = 0usize;
        loop {
            a.wbuf.extend_from_slice(&chunk);
            let n = a.wbuf.len();
            match timeout(Duration::from_millis(300), a.flush()).await {
                Ok(r) => {
                    r.expect("the connection is there");
                    handed += n;
                }
                Err(_) => break,
            }
            assert!(handed < 64 << 20, "the session was never held back: {handed} B handed");
        }
        // What the node holds: its budget and its write buffer (the kernel's small buffers
        // and one chunk aside).
        let bound = INBOX_BYTES + WBUF_MAX + 2 * chunk.len() + (256 << 10);
        assert!(handed <= bound, "{handed} B handed, bound {bound}");
        assert!(handed >= INBOX_BYTES, "held back before the budget was used: {handed} B");
        // The other session waits as well.
        b.wbuf.extend_from_slice(b"ack");
        assert!(timeout(Duration::from_millis(300), b.flush()).await.is_err());
        // Once the broker reads again, both go on.
        let reader = tokio::spawn(async move {
            let mut sink = vec![0u8; 256 * 1024];
            let mut total = 0usize;
            while let Ok(Ok(n)) = timeout(Duration::from_secs(2), peer.read(&mut sink)).await {
                if n == 0 {
                    break;
                }
                total += n;
            }
            total
        });
        timeout(WAIT, a.flush()).await.expect("a goes on").expect("connection");
        timeout(WAIT, b.flush()).await.expect("b goes on").expect("connection");
        drop((a, b));
        let total = reader.await.expect("reader");
        assert!(total >= handed + chunk.len(), "the broker got {total} B of {handed}");
    }

    #[tokio::test]
    async fn a_channel_whose_session_does_not_take_its_frames_is_closed_at_its_bound() {
        let (conn, mut peer) = conn_with_peer(IDLE_CLOSE).await;
        let bound = 64 << 10;
        let mut slow = lend(&conn, bound).await.expect("a channel");
        let mut other = lend(&conn, bound).await.expect("a channel");
        // The broker delivers 10 × 16 KiB on the slow session's channel, then one message on
        // the other's; the slow session takes nothing meanwhile.
        let mut out = BytesMut::new();
        for tag in 1..=10 {
            deliver(&mut out, slow.ch, tag, &[7u8; 16 * 1024]);
        }
        deliver(&mut out, other.ch, 1, b"hello");
        let writer = tokio::spawn(async move {
            peer.write_all(&out).await.expect("write");
            peer
        });
        let first = timeout(WAIT, other.recv()).await.expect("in time").expect("frame");
        assert!(matches!(first, ConsumerFrame::Method { method: ConsumerMethod::Deliver(_), .. }));
        let mut peer = writer.await.expect("writer");
        let closed = read_until_method(&mut peer, 20, 40).await;
        assert_eq!(closed, slow.ch, "the slow session's channel is closed");
        // The slow session gets what fitted its bound, then learns its channel is gone.
        let mut got = 0usize;
        loop {
            match timeout(WAIT, slow.recv()).await.expect("in time") {
                Ok(ConsumerFrame::Body { bytes, .. }) => got += bytes.len(),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        assert!(got <= bound && got >= bound / 2, "{got} B of body taken, bound {bound}");
        // The other session is untouched.
        other.wbuf.extend_from_slice(b"x");
        timeout(WAIT, other.flush()).await.expect("in time").expect("still connected");
        assert!(!conn.dead.load(Ordering::Acquire));
    }

    #[test]
    fn a_broker_allowing_fewer_channels_gets_fewer_sessions_per_connection() {
        assert_eq!(capacity(0), PER_CONNECTION);
        assert_eq!(capacity(2047), PER_CONNECTION);
        assert_eq!(capacity(u16::MAX), PER_CONNECTION);
        // Channels 1 and 2 are the connection's own: 3..=128 are lent.
        assert_eq!(capacity(128), 126);
        assert_eq!(capacity(2), 0);
        assert_eq!((FIRST..).take(capacity(128)).last(), Some(128));
    }

    #[tokio::test]
    async fn a_connection_with_no_channel_lent_is_closed_after_a_while() {
        let (conn, mut peer) = conn_with_peer(Duration::from_millis(300)).await;
        let chan = lend(&conn, 1 << 20).await.expect("a channel");
        let ch = chan.ch;
        drop(chan);
        assert_eq!(read_until_method(&mut peer, 20, 40).await, ch, "its channel is closed");
        // Not idle until the broker's close-ok frees the channel.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!conn.dead.load(Ordering::Acquire));
        let mut out = BytesMut::new();
        method(&mut out, ch, 20, 41);
        peer.write_all(&out).await.expect("write");
        assert_eq!(read_until_method(&mut peer, 10, 50).await, 0, "connection.close");
        let mut out = BytesMut::new();
        method(&mut out, 0, 10, 51);
        peer.write_all(&out).await.expect("write");
        let gone = async {
            while !conn.dead.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        timeout(WAIT, gone).await.expect("the task ended");
        assert!(lend(&conn, 1 << 20).await.is_none(), "nothing is lent from it any more");
    }
}
