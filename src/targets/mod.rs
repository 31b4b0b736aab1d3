//! Targets: where messages leave mqgate for another system. One folder per kind, each
//! implementing [`Target`] and registered once in [`kinds`].
//!
//! A sink owns its connections and reports each message's [`Outcome`] exactly once through the
//! `oneshot` that came with it. It never decides what a device is told: the session does, from
//! the outcomes. A sink that drops an ack sender without reporting is treated as a failure by
//! the session (a closed channel is never taken for success).

pub mod amqp;
pub mod amqp10;
pub mod http;
pub mod ids;
pub mod kafka;
pub mod kinds;
pub mod mqtt;
pub mod zmq;

use std::sync::Arc;

use crate::deadletters::Recorder;
use crate::message::Message;
use crate::mqtt::codec::ReasonCode;
use crate::rules::LazyContext;
use crate::template::TemplateError;

/// The result of handing one message to one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The target has taken responsibility (AMQP confirm, HTTP 2xx).
    Delivered,
    /// The target did not take it.
    Failed(Failure),
}

/// Why a target did not take a message, and whether trying again could help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Final failures (nack, missing exchange, invalid routing key) will fail again if the same
    /// message is retried as is; retryable ones (connection lost, broker down) may not.
    pub retryable: bool,
    /// A short human-readable reason: goes into logs and the MQTT 5 reason string.
    pub reason: String,
    /// The MQTT 5 reason code to answer with instead of the default one for a final failure
    /// (e.g. 0x10 No matching subscribers for a message RabbitMQ returned as unroutable).
    pub code: Option<ReasonCode>,
}

impl Failure {
    /// A failure that a retry may cure (the broker is down, the connection was lost).
    pub fn retryable(reason: impl Into<String>) -> Self {
        Failure { retryable: true, reason: reason.into(), code: None }
    }

    /// A failure that a retry of the same message will not cure.
    pub fn fatal(reason: impl Into<String>) -> Self {
        Failure { retryable: false, reason: reason.into(), code: None }
    }

    /// A final failure the MQTT 5 client is told about with `code`.
    pub fn with_code(reason: impl Into<String>, code: ReasonCode) -> Self {
        Failure { retryable: false, reason: reason.into(), code: Some(code) }
    }
}

/// The sender half on which a sink reports one target's outcome.
pub type AckSender = tokio::sync::oneshot::Sender<Outcome>;

/// The outcome receivers one message waits for: one per target (and one per durable write),
/// kept inline for the usual one or two.
pub type Waits = smallvec::SmallVec<[tokio::sync::oneshot::Receiver<Outcome>; 2]>;

/// A request a target could not take at once: a future that waits for room in its sink's queue
/// and hands the request over. Built only on that slow path.
pub type BlockedSend = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Requests targets could not take at once, in routing order. The caller awaits them in order
/// with [`send_blocked`]: that wait is the backpressure from the sinks to the client.
pub type Blocked = Vec<BlockedSend>;

/// Hands over requests that found their sink's queue full, in order, waiting for room.
pub async fn send_blocked(blocked: Blocked) {
    for send in blocked {
        send.await;
    }
}

/// What a target hands one message over with: where its outcome receivers go, the requests
/// that must wait for room (kept in order), and the dead-letter recorder of final failures.
pub struct Handoff<'a> {
    waits: &'a mut Waits,
    blocked: &'a mut Blocked,
    acked: bool,
    /// False for an `ack: receive` rule: its outcome receivers are dropped unread.
    awaited: bool,
    dead_letter: Option<Arc<Recorder>>,
}

impl<'a> Handoff<'a> {
    /// A hand-over whose outcomes go into `waits` when `acked` (a QoS 1/2 message, a spool's or
    /// a replay's send), and whose requests wait in `blocked` once one has had to.
    pub fn new(
        waits: &'a mut Waits,
        blocked: &'a mut Blocked,
        acked: bool,
        dead_letter: Option<Arc<Recorder>>,
    ) -> Self {
        Handoff { waits, blocked, acked, awaited: true, dead_letter }
    }

    /// The same hand-over for an `ack: receive` rule: nobody reads the outcomes.
    pub fn unawaited(mut self) -> Self {
        self.awaited = false;
        self
    }

    /// Whether anybody reads the outcome of [`Handoff::ack`]: false for an `ack: receive`
    /// rule. A kind whose outcome says nothing more than its own counters do (ZeroMQ) may
    /// skip the channel then.
    pub fn awaited(&self) -> bool {
        self.awaited
    }

    /// The sender of one request's outcome, its receiver added to what the message waits for;
    /// `None` when nobody waits (QoS 0).
    pub fn ack(&mut self) -> Option<AckSender> {
        self.acked.then(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.waits.push(rx);
            tx
        })
    }

    /// The recorder that keeps this target's final failures as dead letters, if any.
    pub fn dead_letter(&self) -> Option<Arc<Recorder>> {
        self.dead_letter.clone()
    }

    /// Hands `req` to a sink: `try_send` now when nothing before it had to wait, else (or when
    /// the sink's queue is full) `wait(req)` joins the blocked requests, so every sink gets its
    /// requests in routing order.
    pub fn offer<R>(
        &mut self,
        req: R,
        try_send: impl FnOnce(R) -> Result<(), R>,
        wait: impl FnOnce(R) -> BlockedSend,
    ) {
        if !self.blocked.is_empty() {
            self.blocked.push(wait(req));
        } else if let Err(req) = try_send(req) {
            self.blocked.push(wait(req));
        }
    }
}

/// One destination of a rule: an AMQP exchange, an HTTP endpoint, and every kind to come.
/// Each kind lives in its own folder and is registered once ([`kinds`]).
///
/// The contract every kind keeps (the model is AMQP): exactly one [`Outcome`] per request whose
/// [`Handoff::ack`] sender it took, sent when the other system has taken responsibility (or
/// failed); a dropped sender counts as a retryable failure; requests of one target keep their
/// order per topic. `hand_over` never waits: a full queue goes through [`Handoff::offer`].
pub trait Target: std::fmt::Debug + Send + Sync {
    /// The target's stable id: what spool keys, dead letters and replays name.
    fn id(&self) -> &str;

    /// Hands `msg` over. `ctx` is the message's template context, built on first use and
    /// shared with the other targets and rules. An error is a template that cannot be rendered
    /// for this message: nothing was sent.
    fn hand_over(
        &self,
        msg: &Arc<Message>,
        ctx: &mut LazyContext,
        hand: &mut Handoff<'_>,
    ) -> Result<(), TemplateError>;

    /// What [`hand_over`](Self::hand_over) would send for `msg`, resolved as it would be
    /// (templates rendered, names mapped) but sent nowhere: the route dry-run (`mqgate route`,
    /// `POST /api/v1/route`). Each kind answers for itself; no I/O, no counters.
    fn explain(&self, msg: &Arc<Message>, ctx: &mut LazyContext) -> Explained;

    /// Starts what the target runs on its own (an HTTP target's lanes). Building a target
    /// starts nothing, so a rule set can be compiled without side effects (the dry-run, a
    /// reload that may be refused); the gateway calls this once it keeps the rule set.
    fn start(&self) {}

    /// Its forwarded/failed counters (`mqgate_target_forwarded_total`, `..._failed_total`),
    /// which the web console shows beside the rule.
    fn counters(&self) -> Option<&crate::metrics::TargetMetrics> {
        None
    }
}

/// One target's answer to [`Target::explain`]: what it would send, field by field in the
/// kind's own order (`exchange`, `routing_key`; `method`, `url`, `headers`, `body`; ...).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Explained {
    /// The target's id.
    pub id: String,
    /// Its kind: its key in a rule's `to:`.
    pub kind: &'static str,
    /// What it resolved, in order.
    #[serde(serialize_with = "ordered_fields")]
    pub fields: Vec<(&'static str, serde_json::Value)>,
    /// Why the message would not be sent (a template that cannot render for it): the rule's
    /// `on_error` then decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Remarks: what the dry-run cannot know or what happens beside the fields.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Explained {
    /// An empty answer for target `id` of kind `kind`.
    pub fn new(id: &str, kind: &'static str) -> Explained {
        Explained { id: id.to_owned(), kind, fields: Vec::new(), error: None, notes: Vec::new() }
    }

    /// Adds a field.
    pub fn field(&mut self, name: &'static str, value: impl Into<serde_json::Value>) {
        self.fields.push((name, value.into()));
    }

    /// Adds a remark.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }
}

/// The fields as one JSON object, in their order.
fn ordered_fields<S: serde::Serializer>(
    fields: &[(&'static str, serde_json::Value)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut map = s.serialize_map(Some(fields.len()))?;
    for (k, v) in fields {
        map.serialize_entry(k, v)?;
    }
    map.end()
}

/// Hands `msg` to `target` outside a session (the spool's forwarder, a dead letter's replay):
/// waits for room in the sink's queue, then returns its pending outcome. The outcome is always
/// a real one (an AMQP confirm, an HTTP 2xx), whatever the message's QoS. Awaiting the returned
/// [`Delivery`] is separate so a caller can keep several in flight.
pub async fn send(target: &dyn Target, msg: &Arc<Message>) -> Delivery {
    let mut waits = Waits::new();
    let mut blocked = Blocked::new();
    let mut hand = Handoff::new(&mut waits, &mut blocked, true, None);
    let failed = target
        .hand_over(msg, &mut None, &mut hand)
        .err()
        .map(|e| Failure::fatal(format!("template: {e}")));
    send_blocked(blocked).await;
    Delivery { waits, failed }
}

/// The pending outcome of [`send`].
#[derive(Debug)]
pub struct Delivery {
    waits: Waits,
    /// A failure known before anything was sent (a template that cannot be rendered).
    failed: Option<Failure>,
}

impl Delivery {
    /// The outcome: delivered when every request it made was; else the first failure. A sink
    /// that dropped the message without an answer counts as a retryable failure.
    pub async fn outcome(self) -> Outcome {
        if let Some(f) = self.failed {
            return Outcome::Failed(f);
        }
        for rx in self.waits {
            match rx.await {
                Ok(Outcome::Delivered) => {}
                Ok(failed) => return failed,
                Err(_) => {
                    return Outcome::Failed(Failure::retryable("the sink dropped the message"))
                }
            }
        }
        Outcome::Delivered
    }
}
