//! Publishing on one live AMQP connection: the hot path.
//!
//! One task (the supervisor's) runs [`run`] for as long as the connection lives, and it alone
//! drives the socket: one `select!` loop reads and decodes the broker's frames, takes requests
//! from the queue in batches, encodes each publish straight into the write buffer and writes a
//! whole batch with one syscall. Confirms are resolved from a per-channel queue in delivery-tag
//! order (tags are sequential per confirm channel, starting at 1), so a `basic.ack` with
//! `multiple` is a pop loop: no map, no future, no allocation per message beyond its entry.
//! Unconfirmed publishes are bounded by `max_unconfirmed`; every QoS 1/2 request gets exactly
//! one outcome (also when a channel or the connection is lost). It does not connect or back
//! off (the supervisor does), spawns nothing and takes no lock of its own per message.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod checks;
mod returns;

use checks::{Answer, CheckChannel, CheckState, Op};
use returns::{Mandatory, Returning};

use super::exchanges::{Exchanges, Route};
use super::headers::{self, PERSISTENT, TRANSIENT};
use super::queues::{QueueRoute, Queues};
use super::transport::{describe, Link, Transport};
use super::wire::frame::{self, Frame};
use super::wire::methods::{self, Close, Method, REPLY_SUCCESS};
use super::wire::MAX_SHORT_STRING_LENGTH;
use super::{PublishRequest, Shared};
use crate::config::UnroutablePolicy;
use crate::deadletters::Recorder;
use crate::message::Message;
use crate::metrics::TargetMetrics;
use crate::mqtt::codec::ReasonCode;
use crate::targets::{AckSender, Failure, Outcome};

/// How often heartbeats and the deadlines of channel reopens and exchange checks are looked at.
const TICK: Duration = Duration::from_millis(100);
/// On shutdown, how long outstanding confirms may still arrive.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);
/// On shutdown, how long the broker may take to answer `connection.close`.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Requests taken from the queue in one go (encoded, then written with one syscall).
const BATCH: usize = 128;
/// Why [`run`] returned.
pub(crate) enum Ended {
    /// The connection was lost (reason inside); every outstanding request has been failed.
    Lost(String),
    /// Shutdown was requested, or every handle was dropped; the connection has been closed.
    Shutdown,
}

/// A QoS 1/2 publish sent and not yet confirmed.
struct InFlight {
    /// Its delivery tag on its channel.
    tag: u64,
    /// Where its outcome goes.
    ack: AckSender,
    /// Its target's counters.
    metrics: TargetMetrics,
    /// When it was encoded for sending (one clock read per batch), for the confirm latency.
    sent: Instant,
    /// Published with the mandatory flag: what identifies it in a `basic.return`.
    mandatory: Option<Box<Mandatory>>,
    /// Where it is kept if it fails for good, and the message.
    dead_letter: Option<(Arc<Recorder>, Arc<Message>)>,
}

/// One confirm-mode channel.
struct ConfirmChannel {
    /// Its channel number.
    id: u16,
    /// The delivery tag the next publish gets.
    next_tag: u64,
    /// Unconfirmed publishes, in tag order.
    inflight: VecDeque<InFlight>,
    /// Answers still due after a reopen (`channel.open-ok`, `confirm.select-ok`).
    pending_oks: u8,
    /// A `basic.return` being received on this channel.
    returning: Option<Returning>,
}

/// Which of our channels a frame is for.
#[derive(Clone, Copy)]
enum Role {
    /// Confirm channel at this index.
    Confirm(usize),
    /// The QoS 0 channel at this index.
    Plain(usize),
    /// The exchange-check channel.
    Check,
    /// None of ours (e.g. an abandoned check channel).
    Unknown,
}

/// The state of the loop on one connection.
struct Publisher<'a> {
    /// Name, metrics and counters of the broker.
    shared: &'a Shared,
    /// The socket and its buffers.
    t: Transport,
    /// Confirm channels for QoS 1/2, numbered 1..=n.
    confirm: Vec<ConfirmChannel>,
    /// Channels without confirms for QoS 0, numbered n+1..=2n; `.1` counts the answers still
    /// due after a reopen.
    plain: Vec<(u16, u8)>,
    /// Deadline of the channel reopens in progress.
    reopen_deadline: Option<Instant>,
    /// The exchange-check channel.
    check: CheckChannel,
    /// Which exchanges are known to exist, and the requests waiting for a check.
    exchanges: Exchanges,
    /// Which queues are declared, and the requests waiting for a declare.
    queues: Queues,
    /// Counters of the QoS 0 publishes in the write buffer, counted forwarded once written.
    unflushed_plain: Vec<TargetMetrics>,
    /// QoS 1/2 publishes awaiting their confirm, over all channels.
    unconfirmed: usize,
    /// `max_unconfirmed`: bound on unconfirmed + unwritten QoS 0 + held requests.
    max_in_flight: usize,
    /// Time allowed for a check or for reopening a channel.
    rpc_timeout: Duration,
    /// The broker sent `connection.blocked`: take no requests until it unblocks.
    blocked: bool,
    /// We sent `connection.close` (shutdown).
    closing: bool,
    /// The broker answered it.
    closed: bool,
}

/// Runs the publishing loop on `link` until the connection is lost or shutdown is requested.
pub(crate) async fn run(
    shared: &Shared,
    link: Link,
    rx: &mut mpsc::Receiver<PublishRequest>,
    shutdown: &CancellationToken,
    max_unconfirmed: usize,
    rpc_timeout: Duration,
) -> Ended {
    let Link { transport, confirm_channels, .. } = link;
    let n = confirm_channels;
    let confirm = (1..=confirm_channels)
        .map(|id| ConfirmChannel {
            id,
            next_tag: 1,
            inflight: VecDeque::new(),
            pending_oks: 0,
            returning: None,
        })
        .collect();
    let mut p = Publisher {
        shared,
        t: transport,
        confirm,
        plain: (n + 1..=2 * n).map(|id| (id, 0)).collect(),
        reopen_deadline: None,
        check: CheckChannel {
            id: 2 * n + 1,
            state: CheckState::Closed,
            queue: VecDeque::new(),
            purges: 0,
        },
        exchanges: Exchanges::default(),
        queues: Queues::default(),
        unflushed_plain: Vec::new(),
        unconfirmed: 0,
        max_in_flight: max_unconfirmed.max(1),
        rpc_timeout,
        blocked: false,
        closing: false,
        closed: false,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.reset();

    loop {
        let take = p.can_take();
        let want_write = p.t.has_pending_writes();
        let res = tokio::select! {
            biased;
            () = shutdown.cancelled() => return p.finish(rx, "is shutting down").await,
            r = p.t.stream.readable() => match r {
                Ok(()) => p.on_readable(),
                Err(e) => Err(format!("read failed: {e}")),
            },
            r = p.t.stream.writable(), if want_write => match r {
                Ok(()) => p.flush(),
                Err(e) => Err(format!("write failed: {e}")),
            },
            _ = tick.tick() => p.on_tick(),
            req = rx.recv(), if take => match req {
                None => return p.finish(rx, "has no publishers left").await,
                Some(req) => p.on_requests(req, rx),
            },
        };
        if let Err(reason) = res {
            return p.lost(reason);
        }
    }
}

impl Publisher<'_> {
    /// Requests this connection holds: unconfirmed, QoS 0 not yet written, waiting for a check.
    fn in_flight(&self) -> usize {
        self.unconfirmed
            + self.unflushed_plain.len()
            + self.exchanges.held()
            + self.queues.held()
            + self.check.purges
    }

    /// True when the loop may take another request.
    fn can_take(&self) -> bool {
        !self.blocked && self.in_flight() < self.max_in_flight
    }

    /// Takes `first` and whatever else is queued (up to [`BATCH`] while there is room), encodes
    /// them, and writes the batch.
    fn on_requests(
        &mut self,
        first: PublishRequest,
        rx: &mut mpsc::Receiver<PublishRequest>,
    ) -> Result<(), String> {
        let now = Instant::now();
        let timestamp = headers::unix_seconds();
        self.accept(first, now, timestamp);
        for _ in 1..BATCH {
            if !self.can_take() {
                break;
            }
            let Ok(req) = rx.try_recv() else { break };
            self.accept(req, now, timestamp);
        }
        self.flush()
    }

    /// Writes what the socket takes; once the buffer is empty, its QoS 0 publishes count as
    /// forwarded.
    fn flush(&mut self) -> Result<(), String> {
        match self.t.try_flush() {
            Ok(true) => {
                for metrics in self.unflushed_plain.drain(..) {
                    metrics.forwarded.inc();
                }
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(format!("write failed: {e}")),
        }
    }

    /// Reads what arrived and handles every complete frame in it.
    fn on_readable(&mut self) -> Result<(), String> {
        match self.t.try_fill() {
            Ok(true) => {}
            Ok(false) => return Err("the broker closed the connection".to_owned()),
            Err(e) => return Err(format!("read failed: {e}")),
        }
        loop {
            match self.t.next_frame() {
                Ok(Some(frame)) => self.on_frame(frame)?,
                Ok(None) => break,
                Err(e) => {
                    methods::connection_close(&mut self.t.wbuf, 501, "FRAME_ERROR");
                    let _ = self.t.try_flush();
                    return Err(format!("AMQP framing error from the broker: {e}"));
                }
            }
        }
        if self.t.wbuf.is_empty() {
            Ok(())
        } else {
            self.flush()
        }
    }

    /// Handles one frame from the broker. `Err` means the connection has to go.
    fn on_frame(&mut self, frame: Frame) -> Result<(), String> {
        match frame {
            Frame::Heartbeat => Ok(()),
            Frame::Content { channel, kind, payload } => {
                self.on_content(channel, kind, &payload);
                Ok(())
            }
            Frame::Method { channel: 0, method } => self.on_connection_method(method),
            Frame::Method { channel, method } => {
                self.on_channel_method(channel, method);
                Ok(())
            }
        }
    }

    /// A method on channel 0.
    fn on_connection_method(&mut self, method: Method) -> Result<(), String> {
        let broker = &self.shared.name;
        match method {
            Method::ConnectionClose(c) => {
                methods::connection_close_ok(&mut self.t.wbuf);
                let _ = self.t.try_flush();
                Err(format!("closed by the broker: {}", describe(&c)))
            }
            Method::ConnectionCloseOk if self.closing => {
                self.closed = true;
                Ok(())
            }
            Method::ConnectionBlocked(reason) => {
                warn!(%broker, %reason, "the broker blocked the connection; publishes wait");
                self.blocked = true;
                Ok(())
            }
            Method::ConnectionUnblocked => {
                info!(%broker, "the broker unblocked the connection");
                self.blocked = false;
                Ok(())
            }
            // Nothing else on channel 0 concerns a publisher (update-secret-ok, a late
            // close-ok...): noted, not fatal.
            other => {
                debug!(%broker, ?other, "ignored");
                Ok(())
            }
        }
    }

    /// Which channel `id` is.
    fn role(&self, id: u16) -> Role {
        if id >= 1 && usize::from(id) <= self.confirm.len() {
            Role::Confirm(usize::from(id) - 1)
        } else if usize::from(id) > self.confirm.len() && usize::from(id) <= 2 * self.confirm.len()
        {
            Role::Plain(usize::from(id) - 1 - self.confirm.len())
        } else if id == self.check.id {
            Role::Check
        } else {
            Role::Unknown
        }
    }

    /// A method on a channel.
    fn on_channel_method(&mut self, id: u16, method: Method) {
        let role = self.role(id);
        match (role, method) {
            (Role::Confirm(i), Method::BasicAck { tag, multiple }) => {
                self.on_confirm(i, tag, multiple, true);
            }
            (Role::Confirm(i), Method::BasicNack { tag, multiple }) => {
                self.on_confirm(i, tag, multiple, false);
            }
            (Role::Confirm(i), Method::ChannelOpenOk | Method::ConfirmSelectOk) => {
                let ch = &mut self.confirm[i];
                ch.pending_oks = ch.pending_oks.saturating_sub(1);
                self.reopened();
            }
            (Role::Plain(i), Method::ChannelOpenOk) => {
                self.plain[i].1 = self.plain[i].1.saturating_sub(1);
                self.reopened();
            }
            (
                Role::Check,
                Method::ExchangeDeclareOk | Method::QueueDeclareOk { .. } | Method::QueuePurgeOk(_),
            ) => {
                self.on_check_answer(Answer::Ok, CheckState::Idle);
            }
            (Role::Confirm(i), Method::BasicReturn(ret)) => {
                self.shared.metrics.returned.inc();
                if ret.exchange.is_empty() {
                    // A queue we declared is gone: declare it again on the next publish.
                    self.queues.forget_declared();
                }
                self.confirm[i].returning =
                    Some(Returning { ret, header: None, body: Vec::new(), received: 0 });
            }
            (Role::Plain(_), Method::BasicReturn(ret)) => {
                // QoS 0: nobody to tell; counted.
                self.shared.metrics.returned.inc();
                debug!(broker = %self.shared.name, exchange = %ret.exchange,
                    routing_key = %ret.routing_key, "QoS 0 message returned as unroutable");
            }
            (_, Method::ChannelClose(c)) => {
                methods::channel_close_ok(&mut self.t.wbuf, id);
                self.on_channel_closed(role, &c);
            }
            (_, Method::ChannelFlow(active)) => {
                methods::channel_flow_ok(&mut self.t.wbuf, id, active)
            }
            // The check channel's open-ok, returns (mandatory is off), stale answers.
            (_, other) => debug!(broker = %self.shared.name, channel = id, ?other, "ignored"),
        }
    }

    /// Clears the reopen deadline once every reopened channel has answered.
    fn reopened(&mut self) {
        if self.plain.iter().all(|p| p.1 == 0) && self.confirm.iter().all(|c| c.pending_oks == 0) {
            self.reopen_deadline = None;
        }
    }

    /// A `basic.ack` (`ack`) or `basic.nack` for `tag` (and below, if `multiple`) on confirm
    /// channel `i`.
    fn on_confirm(&mut self, i: usize, tag: u64, multiple: bool, ack: bool) {
        let shared = self.shared;
        let now = Instant::now();
        let resolve = |mut e: InFlight| {
            if let Some(returned) = e.mandatory.as_mut().and_then(|m| m.returned.take()) {
                let code = match e.mandatory.as_ref().map(|m| m.policy) {
                    Some(UnroutablePolicy::Error) => ReasonCode::UNSPECIFIED_ERROR,
                    _ => ReasonCode::NO_MATCHING_SUBSCRIBERS,
                };
                e.fail(Failure::with_code(returned, code));
            } else if ack {
                let latency = now.saturating_duration_since(e.sent).as_secs_f64();
                shared.metrics.confirm_latency.observe(latency);
                e.metrics.forwarded.inc();
                let _ = e.ack.send(Outcome::Delivered);
            } else {
                shared.metrics.nacks.inc();
                e.fail(Failure::fatal("nacked by broker"));
            }
        };
        // The gauge goes down before the outcomes go out: whoever sees an outcome sees the
        // gauge without it.
        let q = &mut self.confirm[i].inflight;
        if multiple {
            // Tags are contiguous unless a single ack took one out of the middle: then the
            // count is known without a search.
            let n = match q.front() {
                None => 0,
                Some(front) if front.tag > tag => 0,
                Some(front) => {
                    let guess = usize::try_from(tag - front.tag + 1).unwrap_or(usize::MAX);
                    if guess <= q.len() && q[guess - 1].tag == tag {
                        guess
                    } else {
                        q.partition_point(|e| e.tag <= tag)
                    }
                }
            };
            self.unconfirmed -= n;
            shared.metrics.unconfirmed.dec_by(n as i64);
            for e in self.confirm[i].inflight.drain(..n) {
                resolve(e);
            }
        } else {
            let at = if q.front().is_some_and(|e| e.tag == tag) {
                Some(0)
            } else {
                q.binary_search_by_key(&tag, |e| e.tag).ok()
            };
            if let Some(e) = at.and_then(|at| q.remove(at)) {
                self.settled(1);
                resolve(e);
            }
        }
    }

    /// `n` unconfirmed publishes got their outcome.
    fn settled(&mut self, n: usize) {
        if n > 0 {
            self.unconfirmed -= n;
            self.shared.metrics.unconfirmed.dec_by(n as i64);
        }
    }

    /// The broker closed one of our channels (we have queued the close-ok).
    fn on_channel_closed(&mut self, role: Role, close: &Close) {
        let name = &self.shared.name;
        match role {
            Role::Confirm(i) => {
                // It may have been an exchange deleted while in use: forget what exists.
                self.exchanges.forget_verified();
                let reason =
                    format!("channel to {name} was closed by the broker: {}", describe(close));
                let failed = self.fail_channel(i, &reason);
                warn!(broker = %name, channel = i, failed, reason = %describe(close),
                    "channel closed by the broker; reopening it");
                self.queues.forget_declared();
                let ch = &mut self.confirm[i];
                ch.next_tag = 1;
                ch.pending_oks = 2;
                ch.returning = None;
                // Pipelined: publishes after these are on the reopened channel, in confirm mode.
                methods::channel_open(&mut self.t.wbuf, ch.id);
                methods::confirm_select(&mut self.t.wbuf, ch.id);
                self.reopen_deadline.get_or_insert(Instant::now() + self.rpc_timeout);
            }
            Role::Plain(i) => {
                self.exchanges.forget_verified();
                self.queues.forget_declared();
                warn!(broker = %name, channel = i, reason = %describe(close),
                    "channel for QoS 0 closed by the broker; reopening it");
                self.plain[i].1 = 1;
                methods::channel_open(&mut self.t.wbuf, self.plain[i].0);
                self.reopen_deadline.get_or_insert(Instant::now() + self.rpc_timeout);
            }
            Role::Check => self.on_check_answer(Answer::Closed(close.clone()), CheckState::Closed),
            Role::Unknown => {}
        }
    }

    /// Fails every unconfirmed publish of confirm channel `i` (retryable); returns how many.
    fn fail_channel(&mut self, i: usize, reason: &str) -> usize {
        let entries = std::mem::take(&mut self.confirm[i].inflight);
        let n = entries.len();
        self.settled(n);
        for e in entries {
            e.fail(Failure::retryable(reason));
        }
        n
    }

    /// Fails every unconfirmed publish of the connection (retryable); returns how many.
    fn fail_all(&mut self, reason: &str) -> usize {
        (0..self.confirm.len()).map(|i| self.fail_channel(i, reason)).sum()
    }

    /// Heartbeats and deadlines.
    fn on_tick(&mut self) -> Result<(), String> {
        let now = Instant::now();
        if let Some(hb) = self.t.heartbeat {
            let silent = now.saturating_duration_since(self.t.last_read);
            if silent > hb * 2 {
                return Err(format!("nothing from the broker for {silent:?} (heartbeat {hb:?})"));
            }
            if self.t.wbuf.is_empty() && now.saturating_duration_since(self.t.last_write) >= hb / 2
            {
                frame::heartbeat(&mut self.t.wbuf);
                self.flush()?;
            }
        }
        if self.reopen_deadline.is_some_and(|d| now >= d) {
            return Err(format!("could not reopen a channel within {:?}", self.rpc_timeout));
        }
        if matches!(self.check.state, CheckState::Busy(_, d) if now >= d) {
            // The answer may still come on that channel: checks move to a fresh one.
            let next = self.check.id.checked_add(1).filter(|&id| id <= self.t.channel_max);
            let Some(next) = next else {
                return Err("no channel left for exchange checks".to_owned());
            };
            self.check.id = next;
            let reason = format!("no answer within {:?}", self.rpc_timeout);
            self.on_check_answer(Answer::Failed(reason), CheckState::Closed);
        }
        Ok(())
    }

    /// Takes one request in: publishes it, holds it behind a queue declare or an exchange
    /// check, queues its purge, or fails it.
    fn accept(&mut self, req: PublishRequest, now: Instant, timestamp: u64) {
        if req.exchange.len() > MAX_SHORT_STRING_LENGTH {
            self.shared.fail(req, || Failure::fatal("exchange name longer than 255 bytes"));
            return;
        }
        let req = match req.options.declare.clone() {
            None => req,
            Some(spec) => match self.queues.route(&spec, req) {
                QueueRoute::Ready(req) => req,
                QueueRoute::Held => return,
                QueueRoute::Declare(spec) => {
                    self.check.queue.push_back(Op::Queue(spec));
                    self.start_check();
                    return;
                }
                QueueRoute::Refused(req, reason) => {
                    self.shared.fail(req, || Failure::fatal(reason));
                    return;
                }
            },
        };
        self.accept_declared(req, now, timestamp);
    }

    /// [`accept`](Self::accept) once the request's queue (if any) is declared.
    fn accept_declared(&mut self, req: PublishRequest, now: Instant, timestamp: u64) {
        if req.options.purge {
            self.check.purges += 1;
            self.check.queue.push_back(Op::Purge(req));
            self.start_check();
            return;
        }
        match self.exchanges.route(req) {
            Route::Publish(req) => self.publish(req, now, timestamp),
            Route::Held => {}
            Route::Check(exchange) => {
                self.check.queue.push_back(Op::Exchange(exchange));
                self.start_check();
            }
            Route::Missing(req) => {
                let exchange = Arc::clone(&req.exchange);
                self.shared.fail(req, || missing_exchange(&exchange));
            }
        }
    }

    /// Encodes the publish of a request whose exchange is verified, tracking QoS 1/2 ones.
    fn publish(&mut self, req: PublishRequest, now: Instant, timestamp: u64) {
        let PublishRequest { exchange, routing_key, msg, ack, metrics, options, dead_letter } = req;
        let headers = headers::headers(&msg);
        let headers = headers.as_slice();
        let derived = headers::derived(&msg, options.mapping);
        let mandatory = options.mandatory.is_some();
        let frame_max = self.t.frame_max;
        // One topic always uses the same channel: RabbitMQ keeps order per channel, so
        // messages of one topic reach their queues in the order they were published.
        let i = channel_for(&msg.topic, self.confirm.len());
        match ack {
            None => {
                let props = headers::properties(&msg, headers, &derived, TRANSIENT, timestamp);
                let wbuf = &mut self.t.wbuf;
                match methods::publish_with(
                    wbuf,
                    self.plain[i].0,
                    &exchange,
                    &routing_key,
                    mandatory,
                    &props,
                    &msg.payload,
                    frame_max,
                ) {
                    Ok(()) => self.unflushed_plain.push(metrics),
                    Err(e) => {
                        metrics.failed.inc();
                        if let Some(r) = dead_letter {
                            r.record(&msg, &e.to_string());
                        }
                    }
                }
            }
            Some(ack) => {
                let props = headers::properties(&msg, headers, &derived, PERSISTENT, timestamp);
                let ch = &mut self.confirm[i];
                match methods::publish_with(
                    &mut self.t.wbuf,
                    ch.id,
                    &exchange,
                    &routing_key,
                    mandatory,
                    &props,
                    &msg.payload,
                    frame_max,
                ) {
                    Ok(()) => {
                        let mandatory = options.mandatory.map(|policy| {
                            Box::new(Mandatory {
                                policy,
                                exchange: Arc::clone(&exchange),
                                routing_key: routing_key.clone(),
                                msg: Arc::clone(&msg),
                                returned: None,
                            })
                        });
                        ch.inflight.push_back(InFlight {
                            tag: ch.next_tag,
                            ack,
                            metrics,
                            sent: now,
                            mandatory,
                            dead_letter: dead_letter.map(|r| (r, Arc::clone(&msg))),
                        });
                        ch.next_tag += 1;
                        self.unconfirmed += 1;
                        self.shared.metrics.unconfirmed.inc();
                    }
                    Err(e) => InFlight {
                        tag: 0,
                        ack,
                        metrics,
                        sent: now,
                        mandatory: None,
                        dead_letter: dead_letter.map(|r| (r, Arc::clone(&msg))),
                    }
                    .fail(Failure::fatal(e.to_string())),
                }
            }
        }
    }

    /// Runs the socket (reads, writes, heartbeats; no new requests) until `done` or
    /// `deadline`. `Some(reason)` if the connection was lost meanwhile.
    async fn pump(&mut self, deadline: Instant, done: fn(&Self) -> bool) -> Option<String> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !done(self) {
            let want_write = self.t.has_pending_writes();
            let res = tokio::select! {
                biased;
                r = self.t.stream.readable() => match r {
                    Ok(()) => self.on_readable(),
                    Err(e) => Err(format!("read failed: {e}")),
                },
                r = self.t.stream.writable(), if want_write => match r {
                    Ok(()) => self.flush(),
                    Err(e) => Err(format!("write failed: {e}")),
                },
                _ = tick.tick() => self.on_tick(),
                () = tokio::time::sleep_until(deadline) => return None,
            };
            if let Err(reason) = res {
                return Some(reason);
            }
        }
        None
    }

    /// Counts the QoS 0 publishes that never left the write buffer as failed (and dropped).
    fn fail_unwritten(&mut self) -> usize {
        let n = self.unflushed_plain.len();
        for metrics in self.unflushed_plain.drain(..) {
            metrics.failed.inc();
            self.shared.unavailable.inc();
        }
        n
    }

    /// The connection is gone: fail everything it held (retryable) and report the loss.
    fn lost(mut self, reason: String) -> Ended {
        self.shared.set_connected(false);
        let reason = connection_lost(&self.shared.name, &reason);
        let unconfirmed = self.fail_all(&reason);
        let mut held = self.exchanges.take_held();
        held.extend(self.queues.take_held());
        held.extend(self.take_purges());
        let held_n = held.len();
        for req in held {
            self.shared.fail_unavailable(req, || Failure::retryable(reason.clone()));
        }
        let qos0_unsent = self.fail_unwritten();
        debug!(broker = %self.shared.name, unconfirmed, held = held_n, qos0_unsent,
            "failed the publishes of the lost connection");
        Ended::Lost(reason)
    }

    /// Stops taking requests, fails what is queued, waits up to [`SHUTDOWN_DRAIN`] for the
    /// outstanding confirms, fails the rest, and closes the connection.
    async fn finish(mut self, rx: &mut mpsc::Receiver<PublishRequest>, why: &str) -> Ended {
        let name = &self.shared.name;
        info!(broker = %name, unconfirmed = self.unconfirmed, "AMQP sink {why}; draining");
        super::reject_queued(self.shared, rx);
        let mut held = self.exchanges.take_held();
        held.extend(self.queues.take_held());
        held.extend(self.take_purges());
        for req in held {
            self.shared.fail_unavailable(req, || {
                Failure::retryable(format!("broker {name} sink is shutting down"))
            });
        }
        let drained = Instant::now() + SHUTDOWN_DRAIN;
        let lost = self.pump(drained, |p| p.unconfirmed == 0 && p.t.wbuf.is_empty()).await;
        let failed =
            self.fail_all(&format!("broker {name} sink shut down before the confirm arrived"));
        if failed > 0 {
            warn!(broker = %name, failed, "confirms still outstanding at shutdown");
        }
        self.fail_unwritten();
        self.shared.set_connected(false);
        match lost {
            Some(reason) => debug!(broker = %name, %reason, "connection lost while draining"),
            None => {
                methods::connection_close(&mut self.t.wbuf, REPLY_SUCCESS, "OK");
                self.closing = true;
                let res = self.pump(Instant::now() + CLOSE_WAIT, |p| p.closed).await;
                match res {
                    None if self.closed => info!(broker = %name, "closed the AMQP connection"),
                    None => debug!(broker = %name, "the AMQP connection did not close in time"),
                    Some(e) => debug!(broker = %name, error = %e, "closing the AMQP connection"),
                }
            }
        }
        Ended::Shutdown
    }
}

impl InFlight {
    /// Reports `failure` and counts it; a final one is also kept as a dead letter.
    fn fail(self, failure: Failure) {
        self.metrics.failed.inc();
        if let (Some((r, msg)), false) = (&self.dead_letter, failure.retryable) {
            r.record(msg, &failure.reason);
        }
        let _ = self.ack.send(Outcome::Failed(failure));
    }
}

/// The failure of a publish to an exchange the broker does not have.
fn missing_exchange(exchange: &str) -> Failure {
    Failure::fatal(format!("exchange '{exchange}' does not exist in the vhost"))
}

/// The reason given to publishes of a lost connection.
fn connection_lost(broker: &str, cause: &str) -> String {
    format!("connection to {broker} lost: {cause}")
}

/// The channel (confirm or plain) for messages of `topic`: stable per topic, spread across
/// topics.
fn channel_for(topic: &str, channels: usize) -> usize {
    if channels <= 1 {
        return 0;
    }
    use std::hash::BuildHasher;
    // A fixed seed: the same topic must map to the same channel for the life of the process.
    let hash = foldhash::fast::FixedState::with_seed(0x6d71_6761_7465).hash_one(topic);
    (hash % channels as u64) as usize
}
