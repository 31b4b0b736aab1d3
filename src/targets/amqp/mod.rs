//! The AMQP 0-9-1 sink: publishes rule targets' messages to RabbitMQ.
//!
//! One [`AmqpBroker`] per configured broker: a cheap handle in front of one task that owns the
//! broker's connection (see `supervisor`) and, while it is up, publishes on a small pool of
//! confirm-mode channels (see `publisher`). Every request with an ack gets exactly one
//! [`Outcome`]: `Delivered` only from a broker confirm, `Failed` otherwise — never left
//! hanging, also when the connection drops. This module does not decide what a device is told
//! and does not route; it only publishes what it is handed, in the order it is handed over.
//!
//! Layout: `headers` maps a message to AMQP properties, `exchanges` verifies exchanges before
//! the first publish, `publisher` is the hot path on a live connection, `supervisor` connects,
//! reconnects and fails requests while the broker is unreachable. The AMQP protocol is our own
//! (no client library): `wire` encodes and decodes frames, `transport` owns the socket, the URL
//! and the handshake; the publisher task drives the socket itself, with no extra thread.

pub mod config;
mod exchanges;
mod headers;
mod kind;
mod publisher;
pub(crate) mod queues;
mod supervisor;
pub mod target;
#[cfg(test)]
mod tests;
pub mod tls;
pub(crate) mod transport;
pub(crate) mod wire;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::deadletters::Recorder;
use crate::message::Message;
use crate::metrics::{BrokerMetrics, Metrics, ReasonLabels, TargetMetrics};
use crate::rules::mapping::TopicMapping;
use crate::targets::{AckSender, Failure, Outcome};
use config::{AmqpBrokerConfig, UnroutablePolicy};

pub use headers::{
    message_id, HEADER_CLIENT_ID, HEADER_CORRELATION_DATA, HEADER_PAYLOAD_FORMAT, HEADER_QOS,
    HEADER_RESPONSE_TOPIC, HEADER_RETAIN, HEADER_TOPIC, MESSAGE_ID_PREFIX,
};
pub use kind::AmqpKind;
pub use queues::{last_value_queue_name, QueueSpec, LAST_VALUE_PREFIX};
pub use wire::MAX_SHORT_STRING_LENGTH;

/// Reason label of `messages_dropped` for QoS 0 messages that found the broker unavailable.
pub const DROPPED_UNAVAILABLE: &str = "amqp_unavailable";

/// One AMQP publish for one rule target.
#[derive(Debug)]
pub struct PublishRequest {
    /// The exchange, from the rule target (shared by all its requests).
    pub exchange: Arc<str>,
    /// The routing key, computed by the rule engine for this message.
    pub routing_key: String,
    /// The message; its payload goes out unchanged.
    pub msg: Arc<Message>,
    /// `Some` for QoS 1/2: exactly one [`Outcome`] is reported on it. `None` for QoS 0.
    pub ack: Option<AckSender>,
    /// The rule target's counters; the sink counts `forwarded`/`failed` here.
    pub metrics: TargetMetrics,
    /// Per-target publish options (mandatory, mapping, queue to declare); default for a plain
    /// rule target.
    pub options: PublishOptions,
    /// Where the message is kept if it fails for good (a nack, a return, a missing exchange):
    /// set for a session's messages when a store is configured; `None` for `Target::send`
    /// (its caller handles the outcome) and without a store.
    pub dead_letter: Option<Arc<Recorder>>,
}

/// How one request is published, beyond exchange and routing key. The default (a plain
/// target) costs nothing: no flag, no declare.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// `mandatory: true`: publish with the mandatory flag; a `basic.return` fails the message
    /// with this policy's MQTT 5 reason code.
    pub mandatory: Option<UnroutablePolicy>,
    /// The target's topic mapping (for `reply_to`).
    pub mapping: TopicMapping,
    /// A queue declared (once per connection) before the first publish that names it.
    pub declare: Option<Arc<QueueSpec>>,
    /// Purge the `declare` queue instead of publishing (an empty retained message clears the
    /// topic's last value).
    pub purge: bool,
}

/// A cheap-to-clone handle on one broker's sink.
#[derive(Clone)]
pub struct AmqpBroker {
    /// The bounded queue in front of the sink task (`queue` in the config): the backpressure.
    tx: mpsc::Sender<PublishRequest>,
    /// State shared with the sink task.
    shared: Arc<Shared>,
}

/// What the handle and the sink task share.
pub(crate) struct Shared {
    /// The broker's key under `amqp:`, for logs and failure reasons.
    name: String,
    /// True while the connection and its channels are up.
    connected: AtomicBool,
    /// The broker's metric handles.
    metrics: BrokerMetrics,
    /// `messages_dropped{reason="amqp_unavailable"}`, resolved once.
    unavailable: Counter,
    /// Why the last connection attempt failed (for `/readyz`); cleared once connected.
    last_error: std::sync::Mutex<Option<String>>,
}

impl AmqpBroker {
    /// Starts the connection supervisor task for broker `name`. The task ends after `shutdown`
    /// is cancelled (or every handle is dropped), once it has drained and closed the connection.
    pub fn spawn(
        name: &str,
        cfg: &AmqpBrokerConfig,
        metrics: &Metrics,
        shutdown: CancellationToken,
    ) -> (AmqpBroker, JoinHandle<()>) {
        let (broker, rx) = AmqpBroker::handle(name, cfg, metrics);
        let settings = supervisor::Settings::from_config(cfg);
        let shared = Arc::clone(&broker.shared);
        let task = supervisor::Supervisor::new(shared, settings, rx, shutdown);
        let handle = tokio::spawn(task.run());
        (broker, handle)
    }

    /// A handle on broker `name` with no sink behind it: no task, no connection (the route
    /// dry-run builds its targets on these). A publish to it fails as "not running".
    pub fn detached(name: &str, cfg: &AmqpBrokerConfig, metrics: &Metrics) -> AmqpBroker {
        AmqpBroker::handle(name, cfg, metrics).0
    }

    /// The handle and the receiving end of its queue.
    fn handle(
        name: &str,
        cfg: &AmqpBrokerConfig,
        metrics: &Metrics,
    ) -> (AmqpBroker, mpsc::Receiver<PublishRequest>) {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let unavailable = ReasonLabels { reason: DROPPED_UNAVAILABLE.to_owned() };
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            connected: AtomicBool::new(false),
            metrics: metrics.broker(name),
            unavailable: metrics.messages_dropped.get_or_create(&unavailable).clone(),
            last_error: std::sync::Mutex::new(None),
        });
        shared.metrics.connected.set(0);
        (AmqpBroker { tx, shared }, rx)
    }

    /// Queues a publish; waits while the queue is full — that is the backpressure. A request
    /// that cannot succeed (name too long, broker not connected, sink gone) is failed at once.
    pub async fn publish(&self, req: PublishRequest) {
        let Some(req) = self.admit(req) else { return };
        if let Err(mpsc::error::SendError(req)) = self.tx.send(req).await {
            self.fail_not_running(req);
        }
    }

    /// Queues a publish if the queue has room, without waiting; hands the request back when
    /// the queue is full (then [`publish`](Self::publish) waits for room). Like `publish`, a
    /// request that cannot succeed is failed at once.
    pub fn try_publish(&self, req: PublishRequest) -> Result<(), PublishRequest> {
        let Some(req) = self.admit(req) else { return Ok(()) };
        match self.tx.try_send(req) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(req)) => Err(req),
            Err(mpsc::error::TrySendError::Closed(req)) => {
                self.fail_not_running(req);
                Ok(())
            }
        }
    }

    /// The checks before queueing: fails (and consumes) a request that cannot succeed as is.
    fn admit(&self, req: PublishRequest) -> Option<PublishRequest> {
        if req.routing_key.len() > MAX_SHORT_STRING_LENGTH {
            self.shared.fail(req, || Failure::fatal("routing key longer than 255 bytes"));
            return None;
        }
        if req.exchange.len() > MAX_SHORT_STRING_LENGTH {
            self.shared.fail(req, || Failure::fatal("exchange name longer than 255 bytes"));
            return None;
        }
        if !self.is_connected() {
            self.shared.fail_unavailable(req, || self.shared.not_connected());
            return None;
        }
        Some(req)
    }

    /// Fails a request whose sink task is gone.
    fn fail_not_running(&self, req: PublishRequest) {
        let name = &self.shared.name;
        self.shared.fail_unavailable(req, || {
            Failure::retryable(format!("broker {name} sink is not running"))
        });
    }

    /// True while the AMQP connection and its channels are up (for /readyz).
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// The broker's key under `amqp:`.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

impl AmqpBroker {
    /// Why the last connection attempt failed, while disconnected.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().ok().and_then(|e| e.clone())
    }
}

impl fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("name", &self.shared.name)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Shared {
    /// Records whether the connection is up, for [`AmqpBroker::is_connected`] and the gauge.
    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        self.metrics.connected.set(i64::from(up));
        if up {
            self.set_last_error(None);
        }
    }

    /// Records why connecting failed (no credentials in it: errors never quote the URL).
    fn set_last_error(&self, error: Option<String>) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = error;
        }
    }

    /// The failure of a request that finds the broker disconnected.
    fn not_connected(&self) -> Failure {
        Failure::retryable(format!("broker {} is not connected", self.name))
    }

    /// Fails a request whose publish cannot work as is: counts it failed for its target and
    /// reports `failure()` on its ack (built only when there is one).
    /// A final failure of a request that carries a recorder also keeps it as a dead letter.
    fn fail(&self, req: PublishRequest, failure: impl FnOnce() -> Failure) {
        req.metrics.failed.inc();
        if req.ack.is_none() && req.dead_letter.is_none() {
            return;
        }
        let failure = failure();
        if let (Some(r), false) = (&req.dead_letter, failure.retryable) {
            r.record(&req.msg, &failure.reason);
        }
        if let Some(ack) = req.ack {
            let _ = ack.send(Outcome::Failed(failure));
        }
    }

    /// Fails a request because the broker is unavailable; a QoS 0 one is also counted as
    /// dropped (`amqp_unavailable`).
    fn fail_unavailable(&self, req: PublishRequest, failure: impl FnOnce() -> Failure) {
        if req.ack.is_none() {
            self.unavailable.inc();
        }
        self.fail(req, failure);
    }
}

/// Stops the queue taking requests and fails the ones in it (retryable): the sink is stopping.
fn reject_queued(shared: &Shared, rx: &mut mpsc::Receiver<PublishRequest>) {
    rx.close();
    while let Ok(req) = rx.try_recv() {
        shared.fail_unavailable(req, || {
            Failure::retryable(format!("broker {} sink is shutting down", shared.name))
        });
    }
}
