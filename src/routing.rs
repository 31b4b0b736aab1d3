//! Routing: where one message goes. Local subscribers (the broker's subscription tree) and
//! every target of every matching rule, per the rule's condition and ack policy.
//!
//! Called by MQTT sessions for their PUBLISHes and wills, and by every other front-end that
//! brings messages in (bridges, an HTTP publish API, MQTT-SN): they pass a [`RoutingContext`],
//! never a session's internals. Routing never waits: requests a sink cannot take now are
//! returned in `blocked`, which the caller awaits (its backpressure) before reading more.

use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::debug;

use crate::broker::Broker;
use crate::config::{AckPolicy, RuleErrorPolicy};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::mqtt::codec::QoS;
use crate::rules::{LazyContext, Rule, RuleSet};
use crate::spool::{Append, Spool, Spools};
use crate::targets::{Blocked, Failure, Handoff, Outcome, Waits};
use crate::template::TemplateError;

/// What routing reads: the broker (local subscribers, retained messages), the rules and the
/// spools of `ack: spool` rules.
#[derive(Clone, Copy)]
pub struct RoutingContext<'a> {
    /// Subscriptions and retained messages.
    pub broker: &'a Broker,
    /// The compiled rules.
    pub rules: &'a RuleSet,
    /// The spool of each target of every `ack: spool` rule, by rule index.
    pub spools: &'a Spools,
    /// Metrics (QoS 0 messages a rule failed on are counted as dropped).
    pub metrics: &'a Metrics,
}

/// Routes `msg` to local subscribers and to every target of every matching rule. Returns
/// whether anything matched and, for QoS 1/2, the outcome receivers to wait for: one per
/// target request, and with a store one for the durable write of a retained message or of the
/// message queued for persistent sessions.
/// `publisher` is the publishing session (for MQTT 5 No Local); `None` for wills and
/// messages that did not come from a session. `hits` is scratch space for rule indexes, kept
/// by the caller so routing does not allocate for it. Requests a sink cannot take now are
/// appended to `blocked` (and once one is, every later one too, so each sink gets them in
/// order).
pub fn route(
    ctx: RoutingContext<'_>,
    msg: &Arc<Message>,
    publisher: Option<u64>,
    hits: &mut Vec<usize>,
    blocked: &mut Blocked,
) -> (bool, Waits) {
    let (matched, waits, _) = route_counted(ctx, msg, publisher, hits, blocked);
    (matched, waits)
}

/// [`route`], also returning how many local sessions and share groups matched: the work the
/// fan-out did, which an MQTT session adds up to yield to other tasks after a large one.
pub fn route_counted(
    ctx: RoutingContext<'_>,
    msg: &Arc<Message>,
    publisher: Option<u64>,
    hits: &mut Vec<usize>,
    blocked: &mut Blocked,
) -> (bool, Waits, usize) {
    let mut waits = Waits::new();
    // With a store, a retained or persistent-session write adds its wait here.
    let local = ctx.broker.publish(msg, publisher, &mut waits);
    // The other nodes of a cluster: their subscribers are matched where they are.
    let remote = ctx.broker.cluster().map(|c| c.forward(msg, &mut waits, blocked)).is_some();
    ctx.rules.matches_into(&msg.topic, hits);
    ctx.broker.tracer().offer(msg, "publish", || {
        hits.iter().filter_map(|&i| ctx.rules.rule(i)).map(|r| r.name.as_str()).collect()
    });
    let mut applied = 0usize;
    // Built only when a condition or template needs it.
    let mut template_ctx: LazyContext = None;
    let acked = msg.qos != QoS::AtMostOnce;
    for &index in hits.iter() {
        let Some(rule) = ctx.rules.rule(index) else { continue };
        match rule.applies(msg, &mut template_ctx) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                if rule_failed(ctx, rule, None, msg, &e, &mut waits) {
                    applied += 1;
                }
                continue;
            }
        }
        applied += 1;
        rule.matched.inc();
        if rule.ack == AckPolicy::Spool {
            let spools = ctx.spools.for_rule(index);
            spool_message(spools, rule.targets.len(), msg, &mut waits, blocked);
            continue;
        }
        // `ack: receive`: the targets' outcomes are not waited for; their receivers are
        // dropped here (the sinks still count failures and, with a store, keep final ones as
        // dead letters). A failure known now (a template that cannot render) still fails the
        // message.
        let mut not_awaited = Waits::new();
        for (i, target) in rule.targets.iter().enumerate() {
            let receive = rule.ack == AckPolicy::Receive;
            let w = if receive { &mut not_awaited } else { &mut waits };
            let mut hand = Handoff::new(w, blocked, acked, rule.recorder(i));
            if receive {
                hand = hand.unawaited();
            }
            if let Err(e) = target.hand_over(msg, &mut template_ctx, &mut hand) {
                rule_failed(ctx, rule, Some(i), msg, &e, &mut waits);
            }
        }
    }
    (local > 0 || applied > 0 || remote, waits, local)
}

/// Appends `msg` to the spool of each of an `ack: spool` rule's `targets` targets (or to
/// `blocked`, see [`route`]); for QoS 1/2 the receivers of "durably spooled" go into `waits`.
/// Spools that are not running (never expected: `spool::start` makes one per target) fail
/// the message rather than let it be acknowledged without a copy.
fn spool_message(
    spools: &[Spool],
    targets: usize,
    msg: &Arc<Message>,
    waits: &mut Waits,
    blocked: &mut Blocked,
) {
    if spools.len() != targets {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Outcome::Failed(Failure::retryable("the rule's spools are not running")));
        waits.push(rx);
        return;
    }
    for spool in spools {
        let mut hand = Handoff::new(waits, blocked, msg.qos != QoS::AtMostOnce, None);
        let append = Append { msg: Arc::clone(msg), ack: hand.ack() };
        hand.offer(
            append,
            |append| spool.try_append(append),
            |append| {
                let spool = spool.clone();
                Box::pin(async move { spool.append(append).await })
            },
        );
    }
}

/// A rule's condition or template failed on `msg`: counted, then the rule's `on_error`
/// decides. `fail`: a QoS 1/2 message gets a failed outcome (never acknowledged as
/// delivered), a QoS 0 one is dropped and counted; with a store it is kept as a dead letter of
/// target `target` (a template of that target failed) or of every target of the rule (its
/// condition failed); returns true (the rule counts as matched). `skip`: the rule is passed
/// over; returns false.
fn rule_failed(
    ctx: RoutingContext<'_>,
    rule: &Rule,
    target: Option<usize>,
    msg: &Message,
    error: &TemplateError,
    waits: &mut Waits,
) -> bool {
    rule.errors.inc();
    debug!(rule = %rule.name, topic = %crate::logtext::LogText(&msg.topic), %error, "rule could not be evaluated");
    match rule.on_error {
        RuleErrorPolicy::Skip => false,
        RuleErrorPolicy::Fail => {
            let reason = format!("rule {:?} could not be evaluated: {error}", rule.name);
            let recorders = match target {
                Some(i) => rule.dead_letters.get(i..=i).unwrap_or_default(),
                None => &rule.dead_letters[..],
            };
            for r in recorders {
                r.record(msg, &reason);
            }
            if msg.qos == QoS::AtMostOnce {
                ctx.metrics.dropped(DROPPED_RULE_ERROR);
            } else {
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Outcome::Failed(Failure::fatal(reason)));
                waits.push(rx);
            }
            true
        }
    }
}

/// Reason label of `messages_dropped` for QoS 0 messages a rule failed to evaluate on.
pub const DROPPED_RULE_ERROR: &str = "rule_error";
