//! The rule set: compiled once from the config, then only read. Matches a topic to the
//! targets its message must reach.
//!
//! Pure: no I/O and no locks. A target holds the handle of the sink it feeds, but publishing is
//! the caller's job (the session), so the rule set never blocks.
//!
//! `mapping` is the topic ↔ routing key translation (both ways), `template` the minijinja
//! templates and `when:` conditions. A rule without templates or condition never builds a
//! template context: its cost per message is the filter match and the routing key.

pub mod mapping;
pub mod template;

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use thiserror::Error;
use tokio::sync::oneshot;

use crate::config::{AckPolicy, Config, RuleErrorPolicy, TargetConfig};
use crate::deadletters::{DeadLetters, Recorder};
use crate::message::Message;
use crate::metrics::{Metrics, TargetMetrics};
use crate::mqtt::topic::TopicTree;
use crate::sinks::amqp::{AmqpBroker, PublishOptions, PublishRequest, QueueSpec};
use crate::sinks::http::{HttpEndpoint, HttpError, HttpRequest, HttpTarget};
use crate::sinks::{Failure, Outcome};
use template::{Condition, Template, TemplateError, TemplatesBuilder};

/// A message's template context, built on first use (see [`Rule::applies`]).
pub type LazyContext = Option<minijinja::Value>;

/// A rule that cannot be compiled (the config validation normally catches these first).
#[derive(Debug, Error)]
pub enum RuleError {
    /// A target names a broker that is not configured.
    #[error("rule {rule:?}: unknown AMQP broker {broker:?}")]
    UnknownBroker { rule: String, broker: String },
    /// A target names an HTTP endpoint that is not configured.
    #[error("rule {rule:?}: unknown HTTP endpoint {endpoint:?}")]
    UnknownEndpoint { rule: String, endpoint: String },
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
    pub targets: Vec<Target>,
    /// The `when:` condition, if any.
    pub when: Option<Condition>,
    /// What a message the condition or a template fails on gets.
    pub on_error: RuleErrorPolicy,
    /// When a QoS 1/2 message is acknowledged: after the sinks, the spool, or on receipt.
    pub ack: AckPolicy,
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

/// One destination of a rule.
#[derive(Debug)]
pub enum Target {
    /// An AMQP exchange on a named broker.
    Amqp(AmqpTarget),
    /// An HTTP endpoint (a webhook): the handle of the target's lanes.
    Http(HttpTarget),
}

/// The stable id of target `index` (0-based, in `to:` order) of rule `rule`: `rule/index`.
/// What the spool and dead letters record, and what a replay names. Rule names are unique.
pub fn target_id(rule: &str, index: usize) -> String {
    format!("{rule}/{index}")
}

impl Target {
    /// Hands `msg` to this target's sink outside a session (the spool's forwarder, a dead
    /// letter's replay): waits for room in the sink's queue, then returns its pending outcome.
    /// The outcome is always a real one (an AMQP confirm, an HTTP 2xx), whatever the message's
    /// QoS. Awaiting the returned [`Delivery`] is separate so a caller can keep several in
    /// flight (order per topic is kept by the sink, as for a session's messages).
    pub async fn send(&self, msg: &Arc<Message>) -> Delivery {
        let mut delivery = Delivery { waits: crate::sinks::Waits::new(), failed: None };
        match self {
            Target::Amqp(t) => {
                let mut ctx = None;
                let (exchange, routing_key) = match t.resolve(msg, &mut ctx) {
                    Ok(r) => r,
                    Err(e) => {
                        delivery.failed = Some(Failure::fatal(format!("template: {e}")));
                        return delivery;
                    }
                };
                let options = t.options.clone();
                delivery.push_amqp(t, exchange, routing_key, options, msg).await;
                if let Some((name, options)) = t.last_value_publish(msg) {
                    delivery.push_amqp(t, Arc::from(""), name, options, msg).await;
                }
            }
            Target::Http(t) => {
                let (tx, rx) = oneshot::channel();
                delivery.waits.push(rx);
                // No dead-letter recorder: the caller (spool, replay) handles the outcome.
                let req = HttpRequest { msg: Arc::clone(msg), ack: Some(tx), dead_letter: None };
                t.publish(req).await;
            }
        }
        delivery
    }
}

/// The pending outcome of [`Target::send`].
#[derive(Debug)]
pub struct Delivery {
    waits: crate::sinks::Waits,
    /// A failure known before anything was sent (a template that cannot be rendered).
    failed: Option<Failure>,
}

impl Delivery {
    async fn push_amqp(
        &mut self,
        t: &AmqpTarget,
        exchange: Arc<str>,
        routing_key: String,
        options: PublishOptions,
        msg: &Arc<Message>,
    ) {
        let (tx, rx) = oneshot::channel();
        self.waits.push(rx);
        let req = PublishRequest {
            exchange,
            routing_key,
            msg: Arc::clone(msg),
            ack: Some(tx),
            metrics: t.metrics.clone(),
            options,
            dead_letter: None,
        };
        t.broker.publish(req).await;
    }

    /// The outcome: delivered when every publish it made was; else the first failure. A sink
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

/// An AMQP exchange target.
#[derive(Debug)]
pub struct AmqpTarget {
    /// The sink for the broker this target names.
    pub broker: AmqpBroker,
    /// Exchange name, shared with every publish request.
    pub exchange: Arc<str>,
    /// Fixed routing key; `None` means the topic translated by `options.mapping`.
    pub routing_key: Option<String>,
    /// Pre-resolved metric handles for this rule and target.
    pub metrics: TargetMetrics,
    /// `exchange` when it is a template.
    pub exchange_template: Option<Template>,
    /// `routing_key` when it is a template.
    pub routing_key_template: Option<Template>,
    /// Publish options of every request (mandatory, mapping, the job queue to declare).
    pub options: PublishOptions,
    /// `last_value: true`: retained messages also go to the topic's last-value queue.
    pub last_value: bool,
}

impl AmqpTarget {
    /// With `last_value: true` and a retained `msg`: the queue name and options of the
    /// publish that keeps the topic's last value (through the default exchange; an empty
    /// retained payload purges it). `None` otherwise.
    pub fn last_value_publish(&self, msg: &Message) -> Option<(String, PublishOptions)> {
        if !(self.last_value && msg.retain) {
            return None;
        }
        let spec = Arc::new(QueueSpec::last_value(&msg.topic));
        let name = spec.name.to_string();
        let options = PublishOptions {
            mandatory: None,
            mapping: self.options.mapping,
            declare: Some(spec),
            purge: msg.payload.is_empty(),
        };
        Some((name, options))
    }

    /// The routing key for a message published to `topic` (templates aside).
    pub fn routing_key_for(&self, topic: &str) -> String {
        match &self.routing_key {
            Some(rk) => rk.clone(),
            None => mapping::encode_topic(self.options.mapping, topic),
        }
    }

    /// The exchange and routing key for `msg`, rendering the templates the target has (and
    /// building `ctx` only then).
    pub fn resolve(
        &self,
        msg: &Arc<Message>,
        ctx: &mut LazyContext,
    ) -> Result<(Arc<str>, String), TemplateError> {
        let exchange = match &self.exchange_template {
            None => Arc::clone(&self.exchange),
            Some(t) => Arc::from(t.render_for(msg, ctx)?),
        };
        let routing_key = match &self.routing_key_template {
            None => self.routing_key_for(&msg.topic),
            Some(t) => t.render_for(msg, ctx)?,
        };
        Ok((exchange, routing_key))
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
    /// Compiles the rules of `config` against the running sinks. HTTP targets start their
    /// lanes (tasks) on their endpoint here, so this runs inside the tokio runtime.
    pub fn compile(
        config: &Config,
        brokers: &BTreeMap<String, AmqpBroker>,
        http: &BTreeMap<String, HttpEndpoint>,
        metrics: &Metrics,
    ) -> Result<RuleSet, RuleError> {
        let mut set = RuleSet::default();
        let mut builder = TemplatesBuilder::new();
        let template_error =
            |rule: &str, error: TemplateError| RuleError::Template { rule: rule.to_owned(), error };
        // Templates compile into one environment, resolved once it is complete.
        let mut pending = Vec::new();
        let mut whens = Vec::new();
        for rc in &config.rules {
            let name = rc.name.value.clone();
            let when = match &rc.when {
                Some(w) => Some(builder.condition(&w.value).map_err(|e| template_error(&name, e))?),
                None => None,
            };
            let mut targets = Vec::with_capacity(rc.to.len());
            for tc in &rc.to {
                match tc {
                    TargetConfig::Amqp(t) => {
                        let broker = brokers.get(&t.broker.value).ok_or_else(|| {
                            RuleError::UnknownBroker {
                                rule: name.clone(),
                                broker: t.broker.value.clone(),
                            }
                        })?;
                        let mut compile = |text: &str| {
                            if template::is_template(text) {
                                builder
                                    .template(text)
                                    .map(Some)
                                    .map_err(|e| template_error(&name, e))
                            } else {
                                Ok(None)
                            }
                        };
                        let exchange_t = compile(&t.exchange.value)?;
                        let routing_key_t = match &t.routing_key {
                            Some(rk) => compile(&rk.value)?,
                            None => None,
                        };
                        let mapping = t
                            .topic_mapping
                            .or_else(|| config.amqp.get(&t.broker.value).map(|b| b.topic_mapping))
                            .unwrap_or_default();
                        let (exchange, routing_key, declare) = match &t.queue {
                            Some(q) => {
                                let args = t.arguments.clone().into_iter().collect();
                                let spec = Arc::new(QueueSpec::job(&q.value, args));
                                (String::new(), Some(q.value.clone()), Some(spec))
                            }
                            None => (
                                t.exchange.value.clone(),
                                t.routing_key.as_ref().map(|r| r.value.clone()),
                                None,
                            ),
                        };
                        let label = match &t.queue {
                            Some(q) => format!("amqp:{}/queue:{}", t.broker.value, q.value),
                            None => format!("amqp:{}/{}", t.broker.value, t.exchange.value),
                        };
                        let options = PublishOptions {
                            // A job queue's publishes are always mandatory: a deleted
                            // queue fails them (and gets declared again) instead of
                            // dropping them silently.
                            mandatory: (t.mandatory || t.queue.is_some()).then_some(t.unroutable),
                            mapping,
                            declare,
                            purge: false,
                        };
                        pending.push((exchange_t, routing_key_t));
                        targets.push(Target::Amqp(AmqpTarget {
                            broker: broker.clone(),
                            exchange: Arc::from(exchange.as_str()),
                            routing_key,
                            metrics: metrics.target(&name, &label),
                            exchange_template: None,
                            routing_key_template: None,
                            options,
                            last_value: t.last_value,
                        }));
                    }
                    TargetConfig::Http(t) => {
                        let endpoint = http.get(&t.endpoint.value).ok_or_else(|| {
                            RuleError::UnknownEndpoint {
                                rule: name.clone(),
                                endpoint: t.endpoint.value.clone(),
                            }
                        })?;
                        targets.push(Target::Http(HttpTarget::start(endpoint, &name, t, metrics)?));
                    }
                }
            }
            let (errors, skipped) = metrics.rule(&name);
            set.tree.insert(&rc.from.value, set.rules.len());
            set.rules.push(Rule {
                name,
                filter: rc.from.value.clone(),
                targets,
                when: None,
                on_error: rc.on_error,
                ack: rc.ack_policy(),
                errors,
                skipped,
                dead_letters: Vec::new(),
            });
            whens.push(when);
        }
        let templates = builder.finish();
        let mut pending = pending.into_iter();
        for (rule, when) in set.rules.iter_mut().zip(whens) {
            rule.when = when.map(|w| templates.condition(w));
            for target in &mut rule.targets {
                let Target::Amqp(t) = target else { continue };
                if let Some((exchange_t, routing_key_t)) = pending.next() {
                    t.exchange_template = exchange_t.map(|p| templates.template(p));
                    t.routing_key_template = routing_key_t.map(|p| templates.template(p));
                }
            }
        }
        Ok(set)
    }

    /// Makes every target of every rule keep the messages that fail for good at it in
    /// `dead_letters` (a session's messages only; [`Target::send`] never records).
    pub fn record_dead_letters(&mut self, dead_letters: &DeadLetters) {
        for rule in &mut self.rules {
            rule.dead_letters = (0..rule.targets.len())
                .map(|i| {
                    let id = target_id(&rule.name, i);
                    Arc::new(Recorder::new(dead_letters.clone(), &rule.name, &id))
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

    /// The target with id `id` (see [`target_id`]) and its rule.
    pub fn target(&self, id: &str) -> Option<(&Rule, &Target)> {
        let (rule, index) = id.rsplit_once('/')?;
        let index: usize = index.parse().ok()?;
        let rule = self.rules.iter().find(|r| r.name == rule)?;
        Some((rule, rule.targets.get(index)?))
    }
}
