//! How an MQTT message becomes AMQP message properties and headers.
//!
//! Owns the mapping (later property mappings land here). Pure: no I/O, no metrics, no
//! allocation, and it never panics on any message — every string that AMQP bounds is checked
//! before it becomes a short string.

use std::time::{SystemTime, UNIX_EPOCH};

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

/// The `x-mqtt-*` headers of `msg`: the topic and client id as long strings ('S'), the QoS as
/// a signed 32-bit integer ('I'), the retain flag as a boolean ('t').
pub(crate) fn headers(msg: &Message) -> [(&'static str, Value<'_>); 4] {
    [
        (HEADER_CLIENT_ID, Value::LongString(msg.client_id.as_bytes())),
        (HEADER_QOS, Value::I32(msg.qos as i32)),
        (HEADER_RETAIN, Value::Bool(msg.retain)),
        (HEADER_TOPIC, Value::LongString(msg.topic.as_bytes())),
    ]
}

/// The AMQP properties for `msg` with its `headers`: `delivery_mode`, `timestamp` (seconds
/// since the epoch, taken once per batch by the caller), the MQTT 5 content type when it is
/// set and fits in 255 bytes, and correlation data / response topic as correlation id /
/// reply-to (the topic translated '/' → '.'), for request/response through RabbitMQ.
pub(crate) fn properties<'a>(
    msg: &'a Message,
    headers: &'a [(&'static str, Value<'a>)],
    delivery_mode: u8,
    timestamp: u64,
) -> Properties<'a> {
    // An MQTT content type may be up to 64 KiB; AMQP's is a short string. A longer one is
    // left out rather than truncated into something the publisher never said.
    let content_type =
        msg.properties.content_type.as_deref().filter(|ct| ct.len() <= MAX_SHORT_STRING_LENGTH);
    // Request/response: correlation data and response topic ('/' → '.' when encoded).
    let correlation_id = msg.properties.correlation_data.as_deref();
    let reply_to_topic = msg.properties.response_topic.as_deref();
    Properties { content_type, headers, delivery_mode, timestamp, correlation_id, reply_to_topic }
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
        let msg = message(Some("application/json".to_owned()));
        let h = headers(&msg);
        let props = properties(&msg, &h, PERSISTENT, unix_seconds());
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
        let props = properties(&msg, &h, TRANSIENT, 0);
        assert_eq!(props.content_type, None);
        assert_eq!(props.delivery_mode, TRANSIENT);
    }
}
