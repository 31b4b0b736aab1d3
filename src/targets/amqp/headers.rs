//! How an MQTT message becomes AMQP message properties and headers.
//!
//! Owns the mapping: content type → `content_type`; correlation data → `correlation_id`
//! (or the `x-mqtt-correlation-data` header when it is not a short string); response topic →
//! `reply_to`, translated by the target's topic mapping (the topic itself in
//! `x-mqtt-response-topic`); message expiry → `expiration` (the remaining milliseconds); user
//! properties → headers; payload format indicator → `x-mqtt-payload-format-indicator`; QoS 2 →
//! a deterministic `message_id` (see [`message_id`]). Pure: no I/O, no metrics; a message
//! without MQTT 5 properties allocates nothing here, and no message makes it panic — every
//! string that AMQP bounds is checked before it becomes a short string.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::mqtt::codec::QoS;
use crate::rules::mapping::{self, TopicMapping};

use super::wire::methods::Properties;
use super::wire::table::Value;
use super::wire::MAX_SHORT_STRING_LENGTH;
use crate::message::Message;

/// AMQP `delivery_mode` for QoS 0: transient.
pub(crate) const TRANSIENT: u8 = 1;
/// AMQP `delivery_mode` for QoS 1/2: persistent.
pub(crate) const PERSISTENT: u8 = 2;

/// Header carrying the MQTT topic name (long string).
pub const HEADER_TOPIC: &str = "x-mqtt-topic";
/// Header carrying the MQTT QoS the message was published with (integer).
pub const HEADER_QOS: &str = "x-mqtt-qos";
/// Header carrying the MQTT RETAIN flag (boolean).
pub const HEADER_RETAIN: &str = "x-mqtt-retain";
/// Header carrying the publishing client's identifier (long string).
pub const HEADER_CLIENT_ID: &str = "x-mqtt-client-id";
/// Header carrying the MQTT 5 payload format indicator (integer: 0 bytes, 1 UTF-8 text).
pub const HEADER_PAYLOAD_FORMAT: &str = "x-mqtt-payload-format-indicator";
/// Header carrying the MQTT 5 response topic as published (long string).
pub const HEADER_RESPONSE_TOPIC: &str = "x-mqtt-response-topic";
/// Header carrying MQTT 5 correlation data that is no AMQP short string (over 255 bytes).
pub const HEADER_CORRELATION_DATA: &str = "x-mqtt-correlation-data";
/// Prefix of every message id mqgate derives (see [`message_id`]).
pub const MESSAGE_ID_PREFIX: &str = "mqgate-";

/// The headers of one message: the four `x-mqtt-*` ones in a fixed array (no allocation), or
/// a list when MQTT 5 properties add more.
pub(crate) enum Headers<'a> {
    /// Topic, QoS, retain, client id.
    Fixed([(&'a str, Value<'a>); 4]),
    /// Those, then the MQTT 5 ones and the user properties.
    Extended(Vec<(&'a str, Value<'a>)>),
}

impl<'a> Headers<'a> {
    /// The entries, in wire order.
    pub(crate) fn as_slice(&self) -> &[(&'a str, Value<'a>)] {
        match self {
            Headers::Fixed(h) => h,
            Headers::Extended(h) => h,
        }
    }
}

/// The headers of `msg`: the `x-mqtt-*` ones (topic and client id as long strings 'S', the
/// QoS as a signed 32-bit integer 'I', the retain flag as a boolean 't'); for MQTT 5 messages
/// also the payload format indicator, the response topic, correlation data too long for
/// `correlation_id`, and the user properties as long strings (a name used twice keeps its
/// last value; names starting with `x-mqtt-` are mqgate's and are not taken from users).
pub(crate) fn headers(msg: &Message) -> Headers<'_> {
    let fixed = [
        (HEADER_CLIENT_ID, Value::LongString(msg.client_id.as_bytes())),
        (HEADER_QOS, Value::I32(msg.qos as i32)),
        (HEADER_RETAIN, Value::Bool(msg.retain)),
        (HEADER_TOPIC, Value::LongString(msg.topic.as_bytes())),
    ];
    let p = &msg.properties;
    let long_correlation =
        p.correlation_data.as_ref().filter(|d| d.len() > MAX_SHORT_STRING_LENGTH);
    if p.user_properties.is_empty()
        && p.payload_format_indicator.is_none()
        && p.response_topic.is_none()
        && long_correlation.is_none()
    {
        return Headers::Fixed(fixed);
    }
    let mut all = Vec::with_capacity(7 + p.user_properties.len());
    all.extend_from_slice(&fixed);
    if let Some(pfi) = p.payload_format_indicator {
        all.push((HEADER_PAYLOAD_FORMAT, Value::I32(i32::from(pfi))));
    }
    if let Some(rt) = &p.response_topic {
        all.push((HEADER_RESPONSE_TOPIC, Value::LongString(rt.as_bytes())));
    }
    if let Some(data) = long_correlation {
        all.push((HEADER_CORRELATION_DATA, Value::LongString(data)));
    }
    // The last value of a repeated name wins: walked from the end with the names seen
    // (linear however many properties a client sends), then put back in their order.
    let start = all.len();
    let mut seen = std::collections::HashSet::with_capacity(p.user_properties.len());
    for (name, value) in p.user_properties.iter().rev() {
        if name.starts_with("x-mqtt-")
            || name.len() > MAX_SHORT_STRING_LENGTH
            || !seen.insert(name.as_str())
        {
            continue;
        }
        all.push((name.as_str(), Value::LongString(value.as_bytes())));
    }
    all[start..].reverse();
    Headers::Extended(all)
}

/// The properties of `msg` that need text made for them (message id, expiration, reply-to),
/// made once before [`properties`] borrows them. Nothing is allocated for a QoS 0/1 message
/// without MQTT 5 properties.
#[derive(Debug, Default)]
pub(crate) struct Derived {
    /// QoS 2: the deterministic message id.
    message_id: Option<String>,
    /// Remaining message expiry in milliseconds.
    expiration: Option<String>,
    /// The response topic as a routing key.
    reply_to: Option<String>,
}

/// What [`Derived`] holds for `msg`, published by a target with `mapping`.
pub(crate) fn derived(msg: &Message, mapping: TopicMapping) -> Derived {
    let p = &msg.properties;
    Derived {
        message_id: if msg.qos == QoS::ExactlyOnce { message_id(msg) } else { None },
        expiration: p.message_expiry_interval.map(|secs| {
            // What is left of it: MQTT 5 §3.3.2.3.3 has a forwarding server count down.
            let left = u64::from(secs) * 1000;
            let waited = msg.received.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
            left.saturating_sub(waited).to_string()
        }),
        reply_to: p
            .response_topic
            .as_deref()
            .map(|t| mapping::encode_topic(mapping, t))
            .filter(|rk| rk.len() <= MAX_SHORT_STRING_LENGTH),
    }
}

/// The AMQP `message_id` of a QoS 2 message: `mqgate-` and the message's
/// [identity](Message::identity), the same for every resend of the same MQTT message, so AMQP
/// consumers can drop duplicates by `message_id` (RabbitMQ itself does not deduplicate: there
/// is no exactly-once in AMQP 0-9-1). `None` without a packet id.
pub fn message_id(msg: &Message) -> Option<String> {
    msg.identity().map(|id| format!("{MESSAGE_ID_PREFIX}{id}"))
}

/// The AMQP properties for `msg` with its `headers` and `derived` texts: `delivery_mode`,
/// `timestamp` (seconds since the epoch, taken once per batch by the caller), and the MQTT 5
/// properties that have an AMQP counterpart (see the module docs).
pub(crate) fn properties<'a>(
    msg: &'a Message,
    headers: &'a [(&'a str, Value<'a>)],
    derived: &'a Derived,
    delivery_mode: u8,
    timestamp: u64,
) -> Properties<'a> {
    // An MQTT content type may be up to 64 KiB; AMQP's is a short string. A longer one is
    // left out rather than truncated into something the publisher never said.
    let p = &msg.properties;
    let content_type = p.content_type.as_deref().filter(|ct| ct.len() <= MAX_SHORT_STRING_LENGTH);
    let correlation_id =
        p.correlation_data.as_deref().filter(|d| d.len() <= MAX_SHORT_STRING_LENGTH);
    Properties {
        content_type,
        headers,
        delivery_mode,
        correlation_id,
        reply_to: derived.reply_to.as_deref(),
        expiration: derived.expiration.as_deref(),
        message_id: derived.message_id.as_deref(),
        timestamp,
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;
    use crate::mqtt::codec::{Properties, QoS};

    fn message(content_type: Option<String>) -> Message {
        Message {
            charge: Default::default(),
            topic: "sensors/a/telemetry".to_owned(),
            payload: Bytes::from_static(b"{}"),
            qos: QoS::AtLeastOnce,
            retain: true,
            client_id: Arc::from("dev-1"),
            username: None,
            properties: Properties { content_type, ..Properties::default() }.into(),
            received: Instant::now(),
            packet_id: None,
        }
    }

    #[test]
    fn maps_headers_and_properties() {
        let msg = message(Some("application/json".to_owned()));
        let h = headers(&msg);
        let d = derived(&msg, TopicMapping::Plugin);
        let props = properties(&msg, h.as_slice(), &d, PERSISTENT, unix_seconds());
        assert_eq!(props.delivery_mode, PERSISTENT);
        assert_eq!(props.content_type, Some("application/json"));
        assert!(props.timestamp > 1_600_000_000);
        assert_eq!(
            props.headers,
            &[
                (HEADER_CLIENT_ID, Value::LongString(b"dev-1")),
                (HEADER_QOS, Value::I32(1)),
                (HEADER_RETAIN, Value::Bool(true)),
                (HEADER_TOPIC, Value::LongString(b"sensors/a/telemetry")),
            ]
        );
    }

    #[test]
    fn overlong_content_type_is_left_out_not_a_panic() {
        let msg = message(Some("x".repeat(300)));
        let h = headers(&msg);
        let d = derived(&msg, TopicMapping::Plugin);
        let props = properties(&msg, h.as_slice(), &d, TRANSIENT, 0);
        assert_eq!(props.content_type, None);
        assert_eq!(props.delivery_mode, TRANSIENT);
    }
}

#[cfg(test)]
mod mqtt5_tests {
    use std::sync::Arc;
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;
    use crate::mqtt::codec::Properties;

    fn message(qos: QoS, packet_id: u16, payload: &'static [u8]) -> Message {
        Message {
            charge: Default::default(),
            topic: "a/b.c".to_owned(),
            payload: Bytes::from_static(payload),
            qos,
            retain: false,
            client_id: Arc::from("dev"),
            username: None,
            properties: Properties {
                response_topic: Some("reply/x.y".to_owned()),
                correlation_data: Some(Bytes::from_static(b"req-1")),
                message_expiry_interval: Some(60),
                payload_format_indicator: Some(1),
                user_properties: vec![
                    ("k".to_owned(), "1".to_owned()),
                    ("x-mqtt-topic".to_owned(), "spoof".to_owned()),
                    ("k".to_owned(), "2".to_owned()),
                ],
                ..Properties::default()
            }
            .into(),
            received: Instant::now(),
            packet_id: Some(packet_id),
        }
    }

    #[test]
    fn many_user_properties_map_in_linear_time_last_value_wins() {
        let mut msg = message(QoS::AtLeastOnce, 1, b"x");
        let mut props = (*msg.properties).clone();
        // A client's worst: 20,000 properties, every name repeated (the old de-duplication
        // compared each with every later one: 200 million comparisons).
        props.user_properties =
            (0..20_000).map(|i| (format!("n{}", i % 10_000), i.to_string())).collect();
        msg.properties = props.into();
        let start = Instant::now();
        let Headers::Extended(all) = headers(&msg) else { panic!("extended headers") };
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_millis(500), "{took:?}");
        let n5 = all.iter().find(|(n, _)| *n == "n5").expect("n5");
        assert_eq!(n5.1, Value::LongString(b"10005"), "the last value");
        let names: Vec<&str> = all.iter().map(|(n, _)| *n).filter(|n| n.starts_with('n')).collect();
        assert_eq!(names.len(), 10_000);
        assert_eq!(&names[..2], ["n0", "n1"], "in the order of their last values");
    }

    #[test]
    fn mqtt5_properties_map_to_amqp_ones() {
        let msg = message(QoS::ExactlyOnce, 9, b"x");
        let h = headers(&msg);
        let d = derived(&msg, TopicMapping::Lossless);
        let p = properties(&msg, h.as_slice(), &d, PERSISTENT, 0);
        assert_eq!(p.correlation_id, Some(&b"req-1"[..]));
        assert_eq!(p.reply_to, Some("reply.x%2Ey"));
        let ms: u64 = p.expiration.expect("expiration").parse().expect("a number");
        assert!((59_000..=60_000).contains(&ms), "{ms}");
        assert!(p.message_id.expect("QoS 2 has a message id").starts_with(MESSAGE_ID_PREFIX));
        let names: Vec<&str> = h.as_slice().iter().map(|(n, _)| *n).collect();
        assert_eq!(names.iter().filter(|n| **n == "x-mqtt-topic").count(), 1, "{names:?}");
        assert!(h.as_slice().contains(&("k", Value::LongString(b"2"))));
        assert!(!h.as_slice().contains(&("k", Value::LongString(b"1"))));
        assert!(h.as_slice().contains(&(HEADER_PAYLOAD_FORMAT, Value::I32(1))));
    }

    #[test]
    fn message_id_is_deterministic_per_client_packet_topic_and_payload() {
        let a = message_id(&message(QoS::ExactlyOnce, 9, b"x")).expect("a packet id");
        assert_eq!(Some(&a), message_id(&message(QoS::ExactlyOnce, 9, b"x")).as_ref());
        assert_ne!(Some(&a), message_id(&message(QoS::ExactlyOnce, 10, b"x")).as_ref());
        assert_ne!(Some(&a), message_id(&message(QoS::ExactlyOnce, 9, b"y")).as_ref());
        assert_eq!(a.len(), MESSAGE_ID_PREFIX.len() + 32);
        assert!(derived(&message(QoS::AtLeastOnce, 9, b"x"), TopicMapping::Plugin)
            .message_id
            .is_none());
    }
}
