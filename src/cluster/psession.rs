//! A persistent session's durable queue in RabbitMQ, so that the session moves with its client
//! between the nodes of a cluster and outlives a node that dies (docs/cluster.md, "Persistent
//! sessions move between nodes").
//!
//! Each persistent session (MQTT 5 Session Expiry Interval > 0, 3.1.1 clean session 0) has
//! the durable queue `{prefix}.session.{h}` and the durable record queue
//! `{prefix}.sessionrec.{h}` (`h`: 32 hex digits of the SHA-256 of the client id). The
//! session queue is bound on the cluster's exchange with its subscriptions' coarse keys (live
//! and retained) for the session's whole life, so every message forwarded while the client is
//! away lands in it; `x-expires` (the session's expiry), `x-max-length` and
//! `x-max-length-bytes` (the session's queue limits; RabbitMQ drops the oldest) bound it. The
//! record queue (`x-max-length` 1: the newest wins) holds the session's record (filters with
//! their options, protocol, expiry, owner: `broker::persist::SessionRecord`), published with
//! a confirm before a SUBACK or UNSUBACK goes.
//!
//! The node where the client is connected runs one task per such session on a channel of its
//! own of a shared AMQP connection (`mux`): it consumes the session queue (exclusive consumer: one node at a time), hands
//! each message to `Broker::deliver_queued` (an exact match against the session's own
//! subscriptions) with a ticket, and acknowledges the delivery to RabbitMQ once every ticket
//! of it is finished (the client PUBACKed or PUBCOMPed, a QoS 0 message was written, or it
//! matched nothing). When the connection ends the task closes its channel first (marked
//! `closing` before the session drops what it holds), so what the client had not
//! acknowledged goes back to the queue; a node that dies loses its connections, with the same
//! effect, and a lost shared connection disconnects the clients of every session on it. Bounded: at most `prefetch` deliveries unacknowledged, each one forwarded batch
//! (up to 64 messages, about 256 KiB); while the session's queue is full the task holds what
//! does not fit and tries again (nothing is dropped for a full queue).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::mux::{self, Chan, RECORD_CHANNEL};
use super::ClusterConfig;
use crate::broker::sessions::Expiry;
use crate::broker::tracking::{Done, Fate, Mode, Ticket, Tracker};
use crate::broker::{Broker, Queued};
use crate::config::AmqpBrokerConfig;
use crate::sources::acks::Acks;
use crate::targets::amqp::transport::{self, describe, Uri};
use crate::targets::amqp::wire::consume::{self, ConsumerFrame, ConsumerMethod};
use crate::targets::amqp::wire::methods::{self, Method, Properties, QueueFlags};
use crate::targets::amqp::wire::table::Value;
use crate::targets::{Failure, Outcome};

/// Between two attempts to consume while another node's consumer is still there.
const CONSUME_RETRY: Duration = Duration::from_millis(50);
/// How long a consumer of another node may hold the queue before this one gives up.
const CONSUME_PATIENCE: Duration = Duration::from_secs(10);
/// Bytes of one forwarded batch, about (the link closes a batch at 256 KiB).
const BATCH_BYTES: usize = 256 * 1024;
/// While the session's queue is full: how often the held messages are tried again.
const STALL_RETRY: Duration = Duration::from_millis(10);

/// Where the session queues are: the cluster's broker and names.
#[derive(Debug, Default)]
pub(super) struct Settings {
    /// The broker's URL (with credentials: never logged).
    url: String,
    /// TLS and SASL of the broker.
    security: transport::Security,
    /// The cluster's topic exchange.
    exchange: String,
    /// The cluster's prefix.
    prefix: String,
    /// Time allowed for connecting and the setup.
    connect_timeout: Duration,
    /// The shared connections the sessions' channels are on.
    pool: mux::Pool,
}

impl Settings {
    pub(super) fn new(cfg: &ClusterConfig, broker: &AmqpBrokerConfig) -> Settings {
        Settings {
            url: broker.url.value.clone(),
            security: broker.security(),
            exchange: cfg.exchange(),
            prefix: cfg.prefix.value.clone(),
            connect_timeout: broker.connect_timeout.0,
            pool: mux::Pool::default(),
        }
    }

    /// The session queue and the record queue of `client_id`.
    pub(super) fn names(&self, client_id: &str) -> (String, String) {
        let h = hash(client_id);
        (format!("{}.session.{h}", self.prefix), format!("{}.sessionrec.{h}", self.prefix))
    }
}

/// 32 hex digits of the SHA-256 of `s`.
fn hash(s: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let digest = Sha256::digest(s.as_bytes());
    let mut h = String::with_capacity(32);
    for b in &digest[..16] {
        let _ = write!(h, "{b:02x}");
    }
    h
}

/// How a session's queue is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// A new session (clean start): an old queue and record are deleted first.
    Fresh,
    /// A session this node kept parked: its queue is there (declared again if it expired).
    Local,
    /// A session another node may have kept: present if its queue exists; its record is read.
    Resume,
}

/// The limits of a session's queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The session's expiry (`x-expires`).
    pub expiry: Expiry,
    /// `mqtt.max_queued_messages` (`x-max-length`; the prefetch is derived from it).
    pub max_messages: usize,
    /// `mqtt.max_queued_bytes` (`x-max-length-bytes`).
    pub max_bytes: usize,
    /// `mqtt.max_packet_size`: a forwarded batch holds at most one message past its size.
    pub max_message: usize,
    /// The largest record the session can have (its filters at their longest).
    pub max_record: usize,
}

impl Limits {
    /// Deliveries of the session queue unacknowledged at most: what the task holds at most is
    /// `prefetch` deliveries of a batch each while the session's queue has no room for them.
    fn prefetch(&self) -> u16 {
        let by_count = self.max_messages / 16;
        let by_bytes = self.max_bytes / BATCH_BYTES;
        by_count.min(by_bytes).clamp(1, 256) as u16
    }

    /// Bytes the broker may send the session's channel before the session takes them: its
    /// deliveries (a batch, one message past it at most, and the frames' overhead), and its
    /// replies and record.
    fn max_inbound(&self) -> usize {
        let delivery = BATCH_BYTES + self.max_message + 4096;
        usize::from(self.prefetch()) * delivery + self.max_record + (1 << 20)
    }
}

/// What opening a session's queue found.
#[derive(Debug)]
pub struct Opened {
    /// The session existed: its queue was there (or it was parked here).
    pub present: bool,
    /// Its record, read from the record queue (`Open::Resume` only).
    pub record: Option<Vec<u8>>,
}

/// A request to a session's task.
#[derive(Debug)]
pub(super) enum Cmd {
    /// The session's subscriptions changed: bind the queue with exactly `keys` (binding keys
    /// of its filters) and write `record`; `reply` once bound and confirmed.
    Update { keys: Vec<String>, record: Vec<u8>, reply: Option<oneshot::Sender<Outcome>> },
    /// The session's subscriptions are in place: consume.
    Start,
}

/// A session task as its node holds it.
#[derive(Debug)]
pub(super) struct Handle {
    /// Requests (a handful per SUBSCRIBE; unbounded, the session waits for each reply).
    pub tx: mpsc::UnboundedSender<Cmd>,
    /// Set before the session drops the deliveries it holds: they are not acknowledged.
    pub closing: Arc<AtomicBool>,
    /// Ends the task (its channel closes: unacknowledged deliveries go back).
    pub cancel: CancellationToken,
    /// The session's client id.
    pub client_id: Arc<str>,
    /// Its expiry interval and binding keys as last announced to the other nodes.
    pub announced: Option<(u32, Vec<String>)>,
}

/// Starts the task of `client_id`'s session `session_id`; the receiver tells what opening the
/// queue found (or why it could not).
pub(super) fn spawn(
    s: Arc<Settings>,
    broker: Arc<Broker>,
    (client_id, session_id): (Arc<str>, u64),
    open: Open,
    limits: Limits,
) -> (Handle, oneshot::Receiver<Result<Opened, String>>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (reply, opened) = oneshot::channel();
    let closing = Arc::new(AtomicBool::new(false));
    let cancel = CancellationToken::new();
    let handle = Handle {
        tx,
        closing: Arc::clone(&closing),
        cancel: cancel.clone(),
        client_id: Arc::clone(&client_id),
        announced: None,
    };
    tokio::spawn(async move {
        let setup = tokio::time::timeout(s.connect_timeout, setup(&s, &client_id, open, &limits));
        let setup = tokio::select! {
            () = cancel.cancelled() => return,
            r = setup => r,
        };
        let (t, found) = match setup {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                let _ = reply.send(Err(e));
                return;
            }
            Err(_) => {
                let _ = reply.send(Err(format!("no session queue within {:?}", s.connect_timeout)));
                return;
            }
        };
        let (queue, record) = s.names(&client_id);
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let prefetch = limits.prefetch();
        let mut q = SessionQueue {
            t,
            s: &s,
            queue,
            record,
            broker: &broker,
            client_id: &client_id,
            session_id,
            closing: &closing,
            bound: HashSet::new(),
            updates: VecDeque::new(),
            start: Start::NotAsked,
            assembly: None,
            acks: Acks::default(),
            backlog: VecDeque::new(),
            report_tx,
            report_rx,
            prefetch,
        };
        if reply.send(Ok(found)).is_err() {
            // The handshake gave up: the channel closes as `q` is dropped.
            return;
        }
        if let Some(reason) = q.run(rx, &cancel).await {
            if !closing.load(Ordering::Acquire) {
                warn!(client_id = %crate::logtext::LogText(&client_id), %reason, "session queue lost: the client is disconnected");
                broker.disconnect_client(&client_id);
            }
        }
    });
    (handle, opened)
}

/// A channel's answer: the method, or the broker's reason for closing the channel (close-ok
/// sent). `Err`: the connection is lost.
async fn answer(
    t: &mut Chan,
    want: impl Fn(&ConsumerMethod) -> bool,
) -> Result<Result<ConsumerMethod, String>, String> {
    t.flush().await?;
    loop {
        match t.recv().await? {
            ConsumerFrame::Method { channel, method } if channel == t.ch && want(&method) => {
                return Ok(Ok(method))
            }
            ConsumerFrame::Method {
                channel,
                method: ConsumerMethod::Common(Method::ChannelClose(c)),
            } if channel == t.ch => {
                t.closed_by_broker();
                t.flush().await?;
                return Ok(Err(describe(&c)));
            }
            _ => {}
        }
    }
}

/// Opens the session's channel again after the broker closed it.
async fn reopen(t: &mut Chan) -> Result<(), String> {
    t.reopen();
    answer(t, |m| matches!(m, ConsumerMethod::Common(Method::ChannelOpenOk))).await?.map(|_| ())
}

/// Deletes `queue` (there or not).
async fn delete(t: &mut Chan, queue: &str) -> Result<(), String> {
    methods::queue_delete(&mut t.wbuf, t.ch, queue).map_err(|e| e.to_string())?;
    let deleted = |m: &ConsumerMethod| {
        matches!(m, ConsumerMethod::Common(Method::Other { class: 50, method: 41 }))
    };
    match answer(t, deleted).await? {
        Ok(_) => Ok(()),
        Err(e) => {
            reopen(t).await?;
            Err(format!("cannot delete {queue}: {e}"))
        }
    }
}

/// Declares `queue` durable with `args`; one that exists with other arguments (a session
/// resumed with another expiry) is kept as it is.
async fn declare(t: &mut Chan, queue: &str, args: &[(&str, Value<'_>)]) -> Result<(), String> {
    let declared = |m: &ConsumerMethod| matches!(m, ConsumerMethod::QueueDeclareOk { .. });
    let flags = QueueFlags { durable: true, ..QueueFlags::default() };
    methods::queue_declare(&mut t.wbuf, t.ch, queue, flags, args).map_err(|e| e.to_string())?;
    match answer(t, declared).await? {
        Ok(_) => Ok(()),
        Err(e) if e.starts_with("406") => {
            reopen(t).await?;
            let passive = QueueFlags { passive: true, ..QueueFlags::default() };
            methods::queue_declare(&mut t.wbuf, t.ch, queue, passive, &[])
                .map_err(|e| e.to_string())?;
            answer(t, declared).await?.map(|_| ())
        }
        Err(e) => Err(format!("cannot declare {queue}: {e}")),
    }
}

/// Reads one message's content (header and body frames) on `ch`.
async fn content(t: &mut Chan) -> Result<Vec<u8>, String> {
    let mut size = None;
    let mut body = Vec::new();
    loop {
        match t.recv().await? {
            ConsumerFrame::Header { channel, body_size, .. } if channel == t.ch => {
                let n = usize::try_from(body_size).map_err(|_| "record too large")?;
                size = Some(n);
                body.reserve(n.min(1 << 20));
            }
            ConsumerFrame::Body { channel, bytes } if channel == t.ch => {
                body.extend_from_slice(&bytes);
            }
            ConsumerFrame::Method {
                channel,
                method: ConsumerMethod::Common(Method::ChannelClose(c)),
            } if channel == t.ch => {
                t.closed_by_broker();
                t.flush().await?;
                return Err(format!("the broker closed the session's channel: {}", describe(&c)));
            }
            _ => {}
        }
        if size.is_some_and(|n| body.len() >= n) {
            return Ok(body);
        }
    }
}

/// Connects, finds out whether the session exists (and its record), declares its queues.
async fn setup(
    s: &Settings,
    client_id: &str,
    open: Open,
    limits: &Limits,
) -> Result<(Chan, Opened), String> {
    let uri = s.url.parse::<Uri>().map_err(|e| format!("the broker's url: {e}"))?;
    let (queue, record) = s.names(client_id);
    let mut t = s.pool.channel(&uri, &s.security, limits.max_inbound()).await?;
    let opened = |m: &ConsumerMethod| matches!(m, ConsumerMethod::Common(Method::ChannelOpenOk));
    answer(&mut t, opened).await?.map_err(|e| format!("cannot open a channel: {e}"))?;
    let mut found = Opened { present: open == Open::Local, record: None };
    match open {
        Open::Fresh => {
            delete(&mut t, &queue).await?;
            delete(&mut t, &record).await?;
        }
        Open::Local => {}
        Open::Resume => {
            let passive = QueueFlags { passive: true, ..QueueFlags::default() };
            methods::queue_declare(&mut t.wbuf, t.ch, &queue, passive, &[])
                .map_err(|e| e.to_string())?;
            let declared = |m: &ConsumerMethod| matches!(m, ConsumerMethod::QueueDeclareOk { .. });
            match answer(&mut t, declared).await? {
                Ok(_) => found.present = true,
                Err(e) if e.starts_with("404") => reopen(&mut t).await?,
                Err(e) => return Err(format!("cannot look for {queue}: {e}")),
            }
            if found.present {
                consume::basic_get(&mut t.wbuf, t.ch, &record).map_err(|e| e.to_string())?;
                let got = |m: &ConsumerMethod| {
                    matches!(m, ConsumerMethod::GetOk(_) | ConsumerMethod::GetEmpty)
                };
                match answer(&mut t, got).await? {
                    Ok(ConsumerMethod::GetOk(tag)) => {
                        found.record = Some(content(&mut t).await?);
                        // Back into its queue: the next node to resume the session reads it.
                        consume::basic_nack(&mut t.wbuf, t.ch, tag, false, true);
                    }
                    Ok(_) => {}
                    // No record queue (expired first): a session without subscriptions.
                    Err(e) if e.starts_with("404") => reopen(&mut t).await?,
                    Err(e) => return Err(format!("cannot read {record}: {e}")),
                }
            }
        }
    }
    let expires = match limits.expiry {
        Expiry::After(secs) => Some(Value::I64(i64::from(secs.max(1)) * 1000)),
        // Resumed with expiry 0 (it ends with the connection): gone a second after its
        // consumer should the node die first.
        Expiry::Now => Some(Value::I64(1000)),
        Expiry::Never => None,
    };
    let max_len = i64::try_from(limits.max_messages.max(1)).unwrap_or(i64::MAX);
    let max_bytes = i64::try_from(limits.max_bytes).unwrap_or(i64::MAX);
    let mut args = vec![("x-max-length", Value::I64(max_len))];
    if max_bytes < i64::MAX {
        args.push(("x-max-length-bytes", Value::I64(max_bytes)));
    }
    args.extend(expires.map(|e| ("x-expires", e)));
    declare(&mut t, &queue, &args).await?;
    let mut args = vec![("x-max-length", Value::I64(1))];
    args.extend(expires.map(|e| ("x-expires", e)));
    declare(&mut t, &record, &args).await?;
    Ok((t, found))
}

/// A SUBSCRIBE's or UNSUBSCRIBE's change in progress.
struct Update {
    /// Bind-oks and unbind-oks still to come.
    oks: usize,
    /// The record's publish tag (its confirm).
    tag: u64,
    /// Confirmed (`Some(true)`), refused (`Some(false)`), or not yet.
    confirmed: Option<bool>,
    /// Told once both are in.
    reply: Option<oneshot::Sender<Outcome>>,
}

/// Where consuming stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The session's subscriptions are not in place yet.
    NotAsked,
    /// Asked: `basic.consume` is sent once no update is in progress.
    Wanted { since: Instant, at: Instant },
    /// `basic.consume` sent, not answered.
    Sent { since: Instant },
    /// Consuming.
    Consuming,
}

/// The task of one session on its connection.
struct SessionQueue<'a> {
    /// Its channel of a shared connection.
    t: Chan,
    s: &'a Settings,
    queue: String,
    record: String,
    broker: &'a Broker,
    client_id: &'a Arc<str>,
    session_id: u64,
    closing: &'a AtomicBool,
    /// Keys the queue is bound with.
    bound: HashSet<String>,
    /// Changes waiting for their bind-oks and confirm, in order.
    updates: VecDeque<Update>,
    start: Start,
    /// The delivery being assembled: its tag, its size once the header came, its body.
    assembly: Option<(u64, Option<usize>, BytesMut)>,
    /// Unsettled deliveries, for in-order multiple acks.
    acks: Acks,
    /// Deliveries not yet wholly handed to the session (its queue was full), in order: each
    /// with its root ticket and the messages left (at most `prefetch` deliveries).
    backlog: VecDeque<(Ticket, VecDeque<Arc<crate::message::Message>>)>,
    report_tx: mpsc::UnboundedSender<Done>,
    report_rx: mpsc::UnboundedReceiver<Done>,
    prefetch: u16,
}

impl SessionQueue<'_> {
    /// Runs until cancelled (`None`) or the connection or channel is lost.
    async fn run(
        &mut self,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        cancel: &CancellationToken,
    ) -> Option<String> {
        loop {
            // Changes wait while a consume is being retried (its channel may close).
            let take_cmds = matches!(self.start, Start::NotAsked | Start::Consuming);
            let res = tokio::select! {
                biased;
                // The channel closes as the task ends (after what was encoded last).
                () = cancel.cancelled() => return None,
                Some(done) = self.report_rx.recv() => {
                    self.on_report(done);
                    while let Ok(done) = self.report_rx.try_recv() {
                        self.on_report(done);
                    }
                    if let Some(tag) = self.acks.take_multiple() {
                        if !self.closing.load(Ordering::Acquire) {
                            consume::basic_ack(&mut self.t.wbuf, self.t.ch, tag, true);
                        }
                    }
                    Ok(())
                }
                frame = self.t.recv() => match frame {
                    Ok(frame) => self.on_frame(frame),
                    Err(e) => Err(e),
                },
                cmd = cmds.recv(), if take_cmds => match cmd {
                    Some(cmd) => self.on_cmd(cmd).await,
                    None => return None,
                },
                () = tokio::time::sleep(STALL_RETRY), if !self.backlog.is_empty() => {
                    self.drain_backlog();
                    Ok(())
                }
            };
            if let Err(reason) = res.and_then(|()| self.maybe_consume()) {
                return Some(reason);
            }
            if let Err(e) = self.t.flush().await {
                return Some(e);
            }
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) -> Result<(), String> {
        match cmd {
            Cmd::Start => {
                let now = Instant::now();
                self.start = Start::Wanted { since: now, at: now };
            }
            Cmd::Update { keys, record, reply } => {
                let wire = |e: crate::targets::amqp::wire::WireError| e.to_string();
                let wanted: HashSet<String> = keys
                    .iter()
                    .flat_map(|k| [k.clone(), retained_key(k)])
                    .filter(|k| !k.is_empty())
                    .collect();
                let mut oks = 0;
                let (q, x) = (&self.queue, &self.s.exchange);
                let ch = self.t.ch;
                for key in wanted.difference(&self.bound) {
                    methods::queue_bind(&mut self.t.wbuf, ch, q, x, key).map_err(wire)?;
                    oks += 1;
                }
                for key in self.bound.difference(&wanted) {
                    methods::queue_unbind(&mut self.t.wbuf, ch, q, x, key).map_err(wire)?;
                    oks += 1;
                }
                self.bound = wanted;
                let properties = Properties { delivery_mode: 2, ..Properties::default() };
                let name = &self.record;
                let tag = self
                    .t
                    .publish(|out, frame_max| {
                        let (ch, x) = (RECORD_CHANNEL, "");
                        methods::publish_with(
                            out,
                            ch,
                            x,
                            name,
                            false,
                            &properties,
                            &record,
                            frame_max,
                        )
                        .map_err(wire)
                    })
                    .await?;
                self.updates.push_back(Update { oks, tag, confirmed: None, reply });
            }
        }
        Ok(())
    }

    /// Sends `basic.consume` when asked and no change is in progress.
    fn maybe_consume(&mut self) -> Result<(), String> {
        let Start::Wanted { since, at } = self.start else { return Ok(()) };
        let now = Instant::now();
        if !self.updates.is_empty() || now < at {
            return Ok(());
        }
        let ch = self.t.ch;
        consume::basic_qos(&mut self.t.wbuf, ch, self.prefetch);
        let tag = "mqgate-session";
        consume::basic_consume_with(&mut self.t.wbuf, ch, &self.queue, tag, false, true)
            .map_err(|e| e.to_string())?;
        self.start = Start::Sent { since };
        Ok(())
    }

    /// Lets the changes go whose bindings and record are in.
    fn settle_updates(&mut self) {
        while self.updates.front().is_some_and(|u| u.oks == 0 && u.confirmed.is_some()) {
            let Some(u) = self.updates.pop_front() else { break };
            let outcome = if u.confirmed == Some(true) {
                Outcome::Delivered
            } else {
                Outcome::Failed(Failure::retryable("the broker refused the session's record"))
            };
            if let Some(reply) = u.reply {
                let _ = reply.send(outcome);
            }
        }
    }

    fn on_frame(&mut self, frame: ConsumerFrame) -> Result<(), String> {
        match frame {
            ConsumerFrame::Heartbeat => {}
            ConsumerFrame::Method { channel, method } => return self.on_method(channel, method),
            ConsumerFrame::Header { channel, body_size, .. } if channel == self.t.ch => {
                let Some((tag, None, _)) = self.assembly.take() else {
                    return Err("content header without basic.deliver".into());
                };
                let size = usize::try_from(body_size).map_err(|_| "body too large")?;
                if size == 0 {
                    self.on_delivery(tag, &[]);
                } else {
                    let body = BytesMut::with_capacity(size.min(1 << 20));
                    self.assembly = Some((tag, Some(size), body));
                }
            }
            ConsumerFrame::Body { channel, bytes } if channel == self.t.ch => {
                let Some((_, Some(size), body)) = &mut self.assembly else {
                    return Err("content body without a header".into());
                };
                body.extend_from_slice(&bytes);
                if body.len() >= *size {
                    if let Some((tag, _, body)) = self.assembly.take() {
                        self.on_delivery(tag, &body);
                    }
                }
            }
            ConsumerFrame::Header { .. } | ConsumerFrame::Body { .. } => {}
        }
        Ok(())
    }

    fn on_method(&mut self, channel: u16, method: ConsumerMethod) -> Result<(), String> {
        match method {
            ConsumerMethod::Deliver(d) if channel == self.t.ch => {
                self.assembly = Some((d.delivery_tag, None, BytesMut::new()));
            }
            ConsumerMethod::QueueBindOk
            | ConsumerMethod::Common(Method::Other { class: 50, method: 51 })
                if channel == self.t.ch =>
            {
                if let Some(u) = self.updates.iter_mut().find(|u| u.oks > 0) {
                    u.oks -= 1;
                }
                self.settle_updates();
            }
            ConsumerMethod::Common(Method::BasicAck { tag, multiple })
            | ConsumerMethod::Common(Method::BasicNack { tag, multiple })
                if channel == RECORD_CHANNEL =>
            {
                let ok = matches!(method, ConsumerMethod::Common(Method::BasicAck { .. }));
                for u in self.updates.iter_mut() {
                    if u.tag == tag || (multiple && u.tag <= tag) {
                        u.confirmed = Some(ok);
                    }
                }
                self.settle_updates();
            }
            ConsumerMethod::ConsumeOk(_) if channel == self.t.ch => {
                debug!(queue = %self.queue, "session queue consumed");
                self.start = Start::Consuming;
            }
            ConsumerMethod::QosOk => {}
            ConsumerMethod::Common(Method::ChannelClose(c)) if channel == self.t.ch => {
                self.t.closed_by_broker();
                let why = describe(&c);
                match self.start {
                    // Another node's consumer is still there (its client is being taken
                    // over): again, until it is gone.
                    Start::Sent { since }
                        if why.starts_with("403") && since.elapsed() < CONSUME_PATIENCE =>
                    {
                        self.t.reopen();
                        let at = Instant::now() + CONSUME_RETRY;
                        self.start = Start::Wanted { since, at };
                    }
                    _ => return Err(format!("the broker closed the session's channel: {why}")),
                }
            }
            ConsumerMethod::Common(Method::ChannelOpenOk) => {}
            ConsumerMethod::Cancel(tag) => {
                consume::basic_cancel_ok(&mut self.t.wbuf, channel, &tag);
                return Err("the broker cancelled the session's consumer (queue deleted?)".into());
            }
            ConsumerMethod::Common(Method::ChannelFlow(active)) => {
                methods::channel_flow_ok(&mut self.t.wbuf, channel, active);
            }
            other => debug!(channel, ?other, "session queue: method ignored"),
        }
        Ok(())
    }

    /// One delivery of the session queue (one forwarded message or batch): each message is
    /// matched against the session's subscriptions and queued for it; acknowledged once every
    /// one is taken.
    fn on_delivery(&mut self, tag: u64, body: &[u8]) {
        self.acks.delivered(tag);
        let root = Tracker::root(tag, Mode::Broadcast, self.report_tx.clone());
        let msgs = super::link::messages_of(body).into_iter().map(Arc::new).collect();
        self.backlog.push_back((root, msgs));
        self.drain_backlog();
    }

    /// Hands the held messages to the session, in order, until its queue is full; a delivery
    /// whose messages are all handed over is done here (its root finished).
    fn drain_backlog(&mut self) {
        while let Some((root, msgs)) = self.backlog.front_mut() {
            while let Some(msg) = msgs.front() {
                let sid = self.session_id;
                if self.broker.deliver_queued(sid, self.client_id, msg, root) == Queued::Full {
                    return;
                }
                msgs.pop_front();
            }
            if let Some((root, _)) = self.backlog.pop_front() {
                root.finish(Fate::Gone);
            }
        }
    }

    /// A delivery is done: taken, matched nothing, or dropped (a full session queue, as on one
    /// node). Nothing is acknowledged once the session is closing: RabbitMQ delivers again.
    fn on_report(&mut self, done: Done) {
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        if !self.acks.ack(done.token) {
            consume::basic_ack(&mut self.t.wbuf, self.t.ch, done.token, false);
            self.acks.settled(done.token);
        }
    }
}

/// The retained-message variant (`r.…`) of a live binding key (`m.…`).
fn retained_key(key: &str) -> String {
    key.strip_prefix("m.").map(|rest| format!("r.{rest}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hide_the_client_id_and_retained_keys_follow_live_ones() {
        let (q, r) = (hash("dev/1"), hash("dev/2"));
        assert_eq!(q.len(), 32);
        assert_ne!(q, r);
        assert_eq!(retained_key("m.la.*"), "r.la.*");
        assert_eq!(retained_key("m.#"), "r.#");
        assert_eq!(retained_key("c"), "");
    }
}
