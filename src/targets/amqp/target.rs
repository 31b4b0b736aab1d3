//! The `- amqp:` target of a rule: an exchange (or a job queue) on a named broker. Resolves
//! the exchange and routing key of each message (templates, the topic mapping) and the
//! topic's last-value queue, then hands the publishes to the broker's sink.

use std::sync::Arc;

use crate::message::Message;
use crate::metrics::{Metrics, TargetMetrics};
use crate::rules::mapping;
use crate::rules::LazyContext;
use crate::targets::{Explained, Handoff, Target};
use crate::template::{self, Template, TemplateError};

use super::{AmqpBroker, PublishOptions, PublishRequest, QueueSpec};
use crate::config::{AmqpTargetConfig, TopicMapping};

/// An AMQP exchange target.
#[derive(Debug)]
pub struct AmqpTarget {
    /// The target's stable id.
    pub id: String,
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
    /// Compiles target `t` (id `id`) of rule `rule` on `broker`; `default_mapping` is the
    /// broker's `topic_mapping`.
    pub fn build(
        id: &str,
        rule: &str,
        t: &AmqpTargetConfig,
        broker: &AmqpBroker,
        default_mapping: TopicMapping,
        metrics: &Metrics,
    ) -> Result<AmqpTarget, TemplateError> {
        let compile = |text: &str| {
            if template::is_template(text) {
                Template::compile(text).map(Some)
            } else {
                Ok(None)
            }
        };
        let exchange_template = compile(&t.exchange.value)?;
        let routing_key_template = match &t.routing_key {
            Some(rk) => compile(&rk.value)?,
            None => None,
        };
        let mapping = t.topic_mapping.unwrap_or(default_mapping);
        let (exchange, routing_key, declare) = match &t.queue {
            Some(q) => {
                let args = t.arguments.clone().into_iter().collect();
                let spec = Arc::new(QueueSpec::job(&q.value, args));
                (String::new(), Some(q.value.clone()), Some(spec))
            }
            None => {
                (t.exchange.value.clone(), t.routing_key.as_ref().map(|r| r.value.clone()), None)
            }
        };
        let options = PublishOptions {
            // A job queue's publishes are always mandatory: a deleted queue fails them (and
            // gets declared again) instead of dropping them silently.
            mandatory: (t.mandatory || t.queue.is_some()).then_some(t.unroutable),
            mapping,
            declare,
            purge: false,
        };
        Ok(AmqpTarget {
            id: id.to_owned(),
            broker: broker.clone(),
            exchange: Arc::from(exchange.as_str()),
            routing_key,
            metrics: metrics.target(rule, &label(t)),
            exchange_template,
            routing_key_template,
            options,
            last_value: t.last_value,
        })
    }

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

    /// Hands one publish to the broker's sink (or to the blocked requests).
    fn publish(
        &self,
        msg: &Arc<Message>,
        exchange: Arc<str>,
        routing_key: String,
        options: PublishOptions,
        hand: &mut Handoff<'_>,
    ) {
        let req = PublishRequest {
            exchange,
            routing_key,
            msg: Arc::clone(msg),
            ack: hand.ack(),
            metrics: self.metrics.clone(),
            options,
            dead_letter: hand.dead_letter(),
        };
        hand.offer(
            req,
            |req| self.broker.try_publish(req),
            |req| {
                let broker = self.broker.clone();
                Box::pin(async move { broker.publish(req).await })
            },
        );
    }
}

impl Target for AmqpTarget {
    fn counters(&self) -> Option<&crate::metrics::TargetMetrics> {
        Some(&self.metrics)
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn hand_over(
        &self,
        msg: &Arc<Message>,
        ctx: &mut LazyContext,
        hand: &mut Handoff<'_>,
    ) -> Result<(), TemplateError> {
        let (exchange, routing_key) = self.resolve(msg, ctx)?;
        self.publish(msg, exchange, routing_key, self.options.clone(), hand);
        if let Some((name, options)) = self.last_value_publish(msg) {
            self.publish(msg, Arc::from(""), name, options, hand);
        }
        Ok(())
    }

    fn explain(&self, msg: &Arc<Message>, ctx: &mut LazyContext) -> Explained {
        let mut e = Explained::new(&self.id, "amqp");
        e.field("broker", self.broker.name());
        match self.resolve(msg, ctx) {
            Ok((exchange, routing_key)) => {
                match &self.options.declare {
                    Some(queue) => {
                        e.field("queue", queue.name.to_string());
                        e.field("exchange", "");
                        e.note("a job queue: declared before the first publish, published to through the default exchange");
                    }
                    None => e.field("exchange", &*exchange),
                }
                if routing_key.len() > super::MAX_SHORT_STRING_LENGTH {
                    e.error = Some("routing key longer than 255 bytes: the publish fails".into());
                }
                e.field("routing_key", routing_key);
            }
            Err(error) => e.error = Some(error.to_string()),
        }
        e.field("mandatory", self.options.mandatory.is_some());
        e.field("topic_mapping", format!("{:?}", self.options.mapping).to_lowercase());
        if let Some((name, options)) = self.last_value_publish(msg) {
            e.field("last_value_queue", name);
            if options.purge {
                e.note("an empty retained message purges the topic's last-value queue");
            }
        }
        e
    }
}

/// The target's label in metrics: `amqp:BROKER/EXCHANGE` or `amqp:BROKER/queue:NAME`.
pub fn label(t: &AmqpTargetConfig) -> String {
    match &t.queue {
        Some(q) => format!("amqp:{}/queue:{}", t.broker.value, q.value),
        None => format!("amqp:{}/{}", t.broker.value, t.exchange.value),
    }
}
