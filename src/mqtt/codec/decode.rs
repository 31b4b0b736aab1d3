//! Decoding: bytes at the front of a `BytesMut` to one [`Packet`], validating strictly.
//!
//! Owns the fixed header (packet type, flags, remaining length, maximum packet size), the
//! bounds-checked [`Reader`] every field goes through, and the variable header and payload of
//! each packet type for both MQTT 3.1.1 and 5.0. Properties are read by `properties.rs`.
//! Never panics and never allocates from a length before checking it against the bytes present.

use bytes::{Buf, Bytes, BytesMut};

use super::error::DecodeError;
use super::packet::{
    Auth, ConnAck, Connect, Disconnect, LastWill, Packet, ProtocolVersion, PubResponse, Publish,
    PublishProperties, QoS, ReasonCode, RetainHandling, SubAck, Subscribe, SubscribeFilter,
    SubscriptionOptions, UnsubAck, Unsubscribe,
};
use super::properties::{decode_properties, decode_publish_properties, PropCtx};

/// Reason codes MQTT 5 allows in CONNACK.
pub(super) const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
/// Reason codes MQTT 5 allows in PUBACK and PUBREC.
pub(super) const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
/// Reason codes MQTT 5 allows in PUBREL and PUBCOMP.
pub(super) const PUBREL_CODES: &[u8] = &[0x00, 0x92];
/// Reason codes MQTT 5 allows in SUBACK.
pub(super) const SUBACK_CODES: &[u8] =
    &[0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
/// Reason codes MQTT 5 allows in UNSUBACK.
pub(super) const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
/// Reason codes MQTT 5 allows in DISCONNECT.
pub(super) const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
/// Reason codes MQTT 5 allows in AUTH.
pub(super) const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

const TRUNCATED: DecodeError = DecodeError::Malformed("field runs past the end of the packet");

/// A bounds-checked cursor over the body of one packet (or one property list).
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// True when every byte has been read.
    pub(super) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// The next `n` bytes.
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(TRUNCATED)?;
        let bytes = self.buf.get(self.pos..end).ok_or(TRUNCATED)?;
        self.pos = end;
        Ok(bytes)
    }

    /// Everything not read yet.
    fn rest(&mut self) -> &'a [u8] {
        let bytes = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        bytes
    }

    /// Consumes the next byte if it is 0 (an empty property list's length); true if it did.
    pub(super) fn skip_zero(&mut self) -> bool {
        let zero = self.buf.get(self.pos) == Some(&0);
        self.pos += usize::from(zero);
        zero
    }

    /// One byte.
    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        let b = *self.buf.get(self.pos).ok_or(TRUNCATED)?;
        self.pos += 1;
        Ok(b)
    }

    /// A big-endian two-byte integer.
    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A big-endian four-byte integer.
    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A variable byte integer (at most four bytes).
    pub(super) fn vbi(&mut self) -> Result<u32, DecodeError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let (v, n) = parse_vbi(rest)?.ok_or(TRUNCATED)?;
        self.pos += n;
        Ok(v)
    }

    /// Binary data: a two-byte length, then that many bytes.
    pub(super) fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A UTF-8 encoded string: valid UTF-8 without U+0000.
    pub(super) fn string(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.binary()?;
        if bytes.contains(&0) {
            return Err(DecodeError::Malformed("U+0000 in a UTF-8 string"));
        }
        std::str::from_utf8(bytes).map_err(|_| DecodeError::Malformed("invalid UTF-8 in a string"))
    }

    /// A topic name (PUBLISH or will): a UTF-8 string without U+0000 and without wildcards,
    /// checked in one pass over the bytes. May be empty.
    fn topic_name(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.binary()?;
        match bytes.iter().find(|&&b| matches!(b, 0 | b'+' | b'#')) {
            Some(0) => Err(DecodeError::Malformed("U+0000 in a UTF-8 string")),
            Some(_) => Err(DecodeError::TopicNameInvalid("wildcard in a topic name")),
            None => std::str::from_utf8(bytes)
                .map_err(|_| DecodeError::Malformed("invalid UTF-8 in a string")),
        }
    }

    /// A non-zero packet identifier.
    fn packet_id(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ProtocolError("packet identifier 0")),
            id => Ok(id),
        }
    }

    /// Fails unless the whole body has been consumed.
    fn finish(&self) -> Result<(), DecodeError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed("trailing bytes after the packet's fields"))
        }
    }
}

/// Parses a variable byte integer from the front of `bytes`: `Ok(None)` if it is not complete
/// yet, an error if it would take more than four bytes. Non-minimal encodings are accepted.
pub(super) fn parse_vbi(bytes: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for (i, &b) in bytes.iter().take(4).enumerate() {
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if bytes.len() >= 4 {
        Err(DecodeError::Malformed("variable byte integer longer than four bytes"))
    } else {
        Ok(None)
    }
}

/// Checks the first byte of a packet: its type is known (for `version`), its flags are the
/// fixed ones for that type (PUBLISH: QoS not 3, no DUP at QoS 0), and it is a CONNECT if
/// no CONNECT has been seen yet.
fn check_first_byte(first: u8, version: Option<ProtocolVersion>) -> Result<(), DecodeError> {
    let (ptype, flags) = (first >> 4, first & 0x0F);
    if version.is_none() && ptype != 1 {
        return Err(DecodeError::ProtocolError("first packet must be CONNECT"));
    }
    match ptype {
        0 => Err(DecodeError::Malformed("reserved packet type 0")),
        3 => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                Err(DecodeError::Malformed("PUBLISH with QoS 3"))
            } else if qos == 0 && flags & 0x08 != 0 {
                Err(DecodeError::Malformed("PUBLISH with DUP set at QoS 0"))
            } else {
                Ok(())
            }
        }
        6 | 8 | 10 if flags != 0x02 => {
            Err(DecodeError::Malformed("fixed header flags must be 0010"))
        }
        6 | 8 | 10 => Ok(()),
        15 if version == Some(ProtocolVersion::V311) => {
            Err(DecodeError::Malformed("packet type 15 (AUTH) in MQTT 3.1.1"))
        }
        _ if flags != 0 => Err(DecodeError::Malformed("fixed header flags must be 0000")),
        _ => Ok(()),
    }
}

/// Decodes one packet from the front of `buf` if a whole one is there, consuming its bytes.
///
/// `Ok(None)` means more bytes are needed (`buf` is untouched). `version` is `None` before the
/// CONNECT: then only a CONNECT is accepted, parsed per its own protocol level; after it, any
/// packet is decoded for that version (a second CONNECT still per its own level, so the session
/// can answer it). The whole packet may not exceed `max_packet_size` bytes, which is checked as
/// soon as the fixed header is complete. A PUBLISH payload is split from `buf` without copying.
/// After an error the contents of `buf` are unspecified: the connection must be closed.
pub fn decode(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    decode_capped(buf, version, max_packet_size, usize::MAX)
}

/// [`decode`] keeping at most `max_user_properties + 1` user properties of any property list:
/// the rest of a longer list is stepped over (its other properties still decoded and checked),
/// its user properties neither validated nor copied. The caller sees one more than its limit and
/// refuses the packet; a PUBLISH carrying thousands of them costs a length check each instead
/// of two allocations and a UTF-8 check (`mqtt.max_user_properties`).
pub fn decode_capped(
    buf: &mut BytesMut,
    version: Option<ProtocolVersion>,
    max_packet_size: usize,
    max_user_properties: usize,
) -> Result<Option<Packet>, DecodeError> {
    let cap = max_user_properties.saturating_add(1);
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(first, version)?;
    let Some((remaining, len_bytes)) = parse_vbi(&buf[1..])? else {
        return Ok(None);
    };
    let remaining = remaining as usize;
    let header = 1 + len_bytes;
    let total = header + remaining;
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge { size: total, max: max_packet_size });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let v5 = version == Some(ProtocolVersion::V5);
    let body = &buf[header..total];
    let packet = match first >> 4 {
        1 => Packet::Connect(Box::new(decode_connect(body, cap)?)),
        2 => Packet::ConnAck(Box::new(decode_connack(body, v5, cap)?)),
        3 => return decode_publish(buf, first, header, remaining, v5, cap).map(Some),
        4 => Packet::PubAck(decode_pub_response(body, v5, PropCtx::PubAck, PUBACK_CODES, cap)?),
        5 => Packet::PubRec(decode_pub_response(body, v5, PropCtx::PubRec, PUBACK_CODES, cap)?),
        6 => Packet::PubRel(decode_pub_response(body, v5, PropCtx::PubRel, PUBREL_CODES, cap)?),
        7 => Packet::PubComp(decode_pub_response(body, v5, PropCtx::PubComp, PUBREL_CODES, cap)?),
        8 => Packet::Subscribe(Box::new(decode_subscribe(body, v5, cap)?)),
        9 => Packet::SubAck(Box::new(decode_suback(body, v5, cap)?)),
        10 => Packet::Unsubscribe(Box::new(decode_unsubscribe(body, v5, cap)?)),
        11 => Packet::UnsubAck(Box::new(decode_unsuback(body, v5, cap)?)),
        12 | 13 => {
            Reader::new(body).finish()?;
            if first >> 4 == 12 {
                Packet::PingReq
            } else {
                Packet::PingResp
            }
        }
        14 => Packet::Disconnect(Box::new(decode_disconnect(body, v5, cap)?)),
        _ => Packet::Auth(Box::new(decode_auth(body, cap)?)),
    };
    buf.advance(total);
    Ok(Some(packet))
}

/// Checks a reason code against the list for its packet type.
fn code_in(code: u8, allowed: &[u8], packet: &'static str) -> Result<ReasonCode, DecodeError> {
    if allowed.contains(&code) {
        Ok(ReasonCode(code))
    } else {
        Err(DecodeError::InvalidReasonCode { packet, code })
    }
}

fn decode_connect(body: &[u8], cap: usize) -> Result<Connect, DecodeError> {
    let mut r = Reader::new(body);
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (name, level) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQTT" | b"MQIsdp", level) => return Err(DecodeError::UnsupportedProtocolVersion(level)),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    let v5 = protocol == ProtocolVersion::V5;
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("reserved CONNECT flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = QoS::from_u8((flags >> 3) & 0x03).ok_or(DecodeError::Malformed("will QoS 3"))?;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::Malformed("will QoS or retain set without the will flag"));
    }
    if !v5 && has_password && !has_username {
        return Err(DecodeError::Malformed("password flag without user name flag"));
    }
    let keep_alive = r.u16()?;
    let properties =
        if v5 { decode_properties(&mut r, PropCtx::Connect, cap)? } else { Default::default() };
    if properties.authentication_data.is_some() && properties.authentication_method.is_none() {
        return Err(DecodeError::ProtocolError(
            "authentication data without authentication method",
        ));
    }
    let client_id = r.string()?.to_owned();
    let will = if will_flag {
        let will_props =
            if v5 { decode_properties(&mut r, PropCtx::Will, cap)? } else { Default::default() };
        let topic = r.topic_name()?;
        if topic.is_empty() {
            return Err(DecodeError::TopicNameInvalid("empty will topic"));
        }
        let topic = topic.to_owned();
        let payload = Bytes::copy_from_slice(r.binary()?);
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties: will_props,
        })
    } else {
        None
    };
    let username = match has_username {
        true => Some(r.string()?.to_owned()),
        false => None,
    };
    let password = match has_password {
        true => Some(Bytes::copy_from_slice(r.binary()?)),
        false => None,
    };
    r.finish()?;
    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_connack(body: &[u8], v5: bool, cap: usize) -> Result<ConnAck, DecodeError> {
    let mut r = Reader::new(body);
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::Malformed("reserved CONNACK flag set"));
    }
    let raw = r.u8()?;
    let code = if v5 {
        code_in(raw, CONNACK_CODES, "CONNACK")?
    } else {
        match raw {
            0 => ReasonCode::SUCCESS,
            1 => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            2 => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
            3 => ReasonCode::SERVER_UNAVAILABLE,
            4 => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
            5 => ReasonCode::NOT_AUTHORIZED,
            _ => return Err(DecodeError::Malformed("reserved CONNACK return code")),
        }
    };
    let session_present = flags & 0x01 != 0;
    if session_present && code != ReasonCode::SUCCESS {
        return Err(DecodeError::ProtocolError("session present with a failure code"));
    }
    let properties =
        if v5 { decode_properties(&mut r, PropCtx::ConnAck, cap)? } else { Default::default() };
    r.finish()?;
    Ok(ConnAck { session_present, code, properties })
}

/// Decodes the PUBLISH whose fixed header (`first` byte, `header` bytes, `remaining` length)
/// is at the front of `buf`, consuming it and splitting the payload off without a copy. Fills
/// one `Publish` in place: the struct is large and this is the hot path.
fn decode_publish(
    buf: &mut BytesMut,
    first: u8,
    header: usize,
    remaining: usize,
    v5: bool,
    cap: usize,
) -> Result<Packet, DecodeError> {
    let qos = QoS::from_u8((first >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH QoS 3"))?;
    let mut publish = Publish {
        dup: first & 0x08 != 0,
        qos,
        retain: first & 0x01 != 0,
        topic: String::new(),
        packet_id: 0,
        properties: PublishProperties::none(),
        payload: Bytes::new(),
    };
    let body = buf.get(header..header + remaining).ok_or(TRUNCATED)?;
    let mut r = Reader::new(body);
    let topic = r.topic_name()?;
    if qos != QoS::AtMostOnce {
        publish.packet_id = r.packet_id()?;
    }
    if v5 {
        publish.properties = decode_publish_properties(&mut r, PropCtx::Publish, cap)?;
    }
    if topic.is_empty() {
        if publish.properties.topic_alias.is_none() {
            return Err(DecodeError::ProtocolError("empty topic name without a topic alias"));
        }
    } else {
        publish.topic = topic.to_owned();
    }
    let payload_at = r.pos;
    buf.advance(header + payload_at);
    publish.payload = buf.split_to(remaining - payload_at).freeze();
    Ok(Packet::Publish(publish))
}

fn decode_pub_response(
    body: &[u8],
    v5: bool,
    ctx: PropCtx,
    codes: &[u8],
    cap: usize,
) -> Result<PubResponse, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.packet_id()?;
    let mut response = PubResponse::success(packet_id);
    if v5 && !r.is_empty() {
        let packet = match ctx {
            PropCtx::PubAck => "PUBACK",
            PropCtx::PubRec => "PUBREC",
            PropCtx::PubRel => "PUBREL",
            _ => "PUBCOMP",
        };
        response.code = code_in(r.u8()?, codes, packet)?;
        if !r.is_empty() {
            response.properties = decode_publish_properties(&mut r, ctx, cap)?;
        }
    }
    r.finish()?;
    Ok(response)
}

/// Parses one SUBSCRIBE options byte.
fn subscription_options(byte: u8, v5: bool) -> Result<SubscriptionOptions, DecodeError> {
    if !v5 {
        if byte & 0xFC != 0 {
            return Err(DecodeError::Malformed("reserved subscription option bits set"));
        }
        let qos = QoS::from_u8(byte).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
        return Ok(SubscriptionOptions { qos, ..Default::default() });
    }
    if byte & 0xC0 != 0 {
        return Err(DecodeError::Malformed("reserved subscription option bits set"));
    }
    let qos = QoS::from_u8(byte & 0x03).ok_or(DecodeError::ProtocolError("subscription QoS 3"))?;
    let retain_handling = match (byte >> 4) & 0x03 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::ProtocolError("retain handling 3")),
    };
    Ok(SubscriptionOptions {
        qos,
        no_local: byte & 0x04 != 0,
        retain_as_published: byte & 0x08 != 0,
        retain_handling,
    })
}

fn decode_subscribe(body: &[u8], v5: bool, cap: usize) -> Result<Subscribe, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.packet_id()?;
    let properties =
        if v5 { decode_properties(&mut r, PropCtx::Subscribe, cap)? } else { Default::default() };
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?.to_owned();
        let options = subscription_options(r.u8()?, v5)?;
        filters.push(SubscribeFilter { filter, options });
    }
    if filters.is_empty() {
        return Err(DecodeError::ProtocolError("SUBSCRIBE without a topic filter"));
    }
    Ok(Subscribe { packet_id, filters, properties })
}

fn decode_suback(body: &[u8], v5: bool, cap: usize) -> Result<SubAck, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.packet_id()?;
    let properties =
        if v5 { decode_properties(&mut r, PropCtx::SubAck, cap)? } else { Default::default() };
    let codes = r
        .rest()
        .iter()
        .map(|&c| match (v5, c) {
            (true, _) => code_in(c, SUBACK_CODES, "SUBACK"),
            (false, 0 | 1 | 2 | 0x80) => Ok(ReasonCode(c)),
            (false, _) => Err(DecodeError::Malformed("invalid SUBACK return code")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if codes.is_empty() {
        return Err(DecodeError::ProtocolError("SUBACK without a return code"));
    }
    Ok(SubAck { packet_id, codes, properties })
}

fn decode_unsubscribe(body: &[u8], v5: bool, cap: usize) -> Result<Unsubscribe, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.packet_id()?;
    let properties =
        if v5 { decode_properties(&mut r, PropCtx::Unsubscribe, cap)? } else { Default::default() };
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?.to_owned());
    }
    if filters.is_empty() {
        return Err(DecodeError::ProtocolError("UNSUBSCRIBE without a topic filter"));
    }
    Ok(Unsubscribe { packet_id, filters, properties })
}

fn decode_unsuback(body: &[u8], v5: bool, cap: usize) -> Result<UnsubAck, DecodeError> {
    let mut r = Reader::new(body);
    let packet_id = r.packet_id()?;
    if !v5 {
        r.finish()?;
        return Ok(UnsubAck { packet_id, codes: Vec::new(), properties: Default::default() });
    }
    let properties = decode_properties(&mut r, PropCtx::UnsubAck, cap)?;
    let codes = r
        .rest()
        .iter()
        .map(|&c| code_in(c, UNSUBACK_CODES, "UNSUBACK"))
        .collect::<Result<Vec<_>, _>>()?;
    if codes.is_empty() {
        return Err(DecodeError::ProtocolError("UNSUBACK without a reason code"));
    }
    Ok(UnsubAck { packet_id, codes, properties })
}

fn decode_disconnect(body: &[u8], v5: bool, cap: usize) -> Result<Disconnect, DecodeError> {
    let mut r = Reader::new(body);
    let mut disconnect = Disconnect::default();
    if v5 && !r.is_empty() {
        disconnect.code = code_in(r.u8()?, DISCONNECT_CODES, "DISCONNECT")?;
        if !r.is_empty() {
            disconnect.properties = decode_properties(&mut r, PropCtx::Disconnect, cap)?;
        }
    }
    r.finish()?;
    Ok(disconnect)
}

fn decode_auth(body: &[u8], cap: usize) -> Result<Auth, DecodeError> {
    let mut r = Reader::new(body);
    let mut auth = Auth::default();
    if !r.is_empty() {
        auth.code = code_in(r.u8()?, AUTH_CODES, "AUTH")?;
        if !r.is_empty() {
            auth.properties = decode_properties(&mut r, PropCtx::Auth, cap)?;
        }
    }
    r.finish()?;
    Ok(auth)
}
