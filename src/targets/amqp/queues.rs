//! Queues mqgate declares itself — job queues (`queue:` targets) and last-value queues
//! (`last_value: true`) — and which of them are declared on the current connection.
//!
//! The first request naming a queue on a connection waits for a `queue.declare` (on the
//! publisher's check channel); later ones publish at once. A new connection starts with an
//! empty cache, so every queue is declared again after a reconnect (it may have been deleted
//! meanwhile). A declare RabbitMQ refuses (a queue of that name with other arguments: 406) fails
//! the waiting requests and is retried after [`RETRY_REFUSED_AFTER`]. Owns the cache and the
//! held requests; does no I/O and reports no outcome itself (the publisher does).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::wire::methods::QueueFlags;
use super::wire::table::Value;
use super::wire::MAX_SHORT_STRING_LENGTH;
use super::PublishRequest;
use crate::config::ArgumentValue;
use crate::rules::mapping::{encode_topic, TopicMapping};

/// How long a refused declare is remembered before the next request tries again.
pub(crate) const RETRY_REFUSED_AFTER: Duration = Duration::from_secs(1);

/// Prefix of every last-value queue's name; the rest is the topic in the lossless mapping.
pub const LAST_VALUE_PREFIX: &str = "mqgate.last_value.";

/// A queue to declare: durable, with arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Its name (at most 255 bytes).
    pub name: Arc<str>,
    /// Declare arguments, in config order.
    pub arguments: Vec<(String, ArgumentValue)>,
}

impl QueueSpec {
    /// How mqgate declares its job and last-value queues: durable, shared, kept.
    pub const FLAGS: QueueFlags =
        QueueFlags { passive: false, durable: true, exclusive: false, auto_delete: false };

    /// A job queue named `name` with `arguments` from the config.
    pub fn job(name: &str, arguments: Vec<(String, ArgumentValue)>) -> QueueSpec {
        QueueSpec { name: Arc::from(name), arguments }
    }

    /// The last-value queue of `topic`: at most one message, the oldest dropped
    /// (`x-max-length: 1`, `x-overflow: drop-head`).
    pub fn last_value(topic: &str) -> QueueSpec {
        QueueSpec {
            name: Arc::from(last_value_queue_name(topic)),
            arguments: vec![
                ("x-max-length".to_owned(), ArgumentValue::Int(1)),
                ("x-overflow".to_owned(), ArgumentValue::Text("drop-head".to_owned())),
            ],
        }
    }

    /// The arguments as field-table entries (for the declare).
    pub(crate) fn table(&self) -> Vec<(&str, Value<'_>)> {
        argument_table(&self.arguments)
    }
}

/// Queue `arguments:` from the config as field-table entries (job queues, sources).
pub(crate) fn argument_table(arguments: &[(String, ArgumentValue)]) -> Vec<(&str, Value<'_>)> {
    arguments
        .iter()
        .map(|(k, v)| {
            let v = match v {
                ArgumentValue::Bool(b) => Value::Bool(*b),
                ArgumentValue::Int(n) => Value::I64(*n),
                ArgumentValue::Text(t) => Value::LongString(t.as_bytes()),
            };
            (k.as_str(), v)
        })
        .collect()
}

/// The name of `topic`'s last-value queue: [`LAST_VALUE_PREFIX`] and the topic in the lossless
/// mapping (`sensors/a/temp` → `mqgate.last_value.sensors.a.temp`). A name that would pass 255
/// bytes is cut at a character boundary and ends in `~` and 32 hex digits of a SHA-256 hash of
/// the topic, so it stays unique and within AMQP's limit.
pub fn last_value_queue_name(topic: &str) -> String {
    let mut name = String::from(LAST_VALUE_PREFIX);
    name.push_str(&encode_topic(TopicMapping::Lossless, topic));
    if name.len() <= MAX_SHORT_STRING_LENGTH {
        return name;
    }
    let mut cut = MAX_SHORT_STRING_LENGTH - 33;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    name.truncate(cut);
    name.push('~');
    let digest = Sha256::digest(topic.as_bytes());
    for b in &digest[..16] {
        use std::fmt::Write;
        let _ = write!(name, "{b:02x}");
    }
    name
}

/// What is known about one queue on this connection.
enum State {
    /// Declared on this connection.
    Declared,
    /// A declare is in flight; these requests wait for it, in arrival order.
    Declaring(Vec<PublishRequest>),
    /// RabbitMQ refused the declare at this instant, for this reason.
    Refused(Instant, String),
}

/// What the publisher should do with a request that names a queue.
pub(crate) enum QueueRoute {
    /// The queue is declared: go on with the request.
    Ready(PublishRequest),
    /// It waits behind a declare already in flight.
    Held,
    /// Declare this queue; the request waits for it.
    Declare(Arc<QueueSpec>),
    /// The declare was refused less than [`RETRY_REFUSED_AFTER`] ago (reason inside).
    Refused(PublishRequest, String),
}

/// The answer to a declare.
pub(crate) enum Declared {
    /// declare-ok.
    Ok,
    /// RabbitMQ closed the channel (e.g. 406: other arguments): final.
    Refused(String),
    /// No answer (timeout, channel trouble): retryable.
    Unknown(String),
}

/// The per-connection queue cache.
#[derive(Default)]
pub(crate) struct Queues {
    /// Keyed by queue name.
    states: HashMap<Arc<str>, State, foldhash::fast::RandomState>,
    /// Requests held in `Declaring` states, counted for the in-flight bound.
    held: usize,
}

impl Queues {
    /// Requests currently waiting for a declare.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Decides what happens to `req`, which names `spec`.
    pub(crate) fn route(&mut self, spec: &Arc<QueueSpec>, req: PublishRequest) -> QueueRoute {
        if let Some(state) = self.states.get_mut(&spec.name) {
            match state {
                State::Declared => return QueueRoute::Ready(req),
                State::Declaring(waiting) => {
                    waiting.push(req);
                    self.held += 1;
                    return QueueRoute::Held;
                }
                State::Refused(at, reason) if at.elapsed() < RETRY_REFUSED_AFTER => {
                    return QueueRoute::Refused(req, reason.clone())
                }
                State::Refused(..) => {}
            }
        }
        self.states.insert(Arc::clone(&spec.name), State::Declaring(vec![req]));
        self.held += 1;
        QueueRoute::Declare(Arc::clone(spec))
    }

    /// Records the answer to the declare of `name`; returns the requests that waited for it.
    pub(crate) fn declared(&mut self, name: &Arc<str>, answer: &Declared) -> Vec<PublishRequest> {
        let waiting = match self.states.remove(name) {
            Some(State::Declaring(waiting)) => waiting,
            Some(other) => {
                self.states.insert(Arc::clone(name), other);
                return Vec::new();
            }
            None => return Vec::new(),
        };
        self.held -= waiting.len();
        match answer {
            Declared::Ok => {
                self.states.insert(Arc::clone(name), State::Declared);
            }
            Declared::Refused(reason) => {
                self.states
                    .insert(Arc::clone(name), State::Refused(Instant::now(), reason.clone()));
            }
            Declared::Unknown(_) => {}
        }
        waiting
    }

    /// Forgets the queues declared (a channel closed: one may have been deleted); declares in
    /// flight stay.
    pub(crate) fn forget_declared(&mut self) {
        self.states.retain(|_, s| matches!(s, State::Declaring(_)));
    }

    /// Takes every held request out (the connection is going away) and forgets everything.
    pub(crate) fn take_held(&mut self) -> Vec<PublishRequest> {
        self.held = 0;
        self.states
            .drain()
            .flat_map(|(_, s)| match s {
                State::Declaring(waiting) => waiting,
                _ => Vec::new(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_value_names_are_readable_unique_and_bounded() {
        assert_eq!(last_value_queue_name("sensors/a/temp"), "mqgate.last_value.sensors.a.temp");
        assert_eq!(last_value_queue_name("v1.2/x"), "mqgate.last_value.v1%2E2.x");
        let long_a = format!("{}/a", "é".repeat(200));
        let long_b = format!("{}/b", "é".repeat(200));
        let (a, b) = (last_value_queue_name(&long_a), last_value_queue_name(&long_b));
        assert!(a.len() <= 255 && b.len() <= 255, "{} {}", a.len(), b.len());
        assert_ne!(a, b, "a cut name keeps the topics apart");
        assert!(a.starts_with(LAST_VALUE_PREFIX) && a.contains('~'));
    }

    #[test]
    fn last_value_spec_keeps_one_message() {
        let spec = QueueSpec::last_value("a/b");
        let table = spec.table();
        assert!(table.contains(&("x-max-length", Value::I64(1))));
        assert!(table.contains(&("x-overflow", Value::LongString(b"drop-head"))));
    }
}
