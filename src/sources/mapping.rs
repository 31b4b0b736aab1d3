//! How an AMQP delivery becomes an MQTT message: the topic (a template, or the routing key
//! translated back), the QoS and RETAIN flag (config or headers), and MQTT 5 properties from
//! AMQP properties — the reverse of the uplink's mapping.
//!
//! Pure: no I/O, no clock, never panics on any delivery. A topic that cannot be an MQTT topic
//! name (empty, a wildcard) is an error the caller handles by the source's failure policy.

use std::fmt;

use crate::mqtt::codec::{Properties, QoS};
use crate::mqtt::topic;
use crate::targets::amqp::wire::consume::BasicProperties;
use crate::targets::amqp::wire::table::Decoded;

/// Header carrying the RETAIN flag (as the uplink sets it).
pub const HEADER_RETAIN: &str = "x-mqtt-retain";
/// Header carrying the MQTT 5 payload format indicator (0 bytes, 1 UTF-8), as every target
/// writes it (`targets::amqp::HEADER_PAYLOAD_FORMAT`), so a message forwarded by a rule and
/// consumed by a source keeps it.
pub const HEADER_PAYLOAD_FORMAT: &str = crate::targets::amqp::HEADER_PAYLOAD_FORMAT;
/// The name this source read before it read the targets' one (still accepted).
const HEADER_PAYLOAD_FORMAT_OLD: &str = "x-mqtt-payload-format";
/// Headers with this prefix are mqgate's own; they are not turned into user properties.
const OWN_PREFIX: &str = "x-mqtt-";

/// RabbitMQ's MQTT plugin mapping, reversed: routing key `a.b.c` → topic `a/b/c`, and
/// `*` → `+` (for binding keys written as filters). The uplink's `lossless` mapping will
/// have its own decoder; a source uses this one by default.
pub fn routing_key_to_topic(routing_key: &str) -> String {
    routing_key
        .chars()
        .map(|c| match c {
            '.' => '/',
            '*' => '+',
            c => c,
        })
        .collect()
}

/// Why a template is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError(String);

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The variables a source's topic template may use: `routing_key` ('.' → '/', as the topic
/// mapping reads it), `exchange`, `queue` and `header` (the AMQP headers, by name).
pub const VARIABLES: &[&str] = &["routing_key", "exchange", "queue", "header"];

/// One piece of a topic template that only substitutes variables.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// Text copied as is.
    Text(String),
    /// The routing key, '.' → '/'.
    RoutingKey,
    /// The exchange the message was published to.
    Exchange,
    /// The source's queue.
    Queue,
    /// A header's value (string or number).
    Header(String),
}

/// A compiled topic template (`devices/{{ header.device }}/commands`): through mqgate's one
/// template engine ([`crate::template`]); a template that only substitutes variables renders
/// natively, with the same result.
#[derive(Debug, Clone)]
pub struct TopicTemplate {
    /// The native plan, when the template has one.
    plan: Option<Vec<Part>>,
    /// The template in the engine (always compiled: the config check is the engine's).
    env: std::sync::Arc<minijinja::Environment<'static>>,
}

/// What a template is filled from.
#[derive(Debug, Clone, Copy)]
pub struct Delivered<'a> {
    /// The routing key.
    pub routing_key: &'a str,
    /// The exchange.
    pub exchange: &'a str,
    /// The source's queue.
    pub queue: &'a str,
    /// The message properties (headers).
    pub properties: &'a BasicProperties,
}

impl TopicTemplate {
    /// Compiles `text`; a syntax error, an unknown variable or a wildcard in the text is an
    /// error.
    pub fn parse(text: &str) -> Result<TopicTemplate, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError("empty topic".to_owned()));
        }
        let env = crate::template::compile_with(
            crate::template::environment(),
            text.to_owned(),
            VARIABLES,
        )
        .map_err(|e| TemplateError(e.to_string()))?;
        let plan = plan(text);
        if let Some(parts) = &plan {
            for p in parts {
                if let Part::Text(t) = p {
                    if t.contains(['+', '#']) {
                        return Err(TemplateError(format!("{t:?}: no wildcards in a topic")));
                    }
                }
            }
        }
        Ok(TopicTemplate { plan, env })
    }

    /// The topic for one delivery (checked to be a valid topic name).
    pub fn render(&self, d: &Delivered<'_>) -> Result<String, String> {
        let out = match &self.plan {
            Some(parts) => render_plan(parts, d)?,
            None => {
                let t = self.env.get_template("t").map_err(|e| e.to_string())?;
                t.render(context(d)).map_err(|e| crate::template::describe(e).to_string())?
            }
        };
        topic::validate_name(&out).map_err(|e| format!("topic {out:?}: {e}"))?;
        Ok(out)
    }
}

/// The native plan of `text`: literal text and `{{ VAR }}` of the plain variables, nothing
/// else (filters, statements, whitespace control go to the engine).
fn plan(text: &str) -> Option<Vec<Part>> {
    if text.contains("{%") || text.contains("{#") {
        return None;
    }
    let mut parts = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_owned()));
        }
        let after = &rest[open + 2..];
        let close = after.find("}}")?;
        let raw = &after[..close];
        if raw.trim().starts_with('-') || raw.trim().ends_with('-') {
            return None;
        }
        let ident = |s: &str| {
            !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        parts.push(match raw.trim() {
            "routing_key" => Part::RoutingKey,
            "exchange" => Part::Exchange,
            "queue" => Part::Queue,
            h if h.starts_with("header.") && ident(&h[7..]) && !h[7..].contains('-') => {
                Part::Header(h[7..].to_owned())
            }
            _ => return None,
        });
        rest = &after[close + 2..];
    }
    if rest.contains("}}") {
        return None;
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_owned()));
    }
    Some(parts)
}

fn render_plan(parts: &[Part], d: &Delivered<'_>) -> Result<String, String> {
    let mut out = String::new();
    for p in parts {
        match p {
            Part::Text(t) => out.push_str(t),
            Part::RoutingKey => out.push_str(&d.routing_key.replace('.', "/")),
            Part::Exchange => out.push_str(d.exchange),
            Part::Queue => out.push_str(d.queue),
            Part::Header(name) => match header_text(d.properties, name) {
                Some(v) => out.push_str(&v),
                None => return Err(format!("no header {name:?} for the topic")),
            },
        }
    }
    Ok(out)
}

/// The engine's view of a delivery.
fn context(d: &Delivered<'_>) -> minijinja::Value {
    let headers: std::collections::BTreeMap<&str, String> = d
        .properties
        .headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), scalar_text(v)?)))
        .collect();
    minijinja::context! {
        routing_key => d.routing_key.replace('.', "/"),
        exchange => d.exchange,
        queue => d.queue,
        header => headers,
    }
}

/// The topic of a delivery: the template's, or the routing key translated back.
pub fn topic_for(template: Option<&TopicTemplate>, d: &Delivered<'_>) -> Result<String, String> {
    match template {
        Some(t) => t.render(d),
        None => {
            let topic = routing_key_to_topic(d.routing_key);
            topic::validate_name(&topic)
                .map_err(|e| format!("routing key {:?} as a topic: {e}", d.routing_key))?;
            Ok(topic)
        }
    }
}

/// A header's value as text (strings, integers, booleans, floats); `None` if absent or
/// not a scalar.
fn header_text(p: &BasicProperties, name: &str) -> Option<String> {
    p.headers.iter().find(|(k, _)| k == name).and_then(|(_, v)| scalar_text(v))
}

fn scalar_text(v: &Decoded) -> Option<String> {
    match v {
        Decoded::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Decoded::Int(n) => Some(n.to_string()),
        Decoded::UInt(n) => Some(n.to_string()),
        Decoded::Bool(b) => Some(b.to_string()),
        Decoded::Float(f) => Some(f.to_string()),
        _ => None,
    }
}

/// A header's value as an integer (also from a numeric string).
fn header_int(p: &BasicProperties, name: &str) -> Option<i64> {
    match p.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v)? {
        Decoded::Int(n) => Some(*n),
        Decoded::UInt(n) => i64::try_from(*n).ok(),
        Decoded::Bool(b) => Some(i64::from(*b)),
        Decoded::Bytes(b) => std::str::from_utf8(b).ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// The QoS: from `header` (when named, present and 0..=2), else `fixed`.
pub fn qos_for(p: &BasicProperties, header: &str, fixed: QoS) -> QoS {
    if header.is_empty() {
        return fixed;
    }
    match header_int(p, header) {
        Some(0) => QoS::AtMostOnce,
        Some(1) => QoS::AtLeastOnce,
        Some(2) => QoS::ExactlyOnce,
        _ => fixed,
    }
}

/// The RETAIN flag: from `x-mqtt-retain` (boolean, 0/1, "true"/"false"), else `fixed`.
pub fn retain_for(p: &BasicProperties, fixed: bool) -> bool {
    match p.headers.iter().find(|(k, _)| k == HEADER_RETAIN).map(|(_, v)| v) {
        Some(Decoded::Bool(b)) => *b,
        Some(Decoded::Int(n)) => *n != 0,
        Some(Decoded::Bytes(b)) => b.eq_ignore_ascii_case(b"true") || b == b"1",
        _ => fixed,
    }
}

/// MQTT 5 properties from AMQP ones: content type; correlation id → correlation data;
/// reply-to → response topic ('.' → '/'); expiration (ms) → message expiry (s, rounded
/// up); headers → user properties (scalars only, mqgate's own `x-mqtt-*` and `qos_header`
/// left out); `x-mqtt-payload-format-indicator` (or the older `x-mqtt-payload-format`) →
/// payload format indicator. 3.1.1 subscribers get none.
pub fn properties_for(p: &BasicProperties, qos_header: &str) -> Properties {
    let mut out = Properties {
        content_type: p.content_type.clone(),
        correlation_data: p.correlation_id.as_ref().map(|c| bytes::Bytes::copy_from_slice(c)),
        ..Properties::default()
    };
    if let Some(rt) = &p.reply_to {
        let topic = rt.replace('.', "/");
        if topic::validate_name(&topic).is_ok() {
            out.response_topic = Some(topic);
        }
    }
    if let Some(ms) = p.expiration.as_deref().and_then(|e| e.trim().parse::<u64>().ok()) {
        let secs = ms.div_ceil(1000).max(1);
        out.message_expiry_interval = Some(u32::try_from(secs).unwrap_or(u32::MAX));
    }
    let format =
        header_int(p, HEADER_PAYLOAD_FORMAT).or_else(|| header_int(p, HEADER_PAYLOAD_FORMAT_OLD));
    if let Some(f) = format {
        if f == 0 || f == 1 {
            out.payload_format_indicator = Some(f as u8);
        }
    }
    for (k, v) in &p.headers {
        if k.starts_with(OWN_PREFIX) || k == qos_header {
            continue;
        }
        if let Some(text) = scalar_text(v) {
            out.user_properties.push((k.clone(), text));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props() -> BasicProperties {
        BasicProperties {
            content_type: Some("application/json".into()),
            correlation_id: Some(b"c-1".to_vec()),
            reply_to: Some("rpc.replies.x1".into()),
            expiration: Some("1500".into()),
            headers: vec![
                ("x-mqtt-qos".into(), Decoded::Int(0)),
                ("x-mqtt-retain".into(), Decoded::Bool(true)),
                ("x-mqtt-payload-format".into(), Decoded::Int(1)),
                ("device".into(), Decoded::Bytes(b"d7".to_vec())),
                ("n".into(), Decoded::Int(3)),
                ("x-death".into(), Decoded::Array(vec![])),
            ],
            ..BasicProperties::default()
        }
    }

    fn delivered(p: &BasicProperties) -> Delivered<'_> {
        Delivered { routing_key: "a.b.c", exchange: "amq.topic", queue: "q", properties: p }
    }

    #[test]
    fn topics_from_the_routing_key_or_a_template() {
        let p = props();
        assert_eq!(topic_for(None, &delivered(&p)), Ok("a/b/c".to_owned()));
        assert_eq!(routing_key_to_topic("a.*.c"), "a/+/c");
        let d = Delivered { routing_key: "a.*", ..delivered(&p) };
        assert!(topic_for(None, &d).is_err(), "a wildcard is no topic name");
        let t = TopicTemplate::parse("devices/{{ header.device }}/{{routing_key}}").expect("ok");
        assert_eq!(t.render(&delivered(&p)), Ok("devices/d7/a/b/c".to_owned()));
        let t = TopicTemplate::parse("x/{{ header.missing }}").expect("ok");
        assert!(t.render(&delivered(&p)).is_err());
        assert!(TopicTemplate::parse("x/{{ nope }}").is_err());
        assert!(TopicTemplate::parse("x/{{ queue").is_err());
        assert!(TopicTemplate::parse("x/+/{{ queue }}").is_err());
        assert!(TopicTemplate::parse("").is_err());
    }

    #[test]
    fn topic_templates_use_the_one_engine_and_native_plans_agree_with_it() {
        let p = props();
        let d = delivered(&p);
        // Filters and expressions: through the engine.
        let t = TopicTemplate::parse(
            "{{ header.device | upper }}/{{ routing_key | replace('a/', '') }}",
        )
        .expect("compiles");
        assert!(t.plan.is_none());
        assert_eq!(t.render(&d), Ok("D7/b/c".to_owned()));
        let t = TopicTemplate::parse("{% if header.missing %}x{% else %}y{% endif %}/{{ queue }}")
            .expect("compiles");
        assert_eq!(t.render(&d), Ok(format!("y/{}", d.queue)));
        // A rendered wildcard is refused at render time.
        let t = TopicTemplate::parse("{{ '#' }}").expect("compiles");
        assert!(t.render(&d).is_err());
        for source in
            ["devices/{{ header.device }}/{{ routing_key }}", "{{ exchange }}/{{ queue }}"]
        {
            let t = TopicTemplate::parse(source).expect("compiles");
            assert!(t.plan.is_some(), "{source}");
            let engine = t.env.get_template("t").expect("t").render(context(&d)).expect("renders");
            assert_eq!(t.render(&d), Ok(engine), "{source}");
        }
    }

    #[test]
    fn qos_retain_and_properties_from_amqp() {
        let p = props();
        assert_eq!(qos_for(&p, "x-mqtt-qos", QoS::AtLeastOnce), QoS::AtMostOnce);
        assert_eq!(qos_for(&p, "", QoS::AtLeastOnce), QoS::AtLeastOnce);
        assert_eq!(
            qos_for(&BasicProperties::default(), "x-mqtt-qos", QoS::ExactlyOnce),
            QoS::ExactlyOnce
        );
        assert!(retain_for(&p, false));
        assert!(!retain_for(&BasicProperties::default(), false));
        let m = properties_for(&p, "x-mqtt-qos");
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.correlation_data.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(m.response_topic.as_deref(), Some("rpc/replies/x1"));
        assert_eq!(m.message_expiry_interval, Some(2));
        assert_eq!(m.payload_format_indicator, Some(1));
        assert_eq!(
            m.user_properties,
            vec![("device".to_owned(), "d7".to_owned()), ("n".to_owned(), "3".to_owned())]
        );
        // The header every target writes (a forwarded message comes back with its indicator).
        let forwarded = BasicProperties {
            headers: vec![(HEADER_PAYLOAD_FORMAT.into(), Decoded::Int(1))],
            ..BasicProperties::default()
        };
        assert_eq!(HEADER_PAYLOAD_FORMAT, "x-mqtt-payload-format-indicator");
        assert_eq!(properties_for(&forwarded, "x-mqtt-qos").payload_format_indicator, Some(1));
    }
}
