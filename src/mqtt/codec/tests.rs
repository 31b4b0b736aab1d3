//! Unit tests of the codec: one hand-written byte sequence per strictness rule, the 3.1.1
//! translations, the short forms, encoder errors, and the fuzz seed corpus writer. The proptest
//! round trips live in `tests/roundtrip.rs`.

use bytes::{Bytes, BytesMut};

use super::*;

mod roundtrip;
mod seeds;

const V3: Option<ProtocolVersion> = Some(ProtocolVersion::V311);
const V5: Option<ProtocolVersion> = Some(ProtocolVersion::V5);
const BIG: usize = 1 << 28;

fn dec(bytes: &[u8], version: Option<ProtocolVersion>) -> Result<Option<Packet>, DecodeError> {
    decode(&mut BytesMut::from(bytes), version, BIG)
}

fn dec_ok(bytes: &[u8], version: Option<ProtocolVersion>) -> Packet {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, version, BIG).unwrap().unwrap();
    assert!(buf.is_empty(), "packet not fully consumed");
    packet
}

fn dec_err(bytes: &[u8], version: Option<ProtocolVersion>) -> DecodeError {
    dec(bytes, version).unwrap_err()
}

fn enc(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    let n = encode(packet, version, &mut buf).unwrap();
    assert_eq!(n, buf.len());
    buf.to_vec()
}

pub(super) fn publish(topic: &str, qos: QoS, packet_id: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: PublishProperties::none(),
        payload: Bytes::from_static(b"hi"),
    }
}

/// A v5 PUBLISH QoS 0 to "a/b" whose property list is `props` (raw bytes), payload "x".
fn v5_publish_with_props(props: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, 0x03, b'a', b'/', b'b', props.len() as u8];
    body.extend_from_slice(props);
    body.push(b'x');
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

/// A CONNECT with protocol `name`/`level`, `flags`, keepalive 60, client id "c" and `rest`
/// (properties for v5, then the rest of the payload) appended.
fn connect_bytes(name: &[u8], level: u8, flags: u8, props: Option<&[u8]>, rest: &[u8]) -> Vec<u8> {
    let mut body = vec![0x00, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, flags, 0x00, 60]);
    if let Some(p) = props {
        body.push(p.len() as u8);
        body.extend_from_slice(p);
    }
    body.extend_from_slice(&[0x00, 0x01, b'c']);
    body.extend_from_slice(rest);
    let mut out = vec![0x10, body.len() as u8];
    out.extend(body);
    out
}

#[test]
fn v5_empty_disconnect_is_normal_disconnection() {
    assert_eq!(dec_ok(&[0xE0, 0x00], V5), Packet::Disconnect(Box::default()));
    let d = dec_ok(&[0xE0, 0x01, 0x8E], V5);
    assert_eq!(
        d,
        Packet::Disconnect(Box::new(Disconnect {
            code: ReasonCode::SESSION_TAKEN_OVER,
            properties: Properties::default()
        }))
    );
    assert_eq!(enc(&Packet::Disconnect(Box::default()), ProtocolVersion::V5), [0xE0, 0]);
    assert_eq!(enc(&d, ProtocolVersion::V5), [0xE0, 0x01, 0x8E]);
}

#[test]
fn v3_disconnect_must_be_empty() {
    assert_eq!(dec_ok(&[0xE0, 0x00], V3), Packet::Disconnect(Box::default()));
    assert!(matches!(dec_err(&[0xE0, 0x01, 0x00], V3), DecodeError::Malformed(_)));
    assert!(matches!(dec_err(&[0xE1, 0x00], V3), DecodeError::Malformed(_)));
}

#[test]
fn auth_decodes_in_v5_only() {
    assert_eq!(dec_ok(&[0xF0, 0x00], V5), Packet::Auth(Box::default()));
    let a = dec_ok(&[0xF0, 0x05, 0x18, 0x03, 0x15, 0x00, 0x00], V5);
    let Packet::Auth(a) = a else { panic!() };
    assert_eq!(a.code, ReasonCode::CONTINUE_AUTHENTICATION);
    assert_eq!(a.properties.authentication_method.as_deref(), Some(""));
    assert!(matches!(dec_err(&[0xF0, 0x00], V3), DecodeError::Malformed(_)));
    assert!(matches!(dec_err(&[0xF0, 0x01, 0x01], V5), DecodeError::InvalidReasonCode { .. }));
    let cont = Packet::Auth(Box::new(Auth {
        code: ReasonCode::CONTINUE_AUTHENTICATION,
        ..Auth::default()
    }));
    assert_eq!(enc(&cont, ProtocolVersion::V5), [0xF0, 0x02, 0x18, 0x00]);
    assert!(encode(&cont, ProtocolVersion::V311, &mut BytesMut::new()).is_err());
}

#[test]
fn publish_topic_wildcards_and_nul_rejected() {
    for (v, extra) in [(V3, &[][..]), (V5, &[0x00][..])] {
        let with = |topic: &[u8]| {
            let mut b =
                vec![0x30, (2 + topic.len() + extra.len() + 1) as u8, 0x00, topic.len() as u8];
            b.extend_from_slice(topic);
            b.extend_from_slice(extra);
            b.push(b'x');
            b
        };
        let e = dec_err(&with(b"a/+"), v);
        assert!(matches!(e, DecodeError::TopicNameInvalid(_)), "{e:?}");
        assert_eq!(e.reason_code(), ReasonCode::TOPIC_NAME_INVALID);
        assert!(matches!(dec_err(&with(b"a/#"), v), DecodeError::TopicNameInvalid(_)));
        assert!(matches!(dec_err(&with(b"+"), v), DecodeError::TopicNameInvalid(_)));
        assert!(dec(&with(b"a/b"), v).is_ok());
    }
    let nul = [0x30, 0x06, 0x00, 0x03, b'a', 0x00, b'b', b'x'];
    assert!(matches!(dec_err(&nul, V3), DecodeError::Malformed(_)));
    let bad_utf8 = [0x30, 0x06, 0x00, 0x03, b'a', 0xC3, 0x28, b'x'];
    assert!(matches!(dec_err(&bad_utf8, V3), DecodeError::Malformed(_)));
    // Control characters other than U+0000 are allowed.
    let ctl = [0x30, 0x06, 0x00, 0x03, b'a', 0x01, 0x1F, b'x'];
    assert!(dec(&ctl, V3).is_ok());
}

#[test]
fn publish_flags_and_packet_id() {
    // QoS 3.
    assert!(matches!(
        dec_err(&[0x36, 0x04, 0x00, 0x01, b'a', 0x01], V3),
        DecodeError::Malformed(_)
    ));
    // DUP at QoS 0.
    assert!(matches!(dec_err(&[0x38, 0x03, 0x00, 0x01, b'a'], V3), DecodeError::Malformed(_)));
    // QoS 1 with packet id 0.
    let e = dec_err(&[0x32, 0x05, 0x00, 0x01, b'a', 0x00, 0x00], V3);
    assert!(matches!(e, DecodeError::ProtocolError(_)));
    // QoS 2 retained duplicate, id 7, empty payload.
    let p = dec_ok(&[0x3D, 0x05, 0x00, 0x01, b'a', 0x00, 0x07], V3);
    let Packet::Publish(p) = p else { panic!() };
    assert!(p.dup && p.retain && p.qos == QoS::ExactlyOnce && p.packet_id == 7);
    assert!(p.payload.is_empty());
}

#[test]
fn publish_empty_topic_needs_alias() {
    assert!(matches!(dec_err(&[0x30, 0x03, 0x00, 0x00, b'x'], V3), DecodeError::ProtocolError(_)));
    assert!(matches!(
        dec_err(&[0x30, 0x04, 0x00, 0x00, 0x00, b'x'], V5),
        DecodeError::ProtocolError(_)
    ));
    let p = dec_ok(&[0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x05, b'x'], V5);
    let Packet::Publish(p) = p else { panic!() };
    assert_eq!((p.topic.as_str(), p.properties.topic_alias), ("", Some(5)));
    // The encoder refuses the same without an alias, and always for 3.1.1.
    let mut q = publish("", QoS::AtMostOnce, 0);
    assert!(encode(&Packet::Publish(q.clone()), ProtocolVersion::V5, &mut BytesMut::new()).is_err());
    q.properties.topic_alias = Some(1);
    assert!(
        encode(&Packet::Publish(q.clone()), ProtocolVersion::V311, &mut BytesMut::new()).is_err()
    );
    assert!(encode(&Packet::Publish(q), ProtocolVersion::V5, &mut BytesMut::new()).is_ok());
}

#[test]
fn publish_payload_is_zero_copy() {
    let bytes = enc(&Packet::Publish(publish("t", QoS::AtLeastOnce, 9)), ProtocolVersion::V311);
    let mut buf = BytesMut::from(&bytes[..]);
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let Some(Packet::Publish(p)) = decode(&mut buf, V3, BIG).unwrap() else { panic!() };
    assert_eq!(&p.payload[..], b"hi");
    assert!(range.contains(&(p.payload.as_ptr() as usize)));
}

#[test]
fn fixed_header_flags_checked() {
    // SUBSCRIBE, UNSUBSCRIBE and PUBREL need 0010.
    let sub = [0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00];
    assert!(matches!(dec_err(&sub, V3), DecodeError::Malformed(_)));
    assert!(matches!(
        dec_err(&[0xA0, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], V3),
        DecodeError::Malformed(_)
    ));
    assert!(matches!(dec_err(&[0x60, 0x02, 0x00, 0x01], V3), DecodeError::Malformed(_)));
    assert!(dec_ok(&[0x62, 0x02, 0x00, 0x01], V3) == Packet::PubRel(PubResponse::success(1)));
    // Others need 0000, checked from the first byte alone.
    assert!(matches!(dec_err(&[0x41], V3), DecodeError::Malformed(_)));
    assert!(matches!(dec_err(&[0xC1], V5), DecodeError::Malformed(_)));
    assert!(matches!(dec_err(&[0x12], None), DecodeError::Malformed(_)));
    // Reserved type 0.
    assert!(matches!(dec_err(&[0x00, 0x00], V5), DecodeError::Malformed(_)));
}

#[test]
fn first_packet_must_be_connect() {
    let e = dec_err(&[0xC0, 0x00], None);
    assert!(matches!(e, DecodeError::ProtocolError(_)));
    assert_eq!(e.reason_code(), ReasonCode::PROTOCOL_ERROR);
    assert_eq!(e.kind(), "protocol_error");
}

#[test]
fn remaining_length_rules() {
    // Incomplete headers need more bytes.
    assert_eq!(dec(&[], V3), Ok(None));
    assert_eq!(dec(&[0x30], V3), Ok(None));
    assert_eq!(dec(&[0x30, 0x80, 0x80, 0x80], V3), Ok(None));
    // Five bytes of remaining length.
    let e = dec_err(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F], V3);
    assert!(matches!(e, DecodeError::Malformed(_)));
    assert!(matches!(dec_err(&[0x30, 0x80, 0x80, 0x80, 0x80], V3), DecodeError::Malformed(_)));
    // Non-minimal encodings are accepted.
    assert_eq!(dec_ok(&[0xC0, 0x80, 0x00], V3), Packet::PingReq);
    assert_eq!(dec_ok(&[0xD0, 0x80, 0x80, 0x80, 0x00], V3), Packet::PingResp);
}

#[test]
fn too_large_detected_from_header_alone() {
    // Announces 2_097_151 bytes of body; none of it is present.
    let e = decode(&mut BytesMut::from(&[0x30, 0xFF, 0xFF, 0x7F][..]), V3, 1024).unwrap_err();
    assert_eq!(e, DecodeError::PacketTooLarge { size: 2_097_155, max: 1024 });
    assert_eq!((e.reason_code(), e.kind()), (ReasonCode::PACKET_TOO_LARGE, "packet_too_large"));
    // The limit counts the fixed header: a 4-byte PUBACK fits in 4, not in 3.
    let puback = [0x40, 0x02, 0x00, 0x01];
    assert!(decode(&mut BytesMut::from(&puback[..]), V3, 4).is_ok());
    assert!(decode(&mut BytesMut::from(&puback[..2]), V3, 3).is_err());
}

#[test]
fn trailing_bytes_rejected() {
    assert!(matches!(dec_err(&[0x40, 0x03, 0x00, 0x01, 0x00], V3), DecodeError::Malformed(_)));
    assert!(matches!(dec_err(&[0xC0, 0x01, 0x00], V3), DecodeError::Malformed(_)));
    assert!(matches!(dec_err(&[0xB0, 0x03, 0x00, 0x01, 0x00], V3), DecodeError::Malformed(_)));
    let c = connect_bytes(b"MQTT", 4, 0x02, None, &[0xAA]);
    assert!(matches!(dec_err(&c, None), DecodeError::Malformed(_)));
    // A field running past the body is malformed too, even with more bytes in the buffer.
    let e = dec_err(&[0x30, 0x03, 0x00, 0x05, b'a', b'b', b'c', b'd', b'e'], V3);
    assert!(matches!(e, DecodeError::Malformed(_)));
}

#[test]
fn connect_protocol_name_and_level() {
    let mqisdp = connect_bytes(b"MQIsdp", 3, 0x02, None, &[]);
    let e = dec_err(&mqisdp, None);
    assert_eq!(e, DecodeError::UnsupportedProtocolVersion(3));
    assert_eq!((e.reason_code(), e.kind()), (ReasonCode(0x84), "unsupported_protocol"));
    assert_eq!(
        dec_err(&connect_bytes(b"MQTT", 6, 2, None, &[]), None),
        DecodeError::UnsupportedProtocolVersion(6)
    );
    assert_eq!(
        dec_err(&connect_bytes(b"MQTX", 4, 2, None, &[]), None),
        DecodeError::InvalidProtocolName
    );
    let Packet::Connect(c) = dec_ok(&connect_bytes(b"MQTT", 4, 0x02, None, &[]), None) else {
        panic!()
    };
    assert_eq!(
        (c.protocol, c.clean_start, c.keep_alive, c.client_id.as_str()),
        (ProtocolVersion::V311, true, 60, "c")
    );
    // A second CONNECT is parsed per its own level.
    let Packet::Connect(c) = dec_ok(&connect_bytes(b"MQTT", 5, 0, Some(&[]), &[]), V3) else {
        panic!()
    };
    assert_eq!(c.protocol, ProtocolVersion::V5);
}

#[test]
fn connect_flags_checked() {
    let malformed = |flags: u8, rest: &[u8]| {
        let e = dec_err(&connect_bytes(b"MQTT", 4, flags, None, rest), None);
        assert!(matches!(e, DecodeError::Malformed(_)), "flags {flags:#x}: {e:?}");
    };
    malformed(0x03, &[]); // reserved bit
    malformed(0x08, &[]); // will QoS without will flag
    malformed(0x20, &[]); // will retain without will flag
    malformed(0x1C, &[0, 1, b't', 0, 0]); // will QoS 3
    malformed(0x40, &[0, 0]); // 3.1.1 password without user name
                              // MQTT 5 allows a password without a user name.
    let Packet::Connect(c) =
        dec_ok(&connect_bytes(b"MQTT", 5, 0x40, Some(&[]), &[0, 1, 0xFF]), None)
    else {
        panic!()
    };
    assert_eq!((c.username, c.password), (None, Some(Bytes::from_static(&[0xFF]))));
    // Will with QoS 1, retain; user name and password.
    let rest = [0, 1, b't', 0, 2, b'h', b'i', 0, 1, b'u', 0, 1, b'p'];
    let Packet::Connect(c) = dec_ok(&connect_bytes(b"MQTT", 4, 0xEC, None, &rest), None) else {
        panic!()
    };
    let w = c.will.as_ref().unwrap();
    assert_eq!(
        (w.topic.as_str(), &w.payload[..], w.qos, w.retain),
        ("t", &b"hi"[..], QoS::AtLeastOnce, true)
    );
    assert_eq!((c.username.as_deref(), c.password.as_deref()), (Some("u"), Some(&b"p"[..])));
    // Will topic with a wildcard, or empty.
    let e = dec_err(&connect_bytes(b"MQTT", 4, 0x04, None, &[0, 1, b'#', 0, 0]), None);
    assert!(matches!(e, DecodeError::TopicNameInvalid(_)));
    let e = dec_err(&connect_bytes(b"MQTT", 4, 0x04, None, &[0, 0, 0, 0]), None);
    assert!(matches!(e, DecodeError::TopicNameInvalid(_)));
}

#[test]
fn connect_properties() {
    let ok = |props: &[u8]| dec(&connect_bytes(b"MQTT", 5, 0x02, Some(props), &[]), None);
    let Ok(Some(Packet::Connect(c))) = ok(&[0x11, 0, 0, 0, 10, 0x21, 0, 5, 0x27, 0, 0, 1, 0])
    else {
        panic!()
    };
    let p = &c.properties;
    assert_eq!(
        (p.session_expiry_interval, p.receive_maximum, p.maximum_packet_size),
        (Some(10), Some(5), Some(256))
    );
    assert_eq!(ok(&[0x21, 0, 0]), Err(DecodeError::InvalidPropertyValue(0x21)));
    assert_eq!(ok(&[0x27, 0, 0, 0, 0]), Err(DecodeError::InvalidPropertyValue(0x27)));
    assert_eq!(ok(&[0x17, 2]), Err(DecodeError::InvalidPropertyValue(0x17)));
    assert_eq!(ok(&[0x19, 2]), Err(DecodeError::InvalidPropertyValue(0x19)));
    assert_eq!(
        ok(&[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 1]),
        Err(DecodeError::DuplicateProperty(0x11))
    );
    assert!(matches!(ok(&[0x24, 1]), Err(DecodeError::PropertyNotAllowed { id: 0x24, .. })));
    assert!(matches!(ok(&[0x16, 0, 0]), Err(DecodeError::ProtocolError(_))));
    // Will properties: will delay is allowed there and only there.
    let rest = [0x05, 0x18, 0, 0, 0, 9, 0, 1, b't', 0, 0];
    let Packet::Connect(c) = dec_ok(&connect_bytes(b"MQTT", 5, 0x06, Some(&[]), &rest), None)
    else {
        panic!()
    };
    assert_eq!(c.will.unwrap().properties.will_delay_interval, Some(9));
    assert!(matches!(
        ok(&[0x18, 0, 0, 0, 9]),
        Err(DecodeError::PropertyNotAllowed { id: 0x18, .. })
    ));
}

#[test]
fn publish_properties_are_boxed_only_when_set() {
    let d = |props: &[u8]| match dec(&v5_publish_with_props(props), V5) {
        Ok(Some(Packet::Publish(p))) => p.properties,
        other => panic!("{other:?}"),
    };
    // An empty list: nothing boxed, reads see an empty set.
    let none = d(&[]);
    assert!(none.is_empty() && none.content_type.is_none());
    assert_eq!(none, PublishProperties::none());
    // Only a topic alias: taken out, the set is gone.
    let mut alias = d(&[0x23, 0, 7]);
    assert!(!alias.is_empty());
    assert_eq!(alias.take_topic_alias(), Some(7));
    assert!(alias.is_empty() && alias.get_mut().is_none());
    // A topic alias and more: the rest stays.
    let mut both = d(&[0x23, 0, 7, 0x02, 0, 0, 0, 9]);
    assert_eq!(both.take_topic_alias(), Some(7));
    assert_eq!((both.topic_alias, both.message_expiry_interval), (None, Some(9)));
    assert!(both.get_mut().is_some());
    // Writing through `DerefMut` makes a set; equality looks through the box.
    let mut made = PublishProperties::none();
    made.content_type = Some("text/plain".into());
    let expect = Properties { content_type: Some("text/plain".into()), ..Properties::default() };
    assert_eq!(made, PublishProperties::from(expect));
    assert_eq!(PublishProperties::from(Properties::default()), PublishProperties::none());
}

#[test]
fn publish_properties() {
    let d = |props: &[u8]| dec(&v5_publish_with_props(props), V5);
    assert_eq!(d(&[0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 1]), Err(DecodeError::DuplicateProperty(0x02)));
    assert_eq!(d(&[0x01, 2]), Err(DecodeError::InvalidPropertyValue(0x01)));
    assert_eq!(d(&[0x23, 0, 0]), Err(DecodeError::InvalidPropertyValue(0x23)));
    assert_eq!(d(&[0x0B, 0]), Err(DecodeError::InvalidPropertyValue(0x0B)));
    assert_eq!(d(&[0x7F, 0]), Err(DecodeError::UnknownProperty(0x7F)));
    assert_eq!(d(&[0x00]), Err(DecodeError::UnknownProperty(0)));
    assert!(matches!(
        d(&[0x11, 0, 0, 0, 1]),
        Err(DecodeError::PropertyNotAllowed { id: 0x11, packet: "PUBLISH" })
    ));
    assert!(matches!(d(&[0x08, 0, 1, b'+']), Err(DecodeError::InvalidPropertyValue(0x08))));
    // Property length past the body; property value past the property list.
    assert!(matches!(d(&[0x02, 0, 0]).err(), Some(DecodeError::Malformed(_))));
    let mut bad = v5_publish_with_props(&[0x02, 0, 0, 0, 1]);
    bad[7] = 3;
    assert!(matches!(dec_err(&bad, V5), DecodeError::Malformed(_)));
    // Subscription identifiers and user properties may repeat on PUBLISH.
    let props =
        [0x0B, 0x01, 0x0B, 0xFF, 0x7F, 0x26, 0, 1, b'k', 0, 1, b'v', 0x26, 0, 1, b'k', 0, 0];
    let Ok(Some(Packet::Publish(p))) = d(&props) else { panic!() };
    assert_eq!(p.properties.subscription_identifiers, vec![1, 16_383]);
    assert_eq!(
        p.properties.user_properties,
        vec![("k".into(), "v".into()), ("k".into(), "".into())]
    );
    assert_eq!(&p.payload[..], b"x");
    // A property identifier in a non-minimal variable byte integer still names the property.
    let Ok(Some(Packet::Publish(p))) = d(&[0x82, 0x00, 0, 0, 0, 7]) else { panic!() };
    assert_eq!(p.properties.message_expiry_interval, Some(7));
}

#[test]
fn user_properties_past_the_cap_are_stepped_over() {
    let capped = |props: &[u8], max: usize| {
        let mut buf = BytesMut::from(&v5_publish_with_props(props)[..]);
        decode_capped(&mut buf, V5, usize::MAX, max)
    };
    // Four user properties (one with invalid UTF-8, one with U+0000), then a topic alias.
    let mut props = Vec::new();
    for (k, v) in [(&b"a"[..], &b"1"[..]), (b"b", b"2"), (b"\xFF", b"3"), (b"d", b"\0")] {
        props.extend_from_slice(&[0x26, 0, k.len() as u8]);
        props.extend_from_slice(k);
        props.extend_from_slice(&[0, v.len() as u8]);
        props.extend_from_slice(v);
    }
    props.extend_from_slice(&[0x23, 0, 5]);
    // Limit 1: two kept (one over, so the caller sees it is over); the rest only stepped over,
    // the properties after them still decoded.
    let Ok(Some(Packet::Publish(p))) = capped(&props, 1) else { panic!() };
    assert_eq!(
        p.properties.user_properties,
        vec![("a".into(), "1".into()), ("b".into(), "2".into())]
    );
    assert_eq!(p.properties.topic_alias, Some(5));
    assert_eq!(&p.payload[..], b"x");
    // Without a cap the invalid string is found.
    assert!(matches!(capped(&props, usize::MAX), Err(DecodeError::Malformed(_))));
    // Stepping over still follows the lengths: one that runs past the list is malformed.
    let mut short = props[..props.len() - 3].to_vec();
    short.truncate(short.len() - 1);
    assert!(matches!(capped(&short, 1), Err(DecodeError::Malformed(_))));
}

#[test]
fn subscribe_rules() {
    let sub = |opts: u8, v| dec(&[0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', opts], v);
    let sub5 = |opts: u8| dec(&[0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', opts], V5);
    assert!(matches!(sub(0x04, V3), Err(DecodeError::Malformed(_))));
    assert!(matches!(sub(0x03, V3), Err(DecodeError::Malformed(_))));
    assert!(sub(0x02, V3).is_ok());
    assert!(matches!(sub5(0x40), Err(DecodeError::Malformed(_))));
    assert!(matches!(sub5(0x30), Err(DecodeError::ProtocolError(_))));
    assert!(matches!(sub5(0x03), Err(DecodeError::ProtocolError(_))));
    let Ok(Some(Packet::Subscribe(s))) = sub5(0x2D) else { panic!() };
    let o = s.filters[0].options;
    assert_eq!(
        (o.qos, o.no_local, o.retain_as_published, o.retain_handling),
        (QoS::AtLeastOnce, true, true, RetainHandling::DoNotSend)
    );
    // No filter at all; packet id 0.
    assert!(matches!(dec_err(&[0x82, 0x02, 0x00, 0x01], V3), DecodeError::ProtocolError(_)));
    assert!(matches!(
        dec_err(&[0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00], V3),
        DecodeError::ProtocolError(_)
    ));
    // One subscription identifier only.
    let two_ids = [0x82, 0x0B, 0x00, 0x01, 0x04, 0x0B, 0x01, 0x0B, 0x02, 0x00, 0x01, b'a', 0x00];
    assert_eq!(dec_err(&two_ids, V5), DecodeError::DuplicateProperty(0x0B));
    // Unsubscribe with no filter.
    assert!(matches!(dec_err(&[0xA2, 0x02, 0x00, 0x01], V3), DecodeError::ProtocolError(_)));
    assert!(matches!(dec_err(&[0xA2, 0x03, 0x00, 0x01, 0x00], V5), DecodeError::ProtocolError(_)));
}

#[test]
fn pub_response_short_forms() {
    let ack = |code, properties| Packet::PubAck(PubResponse { packet_id: 5, code, properties });
    assert_eq!(
        dec_ok(&[0x40, 0x02, 0x00, 0x05], V5),
        ack(ReasonCode::SUCCESS, PublishProperties::none())
    );
    assert_eq!(
        dec_ok(&[0x40, 0x03, 0x00, 0x05, 0x10], V5),
        ack(ReasonCode(0x10), PublishProperties::none())
    );
    assert_eq!(
        dec_ok(&[0x40, 0x04, 0x00, 0x05, 0x00, 0x00], V5),
        ack(ReasonCode::SUCCESS, PublishProperties::none())
    );
    assert!(matches!(
        dec_err(&[0x40, 0x03, 0x00, 0x05, 0x01], V5),
        DecodeError::InvalidReasonCode { .. }
    ));
    assert!(matches!(
        dec_err(&[0x70, 0x03, 0x00, 0x05, 0x10], V5),
        DecodeError::InvalidReasonCode { .. }
    ));
    assert!(matches!(dec_err(&[0x40, 0x02, 0x00, 0x00], V5), DecodeError::ProtocolError(_)));
    assert_eq!(
        enc(&ack(ReasonCode::SUCCESS, PublishProperties::none()), ProtocolVersion::V5),
        [0x40, 2, 0, 5]
    );
    assert_eq!(
        enc(&ack(ReasonCode(0x10), PublishProperties::none()), ProtocolVersion::V5),
        [0x40, 3, 0, 5, 0x10]
    );
    let props = Properties { reason_string: Some("r".into()), ..Properties::default() };
    assert_eq!(
        enc(&ack(ReasonCode::SUCCESS, props.clone().into()), ProtocolVersion::V5),
        [0x40, 8, 0, 5, 0, 4, 0x1F, 0, 1, b'r']
    );
    // 3.1.1 always uses the two-byte form.
    assert_eq!(enc(&ack(ReasonCode(0x10), props.into()), ProtocolVersion::V311), [0x40, 2, 0, 5]);
    let rel = Packet::PubRel(PubResponse::success(1));
    assert_eq!(enc(&rel, ProtocolVersion::V311), [0x62, 2, 0, 1]);
}

#[test]
fn connack_v3_translation() {
    let connack = |code: u8| {
        Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            code: ReasonCode(code),
            properties: Properties::default(),
        }))
    };
    for (v5, v3) in [
        (0x00, 0),
        (0x84, 1),
        (0x85, 2),
        (0x88, 3),
        (0x89, 3),
        (0x80, 3),
        (0x9F, 3),
        (0x86, 4),
        (0x87, 5),
        (0x8A, 5),
    ] {
        assert_eq!(enc(&connack(v5), ProtocolVersion::V311), [0x20, 2, 0, v3], "code {v5:#x}");
    }
    for (v3, v5) in [(0, 0x00), (1, 0x84), (2, 0x85), (3, 0x88), (4, 0x86), (5, 0x87)] {
        assert_eq!(dec_ok(&[0x20, 2, 0, v3], V3), connack(v5));
    }
    assert!(matches!(dec_err(&[0x20, 2, 0, 6], V3), DecodeError::Malformed(_)));
    assert!(matches!(dec_err(&[0x20, 2, 0x02, 0], V3), DecodeError::Malformed(_)));
    assert!(matches!(dec_err(&[0x20, 2, 0x01, 5], V3), DecodeError::ProtocolError(_)));
    assert!(encode(&connack(0x10), ProtocolVersion::V311, &mut BytesMut::new()).is_err());
    assert_eq!(enc(&connack(0x87), ProtocolVersion::V5), [0x20, 3, 0, 0x87, 0]);
    let sp = Packet::ConnAck(Box::new(ConnAck {
        session_present: true,
        code: ReasonCode::SUCCESS,
        properties: Properties::default(),
    }));
    assert_eq!(enc(&sp, ProtocolVersion::V311), [0x20, 2, 1, 0]);
}

#[test]
fn suback_and_unsuback_versions() {
    let suback = Packet::SubAck(Box::new(SubAck {
        packet_id: 3,
        codes: vec![ReasonCode(0), ReasonCode(2), ReasonCode(0x87), ReasonCode(0x80)],
        properties: Properties::default(),
    }));
    assert_eq!(enc(&suback, ProtocolVersion::V311), [0x90, 6, 0, 3, 0, 2, 0x80, 0x80]);
    assert_eq!(enc(&suback, ProtocolVersion::V5), [0x90, 7, 0, 3, 0, 0, 2, 0x87, 0x80]);
    assert!(matches!(dec_err(&[0x90, 3, 0, 3, 0x03], V3), DecodeError::Malformed(_)));
    assert!(matches!(dec_err(&[0x90, 2, 0, 3], V3), DecodeError::ProtocolError(_)));
    let unsuback = Packet::UnsubAck(Box::new(UnsubAck {
        packet_id: 3,
        codes: vec![ReasonCode(0x11)],
        properties: Properties::default(),
    }));
    assert_eq!(enc(&unsuback, ProtocolVersion::V311), [0xB0, 2, 0, 3]);
    assert_eq!(enc(&unsuback, ProtocolVersion::V5), [0xB0, 4, 0, 3, 0, 0x11]);
    assert_eq!(
        dec_ok(&[0xB0, 2, 0, 3], V3),
        Packet::UnsubAck(Box::new(UnsubAck {
            packet_id: 3,
            codes: vec![],
            properties: Properties::default()
        }))
    );
}

#[test]
fn ping_rules() {
    assert_eq!(dec_ok(&[0xC0, 0x00], V5), Packet::PingReq);
    assert_eq!(dec_ok(&[0xD0, 0x00], V3), Packet::PingResp);
    assert_eq!(enc(&Packet::PingReq, ProtocolVersion::V5), [0xC0, 0]);
    assert!(matches!(dec_err(&[0xD0, 0x01, 0x00], V5), DecodeError::Malformed(_)));
}

#[test]
fn consecutive_packets_in_one_buffer() {
    let mut buf = BytesMut::from(&[0xC0, 0x00, 0x40, 0x02, 0x00, 0x09, 0xE0][..]);
    assert_eq!(decode(&mut buf, V3, BIG), Ok(Some(Packet::PingReq)));
    assert_eq!(decode(&mut buf, V3, BIG), Ok(Some(Packet::PubAck(PubResponse::success(9)))));
    assert_eq!(decode(&mut buf, V3, BIG), Ok(None));
    assert_eq!(&buf[..], [0xE0]);
}

#[test]
fn encode_errors_leave_buffer_untouched() {
    let cases: Vec<(Packet, ProtocolVersion)> = vec![
        (Packet::Publish(publish("t", QoS::AtMostOnce, 1)), ProtocolVersion::V5),
        (Packet::Publish(publish("t", QoS::AtLeastOnce, 0)), ProtocolVersion::V5),
        (
            Packet::Publish(Publish { dup: true, ..publish("t", QoS::AtMostOnce, 0) }),
            ProtocolVersion::V311,
        ),
        (Packet::Publish(publish("a/+", QoS::AtMostOnce, 0)), ProtocolVersion::V311),
        (Packet::Publish(publish("a\0", QoS::AtMostOnce, 0)), ProtocolVersion::V311),
        (Packet::Publish(publish(&"x".repeat(65_536), QoS::AtMostOnce, 0)), ProtocolVersion::V311),
        (Packet::PubAck(PubResponse::success(0)), ProtocolVersion::V311),
        (
            Packet::Subscribe(Box::new(Subscribe {
                packet_id: 1,
                filters: vec![],
                properties: Properties::default(),
            })),
            ProtocolVersion::V5,
        ),
        (
            Packet::Unsubscribe(Box::new(Unsubscribe {
                packet_id: 0,
                filters: vec!["a".into()],
                properties: Properties::default(),
            })),
            ProtocolVersion::V5,
        ),
        (
            Packet::SubAck(Box::new(SubAck {
                packet_id: 1,
                codes: vec![ReasonCode(0x11)],
                properties: Properties::default(),
            })),
            ProtocolVersion::V311,
        ),
    ];
    let mut props_cases: Vec<Properties> = vec![
        Properties { receive_maximum: Some(0), ..Properties::default() },
        Properties { topic_alias: Some(0), ..Properties::default() },
        Properties { maximum_packet_size: Some(0), ..Properties::default() },
        Properties { maximum_qos: Some(2), ..Properties::default() },
        Properties { subscription_identifiers: vec![0], ..Properties::default() },
        Properties { subscription_identifiers: vec![268_435_456], ..Properties::default() },
        Properties { response_topic: Some("a/#".into()), ..Properties::default() },
    ];
    props_cases.push(Properties {
        correlation_data: Some(Bytes::from(vec![0; 65_536])),
        ..Properties::default()
    });
    let mut cases = cases;
    for properties in props_cases {
        cases.push((
            Packet::Disconnect(Box::new(Disconnect { code: ReasonCode(0), properties })),
            ProtocolVersion::V5,
        ));
    }
    for (packet, version) in cases {
        let mut buf = BytesMut::from(&b"prefix"[..]);
        assert!(encode(&packet, version, &mut buf).is_err(), "{packet:?}");
        assert_eq!(&buf[..], b"prefix");
    }
}

#[test]
fn encode_rejects_remaining_length_over_limit() {
    let mut p = publish("t", QoS::AtMostOnce, 0);
    p.payload = Bytes::from(vec![0u8; 268_435_455 - 3 + 1]);
    let mut buf = BytesMut::new();
    let e = encode(&Packet::Publish(p.clone()), ProtocolVersion::V311, &mut buf).unwrap_err();
    assert_eq!(e, EncodeError::PacketTooLarge(268_435_456));
    assert_eq!((e.reason_code(), e.kind()), (ReasonCode::PACKET_TOO_LARGE, "packet_too_large"));
    assert!(buf.is_empty());
    p.payload = p.payload.slice(1..);
    assert_eq!(encode(&Packet::Publish(p), ProtocolVersion::V311, &mut buf), Ok(268_435_460));
}

#[test]
fn error_codes_and_kinds() {
    let cases = [
        (DecodeError::Malformed("x"), 0x81, "malformed"),
        (DecodeError::UnknownProperty(0x7F), 0x81, "malformed"),
        (DecodeError::ProtocolError("x"), 0x82, "protocol_error"),
        (DecodeError::DuplicateProperty(1), 0x82, "protocol_error"),
        (DecodeError::InvalidPropertyValue(1), 0x82, "protocol_error"),
        (DecodeError::PropertyNotAllowed { id: 1, packet: "AUTH" }, 0x82, "protocol_error"),
        (DecodeError::InvalidReasonCode { packet: "AUTH", code: 1 }, 0x82, "protocol_error"),
        (DecodeError::PacketTooLarge { size: 2, max: 1 }, 0x95, "packet_too_large"),
        (DecodeError::UnsupportedProtocolVersion(3), 0x84, "unsupported_protocol"),
        (DecodeError::InvalidProtocolName, 0x84, "unsupported_protocol"),
        (DecodeError::TopicNameInvalid("x"), 0x90, "topic_name_invalid"),
    ];
    for (e, code, kind) in cases {
        assert_eq!((e.reason_code(), e.kind()), (ReasonCode(code), kind), "{e}");
    }
}
