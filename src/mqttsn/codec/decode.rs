//! Datagram → [`Packet`]. Every length is checked before it is read: no input panics.

use bytes::Bytes;
use thiserror::Error;

use super::packet::*;

/// Why a datagram is not an MQTT-SN message we accept. [`DecodeError::kind`] is the reason
/// label of `mqgate_mqttsn_datagrams_dropped_total`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Shorter than a header, or than the fields of its type.
    #[error("truncated datagram: {0}")]
    Truncated(&'static str),
    /// The length field says `said` octets, the datagram has `got`.
    #[error("the length field says {said} octets, the datagram has {got}")]
    LengthMismatch { said: usize, got: usize },
    /// A message type the specification does not define (or a gateway never receives).
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// A message of fixed size with another size.
    #[error("{name} of {got} octets after its header, expected {expected}")]
    BadLength { name: &'static str, got: usize, expected: &'static str },
    /// CONNECT with a protocol id other than 0x01.
    #[error("CONNECT with protocol id 0x{0:02x} (MQTT-SN 1.2 is 0x01)")]
    ProtocolId(u8),
    /// Topic id type 0b11 (reserved).
    #[error("reserved topic id type 0b11")]
    TopicIdType,
    /// A client id or topic name that is not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
}

impl DecodeError {
    /// A short fixed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::Truncated(_) => "truncated",
            DecodeError::LengthMismatch { .. } => "length_mismatch",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::BadLength { .. } => "bad_length",
            DecodeError::ProtocolId(_) => "protocol_id",
            DecodeError::TopicIdType => "topic_id_type",
            DecodeError::Utf8(_) => "utf8",
        }
    }
}

/// The message type and the octets after the header, once the length field was checked
/// against the datagram (an encapsulated message: type 0xFE and everything after its type).
/// What the listener reads to dispatch a datagram without decoding it.
pub fn header(buf: &[u8]) -> Result<(u8, &[u8]), DecodeError> {
    let (&first, rest) = buf.split_first().ok_or(DecodeError::Truncated("empty"))?;
    if first != 0x01 && rest.first() == Some(&msg_type::ENCAPSULATED) {
        // The encapsulation's length covers its own header only (spec §5.5).
        return Ok((msg_type::ENCAPSULATED, &rest[1..]));
    }
    let (total, head) = if first == 0x01 {
        let hi = *rest.first().ok_or(DecodeError::Truncated("3-octet length field"))?;
        let lo = *rest.get(1).ok_or(DecodeError::Truncated("3-octet length field"))?;
        (usize::from(u16::from_be_bytes([hi, lo])), 3)
    } else {
        (usize::from(first), 1)
    };
    if total != buf.len() {
        return Err(DecodeError::LengthMismatch { said: total, got: buf.len() });
    }
    let t = *buf.get(head).ok_or(DecodeError::Truncated("message type"))?;
    Ok((t, &buf[head + 1..]))
}

/// Decodes one datagram.
pub fn decode(datagram: &Bytes) -> Result<Packet, DecodeError> {
    let (t, body) = header(datagram)?;
    // The body as a `Bytes` slice of the datagram (payloads are not copied).
    let offset = datagram.len() - body.len();
    let body_bytes = datagram.slice(offset..);
    let mut r = Reader { buf: body, name: type_name(t) };
    use msg_type::*;
    let packet = match t {
        ADVERTISE => {
            r.exact(3, "3")?;
            Packet::Advertise { gw_id: r.u8()?, duration: r.u16()? }
        }
        SEARCHGW => {
            r.exact(1, "1")?;
            Packet::SearchGw { radius: r.u8()? }
        }
        GWINFO => {
            let gw_id = r.u8()?;
            Packet::GwInfo { gw_id, gw_add: body_bytes.slice(1..) }
        }
        CONNECT => {
            let flags = r.u8()?;
            let protocol = r.u8()?;
            if protocol != 0x01 {
                return Err(DecodeError::ProtocolId(protocol));
            }
            let duration = r.u16()?;
            let client_id = r.text("client id")?;
            Packet::Connect(Connect {
                will: flags & 0x08 != 0,
                clean_session: flags & 0x04 != 0,
                duration,
                client_id,
            })
        }
        CONNACK => {
            r.exact(1, "1")?;
            Packet::ConnAck { code: ReturnCode(r.u8()?) }
        }
        WILLTOPICREQ => {
            r.exact(0, "0")?;
            Packet::WillTopicReq
        }
        WILLMSGREQ => {
            r.exact(0, "0")?;
            Packet::WillMsgReq
        }
        PINGRESP => {
            r.exact(0, "0")?;
            Packet::PingResp
        }
        WILLTOPIC => Packet::WillTopic(r.will_topic()?),
        WILLTOPICUPD => Packet::WillTopicUpd(r.will_topic()?),
        WILLMSG => Packet::WillMsg(body_bytes),
        WILLMSGUPD => Packet::WillMsgUpd(body_bytes),
        REGISTER => {
            let topic_id = r.u16()?;
            let msg_id = r.u16()?;
            Packet::Register { topic_id, msg_id, topic_name: r.text("topic name")? }
        }
        REGACK => {
            r.exact(5, "5")?;
            Packet::RegAck { topic_id: r.u16()?, msg_id: r.u16()?, code: ReturnCode(r.u8()?) }
        }
        PUBLISH => {
            let flags = r.u8()?;
            let id = r.bytes2()?;
            let msg_id = r.u16()?;
            let topic = match flags & 0b11 {
                0b00 => TopicRef::Normal(u16::from_be_bytes(id)),
                0b01 => TopicRef::Predefined(u16::from_be_bytes(id)),
                0b10 => TopicRef::Short(id),
                _ => return Err(DecodeError::TopicIdType),
            };
            Packet::Publish(Publish {
                dup: flags & 0x80 != 0,
                qos: SnQos::from_bits(flags >> 5),
                retain: flags & 0x10 != 0,
                topic,
                msg_id,
                data: body_bytes.slice(5..),
            })
        }
        PUBACK => {
            r.exact(5, "5")?;
            Packet::PubAck { topic_id: r.u16()?, msg_id: r.u16()?, code: ReturnCode(r.u8()?) }
        }
        PUBCOMP | PUBREC | PUBREL | UNSUBACK => {
            r.exact(2, "2")?;
            let msg_id = r.u16()?;
            match t {
                PUBCOMP => Packet::PubComp { msg_id },
                PUBREC => Packet::PubRec { msg_id },
                PUBREL => Packet::PubRel { msg_id },
                _ => Packet::UnsubAck { msg_id },
            }
        }
        SUBSCRIBE | UNSUBSCRIBE => {
            let flags = r.u8()?;
            let msg_id = r.u16()?;
            let topic = match flags & 0b11 {
                0b00 => TopicSpec::Name(r.text("topic name")?),
                0b01 => {
                    r.exact(2, "2 (a predefined topic id)")?;
                    TopicSpec::Predefined(r.u16()?)
                }
                0b10 => {
                    r.exact(2, "2 (a short topic name)")?;
                    TopicSpec::Short(r.bytes2()?)
                }
                _ => return Err(DecodeError::TopicIdType),
            };
            if t == SUBSCRIBE {
                Packet::Subscribe(Subscribe {
                    dup: flags & 0x80 != 0,
                    qos: SnQos::from_bits(flags >> 5),
                    msg_id,
                    topic,
                })
            } else {
                Packet::Unsubscribe { msg_id, topic }
            }
        }
        SUBACK => {
            r.exact(6, "6")?;
            let flags = r.u8()?;
            Packet::SubAck {
                qos: SnQos::from_bits(flags >> 5),
                topic_id: r.u16()?,
                msg_id: r.u16()?,
                code: ReturnCode(r.u8()?),
            }
        }
        PINGREQ => {
            if body.is_empty() {
                Packet::PingReq { client_id: None }
            } else {
                Packet::PingReq { client_id: Some(r.text("client id")?) }
            }
        }
        DISCONNECT => match body.len() {
            0 => Packet::Disconnect { duration: None },
            2 => Packet::Disconnect { duration: Some(r.u16()?) },
            got => {
                return Err(DecodeError::BadLength { name: "DISCONNECT", got, expected: "0 or 2" })
            }
        },
        WILLTOPICRESP => {
            r.exact(1, "1")?;
            Packet::WillTopicResp { code: ReturnCode(r.u8()?) }
        }
        WILLMSGRESP => {
            r.exact(1, "1")?;
            Packet::WillMsgResp { code: ReturnCode(r.u8()?) }
        }
        ENCAPSULATED => {
            // [len][0xFE][ctrl][node id: len - 3][inner message]
            let len = usize::from(datagram[0]);
            if len < 3 {
                return Err(DecodeError::Truncated("encapsulation header"));
            }
            if datagram.len() <= len {
                return Err(DecodeError::Truncated("encapsulated message"));
            }
            Packet::Encapsulated {
                radius: datagram[2] & 0b11,
                node_id: datagram.slice(3..len),
                inner: datagram.slice(len..),
            }
        }
        other => return Err(DecodeError::UnknownType(other)),
    };
    Ok(packet)
}

/// Reads the fields of one message body.
struct Reader<'a> {
    buf: &'a [u8],
    /// The message's name, for errors.
    name: &'static str,
}

impl Reader<'_> {
    fn exact(&self, n: usize, expected: &'static str) -> Result<(), DecodeError> {
        if self.buf.len() == n {
            Ok(())
        } else {
            Err(DecodeError::BadLength { name: self.name, got: self.buf.len(), expected })
        }
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self.buf.split_first().ok_or(DecodeError::Truncated(self.name))?;
        self.buf = rest;
        Ok(b)
    }

    fn bytes2(&mut self) -> Result<[u8; 2], DecodeError> {
        match self.buf {
            [a, b, rest @ ..] => {
                let v = [*a, *b];
                self.buf = rest;
                Ok(v)
            }
            _ => Err(DecodeError::Truncated(self.name)),
        }
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.bytes2().map(u16::from_be_bytes)
    }

    /// The rest as UTF-8 text.
    fn text(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let s = std::str::from_utf8(self.buf).map_err(|_| DecodeError::Utf8(what))?;
        self.buf = &[];
        Ok(s.to_owned())
    }

    /// WILLTOPIC / WILLTOPICUPD: empty (delete the will), or flags and the topic.
    fn will_topic(&mut self) -> Result<Option<WillTopic>, DecodeError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let flags = self.u8()?;
        Ok(Some(WillTopic {
            qos: SnQos::from_bits(flags >> 5),
            retain: flags & 0x10 != 0,
            topic: self.text("will topic")?,
        }))
    }
}
