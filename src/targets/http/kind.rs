//! The HTTP kind in the target registry: endpoints under `http:`, `- http:` targets.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_saphyr::{Location, Spanned};

use super::config::{validate_target, HttpEndpointConfig, HttpTargetConfig};
use super::{HttpEndpoint, HttpTarget};
use crate::config::types::{Report, Sections};
use crate::rules::RuleError;
use crate::targets::kinds::{BuildContext, StartContext, StartedContext, TargetKind};
use crate::targets::Target;

/// The kind's name: its key in a rule's `to:` and its section of the config.
const NAME: &str = "http";

/// The HTTP kind.
pub struct HttpKind;

/// The endpoints, by name.
pub struct HttpSystems {
    endpoints: BTreeMap<String, HttpEndpoint>,
}

/// The `http:` section.
fn endpoints(sections: &dyn Sections) -> Option<&BTreeMap<String, HttpEndpointConfig>> {
    HttpKind::section_of(sections)
}

impl TargetKind for HttpKind {
    const NAME: &'static str = NAME;
    const SECTION: &'static str = NAME;
    type Config = HttpTargetConfig;
    type SystemConfig = HttpEndpointConfig;

    fn explicit_id(t: &HttpTargetConfig) -> Option<&Spanned<String>> {
        t.id.as_ref()
    }

    fn endpoint(t: &HttpTargetConfig) -> String {
        match &t.path {
            Some(p) => format!("{NAME}:{}{}", t.endpoint.value, p.value),
            None => format!("{NAME}:{}", t.endpoint.value),
        }
    }

    fn location(t: &HttpTargetConfig) -> &Location {
        &t.endpoint.referenced
    }

    fn system(t: &HttpTargetConfig) -> &str {
        &t.endpoint.value
    }

    fn validate_systems(sections: &dyn Sections, err: &mut Report<'_>) {
        if let Some(endpoints) = endpoints(sections) {
            super::config::validate_endpoints(endpoints, err);
        }
    }

    fn validate(rule: &str, t: &HttpTargetConfig, sections: &dyn Sections, err: &mut Report<'_>) {
        validate_target(rule, t, endpoints(sections).unwrap_or(&BTreeMap::new()), err);
    }

    fn start(sections: &dyn Sections, at: &mut StartContext<'_>) -> anyhow::Result<()> {
        let mut running = BTreeMap::new();
        for (name, cfg) in endpoints(sections).into_iter().flatten() {
            // A reload with this endpoint unchanged: the same client and connection pool.
            let kept = at
                .reusable::<HttpSystems>(NAME, NAME, name)
                .and_then(|s| s.endpoints.get(name))
                .cloned();
            if let Some(kept) = kept {
                at.systems.mark_reused(NAME, name);
                running.insert(name.clone(), kept);
                continue;
            }
            running.insert(name.clone(), HttpEndpoint::new(name, cfg, at.shutdown.clone())?);
        }
        at.systems.insert(NAME, HttpSystems { endpoints: running });
        Ok(())
    }

    fn build(
        id: &str,
        rule: &str,
        t: &HttpTargetConfig,
        at: &BuildContext<'_>,
    ) -> Result<Arc<dyn Target>, RuleError> {
        let unknown = || RuleError::UnknownEndpoint {
            rule: rule.to_owned(),
            endpoint: t.endpoint.value.clone(),
        };
        let systems = at.systems.get::<HttpSystems>(NAME).ok_or_else(unknown)?;
        let endpoint = systems.endpoints.get(&t.endpoint.value).ok_or_else(unknown)?;
        Ok(Arc::new(HttpTarget::build(endpoint, id, rule, t, at.metrics)?))
    }

    /// Every target is built (its lanes start with the rule set): wait for them at shutdown
    /// (once per endpoint: not again for one a reload kept).
    fn started(_sections: &dyn Sections, at: &mut StartedContext<'_>) {
        if let Some(s) = at.systems.get::<HttpSystems>(NAME) {
            for (name, endpoint) in &s.endpoints {
                if !at.systems.is_reused(NAME, name) {
                    at.tasks.spawn(endpoint.clone().finished());
                }
            }
        }
    }
}
