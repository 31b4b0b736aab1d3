//! The overview and rules routes (the web console's first pages; JSON). Counters only: the
//! console turns two readings into rates.
//!
//! ```text
//! GET /api/v1/overview   connections, messages, systems and sources, store, dead letters, spools, traces
//! GET /api/v1/rules      each rule, its targets and their counters
//! ```

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;

use super::reply::json;
use super::AdminState;
use crate::metrics::{SourceLabels, SourceNameLabels};

#[derive(Serialize)]
struct Overview {
    version: &'static str,
    uptime_seconds: u64,
    connections: Connections,
    messages: Messages,
    /// Each target system (AMQP broker, HTTP endpoint, bridge): `ok` when ready.
    systems: Vec<System>,
    /// Each source (AMQP → MQTT).
    sources: Vec<Source>,
    /// `null` without `store:`.
    store: Option<StoreInfo>,
    /// Dead letters kept (`null` without a store).
    dead_letters: Option<usize>,
    spools: Vec<SpoolInfo>,
    retained: usize,
    /// Every rule target's counters (as `/api/v1/rules`, flat).
    targets: Vec<TargetCounters>,
    traces: Traces,
}

#[derive(Serialize)]
struct Connections {
    /// Client ids with a connection.
    connected: usize,
    /// Sessions kept for clients that are away.
    parked: usize,
    /// Open MQTT connections (handshakes included).
    open: i64,
    /// Connections accepted since start.
    accepted_total: u64,
}

#[derive(Serialize)]
struct Messages {
    /// PUBLISHes received from clients (every QoS) since start.
    received_total: u64,
    /// Copies handed to local subscribers since start.
    delivered_local_total: u64,
}

#[derive(Serialize)]
struct System {
    name: String,
    ok: bool,
    state: String,
}

#[derive(Serialize)]
struct Source {
    name: String,
    connected: bool,
    delivered_total: u64,
}

#[derive(Serialize)]
struct StoreInfo {
    path: String,
    bytes: u64,
    /// Why it cannot write, when it cannot (disk full).
    failure: Option<String>,
}

#[derive(Serialize)]
struct SpoolInfo {
    target: String,
    messages: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct TargetCounters {
    rule: String,
    /// Messages the rule applied to: what came in to its targets.
    rule_matched_total: u64,
    target: String,
    forwarded_total: u64,
    failed_total: u64,
}

#[derive(Serialize)]
struct Traces {
    active: usize,
    max: usize,
    dropped_total: u64,
}

fn targets(rules: &crate::rules::RuleSet) -> Vec<TargetCounters> {
    let mut out = Vec::new();
    for rule in rules.rules() {
        for t in &rule.targets {
            let (forwarded_total, failed_total) =
                t.counters().map(|c| (c.forwarded.get(), c.failed.get())).unwrap_or((0, 0));
            out.push(TargetCounters {
                rule: rule.name.clone(),
                rule_matched_total: rule.matched.get(),
                target: t.id().to_owned(),
                forwarded_total,
                failed_total,
            });
        }
    }
    out
}

pub(super) async fn overview(State(state): State<AdminState>) -> Response {
    let m = &state.metrics;
    let broker = &state.gateway.broker;
    // The config in force now (a reload swaps it).
    let live = state.gateway.live.load();
    let systems = live
        .health
        .iter()
        .map(|s| {
            let (ok, text) = match s.state() {
                Ok(t) => (true, t),
                Err(t) => (false, t),
            };
            System { name: s.name(), ok, state: text }
        })
        .collect();
    let sources = state
        .sources
        .iter()
        .map(|name| {
            let labels = SourceNameLabels { source: name.clone() };
            let delivered = SourceLabels { source: name.clone(), outcome: "delivered".into() };
            Source {
                name: name.clone(),
                connected: m.source_connected.get_or_create(&labels).get() > 0,
                delivered_total: m.source_messages.get_or_create(&delivered).get(),
            }
        })
        .collect();
    let store = state.store.as_ref().map(|s| StoreInfo {
        path: s.path().display().to_string(),
        bytes: s.file_size(),
        failure: s.failure().map(|f| f.to_string()),
    });
    let spools = live
        .spools
        .iter()
        .map(|s| {
            let (messages, bytes) = s.depth();
            SpoolInfo { target: s.id().to_owned(), messages, bytes }
        })
        .collect();
    let tracer = broker.tracer();
    let body = Overview {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        connections: Connections {
            connected: broker.session_count(),
            parked: broker.parked_count(),
            open: m.connections.get(),
            accepted_total: m.connections_total.get(),
        },
        messages: Messages {
            received_total: m.messages_received.get_or_create(&qos("0")).get()
                + m.messages_received.get_or_create(&qos("1")).get()
                + m.messages_received.get_or_create(&qos("2")).get(),
            delivered_local_total: m.messages_delivered_local.get(),
        },
        systems,
        sources,
        store,
        dead_letters: state.dead_letters.as_ref().map(|d| d.count()),
        spools,
        retained: broker.retained_count(),
        targets: targets(&live.rules),
        traces: Traces {
            active: tracer.active(),
            max: crate::trace::MAX_TRACES,
            dropped_total: m.trace_dropped.get(),
        },
    };
    json(StatusCode::OK, &body)
}

fn qos(q: &str) -> crate::metrics::QosLabels {
    crate::metrics::QosLabels { qos: q.to_owned() }
}

#[derive(Serialize)]
struct Rules {
    rules: Vec<Rule>,
}

#[derive(Serialize)]
struct Rule {
    name: String,
    filter: String,
    /// `sink`, `spool` or `receive`.
    ack: String,
    /// Whether it has a `when:` condition.
    conditional: bool,
    /// Messages it applied to (filter matched, condition held): its messages in.
    matched_total: u64,
    /// Messages its condition or a template could not be evaluated on.
    errors_total: u64,
    /// Messages its condition turned away.
    skipped_total: u64,
    targets: Vec<Target>,
}

#[derive(Serialize)]
struct Target {
    id: String,
    forwarded_total: u64,
    failed_total: u64,
}

pub(super) async fn rules(State(state): State<AdminState>) -> Response {
    let live = state.gateway.live.load();
    let rules = live
        .rules
        .rules()
        .iter()
        .map(|r| Rule {
            name: r.name.clone(),
            filter: r.filter.clone(),
            ack: format!("{:?}", r.ack).to_lowercase(),
            conditional: r.when.is_some(),
            matched_total: r.matched.get(),
            errors_total: r.errors.get(),
            skipped_total: r.skipped.get(),
            targets: r
                .targets
                .iter()
                .map(|t| {
                    let (f, x) =
                        t.counters().map(|c| (c.forwarded.get(), c.failed.get())).unwrap_or((0, 0));
                    Target { id: t.id().to_owned(), forwarded_total: f, failed_total: x }
                })
                .collect(),
        })
        .collect();
    json(StatusCode::OK, &Rules { rules })
}
