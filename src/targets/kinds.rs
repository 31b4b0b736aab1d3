//! The registry of target kinds: each kind is a folder under `src/targets/` implementing
//! [`TargetKind`], and one line in [`kinds!`] below. The line makes `- <kind>: {...}` a valid
//! entry of a rule's `to:` ([`TargetConfig`]), and routes the checks, the start of the kind's
//! systems (broker connections, endpoints) and the building of its targets to the kind.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Target;
use crate::config::types::{Report, Sections};
use crate::metrics::Metrics;
use crate::rules::RuleError;

/// One kind of target.
pub trait TargetKind {
    /// The kind's name (its key in a rule's `to:`).
    const NAME: &'static str;

    /// Its top-level section of systems (`amqp`, `http`, `bridges`).
    const SECTION: &'static str;

    /// Whether the kind's systems confirm what they take (an AMQP confirm, an HTTP 2xx, a
    /// Kafka acknowledgement). A kind that confirms nothing (ZeroMQ) may only be used by
    /// `ack: receive` rules: anything else would promise what it cannot keep.
    const CONFIRMS: bool = true;

    /// The config of one target (`- amqp: {...}`).
    type Config;

    /// The config of one system of [`SECTION`](Self::SECTION) (an `amqp:` broker): the
    /// section is a map of these by name.
    type SystemConfig: 'static;

    /// The kind's section of the config, by name.
    fn section_of(
        sections: &dyn Sections,
    ) -> Option<&std::collections::BTreeMap<String, Self::SystemConfig>> {
        sections.section(Self::SECTION)?.downcast_ref()
    }

    /// The target's `id:`, when the config gives one.
    fn explicit_id(t: &Self::Config) -> Option<&Spanned<String>>;

    /// Where the target sends, as `KIND:SYSTEM/...` (`amqp:main/events`): with the rule's
    /// name, the target's id when no `id:` is given. Also its label in metrics.
    fn endpoint(t: &Self::Config) -> String;

    /// Where problems of the target as a whole are reported.
    fn location(t: &Self::Config) -> &Location;

    /// The name of the system (under [`SECTION`](Self::SECTION)) the target sends through.
    fn system(t: &Self::Config) -> &str;

    /// Checks the kind's systems (its sections of the config).
    fn validate_systems(sections: &dyn Sections, err: &mut Report<'_>);

    /// Checks one target of rule `rule` (with what it names in `sections`).
    fn validate(rule: &str, t: &Self::Config, sections: &dyn Sections, err: &mut Report<'_>);

    /// Starts what the kind's targets share (connections to brokers, endpoints' clients), from
    /// the kind's sections of the config, before any target is built. With `at.connect`
    /// false (the route dry-run) it only builds the handles its targets need: no task, no
    /// connection.
    fn start(sections: &dyn Sections, at: &mut StartContext<'_>) -> anyhow::Result<()>;

    /// Builds target `t` (id `id`) of rule `rule` on the started systems.
    fn build(
        id: &str,
        rule: &str,
        t: &Self::Config,
        at: &BuildContext<'_>,
    ) -> Result<Arc<dyn Target>, RuleError>;

    /// Registers the kind's own metric families (kept in `Metrics::kinds` under its name).
    fn register_metrics(
        _registry: &mut prometheus_client::registry::Registry,
    ) -> Option<Box<dyn Any + Send + Sync>> {
        None
    }

    /// Called once every target is built and the broker holds what the store had (before the
    /// listeners accept anyone): e.g. connects systems that also bring messages in (bridges),
    /// or waits (as a task) for the targets' own tasks at shutdown.
    fn started(_sections: &dyn Sections, _at: &mut StartedContext<'_>) {}

    /// After a reload swapped a new config in: stops what `old` runs that the new one did not
    /// keep (`kept(section, name)`) and that does not end by itself once its handles are
    /// dropped (a bridge's connection).
    fn retire(_old: &Systems, _kept: &dyn Fn(&str, &str) -> bool) {}
}

/// What a reload may keep: the running systems, and which of them are unchanged.
pub struct Reuse<'a> {
    /// The systems running now.
    pub systems: &'a Systems,
    /// Whether system `name` of section `section` is the same in the new config (then its
    /// running object is kept).
    pub same: &'a (dyn Fn(&str, &str) -> bool + Sync),
}

/// What a kind starts its systems with.
pub struct StartContext<'a> {
    /// The metrics.
    pub metrics: &'a Metrics,
    /// Cancelled once the sessions have finished: the systems stop after them.
    pub shutdown: &'a CancellationToken,
    /// The gateway's tasks: a system's tasks go here (joined at shutdown).
    pub tasks: &'a mut JoinSet<()>,
    /// Where the kind keeps its running systems (and their health).
    pub systems: &'a mut Systems,
    /// False for the route dry-run: build the systems' handles only; spawn nothing, connect
    /// nowhere.
    pub connect: bool,
    /// A reload: the running systems that may be kept.
    pub reuse: Option<&'a Reuse<'a>>,
}

impl StartContext<'_> {
    /// The running systems of kind `kind` (`T`), when system `name` of `section` is the same
    /// in the new config: the kind takes its running object from there (and marks it reused).
    pub fn reusable<T: Any>(&self, kind: &str, section: &str, name: &str) -> Option<&T> {
        let reuse = self.reuse?;
        if !(reuse.same)(section, name) {
            return None;
        }
        reuse.systems.get(kind)
    }
}

/// The running systems of a kind whose every system runs a task of its own (AMQP 1.0 brokers,
/// ZeroMQ sockets), by name, each with the token that stops it: reuse on reload, the task's
/// start and its retirement, written once for those kinds.
pub struct RunningSystems<T> {
    by_name: std::collections::BTreeMap<String, (T, CancellationToken)>,
}

impl<T: Clone + Health + Send + Sync + 'static> Default for RunningSystems<T> {
    fn default() -> Self {
        RunningSystems { by_name: std::collections::BTreeMap::new() }
    }
}

impl<T: Clone + Health + Send + Sync + 'static> RunningSystems<T> {
    /// Takes system `name` of `section` over from the previous config (kept as kind `kind`'s
    /// systems) when a reload left it unchanged; true when it did.
    pub fn keep(
        &mut self,
        at: &mut StartContext<'_>,
        kind: &str,
        section: &str,
        name: &str,
    ) -> bool {
        let kept = at
            .reusable::<RunningSystems<T>>(kind, section, name)
            .and_then(|r| r.by_name.get(name))
            .cloned();
        let Some(kept) = kept else { return false };
        at.systems.add_health(Arc::new(kept.0.clone()));
        at.systems.mark_reused(section, name);
        self.by_name.insert(name.to_owned(), kept);
        true
    }

    /// Adds the new system `name`. With `at.connect`, `start` starts its task with the token
    /// that stops it (a child of the sinks' shutdown) and the system reports its health;
    /// without (the route dry-run), nothing runs.
    pub fn add(
        &mut self,
        at: &mut StartContext<'_>,
        name: &str,
        system: T,
        start: impl FnOnce(&T, CancellationToken) -> Option<tokio::task::JoinHandle<()>>,
    ) {
        let stop = at.shutdown.child_token();
        if at.connect {
            if let Some(handle) = start(&system, stop.clone()) {
                let label = system.name();
                at.tasks.spawn(async move {
                    if let Err(e) = handle.await {
                        tracing::error!(system = %label, error = %e, "task failed");
                    }
                });
            }
            at.systems.add_health(Arc::new(system.clone()));
        }
        self.by_name.insert(name.to_owned(), (system, stop));
    }

    /// System `name`.
    pub fn get(&self, name: &str) -> Option<&T> {
        self.by_name.get(name).map(|(s, _)| s)
    }

    /// After a reload: stops the systems of kind `kind` in `old` that the new config did not
    /// keep (`kept(section, name)`).
    pub fn retire(old: &Systems, kind: &str, section: &str, kept: &dyn Fn(&str, &str) -> bool) {
        let Some(running) = old.get::<RunningSystems<T>>(kind) else { return };
        for (name, (system, stop)) in &running.by_name {
            if !kept(section, name) {
                tracing::info!(system = %system.name(), "removed or changed by a reload: stopping");
                stop.cancel();
            }
        }
    }
}

/// What a kind is told once everything is built.
pub struct StartedContext<'a> {
    /// The running systems of every kind.
    pub systems: &'a Systems,
    /// The gateway's tasks.
    pub tasks: &'a mut JoinSet<()>,
    /// Where messages coming in are published (sources of bridges).
    pub broker: &'a Arc<crate::broker::Broker>,
    /// Cancelled once the sessions have finished: the systems stop after them.
    pub shutdown: &'a CancellationToken,
}

/// What a kind builds its targets with.
pub struct BuildContext<'a> {
    /// The metrics.
    pub metrics: &'a Metrics,
    /// The running systems of every kind.
    pub systems: &'a Systems,
}

/// The running systems of every kind, each kind's own value by its name, and the health of
/// each system for `/readyz`.
#[derive(Default)]
pub struct Systems {
    by_kind: HashMap<&'static str, Box<dyn Any + Send + Sync>>,
    health: Vec<Arc<dyn Health>>,
    /// `SECTION.NAME` of the systems kept from the previous config by a reload.
    reused: std::collections::HashSet<String>,
}

impl Systems {
    /// Keeps `value` as kind `kind`'s systems.
    pub fn insert<T: Any + Send + Sync>(&mut self, kind: &'static str, value: T) {
        self.by_kind.insert(kind, Box::new(value));
    }

    /// Kind `kind`'s systems.
    pub fn get<T: Any>(&self, kind: &str) -> Option<&T> {
        self.by_kind.get(kind)?.downcast_ref()
    }

    /// Adds a system to what `/readyz` reports.
    pub fn add_health(&mut self, system: Arc<dyn Health>) {
        self.health.push(system);
    }

    /// Every system's health, in start order.
    pub fn health(&self) -> &[Arc<dyn Health>] {
        &self.health
    }

    /// Notes that system `name` of `section` was kept from the previous config.
    pub fn mark_reused(&mut self, section: &str, name: &str) {
        self.reused.insert(format!("{section}.{name}"));
    }

    /// Whether system `name` of `section` was kept from the previous config.
    pub fn is_reused(&self, section: &str, name: &str) -> bool {
        self.reused.contains(&format!("{section}.{name}"))
    }

    /// `SECTION.NAME` of every system kept from the previous config.
    pub fn reused(&self) -> impl Iterator<Item = &str> {
        self.reused.iter().map(String::as_str)
    }
}

/// A system's state for `/readyz`.
pub trait Health: Send + Sync {
    /// `KIND NAME` (`amqp main`).
    fn name(&self) -> String;
    /// `Ok(state)` when ready (`connected`), `Err(state)` when not (`disconnected (why)`).
    fn state(&self) -> Result<String, String>;
}

/// Each kind's own metric families, by kind name.
#[derive(Default)]
pub struct KindMetrics(HashMap<&'static str, Box<dyn Any + Send + Sync>>);

impl KindMetrics {
    /// Kind `kind`'s families.
    pub fn get<T: Any>(&self, kind: &str) -> Option<&T> {
        self.0.get(kind)?.downcast_ref()
    }
}

/// A future a kind leaves running.
pub type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The stable id of a target of rule `rule`: its `id:` or `RULE/ENDPOINT`.
pub fn target_id(rule: &str, t: &TargetConfig) -> String {
    match t.explicit_id() {
        Some(id) => id.value.clone(),
        None => format!("{rule}/{}", t.endpoint()),
    }
}

/// Checks every target of `rule`, and that the targets' ids are unique among `ids` (every
/// target of the config: two targets of a rule with the same endpoint need an `id:` each)
/// and printable.
pub fn validate_targets(
    sections: &dyn Sections,
    rule: &crate::config::RuleConfig,
    ids: &mut std::collections::HashSet<String>,
    err: &mut Report<'_>,
) {
    let name = &rule.name.value;
    for t in &rule.to {
        t.validate(name, sections, err);
        if !t.confirms() && rule.ack_policy() != crate::spool::config::AckPolicy::Receive {
            err(
                t.location(),
                format!("rule {name:?}: a {} target confirms nothing it is given, so its rule needs `ack: receive` (acknowledged on receipt, at most once); `ack: {}` would promise a delivery it cannot know of", t.kind_name(), rule.ack_policy().name()),
            );
        }
        if let Some(id) = t.explicit_id() {
            if id.value.is_empty() || id.value.len() > 200 || id.value.contains(char::is_control) {
                err(&id.referenced, format!("rule {name:?}: id: 1 to 200 printable bytes"));
            }
        }
        let id = target_id(name, t);
        if t.explicit_id().is_none() && id.contains(char::is_control) {
            err(t.location(), format!("rule {name:?}: the target's id {id:?} would hold a control character; give it an `id:`"));
        }
        if !ids.insert(id.clone()) {
            err(
                t.location(),
                format!("rule {name:?}: another target has the id {id:?}; give each an `id:` of its own"),
            );
        }
    }
}

macro_rules! kinds {
    ($($variant:ident => $kind:ty),* $(,)?) => {
        /// One target of a rule: `- KIND: {...}`, one variant per registered kind.
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields, rename_all = "snake_case")]
        // Parsed once at start: the variants' sizes do not matter.
        #[allow(clippy::large_enum_variant)]
        pub enum TargetConfig {
            $(
                #[allow(missing_docs)]
                $variant(<$kind as TargetKind>::Config),
            )*
        }

        impl TargetConfig {
            /// The target's `id:`, when the config gives one.
            pub fn explicit_id(&self) -> Option<&Spanned<String>> {
                match self { $(TargetConfig::$variant(t) => <$kind>::explicit_id(t),)* }
            }

            /// Where the target sends (`amqp:main/events`).
            pub fn endpoint(&self) -> String {
                match self { $(TargetConfig::$variant(t) => <$kind>::endpoint(t),)* }
            }

            /// Whether the target's kind confirms what it takes ([`TargetKind::CONFIRMS`]).
            pub fn confirms(&self) -> bool {
                match self { $(TargetConfig::$variant(_) => <$kind>::CONFIRMS,)* }
            }

            /// The kind's name (its key in `to:`).
            pub fn kind_name(&self) -> &'static str {
                match self { $(TargetConfig::$variant(_) => <$kind as TargetKind>::NAME,)* }
            }

            /// Where problems of the target as a whole are reported.
            pub fn location(&self) -> &Location {
                match self { $(TargetConfig::$variant(t) => <$kind>::location(t),)* }
            }

            /// The section and name of the system the target sends through (`amqp`, `main`).
            pub fn system(&self) -> (&'static str, &str) {
                match self { $(TargetConfig::$variant(t) => (<$kind>::SECTION, <$kind>::system(t)),)* }
            }

            /// Checks the target.
            pub fn validate(&self, rule: &str, sections: &dyn Sections, err: &mut Report<'_>) {
                match self { $(TargetConfig::$variant(t) => <$kind>::validate(rule, t, sections, err),)* }
            }

            /// Builds the target.
            pub fn build(
                &self,
                id: &str,
                rule: &str,
                at: &BuildContext<'_>,
            ) -> Result<Arc<dyn Target>, RuleError> {
                match self { $(TargetConfig::$variant(t) => <$kind>::build(id, rule, t, at),)* }
            }
        }

        /// Registers every kind's own metric families.
        pub fn register_metrics(registry: &mut prometheus_client::registry::Registry) -> KindMetrics {
            let mut kinds = HashMap::new();
            $(
                if let Some(m) = <$kind>::register_metrics(registry) {
                    kinds.insert(<$kind as TargetKind>::NAME, m);
                }
            )*
            KindMetrics(kinds)
        }

        /// Every kind's systems as `section.name` (`amqp.main`), in registry order.
        pub fn system_names(sections: &dyn Sections) -> Vec<String> {
            let mut names = Vec::new();
            $(
                if let Some(systems) = <$kind>::section_of(sections) {
                    for name in systems.keys() {
                        names.push(format!("{}.{name}", <$kind as TargetKind>::SECTION));
                    }
                }
            )*
            names
        }

        /// Checks every kind's systems.
        pub fn validate_systems(sections: &dyn Sections, err: &mut Report<'_>) {
            $(<$kind>::validate_systems(sections, err);)*
        }

        /// Starts every kind's systems.
        pub fn start_systems(sections: &dyn Sections, at: &mut StartContext<'_>) -> anyhow::Result<()> {
            $(<$kind>::start(sections, at)?;)*
            Ok(())
        }

        /// Tells every kind that its targets are built and the broker is ready.
        pub fn started(sections: &dyn Sections, at: &mut StartedContext<'_>) {
            $(<$kind>::started(sections, at);)*
        }

        /// Stops what `old` runs that the new config did not keep (see [`TargetKind::retire`]).
        pub fn retire(old: &Systems, kept: &dyn Fn(&str, &str) -> bool) {
            $(<$kind>::retire(old, kept);)*
        }
    };
}

// The registry: one line per kind.
kinds! {
    Amqp => super::amqp::AmqpKind,
    Amqp10 => super::amqp10::Amqp10Kind,
    Http => super::http::HttpKind,
    Kafka => super::kafka::KafkaKind,
    Mqtt => super::mqtt::MqttKind,
    Zmq => super::zmq::ZmqTargetKind,
}
