//! Hand-written byte cases from the MQTT-SN 1.2 specification's message formats (§5.4), and
//! the datagrams a gateway must refuse.

use bytes::{Bytes, BytesMut};

use super::*;

mod roundtrip;

fn enc(p: &Packet) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(p, &mut out).expect("encodes");
    out.to_vec()
}

fn dec(bytes: &[u8]) -> Result<Packet, DecodeError> {
    decode(&Bytes::copy_from_slice(bytes))
}

/// Both ways: `p` is `bytes`.
fn both(p: Packet, bytes: &[u8]) {
    assert_eq!(enc(&p), bytes, "encoding {p:?}");
    assert_eq!(dec(bytes).as_ref(), Ok(&p), "decoding {bytes:02x?}");
}

#[test]
fn connect_with_will_and_clean_session() {
    // Length 0x0B, CONNECT, flags Will|CleanSession, protocol 0x01, duration 30, "dev-1".
    both(
        Packet::Connect(Connect {
            will: true,
            clean_session: true,
            duration: 30,
            client_id: "dev-1".into(),
        }),
        &[0x0B, 0x04, 0x0C, 0x01, 0x00, 0x1E, b'd', b'e', b'v', b'-', b'1'],
    );
}

#[test]
fn connack_and_the_will_requests() {
    both(Packet::ConnAck { code: ReturnCode::ACCEPTED }, &[0x03, 0x05, 0x00]);
    both(Packet::WillTopicReq, &[0x02, 0x06]);
    both(Packet::WillMsgReq, &[0x02, 0x08]);
    both(
        Packet::WillTopic(Some(WillTopic { qos: SnQos::One, retain: true, topic: "w/t".into() })),
        &[0x06, 0x07, 0x30, b'w', b'/', b't'],
    );
    both(Packet::WillTopic(None), &[0x02, 0x07]);
    both(Packet::WillMsg(Bytes::from_static(b"bye")), &[0x05, 0x09, b'b', b'y', b'e']);
    both(Packet::WillTopicUpd(None), &[0x02, 0x1A]);
    both(Packet::WillTopicResp { code: ReturnCode::ACCEPTED }, &[0x03, 0x1B, 0x00]);
    both(Packet::WillMsgUpd(Bytes::from_static(b"x")), &[0x03, 0x1C, b'x']);
    both(Packet::WillMsgResp { code: ReturnCode::NOT_SUPPORTED }, &[0x03, 0x1D, 0x03]);
}

#[test]
fn register_regack_publish_puback() {
    both(
        Packet::Register { topic_id: 0, msg_id: 7, topic_name: "a/b".into() },
        &[0x09, 0x0A, 0x00, 0x00, 0x00, 0x07, b'a', b'/', b'b'],
    );
    both(
        Packet::RegAck { topic_id: 0x0102, msg_id: 7, code: ReturnCode::ACCEPTED },
        &[0x07, 0x0B, 0x01, 0x02, 0x00, 0x07, 0x00],
    );
    // QoS 1, retain, normal topic id 1, msg id 2, payload "hi".
    both(
        Packet::Publish(Publish {
            dup: false,
            qos: SnQos::One,
            retain: true,
            topic: TopicRef::Normal(1),
            msg_id: 2,
            data: Bytes::from_static(b"hi"),
        }),
        &[0x09, 0x0C, 0x30, 0x00, 0x01, 0x00, 0x02, b'h', b'i'],
    );
    // QoS -1 (0b11), DUP clear, short topic name "ab".
    both(
        Packet::Publish(Publish {
            dup: false,
            qos: SnQos::MinusOne,
            retain: false,
            topic: TopicRef::Short(*b"ab"),
            msg_id: 0,
            data: Bytes::new(),
        }),
        &[0x07, 0x0C, 0x62, b'a', b'b', 0x00, 0x00],
    );
    // DUP, QoS 2, predefined topic 5.
    both(
        Packet::Publish(Publish {
            dup: true,
            qos: SnQos::Two,
            retain: false,
            topic: TopicRef::Predefined(5),
            msg_id: 0xBEEF,
            data: Bytes::from_static(b"z"),
        }),
        &[0x08, 0x0C, 0xC1, 0x00, 0x05, 0xBE, 0xEF, b'z'],
    );
    both(
        Packet::PubAck { topic_id: 1, msg_id: 2, code: ReturnCode::INVALID_TOPIC_ID },
        &[0x07, 0x0D, 0x00, 0x01, 0x00, 0x02, 0x02],
    );
    both(Packet::PubRec { msg_id: 3 }, &[0x04, 0x0F, 0x00, 0x03]);
    both(Packet::PubRel { msg_id: 3 }, &[0x04, 0x10, 0x00, 0x03]);
    both(Packet::PubComp { msg_id: 3 }, &[0x04, 0x0E, 0x00, 0x03]);
}

#[test]
fn subscribe_unsubscribe_in_their_three_forms() {
    both(
        Packet::Subscribe(Subscribe {
            dup: false,
            qos: SnQos::One,
            msg_id: 1,
            topic: TopicSpec::Name("s/+".into()),
        }),
        &[0x08, 0x12, 0x20, 0x00, 0x01, b's', b'/', b'+'],
    );
    both(
        Packet::Subscribe(Subscribe {
            dup: false,
            qos: SnQos::Zero,
            msg_id: 2,
            topic: TopicSpec::Predefined(9),
        }),
        &[0x07, 0x12, 0x01, 0x00, 0x02, 0x00, 0x09],
    );
    both(
        Packet::Unsubscribe { msg_id: 3, topic: TopicSpec::Short(*b"xy") },
        &[0x07, 0x14, 0x02, 0x00, 0x03, b'x', b'y'],
    );
    both(
        Packet::SubAck { qos: SnQos::One, topic_id: 4, msg_id: 1, code: ReturnCode::ACCEPTED },
        &[0x08, 0x13, 0x20, 0x00, 0x04, 0x00, 0x01, 0x00],
    );
    both(Packet::UnsubAck { msg_id: 3 }, &[0x04, 0x15, 0x00, 0x03]);
}

#[test]
fn ping_disconnect_and_gateway_discovery() {
    both(Packet::PingReq { client_id: None }, &[0x02, 0x16]);
    both(Packet::PingReq { client_id: Some("c".into()) }, &[0x03, 0x16, b'c']);
    both(Packet::PingResp, &[0x02, 0x17]);
    both(Packet::Disconnect { duration: None }, &[0x02, 0x18]);
    both(Packet::Disconnect { duration: Some(60) }, &[0x04, 0x18, 0x00, 0x3C]);
    both(Packet::Advertise { gw_id: 1, duration: 900 }, &[0x05, 0x00, 0x01, 0x03, 0x84]);
    both(Packet::SearchGw { radius: 0 }, &[0x03, 0x01, 0x00]);
    both(Packet::GwInfo { gw_id: 1, gw_add: Bytes::new() }, &[0x03, 0x02, 0x01]);
}

#[test]
fn a_long_message_takes_the_three_octet_length() {
    let data = Bytes::from(vec![7u8; 300]);
    let p = Packet::Publish(Publish {
        dup: false,
        qos: SnQos::Zero,
        retain: false,
        topic: TopicRef::Normal(1),
        msg_id: 0,
        data,
    });
    let bytes = enc(&p);
    // 0x01, total 309 (3 + 1 + 5 + 300), PUBLISH.
    assert_eq!(&bytes[..4], &[0x01, 0x01, 0x35, 0x0C]);
    assert_eq!(bytes.len(), 309);
    assert_eq!(dec(&bytes), Ok(p));
    // 253 octets of body is the longest with a 1-octet length field (255 in all).
    let p = Packet::WillMsg(Bytes::from(vec![1u8; 253]));
    assert_eq!(enc(&p)[0], 255);
    let p = Packet::WillMsg(Bytes::from(vec![1u8; 254]));
    assert_eq!(&enc(&p)[..3], &[0x01, 0x01, 0x02]);
}

#[test]
fn encapsulated_messages_keep_their_node_and_inner_message() {
    // Header length 5: len, 0xFE, ctrl (radius 1), node id 2 octets; then a PINGREQ.
    both(
        Packet::Encapsulated {
            radius: 1,
            node_id: Bytes::from_static(&[0xAA, 0xBB]),
            inner: Bytes::from_static(&[0x02, 0x16]),
        },
        &[0x05, 0xFE, 0x01, 0xAA, 0xBB, 0x02, 0x16],
    );
}

#[test]
fn bad_datagrams_are_refused_with_a_reason() {
    let kind = |b: &[u8]| dec(b).map(|_| ()).map_err(|e| e.kind());
    assert_eq!(kind(&[]), Err("truncated"));
    assert_eq!(kind(&[0x02]), Err("length_mismatch"));
    assert_eq!(kind(&[0x01, 0x00]), Err("truncated"));
    // The length field disagrees with the datagram, both ways.
    assert_eq!(kind(&[0x05, 0x16]), Err("length_mismatch"));
    assert_eq!(kind(&[0x02, 0x16, 0x00]), Err("length_mismatch"));
    assert_eq!(kind(&[0x01, 0x00, 0x05, 0x16]), Err("length_mismatch"));
    assert_eq!(kind(&[0x00]), Err("length_mismatch"));
    // Unknown message types.
    assert_eq!(kind(&[0x02, 0x03]), Err("unknown_type"));
    assert_eq!(kind(&[0x02, 0x11]), Err("unknown_type"));
    assert_eq!(kind(&[0x02, 0xFF]), Err("unknown_type"));
    // Fixed-size messages with another size.
    assert_eq!(kind(&[0x03, 0x0E, 0x01]), Err("bad_length"));
    assert_eq!(kind(&[0x06, 0x0D, 0, 1, 0, 2]), Err("bad_length"));
    assert_eq!(kind(&[0x03, 0x18, 0x00]), Err("bad_length"));
    // PUBLISH shorter than its fixed fields.
    assert_eq!(kind(&[0x06, 0x0C, 0x20, 0x00, 0x01, 0x00]), Err("truncated"));
    // Reserved topic id type, wrong protocol id, text that is not UTF-8.
    assert_eq!(kind(&[0x07, 0x0C, 0x03, 0, 1, 0, 0]), Err("topic_id_type"));
    assert_eq!(kind(&[0x07, 0x04, 0x04, 0x02, 0, 30, b'c']), Err("protocol_id"));
    assert_eq!(kind(&[0x07, 0x04, 0x04, 0x01, 0, 30, 0xFF]), Err("utf8"));
    assert_eq!(kind(&[0x08, 0x12, 0x00, 0, 1, 0xC3, 0x28, b'x']), Err("utf8"));
    // A predefined SUBSCRIBE with a 3-octet id.
    assert_eq!(kind(&[0x08, 0x12, 0x01, 0, 1, 0, 1, 2]), Err("bad_length"));
    // An encapsulation with nothing inside.
    assert_eq!(kind(&[0x03, 0xFE, 0x00]), Err("truncated"));
}

#[test]
fn header_reads_type_and_body_without_decoding() {
    assert_eq!(header(&[0x04, 0x0F, 0x00, 0x03]), Ok((0x0F, &[0x00, 0x03][..])));
    assert_eq!(header(&[0x01, 0x00, 0x05, 0x0F, 0x09]), Ok((0x0F, &[0x09][..])));
}
