//! A [`Message`] as stored bytes, and back.
//!
//! Layout (version 1): `1u8`, receive time (u64 BE, milliseconds since the Unix epoch),
//! client id (u16 BE length + UTF-8), username (`0u8`, or `1u8` + u16 BE length + UTF-8),
//! packet id (u16 BE, 0 = none), then the message as an MQTT 5 PUBLISH packet from our own codec
//! (topic, QoS, RETAIN, payload and every property): one format for the wire and the disk.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, BytesMut};

use super::StoreError;
use crate::message::Message;
use crate::mqtt::codec::{self, Packet, ProtocolVersion, Publish, QoS};

const VERSION: u8 = 1;

/// The stored bytes of `msg`.
pub fn encode_message(msg: &Message) -> Result<Vec<u8>, StoreError> {
    let mut buf = BytesMut::with_capacity(64 + msg.topic.len() + msg.payload.len());
    buf.put_u8(VERSION);
    buf.put_u64(unix_millis(msg.received));
    put_str(&mut buf, &msg.client_id)?;
    match &msg.username {
        Some(u) => {
            buf.put_u8(1);
            put_str(&mut buf, u)?;
        }
        None => buf.put_u8(0),
    }
    buf.put_u16(msg.packet_id.unwrap_or(0));
    let publish = Packet::Publish(Publish {
        dup: false,
        qos: msg.qos,
        retain: msg.retain,
        topic: msg.topic.clone(),
        // The wire format needs one at QoS 1/2; the real one (or none) is in the header above.
        packet_id: if msg.qos == QoS::AtMostOnce { 0 } else { msg.packet_id.unwrap_or(1).max(1) },
        properties: msg.properties.clone(),
        payload: msg.payload.clone(),
    });
    codec::encode(&publish, ProtocolVersion::V5, &mut buf)
        .map_err(|e| StoreError::Decode(format!("message cannot be encoded: {e}")))?;
    Ok(buf.to_vec())
}

/// The message stored as `bytes`.
pub fn decode_message(bytes: &[u8]) -> Result<Message, StoreError> {
    let bad = |what: &str| StoreError::Decode(format!("stored message: {what}"));
    let mut b = bytes;
    if b.remaining() < 1 + 8 || b.get_u8() != VERSION {
        return Err(bad("unknown format version"));
    }
    let millis = b.get_u64();
    let client_id = get_str(&mut b).ok_or_else(|| bad("client id"))?;
    let username = match b.try_get_u8().map_err(|_| bad("username flag"))? {
        0 => None,
        1 => Some(Arc::<str>::from(get_str(&mut b).ok_or_else(|| bad("username"))?)),
        _ => return Err(bad("username flag")),
    };
    let packet_id = b.try_get_u16().map_err(|_| bad("packet id"))?;
    let mut rest = BytesMut::from(b);
    let packet = codec::decode(&mut rest, Some(ProtocolVersion::V5), usize::MAX)
        .map_err(|e| StoreError::Decode(format!("stored message: {e}")))?;
    let Some(Packet::Publish(p)) = packet else { return Err(bad("not a PUBLISH")) };
    Ok(Message {
        charge: Default::default(),
        topic: p.topic,
        payload: p.payload,
        qos: p.qos,
        retain: p.retain,
        client_id: Arc::from(client_id),
        username,
        properties: p.properties,
        received: instant_of(millis),
        packet_id: (packet_id != 0).then_some(packet_id),
    })
}

/// `at` as milliseconds since the Unix epoch (through the wall clock now).
pub fn unix_millis(at: Instant) -> u64 {
    let wall = SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or(SystemTime::now())
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    wall.as_millis() as u64
}

/// The `Instant` of a wall-clock time in milliseconds (now, if it is in the future or too old
/// for this process's monotonic clock).
pub fn instant_of(millis: u64) -> Instant {
    let now_wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let age = now_wall.saturating_sub(Duration::from_millis(millis));
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}

/// Appends `s` with a u16 BE length; an error over 65535 bytes.
pub fn put_str(buf: &mut BytesMut, s: &str) -> Result<(), StoreError> {
    let len = u16::try_from(s.len())
        .map_err(|_| StoreError::Decode("a string over 65535 bytes cannot be stored".into()))?;
    buf.put_u16(len);
    buf.put_slice(s.as_bytes());
    Ok(())
}

/// Takes a string written by [`put_str`] from the front of `b`.
pub fn get_str(b: &mut &[u8]) -> Option<String> {
    let len = b.try_get_u16().ok()? as usize;
    if b.remaining() < len {
        return None;
    }
    let s = std::str::from_utf8(&b[..len]).ok()?.to_owned();
    b.advance(len);
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::Properties;
    use bytes::Bytes;

    fn msg(qos: QoS, packet_id: Option<u16>) -> Message {
        let properties = Properties {
            content_type: Some("application/json".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\x01")),
            user_properties: vec![("k".into(), "v".into())],
            ..Properties::default()
        };
        Message {
            charge: Default::default(),
            topic: "a/b/c".into(),
            payload: Bytes::from_static(b"{\"x\":1}"),
            qos,
            retain: true,
            client_id: Arc::from("dev-1"),
            username: Some(Arc::from("alice")),
            properties: properties.into(),
            received: Instant::now() - Duration::from_secs(5),
            packet_id,
        }
    }

    #[test]
    fn round_trips_every_field() {
        for (qos, pid) in
            [(QoS::AtMostOnce, None), (QoS::AtLeastOnce, Some(7)), (QoS::ExactlyOnce, None)]
        {
            let m = msg(qos, pid);
            let back = decode_message(&encode_message(&m).expect("encode")).expect("decode");
            assert_eq!(back.topic, m.topic);
            assert_eq!(back.payload, m.payload);
            assert_eq!(back.qos, m.qos);
            assert_eq!(back.retain, m.retain);
            assert_eq!(back.client_id, m.client_id);
            assert_eq!(back.username, m.username);
            assert_eq!(back.properties, m.properties);
            assert_eq!(back.packet_id, m.packet_id);
            assert_eq!(back.identity(), m.identity());
            let age = back.received.elapsed().as_secs_f64();
            assert!((4.0..7.0).contains(&age), "age {age}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = encode_message(&msg(QoS::AtLeastOnce, Some(3))).expect("encode");
        for cut in 0..good.len() {
            let _ = decode_message(&good[..cut]);
        }
        assert!(decode_message(&good[..good.len() - 1]).is_err());
        assert!(decode_message(&[2, 0, 0]).is_err());
    }
}
