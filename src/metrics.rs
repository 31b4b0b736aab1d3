//! Every metric mqgate exports, registered once at start-up.
//!
//! Hot paths hold pre-resolved handles (a `Counter` is a cheap `Arc` clone), so counting a
//! message never looks up a label set. Owns no I/O; the admin server encodes the registry.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of `config_reloads`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// ok, invalid, needs_restart, failed.
    pub result: &'static str,
}

/// Labels of `config_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HashLabels {
    /// The config file's sha256, hex.
    pub hash: String,
}

/// Labels of a per-rule, per-target series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    /// The rule's `name`.
    pub rule: String,
    /// The target, e.g. `amqp:rabbit/amq.topic`.
    pub target: String,
}

/// Labels of the dead-letter counter: the rule and its target id (`rule/index`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    /// The rule's `name`.
    pub rule: String,
    /// The target id, `rule/index` (what `mqgate dead-letters replay --to` names).
    pub target: String,
}

/// Labels naming an AMQP broker connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerLabels {
    /// The broker's key under `amqp:`.
    pub broker: String,
}

/// Labels of a counter split by a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// A short fixed reason, e.g. `subscriber_queue_full`.
    pub reason: String,
}

/// Labels of a counter split by QoS.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QosLabels {
    /// 0, 1 or 2.
    pub qos: String,
}

/// Labels of an ACL denial.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// `publish` or `subscribe`.
    pub action: String,
}

/// Handles for one rule target, resolved when the rule set is compiled.
#[derive(Clone, Debug, Default)]
pub struct TargetMetrics {
    /// Messages the target took (AMQP publish for QoS 0, confirm for QoS 1/2).
    pub forwarded: Counter,
    /// Messages the target did not take, whatever the reason.
    pub failed: Counter,
}

/// Labels of a per-source series: the source's name and what became of the message.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// The source's `name`.
    pub source: String,
    /// `delivered`, `requeued`, `dead_lettered`, `dropped` (acked without delivery).
    pub outcome: String,
}

/// Labels naming a source.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceNameLabels {
    /// The source's `name`.
    pub source: String,
}

/// Handles for one source (AMQP → MQTT), resolved when it starts.
#[derive(Clone, Debug, Default)]
pub struct SourceMetrics {
    /// Acked to AMQP after MQTT took the message.
    pub delivered: Counter,
    /// Nacked with requeue (no subscriber or failure, policy `requeue`).
    pub requeued: Counter,
    /// Nacked without requeue (policy `dead_letter`).
    pub dead_lettered: Counter,
    /// Acked without delivery (policy `drop`).
    pub dropped: Counter,
    /// 1 while consuming, 0 otherwise.
    pub connected: Gauge,
}

/// Handles for one AMQP broker connection.
#[derive(Clone, Debug)]
pub struct BrokerMetrics {
    /// 1 while connected, 0 otherwise.
    pub connected: Gauge,
    /// Successful (re)connections.
    pub connects: Counter,
    /// Publishes sent and not yet confirmed.
    pub unconfirmed: Gauge,
    /// Seconds from publish to confirm.
    pub confirm_latency: Histogram,
    /// Publishes the broker nacked.
    pub nacks: Counter,
    /// Mandatory publishes the broker returned as unroutable (`basic.return`).
    pub returned: Counter,
}

/// Labels naming a rule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// The rule's `name`.
    pub rule: String,
}

/// The registry and every family in it.
pub struct Metrics {
    /// Encoded by `GET /metrics`.
    pub registry: Registry,
    /// Each target kind's own families, registered by the kind (`TargetKind::register_metrics`).
    pub kinds: crate::targets::kinds::KindMetrics,
    /// Open MQTT connections.
    pub connections: Gauge,
    /// Of those, the ones resting in the idle pool (`mqtt/idle.rs`).
    pub connections_resting: Gauge,
    /// MQTT connections accepted since start.
    pub connections_total: Counter,
    /// Connections refused because `mqtt.max_connections` was reached.
    pub connections_refused: Counter,
    /// PUBLISH packets received from clients, by QoS.
    pub messages_received: Family<QosLabels, Counter>,
    /// Messages handed to local subscribers.
    pub messages_delivered_local: Counter,
    /// Messages dropped on purpose, by reason (never silently).
    pub messages_dropped: Family<ReasonLabels, Counter>,
    /// QoS 1/2 messages whose acknowledgement was withheld or negative because a target failed.
    pub acks_failed: Counter,
    /// Protocol errors and malformed packets that closed a connection, by reason.
    pub protocol_errors: Family<ReasonLabels, Counter>,
    /// PUBLISHes and subscriptions refused by the ACL, by action.
    pub acl_denied: Family<ActionLabels, Counter>,
    /// CONNECTs refused for their credentials, by reason.
    pub auth_refused: Family<ReasonLabels, Counter>,
    /// Admin API requests refused, by reason (host, token, content_type, origin).
    pub admin_refused: Family<ReasonLabels, Counter>,
    /// Config reloads (SIGHUP, `POST /api/v1/reload`), by result (ok, invalid,
    /// needs_restart, failed).
    pub config_reloads: Family<ResultLabels, Counter>,
    /// 1 for the hash of the config file in use (`hash` label: sha256 of its bytes, hex).
    pub config_info: Family<HashLabels, Gauge>,
    /// Per rule and target: forwarded.
    pub target_forwarded: Family<TargetLabels, Counter>,
    /// Per rule and target: failed.
    pub target_failed: Family<TargetLabels, Counter>,
    /// Per broker: connected (1/0).
    pub amqp_connected: Family<BrokerLabels, Gauge>,
    /// Per broker: successful connections.
    pub amqp_connects: Family<BrokerLabels, Counter>,
    /// Per broker: unconfirmed publishes in flight.
    pub amqp_unconfirmed: Family<BrokerLabels, Gauge>,
    /// Per broker: confirm latency in seconds.
    pub amqp_confirm_latency: Family<BrokerLabels, Histogram>,
    /// Per broker: nacked publishes.
    pub amqp_nacks: Family<BrokerLabels, Counter>,
    /// The HTTP (webhook) target families.
    pub http: HttpFamilies,
    /// Per broker: mandatory publishes returned as unroutable.
    pub amqp_returned: Family<BrokerLabels, Counter>,
    /// Per rule: messages its `when:` or templates could not be evaluated on.
    pub rule_errors: Family<RuleLabels, Counter>,
    /// Per rule: messages its `when:` condition turned away.
    pub rule_skipped: Family<RuleLabels, Counter>,
    /// Per rule: messages it applied to (filter matched, `when:` held).
    pub rule_matched: Family<RuleLabels, Counter>,
    /// Per source: messages by outcome.
    pub source_messages: Family<SourceLabels, Counter>,
    /// Per source: consuming (1/0).
    pub source_connected: Family<SourceNameLabels, Gauge>,
    /// The spool families (per target of `ack: spool` rules).
    pub spool: crate::spool::metrics::SpoolFamilies,
    /// The listeners' families (per listener: accepted connections, refused handshakes).
    pub listeners: crate::listeners::ListenerFamilies,
    /// The cluster's families (`cluster:`; zero without it).
    pub cluster: crate::cluster::metrics::ClusterFamilies,
    /// Dead letters kept in the store now.
    pub dead_letters: Gauge,
    /// Per rule and target: messages recorded as dead letters.
    pub dead_lettered: Family<DeadLetterLabels, Counter>,
    /// The store's figures, read at each scrape once the store is open.
    pub store: Arc<StoreMetrics>,
    /// MQTT connections closed before their CONNECT was read, by reason (connect_rate).
    pub connections_rejected: Family<ReasonLabels, Counter>,
    /// Password checks answered from the cache of recent successful ones (no argon2).
    pub login_cache_hits: Counter,
    /// Password hashes (argon2) verified: logins neither answered from the cache nor by a
    /// check of the same user and password already in flight.
    pub password_checks: Counter,
    /// Failed logins by reason (bad_password, unknown_user, no_password, backoff, busy,
    /// not_authorized).
    pub login_failures: Family<ReasonLabels, Counter>,
    /// The most bytes one connection's write buffer held after taking deliveries
    /// (`mqtt.max_outbound_bytes` bounds it), since start.
    pub write_buffer_peak: Gauge,
    /// Message bytes held in memory against `mqtt.max_memory` (`crate::memory`).
    pub memory_bytes: Gauge,
    /// Times a publisher was paused (not read) at `mqtt.max_memory`.
    pub memory_pauses: Counter,
    /// Trace events dropped because the console reading them was slow.
    pub trace_dropped: Counter,
    /// The MQTT-SN gateway's families.
    pub mqttsn: crate::mqttsn::metrics::MqttSnFamilies,
}

/// The store's size and its writer's counters (`store::Stats`), exported as
/// `mqgate_store_size_bytes`, `mqgate_store_commits_total`, `mqgate_store_batches_total`
/// and `mqgate_store_commit_seconds_total`. Read when scraped rather than copied into
/// metrics, so the writer counts with plain atomics; nothing is exported without a store.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    store: OnceLock<crate::store::Store>,
}

impl StoreMetrics {
    /// Exports `store`'s figures from now on (the first call wins).
    pub fn set(&self, store: crate::store::Store) {
        let _ = self.store.set(store);
    }
}

impl Collector for StoreMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        let stats = store.stats();
        let size = ConstGauge::new(i64::try_from(store.file_size()).unwrap_or(i64::MAX));
        let help = "Size of the store file";
        size.encode(encoder.encode_descriptor(
            "store_size_bytes",
            help,
            None,
            size.metric_type(),
        )?)?;
        let commits = ConstCounter::new(stats.commits.load(Ordering::Relaxed));
        let help = "Durable commits of the store (each one fsync)";
        commits.encode(encoder.encode_descriptor(
            "store_commits",
            help,
            None,
            commits.metric_type(),
        )?)?;
        let batches = ConstCounter::new(stats.batches.load(Ordering::Relaxed));
        let help = "Write batches committed to the store (many share one commit)";
        batches.encode(encoder.encode_descriptor(
            "store_batches",
            help,
            None,
            batches.metric_type(),
        )?)?;
        let micros = stats.commit_micros.load(Ordering::Relaxed) as f64;
        let seconds = ConstCounter::new(micros / 1e6);
        let help = "Time spent in store commits";
        seconds.encode(encoder.encode_descriptor(
            "store_commit_seconds",
            help,
            None,
            seconds.metric_type(),
        )?)?;
        let failures = ConstCounter::new(stats.write_failures.load(Ordering::Relaxed));
        let help = "Store writes that failed with an I/O error (disk full), each retried";
        failures.encode(encoder.encode_descriptor(
            "store_write_failures",
            help,
            None,
            failures.metric_type(),
        )?)?;
        let writable = ConstGauge::new(i64::from(store.failure().is_none()));
        let help = "1 while the store can write, 0 while writes wait (disk full)";
        writable.encode(encoder.encode_descriptor(
            "store_writable",
            help,
            None,
            writable.metric_type(),
        )?)
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Builds and registers every family.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("mqgate");
        let http = HttpFamilies::register(&mut registry);
        let spool = crate::spool::metrics::SpoolFamilies::register(&mut registry);
        let listeners = crate::listeners::ListenerFamilies::register(&mut registry);
        let cluster = crate::cluster::metrics::ClusterFamilies::register(&mut registry);
        let kinds = crate::targets::kinds::register_metrics(&mut registry);
        let mqttsn = crate::mqttsn::metrics::MqttSnFamilies::register(&mut registry);
        let m = Metrics {
            mqttsn,
            kinds,
            connections: Gauge::default(),
            connections_resting: Gauge::default(),
            connections_total: Counter::default(),
            connections_refused: Counter::default(),
            messages_received: Family::default(),
            messages_delivered_local: Counter::default(),
            messages_dropped: Family::default(),
            acks_failed: Counter::default(),
            protocol_errors: Family::default(),
            acl_denied: Family::default(),
            auth_refused: Family::default(),
            admin_refused: Family::default(),
            config_reloads: Family::default(),
            config_info: Family::default(),
            target_forwarded: Family::default(),
            target_failed: Family::default(),
            amqp_connected: Family::default(),
            amqp_connects: Family::default(),
            amqp_unconfirmed: Family::default(),
            amqp_confirm_latency: Family::new_with_constructor(latency_histogram),
            amqp_nacks: Family::default(),
            http,
            amqp_returned: Family::default(),
            rule_errors: Family::default(),
            rule_skipped: Family::default(),
            rule_matched: Family::default(),
            source_messages: Family::default(),
            source_connected: Family::default(),
            spool,
            listeners,
            cluster,
            dead_letters: Gauge::default(),
            dead_lettered: Family::default(),
            store: Arc::default(),
            connections_rejected: Family::default(),
            login_cache_hits: Counter::default(),
            password_checks: Counter::default(),
            login_failures: Family::default(),
            write_buffer_peak: Gauge::default(),
            memory_bytes: Gauge::default(),
            memory_pauses: Counter::default(),
            trace_dropped: Counter::default(),
            registry: Registry::default(),
        };
        registry.register_collector(Box::new(Arc::clone(&m.store)));
        registry.register("connections", "Open MQTT connections", m.connections.clone());
        registry.register(
            "connections_resting",
            "Open MQTT connections resting in the idle pool (no task, no tokio registration)",
            m.connections_resting.clone(),
        );
        registry.register(
            "connections_accepted",
            "MQTT connections accepted",
            m.connections_total.clone(),
        );
        registry.register(
            "connections_refused",
            "MQTT connections refused at mqtt.max_connections",
            m.connections_refused.clone(),
        );
        registry.register(
            "messages_received",
            "PUBLISH packets received from MQTT clients",
            m.messages_received.clone(),
        );
        registry.register(
            "messages_delivered_local",
            "Messages handed to local MQTT subscribers",
            m.messages_delivered_local.clone(),
        );
        registry.register(
            "messages_dropped",
            "Messages dropped on purpose, by reason",
            m.messages_dropped.clone(),
        );
        registry.register(
            "acks_failed",
            "QoS 1/2 messages not acknowledged as delivered because a target failed",
            m.acks_failed.clone(),
        );
        registry.register(
            "protocol_errors",
            "Connections closed for a protocol error or malformed packet",
            m.protocol_errors.clone(),
        );
        registry.register(
            "acl_denied",
            "PUBLISHes and subscriptions refused by the ACL",
            m.acl_denied.clone(),
        );
        registry.register(
            "auth_refused",
            "CONNECTs refused for their credentials or identity (bad_credentials, not_authorized, busy, certificate_user_mismatch, client_id_owned, client_id_not_allowed)",
            m.auth_refused.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads (SIGHUP, POST /api/v1/reload) by result: ok, invalid (the file does not parse or validate), needs_restart (a key that only a restart applies changed), failed (a system could not be built)",
            m.config_reloads.clone(),
        );
        registry.register(
            "config_info",
            "1 for the config in use; its hash label is the sha256 of the file's bytes (hex), as /readyz shows",
            m.config_info.clone(),
        );
        registry.register(
            "admin_refused",
            "Admin API requests refused (host: Host header not this server, token: missing or wrong bearer token, content_type: a write without application/json, origin: a cross-origin write)",
            m.admin_refused.clone(),
        );
        registry.register(
            "target_forwarded",
            "Messages a rule target took",
            m.target_forwarded.clone(),
        );
        registry.register(
            "target_failed",
            "Messages a rule target did not take",
            m.target_failed.clone(),
        );
        registry.register(
            "amqp_connected",
            "1 while the AMQP broker connection is up",
            m.amqp_connected.clone(),
        );
        registry.register(
            "amqp_connects",
            "Successful AMQP broker connections",
            m.amqp_connects.clone(),
        );
        registry.register(
            "amqp_unconfirmed",
            "AMQP publishes awaiting a publisher confirm",
            m.amqp_unconfirmed.clone(),
        );
        registry.register(
            "amqp_confirm_latency_seconds",
            "Time from AMQP publish to publisher confirm",
            m.amqp_confirm_latency.clone(),
        );
        registry.register(
            "amqp_nacks",
            "AMQP publishes nacked by the broker",
            m.amqp_nacks.clone(),
        );
        registry.register(
            "amqp_returned",
            "Mandatory AMQP publishes the broker returned as unroutable",
            m.amqp_returned.clone(),
        );
        registry.register(
            "rule_errors",
            "Messages a rule's when: condition or templates could not be evaluated on",
            m.rule_errors.clone(),
        );
        registry.register(
            "rule_matched",
            "Messages a rule applied to (its filter matched and its when: condition held): the rule's messages in",
            m.rule_matched.clone(),
        );
        registry.register(
            "rule_skipped",
            "Messages a rule's when: condition turned away",
            m.rule_skipped.clone(),
        );
        registry.register(
            "source_messages",
            "AMQP deliveries of a source by outcome (delivered, requeued, dead_lettered, dropped)",
            m.source_messages.clone(),
        );
        registry.register(
            "source_connected",
            "1 while a source consumes its queue",
            m.source_connected.clone(),
        );
        registry.register(
            "dead_letters",
            "Messages kept as dead letters in the store (failed for good)",
            m.dead_letters.clone(),
        );
        registry.register(
            "dead_lettered",
            "Messages recorded as dead letters, by rule and target",
            m.dead_lettered.clone(),
        );
        registry.register(
            "connections_rejected",
            "MQTT connections closed before their CONNECT was read (connect_rate: mqtt.max_connect_rate_per_address)",
            m.connections_rejected.clone(),
        );
        registry.register(
            "login_cache_hits",
            "Password checks answered from the cache of recent successful ones (mqtt.login_cache_size)",
            m.login_cache_hits.clone(),
        );
        registry.register(
            "password_checks",
            "Password hashes (argon2) verified: logins answered neither by the cache nor by a check of the same user and password in flight",
            m.password_checks.clone(),
        );
        registry.register(
            "login_failures",
            "Failed logins by reason (bad_password, unknown_user, no_password, backoff: refused without a check during the address's backoff, busy, not_authorized)",
            m.login_failures.clone(),
        );
        registry.register(
            "write_buffer_peak_bytes",
            "Most bytes one connection's write buffer held after taking deliveries (mqtt.max_outbound_bytes)",
            m.write_buffer_peak.clone(),
        );
        registry.register(
            "memory_message_bytes",
            "Message bytes (topics and payloads) received from clients and held in memory, against mqtt.max_memory",
            m.memory_bytes.clone(),
        );
        registry.register(
            "memory_pauses",
            "Times a publisher was not read because message bytes held reached mqtt.max_memory",
            m.memory_pauses.clone(),
        );
        registry.register(
            "trace_dropped",
            "Live trace events (web console) dropped because the browser read them too slowly",
            m.trace_dropped.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Handles for one source.
    pub fn source(&self, source: &str) -> SourceMetrics {
        let c = |outcome: &str| {
            let labels = SourceLabels { source: source.to_owned(), outcome: outcome.to_owned() };
            self.source_messages.get_or_create(&labels).clone()
        };
        let name = SourceNameLabels { source: source.to_owned() };
        SourceMetrics {
            delivered: c("delivered"),
            requeued: c("requeued"),
            dead_lettered: c("dead_lettered"),
            dropped: c("dropped"),
            connected: self.source_connected.get_or_create(&name).clone(),
        }
    }

    /// Handles for one rule target.
    pub fn target(&self, rule: &str, target: &str) -> TargetMetrics {
        let labels = TargetLabels { rule: rule.to_owned(), target: target.to_owned() };
        TargetMetrics {
            forwarded: self.target_forwarded.get_or_create(&labels).clone(),
            failed: self.target_failed.get_or_create(&labels).clone(),
        }
    }

    /// Handles for one broker.
    pub fn broker(&self, broker: &str) -> BrokerMetrics {
        let labels = BrokerLabels { broker: broker.to_owned() };
        BrokerMetrics {
            connected: self.amqp_connected.get_or_create(&labels).clone(),
            connects: self.amqp_connects.get_or_create(&labels).clone(),
            unconfirmed: self.amqp_unconfirmed.get_or_create(&labels).clone(),
            confirm_latency: self.amqp_confirm_latency.get_or_create(&labels).clone(),
            nacks: self.amqp_nacks.get_or_create(&labels).clone(),
            returned: self.amqp_returned.get_or_create(&labels).clone(),
        }
    }

    /// The matched, error and skip counters of rule `rule`, to resolve once.
    pub fn rule(&self, rule: &str) -> (Counter, Counter, Counter) {
        let labels = RuleLabels { rule: rule.to_owned() };
        (
            self.rule_matched.get_or_create(&labels).clone(),
            self.rule_errors.get_or_create(&labels).clone(),
            self.rule_skipped.get_or_create(&labels).clone(),
        )
    }

    /// Counts one message dropped for `reason`.
    pub fn dropped(&self, reason: &str) {
        self.messages_dropped.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }

    /// Counts `n` dropped messages at once (a fan-out adds its drops up first: one label
    /// lookup per publish, not one per full queue). Nothing for 0.
    pub fn dropped_n(&self, reason: &str, n: u64) {
        if n > 0 {
            self.messages_dropped
                .get_or_create(&ReasonLabels { reason: reason.to_owned() })
                .inc_by(n);
        }
    }

    /// The ACL-denial counter for `action` (`publish`, `subscribe`), to resolve once.
    pub fn acl_denied(&self, action: &str) -> Counter {
        self.acl_denied.get_or_create(&ActionLabels { action: action.to_owned() }).clone()
    }

    /// Counts one connection closed for a protocol error.
    pub fn protocol_error(&self, reason: &str) {
        self.protocol_errors.get_or_create(&ReasonLabels { reason: reason.to_owned() }).inc();
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// Labels of a per-rule, per-HTTP-endpoint series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The rule's `name`.
    pub rule: String,
    /// The endpoint's key under `http:`.
    pub endpoint: String,
}

/// Labels of HTTP responses by status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpResponseLabels {
    /// The rule's `name`.
    pub rule: String,
    /// The endpoint's key under `http:`.
    pub endpoint: String,
    /// `2xx`, `3xx`, `4xx`, `5xx`, or `error` (no response: connection error, timeout).
    pub class: String,
}

/// The families of the HTTP sink, registered once.
#[derive(Clone, Debug)]
pub struct HttpFamilies {
    /// Requests sent (each attempt counts).
    pub requests: Family<HttpLabels, Counter>,
    /// Responses by status class, and attempts without a response.
    pub responses: Family<HttpResponseLabels, Counter>,
    /// Attempts that were retries.
    pub retries: Family<HttpLabels, Counter>,
    /// Seconds from sending a request to its response (or error).
    pub latency: Family<HttpLabels, Histogram>,
    /// Messages waiting in the target's lanes: queued, or gathered into a batch that is
    /// still filling (a lane counts a batch's messages out when it sends the batch).
    pub queue_depth: Family<HttpLabels, Gauge>,
}

/// Handles of one HTTP target (a rule and its endpoint), resolved once.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    /// See [`HttpFamilies::requests`].
    pub requests: Counter,
    /// Responses: 2xx, 3xx, 4xx, 5xx, error, in that order.
    pub responses: [Counter; 5],
    /// See [`HttpFamilies::retries`].
    pub retries: Counter,
    /// See [`HttpFamilies::latency`].
    pub latency: Histogram,
    /// See [`HttpFamilies::queue_depth`].
    pub queue_depth: Gauge,
}

impl HttpFamilies {
    fn register(registry: &mut Registry) -> HttpFamilies {
        let f = HttpFamilies {
            requests: Family::default(),
            responses: Family::default(),
            retries: Family::default(),
            latency: Family::new_with_constructor(http_latency_histogram),
            queue_depth: Family::default(),
        };
        registry.register("http_requests", "HTTP requests sent (attempts)", f.requests.clone());
        registry.register(
            "http_responses",
            "HTTP responses by status class; class=error: no response",
            f.responses.clone(),
        );
        registry.register("http_retries", "HTTP requests that were retries", f.retries.clone());
        registry.register(
            "http_request_duration_seconds",
            "Time from sending an HTTP request to its response",
            f.latency.clone(),
        );
        registry.register(
            "http_queue_depth",
            "Messages waiting for an HTTP target (queued, or in a batch still filling)",
            f.queue_depth.clone(),
        );
        f
    }

    /// Handles for rule `rule` sending to endpoint `endpoint`.
    pub fn target(&self, rule: &str, endpoint: &str) -> HttpMetrics {
        let labels = HttpLabels { rule: rule.to_owned(), endpoint: endpoint.to_owned() };
        let class = |c: &str| {
            let l = HttpResponseLabels {
                rule: rule.to_owned(),
                endpoint: endpoint.to_owned(),
                class: c.to_owned(),
            };
            self.responses.get_or_create(&l).clone()
        };
        HttpMetrics {
            requests: self.requests.get_or_create(&labels).clone(),
            responses: [class("2xx"), class("3xx"), class("4xx"), class("5xx"), class("error")],
            retries: self.retries.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
            queue_depth: self.queue_depth.get_or_create(&labels).clone(),
        }
    }
}

fn http_latency_histogram() -> Histogram {
    // 100 µs .. ~13 s
    Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
}
