//! Request bodies of HTTP targets: `raw`, the `json` envelope, a template, and batches of
//! them (a JSON array or NDJSON); and the `Idempotency-Key` of a message or a batch.
//!
//! Pure: no I/O.

use std::borrow::Cow;

use base64::Engine;
use bytes::Bytes;
use minijinja::value::Value;
use sha2::{Digest, Sha256};

use super::config::BatchFormat;
use super::template::Template;
use crate::message::Message;
use crate::store::codec::unix_millis;
use crate::timefmt::rfc3339;

/// What the body of a request for one message is.
#[derive(Debug)]
pub enum BodySpec {
    /// The payload unchanged.
    Raw,
    /// The JSON envelope ([`envelope`]).
    Json,
    /// A rendered template.
    Template(Template),
}

impl BodySpec {
    /// `raw`, `json`, or else a template to compile.
    pub fn parse(text: &str) -> Result<BodySpec, super::template::TemplateError> {
        Ok(match text {
            "raw" => BodySpec::Raw,
            "json" => BodySpec::Json,
            t => BodySpec::Template(Template::compile(super::template::Kind::Text, t)?),
        })
    }

    /// The Content-Type when the config sets none: a fixed one, or the message's own.
    pub fn default_content_type(&self, msg: &Message) -> Cow<'static, str> {
        match self {
            BodySpec::Raw => match &msg.properties.content_type {
                Some(ct) => Cow::Owned(ct.clone()),
                None => Cow::Borrowed("application/octet-stream"),
            },
            BodySpec::Json => Cow::Borrowed("application/json"),
            BodySpec::Template(_) => Cow::Borrowed("text/plain; charset=utf-8"),
        }
    }

    /// The body of a request carrying `msg` alone. `ctx` is the template context (when the
    /// body is a template).
    pub fn single(&self, msg: &Message, ctx: Option<&Value>) -> Result<Bytes, String> {
        match self {
            BodySpec::Raw => Ok(msg.payload.clone()),
            BodySpec::Json => envelope_bytes(msg).map(Bytes::from),
            BodySpec::Template(Template::Static(text)) => Ok(Bytes::from(text.clone())),
            BodySpec::Template(t) => {
                let ctx = ctx.ok_or("no template context")?;
                t.render(ctx).map(|s| Bytes::from(s.into_owned())).map_err(|e| format!("body {e}"))
            }
        }
    }

    /// The element of `msg` in a batch: one JSON document on one line. `raw` payloads and
    /// rendered templates must be JSON to be batched.
    pub fn element(&self, msg: &Message, ctx: Option<&Value>) -> Result<Vec<u8>, String> {
        let value: serde_json::Value = match self {
            // Compact JSON: one line.
            BodySpec::Json => return envelope_bytes(msg),
            BodySpec::Raw => serde_json::from_slice(&msg.payload).map_err(|_| {
                "the payload is not JSON: a batch of `body: raw` needs JSON payloads \
                 (use `body: json` for any payload)"
                    .to_owned()
            })?,
            BodySpec::Template(_) => {
                let text = self.single(msg, ctx)?;
                serde_json::from_slice(&text)
                    .map_err(|e| format!("the rendered body is not JSON ({e}): batches are JSON"))?
            }
        };
        serde_json::to_vec(&value).map_err(|e| format!("cannot encode JSON: {e}"))
    }
}

/// The `json` envelope of a message as compact JSON (one line): topic, payload (the JSON value
/// when the payload is JSON, else base64, as `payload_encoding` says), QoS, retain, client id,
/// user name, receive time and the MQTT 5 content type and user properties.
///
/// Written by hand rather than through serde: this runs for every message of a batch, and
/// serde's string escaping and a payload tree were a quarter of mqgate's CPU in the batched
/// bench. A one-line JSON payload is copied as it is (validated, not re-encoded); JSON over
/// several lines is re-encoded compact, so an NDJSON batch stays one line per message.
pub fn envelope_bytes(msg: &Message) -> Result<Vec<u8>, String> {
    let p = &msg.payload[..];
    let mut out = String::with_capacity(192 + msg.topic.len() + p.len() * 4 / 3);
    out.push_str("{\"topic\":");
    json_str(&mut out, &msg.topic);
    out.push_str(",\"payload\":");
    let one_line = !p.iter().any(|&b| b == b'\n' || b == b'\r');
    let json = match one_line {
        true => serde_json::from_slice::<&serde_json::value::RawValue>(p)
            .ok()
            .map(|raw| out.push_str(raw.get())),
        false => serde_json::from_slice::<serde_json::Value>(p).ok().map(|v| {
            // A `Value` always encodes; `to_string` writes it compact.
            out.push_str(&v.to_string());
        }),
    };
    match json {
        Some(()) => out.push_str(",\"payload_encoding\":\"json\""),
        None => {
            out.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(p, &mut out);
            out.push_str("\",\"payload_encoding\":\"base64\"");
        }
    }
    out.push_str(",\"qos\":");
    out.push(char::from(b'0' + msg.qos as u8));
    out.push_str(if msg.retain { ",\"retain\":true" } else { ",\"retain\":false" });
    out.push_str(",\"client_id\":");
    json_str(&mut out, &msg.client_id);
    out.push_str(",\"username\":");
    json_opt(&mut out, msg.username.as_deref());
    out.push_str(",\"received_at\":\"");
    out.push_str(rfc3339(unix_millis(msg.received)).as_str());
    out.push_str("\",\"content_type\":");
    json_opt(&mut out, msg.properties.content_type.as_deref());
    out.push_str(",\"user_properties\":[");
    for (i, (k, v)) in msg.properties.user_properties.iter().enumerate() {
        out.push_str(if i == 0 { "[" } else { ",[" });
        json_str(&mut out, k);
        out.push(',');
        json_str(&mut out, v);
        out.push(']');
    }
    out.push_str("]}");
    Ok(out.into_bytes())
}

/// `s` as a JSON string (RFC 8259 escapes), appended to `out`.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let esc = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        } else {
            out.push_str(esc);
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

/// A JSON string, or `null`.
fn json_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    }
}

/// The envelope of `msg` as a JSON value.
#[cfg(test)]
fn envelope(msg: &Message) -> serde_json::Value {
    serde_json::from_slice(&envelope_bytes(msg).unwrap_or_default()).unwrap_or_default()
}

/// A batch body from its elements.
pub fn frame(format: BatchFormat, elements: &[Vec<u8>]) -> Bytes {
    let len: usize = elements.iter().map(|e| e.len() + 1).sum::<usize>() + 2;
    let mut out = Vec::with_capacity(len);
    match format {
        BatchFormat::Json => {
            out.push(b'[');
            for (i, e) in elements.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(e);
            }
            out.push(b']');
        }
        BatchFormat::Ndjson => {
            for e in elements {
                out.extend_from_slice(e);
                out.push(b'\n');
            }
        }
    }
    Bytes::from(out)
}

/// The Content-Type of a batch.
pub fn batch_content_type(format: BatchFormat) -> &'static str {
    match format {
        BatchFormat::Json => "application/json",
        BatchFormat::Ndjson => "application/x-ndjson",
    }
}

/// The `Idempotency-Key` of a QoS 1/2 message: its [identity](Message::identity), the same
/// for every retry of the request and for the client's resend of the same PUBLISH. `None` for
/// QoS 0 (nothing is retried on the client's side) and messages without a packet id (wills).
pub fn idempotency_key(msg: &Message) -> Option<String> {
    msg.identity()
}

/// The key of a batch: one hash over the identities of its messages, in order (`None` when
/// none has one). The same batch sent again (a retry) gets the same key.
pub fn batch_key<'a>(msgs: impl Iterator<Item = &'a Message>) -> Option<String> {
    let mut h = Sha256::new();
    let mut any = false;
    for m in msgs {
        if m.hash_identity(&mut h) {
            any = true;
        } else {
            h.update(b"-");
        }
    }
    any.then(|| hex(&h.finalize()[..16]))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::mqtt::codec::{Properties, QoS};
    use std::time::Instant;

    fn msg(payload: &[u8], packet_id: Option<u16>) -> Message {
        Message {
            topic: "s/a".into(),
            payload: Bytes::copy_from_slice(payload),
            qos: QoS::AtLeastOnce,
            retain: true,
            client_id: Arc::from("dev"),
            username: Some(Arc::from("u")),
            properties: Properties::default(),
            received: Instant::now(),
            packet_id,
        }
    }

    #[test]
    fn strings_are_escaped_like_serde_json() {
        for text in
            ["plain", "q\"uote\\back", "line\nbreak\r\ttab", "ctl\u{1}\u{1f}", "ünïcødé ✓", ""]
        {
            let mut out = String::new();
            json_str(&mut out, text);
            let back: String = serde_json::from_str(&out).expect("valid JSON string");
            assert_eq!(back, text);
            assert!(!out.contains('\n'));
        }
        let mut m = msg(b"\x00", Some(1));
        m.topic = "a/\"b\"/\\c".into();
        m.properties.user_properties = vec![("k\n".into(), "v".into()), ("k2".into(), "".into())];
        m.properties.content_type = Some("text/plain".into());
        m.username = None;
        let e = envelope(&m);
        assert_eq!(e["topic"], "a/\"b\"/\\c");
        assert_eq!(e["user_properties"], json!([["k\n", "v"], ["k2", ""]]));
        assert_eq!(e["content_type"], "text/plain");
        assert_eq!(e["username"], serde_json::Value::Null);
        assert_eq!(e["qos"], 1);
        assert_eq!(e["retain"], true);
    }

    #[test]
    fn json_payloads_are_embedded_and_every_element_is_one_line() {
        for (payload, expect) in [
            (&b"{\"t\": 21.5, \"s\": \"a b\"}"[..], json!({"t": 21.5, "s": "a b"})),
            (&b"{\n  \"t\": 1,\n  \"u\": [1,\r\n 2]\n}\n"[..], json!({"t": 1, "u": [1, 2]})),
            (&b"  [1, 2]  "[..], json!([1, 2])),
            (&b"\"x\""[..], json!("x")),
        ] {
            let bytes = envelope_bytes(&msg(payload, None)).expect("envelope");
            assert!(!bytes.contains(&b'\n') && !bytes.contains(&b'\r'), "{payload:?}");
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("valid JSON");
            assert_eq!(v["payload"], expect, "{payload:?}");
            assert_eq!(v["payload_encoding"], "json");
        }
        let v: serde_json::Value =
            serde_json::from_slice(&envelope_bytes(&msg(b"{not json", None)).expect("envelope"))
                .expect("valid JSON");
        assert_eq!(v["payload_encoding"], "base64");
    }

    #[test]
    fn envelope_has_json_or_base64_payload() {
        let e = envelope(&msg(br#"{"t": 21.5}"#, Some(1)));
        assert_eq!(e["payload"], json!({"t": 21.5}));
        assert_eq!(e["payload_encoding"], "json");
        assert_eq!(
            (e["topic"].as_str(), e["qos"].as_u64(), e["retain"].as_bool()),
            (Some("s/a"), Some(1), Some(true))
        );
        assert_eq!((e["client_id"].as_str(), e["username"].as_str()), (Some("dev"), Some("u")));
        let e = envelope(&msg(b"\x00\xffhi", None));
        assert_eq!(e["payload"], "AP9oaQ==");
        assert_eq!(e["payload_encoding"], "base64");
        let at = e["received_at"].as_str().unwrap_or_default();
        assert!(at.len() == 24 && at.ends_with('Z') && at.starts_with("20"), "{at}");
    }

    #[test]
    fn keys_are_deterministic_and_distinguish_messages() {
        let a = idempotency_key(&msg(b"x", Some(1)));
        assert_eq!(a, idempotency_key(&msg(b"x", Some(1))));
        assert_ne!(a, idempotency_key(&msg(b"x", Some(2))));
        assert_ne!(a, idempotency_key(&msg(b"y", Some(1))));
        assert_eq!(idempotency_key(&msg(b"x", None)), None);
        assert_eq!(a.as_deref().map(str::len), Some(32));
        assert_eq!(hex(&[0x00, 0x9f, 0xff]), "009fff");
        let (m1, m2, m0) = (msg(b"x", Some(1)), msg(b"x", Some(2)), msg(b"x", None));
        let b = batch_key([&m1, &m0].into_iter());
        assert!(b.is_some());
        assert_eq!(b, batch_key([&m1, &m0].into_iter()));
        assert_ne!(b, batch_key([&m2, &m0].into_iter()));
        assert_ne!(b, batch_key([&m0, &m1].into_iter()));
        assert_eq!(batch_key([&m0, &m0].into_iter()), None);
    }

    #[test]
    fn frames() {
        let el = vec![b"{\"a\":1}".to_vec(), b"2".to_vec()];
        assert_eq!(&frame(BatchFormat::Json, &el)[..], b"[{\"a\":1},2]");
        assert_eq!(&frame(BatchFormat::Ndjson, &el)[..], b"{\"a\":1}\n2\n");
        let fixed = BodySpec::parse("{\"fixed\": true}").unwrap();
        assert_eq!(&fixed.single(&msg(b"x", None), None).unwrap()[..], b"{\"fixed\": true}");
        assert_eq!(fixed.element(&msg(b"x", None), None).unwrap(), b"{\"fixed\":true}");
        let raw = BodySpec::Raw;
        assert!(raw.element(&msg(b"not json", None), None).is_err());
        assert_eq!(raw.element(&msg(b"{ \"x\" :\n 1 }", None), None).unwrap(), b"{\"x\":1}");
    }
}
