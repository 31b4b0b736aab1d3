//! Which exchanges exist on the current connection, so a publish never hits a missing one.
//!
//! RabbitMQ answers a publish to a missing exchange by closing the channel (404), which would
//! also fail every innocent unconfirmed publish on it. So the first publish to an exchange on a
//! connection waits for a passive `exchange.declare` on a short-lived channel of its own; the
//! answer is cached for the life of the connection (a missing exchange only for
//! [`RECHECK_MISSING_AFTER`]). Owns the cache and the held requests; it never publishes, does no
//! I/O and never reports an outcome itself — the publisher does, from what [`Exchanges`] tells
//! it, and runs the checks on a channel of their own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::PublishRequest;

/// How long an exchange found missing stays "missing" before the next publish checks again.
pub(crate) const RECHECK_MISSING_AFTER: Duration = Duration::from_secs(1);

/// What is known about one exchange on this connection.
enum State {
    /// It exists (or needs no check).
    Verified,
    /// A check is in flight; these requests wait for it, in arrival order.
    Checking(Vec<PublishRequest>),
    /// The broker said 404 at this instant.
    Missing(Instant),
}

/// What the publisher should do with a request.
pub(crate) enum Route {
    /// Publish it now.
    Publish(PublishRequest),
    /// It waits behind a check already in flight.
    Held,
    /// Start a check of this exchange; the request waits for it.
    Check(Arc<str>),
    /// The exchange was found missing less than [`RECHECK_MISSING_AFTER`] ago: fail it.
    Missing(PublishRequest),
}

/// The answer of one check.
#[derive(Debug)]
pub(crate) enum Checked {
    /// The exchange exists.
    Exists,
    /// The broker answered 404.
    Missing,
    /// The check itself failed (timeout, channel or connection trouble).
    Failed(String),
}

/// What became of the requests held behind a check.
pub(crate) enum Released {
    /// Publish all of them.
    Publish(Vec<PublishRequest>),
    /// The exchange is missing: fail them (fatal).
    Missing(Vec<PublishRequest>),
    /// The check could not tell: fail them (retryable) with this reason.
    Unknown(String, Vec<PublishRequest>),
}

/// The per-connection exchange cache.
#[derive(Default)]
pub(crate) struct Exchanges {
    /// Keyed by exchange name.
    states: HashMap<Arc<str>, State, foldhash::fast::RandomState>,
    /// Requests held in `Checking` states, counted for the in-flight bound.
    held: usize,
}

impl Exchanges {
    /// Requests currently waiting for a check.
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Decides what happens to `req` (whose exchange name is known to fit in 255 bytes).
    pub(crate) fn route(&mut self, req: PublishRequest) -> Route {
        if let Some(state) = self.states.get_mut(&*req.exchange) {
            match state {
                State::Verified => return Route::Publish(req),
                State::Checking(waiting) => {
                    waiting.push(req);
                    self.held += 1;
                    return Route::Held;
                }
                State::Missing(at) if at.elapsed() < RECHECK_MISSING_AFTER => {
                    return Route::Missing(req)
                }
                State::Missing(_) => {}
            }
        }
        if needs_no_check(&req.exchange) {
            self.states.insert(Arc::clone(&req.exchange), State::Verified);
            return Route::Publish(req);
        }
        let exchange = Arc::clone(&req.exchange);
        self.states.insert(Arc::clone(&exchange), State::Checking(vec![req]));
        self.held += 1;
        Route::Check(exchange)
    }

    /// Records the answer of a check and releases the requests that waited for it.
    pub(crate) fn checked(&mut self, exchange: &Arc<str>, result: Checked) -> Option<Released> {
        let waiting = match self.states.remove(exchange) {
            Some(State::Checking(waiting)) => waiting,
            // Cleared meanwhile (the requests were already failed): just forget the answer.
            Some(other) => {
                self.states.insert(Arc::clone(exchange), other);
                return None;
            }
            None => return None,
        };
        self.held -= waiting.len();
        Some(match result {
            Checked::Exists => {
                self.states.insert(Arc::clone(exchange), State::Verified);
                Released::Publish(waiting)
            }
            Checked::Missing => {
                self.states.insert(Arc::clone(exchange), State::Missing(Instant::now()));
                Released::Missing(waiting)
            }
            Checked::Failed(reason) => Released::Unknown(reason, waiting),
        })
    }

    /// Forgets what is known (a channel was closed by the broker: an exchange may be gone).
    /// Checks in flight stay; their requests keep waiting.
    pub(crate) fn forget_verified(&mut self) {
        self.states.retain(|_, s| matches!(s, State::Checking(_)));
    }

    /// Takes every held request out (the connection is going away) and forgets everything.
    pub(crate) fn take_held(&mut self) -> Vec<PublishRequest> {
        self.held = 0;
        self.states
            .drain()
            .flat_map(|(_, s)| match s {
                State::Checking(waiting) => waiting,
                _ => Vec::new(),
            })
            .collect()
    }
}

/// The default exchange and the `amq.*` ones always exist (and may not be declared, not even
/// passively, under some names), so they are never checked.
fn needs_no_check(exchange: &str) -> bool {
    exchange.is_empty() || exchange.starts_with("amq.")
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;
    use crate::message::Message;
    use crate::metrics::TargetMetrics;
    use crate::mqtt::codec::{PublishProperties, QoS};

    fn req(exchange: &str) -> PublishRequest {
        PublishRequest {
            exchange: Arc::from(exchange),
            routing_key: "k".to_owned(),
            msg: Arc::new(Message {
                charge: Default::default(),
                topic: "t".to_owned(),
                payload: Bytes::new(),
                qos: QoS::AtMostOnce,
                retain: false,
                client_id: Arc::from("c"),
                username: None,
                properties: PublishProperties::none(),
                received: Instant::now(),
                packet_id: None,
            }),
            ack: None,
            metrics: TargetMetrics::default(),
            options: Default::default(),
            dead_letter: None,
        }
    }

    #[test]
    fn default_and_amq_exchanges_are_never_checked() {
        let mut x = Exchanges::default();
        assert!(matches!(x.route(req("")), Route::Publish(..)));
        assert!(matches!(x.route(req("amq.topic")), Route::Publish(..)));
        assert_eq!(x.held(), 0);
    }

    #[test]
    fn first_publish_checks_later_ones_wait_then_all_are_released() {
        let mut x = Exchanges::default();
        let Route::Check(name) = x.route(req("events")) else { panic!("expected a check") };
        assert!(matches!(x.route(req("events")), Route::Held));
        assert_eq!(x.held(), 2);
        match x.checked(&name, Checked::Exists) {
            Some(Released::Publish(reqs)) => {
                assert!(reqs.iter().all(|r| &*r.exchange == "events"));
                assert_eq!(reqs.len(), 2);
            }
            _ => panic!("expected the held requests to be released for publishing"),
        }
        assert_eq!(x.held(), 0);
        assert!(matches!(x.route(req("events")), Route::Publish(..)));
    }

    #[test]
    fn missing_exchange_fails_fast_then_is_checked_again() {
        let mut x = Exchanges::default();
        let Route::Check(name) = x.route(req("gone")) else { panic!("expected a check") };
        assert!(
            matches!(x.checked(&name, Checked::Missing), Some(Released::Missing(r)) if r.len() == 1)
        );
        assert!(matches!(x.route(req("gone")), Route::Missing(_)));
        x.states.insert(name.clone(), State::Missing(Instant::now() - RECHECK_MISSING_AFTER));
        assert!(matches!(x.route(req("gone")), Route::Check(_)));
    }

    #[test]
    fn forgetting_keeps_checks_in_flight_and_take_held_empties() {
        let mut x = Exchanges::default();
        assert!(matches!(x.route(req("a")), Route::Check(_)));
        assert!(matches!(x.route(req("")), Route::Publish(..)));
        x.forget_verified();
        assert_eq!(x.states.len(), 1);
        assert_eq!(x.take_held().len(), 1);
        assert_eq!(x.held(), 0);
        assert!(x.states.is_empty());
    }
}
