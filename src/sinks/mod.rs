//! Sinks: where messages leave mqgate for another system. One folder per sink kind.
//!
//! A sink owns its connections and reports each message's [`Outcome`] exactly once through the
//! `oneshot` that came with it. It never decides what a device is told: the session does, from
//! the outcomes. A sink that drops an ack sender without reporting is treated as a failure by
//! the session (a closed channel is never taken for success).

pub mod amqp;
pub mod http;

use crate::mqtt::codec::ReasonCode;

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
