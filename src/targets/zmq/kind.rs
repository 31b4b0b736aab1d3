//! The ZeroMQ kind in the target registry: sockets under `zmq:`, `- zmq:` targets.

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_saphyr::{Location, Spanned};

use super::config::{validate_socket, validate_target, ZmqSocketConfig, ZmqTargetConfig};
use super::socket::ZmqSocket;
use super::target::ZmqTarget;
use crate::config::types::{Report, Sections};
use crate::rules::RuleError;
use crate::targets::kinds::{BuildContext, RunningSystems, StartContext, Systems, TargetKind};
use crate::targets::Target;

/// The kind's name: its key in a rule's `to:`, and its section.
const NAME: &str = "zmq";

/// The ZeroMQ kind.
pub struct ZmqKindImpl;

/// The sockets, by name, each with what stops its task.
type ZmqSystems = RunningSystems<ZmqSocket>;

/// `mqgate_zmq_dropped_total{socket}`.
struct Families {
    dropped: Family<SocketLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SocketLabel {
    socket: String,
}

fn sockets(sections: &dyn Sections) -> Option<&BTreeMap<String, ZmqSocketConfig>> {
    ZmqKindImpl::section_of(sections)
}

impl TargetKind for ZmqKindImpl {
    const NAME: &'static str = NAME;
    const SECTION: &'static str = NAME;
    const CONFIRMS: bool = false;
    type Config = ZmqTargetConfig;
    type SystemConfig = ZmqSocketConfig;

    fn explicit_id(t: &ZmqTargetConfig) -> Option<&Spanned<String>> {
        t.id.as_ref()
    }

    fn endpoint(t: &ZmqTargetConfig) -> String {
        format!("{NAME}:{}", t.socket.value)
    }

    fn location(t: &ZmqTargetConfig) -> &Location {
        super::config::location(t)
    }

    fn system(t: &ZmqTargetConfig) -> &str {
        &t.socket.value
    }

    fn validate_systems(sections: &dyn Sections, err: &mut Report<'_>) {
        for (name, s) in sockets(sections).into_iter().flatten() {
            validate_socket(name, s, err);
        }
    }

    fn validate(rule: &str, t: &ZmqTargetConfig, sections: &dyn Sections, err: &mut Report<'_>) {
        validate_target(rule, t, sockets(sections).unwrap_or(&BTreeMap::new()), err);
    }

    fn register_metrics(registry: &mut Registry) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        let families = Families { dropped: Family::default() };
        registry.register(
            "zmq_dropped",
            "Messages a ZeroMQ PUB socket dropped because its queue (sndhwm, max_queued_bytes) was full",
            families.dropped.clone(),
        );
        Some(Box::new(families))
    }

    fn start(sections: &dyn Sections, at: &mut StartContext<'_>) -> anyhow::Result<()> {
        let families = at.metrics.kinds.get::<Families>(NAME);
        let mut running = ZmqSystems::default();
        for (name, cfg) in sockets(sections).into_iter().flatten() {
            // A reload with this socket unchanged: the same socket (and its peers).
            if running.keep(at, NAME, NAME, name) {
                continue;
            }
            let dropped = families
                .map(|f| f.dropped.get_or_create(&SocketLabel { socket: name.clone() }).clone())
                .unwrap_or_default();
            running.add(at, name, ZmqSocket::new(name, cfg, dropped), |s, stop| s.start(cfg, stop));
        }
        at.systems.insert(NAME, running);
        Ok(())
    }

    fn build(
        id: &str,
        rule: &str,
        t: &ZmqTargetConfig,
        at: &BuildContext<'_>,
    ) -> Result<Arc<dyn Target>, RuleError> {
        let unknown = || RuleError::UnknownSystem {
            rule: rule.to_owned(),
            section: NAME,
            name: t.socket.value.clone(),
        };
        let systems = at.systems.get::<ZmqSystems>(NAME).ok_or_else(unknown)?;
        let socket = systems.get(&t.socket.value).ok_or_else(unknown)?;
        Ok(Arc::new(ZmqTarget::new(id, socket, at.metrics.target(rule, &Self::endpoint(t)))))
    }

    /// Closes the sockets a reload removed or changed.
    fn retire(old: &Systems, kept: &dyn Fn(&str, &str) -> bool) {
        ZmqSystems::retire(old, NAME, NAME, kept);
    }
}
