//! The rule set: compiled once from the config, then only read. Matches a topic to the
//! targets its message must reach.
//!
//! Pure: no I/O and no locks. A target holds the handle of the sink it feeds, but publishing is
//! the caller's job (the session), so the rule set never blocks.

use std::collections::BTreeMap;
use std::sync::Arc;

use thiserror::Error;

use crate::config::{Config, TargetConfig};
use crate::metrics::{Metrics, TargetMetrics};
use crate::mqtt::topic::{self, TopicTree};
use crate::sinks::amqp::AmqpBroker;
use crate::sinks::http::{HttpEndpoint, HttpError, HttpTarget};

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
}

/// One destination of a rule.
#[derive(Debug)]
pub enum Target {
    /// An AMQP exchange on a named broker.
    Amqp(AmqpTarget),
    /// An HTTP endpoint (a webhook): the handle of the target's lanes.
    Http(HttpTarget),
}

/// An AMQP exchange target.
#[derive(Debug)]
pub struct AmqpTarget {
    /// The sink for the broker this target names.
    pub broker: AmqpBroker,
    /// Exchange name, shared with every publish request.
    pub exchange: Arc<str>,
    /// Fixed routing key; `None` means the topic translated '/' -> '.'.
    pub routing_key: Option<String>,
    /// Pre-resolved metric handles for this rule and target.
    pub metrics: TargetMetrics,
}

impl AmqpTarget {
    /// The routing key for a message published to `topic`.
    pub fn routing_key_for(&self, topic: &str) -> String {
        match &self.routing_key {
            Some(rk) => rk.clone(),
            None => topic::to_routing_key(topic),
        }
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
        for rc in &config.rules {
            let name = rc.name.value.clone();
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
                        let label = format!("amqp:{}/{}", t.broker.value, t.exchange.value);
                        targets.push(Target::Amqp(AmqpTarget {
                            broker: broker.clone(),
                            exchange: Arc::from(t.exchange.value.as_str()),
                            routing_key: t.routing_key.as_ref().map(|r| r.value.clone()),
                            metrics: metrics.target(&name, &label),
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
            set.tree.insert(&rc.from.value, set.rules.len());
            set.rules.push(Rule { name, filter: rc.from.value.clone(), targets });
        }
        Ok(set)
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
}
