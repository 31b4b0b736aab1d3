//! The publisher's channel for synchronous requests, one at a time: passive exchange checks,
//! queue declares (job and last-value queues) and purges. A 404 or 406 closes this channel,
//! never a publishing one. The answers release or fail the requests that waited for them
//! (see `exchanges` and `queues`). No I/O of its own: requests go into the write buffer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, warn};

use super::{missing_exchange, Publisher};
use crate::targets::amqp::exchanges::{Checked, Released};
use crate::targets::amqp::headers;
use crate::targets::amqp::queues::{Declared, QueueSpec};
use crate::targets::amqp::transport::describe;
use crate::targets::amqp::wire::methods::{self, Close, NOT_FOUND};
use crate::targets::amqp::wire::WireError;
use crate::targets::amqp::PublishRequest;
use crate::targets::{Failure, Outcome};

/// One synchronous request on the check channel.
pub(super) enum Op {
    /// A passive declare: does this exchange exist?
    Exchange(Arc<str>),
    /// Declare this queue.
    Queue(Arc<QueueSpec>),
    /// Purge the request's queue (its `options.declare`), then report its outcome.
    Purge(PublishRequest),
}

/// Where the exchange-check channel is.
pub(super) enum CheckState {
    /// Not open (never opened, or closed by a 404).
    Closed,
    /// Open, no check in flight.
    Idle,
    /// This request is in flight, answer due by the instant.
    Busy(Op, Instant),
}

/// How the request in flight on the check channel ended.
pub(super) enum Answer {
    /// declare-ok / purge-ok.
    Ok,
    /// The broker closed the channel.
    Closed(Close),
    /// No answer in time, or the request could not be encoded.
    Failed(String),
}

/// The channel exchange checks, queue declares and purges run on (a 404 or 406 closes it,
/// never a publishing channel).
pub(super) struct CheckChannel {
    /// Its channel number (a new one after a check timed out on the old one).
    pub(super) id: u16,
    /// Its state.
    pub(super) state: CheckState,
    /// Requests waiting for their turn, one at a time.
    pub(super) queue: VecDeque<Op>,
    /// Purges queued or in flight (they hold a publish request: counted as in flight).
    pub(super) purges: usize,
}

impl Publisher<'_> {
    /// Starts the next queued check, declare or purge if the check channel is free.
    pub(super) fn start_check(&mut self) {
        while matches!(self.check.state, CheckState::Closed | CheckState::Idle) {
            let Some(op) = self.check.queue.pop_front() else { return };
            let id = self.check.id;
            if matches!(self.check.state, CheckState::Closed) {
                // Pipelined with the request; the open-ok is ignored.
                methods::channel_open(&mut self.t.wbuf, id);
                self.check.state = CheckState::Idle;
            }
            let wbuf = &mut self.t.wbuf;
            let sent = match &op {
                Op::Exchange(exchange) => methods::exchange_declare_passive(wbuf, id, exchange),
                Op::Queue(spec) => {
                    methods::queue_declare(wbuf, id, &spec.name, QueueSpec::FLAGS, &spec.table())
                }
                Op::Purge(req) => match &req.options.declare {
                    Some(spec) => methods::queue_purge(wbuf, id, &spec.name),
                    None => Err(WireError::Truncated("queue name")),
                },
            };
            let due = Instant::now() + self.rpc_timeout;
            self.check.state = CheckState::Busy(op, due);
            if let Err(e) = sent {
                self.on_check_answer(Answer::Failed(e.to_string()), CheckState::Idle);
            }
        }
    }

    /// The request in flight on the check channel got its answer; the channel is now in `next`.
    pub(super) fn on_check_answer(&mut self, answer: Answer, next: CheckState) {
        let state = std::mem::replace(&mut self.check.state, next);
        if let CheckState::Busy(op, _) = state {
            match op {
                Op::Exchange(exchange) => {
                    let checked = match answer {
                        Answer::Ok => Checked::Exists,
                        Answer::Closed(c) if c.code == NOT_FOUND => Checked::Missing,
                        Answer::Closed(c) => Checked::Failed(describe(&c)),
                        Answer::Failed(reason) => Checked::Failed(reason),
                    };
                    self.on_checked(&exchange, checked);
                }
                Op::Queue(spec) => {
                    let declared = match answer {
                        Answer::Ok => Declared::Ok,
                        Answer::Closed(c) => Declared::Refused(format!(
                            "queue '{}' could not be declared: {}",
                            spec.name,
                            describe(&c)
                        )),
                        Answer::Failed(reason) => Declared::Unknown(format!(
                            "queue '{}' could not be declared: {reason}",
                            spec.name
                        )),
                    };
                    self.on_declared(&spec, &declared);
                }
                Op::Purge(req) => {
                    self.check.purges = self.check.purges.saturating_sub(1);
                    match answer {
                        Answer::Ok => {
                            req.metrics.forwarded.inc();
                            if let Some(ack) = req.ack {
                                let _ = ack.send(Outcome::Delivered);
                            }
                        }
                        Answer::Closed(c) => {
                            let reason = format!("purge refused: {}", describe(&c));
                            self.shared.fail(req, || Failure::fatal(reason));
                        }
                        Answer::Failed(reason) => {
                            let reason = format!("purge failed: {reason}");
                            self.shared.fail_unavailable(req, || Failure::retryable(reason));
                        }
                    }
                }
            }
        }
        self.start_check();
    }

    /// Releases the requests that waited for the declare of `spec`.
    pub(super) fn on_declared(&mut self, spec: &Arc<QueueSpec>, declared: &Declared) {
        let reqs = self.queues.declared(&spec.name, declared);
        let (now, timestamp) = (Instant::now(), headers::unix_seconds());
        match declared {
            Declared::Ok => {
                debug!(broker = %self.shared.name, queue = %spec.name, "queue declared");
                for req in reqs {
                    self.accept_declared(req, now, timestamp);
                }
            }
            Declared::Refused(reason) => {
                warn!(broker = %self.shared.name, queue = %spec.name, %reason, failed = reqs.len(),
                    "queue declare refused; failing its publishes");
                for req in reqs {
                    self.shared.fail(req, || Failure::fatal(reason.clone()));
                }
            }
            Declared::Unknown(reason) => {
                for req in reqs {
                    self.shared.fail_unavailable(req, || Failure::retryable(reason.clone()));
                }
            }
        }
    }

    /// Releases the requests that waited for a check of `exchange`.
    pub(super) fn on_checked(&mut self, exchange: &Arc<str>, checked: Checked) {
        let name = &self.shared.name;
        match self.exchanges.checked(exchange, checked) {
            None => {}
            Some(Released::Publish(reqs)) => {
                debug!(broker = %name, exchange = %exchange, "exchange exists");
                let (now, timestamp) = (Instant::now(), headers::unix_seconds());
                for req in reqs {
                    self.publish(req, now, timestamp);
                }
            }
            Some(Released::Missing(reqs)) => {
                warn!(broker = %name, exchange = %exchange, failed = reqs.len(),
                    "exchange does not exist; failing its publishes");
                for req in reqs {
                    self.shared.fail(req, || missing_exchange(exchange));
                }
            }
            Some(Released::Unknown(reason, reqs)) => {
                warn!(broker = %name, %exchange, %reason, "could not check the exchange");
                let failure = Failure::retryable(format!(
                    "could not check exchange '{exchange}' on broker {name}: {reason}"
                ));
                for req in reqs {
                    self.shared.fail_unavailable(req, || failure.clone());
                }
            }
        }
    }

    /// Takes the purges queued or in flight out (the connection is going away).
    pub(super) fn take_purges(&mut self) -> Vec<PublishRequest> {
        let mut out = Vec::new();
        if matches!(self.check.state, CheckState::Busy(Op::Purge(_), _)) {
            if let CheckState::Busy(Op::Purge(req), _) =
                std::mem::replace(&mut self.check.state, CheckState::Closed)
            {
                out.push(req);
            }
        }
        for op in self.check.queue.drain(..) {
            if let Op::Purge(req) = op {
                out.push(req);
            }
        }
        self.check.purges = 0;
        out
    }
}
