//! The message a JSON request carries, for `POST /api/v1/publish` and `POST /api/v1/route`:
//!
//! ```json
//! {"topic": "a/b", "payload": "text" | "payload_base64": "AAE=", "qos": 1, "retain": false,
//!  "properties": {"content_type": "...", "response_topic": "...", "correlation_data": "...",
//!                 "correlation_data_base64": "...", "payload_format_indicator": 1,
//!                 "message_expiry_interval": 60, "user_properties": {"k": "v"} | [["k", "v"]]},
//!  "client_id": "...", "user": "..."}
//! ```
//!
//! `user` is for the dry-run only (a publish is made as whoever authenticated). Pure: parses
//! and checks, no I/O.

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;

use crate::mqtt::codec::{Properties, PublishProperties, QoS};

/// One message of a request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageBody {
    /// The topic name.
    pub topic: String,
    /// The payload as text.
    #[serde(default)]
    pub payload: Option<String>,
    /// The payload as base64 (for bytes that are not text).
    #[serde(default)]
    pub payload_base64: Option<String>,
    /// 0, 1 or 2 (default 0).
    #[serde(default)]
    pub qos: u8,
    /// The RETAIN flag.
    #[serde(default)]
    pub retain: bool,
    /// MQTT 5 PUBLISH properties.
    #[serde(default)]
    pub properties: PropertiesBody,
    /// The client id the message carries (templates' `client_id`, the ACL's `%c`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// The dry-run's publisher (`/api/v1/route` only).
    #[serde(default)]
    pub user: Option<String>,
}

/// The MQTT 5 properties a request may set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PropertiesBody {
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    response_topic: Option<String>,
    #[serde(default)]
    correlation_data: Option<String>,
    #[serde(default)]
    correlation_data_base64: Option<String>,
    #[serde(default)]
    payload_format_indicator: Option<u8>,
    #[serde(default)]
    message_expiry_interval: Option<u32>,
    /// An object (`{"k": "v"}`) or, for repeated or ordered names, a list of pairs.
    #[serde(default)]
    user_properties: Option<serde_json::Value>,
}

/// A message of a request, checked: what a PUBLISH would carry.
#[derive(Debug)]
pub struct Parts {
    /// The topic (not yet checked against topic rules: the caller decides how to answer).
    pub topic: String,
    /// The payload bytes.
    pub payload: Bytes,
    /// The QoS.
    pub qos: QoS,
    /// The RETAIN flag.
    pub retain: bool,
    /// The properties.
    pub properties: PublishProperties,
}

/// What is wrong with a request's message; `utf8`: the payload format indicator says UTF-8
/// and the payload is not (MQTT 5's 0x99), otherwise a malformed request.
#[derive(Debug)]
pub struct BadBody {
    /// What is wrong.
    pub reason: String,
    /// The payload format indicator's complaint.
    pub utf8: bool,
}

fn bad(reason: impl Into<String>) -> BadBody {
    BadBody { reason: reason.into(), utf8: false }
}

fn base64(field: &str, text: &str) -> Result<Bytes, BadBody> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map(Bytes::from)
        .map_err(|e| bad(format!("{field}: not base64: {e}")))
}

impl MessageBody {
    /// The message's parts, checked (QoS, payload, properties).
    pub fn parts(self) -> Result<Parts, BadBody> {
        let qos = match self.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            2 => QoS::ExactlyOnce,
            n => return Err(bad(format!("qos: {n}: 0, 1 or 2"))),
        };
        let payload = match (self.payload, self.payload_base64) {
            (Some(_), Some(_)) => return Err(bad("payload and payload_base64: one or the other")),
            (Some(text), None) => Bytes::from(text),
            (None, Some(b64)) => base64("payload_base64", &b64)?,
            (None, None) => Bytes::new(),
        };
        let p = self.properties;
        if let Some(n) = p.payload_format_indicator {
            if n > 1 {
                return Err(bad("properties.payload_format_indicator: 0 or 1"));
            }
            if n == 1 && std::str::from_utf8(&payload).is_err() {
                return Err(BadBody {
                    reason: "payload_format_indicator says UTF-8 but the payload is not".into(),
                    utf8: true,
                });
            }
        }
        if let Some(t) = &p.response_topic {
            crate::mqtt::topic::validate_name(t)
                .map_err(|e| bad(format!("properties.response_topic: {e}")))?;
        }
        let correlation_data = match (p.correlation_data, p.correlation_data_base64) {
            (Some(_), Some(_)) => {
                return Err(bad("correlation_data and correlation_data_base64: one or the other"))
            }
            (Some(text), None) => Some(Bytes::from(text)),
            (None, Some(b64)) => Some(base64("properties.correlation_data_base64", &b64)?),
            (None, None) => None,
        };
        let user_properties = match p.user_properties {
            None => Vec::new(),
            Some(v) => user_properties(v)?,
        };
        let properties = Properties {
            payload_format_indicator: p.payload_format_indicator,
            message_expiry_interval: p.message_expiry_interval,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data,
            user_properties,
            ..Properties::default()
        };
        Ok(Parts {
            topic: self.topic,
            payload,
            qos,
            retain: self.retain,
            properties: properties.into(),
        })
    }
}

/// `{"k": "v"}` or `[["k", "v"], ...]` as name/value pairs.
fn user_properties(v: serde_json::Value) -> Result<Vec<(String, String)>, BadBody> {
    let wrong = || {
        bad("properties.user_properties: an object of strings or a list of [name, value] pairs of strings")
    };
    match v {
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => Ok((k, s)),
                _ => Err(wrong()),
            })
            .collect(),
        serde_json::Value::Array(pairs) => pairs
            .into_iter()
            .map(|pair| match pair {
                serde_json::Value::Array(kv) => match <[serde_json::Value; 2]>::try_from(kv) {
                    Ok([serde_json::Value::String(k), serde_json::Value::String(v)]) => Ok((k, v)),
                    _ => Err(wrong()),
                },
                _ => Err(wrong()),
            })
            .collect(),
        _ => Err(wrong()),
    }
}

/// A request's messages: one object, or an array of them (the batch form).
pub enum Request {
    /// One message.
    One(Box<MessageBody>),
    /// Several, answered one by one.
    Batch(Vec<MessageBody>),
}

/// Parses a request body.
pub fn parse(body: &[u8]) -> Result<Request, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON: {e}"))?;
    match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| serde_json::from_value(v).map_err(|e| format!("message {i}: {e}")))
            .collect::<Result<Vec<_>, _>>()
            .map(Request::Batch),
        v => {
            serde_json::from_value(v).map(|m| Request::One(Box::new(m))).map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> MessageBody {
        match parse(text.as_bytes()) {
            Ok(Request::One(m)) => *m,
            _ => panic!("one message: {text}"),
        }
    }

    #[test]
    fn messages_and_their_properties() {
        let p = one(r#"{"topic": "a/b", "payload_base64": "AAE=", "qos": 1, "retain": true,
            "properties": {"content_type": "x", "user_properties": [["k", "1"], ["k", "2"]],
            "correlation_data": "c", "message_expiry_interval": 5}}"#)
        .parts()
        .expect("valid");
        assert_eq!((&p.payload[..], p.qos, p.retain), (&[0u8, 1][..], QoS::AtLeastOnce, true));
        assert_eq!(
            p.properties.user_properties,
            [("k".into(), "1".into()), ("k".into(), "2".into())]
        );
        assert_eq!(p.properties.correlation_data.as_deref(), Some(&b"c"[..]));
        let p = one(r#"{"topic": "t", "properties": {"user_properties": {"a": "b"}}}"#).parts();
        assert_eq!(p.expect("valid").properties.user_properties, [("a".into(), "b".into())]);
        for bad in [
            r#"{"topic": "t", "qos": 3}"#,
            r#"{"topic": "t", "payload": "a", "payload_base64": "YQ=="}"#,
            r#"{"topic": "t", "payload_base64": "%%"}"#,
            r#"{"topic": "t", "properties": {"user_properties": {"a": 1}}}"#,
            r#"{"topic": "t", "properties": {"response_topic": "a/#"}}"#,
        ] {
            assert!(one(bad).parts().is_err(), "{bad}");
        }
        let e = one(r#"{"topic": "t", "payload_base64": "/w==", "properties": {"payload_format_indicator": 1}}"#)
            .parts()
            .expect_err("not UTF-8");
        assert!(e.utf8);
        assert!(parse(br#"{"topic": "t", "colour": "red"}"#).is_err(), "unknown fields");
        assert!(
            matches!(parse(br#"[{"topic": "a"}, {"topic": "b"}]"#), Ok(Request::Batch(v)) if v.len() == 2)
        );
    }
}
