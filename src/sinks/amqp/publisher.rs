//! Publishing on one live AMQP connection: the hot path.
//!
//! One task (the supervisor's) runs [`run`] for as long as the connection lives. It pulls
//! requests, sends them without ever awaiting one confirm before the next send, and resolves
//! each QoS 1/2 request from its own confirm, all in one `select!` loop with the unconfirmed
//! publishes bounded by `max_unconfirmed`. It owns the connection's channels and its in-flight
//! table and reports every outcome exactly once; it does not connect or back off (the
//! supervisor does), spawns nothing and takes no lock of its own per message.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{ShortString, MAX_SHORT_STRING_LENGTH};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Event};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::exchanges::{self, Checked, Exchanges, Released, Route};
use super::headers::{self, PERSISTENT, TRANSIENT};
use super::{PublishRequest, Shared};
use crate::message::Message;
use crate::metrics::TargetMetrics;
use crate::sinks::{AckSender, Failure, Outcome};

/// How often the loop looks at the connection and channel states, in case lapin reports a loss
/// in a way no future or event of ours sees.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(500);
/// On shutdown, how long outstanding confirms may still arrive.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);
/// On connection loss, how long lapin may take to resolve the confirms it is failing itself.
const LOSS_HARVEST: Duration = Duration::from_millis(100);
/// On a channel closed by the broker, how long the confirms of that channel may take to resolve.
const CHANNEL_HARVEST: Duration = Duration::from_millis(50);
/// Requests taken from the queue in one go before the loop looks at confirms again.
const BATCH: usize = 64;

/// The connection and channels the supervisor opened.
pub(crate) struct Link {
    /// The connection; shared with exchange checks, which open short-lived channels on it.
    pub(crate) conn: Arc<Connection>,
    /// Channels in confirm mode for QoS 1/2, used round-robin.
    pub(crate) confirm: Vec<Arc<Channel>>,
    /// One channel without confirms for QoS 0.
    pub(crate) plain: Arc<Channel>,
}

/// Why [`run`] returned.
pub(crate) enum Ended {
    /// The connection was lost (reason inside); every outstanding request has been failed.
    Lost(String),
    /// Shutdown was requested, or every handle was dropped; the connection has been closed.
    Shutdown,
}

/// Opens a channel and puts it in confirm mode.
pub(crate) async fn open_confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
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
    let mut events = std::pin::pin!(link.conn.events_listener());
    let mut p = Publisher {
        shared,
        link,
        pending: Pending::default(),
        next_key: 0,
        exchanges: Exchanges::default(),
        checks: FuturesUnordered::new(),
        max_in_flight: max_unconfirmed.max(1),
        rpc_timeout,
    };
    // The future types of the two kinds of send are unnameable; these locals hold them
    // without a box per message.
    let mut confirms = unordered(send_confirmed);
    let mut plain = unordered(send_plain);
    let mut health = tokio::time::interval(HEALTH_CHECK_EVERY);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    health.reset();

    macro_rules! dispatch {
        ($out:expr) => {
            match $out {
                Outgoing::Confirmed(publish, key) => confirms.push(send_confirmed((publish, key))),
                Outgoing::Plain(publish, metrics) => plain.push(send_plain((publish, metrics))),
            }
        };
    }

    loop {
        let room = p.in_flight(plain.len()) < p.max_in_flight;
        let signal = tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                return p.finish(rx, &mut confirms, &mut plain, "is shutting down").await;
            }
            event = events.next() => match event {
                // lapin reports channel errors (a channel closed by the broker) here too.
                Some(Event::Error(e)) if p.link.conn.status().connected() => {
                    debug!(broker = %shared.name, error = %e, "AMQP channel error");
                    p.health()
                }
                Some(Event::Error(e)) => Signal::ConnectionLost(e.to_string()),
                Some(Event::ConnectionBlocked(reason)) => {
                    let broker = &shared.name;
                    warn!(%broker, %reason, "the broker blocked the connection; publishes wait");
                    Signal::Fine
                }
                Some(Event::ConnectionUnblocked) => {
                    info!(broker = %shared.name, "the broker unblocked the connection");
                    Signal::Fine
                }
                Some(_) => Signal::Fine,
                None => Signal::ConnectionLost("connection dropped".to_owned()),
            },
            Some((key, res)) = confirms.next(), if !confirms.is_empty() => p.confirmed(key, res),
            Some((metrics, res)) = plain.next(), if !plain.is_empty() => p.sent_plain(metrics, res),
            Some((exchange, checked)) = p.checks.next(), if !p.checks.is_empty() => {
                for out in p.on_checked(&exchange, checked) {
                    dispatch!(out);
                }
                Signal::Fine
            }
            _ = health.tick() => p.health(),
            req = rx.recv(), if room => {
                let Some(req) = req else {
                    return p.finish(rx, &mut confirms, &mut plain, "has no publishers left").await;
                };
                if let Some(out) = p.accept(req) {
                    dispatch!(out);
                }
                for _ in 1..BATCH {
                    if p.in_flight(plain.len()) >= p.max_in_flight {
                        break;
                    }
                    let Ok(req) = rx.try_recv() else { break };
                    if let Some(out) = p.accept(req) {
                        dispatch!(out);
                    }
                }
                Signal::Fine
            }
        };
        let lost = match signal {
            Signal::Fine => continue,
            Signal::ConnectionLost(reason) => reason,
            Signal::ChannelDown(i) => match p.recover_channel(i, &mut confirms).await {
                Ok(()) => continue,
                Err(reason) => reason,
            },
            Signal::PlainDown => match p.recover_plain().await {
                Ok(()) => continue,
                Err(reason) => reason,
            },
        };
        return p.lost(lost, &mut confirms, &mut plain).await;
    }
}

/// An empty set for the futures `send` returns (names their type for the compiler).
fn unordered<A, Fut: Future, F: Fn(A) -> Fut>(_send: F) -> FuturesUnordered<Fut> {
    FuturesUnordered::new()
}

/// One `basic.publish`, ready to go.
struct Publish {
    /// The channel it goes out on.
    channel: Arc<Channel>,
    /// Exchange name (verified on this connection).
    exchange: ShortString,
    /// Routing key (length checked).
    routing_key: ShortString,
    /// The message, for its payload.
    msg: Arc<Message>,
    /// Headers and properties built by [`headers::properties`].
    properties: BasicProperties,
}

/// A publish plus what its outcome is reported to.
enum Outgoing {
    /// QoS 1/2: the key of its entry in the in-flight table.
    Confirmed(Publish, u64),
    /// QoS 0: the target's counters.
    Plain(Publish, TargetMetrics),
}

/// Sends one publish on a confirm channel and waits for its confirm.
async fn send_confirmed((p, key): (Publish, u64)) -> (u64, lapin::Result<Confirmation>) {
    let options = BasicPublishOptions::default();
    let res = match p
        .channel
        .basic_publish(p.exchange, p.routing_key, options, &p.msg.payload, p.properties)
        .await
    {
        Ok(confirm) => confirm.await,
        Err(e) => Err(e),
    };
    (key, res)
}

/// Sends one publish on the plain channel; done once it is written to the socket.
async fn send_plain((p, metrics): (Publish, TargetMetrics)) -> (TargetMetrics, lapin::Result<()>) {
    let options = BasicPublishOptions::default();
    let res = match p
        .channel
        .basic_publish(p.exchange, p.routing_key, options, &p.msg.payload, p.properties)
        .await
    {
        // Resolves at once (not requested); awaiting it spares lapin storing a dropped confirm.
        Ok(confirm) => confirm.await.map(drop),
        Err(e) => Err(e),
    };
    (metrics, res)
}

/// A QoS 1/2 publish sent and not yet confirmed.
struct InFlight {
    /// Where its outcome goes.
    ack: AckSender,
    /// Its target's counters.
    metrics: TargetMetrics,
    /// When it was handed to lapin, for the confirm latency.
    sent: Instant,
    /// Index of the confirm channel it went out on.
    channel: usize,
}

/// The in-flight table: keys are sequential, so a multiplicative hash beats SipHash here.
type Pending = HashMap<u64, InFlight, BuildHasherDefault<KeyHasher>>;

/// Fibonacci hashing for the sequential `u64` keys of [`Pending`].
#[derive(Default)]
struct KeyHasher(
    /// The hash so far.
    u64,
);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What the loop must do after handling one event.
enum Signal {
    /// Nothing more.
    Fine,
    /// Confirm channel `i` is closed: fail its publishes and reopen it.
    ChannelDown(usize),
    /// The plain channel is closed: reopen it.
    PlainDown,
    /// The connection is gone (reason inside).
    ConnectionLost(String),
}

/// The state of the loop on one connection.
struct Publisher<'a> {
    /// Name, metrics and counters of the broker.
    shared: &'a Shared,
    /// The connection and its channels.
    link: Link,
    /// QoS 1/2 publishes awaiting their confirm, by key.
    pending: Pending,
    /// Key of the next QoS 1/2 publish.
    next_key: u64,
    /// Which exchanges are known to exist, and the requests waiting for a check.
    exchanges: Exchanges,
    /// Exchange checks in flight (rare, so boxed).
    checks: FuturesUnordered<BoxFuture<'static, (Arc<str>, Checked)>>,
    /// `max_unconfirmed`: bound on unconfirmed + unsent QoS 0 + held requests.
    max_in_flight: usize,
    /// Time allowed for a check or for reopening a channel.
    rpc_timeout: Duration,
}

impl Publisher<'_> {
    /// Requests this connection holds: unconfirmed, QoS 0 not yet written, waiting for a check.
    fn in_flight(&self, plain_sends: usize) -> usize {
        self.pending.len() + plain_sends + self.exchanges.held()
    }

    /// Takes one request in: publishes it, holds it behind an exchange check, or fails it.
    fn accept(&mut self, req: PublishRequest) -> Option<Outgoing> {
        if req.exchange.len() > MAX_SHORT_STRING_LENGTH {
            self.shared.fail(req, || Failure::fatal("exchange name longer than 255 bytes"));
            return None;
        }
        match self.exchanges.route(req) {
            Route::Publish(exchange, req) => self.outgoing(exchange, req),
            Route::Held => None,
            Route::Check(exchange) => {
                let check =
                    exchanges::check(Arc::clone(&self.link.conn), exchange, self.rpc_timeout);
                self.checks.push(Box::pin(check));
                None
            }
            Route::Missing(req) => {
                let exchange = Arc::clone(&req.exchange);
                self.shared.fail(req, || missing_exchange(&exchange));
                None
            }
        }
    }

    /// Builds the publish for a request whose exchange is verified, registering QoS 1/2 ones.
    fn outgoing(&mut self, exchange: ShortString, mut req: PublishRequest) -> Option<Outgoing> {
        let routing_key = match ShortString::try_new(std::mem::take(&mut req.routing_key)) {
            Ok(key) => key,
            Err(_) => {
                self.shared.fail(req, || Failure::fatal("routing key longer than 255 bytes"));
                return None;
            }
        };
        let PublishRequest { msg, ack, metrics, .. } = req;
        Some(match ack {
            None => {
                let properties = headers::properties(&msg, TRANSIENT);
                let channel = Arc::clone(&self.link.plain);
                Outgoing::Plain(
                    Publish { channel, exchange, routing_key, msg, properties },
                    metrics,
                )
            }
            Some(ack) => {
                // One topic always uses the same channel: RabbitMQ keeps order per channel, so
                // messages of one topic reach their queues in the order they were published.
                let i = channel_for(&msg.topic, self.link.confirm.len());
                let key = self.next_key;
                self.next_key += 1;
                let properties = headers::properties(&msg, PERSISTENT);
                let channel = Arc::clone(&self.link.confirm[i]);
                let sent = Instant::now();
                self.pending.insert(key, InFlight { ack, metrics, sent, channel: i });
                self.shared.metrics.unconfirmed.inc();
                Outgoing::Confirmed(
                    Publish { channel, exchange, routing_key, msg, properties },
                    key,
                )
            }
        })
    }

    /// Resolves one QoS 1/2 request from its confirm (or the error lapin gave instead).
    fn confirmed(&mut self, key: u64, res: lapin::Result<Confirmation>) -> Signal {
        // Absent when it was already failed in bulk (channel closed, connection lost).
        let Some(entry) = self.take(key) else { return Signal::Fine };
        let channel = entry.channel;
        let name = &self.shared.name;
        match res {
            Ok(Confirmation::Ack(_)) => {
                self.shared.metrics.confirm_latency.observe(entry.sent.elapsed().as_secs_f64());
                entry.metrics.forwarded.inc();
                let _ = entry.ack.send(Outcome::Delivered);
                Signal::Fine
            }
            Ok(Confirmation::Nack(_)) => {
                self.shared.metrics.nacks.inc();
                entry.fail(Failure::fatal("nacked by broker"));
                Signal::Fine
            }
            // Only possible if a confirm channel lost confirm mode; never taken for success.
            Ok(Confirmation::NotRequested) => {
                entry
                    .fail(Failure::retryable(format!("broker {name} did not confirm the publish")));
                Signal::ChannelDown(channel)
            }
            Err(e) => {
                if !self.link.conn.status().connected() {
                    let reason = e.to_string();
                    entry.fail(Failure::retryable(connection_lost(name, &reason)));
                    Signal::ConnectionLost(reason)
                } else if !self.link.confirm[channel].status().connected() {
                    entry.fail(Failure::retryable(format!("channel to {name} closed: {e}")));
                    Signal::ChannelDown(channel)
                } else {
                    entry.fail(Failure::retryable(format!("publish to {name} failed: {e}")));
                    Signal::Fine
                }
            }
        }
    }

    /// Counts one QoS 0 send.
    fn sent_plain(&mut self, metrics: TargetMetrics, res: lapin::Result<()>) -> Signal {
        match res {
            Ok(()) => {
                metrics.forwarded.inc();
                Signal::Fine
            }
            Err(e) => {
                metrics.failed.inc();
                self.shared.unavailable.inc();
                if !self.link.conn.status().connected() {
                    Signal::ConnectionLost(e.to_string())
                } else if !self.link.plain.status().connected() {
                    Signal::PlainDown
                } else {
                    Signal::Fine
                }
            }
        }
    }

    /// Releases the requests that waited for a check of `exchange`.
    fn on_checked(&mut self, exchange: &Arc<str>, checked: Checked) -> Vec<Outgoing> {
        let name = &self.shared.name;
        match self.exchanges.checked(exchange, checked) {
            None => Vec::new(),
            Some(Released::Publish(ex, reqs)) => {
                debug!(broker = %name, exchange = %exchange, "exchange exists");
                reqs.into_iter().filter_map(|req| self.outgoing(ex.clone(), req)).collect()
            }
            Some(Released::Missing(reqs)) => {
                warn!(broker = %name, exchange = %exchange, failed = reqs.len(),
                    "exchange does not exist; failing its publishes");
                for req in reqs {
                    self.shared.fail(req, || missing_exchange(exchange));
                }
                Vec::new()
            }
            Some(Released::Unknown(reason, reqs)) => {
                warn!(broker = %name, %exchange, %reason, "could not check the exchange");
                let failure = Failure::retryable(format!(
                    "could not check exchange '{exchange}' on broker {name}: {reason}"
                ));
                for req in reqs {
                    self.shared.fail_unavailable(req, || failure.clone());
                }
                Vec::new()
            }
        }
    }

    /// Looks at the connection and channel states (a safety net behind events and futures).
    fn health(&self) -> Signal {
        if !self.link.conn.status().connected() {
            return Signal::ConnectionLost("the connection is no longer open".to_owned());
        }
        if let Some(i) = self.link.confirm.iter().position(|c| !c.status().connected()) {
            return Signal::ChannelDown(i);
        }
        if !self.link.plain.status().connected() {
            return Signal::PlainDown;
        }
        Signal::Fine
    }

    /// Confirm channel `i` was closed (by the broker, e.g. an exchange deleted while in use):
    /// resolve what lapin resolved, fail the rest of that channel's publishes, forget which
    /// exchanges exist, and reopen it. `Err` means the connection has to go.
    async fn recover_channel<F>(
        &mut self,
        i: usize,
        confirms: &mut FuturesUnordered<F>,
    ) -> Result<(), String>
    where
        F: Future<Output = (u64, lapin::Result<Confirmation>)>,
    {
        let name = &self.shared.name;
        if let Some(reason) = self
            .harvest(confirms, CHANNEL_HARVEST, |p| !p.pending.values().any(|e| e.channel == i))
            .await
        {
            return Err(reason);
        }
        let reason = format!("channel to {name} was closed by the broker");
        let failed = self.fail_pending(|e| e.channel == i, &reason);
        self.exchanges.forget_verified();
        warn!(broker = %name, channel = i, failed, "channel closed by the broker; reopening it");
        match tokio::time::timeout(self.rpc_timeout, open_confirm_channel(&self.link.conn)).await {
            Ok(Ok(channel)) => {
                self.link.confirm[i] = Arc::new(channel);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("could not reopen a channel: {e}")),
            Err(_) => Err(format!("could not reopen a channel within {:?}", self.rpc_timeout)),
        }
    }

    /// The QoS 0 channel was closed by the broker: forget which exchanges exist and reopen it.
    async fn recover_plain(&mut self) -> Result<(), String> {
        self.exchanges.forget_verified();
        let broker = &self.shared.name;
        warn!(%broker, "channel for QoS 0 closed by the broker; reopening it");
        match tokio::time::timeout(self.rpc_timeout, self.link.conn.create_channel()).await {
            Ok(Ok(channel)) => {
                self.link.plain = Arc::new(channel);
                Ok(())
            }
            Ok(Err(e)) => Err(format!("could not reopen a channel: {e}")),
            Err(_) => Err(format!("could not reopen a channel within {:?}", self.rpc_timeout)),
        }
    }

    /// The connection is gone: take the outcomes lapin already resolved, fail everything else
    /// this connection held (retryable), and report the loss.
    async fn lost<C, P>(
        mut self,
        reason: String,
        confirms: &mut FuturesUnordered<C>,
        plain: &mut FuturesUnordered<P>,
    ) -> Ended
    where
        C: Future<Output = (u64, lapin::Result<Confirmation>)>,
        P: Future<Output = (TargetMetrics, lapin::Result<()>)>,
    {
        self.shared.set_connected(false);
        let before = self.pending.len();
        self.harvest(confirms, LOSS_HARVEST, |p| p.pending.is_empty()).await;
        self.harvest_plain(plain, LOSS_HARVEST).await;
        let reason = connection_lost(&self.shared.name, &reason);
        let failed_here = self.fail_pending(|_| true, &reason);
        let held = self.exchanges.take_held();
        let held_n = held.len();
        for req in held {
            self.shared.fail_unavailable(req, || Failure::retryable(reason.clone()));
        }
        debug!(
            broker = %self.shared.name,
            unconfirmed = before,
            resolved_by_lapin = before - failed_here,
            failed_here,
            held = held_n,
            qos0_unsent = plain.len(),
            "failed the publishes of the lost connection"
        );
        Ended::Lost(reason)
    }

    /// Stops taking requests, fails what is queued, waits up to [`SHUTDOWN_DRAIN`] for the
    /// outstanding confirms, fails the rest, and closes the connection.
    async fn finish<C, P>(
        mut self,
        rx: &mut mpsc::Receiver<PublishRequest>,
        confirms: &mut FuturesUnordered<C>,
        plain: &mut FuturesUnordered<P>,
        why: &str,
    ) -> Ended
    where
        C: Future<Output = (u64, lapin::Result<Confirmation>)>,
        P: Future<Output = (TargetMetrics, lapin::Result<()>)>,
    {
        let name = &self.shared.name;
        info!(broker = %name, unconfirmed = self.pending.len(), "AMQP sink {why}; draining");
        super::reject_queued(self.shared, rx);
        for req in self.exchanges.take_held() {
            self.shared.fail_unavailable(req, || {
                Failure::retryable(format!("broker {name} sink is shutting down"))
            });
        }
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        self.harvest(confirms, SHUTDOWN_DRAIN, |p| p.pending.is_empty()).await;
        self.harvest_plain(plain, deadline.saturating_duration_since(Instant::now())).await;
        let failed = self.fail_pending(
            |_| true,
            &format!("broker {name} sink shut down before the confirm arrived"),
        );
        if failed > 0 {
            warn!(broker = %name, failed, "confirms still outstanding at shutdown");
        }
        self.shared.set_connected(false);
        let close = self.link.conn.close(200, ShortString::from("OK"));
        match tokio::time::timeout(Duration::from_secs(2), close).await {
            Ok(Ok(())) => info!(broker = %name, "closed the AMQP connection"),
            Ok(Err(e)) => debug!(broker = %name, error = %e, "closing the AMQP connection"),
            Err(_) => debug!(broker = %name, "the AMQP connection did not close in time"),
        }
        Ended::Shutdown
    }

    /// Resolves confirms as they come until `done` or `within` has passed.
    /// Returns the reason if one of them shows the connection is lost.
    async fn harvest<F>(
        &mut self,
        confirms: &mut FuturesUnordered<F>,
        within: Duration,
        done: impl Fn(&Self) -> bool,
    ) -> Option<String>
    where
        F: Future<Output = (u64, lapin::Result<Confirmation>)>,
    {
        let deadline = tokio::time::Instant::now() + within;
        let mut lost = None;
        while !confirms.is_empty() && !done(self) {
            match tokio::time::timeout_at(deadline, confirms.next()).await {
                Ok(Some((key, res))) => {
                    if let Signal::ConnectionLost(reason) = self.confirmed(key, res) {
                        lost.get_or_insert(reason);
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        lost
    }

    /// Counts QoS 0 sends as they finish, for at most `within`.
    async fn harvest_plain<F>(&mut self, plain: &mut FuturesUnordered<F>, within: Duration)
    where
        F: Future<Output = (TargetMetrics, lapin::Result<()>)>,
    {
        let deadline = tokio::time::Instant::now() + within;
        while let Ok(Some((metrics, res))) = tokio::time::timeout_at(deadline, plain.next()).await {
            self.sent_plain(metrics, res);
        }
    }

    /// Removes one in-flight entry.
    fn take(&mut self, key: u64) -> Option<InFlight> {
        let entry = self.pending.remove(&key)?;
        self.shared.metrics.unconfirmed.dec();
        Some(entry)
    }

    /// Fails (retryable, `reason`) every in-flight entry that matches; returns how many.
    fn fail_pending(&mut self, matches: impl Fn(&InFlight) -> bool, reason: &str) -> usize {
        let keys: Vec<u64> =
            self.pending.iter().filter(|(_, e)| matches(e)).map(|(k, _)| *k).collect();
        for key in &keys {
            if let Some(entry) = self.take(*key) {
                entry.fail(Failure::retryable(reason));
            }
        }
        keys.len()
    }
}

impl InFlight {
    /// Reports `failure` and counts it.
    fn fail(self, failure: Failure) {
        self.metrics.failed.inc();
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

/// The confirm channel for messages of `topic`: stable per topic, spread across topics.
fn channel_for(topic: &str, channels: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(topic, &mut h);
    (h.finish() % channels.max(1) as u64) as usize
}
