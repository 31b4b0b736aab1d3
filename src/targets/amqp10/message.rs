//! How an MQTT message becomes an AMQP 1.0 message: pure, no I/O, never panics.
//!
//! - header: `durable` (the target's `durable:`, default true for QoS 1/2), `ttl` (the
//!   shorter of the target's `ttl:` and what is left of the MQTT message expiry);
//! - properties: `message-id` (QoS 2: the deterministic `mqgate-…` id, as for AMQP 0-9-1),
//!   `subject` (the MQTT topic), `content-type` (the target's, else the MQTT 5 one),
//!   `correlation-id` (MQTT 5 correlation data: a string when it is UTF-8, else binary),
//!   `reply-to` (the MQTT 5 response topic as published), `creation-time`;
//! - application-properties: `x-mqtt-topic`, `x-mqtt-qos`, `x-mqtt-retain`,
//!   `x-mqtt-client-id` (as the AMQP 0-9-1 headers), `x-mqtt-payload-format-indicator` and
//!   `x-mqtt-response-topic` when set, then the MQTT 5 user properties (a name used twice
//!   keeps its last value; names starting `x-mqtt-` are mqgate's and not taken from users);
//! - body: one `data` section, the payload unchanged.

use std::time::{SystemTime, UNIX_EPOCH};

use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Data, Header, Message as AmqpMessage, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, OrderedMap, SimpleValue, Symbol, Timestamp};

use crate::message::Message;
use crate::mqtt::codec::QoS;
use crate::targets::amqp::{
    message_id, HEADER_CLIENT_ID, HEADER_PAYLOAD_FORMAT, HEADER_QOS, HEADER_RESPONSE_TOPIC,
    HEADER_RETAIN, HEADER_TOPIC,
};

/// The per-target choices that shape the message.
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// `durable:`; `None`: by QoS.
    pub durable: Option<bool>,
    /// `ttl:` in milliseconds.
    pub ttl_ms: Option<u32>,
    /// `content_type:`.
    pub content_type: Option<String>,
}

/// The AMQP 1.0 message for `msg`.
pub fn amqp_message(msg: &Message, shape: &Shape) -> AmqpMessage<Data> {
    let p = &msg.properties;
    let left_ms = p.message_expiry_interval.map(|secs| {
        // What is left of it: MQTT 5 §3.3.2.3.3 has a forwarding server count down.
        let total = u64::from(secs) * 1000;
        let waited = msg.received.elapsed().as_millis().min(u128::from(u64::MAX)) as u64;
        total.saturating_sub(waited).min(u64::from(u32::MAX)) as u32
    });
    let ttl = match (shape.ttl_ms, left_ms) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let header = Header {
        durable: shape.durable.unwrap_or(msg.qos != QoS::AtMostOnce),
        ttl,
        ..Header::default()
    };
    let correlation_id = p.correlation_data.as_ref().map(|d| match std::str::from_utf8(d) {
        Ok(s) => MessageId::String(s.to_owned()),
        Err(_) => MessageId::Binary(Binary::from(d.to_vec())),
    });
    let content_type = shape.content_type.clone().or_else(|| p.content_type.clone());
    let properties = Properties {
        message_id: if msg.qos == QoS::ExactlyOnce {
            message_id(msg).map(MessageId::String)
        } else {
            None
        },
        subject: Some(msg.topic.clone()),
        content_type: content_type.map(Symbol::from),
        correlation_id,
        reply_to: p.response_topic.clone(),
        creation_time: Some(Timestamp::from_milliseconds(unix_millis())),
        ..Properties::default()
    };
    let mut app = OrderedMap::with_capacity(4 + p.user_properties.len());
    app.insert(HEADER_TOPIC.to_owned(), SimpleValue::String(msg.topic.clone()));
    app.insert(HEADER_QOS.to_owned(), SimpleValue::Int(msg.qos as i32));
    app.insert(HEADER_RETAIN.to_owned(), SimpleValue::Bool(msg.retain));
    app.insert(HEADER_CLIENT_ID.to_owned(), SimpleValue::String(msg.client_id.to_string()));
    if let Some(pfi) = p.payload_format_indicator {
        app.insert(HEADER_PAYLOAD_FORMAT.to_owned(), SimpleValue::Int(i32::from(pfi)));
    }
    if let Some(rt) = &p.response_topic {
        app.insert(HEADER_RESPONSE_TOPIC.to_owned(), SimpleValue::String(rt.clone()));
    }
    for (name, value) in &p.user_properties {
        if name.starts_with("x-mqtt-") {
            continue;
        }
        // A later value of the same name replaces the earlier one.
        app.insert(name.clone(), SimpleValue::String(value.clone()));
    }
    AmqpMessage {
        header: Some(header),
        delivery_annotations: None,
        message_annotations: None,
        properties: Some(properties),
        application_properties: Some(ApplicationProperties(app)),
        body: Data(Binary::from(msg.payload.to_vec())),
        footer: None,
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;
    use crate::mqtt::codec::Properties as MqttProperties;

    fn message(qos: QoS, props: MqttProperties) -> Message {
        Message {
            charge: Default::default(),
            topic: "sensors/a/t".to_owned(),
            payload: Bytes::from_static(b"{\"t\":1}"),
            qos,
            retain: true,
            client_id: Arc::from("dev-1"),
            username: None,
            properties: props.into(),
            received: Instant::now(),
            packet_id: Some(7),
        }
    }

    #[test]
    fn a_plain_qos1_message_is_durable_with_the_mqtt_application_properties() {
        let m =
            amqp_message(&message(QoS::AtLeastOnce, MqttProperties::default()), &Shape::default());
        let h = m.header.expect("header");
        assert!(h.durable);
        assert_eq!(h.ttl, None);
        let p = m.properties.expect("properties");
        assert_eq!(p.subject.as_deref(), Some("sensors/a/t"));
        assert_eq!(p.message_id, None, "only QoS 2 carries the deterministic id");
        let app = m.application_properties.expect("application properties").0;
        assert_eq!(app.get(HEADER_TOPIC), Some(&SimpleValue::String("sensors/a/t".into())));
        assert_eq!(app.get(HEADER_QOS), Some(&SimpleValue::Int(1)));
        assert_eq!(app.get(HEADER_RETAIN), Some(&SimpleValue::Bool(true)));
        assert_eq!(app.get(HEADER_CLIENT_ID), Some(&SimpleValue::String("dev-1".into())));
        assert_eq!(m.body.0.as_slice(), b"{\"t\":1}");
        let q0 =
            amqp_message(&message(QoS::AtMostOnce, MqttProperties::default()), &Shape::default());
        assert!(!q0.header.expect("header").durable);
    }

    #[test]
    fn mqtt5_properties_map_and_the_target_overrides() {
        let props = MqttProperties {
            content_type: Some("application/json".into()),
            correlation_data: Some(Bytes::from_static(b"req-1")),
            response_topic: Some("reply/a".into()),
            message_expiry_interval: Some(60),
            payload_format_indicator: Some(1),
            user_properties: vec![
                ("k".into(), "1".into()),
                ("x-mqtt-topic".into(), "spoof".into()),
                ("k".into(), "2".into()),
            ],
            ..MqttProperties::default()
        };
        let msg = message(QoS::ExactlyOnce, props);
        let m = amqp_message(&msg, &Shape::default());
        let ttl = m.header.as_ref().and_then(|h| h.ttl).expect("ttl from the expiry");
        assert!((59_000..=60_000).contains(&ttl), "{ttl}");
        let p = m.properties.expect("properties");
        assert_eq!(p.content_type, Some(Symbol::from("application/json")));
        assert_eq!(p.correlation_id, Some(MessageId::String("req-1".into())));
        assert_eq!(p.reply_to.as_deref(), Some("reply/a"));
        assert_eq!(p.message_id, message_id(&msg).map(MessageId::String));
        let app = m.application_properties.expect("application properties").0;
        assert_eq!(app.get("k"), Some(&SimpleValue::String("2".into())));
        assert_eq!(app.get(HEADER_TOPIC), Some(&SimpleValue::String("sensors/a/t".into())));
        assert_eq!(app.get(HEADER_PAYLOAD_FORMAT), Some(&SimpleValue::Int(1)));

        let shape = Shape {
            durable: Some(false),
            ttl_ms: Some(5_000),
            content_type: Some("text/plain".into()),
        };
        let m = amqp_message(&msg, &shape);
        let h = m.header.expect("header");
        assert_eq!((h.durable, h.ttl), (false, Some(5_000)));
        let ct = m.properties.and_then(|p| p.content_type);
        assert_eq!(ct, Some(Symbol::from("text/plain")));
    }

    #[test]
    fn binary_correlation_data_stays_binary() {
        let props = MqttProperties {
            correlation_data: Some(Bytes::from_static(&[0xff, 0x00])),
            ..MqttProperties::default()
        };
        let m = amqp_message(&message(QoS::AtLeastOnce, props), &Shape::default());
        let id = m.properties.and_then(|p| p.correlation_id);
        assert_eq!(id, Some(MessageId::Binary(Binary::from(vec![0xff, 0x00]))));
    }
}
