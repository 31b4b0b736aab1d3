//! The Kafka kind in the target registry: clusters under `kafka:`, `- kafka:` targets.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_saphyr::{Location, Spanned};

use super::config::{validate_cluster, validate_target, KafkaClusterConfig, KafkaTargetConfig};
use super::producer::{client_config, Cluster};
use super::target::KafkaTarget;
use crate::config::types::{Report, Sections};
use crate::rules::RuleError;
use crate::targets::kinds::{BuildContext, StartContext, StartedContext, Systems, TargetKind};
use crate::targets::Target;

/// The kind's name: its key in a rule's `to:`, and its section.
const NAME: &str = "kafka";

/// The Kafka kind.
pub struct KafkaKind;

/// The running clusters, by name, with how long to wait for their records at shutdown.
struct KafkaSystems {
    clusters: BTreeMap<String, (Arc<Cluster>, std::time::Duration)>,
}

fn clusters(sections: &dyn Sections) -> Option<&BTreeMap<String, KafkaClusterConfig>> {
    KafkaKind::section_of(sections)
}

impl TargetKind for KafkaKind {
    const NAME: &'static str = NAME;
    const SECTION: &'static str = NAME;
    type Config = KafkaTargetConfig;
    type SystemConfig = KafkaClusterConfig;

    fn explicit_id(t: &KafkaTargetConfig) -> Option<&Spanned<String>> {
        t.id.as_ref()
    }

    fn endpoint(t: &KafkaTargetConfig) -> String {
        format!("{NAME}:{}/{}", t.cluster.value, t.topic.value)
    }

    fn location(t: &KafkaTargetConfig) -> &Location {
        super::config::location(t)
    }

    fn system(t: &KafkaTargetConfig) -> &str {
        &t.cluster.value
    }

    fn validate_systems(sections: &dyn Sections, err: &mut Report<'_>) {
        for (name, c) in clusters(sections).into_iter().flatten() {
            validate_cluster(name, c, err);
            // librdkafka's own check of every property (unknown names, bad values), without
            // creating a client.
            if let Ok(cc) = client_config(c) {
                if let Err(e) = cc.create_native_config() {
                    err(&c.bootstrap.referenced, format!("kafka.{name}: {e}"));
                }
            }
        }
    }

    fn validate(rule: &str, t: &KafkaTargetConfig, sections: &dyn Sections, err: &mut Report<'_>) {
        validate_target(rule, t, clusters(sections).unwrap_or(&BTreeMap::new()), err);
    }

    fn start(sections: &dyn Sections, at: &mut StartContext<'_>) -> anyhow::Result<()> {
        let mut running = BTreeMap::new();
        for (name, c) in clusters(sections).into_iter().flatten() {
            // A reload with this cluster unchanged: the same producer.
            let kept = at
                .reusable::<KafkaSystems>(NAME, NAME, name)
                .and_then(|s| s.clusters.get(name))
                .cloned();
            if let Some(kept) = kept {
                at.systems
                    .add_health(Arc::clone(&kept.0) as Arc<dyn crate::targets::kinds::Health>);
                at.systems.mark_reused(NAME, name);
                running.insert(name.clone(), kept);
                continue;
            }
            let cluster = Arc::new(Cluster::new(name, c, at.connect)?);
            if at.connect {
                at.systems
                    .add_health(Arc::clone(&cluster) as Arc<dyn crate::targets::kinds::Health>);
            }
            running.insert(name.clone(), (cluster, c.delivery_timeout.0));
        }
        at.systems.insert(NAME, KafkaSystems { clusters: running });
        Ok(())
    }

    fn build(
        id: &str,
        rule: &str,
        t: &KafkaTargetConfig,
        at: &BuildContext<'_>,
    ) -> Result<Arc<dyn Target>, RuleError> {
        let unknown = || RuleError::UnknownSystem {
            rule: rule.to_owned(),
            section: NAME,
            name: t.cluster.value.clone(),
        };
        let systems = at.systems.get::<KafkaSystems>(NAME).ok_or_else(unknown)?;
        let (cluster, _) = systems.clusters.get(&t.cluster.value).ok_or_else(unknown)?;
        let metrics = at.metrics.target(rule, &Self::endpoint(t));
        let target = KafkaTarget::build(id, t, cluster, metrics)
            .map_err(|error| RuleError::Template { rule: rule.to_owned(), error })?;
        Ok(Arc::new(target))
    }

    /// At shutdown (after the sessions), waits for what the producers still hold.
    fn started(_sections: &dyn Sections, at: &mut StartedContext<'_>) {
        let Some(systems) = at.systems.get::<KafkaSystems>(NAME) else { return };
        for (name, (cluster, timeout)) in &systems.clusters {
            if at.systems.is_reused(NAME, name) {
                continue;
            }
            let (cluster, timeout) = (Arc::clone(cluster), *timeout);
            let shutdown = at.shutdown.clone();
            at.tasks.spawn(async move {
                shutdown.cancelled().await;
                let _ = tokio::task::spawn_blocking(move || cluster.flush(timeout)).await;
            });
        }
    }

    /// A cluster a reload removed or changed: its producer is flushed (what it holds is
    /// reported) on a thread of its own, then dropped once its last target is.
    fn retire(old: &Systems, kept: &dyn Fn(&str, &str) -> bool) {
        let Some(systems) = old.get::<KafkaSystems>(NAME) else { return };
        for (name, (cluster, timeout)) in &systems.clusters {
            if !kept(NAME, name) {
                let (cluster, timeout) = (Arc::clone(cluster), *timeout);
                let spawned = std::thread::Builder::new()
                    .name(format!("kafka-retire-{name}"))
                    .spawn(move || cluster.flush(timeout));
                if let Err(e) = spawned {
                    tracing::warn!(cluster = %name, error = %e, "cannot flush a retired Kafka producer");
                }
            }
        }
    }
}
