//! How an MQTT message becomes AMQP message properties and headers.
//!
//! Owns the mapping (one function, so later property mappings land in one place). Pure: no I/O,
//! no metrics, and it never panics on any message — every string that AMQP bounds is checked
//! before it becomes a `ShortString`.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString, MAX_SHORT_STRING_LENGTH};
use lapin::BasicProperties;

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

/// The AMQP properties for `msg`: `delivery_mode`, a timestamp (seconds since the epoch), the
/// MQTT 5 content type when it is set and fits in 255 bytes, and the `x-mqtt-*` headers.
pub(crate) fn properties(msg: &Message, delivery_mode: u8) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(HEADER_TOPIC),
        AMQPValue::LongString(LongString::from(msg.topic.as_bytes())),
    );
    headers.insert(ShortString::from(HEADER_QOS), AMQPValue::LongInt(msg.qos as i32));
    headers.insert(ShortString::from(HEADER_RETAIN), AMQPValue::Boolean(msg.retain));
    headers.insert(
        ShortString::from(HEADER_CLIENT_ID),
        AMQPValue::LongString(LongString::from(msg.client_id.as_bytes())),
    );

    let mut props = BasicProperties::default()
        .with_delivery_mode(delivery_mode)
        .with_timestamp(unix_seconds())
        .with_headers(headers);
    // An MQTT content type may be up to 64 KiB; AMQP's is a short string. A longer one is
    // left out rather than truncated into something the publisher never said.
    if let Some(ct) = &msg.properties.content_type {
        if ct.len() <= MAX_SHORT_STRING_LENGTH {
            props = props.with_content_type(ShortString::from(ct.as_str()));
        }
    }
    props
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_seconds() -> u64 {
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
            topic: "sensors/a/telemetry".to_owned(),
            payload: Bytes::from_static(b"{}"),
            qos: QoS::AtLeastOnce,
            retain: true,
            client_id: Arc::from("dev-1"),
            username: None,
            properties: Properties { content_type, ..Properties::default() },
            received: Instant::now(),
        }
    }

    #[test]
    fn maps_headers_and_properties() {
        let props = properties(&message(Some("application/json".to_owned())), PERSISTENT);
        assert_eq!(props.delivery_mode(), &Some(PERSISTENT));
        assert_eq!(
            props.content_type().as_ref().map(ShortString::as_str),
            Some("application/json")
        );
        assert!(props.timestamp().is_some_and(|t| t > 1_600_000_000));
        let headers = props.headers().as_ref().expect("headers are always set");
        let h = headers.inner();
        assert_eq!(
            h.get(HEADER_TOPIC),
            Some(&AMQPValue::LongString(LongString::from("sensors/a/telemetry")))
        );
        assert_eq!(h.get(HEADER_QOS), Some(&AMQPValue::LongInt(1)));
        assert_eq!(h.get(HEADER_RETAIN), Some(&AMQPValue::Boolean(true)));
        assert_eq!(
            h.get(HEADER_CLIENT_ID),
            Some(&AMQPValue::LongString(LongString::from("dev-1")))
        );
    }

    #[test]
    fn overlong_content_type_is_left_out_not_a_panic() {
        let props = properties(&message(Some("x".repeat(300))), TRANSIENT);
        assert_eq!(props.content_type(), &None);
        assert_eq!(props.delivery_mode(), &Some(TRANSIENT));
    }
}
