//! The route dry-run: where one message would go, worked out without sending it anywhere.
//! `mqgate route` (on a config file, nothing started: [`offline`]) and `POST /api/v1/route`
//! (on the running rule set) both call [`explain`].
//!
//! It follows `routing::route` step by step: topic checks, the ACL decision for the user,
//! the rules whose filter matches, each `when:` (with why it does not hold), and what each
//! target of an applying rule would send ([`Target::explain`], each kind answering for
//! itself). It sends nothing, counts nothing and does not look at sessions: which local MQTT
//! subscribers would get the message is not part of the answer.
//!
//! [`Target::explain`]: crate::targets::Target::explain

use std::sync::Arc;

use serde::Serialize;

use crate::auth::Authenticator;
use crate::config::{AckPolicy, Config, RuleErrorPolicy};
use crate::message::Message;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::TopicLimits;
use crate::rules::{LazyContext, RuleSet};
use crate::targets::kinds::{self, StartContext, Systems};
use crate::targets::Explained;
use crate::template::ConditionReport;

/// What the answer says about local MQTT subscribers.
pub const LOCAL_SUBSCRIBERS: &str =
    "not known: the dry-run does not look at MQTT sessions; connected and persistent subscribers whose filters match also get the message";

/// The whole answer.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The message's topic.
    pub topic: String,
    /// QoS, RETAIN flag, payload size, publisher.
    pub qos: u8,
    /// The RETAIN flag.
    pub retain: bool,
    /// Payload bytes.
    pub payload_bytes: usize,
    /// Why the topic would be refused (wildcards, length or level limits); then nothing is
    /// routed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_error: Option<String>,
    /// The ACL's decision for the publisher.
    pub acl: AclReport,
    /// Whether it would be routed at all (a valid topic the ACL allows).
    pub routed: bool,
    /// Local subscribers: see [`LOCAL_SUBSCRIBERS`].
    pub local_subscribers: String,
    /// A retained message's effect on the retained store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retained: Option<String>,
    /// Every rule, in config order.
    pub rules: Vec<RuleReport>,
}

/// The ACL's decision.
#[derive(Debug, Clone, Serialize)]
pub struct AclReport {
    /// The user (none: anonymous).
    pub user: Option<String>,
    /// The client id the ACL's `%c` is substituted with.
    pub client_id: String,
    /// Whether the publish is allowed.
    pub publish_allowed: bool,
    /// What else an MQTT client would run into (unknown user, anonymous clients refused).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// One rule.
#[derive(Debug, Clone, Serialize)]
pub struct RuleReport {
    /// Its name.
    pub rule: String,
    /// Its filter.
    pub filter: String,
    /// Whether the filter matches the topic.
    pub matches: bool,
    /// `sink`, `spool` or `receive`.
    pub ack: &'static str,
    /// Its `when:`, evaluated (when it has one and the filter matches).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<ConditionReport>,
    /// Whether the message goes to its targets: the filter matches and the condition holds.
    pub applies: bool,
    /// What happens instead when the condition or a target's template cannot be evaluated
    /// (`on_error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_error: Option<String>,
    /// What each target would send (when the rule applies).
    pub targets: Vec<Explained>,
}

/// Explains where `msg` would go: `auth` gives the ACL decision for its user and client id,
/// `limits` the topic bounds (`mqtt.max_topic_length`, `max_topic_levels`).
pub fn explain(
    rules: &RuleSet,
    auth: &Authenticator,
    limits: &TopicLimits,
    msg: &Arc<Message>,
) -> Report {
    let topic_error = crate::mqtt::topic::validate_name(&msg.topic)
        .and_then(|()| limits.check(&msg.topic))
        .err()
        .map(|e| e.to_string());
    let acl = acl_report(auth, msg);
    let routed = topic_error.is_none() && acl.publish_allowed;
    let retained = msg.retain.then(|| {
        if msg.payload.is_empty() {
            "an empty retained message clears the topic's retained message".to_owned()
        } else {
            "replaces the topic's retained message (within mqtt.max_retained, max_retained_bytes and max_retained_per_client)".to_owned()
        }
    });
    let mut hits = Vec::new();
    rules.matches_into(&msg.topic, &mut hits);
    let mut ctx: LazyContext = None;
    let reports = rules
        .rules()
        .iter()
        .enumerate()
        .map(|(index, rule)| {
            let matches = hits.contains(&index);
            let when = match (&rule.when, matches) {
                (Some(c), true) => Some(c.explain(msg)),
                _ => None,
            };
            let held = when.as_ref().map_or(Some(true), |w| w.held);
            let fails = |what: &str| match rule.on_error {
                RuleErrorPolicy::Skip => format!("on_error: skip: {what} fails, so the rule is passed over"),
                RuleErrorPolicy::Fail => format!(
                    "on_error: fail: {what} fails, so the message fails (QoS 1/2: not acknowledged as delivered; QoS 0: dropped){}",
                    if rule.dead_letters.is_empty() { "" } else { " and is kept as a dead letter" }
                ),
            };
            let mut on_error = (matches && held.is_none()).then(|| fails("the condition"));
            let applies = matches && held == Some(true);
            let mut targets = Vec::new();
            if applies {
                for target in &rule.targets {
                    let mut e = target.explain(msg, &mut ctx);
                    if rule.ack == AckPolicy::Spool {
                        e.note("ack: spool: appended to this target's spool, forwarded from there");
                    }
                    if e.error.is_some() && on_error.is_none() {
                        on_error = Some(fails("a target's template"));
                    }
                    targets.push(e);
                }
            }
            RuleReport {
                rule: rule.name.clone(),
                filter: rule.filter.clone(),
                matches,
                ack: match rule.ack {
                    AckPolicy::Sink => "sink",
                    AckPolicy::Spool => "spool",
                    AckPolicy::Receive => "receive",
                },
                when,
                applies,
                on_error,
                targets,
            }
        })
        .collect();
    Report {
        topic: msg.topic.clone(),
        qos: msg.qos as u8,
        retain: msg.retain,
        payload_bytes: msg.payload.len(),
        topic_error,
        acl,
        routed,
        local_subscribers: LOCAL_SUBSCRIBERS.to_owned(),
        retained,
        rules: reports,
    }
}

/// The ACL's decision for `msg`'s user and client id, with what else a client would meet.
fn acl_report(auth: &Authenticator, msg: &Message) -> AclReport {
    let user = msg.username.as_deref();
    let acl = auth.acl.for_client(user, &msg.client_id);
    let mut notes = Vec::new();
    match user {
        Some(u) if !auth.has_user(u) => {
            notes.push(format!("{u:?} is not under users:, so no MQTT client can log in as it"))
        }
        Some(u) if !auth.client_id_allowed(Some(u), &msg.client_id) => notes.push(format!(
            "the client id {:?} is not among {u:?}'s client_ids: its CONNECT would be refused",
            &*msg.client_id
        )),
        None if !auth.allows_anonymous() => notes
            .push("mqtt.allow_anonymous is false: an anonymous client cannot connect".to_owned()),
        _ => {}
    }
    let publish_allowed = acl.may_publish(&msg.topic);
    if !publish_allowed {
        notes.push("denied: the message is never routed (no subscriber and no rule sees it); QoS 1/2 get 0x87 Not authorized".to_owned());
    }
    AclReport {
        user: user.map(str::to_owned),
        client_id: msg.client_id.to_string(),
        publish_allowed,
        notes,
    }
}

/// The dry-run on a config file, nothing started: the kinds build detached handles (no task,
/// no connection) and the rule set is compiled over them.
pub fn offline(config: &Config, msg: &Arc<Message>) -> anyhow::Result<Report> {
    let metrics = crate::metrics::Metrics::new();
    let mut systems = Systems::default();
    let mut tasks = tokio::task::JoinSet::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut at = StartContext {
        metrics: &metrics,
        shutdown: &shutdown,
        tasks: &mut tasks,
        systems: &mut systems,
        connect: false,
        reuse: None,
    };
    kinds::start_systems(config, &mut at)?;
    anyhow::ensure!(tasks.is_empty(), "the dry-run started a task");
    let rules = RuleSet::compile(config, &systems, &metrics)?;
    let auth = Authenticator::from_config(config)?;
    let limits = crate::mqtt::session::SessionLimits::from_config(&config.mqtt).topic_limits;
    Ok(explain(&rules, &auth, &limits, msg))
}

/// The report as text for a terminal.
pub fn render_text(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "message: topic {:?}, QoS {}, retain {}, {} payload bytes",
        r.topic, r.qos, r.retain, r.payload_bytes
    );
    if let Some(e) = &r.topic_error {
        let _ = writeln!(out, "topic refused: {e}");
    }
    let who = r.acl.user.as_deref().map_or("anonymous".to_owned(), |u| format!("user {u:?}"));
    let verdict = if r.acl.publish_allowed { "allowed" } else { "DENIED" };
    let _ = writeln!(out, "acl: publish {verdict} for {who}, client id {:?}", r.acl.client_id);
    for n in &r.acl.notes {
        let _ = writeln!(out, "  {n}");
    }
    if !r.routed {
        let _ = writeln!(out, "not routed: what follows would not happen");
    }
    let _ = writeln!(out, "local subscribers: {}", r.local_subscribers);
    if let Some(t) = &r.retained {
        let _ = writeln!(out, "retained: {t}");
    }
    let mut others = Vec::new();
    for rule in &r.rules {
        if !rule.matches {
            others.push(format!("{} ({})", rule.rule, rule.filter));
            continue;
        }
        let state = if rule.applies { "applies" } else { "does not apply" };
        let _ = writeln!(
            out,
            "rule {:?} (from {:?}, ack: {}): {state}",
            rule.rule, rule.filter, rule.ack
        );
        if let Some(w) = &rule.when {
            let held = match (w.held, &w.error) {
                (Some(true), _) => "holds".to_owned(),
                (Some(false), _) => "does not hold".to_owned(),
                (None, e) => format!("cannot be evaluated: {}", e.as_deref().unwrap_or("")),
            };
            let _ = writeln!(out, "  when: {}: {held}", w.condition);
            for c in &w.clauses {
                let held = match (c.held, &c.error) {
                    (Some(h), _) => h.to_string(),
                    (None, e) => format!("error: {}", e.as_deref().unwrap_or("")),
                };
                let _ = writeln!(out, "    {}: {held}", c.clause);
            }
            for (name, value) in &w.values {
                let _ = writeln!(out, "    {name} = {value}");
            }
        }
        if let Some(e) = &rule.on_error {
            let _ = writeln!(out, "  {e}");
        }
        for t in &rule.targets {
            let _ = writeln!(out, "  target {} ({}):", t.id, t.kind);
            for (name, value) in &t.fields {
                match value {
                    serde_json::Value::Object(map) => {
                        let _ = writeln!(out, "    {name}:");
                        for (k, v) in map {
                            let _ = writeln!(out, "      {k}: {}", plain(v));
                        }
                    }
                    v => {
                        let _ = writeln!(out, "    {name}: {}", plain(v));
                    }
                }
            }
            if let Some(e) = &t.error {
                let _ = writeln!(out, "    error: {e}");
            }
            for n in &t.notes {
                let _ = writeln!(out, "    note: {n}");
            }
        }
    }
    if !others.is_empty() {
        let _ = writeln!(out, "rules whose filter does not match: {}", others.join(", "));
    }
    out
}

/// A JSON value as shown in text: strings without quotes.
fn plain(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// Builds the message a dry-run or an HTTP publish carries (no packet id: it did not come
/// in as an MQTT PUBLISH; no memory charge: the publish API sets its own).
pub fn message(
    topic: String,
    payload: bytes::Bytes,
    qos: QoS,
    retain: bool,
    user: Option<&str>,
    client_id: &str,
    properties: crate::mqtt::codec::PublishProperties,
) -> Message {
    Message {
        topic,
        payload,
        qos,
        retain,
        client_id: Arc::from(client_id),
        username: user.map(Arc::from),
        properties,
        received: std::time::Instant::now(),
        packet_id: None,
        charge: Default::default(),
    }
}
