//! Encoding: one [`Packet`] to bytes appended to a `BytesMut`, for MQTT 3.1.1 or 5.0.
//!
//! Owns the wire primitives (variable byte integers, strings, binary data) and the layout of
//! each packet type. Works in two passes: the first computes every length and validates every
//! value (so an error leaves the buffer untouched), the second writes into a buffer reserved
//! once. For 3.1.1 properties and other MQTT 5-only fields are ignored; CONNACK and SUBACK
//! codes are translated to 3.1.1 return codes.

use bytes::{BufMut, BytesMut};

use super::error::EncodeError;
use super::packet::{
    ConnAck, Connect, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode,
    Subscribe, SubscriptionOptions,
};
use super::properties::{properties_len, write_properties};

/// The largest value a variable byte integer can hold (and so the largest remaining length).
pub(super) const MAX_VBI: usize = 268_435_455;

/// Bytes needed to encode `v` (at most [`MAX_VBI`]) as a variable byte integer.
pub(super) fn vbi_len(v: usize) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Writes `v` (at most [`MAX_VBI`]) as a variable byte integer.
pub(super) fn put_vbi(buf: &mut BytesMut, mut v: usize) {
    loop {
        let byte = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            buf.put_u8(byte);
            return;
        }
        buf.put_u8(byte | 0x80);
    }
}

/// Encoded length of a UTF-8 string field, validating it (at most 65535 bytes, no U+0000).
pub(super) fn str_len(s: &str, field: &'static str) -> Result<usize, EncodeError> {
    if s.as_bytes().contains(&0) {
        return Err(EncodeError::Invalid("U+0000 in a string"));
    }
    binary_len(s.as_bytes(), field)
}

/// Encoded length of a binary data field, validating it (at most 65535 bytes).
pub(super) fn binary_len(b: &[u8], field: &'static str) -> Result<usize, EncodeError> {
    if b.len() > usize::from(u16::MAX) {
        return Err(EncodeError::FieldTooLong { field, len: b.len() });
    }
    Ok(2 + b.len())
}

/// Writes a string already validated by [`str_len`].
pub(super) fn put_str(buf: &mut BytesMut, s: &str) {
    put_binary(buf, s.as_bytes());
}

/// Writes binary data already validated by [`binary_len`].
pub(super) fn put_binary(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u16(b.len() as u16);
    buf.put_slice(b);
}

/// Encoded length of a property list with its length prefix; `(total, list length)`.
fn props_field(p: &Properties) -> Result<(usize, usize), EncodeError> {
    let len = properties_len(p)?;
    Ok((vbi_len(len) + len, len))
}

fn nonzero_id(id: u16, packet: &'static str) -> Result<(), EncodeError> {
    if id == 0 {
        Err(EncodeError::InvalidPacketId(packet))
    } else {
        Ok(())
    }
}

/// What the first pass found: the first byte, the remaining length, and the property list
/// lengths the second pass writes (`props`, and `will_props` for CONNECT).
struct Plan {
    first: u8,
    remaining: usize,
    props: usize,
    will_props: usize,
}

impl Plan {
    fn new(first: u8, remaining: usize) -> Self {
        Plan { first, remaining, props: 0, will_props: 0 }
    }
}

/// Appends the encoding of `packet` for `version` to `buf`; returns the number of bytes
/// written.
///
/// A CONNECT is encoded for its own `protocol` field (which decides the protocol level on the
/// wire), every other packet for `version`. Fails, leaving `buf` as it was, if a value cannot be
/// encoded: a string or binary field over 65535 bytes, a remaining length over 268_435_455, a
/// missing (zero) or unexpected packet identifier, DUP at QoS 0, a topic name with a wildcard or
/// empty without a topic alias, a forbidden property value, or something 3.1.1 cannot express.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let v5 = match packet {
        Packet::Connect(c) => c.protocol == ProtocolVersion::V5,
        _ => version == ProtocolVersion::V5,
    };
    let plan = plan(packet, v5)?;
    if plan.remaining > MAX_VBI {
        return Err(EncodeError::PacketTooLarge(plan.remaining));
    }
    let total = 1 + vbi_len(plan.remaining) + plan.remaining;
    buf.reserve(total);
    buf.put_u8(plan.first);
    put_vbi(buf, plan.remaining);
    write_body(packet, v5, &plan, buf);
    Ok(total)
}

/// First pass: validates `packet` and computes its lengths.
fn plan(packet: &Packet, v5: bool) -> Result<Plan, EncodeError> {
    Ok(match packet {
        Packet::Connect(c) => plan_connect(c, v5)?,
        Packet::ConnAck(c) => {
            let code = connack_code(c, v5)?;
            if c.session_present && code != 0 {
                return Err(EncodeError::Invalid("CONNACK session present with a failure"));
            }
            plan_with_props(0x20, 2, &c.properties, v5)?
        }
        Packet::Publish(p) => plan_publish(p, v5)?,
        Packet::PubAck(r) => plan_pub_response(0x40, r, v5)?,
        Packet::PubRec(r) => plan_pub_response(0x50, r, v5)?,
        Packet::PubRel(r) => plan_pub_response(0x62, r, v5)?,
        Packet::PubComp(r) => plan_pub_response(0x70, r, v5)?,
        Packet::Subscribe(s) => plan_subscribe(s, v5)?,
        Packet::SubAck(s) => {
            nonzero_id(s.packet_id, "SUBACK")?;
            if s.codes.is_empty() {
                return Err(EncodeError::Invalid("SUBACK without a return code"));
            }
            for &c in &s.codes {
                suback_code(c, v5)?;
            }
            plan_with_props(0x90, 2 + s.codes.len(), &s.properties, v5)?
        }
        Packet::Unsubscribe(u) => {
            nonzero_id(u.packet_id, "UNSUBSCRIBE")?;
            if u.filters.is_empty() {
                return Err(EncodeError::Invalid("UNSUBSCRIBE without a topic filter"));
            }
            let mut n = 2;
            for f in &u.filters {
                n += str_len(f, "topic filter")?;
            }
            plan_with_props(0xA2, n, &u.properties, v5)?
        }
        Packet::UnsubAck(u) => {
            nonzero_id(u.packet_id, "UNSUBACK")?;
            if !v5 {
                Plan::new(0xB0, 2)
            } else if u.codes.is_empty() {
                return Err(EncodeError::Invalid("UNSUBACK without a reason code"));
            } else {
                plan_with_props(0xB0, 2 + u.codes.len(), &u.properties, v5)?
            }
        }
        Packet::PingReq => Plan::new(0xC0, 0),
        Packet::PingResp => Plan::new(0xD0, 0),
        Packet::Disconnect(d) => plan_short_form(0xE0, d.code, &d.properties, v5, 1)?,
        Packet::Auth(a) => {
            if !v5 {
                return Err(EncodeError::Invalid("AUTH does not exist in MQTT 3.1.1"));
            }
            plan_short_form(0xF0, a.code, &a.properties, v5, 2)?
        }
    })
}

/// A packet of `fixed` bytes plus its property list (v5; ignored for 3.1.1).
fn plan_with_props(
    first: u8,
    fixed: usize,
    props: &Properties,
    v5: bool,
) -> Result<Plan, EncodeError> {
    if !v5 {
        return Ok(Plan::new(first, fixed));
    }
    let (field, len) = props_field(props)?;
    Ok(Plan { props: len, ..Plan::new(first, fixed + field) })
}

/// DISCONNECT and AUTH: nothing at all for success without properties, otherwise the code and
/// (if any, or if `min_with_code` is 2) the properties. Always empty for 3.1.1.
fn plan_short_form(
    first: u8,
    code: ReasonCode,
    props: &Properties,
    v5: bool,
    min_with_code: usize,
) -> Result<Plan, EncodeError> {
    if !v5 {
        return Ok(Plan::new(first, 0));
    }
    let (field, len) = props_field(props)?;
    let remaining = match (code == ReasonCode::SUCCESS, len) {
        (true, 0) => 0,
        (false, 0) => min_with_code,
        _ => 1 + field,
    };
    Ok(Plan { props: len, ..Plan::new(first, remaining) })
}

/// Encoded length of a PUBLISH or will topic name, validating it (non-empty unless `alias`,
/// no wildcard, no U+0000, at most 65535 bytes) in one pass.
fn check_topic(topic: &str, alias: bool) -> Result<usize, EncodeError> {
    if topic.is_empty() && !alias {
        return Err(EncodeError::InvalidTopicName("empty topic name without a topic alias"));
    }
    match topic.bytes().find(|&b| matches!(b, 0 | b'+' | b'#')) {
        Some(0) => Err(EncodeError::Invalid("U+0000 in a string")),
        Some(_) => Err(EncodeError::InvalidTopicName("wildcard in a topic name")),
        None => binary_len(topic.as_bytes(), "topic name"),
    }
}

fn plan_connect(c: &Connect, v5: bool) -> Result<Plan, EncodeError> {
    let mut plan = Plan::new(0x10, 10 + str_len(&c.client_id, "client identifier")?);
    if v5 {
        let p = &c.properties;
        if p.authentication_data.is_some() && p.authentication_method.is_none() {
            return Err(EncodeError::InvalidProperty(
                "authentication data without authentication method",
            ));
        }
        let (field, len) = props_field(p)?;
        plan.remaining += field;
        plan.props = len;
    } else if c.password.is_some() && c.username.is_none() {
        return Err(EncodeError::Invalid("MQTT 3.1.1 password without user name"));
    }
    if let Some(w) = &c.will {
        plan.remaining += check_topic(&w.topic, false)? + binary_len(&w.payload, "will payload")?;
        if v5 {
            let (field, len) = props_field(&w.properties)?;
            plan.remaining += field;
            plan.will_props = len;
        }
    }
    if let Some(u) = &c.username {
        plan.remaining += str_len(u, "user name")?;
    }
    if let Some(p) = &c.password {
        plan.remaining += binary_len(p, "password")?;
    }
    Ok(plan)
}

fn plan_publish(p: &Publish, v5: bool) -> Result<Plan, EncodeError> {
    let mut n = check_topic(&p.topic, v5 && p.properties.topic_alias.is_some())?;
    match p.qos {
        QoS::AtMostOnce if p.packet_id != 0 => {
            return Err(EncodeError::InvalidPacketId("QoS 0 PUBLISH with a packet identifier"))
        }
        QoS::AtMostOnce if p.dup => return Err(EncodeError::Invalid("DUP on a QoS 0 PUBLISH")),
        QoS::AtMostOnce => {}
        _ => {
            nonzero_id(p.packet_id, "PUBLISH")?;
            n += 2;
        }
    }
    n = n.saturating_add(p.payload.len());
    let first = 0x30 | (u8::from(p.dup) << 3) | ((p.qos as u8) << 1) | u8::from(p.retain);
    plan_with_props(first, n, &p.properties, v5)
}

fn plan_pub_response(first: u8, r: &PubResponse, v5: bool) -> Result<Plan, EncodeError> {
    nonzero_id(r.packet_id, "publish acknowledgement")?;
    if !v5 {
        return Ok(Plan::new(first, 2));
    }
    let (field, len) = props_field(&r.properties)?;
    let remaining = match (r.code == ReasonCode::SUCCESS, len) {
        (true, 0) => 2,
        (false, 0) => 3,
        _ => 3 + field,
    };
    Ok(Plan { props: len, ..Plan::new(first, remaining) })
}

fn plan_subscribe(s: &Subscribe, v5: bool) -> Result<Plan, EncodeError> {
    nonzero_id(s.packet_id, "SUBSCRIBE")?;
    if s.filters.is_empty() {
        return Err(EncodeError::Invalid("SUBSCRIBE without a topic filter"));
    }
    let mut n = 2;
    for f in &s.filters {
        n += str_len(&f.filter, "topic filter")? + 1;
    }
    plan_with_props(0x82, n, &s.properties, v5)
}

/// The CONNACK code byte: the reason code for v5, the translated return code for 3.1.1.
fn connack_code(c: &ConnAck, v5: bool) -> Result<u8, EncodeError> {
    if v5 {
        return Ok(c.code.0);
    }
    Ok(match c.code.0 {
        0x00 => 0,
        0x84 => 1,
        0x85 => 2,
        0x86 => 4,
        0x87 | 0x8A => 5,
        0x80.. => 3,
        _ => return Err(EncodeError::Invalid("CONNACK code not representable in 3.1.1")),
    })
}

/// A SUBACK code byte: as is for v5; 0, 1, 2 or 0x80 (any failure) for 3.1.1.
fn suback_code(c: ReasonCode, v5: bool) -> Result<u8, EncodeError> {
    match (v5, c.0) {
        (true, c) | (false, c @ 0..=2) => Ok(c),
        (false, 0x80..) => Ok(0x80),
        (false, _) => Err(EncodeError::Invalid("SUBACK code not representable in 3.1.1")),
    }
}

fn options_byte(o: &SubscriptionOptions, v5: bool) -> u8 {
    let qos = o.qos as u8;
    if !v5 {
        return qos;
    }
    qos | (u8::from(o.no_local) << 2)
        | (u8::from(o.retain_as_published) << 3)
        | ((o.retain_handling as u8) << 4)
}

/// Second pass: writes the body of a packet `plan` was computed (and validated) for.
fn write_body(packet: &Packet, v5: bool, plan: &Plan, buf: &mut BytesMut) {
    match packet {
        Packet::Connect(c) => write_connect(c, v5, plan, buf),
        Packet::ConnAck(c) => {
            buf.put_u8(u8::from(c.session_present));
            // Validated by the first pass.
            buf.put_u8(connack_code(c, v5).unwrap_or(0x80));
            if v5 {
                write_properties(&c.properties, plan.props, buf);
            }
        }
        Packet::Publish(p) => {
            put_str(buf, &p.topic);
            if p.qos != QoS::AtMostOnce {
                buf.put_u16(p.packet_id);
            }
            if v5 {
                write_properties(&p.properties, plan.props, buf);
            }
            buf.put_slice(&p.payload);
        }
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            buf.put_u16(r.packet_id);
            if plan.remaining > 2 {
                buf.put_u8(r.code.0);
            }
            if plan.remaining > 3 {
                write_properties(&r.properties, plan.props, buf);
            }
        }
        Packet::Subscribe(s) => {
            buf.put_u16(s.packet_id);
            if v5 {
                write_properties(&s.properties, plan.props, buf);
            }
            for f in &s.filters {
                put_str(buf, &f.filter);
                buf.put_u8(options_byte(&f.options, v5));
            }
        }
        Packet::SubAck(s) => {
            write_ack_head(buf, s.packet_id, &s.properties, v5, plan);
            for &c in &s.codes {
                buf.put_u8(suback_code(c, v5).unwrap_or(0x80));
            }
        }
        Packet::Unsubscribe(u) => {
            buf.put_u16(u.packet_id);
            if v5 {
                write_properties(&u.properties, plan.props, buf);
            }
            for f in &u.filters {
                put_str(buf, f);
            }
        }
        Packet::UnsubAck(u) => {
            write_ack_head(buf, u.packet_id, &u.properties, v5, plan);
            if v5 {
                for &c in &u.codes {
                    buf.put_u8(c.0);
                }
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => write_short_form(buf, d.code, &d.properties, plan),
        Packet::Auth(a) => write_short_form(buf, a.code, &a.properties, plan),
    }
}

fn write_ack_head(buf: &mut BytesMut, packet_id: u16, props: &Properties, v5: bool, plan: &Plan) {
    buf.put_u16(packet_id);
    if v5 {
        write_properties(props, plan.props, buf);
    }
}

fn write_short_form(buf: &mut BytesMut, code: ReasonCode, props: &Properties, plan: &Plan) {
    if plan.remaining > 0 {
        buf.put_u8(code.0);
    }
    if plan.remaining > 1 {
        write_properties(props, plan.props, buf);
    }
}

fn write_connect(c: &Connect, v5: bool, plan: &Plan, buf: &mut BytesMut) {
    put_str(buf, "MQTT");
    buf.put_u8(if v5 { 5 } else { 4 });
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0x04 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
    }
    flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
    buf.put_u8(flags);
    buf.put_u16(c.keep_alive);
    if v5 {
        write_properties(&c.properties, plan.props, buf);
    }
    put_str(buf, &c.client_id);
    if let Some(w) = &c.will {
        if v5 {
            write_properties(&w.properties, plan.will_props, buf);
        }
        put_str(buf, &w.topic);
        put_binary(buf, &w.payload);
    }
    if let Some(u) = &c.username {
        put_str(buf, u);
    }
    if let Some(p) = &c.password {
        put_binary(buf, p);
    }
}
