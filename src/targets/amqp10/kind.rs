//! The AMQP 1.0 kind in the target registry: brokers under `amqp10:`, `- amqp10:` targets.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_saphyr::{Location, Spanned};

use super::client::{Amqp10Broker, BrokerMetrics};
use super::config::{validate_broker, validate_target, Amqp10BrokerConfig, Amqp10TargetConfig};
use super::target::Amqp10Target;
use crate::config::types::{Report, Sections};
use crate::rules::RuleError;
use crate::targets::kinds::{BuildContext, RunningSystems, StartContext, TargetKind};
use crate::targets::Target;

/// The kind's name: its key in a rule's `to:`, and its section.
const NAME: &str = "amqp10";

/// The AMQP 1.0 kind.
pub struct Amqp10Kind;

/// The brokers, by name, each with what stops its connection task.
type Amqp10Systems = RunningSystems<Amqp10Broker>;

/// The kind's metric families.
struct Families {
    messages: Family<OutcomeLabels, Counter>,
    connects: Family<BrokerLabel, Counter>,
    connected: Family<BrokerLabel, Gauge>,
    links: Family<BrokerLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    broker: String,
    /// `accepted`, `rejected`, `released` (or modified), `failed` (no outcome),
    /// `dropped_full`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerLabel {
    broker: String,
}

impl Families {
    fn for_broker(&self, name: &str) -> BrokerMetrics {
        let c = |outcome| {
            self.messages.get_or_create(&OutcomeLabels { broker: name.to_owned(), outcome }).clone()
        };
        let label = BrokerLabel { broker: name.to_owned() };
        BrokerMetrics {
            accepted: c("accepted"),
            rejected: c("rejected"),
            released: c("released"),
            failed: c("failed"),
            dropped_full: c("dropped_full"),
            connects: self.connects.get_or_create(&label).clone(),
            connected: self.connected.get_or_create(&label).clone(),
            links: self.links.get_or_create(&label).clone(),
        }
    }
}

fn brokers(sections: &dyn Sections) -> Option<&BTreeMap<String, Amqp10BrokerConfig>> {
    Amqp10Kind::section_of(sections)
}

impl TargetKind for Amqp10Kind {
    const NAME: &'static str = NAME;
    const SECTION: &'static str = NAME;
    type Config = Amqp10TargetConfig;
    type SystemConfig = Amqp10BrokerConfig;

    fn explicit_id(t: &Amqp10TargetConfig) -> Option<&Spanned<String>> {
        t.id.as_ref()
    }

    fn endpoint(t: &Amqp10TargetConfig) -> String {
        format!("{NAME}:{}/{}", t.broker.value, t.address.value)
    }

    fn location(t: &Amqp10TargetConfig) -> &Location {
        super::config::location(t)
    }

    fn system(t: &Amqp10TargetConfig) -> &str {
        &t.broker.value
    }

    fn validate_systems(sections: &dyn Sections, err: &mut Report<'_>) {
        for (name, b) in brokers(sections).into_iter().flatten() {
            validate_broker(name, b, err);
        }
    }

    fn validate(rule: &str, t: &Amqp10TargetConfig, sections: &dyn Sections, err: &mut Report<'_>) {
        validate_target(rule, t, brokers(sections).unwrap_or(&BTreeMap::new()), err);
    }

    fn register_metrics(registry: &mut Registry) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        let families = Families {
            messages: Family::default(),
            connects: Family::default(),
            connected: Family::default(),
            links: Family::default(),
        };
        registry.register(
            "amqp10_messages",
            "Messages sent to AMQP 1.0 brokers by outcome: accepted (delivered), rejected (final failure), released (released or modified: retryable), failed (no outcome: not connected, link or connection lost, attach refused), dropped_full (QoS 0, the address's queue full)",
            families.messages.clone(),
        );
        registry.register(
            "amqp10_connects",
            "Connections made to the AMQP 1.0 broker (the first and every reconnect)",
            families.connects.clone(),
        );
        registry.register(
            "amqp10_connected",
            "1 while the AMQP 1.0 broker's connection and session are up",
            families.connected.clone(),
        );
        registry.register(
            "amqp10_links",
            "Sender links attached to the AMQP 1.0 broker (one per address in use)",
            families.links.clone(),
        );
        Some(Box::new(families))
    }

    fn start(sections: &dyn Sections, at: &mut StartContext<'_>) -> anyhow::Result<()> {
        let families = at.metrics.kinds.get::<Families>(NAME);
        let mut running = Amqp10Systems::default();
        for (name, cfg) in brokers(sections).into_iter().flatten() {
            // A reload with this broker unchanged: the same connection.
            if running.keep(at, NAME, NAME, name) {
                continue;
            }
            let metrics = families.map(|f| f.for_broker(name)).unwrap_or_default();
            let broker = Amqp10Broker::new(name, cfg, metrics);
            running.add(at, name, broker, |b, stop| b.start(cfg, stop));
        }
        at.systems.insert(NAME, running);
        Ok(())
    }

    fn build(
        id: &str,
        rule: &str,
        t: &Amqp10TargetConfig,
        at: &BuildContext<'_>,
    ) -> Result<Arc<dyn Target>, RuleError> {
        let unknown =
            || RuleError::UnknownBroker { rule: rule.to_owned(), broker: t.broker.value.clone() };
        let systems = at.systems.get::<Amqp10Systems>(NAME).ok_or_else(unknown)?;
        let broker = systems.get(&t.broker.value).ok_or_else(unknown)?;
        let metrics = at.metrics.target(rule, &Self::endpoint(t));
        let target = Amqp10Target::build(id, t, broker, metrics)
            .map_err(|error| RuleError::Template { rule: rule.to_owned(), error })?;
        Ok(Arc::new(target))
    }

    /// Closes the connections of the brokers a reload removed or changed.
    fn retire(old: &crate::targets::kinds::Systems, kept: &dyn Fn(&str, &str) -> bool) {
        Amqp10Systems::retire(old, NAME, NAME, kept);
    }
}
