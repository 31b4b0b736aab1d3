//! The MQTT bridge kind in the target registry: bridges under `bridges:`, `- mqtt:` targets,
//! and the `bridge:` sources that ride on the same connections.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_saphyr::{Location, Spanned};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::client::{Bridge, BridgeMetrics, Downlink};
use super::config::{validate_bridge, validate_target, BridgeConfig, MqttTargetConfig};
use super::target::MqttTarget;
use crate::broker::tracking::Mode;
use crate::config::types::{Report, Sections};
use crate::mqtt::codec::QoS;
use crate::rules::RuleError;
use crate::sources::config::{SourceConfig, SourceMode};
use crate::targets::kinds::{BuildContext, StartContext, StartedContext, Systems, TargetKind};
use crate::targets::Target;

/// The kind's name: its key in a rule's `to:`.
const NAME: &str = "mqtt";
/// Its section of systems.
const SECTION: &str = "bridges";

/// The MQTT bridge kind.
pub struct MqttKind;

/// The bridges, by name, with their config (the task starts in `started`) and what stops
/// them (a child of the sinks' shutdown: a reload cancels it for a bridge it removed or
/// changed).
pub struct MqttSystems {
    bridges: BTreeMap<String, (Bridge, BridgeConfig, CancellationToken)>,
}

/// `mqgate_bridge_messages_total{bridge, outcome}` and `mqgate_bridge_connects_total{bridge}`.
pub struct BridgeFamilies {
    messages: Family<BridgeOutcome, Counter>,
    connects: Family<BridgeLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BridgeOutcome {
    bridge: String,
    /// `published`, `failed`, `dropped_full`, `received`, `echo_dropped`.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BridgeLabel {
    bridge: String,
}

impl BridgeFamilies {
    fn for_bridge(&self, name: &str) -> BridgeMetrics {
        let c = |outcome| {
            self.messages.get_or_create(&BridgeOutcome { bridge: name.to_owned(), outcome }).clone()
        };
        BridgeMetrics {
            published: c("published"),
            failed: c("failed"),
            dropped_full: c("dropped_full"),
            received: c("received"),
            echoes: c("echo_dropped"),
            connects: self.connects.get_or_create(&BridgeLabel { bridge: name.to_owned() }).clone(),
        }
    }
}

fn bridges(sections: &dyn Sections) -> Option<&BTreeMap<String, BridgeConfig>> {
    MqttKind::section_of(sections)
}

impl TargetKind for MqttKind {
    const NAME: &'static str = NAME;
    const SECTION: &'static str = SECTION;
    type Config = MqttTargetConfig;
    type SystemConfig = crate::targets::mqtt::config::BridgeConfig;

    fn explicit_id(t: &MqttTargetConfig) -> Option<&Spanned<String>> {
        t.id.as_ref()
    }

    fn endpoint(t: &MqttTargetConfig) -> String {
        match &t.topic {
            Some(topic) => format!("{NAME}:{}/{}", t.bridge.value, topic.value),
            None => format!("{NAME}:{}", t.bridge.value),
        }
    }

    fn location(t: &MqttTargetConfig) -> &Location {
        super::config::location(t)
    }

    fn system(t: &MqttTargetConfig) -> &str {
        &t.bridge.value
    }

    fn validate_systems(sections: &dyn Sections, err: &mut Report<'_>) {
        let sources: &[SourceConfig] = sections
            .section("sources")
            .and_then(|s| s.downcast_ref::<Vec<SourceConfig>>())
            .map_or(&[], Vec::as_slice);
        for (name, b) in bridges(sections).into_iter().flatten() {
            validate_bridge(name, b, err);
            let downlink =
                sources.iter().any(|s| s.bridge.as_ref().is_some_and(|x| x.value == *name));
            if b.connections > 1 && downlink {
                err(
                    &b.url.referenced,
                    format!("bridges.{name}.connections: more than one only for a bridge without `bridge:` sources (No Local, which keeps the upstream from sending back what the bridge published, works per connection)"),
                );
            }
        }
    }

    fn validate(rule: &str, t: &MqttTargetConfig, sections: &dyn Sections, err: &mut Report<'_>) {
        validate_target(rule, t, bridges(sections).unwrap_or(&BTreeMap::new()), err);
    }

    fn register_metrics(registry: &mut Registry) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        let families = BridgeFamilies { messages: Family::default(), connects: Family::default() };
        registry.register(
            "bridge_messages",
            "Messages through MQTT bridges by outcome: published (the upstream took it), failed, dropped_full (QoS 0, queue full), received (from the upstream, taken locally), echo_dropped (a 3.1.1 upstream's echo of our own)",
            families.messages.clone(),
        );
        registry.register(
            "bridge_connects",
            "Connections made to the upstream broker (the first and every reconnect)",
            families.connects.clone(),
        );
        Some(Box::new(families))
    }

    fn start(sections: &dyn Sections, at: &mut StartContext<'_>) -> anyhow::Result<()> {
        let families = at.metrics.kinds.get::<BridgeFamilies>(NAME);
        let mut running = BTreeMap::new();
        for (name, cfg) in bridges(sections).into_iter().flatten() {
            // A reload with this bridge (and its `bridge:` sources) unchanged: the same
            // connections.
            let kept = at
                .reusable::<MqttSystems>(NAME, SECTION, name)
                .and_then(|s| s.bridges.get(name))
                .cloned();
            if let Some(kept) = kept {
                at.systems.add_health(Arc::new(kept.0.clone()));
                at.systems.mark_reused(SECTION, name);
                running.insert(name.clone(), kept);
                continue;
            }
            let metrics = families.map(|f| f.for_bridge(name)).unwrap_or_default();
            let bridge = Bridge::new(name, cfg, metrics);
            at.systems.add_health(Arc::new(bridge.clone()));
            running.insert(name.clone(), (bridge, cfg.clone(), at.shutdown.child_token()));
        }
        at.systems.insert(NAME, MqttSystems { bridges: running });
        Ok(())
    }

    fn build(
        id: &str,
        rule: &str,
        t: &MqttTargetConfig,
        at: &BuildContext<'_>,
    ) -> Result<Arc<dyn Target>, RuleError> {
        let unknown =
            || RuleError::UnknownBridge { rule: rule.to_owned(), bridge: t.bridge.value.clone() };
        let systems = at.systems.get::<MqttSystems>(NAME).ok_or_else(unknown)?;
        let (bridge, _, _) = systems.bridges.get(&t.bridge.value).ok_or_else(unknown)?;
        let metrics = at.metrics.target(rule, &Self::endpoint(t));
        let target = MqttTarget::build(id, t, bridge, metrics)
            .map_err(|error| RuleError::Template { rule: rule.to_owned(), error })?;
        Ok(Arc::new(target))
    }

    /// Connects every bridge, with the `bridge:` sources that rode on it ([`MqttSourceKind`]).
    fn started(_sections: &dyn Sections, at: &mut StartedContext<'_>) {
        let Some(systems) = at.systems.get::<MqttSystems>(NAME) else { return };
        for (name, (bridge, cfg, shutdown)) in &systems.bridges {
            if at.systems.is_reused(SECTION, name) {
                continue;
            }
            let shutdown = shutdown.clone();
            for handle in bridge.start(cfg.clone(), Arc::clone(at.broker), shutdown) {
                let name = name.clone();
                at.tasks.spawn(async move {
                    if let Err(e) = handle.await {
                        error!(bridge = %name, error = %e, "bridge task failed");
                    }
                });
            }
        }
    }

    /// Disconnects the bridges a reload removed or changed.
    fn retire(old: &Systems, kept: &dyn Fn(&str, &str) -> bool) {
        let Some(systems) = old.get::<MqttSystems>(NAME) else { return };
        for (name, (_, _, shutdown)) in &systems.bridges {
            if !kept(SECTION, name) {
                info!(bridge = %name, "bridge removed or changed by a reload: disconnecting");
                shutdown.cancel();
            }
        }
    }
}

/// `bridge:` sources: their subscriptions ride on the bridge's connection, which publishes
/// what comes in into the broker, tracked, and acknowledges upstream once MQTT has taken it.
pub struct MqttSourceKind;

impl crate::sources::SourceKind for MqttSourceKind {
    fn claims(source: &SourceConfig) -> bool {
        source.bridge.is_some()
    }

    fn start(
        source: &SourceConfig,
        _config: &crate::config::Config,
        at: &mut crate::sources::SourceContext<'_>,
    ) {
        let Some(name) = &source.bridge else { return };
        let Some(systems) = at.systems.get::<MqttSystems>(NAME) else { return };
        if at.systems.is_reused(SECTION, &name.value) {
            // Kept by a reload: its downlinks are the same and already added.
            return;
        }
        let (Some((bridge, _, _)), Some(downlink)) =
            (systems.bridges.get(&name.value), downlink(source))
        else {
            return;
        };
        bridge.add_downlink(downlink);
    }
}

/// A `bridge:` source as the bridge runs it (the config is validated).
fn downlink(s: &SourceConfig) -> Option<Downlink> {
    let topic = match &s.topic {
        Some(t) => Some(crate::template::Template::compile(&t.value).ok()?),
        None => None,
    };
    Some(Downlink {
        name: s.name.value.clone(),
        filters: s.subscribe.iter().map(|f| f.value.clone()).collect(),
        qos: match s.qos.value {
            0 => QoS::AtMostOnce,
            2 => QoS::ExactlyOnce,
            _ => QoS::AtLeastOnce,
        },
        topic,
        mode: match s.mode {
            SourceMode::Broadcast => Mode::Broadcast,
            SourceMode::Work => Mode::Work,
        },
    })
}
