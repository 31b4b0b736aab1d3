//! The rule set: compiled once from the config, then only read. Matches a topic to the
//! targets its message must reach.
//!
//! Pure: no I/O and no locks. A target holds the handle of the sink it feeds, but publishing is
//! the caller's job (the session), so the rule set never blocks.
//!
//! `mapping` is the topic ↔ routing key translation (both ways); templates and `when:`
//! conditions are [`crate::template`]'s. A rule without templates or condition never builds
//! a template context: its cost per message is the filter match and the routing key.

pub mod mapping;

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use thiserror::Error;

use crate::config::{AckPolicy, Config, RuleErrorPolicy};
use crate::deadletters::{DeadLetters, Recorder};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::mqtt::topic::TopicTree;
use crate::targets::http::HttpError;
use crate::targets::kinds::{target_id, BuildContext, Systems};
use crate::targets::Target;
use crate::template::{Condition, TemplateError};

/// A reload's lookup of a running target to keep: `(rule, index in to:, id)`.
pub type KeptTarget<'a> = dyn Fn(&str, usize, &str) -> Option<Arc<dyn Target>> + 'a;

/// A message's template context, built on first use (see [`Rule::applies`]).
pub type LazyContext = Option<minijinja::Value>;

/// A rule that cannot be compiled (the config validation normally catches these first).
#[derive(Debug, Error)]
pub enum RuleError {
    /// A target names a broker that is not configured.
    #[error("rule {rule:?}: unknown AMQP broker {broker:?}")]
    UnknownBroker { rule: String, broker: String },
    /// A target names a bridge that is not configured.
    #[error("rule {rule:?}: unknown bridge {bridge:?}")]
    UnknownBridge { rule: String, bridge: String },
    /// A target names an HTTP endpoint that is not configured.
    #[error("rule {rule:?}: unknown HTTP endpoint {endpoint:?}")]
    UnknownEndpoint { rule: String, endpoint: String },
    /// A target names a system of its kind's section that is not configured (any kind).
    #[error("rule {rule:?}: no {section}.{name} configured")]
    UnknownSystem { rule: String, section: &'static str, name: String },
    /// An HTTP target cannot be set up.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// A template or condition does not compile.
    #[error("rule {rule:?}: {error}")]
    Template { rule: String, error: TemplateError },
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// The rule's `name` from the config.
    pub name: String,
    /// Its topic filter.
    pub filter: String,
    /// Where matching messages go, in config order.
    pub targets: Vec<Arc<dyn Target>>,
    /// The `when:` condition, if any.
    pub when: Option<Condition>,
    /// What a message the condition or a template fails on gets.
    pub on_error: RuleErrorPolicy,
    /// When a QoS 1/2 message is acknowledged: after the sinks, the spool, or on receipt.
    pub ack: AckPolicy,
    /// Messages the rule applied to (filter matched, condition held).
    pub matched: Counter,
    /// Messages the condition or a template could not be evaluated on.
    pub errors: Counter,
    /// Messages the condition turned away.
    pub skipped: Counter,
    /// One dead-letter recorder per target, in `targets` order; empty without a store (see
    /// [`RuleSet::record_dead_letters`]).
    pub dead_letters: Vec<Arc<Recorder>>,
}

impl Rule {
    /// The dead-letter recorder of target `index`, if dead letters are kept.
    pub fn recorder(&self, index: usize) -> Option<Arc<Recorder>> {
        self.dead_letters.get(index).cloned()
    }
}

impl Rule {
    /// Whether the rule applies to `msg`: its `when:` holds (always, without one). `ctx` is
    /// the message's template context, built here on first use and shared by later rules.
    pub fn applies(
        &self,
        msg: &Arc<Message>,
        ctx: &mut LazyContext,
    ) -> Result<bool, TemplateError> {
        let Some(when) = &self.when else { return Ok(true) };
        let held = when.eval_for(msg, ctx)?;
        if !held {
            self.skipped.inc();
        }
        Ok(held)
    }
}

/// Every rule, with a filter tree for matching.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    /// Rule indexes by filter.
    tree: TopicTree<usize>,
}

impl RuleSet {
    /// Compiles the rules of `config` against the systems (running, or detached for the route
    /// dry-run). No side effects: nothing is spawned or connected, so a rule set can be
    /// compiled and dropped (a dry-run, a refused reload). [`start`](Self::start) starts what
    /// its targets run.
    pub fn compile(
        config: &Config,
        systems: &Systems,
        metrics: &Metrics,
    ) -> Result<RuleSet, RuleError> {
        RuleSet::compile_reusing(config, systems, metrics, &|_, _, _| None)
    }

    /// [`compile`](Self::compile) for a reload: `kept(rule, index, id)` gives the running
    /// target to keep in place of building target `index` of rule `rule` (id `id`), when it
    /// is the same (same id, same config, same system).
    pub fn compile_reusing(
        config: &Config,
        systems: &Systems,
        metrics: &Metrics,
        kept: &KeptTarget<'_>,
    ) -> Result<RuleSet, RuleError> {
        let mut set = RuleSet::default();
        let at = BuildContext { metrics, systems };
        for rc in &config.rules {
            let name = rc.name.value.clone();
            let when = match &rc.when {
                Some(w) => Some(
                    Condition::compile(&w.value)
                        .map_err(|error| RuleError::Template { rule: name.clone(), error })?,
                ),
                None => None,
            };
            let mut targets: Vec<Arc<dyn Target>> = Vec::with_capacity(rc.to.len());
            for (i, tc) in rc.to.iter().enumerate() {
                let id = target_id(&name, tc);
                match kept(&name, i, &id) {
                    Some(target) => targets.push(target),
                    None => targets.push(tc.build(&id, &name, &at)?),
                }
            }
            let (matched, errors, skipped) = metrics.rule(&name);
            set.tree.insert(&rc.from.value, set.rules.len());
            set.rules.push(Rule {
                name,
                filter: rc.from.value.clone(),
                targets,
                when,
                on_error: rc.on_error,
                ack: rc.ack_policy(),
                matched,
                errors,
                skipped,
                dead_letters: Vec::new(),
            });
        }
        Ok(set)
    }

    /// Starts what the targets run on their own (HTTP lanes), inside the tokio runtime. Once,
    /// before the rule set routes anything: a target not started never takes a message off
    /// its queue.
    pub fn start(&self) {
        for rule in &self.rules {
            for target in &rule.targets {
                target.start();
            }
        }
    }

    /// Makes every target of every rule keep the messages that fail for good at it in
    /// `dead_letters` (a session's messages only; [`Target::send`] never records).
    pub fn record_dead_letters(&mut self, dead_letters: &DeadLetters) {
        for rule in &mut self.rules {
            rule.dead_letters = (0..rule.targets.len())
                .map(|i| {
                    let id = rule.targets[i].id();
                    Arc::new(Recorder::new(dead_letters.clone(), &rule.name, id))
                })
                .collect();
        }
    }

    /// Puts the indexes of the rules whose filter matches `topic` into `hits` (cleared
    /// first), in config order. The caller keeps `hits` to reuse its allocation.
    pub fn matches_into(&self, topic: &str, hits: &mut Vec<usize>) {
        hits.clear();
        self.tree.for_each_match(topic, |i| hits.push(*i));
        hits.sort_unstable();
    }

    /// The rule at `index` (from [`matches_into`](Self::matches_into)).
    pub fn rule(&self, index: usize) -> Option<&Rule> {
        self.rules.get(index)
    }

    /// All rules, in config order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The target with id `id` and its rule.
    pub fn target(&self, id: &str) -> Option<(&Rule, &Arc<dyn Target>)> {
        self.rules.iter().find_map(|rule| {
            let target = rule.targets.iter().find(|t| t.id() == id)?;
            Some((rule, target))
        })
    }
}
