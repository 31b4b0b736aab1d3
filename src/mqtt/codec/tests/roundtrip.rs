//! Property tests of the codec: encode-then-decode round trips of arbitrary valid packets of
//! every type in both versions, byte-by-byte feeding, the maximum packet size boundary, and
//! decoding arbitrary or mutated bytes (never panics; whatever decodes re-encodes to itself).

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::super::decode::{
    AUTH_CODES, CONNACK_CODES, DISCONNECT_CODES, PUBACK_CODES, PUBREL_CODES, SUBACK_CODES,
    UNSUBACK_CODES,
};
use super::super::*;

const MAX_VBI: u32 = 268_435_455;

/// Where a property list sits; decides which properties the generator may set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Connect,
    Will,
    ConnAck,
    Publish,
    PubResp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

fn text(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>().prop_filter("no U+0000", |c| *c != '\0'), 0..max)
        .prop_map(|v| v.into_iter().collect())
}

fn topic() -> impl Strategy<Value = String> {
    vec(any::<char>().prop_filter("topic char", |c| !matches!(c, '\0' | '+' | '#')), 1..10)
        .prop_map(|v| v.into_iter().collect())
}

fn bin() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..12).prop_map(Bytes::from)
}

fn opt<S: Strategy>(s: S) -> impl Strategy<Value = Option<S::Value>> {
    option::weighted(0.3, s)
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    opt(0u8..=1)
}

prop_compose! {
    /// Properties with every field possibly set (values valid, contexts ignored).
    fn all_props()(
        a in (flag(), opt(any::<u32>()), opt(text(6)), opt(topic()), opt(bin()),
              vec(1..=MAX_VBI, 0..3)),
        b in (opt(any::<u32>()), opt(text(6)), opt(any::<u16>()), opt(text(6)), opt(bin()),
              flag(), opt(any::<u32>()), flag()),
        c in (opt(text(6)), opt(text(6)), opt(text(6)), opt(1..=u16::MAX), opt(any::<u16>()),
              opt(1..=u16::MAX), flag(), flag()),
        d in (vec((text(4), text(4)), 0..3), opt(1..=u32::MAX), flag(), flag(), flag()),
    ) -> Properties {
        Properties {
            payload_format_indicator: a.0,
            message_expiry_interval: a.1,
            content_type: a.2,
            response_topic: a.3,
            correlation_data: a.4,
            subscription_identifiers: a.5,
            session_expiry_interval: b.0,
            assigned_client_identifier: b.1,
            server_keep_alive: b.2,
            authentication_method: b.3,
            authentication_data: b.4,
            request_problem_information: b.5,
            will_delay_interval: b.6,
            request_response_information: b.7,
            response_information: c.0,
            server_reference: c.1,
            reason_string: c.2,
            receive_maximum: c.3,
            topic_alias_maximum: c.4,
            topic_alias: c.5,
            maximum_qos: c.6,
            retain_available: c.7,
            user_properties: d.0,
            maximum_packet_size: d.1,
            wildcard_subscription_available: d.2,
            subscription_identifier_available: d.3,
            shared_subscription_available: d.4,
        }
    }
}

fn keep<T>(allowed: bool, v: Option<T>) -> Option<T> {
    if allowed {
        v
    } else {
        None
    }
}

/// Clears every property the spec does not allow in `ctx` (the test's own copy of the table).
fn restrict(p: Properties, ctx: Ctx) -> Properties {
    use Ctx::*;
    let is = |set: &[Ctx]| set.contains(&ctx);
    let will_pub = is(&[Publish, Will]);
    let conn = is(&[Connect, ConnAck]);
    let mut out = Properties {
        payload_format_indicator: keep(will_pub, p.payload_format_indicator),
        message_expiry_interval: keep(will_pub, p.message_expiry_interval),
        content_type: keep(will_pub, p.content_type),
        response_topic: keep(will_pub, p.response_topic),
        correlation_data: keep(will_pub, p.correlation_data),
        subscription_identifiers: match ctx {
            Publish => p.subscription_identifiers,
            Subscribe => p.subscription_identifiers.into_iter().take(1).collect(),
            _ => Vec::new(),
        },
        session_expiry_interval: keep(
            is(&[Connect, ConnAck, Disconnect]),
            p.session_expiry_interval,
        ),
        assigned_client_identifier: keep(ctx == ConnAck, p.assigned_client_identifier),
        server_keep_alive: keep(ctx == ConnAck, p.server_keep_alive),
        authentication_method: keep(is(&[Connect, ConnAck, Auth]), p.authentication_method),
        authentication_data: keep(is(&[Connect, ConnAck, Auth]), p.authentication_data),
        request_problem_information: keep(ctx == Connect, p.request_problem_information),
        will_delay_interval: keep(ctx == Will, p.will_delay_interval),
        request_response_information: keep(ctx == Connect, p.request_response_information),
        response_information: keep(ctx == ConnAck, p.response_information),
        server_reference: keep(is(&[ConnAck, Disconnect]), p.server_reference),
        reason_string: keep(
            is(&[ConnAck, PubResp, SubAck, UnsubAck, Disconnect, Auth]),
            p.reason_string,
        ),
        receive_maximum: keep(conn, p.receive_maximum),
        topic_alias_maximum: keep(conn, p.topic_alias_maximum),
        topic_alias: keep(ctx == Publish, p.topic_alias),
        maximum_qos: keep(ctx == ConnAck, p.maximum_qos),
        retain_available: keep(ctx == ConnAck, p.retain_available),
        user_properties: p.user_properties,
        maximum_packet_size: keep(conn, p.maximum_packet_size),
        wildcard_subscription_available: keep(ctx == ConnAck, p.wildcard_subscription_available),
        subscription_identifier_available: keep(
            ctx == ConnAck,
            p.subscription_identifier_available,
        ),
        shared_subscription_available: keep(ctx == ConnAck, p.shared_subscription_available),
    };
    if ctx == Connect && out.authentication_data.is_some() {
        out.authentication_method.get_or_insert_with(|| "m".into());
    }
    out
}

/// Properties for `ctx` in 5.0, always empty for 3.1.1.
fn props(v5: bool, ctx: Ctx) -> BoxedStrategy<Properties> {
    if v5 {
        all_props().prop_map(move |p| restrict(p, ctx)).boxed()
    } else {
        Just(Properties::default()).boxed()
    }
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn code(list: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    proptest::sample::select(list).prop_map(ReasonCode)
}

fn codes(v5: bool, v5_list: &'static [u8], v3_list: &'static [u8]) -> BoxedStrategy<ReasonCode> {
    code(if v5 { v5_list } else { v3_list }).boxed()
}

fn packet_id() -> impl Strategy<Value = u16> {
    1..=u16::MAX
}

fn arb_connect(v5: bool) -> impl Strategy<Value = Packet> {
    let will = (topic(), bin(), qos(), any::<bool>(), props(v5, Ctx::Will)).prop_map(
        |(topic, payload, qos, retain, properties)| LastWill {
            topic,
            payload,
            qos,
            retain,
            properties,
        },
    );
    (
        (any::<bool>(), any::<u16>(), text(8)),
        opt(will),
        opt(text(8)),
        opt(bin()),
        props(v5, Ctx::Connect),
    )
        .prop_map(
            move |((clean_start, keep_alive, client_id), will, username, password, properties)| {
                Packet::Connect(Box::new(Connect {
                    protocol: if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V311 },
                    clean_start,
                    keep_alive,
                    client_id,
                    will,
                    // 3.1.1 has no password without a user name.
                    username: if !v5 && password.is_some() {
                        Some(username.unwrap_or_default())
                    } else {
                        username
                    },
                    password,
                    properties,
                }))
            },
        )
}

fn arb_publish(v5: bool) -> impl Strategy<Value = Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic(),
        any::<bool>(),
        packet_id(),
        props(v5, Ctx::Publish),
        bin(),
    )
        .prop_map(move |(qos, dup, retain, topic, drop_topic, id, properties, payload)| {
            let at_most_once = qos == QoS::AtMostOnce;
            let topic =
                if drop_topic && properties.topic_alias.is_some() { String::new() } else { topic };
            Packet::Publish(Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                packet_id: if at_most_once { 0 } else { id },
                properties: properties.into(),
                payload,
            })
        })
}

fn arb_pub_response(v5: bool) -> impl Strategy<Value = Packet> {
    (
        0..4u8,
        packet_id(),
        codes(v5, PUBACK_CODES, &[0]),
        codes(v5, PUBREL_CODES, &[0]),
        props(v5, Ctx::PubResp),
    )
        .prop_map(|(kind, packet_id, ack_code, rel_code, properties)| {
            let r = |code| PubResponse { packet_id, code, properties: properties.clone().into() };
            match kind {
                0 => Packet::PubAck(r(ack_code)),
                1 => Packet::PubRec(r(ack_code)),
                2 => Packet::PubRel(r(rel_code)),
                _ => Packet::PubComp(r(rel_code)),
            }
        })
}

fn arb_subscribe(v5: bool) -> impl Strategy<Value = Packet> {
    let retain_handling = prop_oneof![
        Just(RetainHandling::SendAtSubscribe),
        Just(RetainHandling::SendIfNew),
        Just(RetainHandling::DoNotSend)
    ];
    let options = (qos(), any::<bool>(), any::<bool>(), retain_handling).prop_map(
        move |(qos, no_local, retain_as_published, retain_handling)| {
            if v5 {
                SubscriptionOptions { qos, no_local, retain_as_published, retain_handling }
            } else {
                SubscriptionOptions { qos, ..Default::default() }
            }
        },
    );
    let filter =
        (text(8), options).prop_map(|(filter, options)| SubscribeFilter { filter, options });
    (packet_id(), vec(filter, 1..4), props(v5, Ctx::Subscribe)).prop_map(
        |(packet_id, filters, properties)| {
            Packet::Subscribe(Box::new(Subscribe { packet_id, filters, properties }))
        },
    )
}

fn arb_other(v5: bool) -> impl Strategy<Value = Packet> {
    let connack = (
        any::<bool>(),
        codes(v5, CONNACK_CODES, &[0, 0x84, 0x85, 0x88, 0x86, 0x87]),
        props(v5, Ctx::ConnAck),
    )
        .prop_map(|(sp, code, properties)| {
            Packet::ConnAck(Box::new(ConnAck {
                session_present: sp && code == ReasonCode::SUCCESS,
                code,
                properties,
            }))
        });
    let suback =
        (packet_id(), vec(codes(v5, SUBACK_CODES, &[0, 1, 2, 0x80]), 1..4), props(v5, Ctx::SubAck))
            .prop_map(|(packet_id, codes, properties)| {
                Packet::SubAck(Box::new(SubAck { packet_id, codes, properties }))
            });
    let unsubscribe = (packet_id(), vec(text(8), 1..4), props(v5, Ctx::Unsubscribe)).prop_map(
        |(packet_id, filters, properties)| {
            Packet::Unsubscribe(Box::new(Unsubscribe { packet_id, filters, properties }))
        },
    );
    let unsuback = (packet_id(), vec(code(UNSUBACK_CODES), 1..4), props(v5, Ctx::UnsubAck))
        .prop_map(move |(packet_id, codes, properties)| {
            Packet::UnsubAck(Box::new(UnsubAck {
                packet_id,
                codes: if v5 { codes } else { Vec::new() },
                properties,
            }))
        });
    let disconnect = (codes(v5, DISCONNECT_CODES, &[0]), props(v5, Ctx::Disconnect)).prop_map(
        |(code, properties)| Packet::Disconnect(Box::new(Disconnect { code, properties })),
    );
    let auth = (code(AUTH_CODES), props(true, Ctx::Auth))
        .prop_map(|(code, properties)| Packet::Auth(Box::new(Auth { code, properties })));
    let mut options = vec![
        connack.boxed(),
        suback.boxed(),
        unsubscribe.boxed(),
        unsuback.boxed(),
        disconnect.boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
    ];
    if v5 {
        options.push(auth.boxed());
    }
    proptest::strategy::Union::new(options)
}

/// Any valid packet for the version, with the version.
fn arb_packet() -> impl Strategy<Value = (Packet, ProtocolVersion)> {
    any::<bool>().prop_flat_map(|v5| {
        let version = if v5 { ProtocolVersion::V5 } else { ProtocolVersion::V311 };
        prop_oneof![
            arb_connect(v5),
            arb_publish(v5),
            arb_pub_response(v5),
            arb_subscribe(v5),
            arb_other(v5),
        ]
        .prop_map(move |p| (p, version))
    })
}

fn encoded(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut buf = BytesMut::new();
    let n = encode(packet, version, &mut buf).expect("valid packet must encode");
    assert_eq!(n, buf.len());
    buf
}

/// Decodes a whole stream the way a session would: CONNECT first fixes the version.
fn decode_stream(bytes: &[u8], mut version: Option<ProtocolVersion>, max: usize) {
    let mut buf = BytesMut::from(bytes);
    loop {
        match decode(&mut buf, version, max) {
            Ok(Some(packet)) => {
                let v = match (&packet, version) {
                    (Packet::Connect(c), _) => c.protocol,
                    (_, Some(v)) => v,
                    (_, None) => panic!("non-CONNECT decoded before CONNECT"),
                };
                version.get_or_insert(v);
                // Whatever decodes re-encodes, and decodes back to the same packet.
                let again = encoded(&packet, v);
                let mut again = again;
                let back = decode(&mut again, Some(v), usize::MAX);
                assert_eq!(back, Ok(Some(packet)));
                assert!(again.is_empty());
            }
            Ok(None) | Err(_) => return,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn roundtrip((packet, version) in arb_packet()) {
        let bytes = encoded(&packet, version);
        let before_connect = matches!(packet, Packet::Connect(_)).then_some(None);
        for v in [Some(version)].into_iter().chain(before_connect) {
            let mut buf = bytes.clone();
            prop_assert_eq!(decode(&mut buf, v, bytes.len()), Ok(Some(packet.clone())));
            prop_assert!(buf.is_empty());
        }
        let e = decode(&mut bytes.clone(), Some(version), bytes.len() - 1).unwrap_err();
        prop_assert_eq!(e, DecodeError::PacketTooLarge { size: bytes.len(), max: bytes.len() - 1 });
    }

    #[test]
    fn byte_by_byte((packet, version) in arb_packet()) {
        let bytes = encoded(&packet, version);
        let mut buf = BytesMut::new();
        for (i, &b) in bytes.iter().enumerate() {
            prop_assert_eq!(decode(&mut buf, Some(version), usize::MAX), Ok(None));
            prop_assert_eq!(buf.len(), i);
            buf.extend_from_slice(&[b]);
        }
        prop_assert_eq!(decode(&mut buf, Some(version), usize::MAX), Ok(Some(packet)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn two_packets_back_to_back(a in arb_packet(), b in arb_packet()) {
        let version = a.1;
        let mut buf = encoded(&a.0, version);
        let first_len = buf.len();
        encode(&b.0, version, &mut buf).ok();
        let mut rest = buf.split_off(first_len);
        prop_assert_eq!(decode(&mut buf, Some(version), usize::MAX), Ok(Some(a.0)));
        // The second packet was encoded for a's version; it must decode or fail, never panic.
        let _ = decode(&mut rest, Some(version), usize::MAX);
    }

    #[test]
    fn arbitrary_bytes_never_panic(selector in 0u8..3, bytes in vec(any::<u8>(), 0..64)) {
        let version = [None, Some(ProtocolVersion::V311), Some(ProtocolVersion::V5)][selector as usize];
        decode_stream(&bytes, version, usize::MAX);
        decode_stream(&bytes, version, 16);
    }

    #[test]
    fn mutated_packets_never_panic(
        (packet, version) in arb_packet(),
        edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encoded(&packet, version).to_vec();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        decode_stream(&bytes, Some(version), usize::MAX);
        decode_stream(&bytes, None, usize::MAX);
        bytes.truncate(cut.index(bytes.len() + 1));
        decode_stream(&bytes, Some(version), usize::MAX);
    }
}

#[test]
fn seed_corpus_round_trips() {
    for (name, selector, packets) in super::seeds::seed_streams() {
        let mut buf = BytesMut::new();
        for (packet, version) in &packets {
            encode(packet, *version, &mut buf).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let mut version = [None, Some(ProtocolVersion::V311), Some(ProtocolVersion::V5)]
            [usize::from(selector % 3)];
        for (packet, _) in packets {
            let got =
                decode(&mut buf, version, usize::MAX).unwrap_or_else(|e| panic!("{name}: {e}"));
            if let Packet::Connect(c) = &packet {
                version = Some(c.protocol);
            }
            assert_eq!(got, Some(packet), "{name}");
        }
        assert!(buf.is_empty(), "{name}");
    }
}
