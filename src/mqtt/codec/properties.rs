//! MQTT 5 properties on the wire, both ways: which identifiers exist, which packet types may
//! carry each, duplicate and value checks when decoding, and the length computation and writing
//! used by the encoder.

use bytes::{BufMut, Bytes, BytesMut};

use super::decode::Reader;
use super::encode::{binary_len, put_binary, put_str, put_vbi, str_len, vbi_len, MAX_VBI};
use super::error::{DecodeError, EncodeError};
use super::packet::{Properties, PublishProperties};

/// Which property list is being read: a packet type, or the will properties of a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PropCtx {
    Connect,
    Will,
    ConnAck,
    Publish,
    PubAck,
    PubRec,
    PubRel,
    PubComp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl PropCtx {
    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    fn name(self) -> &'static str {
        match self {
            PropCtx::Connect => "CONNECT",
            PropCtx::Will => "will properties",
            PropCtx::ConnAck => "CONNACK",
            PropCtx::Publish => "PUBLISH",
            PropCtx::PubAck => "PUBACK",
            PropCtx::PubRec => "PUBREC",
            PropCtx::PubRel => "PUBREL",
            PropCtx::PubComp => "PUBCOMP",
            PropCtx::Subscribe => "SUBSCRIBE",
            PropCtx::SubAck => "SUBACK",
            PropCtx::Unsubscribe => "UNSUBSCRIBE",
            PropCtx::UnsubAck => "UNSUBACK",
            PropCtx::Disconnect => "DISCONNECT",
            PropCtx::Auth => "AUTH",
        }
    }
}

const CONNECT: u16 = 1 << PropCtx::Connect as u16;
const WILL: u16 = 1 << PropCtx::Will as u16;
const CONNACK: u16 = 1 << PropCtx::ConnAck as u16;
const PUBLISH: u16 = 1 << PropCtx::Publish as u16;
const PUB_RESPONSES: u16 = 1 << PropCtx::PubAck as u16
    | 1 << PropCtx::PubRec as u16
    | 1 << PropCtx::PubRel as u16
    | 1 << PropCtx::PubComp as u16;
const SUBSCRIBE: u16 = 1 << PropCtx::Subscribe as u16;
const SUBACK: u16 = 1 << PropCtx::SubAck as u16;
const UNSUBACK: u16 = 1 << PropCtx::UnsubAck as u16;
const DISCONNECT: u16 = 1 << PropCtx::Disconnect as u16;
const AUTH: u16 = 1 << PropCtx::Auth as u16;
const ALL: u16 = u16::MAX;

/// The set of contexts (as a [`PropCtx::bit`] mask) that may carry property `id`, `None` for an
/// identifier MQTT 5 does not define.
fn allowed_in(id: u32) -> Option<u16> {
    Some(match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => PUBLISH | WILL,
        0x0B => PUBLISH | SUBSCRIBE,
        0x11 => CONNECT | CONNACK | DISCONNECT,
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => CONNACK,
        0x15 | 0x16 => CONNECT | CONNACK | AUTH,
        0x17 | 0x19 => CONNECT,
        0x18 => WILL,
        0x1C => CONNACK | DISCONNECT,
        0x1F => CONNACK | PUB_RESPONSES | SUBACK | UNSUBACK | DISCONNECT | AUTH,
        0x21 | 0x22 | 0x27 => CONNECT | CONNACK,
        0x23 => PUBLISH,
        0x26 => ALL,
        _ => return None,
    })
}

/// Reads a byte-valued boolean property (0 or 1).
fn read_flag(r: &mut Reader<'_>, id: u8) -> Result<u8, DecodeError> {
    match r.u8()? {
        v @ (0 | 1) => Ok(v),
        _ => Err(DecodeError::InvalidPropertyValue(id)),
    }
}

/// Reads a two-byte integer property that must not be zero.
fn read_nonzero_u16(r: &mut Reader<'_>, id: u8) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::InvalidPropertyValue(id)),
        v => Ok(v),
    }
}

/// Reads a property list (its variable byte integer length, then the properties) for `ctx`.
/// Rejects unknown identifiers, properties not allowed in `ctx`, duplicates of single-valued
/// properties and values the spec forbids.
/// At most `cap` user properties are kept (see [`super::decode::decode_capped`]).
pub(super) fn decode_properties(
    r: &mut Reader<'_>,
    ctx: PropCtx,
    cap: usize,
) -> Result<Properties, DecodeError> {
    let mut props = Properties::default();
    decode_properties_into(r, ctx, &mut props, cap)?;
    Ok(props)
}

/// [`decode_properties`] for a PUBLISH or publish acknowledgement: no allocation when the
/// list is empty (the usual case), one box otherwise.
pub(super) fn decode_publish_properties(
    r: &mut Reader<'_>,
    ctx: PropCtx,
    cap: usize,
) -> Result<PublishProperties, DecodeError> {
    if r.skip_zero() {
        return Ok(PublishProperties::none());
    }
    let mut props = Box::<Properties>::default();
    decode_properties_into(r, ctx, &mut props, cap)?;
    Ok(PublishProperties::from(props))
}

/// [`decode_properties`] into `props` (which must be empty), keeping at most `cap` user
/// properties: beyond that each is only stepped over.
fn decode_properties_into(
    r: &mut Reader<'_>,
    ctx: PropCtx,
    props: &mut Properties,
    cap: usize,
) -> Result<(), DecodeError> {
    let len = r.vbi()? as usize;
    if len == 0 {
        return Ok(());
    }
    let mut pr = Reader::new(r.take(len)?);
    let mut seen: u64 = 0;
    while !pr.is_empty() {
        let raw_id = pr.vbi()?;
        let mask = allowed_in(raw_id).ok_or(DecodeError::UnknownProperty(raw_id))?;
        // allowed_in only knows identifiers below 0x40, so this cannot truncate.
        let id = raw_id as u8;
        if mask & ctx.bit() == 0 {
            return Err(DecodeError::PropertyNotAllowed { id, packet: ctx.name() });
        }
        let repeatable = id == 0x26 || (id == 0x0B && ctx == PropCtx::Publish);
        if !repeatable {
            if seen & (1 << id) != 0 {
                return Err(DecodeError::DuplicateProperty(id));
            }
            seen |= 1 << id;
        }
        let p = &mut *props;
        match id {
            0x01 => p.payload_format_indicator = Some(read_flag(&mut pr, id)?),
            0x02 => p.message_expiry_interval = Some(pr.u32()?),
            0x03 => p.content_type = Some(pr.string()?.to_owned()),
            0x08 => {
                let topic = pr.string()?;
                if topic.is_empty() || has_wildcard(topic) {
                    return Err(DecodeError::InvalidPropertyValue(id));
                }
                p.response_topic = Some(topic.to_owned());
            }
            0x09 => p.correlation_data = Some(Bytes::copy_from_slice(pr.binary()?)),
            0x0B => match pr.vbi()? {
                0 => return Err(DecodeError::InvalidPropertyValue(id)),
                v => p.subscription_identifiers.push(v),
            },
            0x11 => p.session_expiry_interval = Some(pr.u32()?),
            0x12 => p.assigned_client_identifier = Some(pr.string()?.to_owned()),
            0x13 => p.server_keep_alive = Some(pr.u16()?),
            0x15 => p.authentication_method = Some(pr.string()?.to_owned()),
            0x16 => p.authentication_data = Some(Bytes::copy_from_slice(pr.binary()?)),
            0x17 => p.request_problem_information = Some(read_flag(&mut pr, id)?),
            0x18 => p.will_delay_interval = Some(pr.u32()?),
            0x19 => p.request_response_information = Some(read_flag(&mut pr, id)?),
            0x1A => p.response_information = Some(pr.string()?.to_owned()),
            0x1C => p.server_reference = Some(pr.string()?.to_owned()),
            0x1F => p.reason_string = Some(pr.string()?.to_owned()),
            0x21 => p.receive_maximum = Some(read_nonzero_u16(&mut pr, id)?),
            0x22 => p.topic_alias_maximum = Some(pr.u16()?),
            0x23 => p.topic_alias = Some(read_nonzero_u16(&mut pr, id)?),
            0x24 => p.maximum_qos = Some(read_flag(&mut pr, id)?),
            0x25 => p.retain_available = Some(read_flag(&mut pr, id)?),
            0x26 if p.user_properties.len() >= cap => {
                // Over the caller's limit: the packet will be refused, so neither copied nor
                // checked; only its length fields are followed.
                pr.binary()?;
                pr.binary()?;
            }
            0x26 => {
                let name = pr.string()?.to_owned();
                let value = pr.string()?.to_owned();
                p.user_properties.push((name, value));
            }
            0x27 => match pr.u32()? {
                0 => return Err(DecodeError::InvalidPropertyValue(id)),
                v => p.maximum_packet_size = Some(v),
            },
            0x28 => p.wildcard_subscription_available = Some(read_flag(&mut pr, id)?),
            0x29 => p.subscription_identifier_available = Some(read_flag(&mut pr, id)?),
            0x2A => p.shared_subscription_available = Some(read_flag(&mut pr, id)?),
            _ => return Err(DecodeError::UnknownProperty(raw_id)),
        }
    }
    Ok(())
}

/// True if a topic name holds a wildcard character.
pub(super) fn has_wildcard(topic: &str) -> bool {
    topic.bytes().any(|b| b == b'+' || b == b'#')
}

fn flag_ok(v: Option<u8>, what: &'static str) -> Result<(), EncodeError> {
    match v {
        Some(2..) => Err(EncodeError::InvalidProperty(what)),
        _ => Ok(()),
    }
}

fn nonzero<T: Default + PartialEq>(v: Option<T>, what: &'static str) -> Result<(), EncodeError> {
    match v {
        Some(x) if x == T::default() => Err(EncodeError::InvalidProperty(what)),
        _ => Ok(()),
    }
}

/// Sum of `1 + field length` over the properties that are set, where `field` computes the
/// encoded length of one value (validating it).
fn opt_len<T>(
    v: &Option<T>,
    f: impl FnOnce(&T) -> Result<usize, EncodeError>,
) -> Result<usize, EncodeError> {
    match v {
        Some(x) => Ok(1 + f(x)?),
        None => Ok(0),
    }
}

/// The encoded length of the property list (excluding its own length prefix), validating every
/// value: lengths, zero values the spec forbids, booleans above 1, subscription identifier range.
pub(super) fn properties_len(p: &Properties) -> Result<usize, EncodeError> {
    flag_ok(p.payload_format_indicator, "payload format indicator above 1")?;
    flag_ok(p.request_problem_information, "request problem information above 1")?;
    flag_ok(p.request_response_information, "request response information above 1")?;
    flag_ok(p.maximum_qos, "maximum QoS above 1")?;
    flag_ok(p.retain_available, "retain available above 1")?;
    flag_ok(p.wildcard_subscription_available, "wildcard subscription available above 1")?;
    flag_ok(p.subscription_identifier_available, "subscription identifier available above 1")?;
    flag_ok(p.shared_subscription_available, "shared subscription available above 1")?;
    nonzero(p.receive_maximum, "receive maximum 0")?;
    nonzero(p.topic_alias, "topic alias 0")?;
    nonzero(p.maximum_packet_size, "maximum packet size 0")?;
    if let Some(t) = &p.response_topic {
        if t.is_empty() || has_wildcard(t) {
            return Err(EncodeError::InvalidProperty("response topic empty or with wildcard"));
        }
    }

    let byte = |_: &u8| Ok(1);
    let two = |_: &u16| Ok(2);
    let four = |_: &u32| Ok(4);
    let mut n = 0;
    n += opt_len(&p.payload_format_indicator, byte)?;
    n += opt_len(&p.message_expiry_interval, four)?;
    n += opt_len(&p.content_type, |s| str_len(s, "content type"))?;
    n += opt_len(&p.response_topic, |s| str_len(s, "response topic"))?;
    n += opt_len(&p.correlation_data, |b| binary_len(b, "correlation data"))?;
    for &id in &p.subscription_identifiers {
        if id == 0 || id as usize > MAX_VBI {
            return Err(EncodeError::InvalidProperty("subscription identifier out of range"));
        }
        n += 1 + vbi_len(id as usize);
    }
    n += opt_len(&p.session_expiry_interval, four)?;
    n += opt_len(&p.assigned_client_identifier, |s| str_len(s, "assigned client identifier"))?;
    n += opt_len(&p.server_keep_alive, two)?;
    n += opt_len(&p.authentication_method, |s| str_len(s, "authentication method"))?;
    n += opt_len(&p.authentication_data, |b| binary_len(b, "authentication data"))?;
    n += opt_len(&p.request_problem_information, byte)?;
    n += opt_len(&p.will_delay_interval, four)?;
    n += opt_len(&p.request_response_information, byte)?;
    n += opt_len(&p.response_information, |s| str_len(s, "response information"))?;
    n += opt_len(&p.server_reference, |s| str_len(s, "server reference"))?;
    n += opt_len(&p.reason_string, |s| str_len(s, "reason string"))?;
    n += opt_len(&p.receive_maximum, two)?;
    n += opt_len(&p.topic_alias_maximum, two)?;
    n += opt_len(&p.topic_alias, two)?;
    n += opt_len(&p.maximum_qos, byte)?;
    n += opt_len(&p.retain_available, byte)?;
    for (k, v) in &p.user_properties {
        n += 1 + str_len(k, "user property name")? + str_len(v, "user property value")?;
    }
    n += opt_len(&p.maximum_packet_size, four)?;
    n += opt_len(&p.wildcard_subscription_available, byte)?;
    n += opt_len(&p.subscription_identifier_available, byte)?;
    n += opt_len(&p.shared_subscription_available, byte)?;
    if n > MAX_VBI {
        return Err(EncodeError::PacketTooLarge(n));
    }
    Ok(n)
}

/// Writes the property length `len` (as computed by [`properties_len`]) and the properties,
/// in identifier order.
pub(super) fn write_properties(p: &Properties, len: usize, buf: &mut BytesMut) {
    put_vbi(buf, len);
    if len == 0 {
        return;
    }
    fn u8_prop(buf: &mut BytesMut, id: u8, v: Option<u8>) {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u8(v);
        }
    }
    fn u16_prop(buf: &mut BytesMut, id: u8, v: Option<u16>) {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u16(v);
        }
    }
    fn u32_prop(buf: &mut BytesMut, id: u8, v: Option<u32>) {
        if let Some(v) = v {
            buf.put_u8(id);
            buf.put_u32(v);
        }
    }
    fn str_prop(buf: &mut BytesMut, id: u8, v: &Option<String>) {
        if let Some(v) = v {
            buf.put_u8(id);
            put_str(buf, v);
        }
    }
    fn bin_prop(buf: &mut BytesMut, id: u8, v: &Option<Bytes>) {
        if let Some(v) = v {
            buf.put_u8(id);
            put_binary(buf, v);
        }
    }
    u8_prop(buf, 0x01, p.payload_format_indicator);
    u32_prop(buf, 0x02, p.message_expiry_interval);
    str_prop(buf, 0x03, &p.content_type);
    str_prop(buf, 0x08, &p.response_topic);
    bin_prop(buf, 0x09, &p.correlation_data);
    for &id in &p.subscription_identifiers {
        buf.put_u8(0x0B);
        put_vbi(buf, id as usize);
    }
    u32_prop(buf, 0x11, p.session_expiry_interval);
    str_prop(buf, 0x12, &p.assigned_client_identifier);
    u16_prop(buf, 0x13, p.server_keep_alive);
    str_prop(buf, 0x15, &p.authentication_method);
    bin_prop(buf, 0x16, &p.authentication_data);
    u8_prop(buf, 0x17, p.request_problem_information);
    u32_prop(buf, 0x18, p.will_delay_interval);
    u8_prop(buf, 0x19, p.request_response_information);
    str_prop(buf, 0x1A, &p.response_information);
    str_prop(buf, 0x1C, &p.server_reference);
    str_prop(buf, 0x1F, &p.reason_string);
    u16_prop(buf, 0x21, p.receive_maximum);
    u16_prop(buf, 0x22, p.topic_alias_maximum);
    u16_prop(buf, 0x23, p.topic_alias);
    u8_prop(buf, 0x24, p.maximum_qos);
    u8_prop(buf, 0x25, p.retain_available);
    for (k, v) in &p.user_properties {
        buf.put_u8(0x26);
        put_str(buf, k);
        put_str(buf, v);
    }
    u32_prop(buf, 0x27, p.maximum_packet_size);
    u8_prop(buf, 0x28, p.wildcard_subscription_available);
    u8_prop(buf, 0x29, p.subscription_identifier_available);
    u8_prop(buf, 0x2A, p.shared_subscription_available);
}
