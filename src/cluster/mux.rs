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
//! (or gone), the next session opens a new one.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::targets::amqp::transport::{self, describe, Transport, Uri};
use crate::targets::amqp::wire::consume::{ConsumerFrame, ConsumerMethod};
use crate::targets::amqp::wire::methods::{self, Method, REPLY_SUCCESS};

/// The shared confirm-mode channel the sessions' records are published on; the sessions see
/// their confirms as arriving on it.
pub(super) const RECORD_CHANNEL: u16 = 1;
/// The first channel lent to a session (`transport::connect` opens 1 and 2).
const FIRST: u16 = 3;
/// Sessions on one connection at most (RabbitMQ's default `channel_max` is 2047).
pub(super) const PER_CONNECTION: usize = 1000;
/// How often heartbeats are looked at.
const TICK: Duration = Duration::from_millis(250);

/// What a session asks its connection.
enum ToConn {
    /// Lend a channel (opened: `channel.open` is written; its session awaits the open-ok).
    Open { reply: oneshot::Sender<Option<(u16, mpsc::UnboundedReceiver<ConsumerFrame>)>> },
    /// Frames a session encoded on its channel.
    Write(Bytes),
    /// A record encoded on [`RECORD_CHANNEL`]: its confirm goes to `ch` with `tag`.
    Publish { ch: u16, tag: u64, bytes: Bytes },
    /// The session ended: close its channel (`open`) or just forget it (the broker closed it).
    Done { ch: u16, open: bool },
}

/// One shared connection as the pool holds it.
struct Conn {
    tx: mpsc::UnboundedSender<ToConn>,
    /// Channels lent (and not yet given back).
    used: Arc<AtomicUsize>,
    /// Set when the connection's task ended.
    dead: Arc<AtomicBool>,
    /// Its largest frame (records are split to it).
    frame_max: u32,
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
    pub(super) async fn channel(
        &self,
        uri: &Uri,
        security: &transport::Security,
    ) -> Result<Chan, String> {
        if let Some(c) = self.try_lend().await {
            return Ok(c);
        }
        let _one = self.opening.lock().await;
        if let Some(c) = self.try_lend().await {
            return Ok(c);
        }
        let n = self.conns.lock().unwrap_or_else(|p| p.into_inner()).len();
        let name = format!("sessions/{n}");
        let link = transport::connect(uri, security, &name, 1).await.map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::unbounded_channel();
        let used = Arc::new(AtomicUsize::new(0));
        let dead = Arc::new(AtomicBool::new(false));
        let frame_max = link.transport.frame_max;
        let task = ConnTask {
            t: link.transport,
            routes: HashMap::new(),
            free: (FIRST..FIRST + PER_CONNECTION as u16).collect(),
            confirms: VecDeque::new(),
            next_tag: 1,
            used: Arc::clone(&used),
        };
        let dead2 = Arc::clone(&dead);
        tokio::spawn(async move {
            let why = task.run(rx).await;
            dead2.store(true, Ordering::Release);
            warn!(%why, "session connection lost: its persistent clients are disconnected");
        });
        let conn = Conn { tx, used, dead, frame_max };
        let lent = lend(&conn).await;
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.retain(|c| !c.dead.load(Ordering::Acquire));
        conns.push(conn);
        lent.ok_or_else(|| "the session connection was lost".to_owned())
    }

    /// A channel of a live connection with room, if there is one.
    async fn try_lend(&self) -> Option<Chan> {
        loop {
            let pick = {
                let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
                conns
                    .iter()
                    .find(|c| {
                        !c.dead.load(Ordering::Acquire)
                            && c.used.load(Ordering::Acquire) < PER_CONNECTION
                    })
                    .map(|c| Conn {
                        tx: c.tx.clone(),
                        used: Arc::clone(&c.used),
                        dead: Arc::clone(&c.dead),
                        frame_max: c.frame_max,
                    })
            }?;
            if let Some(chan) = lend(&pick).await {
                return Some(chan);
            }
            // Full or gone meanwhile: the next one.
            if !pick.dead.load(Ordering::Acquire) {
                return None;
            }
        }
    }
}

/// Asks `conn` for a channel: `None` when it is full or gone.
async fn lend(conn: &Conn) -> Option<Chan> {
    let (reply, got) = oneshot::channel();
    conn.tx.send(ToConn::Open { reply }).ok()?;
    let (ch, rx) = got.await.ok()??;
    Some(Chan {
        ch,
        wbuf: BytesMut::new(),
        frame_max: conn.frame_max,
        tx: conn.tx.clone(),
        rx,
        open: true,
        next_tag: 1,
    })
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
    /// What the broker sent on the channel, and the confirms of its records.
    rx: mpsc::UnboundedReceiver<ConsumerFrame>,
    /// Open as far as this side knows (`false` once the broker closed it and close-ok went).
    open: bool,
    /// The session's own tag of its next record.
    next_tag: u64,
}

impl Chan {
    /// Hands what was encoded to the connection. `Err`: the connection is gone.
    pub(super) fn flush(&mut self) -> Result<(), String> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let bytes = self.wbuf.split().freeze();
        self.tx.send(ToConn::Write(bytes)).map_err(|_| "the session connection was lost".into())
    }

    /// The next frame for this channel. `Err`: the connection is gone.
    pub(super) async fn recv(&mut self) -> Result<ConsumerFrame, String> {
        self.rx.recv().await.ok_or_else(|| "the session connection was lost".to_owned())
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
    pub(super) fn publish(
        &mut self,
        encode: impl FnOnce(&mut BytesMut, u32) -> Result<(), String>,
    ) -> Result<u64, String> {
        // What the channel encoded before goes first.
        self.flush()?;
        let mut buf = BytesMut::new();
        encode(&mut buf, self.frame_max)?;
        let tag = self.next_tag;
        self.next_tag += 1;
        let msg = ToConn::Publish { ch: self.ch, tag, bytes: buf.freeze() };
        self.tx.send(msg).map_err(|_| "the session connection was lost".to_owned())?;
        Ok(tag)
    }
}

impl Drop for Chan {
    fn drop(&mut self) {
        let _ = self.flush();
        let _ = self.tx.send(ToConn::Done { ch: self.ch, open: self.open });
    }
}

/// Where a lent channel stands in its connection.
enum Route {
    /// Its session's inbound.
    Lent(mpsc::UnboundedSender<ConsumerFrame>),
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
}

impl ConnTask {
    /// Runs until the connection is lost (its reason) or no session can reach it any more.
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<ToConn>) -> String {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let want_write = self.t.has_pending_writes();
            let res = tokio::select! {
                biased;
                r = self.t.stream.readable() => match r {
                    Ok(()) => self.on_readable(),
                    Err(e) => Err(format!("read failed: {e}")),
                },
                msg = rx.recv() => match msg {
                    Some(msg) => {
                        self.on_msg(msg);
                        // A burst of acks and closes goes out in one write.
                        while let Ok(msg) = rx.try_recv() {
                            self.on_msg(msg);
                        }
                        Ok(())
                    }
                    None => {
                        self.close().await;
                        return "the node stopped".into();
                    }
                },
                r = self.t.stream.writable(), if want_write => match r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(format!("write failed: {e}")),
                },
                _ = tick.tick() => self.on_tick(),
            };
            if let Err(why) = res {
                return why;
            }
            if let Err(e) = self.t.try_flush() {
                return format!("write failed: {e}");
            }
        }
    }

    fn on_msg(&mut self, msg: ToConn) {
        match msg {
            ToConn::Open { reply } => {
                let Some(ch) = self.free.pop_front() else {
                    let _ = reply.send(None);
                    return;
                };
                let (tx, rx) = mpsc::unbounded_channel();
                if reply.send(Some((ch, rx))).is_err() {
                    self.free.push_front(ch);
                    return;
                }
                methods::channel_open(&mut self.t.wbuf, ch);
                self.routes.insert(ch, Route::Lent(tx));
                self.used.fetch_add(1, Ordering::AcqRel);
            }
            ToConn::Write(bytes) => self.t.wbuf.extend_from_slice(&bytes),
            ToConn::Publish { ch, tag, bytes } => {
                self.t.wbuf.extend_from_slice(&bytes);
                self.confirms.push_back((self.next_tag, ch, tag));
                self.next_tag += 1;
            }
            ToConn::Done { ch, open } => {
                if open {
                    methods::channel_close(&mut self.t.wbuf, ch, REPLY_SUCCESS, "session ended");
                    self.routes.insert(ch, Route::Closing);
                } else {
                    self.release(ch);
                }
            }
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
        while let Some(frame) = self.t.next_consumer_frame().map_err(|e| e.to_string())? {
            self.on_frame(frame)?;
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: ConsumerFrame) -> Result<(), String> {
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
                    Some(Route::Lent(tx)) => {
                        // A session that is gone sends `Done` next.
                        let _ = tx.send(frame);
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
                if let Some(Route::Lent(tx)) = self.routes.get(&ch) {
                    let m = Method::BasicAck { tag: own, multiple: false };
                    let m = if ok { m } else { Method::BasicNack { tag: own, multiple: false } };
                    let method = ConsumerMethod::Common(m);
                    let _ = tx.send(ConsumerFrame::Method { channel: RECORD_CHANNEL, method });
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

    /// Closes the connection (the node is stopping).
    async fn close(&mut self) {
        crate::sources::amqp::close_connection(&mut self.t, "mqgate stopping").await;
    }
}
