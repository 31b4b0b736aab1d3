//! Request bodies of HTTP targets: `raw`, the `json` envelope, a template, and batches of
//! them (a JSON array or NDJSON); and the `Idempotency-Key` of a message or a batch.
//!
//! Pure: no I/O.

use std::borrow::Cow;

use bytes::Bytes;
use minijinja::value::Value;
use sha2::{Digest, Sha256};

use super::config::BatchFormat;
use super::template::Template;
use crate::message::Message;
use crate::timefmt::WallClock;

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
            BodySpec::Json => {
                let mut out = Vec::with_capacity(envelope_capacity(msg));
                write_envelope(&mut out, msg, &mut WallClock::now());
                Ok(Bytes::from(out))
            }
            BodySpec::Template(Template::Static(text)) => Ok(Bytes::from(text.clone())),
            BodySpec::Template(t) => {
                let ctx = ctx.ok_or("no template context")?;
                t.render(ctx).map(|s| Bytes::from(s.into_owned())).map_err(|e| format!("body {e}"))
            }
        }
    }

    /// Appends the element of `msg` in a batch to `out`: one JSON document on one line.
    /// `raw` payloads and rendered templates must be JSON to be batched; on an error nothing
    /// is appended. `clock` converts receive times (one reading per batch).
    pub fn write_element(
        &self,
        out: &mut Vec<u8>,
        msg: &Message,
        ctx: Option<&Value>,
        clock: &mut WallClock,
    ) -> Result<(), String> {
        let value: serde_json::Value = match self {
            // Compact JSON: one line.
            BodySpec::Json => {
                write_envelope(out, msg, clock);
                return Ok(());
            }
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
        serde_json::to_writer(out, &value).map_err(|e| format!("cannot encode JSON: {e}"))
    }
}

/// A batch body as it fills: the elements written one after the other into one buffer,
/// framed as a JSON array or NDJSON, with no copy per element.
#[derive(Debug)]
pub struct BatchBody {
    format: BatchFormat,
    out: Vec<u8>,
    /// Elements in it.
    count: usize,
    /// Their bytes, without the framing (what `batch.max_bytes` bounds).
    element_bytes: usize,
    /// Receive times of the batch's messages are converted with one clock reading.
    clock: WallClock,
}

impl BatchBody {
    /// An empty batch, with room for about `capacity` bytes.
    pub fn new(format: BatchFormat, capacity: usize) -> Self {
        let mut out = Vec::with_capacity(capacity + 2);
        if format == BatchFormat::Json {
            out.push(b'[');
        }
        BatchBody { format, out, count: 0, element_bytes: 0, clock: WallClock::now() }
    }

    /// Appends `msg`'s element. `Ok(false)`, with nothing appended, when the batch already
    /// holds an element and this one would take it past `max_bytes`.
    pub fn push(
        &mut self,
        spec: &BodySpec,
        msg: &Message,
        ctx: Option<&Value>,
        max_bytes: usize,
    ) -> Result<bool, String> {
        let mark = self.out.len();
        if self.count > 0 && self.format == BatchFormat::Json {
            self.out.push(b',');
        }
        let start = self.out.len();
        if let Err(e) = spec.write_element(&mut self.out, msg, ctx, &mut self.clock) {
            self.out.truncate(mark);
            return Err(e);
        }
        let len = self.out.len() - start;
        if self.count > 0 && self.element_bytes + len > max_bytes {
            self.out.truncate(mark);
            return Ok(false);
        }
        if self.format == BatchFormat::Ndjson {
            self.out.push(b'\n');
        }
        self.count += 1;
        self.element_bytes += len;
        Ok(true)
    }

    /// Their bytes, without the framing.
    pub fn element_bytes(&self) -> usize {
        self.element_bytes
    }

    /// The finished body.
    pub fn finish(mut self) -> Bytes {
        if self.format == BatchFormat::Json {
            self.out.push(b']');
        }
        Bytes::from(self.out)
    }
}

/// About the size of `msg`'s envelope, to size its buffer.
fn envelope_capacity(msg: &Message) -> usize {
    256 + msg.topic.len() + msg.client_id.len() + msg.payload.len() * 4 / 3
}

/// Appends the `json` envelope of a message to `out` as compact JSON (one line): topic,
/// payload (the JSON value when the payload is JSON, else base64, as `payload_encoding`
/// says), QoS, retain, client id, user name, receive time and the MQTT 5 content type and
/// user properties.
///
/// Written by hand rather than through serde: this runs for every message of a batch, and
/// serde's string escaping and a payload tree were a quarter of mqgate's CPU in the batched
/// bench. A one-line JSON payload is copied as it is (validated, not re-encoded); JSON over
/// several lines is re-encoded compact, so an NDJSON batch stays one line per message.
pub fn write_envelope(out: &mut Vec<u8>, msg: &Message, clock: &mut WallClock) {
    let p = &msg.payload[..];
    out.extend_from_slice(b"{\"topic\":");
    json_str(out, &msg.topic);
    out.extend_from_slice(b",\"payload\":");
    if !embed_json(out, p) {
        out.push(b'"');
        base64_into(out, p);
        out.extend_from_slice(b"\",\"payload_encoding\":\"base64\"");
    }
    out.extend_from_slice(b",\"qos\":");
    out.push(b'0' + msg.qos as u8);
    out.extend_from_slice(if msg.retain { b",\"retain\":true" } else { b",\"retain\":false" });
    out.extend_from_slice(b",\"client_id\":");
    json_str(out, &msg.client_id);
    out.extend_from_slice(b",\"username\":");
    json_opt(out, msg.username.as_deref());
    out.extend_from_slice(b",\"received_at\":\"");
    out.extend_from_slice(clock.rfc3339(msg.received).as_bytes());
    out.extend_from_slice(b"\",\"content_type\":");
    json_opt(out, msg.properties.content_type.as_deref());
    out.extend_from_slice(b",\"user_properties\":[");
    for (i, (k, v)) in msg.properties.user_properties.iter().enumerate() {
        out.extend_from_slice(if i == 0 { b"[" } else { b",[" });
        json_str(out, k);
        out.push(b',');
        json_str(out, v);
        out.push(b']');
    }
    out.extend_from_slice(b"]}");
}

/// Appends payload `p` as a JSON value followed by `"payload_encoding":"json"` and returns
/// true when `p` is JSON; appends nothing and returns false otherwise.
fn embed_json(out: &mut Vec<u8>, p: &[u8]) -> bool {
    // A JSON text starts, after white space, with one of these: anything else (binary
    // telemetry, say) is not JSON, and is known so without a parse or a scan.
    let first = p.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'));
    if !first
        .is_some_and(|b| matches!(b, b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n'))
    {
        return false;
    }
    let one_line = !p.contains(&b'\n') && !p.contains(&b'\r');
    let embedded = if one_line {
        match serde_json::from_slice::<&serde_json::value::RawValue>(p) {
            Ok(raw) => {
                out.extend_from_slice(raw.get().as_bytes());
                true
            }
            Err(_) => false,
        }
    } else {
        match serde_json::from_slice::<serde_json::Value>(p) {
            // A `Value` always encodes; `to_writer` writes it compact.
            Ok(v) => serde_json::to_writer(&mut *out, &v).is_ok(),
            Err(_) => false,
        }
    };
    if embedded {
        out.extend_from_slice(b",\"payload_encoding\":\"json\"");
    }
    embedded
}

/// `p` in standard base64 with padding (RFC 4648 §4), appended to `out`. Our own because the
/// base64 crate's general engine took twice the instructions for a short payload.
fn base64_into(out: &mut Vec<u8>, p: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sym = |n: u32, shift: u32| ALPHABET[(n >> shift & 63) as usize];
    let at = out.len();
    out.resize(at + p.len().div_ceil(3) * 4, b'=');
    let mut groups = p.chunks_exact(3);
    for (src, dst) in (&mut groups).zip(out[at..].chunks_exact_mut(4)) {
        let n = u32::from(src[0]) << 16 | u32::from(src[1]) << 8 | u32::from(src[2]);
        dst.copy_from_slice(&[sym(n, 18), sym(n, 12), sym(n, 6), sym(n, 0)]);
    }
    let tail = groups.remainder();
    if !tail.is_empty() {
        let n = u32::from(tail[0]) << 16 | tail.get(1).map_or(0, |&b| u32::from(b) << 8);
        let end = out.len();
        out[end - 4] = sym(n, 18);
        out[end - 3] = sym(n, 12);
        if tail.len() == 2 {
            out[end - 2] = sym(n, 6);
        }
    }
}

/// `s` as a JSON string (RFC 8259 escapes), appended to `out`.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Most topics and client ids need no escape: one check over 16-byte chunks (no early
    // exit, so the compiler vectorises it), then one copy.
    let needs_escape = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    let plain = bytes.chunks(16).all(|c| !c.iter().fold(false, |acc, &b| acc | needs_escape(b)));
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[from..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        } else {
            out.extend_from_slice(esc);
        }
        from = i + 1;
    }
    out.extend_from_slice(&bytes[from..]);
    out.push(b'"');
}

/// A JSON string, or `null`.
fn json_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// The envelope of `msg` as a JSON value.
#[cfg(test)]
fn envelope(msg: &Message) -> serde_json::Value {
    serde_json::from_slice(&envelope_bytes(msg)).unwrap_or_default()
}

/// The envelope of `msg` as bytes.
#[cfg(test)]
fn envelope_bytes(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    write_envelope(&mut out, msg, &mut WallClock::now());
    out
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
    use crate::mqtt::codec::{PublishProperties, QoS};
    use std::time::Instant;

    fn msg(payload: &[u8], packet_id: Option<u16>) -> Message {
        Message {
            charge: Default::default(),
            topic: "s/a".into(),
            payload: Bytes::copy_from_slice(payload),
            qos: QoS::AtLeastOnce,
            retain: true,
            client_id: Arc::from("dev"),
            username: Some(Arc::from("u")),
            properties: PublishProperties::none(),
            received: Instant::now(),
            packet_id,
        }
    }

    #[test]
    fn strings_are_escaped_like_serde_json() {
        for text in [
            "plain",
            "q\"uote\\back",
            "line\nbreak\r\ttab",
            "ctl\u{1}\u{1f}",
            "ünïcødé ✓",
            "",
            "0123456789abcdefg\"h\u{7}",
        ] {
            let mut out = Vec::new();
            json_str(&mut out, text);
            let back: String = serde_json::from_slice(&out).expect("valid JSON string");
            assert_eq!(back, text);
            assert!(!out.contains(&b'\n'));
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
            let bytes = envelope_bytes(&msg(payload, None));
            assert!(!bytes.contains(&b'\n') && !bytes.contains(&b'\r'), "{payload:?}");
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("valid JSON");
            assert_eq!(v["payload"], expect, "{payload:?}");
            assert_eq!(v["payload_encoding"], "json");
        }
        let v: serde_json::Value =
            serde_json::from_slice(&envelope_bytes(&msg(b"{not json", None))).expect("valid JSON");
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
    fn batches_are_framed_and_bounded() {
        let spec = BodySpec::parse("{\"fixed\": true}").unwrap();
        let m = msg(b"x", None);
        for (format, expect) in [
            (BatchFormat::Json, &b"[{\"fixed\":true},{\"fixed\":true}]"[..]),
            (BatchFormat::Ndjson, &b"{\"fixed\":true}\n{\"fixed\":true}\n"[..]),
        ] {
            let mut b = BatchBody::new(format, 64);
            // 14 bytes an element: the third would pass 40.
            assert_eq!(b.push(&spec, &m, None, 40), Ok(true));
            assert_eq!(b.push(&spec, &m, None, 40), Ok(true));
            assert_eq!(b.push(&spec, &m, None, 40), Ok(false));
            assert_eq!(b.element_bytes(), 28);
            assert_eq!(&b.finish()[..], expect);
        }
        // The first element always goes in, whatever its size.
        let mut b = BatchBody::new(BatchFormat::Json, 0);
        assert_eq!(b.push(&spec, &m, None, 1), Ok(true));
        assert_eq!(&b.finish()[..], b"[{\"fixed\":true}]");
        // A failing element leaves the batch as it was.
        let raw = BodySpec::Raw;
        let mut b = BatchBody::new(BatchFormat::Json, 0);
        assert_eq!(b.push(&raw, &msg(b"{ \"x\" :\n 1 }", None), None, 100), Ok(true));
        assert!(b.push(&raw, &msg(b"not json", None), None, 100).is_err());
        assert_eq!(b.push(&raw, &msg(b"[2]", None), None, 100), Ok(true));
        assert_eq!(&b.finish()[..], b"[{\"x\":1},[2]]");
        assert_eq!(&spec.single(&m, None).unwrap()[..], b"{\"fixed\": true}");
    }

    #[test]
    fn base64_matches_the_base64_crate() {
        use base64::Engine;
        let data: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for len in (0..70).chain([255, 256, 257, 512]) {
            let mut out = b"x".to_vec();
            base64_into(&mut out, &data[..len]);
            let expect = base64::engine::general_purpose::STANDARD.encode(&data[..len]);
            assert_eq!(&out[1..], expect.as_bytes(), "length {len}");
        }
    }

    #[test]
    fn binary_payloads_skip_the_json_parse_but_json_ones_do_not() {
        for (payload, encoding) in [
            (&b"\x00\x01{}"[..], "base64"),
            (&b"  \n{\"a\":1}"[..], "json"),
            (&b"nope"[..], "base64"),
            (&b"null"[..], "json"),
            (&b"-1.5e3"[..], "json"),
            (&b""[..], "base64"),
        ] {
            let e = envelope(&msg(payload, None));
            assert_eq!(e["payload_encoding"], encoding, "{payload:?}");
        }
    }
}
