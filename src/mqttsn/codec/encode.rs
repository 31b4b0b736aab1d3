//! [`Packet`] → datagram. The length field takes 1 octet up to 255 octets in all, else 3
//! (0x01 and the total, big-endian); a message over 65,535 octets cannot be sent.

use bytes::{BufMut, BytesMut};
use thiserror::Error;

use super::packet::*;

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// Over the 65,535 octets the length field can say.
    #[error("{name} of {len} octets is over MQTT-SN's 65,535")]
    TooLong { name: &'static str, len: usize },
    /// An encapsulation header over 255 octets (its length field is one octet).
    #[error("a wireless node id of {0} octets does not fit the encapsulation header")]
    NodeIdTooLong(usize),
}

fn flags(dup: bool, qos: SnQos, retain: bool, will: bool, clean: bool, topic_type: u8) -> u8 {
    (u8::from(dup) << 7)
        | (qos.bits() << 5)
        | (u8::from(retain) << 4)
        | (u8::from(will) << 3)
        | (u8::from(clean) << 2)
        | (topic_type & 0b11)
}

/// The octets after the type.
fn body_len(p: &Packet) -> usize {
    match p {
        Packet::Advertise { .. } => 3,
        Packet::SearchGw { .. } => 1,
        Packet::GwInfo { gw_add, .. } => 1 + gw_add.len(),
        Packet::Connect(c) => 4 + c.client_id.len(),
        Packet::ConnAck { .. } | Packet::WillTopicResp { .. } | Packet::WillMsgResp { .. } => 1,
        Packet::WillTopicReq | Packet::WillMsgReq | Packet::PingResp => 0,
        Packet::WillTopic(w) | Packet::WillTopicUpd(w) => {
            w.as_ref().map_or(0, |w| 1 + w.topic.len())
        }
        Packet::WillMsg(m) | Packet::WillMsgUpd(m) => m.len(),
        Packet::Register { topic_name, .. } => 4 + topic_name.len(),
        Packet::RegAck { .. } | Packet::PubAck { .. } => 5,
        Packet::Publish(p) => 5 + p.data.len(),
        Packet::PubComp { .. } | Packet::PubRec { .. } | Packet::PubRel { .. } => 2,
        Packet::UnsubAck { .. } => 2,
        Packet::Subscribe(Subscribe { topic, .. }) | Packet::Unsubscribe { topic, .. } => {
            3 + match topic {
                TopicSpec::Name(n) => n.len(),
                _ => 2,
            }
        }
        Packet::SubAck { .. } => 6,
        Packet::PingReq { client_id } => client_id.as_ref().map_or(0, String::len),
        Packet::Disconnect { duration } => duration.map_or(0, |_| 2),
        Packet::Encapsulated { .. } => 0,
    }
}

/// Appends the datagram of `p` to `out`.
pub fn encode(p: &Packet, out: &mut BytesMut) -> Result<(), EncodeError> {
    if let Packet::Encapsulated { radius, node_id, inner } = p {
        let len = 3 + node_id.len();
        let len8 = u8::try_from(len).map_err(|_| EncodeError::NodeIdTooLong(node_id.len()))?;
        if len8 == 0x01 {
            return Err(EncodeError::NodeIdTooLong(node_id.len()));
        }
        out.reserve(len + inner.len());
        out.put_u8(len8);
        out.put_u8(msg_type::ENCAPSULATED);
        out.put_u8(radius & 0b11);
        out.put_slice(node_id);
        out.put_slice(inner);
        return Ok(());
    }
    let body = body_len(p);
    let total = if body + 2 <= 255 { body + 2 } else { body + 4 };
    if total > usize::from(u16::MAX) {
        return Err(EncodeError::TooLong { name: p.name(), len: total });
    }
    out.reserve(total);
    if total <= 255 {
        out.put_u8(total as u8);
    } else {
        out.put_u8(0x01);
        out.put_u16(total as u16);
    }
    out.put_u8(p.msg_type());
    match p {
        Packet::Advertise { gw_id, duration } => {
            out.put_u8(*gw_id);
            out.put_u16(*duration);
        }
        Packet::SearchGw { radius } => out.put_u8(*radius),
        Packet::GwInfo { gw_id, gw_add } => {
            out.put_u8(*gw_id);
            out.put_slice(gw_add);
        }
        Packet::Connect(c) => {
            out.put_u8(flags(false, SnQos::Zero, false, c.will, c.clean_session, 0));
            out.put_u8(0x01);
            out.put_u16(c.duration);
            out.put_slice(c.client_id.as_bytes());
        }
        Packet::ConnAck { code }
        | Packet::WillTopicResp { code }
        | Packet::WillMsgResp { code } => out.put_u8(code.0),
        Packet::WillTopicReq | Packet::WillMsgReq | Packet::PingResp => {}
        Packet::WillTopic(w) | Packet::WillTopicUpd(w) => {
            if let Some(w) = w {
                out.put_u8(flags(false, w.qos, w.retain, false, false, 0));
                out.put_slice(w.topic.as_bytes());
            }
        }
        Packet::WillMsg(m) | Packet::WillMsgUpd(m) => out.put_slice(m),
        Packet::Register { topic_id, msg_id, topic_name } => {
            out.put_u16(*topic_id);
            out.put_u16(*msg_id);
            out.put_slice(topic_name.as_bytes());
        }
        Packet::RegAck { topic_id, msg_id, code } | Packet::PubAck { topic_id, msg_id, code } => {
            out.put_u16(*topic_id);
            out.put_u16(*msg_id);
            out.put_u8(code.0);
        }
        Packet::Publish(p) => {
            out.put_u8(flags(p.dup, p.qos, p.retain, false, false, p.topic.type_bits()));
            out.put_slice(&p.topic.id_bytes());
            out.put_u16(p.msg_id);
            out.put_slice(&p.data);
        }
        Packet::PubComp { msg_id }
        | Packet::PubRec { msg_id }
        | Packet::PubRel { msg_id }
        | Packet::UnsubAck { msg_id } => out.put_u16(*msg_id),
        Packet::Subscribe(Subscribe { dup, qos, msg_id, topic }) => {
            out.put_u8(flags(*dup, *qos, false, false, false, topic.type_bits()));
            out.put_u16(*msg_id);
            put_spec(topic, out);
        }
        Packet::Unsubscribe { msg_id, topic } => {
            out.put_u8(topic.type_bits());
            out.put_u16(*msg_id);
            put_spec(topic, out);
        }
        Packet::SubAck { qos, topic_id, msg_id, code } => {
            out.put_u8(flags(false, *qos, false, false, false, 0));
            out.put_u16(*topic_id);
            out.put_u16(*msg_id);
            out.put_u8(code.0);
        }
        Packet::PingReq { client_id } => {
            if let Some(c) = client_id {
                out.put_slice(c.as_bytes());
            }
        }
        Packet::Disconnect { duration } => {
            if let Some(d) = duration {
                out.put_u16(*d);
            }
        }
        Packet::Encapsulated { .. } => {}
    }
    Ok(())
}

fn put_spec(topic: &TopicSpec, out: &mut BytesMut) {
    match topic {
        TopicSpec::Name(n) => out.put_slice(n.as_bytes()),
        TopicSpec::Predefined(id) => out.put_u16(*id),
        TopicSpec::Short(s) => out.put_slice(s),
    }
}
