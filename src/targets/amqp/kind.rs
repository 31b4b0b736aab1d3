//! The AMQP 0-9-1 kind in the target registry: brokers under `amqp:`, `- amqp:` targets.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_saphyr::{Location, Spanned};
use tracing::error;

use super::config::{validate_target, AmqpBrokerConfig, AmqpTargetConfig};
use super::target::{label, AmqpTarget};
use super::AmqpBroker;
use crate::config::types::{Report, Sections};
use crate::rules::mapping::TopicMapping;
use crate::rules::RuleError;
use crate::targets::kinds::{BuildContext, Health, StartContext, TargetKind};
use crate::targets::Target;

/// The kind's name: its key in a rule's `to:` and its section of the config.
const NAME: &str = "amqp";

/// The AMQP kind.
pub struct AmqpKind;

/// The running brokers, by name, with their default topic mapping.
pub struct AmqpSystems {
    brokers: BTreeMap<String, (AmqpBroker, TopicMapping)>,
}

/// The `amqp:` section.
fn brokers(sections: &dyn Sections) -> Option<&BTreeMap<String, AmqpBrokerConfig>> {
    AmqpKind::section_of(sections)
}

impl TargetKind for AmqpKind {
    const NAME: &'static str = NAME;
    const SECTION: &'static str = NAME;
    type Config = AmqpTargetConfig;
    type SystemConfig = AmqpBrokerConfig;

    fn explicit_id(t: &AmqpTargetConfig) -> Option<&Spanned<String>> {
        t.id.as_ref()
    }

    fn endpoint(t: &AmqpTargetConfig) -> String {
        label(t)
    }

    fn location(t: &AmqpTargetConfig) -> &Location {
        &t.broker.referenced
    }

    fn system(t: &AmqpTargetConfig) -> &str {
        &t.broker.value
    }

    fn validate_systems(sections: &dyn Sections, err: &mut Report<'_>) {
        for (name, broker) in brokers(sections).into_iter().flatten() {
            super::config::validate_broker(name, broker, err);
        }
    }

    fn validate(rule: &str, t: &AmqpTargetConfig, sections: &dyn Sections, err: &mut Report<'_>) {
        validate_target(rule, t, brokers(sections).unwrap_or(&BTreeMap::new()), err);
    }

    fn start(sections: &dyn Sections, at: &mut StartContext<'_>) -> anyhow::Result<()> {
        let mut running = BTreeMap::new();
        for (name, cfg) in brokers(sections).into_iter().flatten() {
            if !at.connect {
                let broker = AmqpBroker::detached(name, cfg, at.metrics);
                running.insert(name.clone(), (broker, cfg.topic_mapping));
                continue;
            }
            // A reload with this broker unchanged: the same connection (its task ends once
            // every handle of a broker no longer configured is dropped).
            let kept = at
                .reusable::<AmqpSystems>(NAME, NAME, name)
                .and_then(|s| s.brokers.get(name))
                .cloned();
            if let Some(kept) = kept {
                at.systems.add_health(Arc::new(kept.0.clone()));
                at.systems.mark_reused(NAME, name);
                running.insert(name.clone(), kept);
                continue;
            }
            let (broker, handle) = AmqpBroker::spawn(name, cfg, at.metrics, at.shutdown.clone());
            at.tasks.spawn(async move {
                if let Err(e) = handle.await {
                    error!(error = %e, "AMQP sink task failed");
                }
            });
            at.systems.add_health(Arc::new(broker.clone()));
            running.insert(name.clone(), (broker, cfg.topic_mapping));
        }
        at.systems.insert(NAME, AmqpSystems { brokers: running });
        Ok(())
    }

    fn build(
        id: &str,
        rule: &str,
        t: &AmqpTargetConfig,
        at: &BuildContext<'_>,
    ) -> Result<Arc<dyn Target>, RuleError> {
        let unknown =
            || RuleError::UnknownBroker { rule: rule.to_owned(), broker: t.broker.value.clone() };
        let systems = at.systems.get::<AmqpSystems>(NAME).ok_or_else(unknown)?;
        let (broker, mapping) = systems.brokers.get(&t.broker.value).ok_or_else(unknown)?;
        let target = AmqpTarget::build(id, rule, t, broker, *mapping, at.metrics)
            .map_err(|error| RuleError::Template { rule: rule.to_owned(), error })?;
        Ok(Arc::new(target))
    }
}

impl Health for AmqpBroker {
    fn name(&self) -> String {
        format!("{NAME} {}", AmqpBroker::name(self))
    }

    fn state(&self) -> Result<String, String> {
        match (self.is_connected(), self.last_error()) {
            (true, _) => Ok("connected".to_owned()),
            (false, Some(e)) => Err(format!("disconnected ({e})")),
            (false, None) => Err("disconnected".to_owned()),
        }
    }
}
