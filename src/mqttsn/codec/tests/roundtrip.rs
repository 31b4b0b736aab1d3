//! Property tests of the MQTT-SN codec: encode-then-decode round trips of arbitrary valid
//! messages of every type, and arbitrary or mutated datagrams (never a panic; whatever
//! decodes re-encodes to a datagram that decodes to the same message).

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

use super::super::*;

fn text(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..max).prop_map(|v| v.into_iter().collect())
}

fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = SnQos> {
    prop_oneof![Just(SnQos::Zero), Just(SnQos::One), Just(SnQos::Two), Just(SnQos::MinusOne)]
}

fn code() -> impl Strategy<Value = ReturnCode> {
    any::<u8>().prop_map(ReturnCode)
}

fn topic_ref() -> impl Strategy<Value = TopicRef> {
    prop_oneof![
        any::<u16>().prop_map(TopicRef::Normal),
        any::<u16>().prop_map(TopicRef::Predefined),
        any::<[u8; 2]>().prop_map(TopicRef::Short),
    ]
}

fn topic_spec() -> impl Strategy<Value = TopicSpec> {
    prop_oneof![
        text(40).prop_map(TopicSpec::Name),
        any::<u16>().prop_map(TopicSpec::Predefined),
        any::<[u8; 2]>().prop_map(TopicSpec::Short),
    ]
}

fn will_topic() -> impl Strategy<Value = Option<WillTopic>> {
    option::of((qos(), any::<bool>(), text(30)).prop_map(|(qos, retain, topic)| WillTopic {
        qos,
        retain,
        topic,
    }))
}

fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        (any::<u8>(), any::<u16>())
            .prop_map(|(gw_id, duration)| Packet::Advertise { gw_id, duration }),
        any::<u8>().prop_map(|radius| Packet::SearchGw { radius }),
        (any::<u8>(), bytes(20)).prop_map(|(gw_id, gw_add)| Packet::GwInfo { gw_id, gw_add }),
        (any::<bool>(), any::<bool>(), any::<u16>(), text(30)).prop_map(|(w, c, d, id)| {
            Packet::Connect(Connect { will: w, clean_session: c, duration: d, client_id: id })
        }),
        code().prop_map(|code| Packet::ConnAck { code }),
        Just(Packet::WillTopicReq),
        will_topic().prop_map(Packet::WillTopic),
        Just(Packet::WillMsgReq),
        bytes(400).prop_map(Packet::WillMsg),
        (any::<u16>(), any::<u16>(), text(60)).prop_map(|(topic_id, msg_id, topic_name)| {
            Packet::Register { topic_id, msg_id, topic_name }
        }),
        (any::<u16>(), any::<u16>(), code()).prop_map(|(topic_id, msg_id, code)| Packet::RegAck {
            topic_id,
            msg_id,
            code
        }),
        (any::<bool>(), qos(), any::<bool>(), topic_ref(), any::<u16>(), bytes(600)).prop_map(
            |(dup, qos, retain, topic, msg_id, data)| {
                Packet::Publish(Publish { dup, qos, retain, topic, msg_id, data })
            }
        ),
        (any::<u16>(), any::<u16>(), code()).prop_map(|(topic_id, msg_id, code)| Packet::PubAck {
            topic_id,
            msg_id,
            code
        }),
        any::<u16>().prop_map(|msg_id| Packet::PubComp { msg_id }),
        any::<u16>().prop_map(|msg_id| Packet::PubRec { msg_id }),
        any::<u16>().prop_map(|msg_id| Packet::PubRel { msg_id }),
        (any::<bool>(), qos(), any::<u16>(), topic_spec()).prop_map(|(dup, qos, msg_id, topic)| {
            Packet::Subscribe(Subscribe { dup, qos, msg_id, topic })
        }),
        (qos(), any::<u16>(), any::<u16>(), code()).prop_map(|(qos, topic_id, msg_id, code)| {
            Packet::SubAck { qos, topic_id, msg_id, code }
        }),
        (any::<u16>(), topic_spec())
            .prop_map(|(msg_id, topic)| Packet::Unsubscribe { msg_id, topic }),
        any::<u16>().prop_map(|msg_id| Packet::UnsubAck { msg_id }),
        option::of(text(23).prop_filter("non-empty", |s| !s.is_empty()))
            .prop_map(|client_id| Packet::PingReq { client_id }),
        Just(Packet::PingResp),
        option::of(any::<u16>()).prop_map(|duration| Packet::Disconnect { duration }),
        will_topic().prop_map(Packet::WillTopicUpd),
        code().prop_map(|code| Packet::WillTopicResp { code }),
        bytes(100).prop_map(Packet::WillMsgUpd),
        code().prop_map(|code| Packet::WillMsgResp { code }),
        (0u8..4, bytes(20), vec(any::<u8>(), 1..40)).prop_map(|(radius, node_id, inner)| {
            Packet::Encapsulated { radius, node_id, inner: Bytes::from(inner) }
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_message_round_trips(p in packet()) {
        let mut out = BytesMut::new();
        encode(&p, &mut out).expect("encodes");
        let datagram = out.freeze();
        prop_assert_eq!(decode(&datagram), Ok(p));
    }

    #[test]
    fn garbage_never_panics_and_what_decodes_re_encodes(data in vec(any::<u8>(), 0..300)) {
        let datagram = Bytes::from(data);
        if let Ok(p) = decode(&datagram) {
            // What the gateway's loop dispatches on agrees with the message.
            prop_assert_eq!(header(&datagram).map(|(t, _)| t), Ok(p.msg_type()));
            let mut out = BytesMut::new();
            encode(&p, &mut out).expect("a decoded message encodes");
            prop_assert_eq!(decode(&out.freeze()), Ok(p));
        }
    }

    #[test]
    fn mutated_messages_never_panic(p in packet(), at in any::<usize>(), byte in any::<u8>(), cut in any::<usize>()) {
        let mut out = BytesMut::new();
        encode(&p, &mut out).expect("encodes");
        let mut data = out.to_vec();
        let i = at % data.len();
        data[i] = byte;
        let _ = decode(&Bytes::from(data.clone()));
        data.truncate(cut % (data.len() + 1));
        let _ = decode(&Bytes::from(data));
    }
}
