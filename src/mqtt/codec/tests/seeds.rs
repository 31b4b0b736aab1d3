//! The fuzz seed corpus under `fuzz/corpus/decode/`: a few valid packet streams of both
//! versions, each checked to decode back (`seed_corpus_round_trips`) and written out by the
//! ignored `write_fuzz_seeds` test.

use bytes::{Bytes, BytesMut};

use super::super::*;
use super::publish;

/// One seed file: its name, the selector byte, and the packets (each with the version to encode
/// it for) that follow.
pub(super) type Seed = (&'static str, u8, Vec<(Packet, ProtocolVersion)>);

/// The fuzz seed corpus: (file name, selector byte, packets). The fuzz target reads the first
/// byte as a selector whose value mod 3 picks the version it starts with (0: before CONNECT,
/// 1: 3.1.1, 2: 5.0) and decodes the rest as a stream of packets.
pub(super) fn seed_streams() -> Vec<Seed> {
    use ProtocolVersion::{V311 as P3, V5 as P5};
    let props = |f: fn(&mut Properties)| {
        let mut p = Properties::default();
        f(&mut p);
        p
    };
    let connect = |protocol, will: bool, properties: Properties| {
        Packet::Connect(Box::new(Connect {
            protocol,
            clean_start: true,
            keep_alive: 30,
            client_id: "seed".into(),
            will: will.then(|| LastWill {
                topic: "will/t".into(),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: if protocol == P5 {
                    props(|p| {
                        p.will_delay_interval = Some(5);
                        p.payload_format_indicator = Some(1);
                        p.content_type = Some("text/plain".into());
                    })
                } else {
                    Properties::default()
                },
            }),
            username: Some("user".into()),
            password: Some(Bytes::from_static(b"pw")),
            properties,
        }))
    };
    let qos1 = |props_: Properties| {
        Packet::Publish(Publish {
            properties: props_.into(),
            ..publish("sensors/1/temp", QoS::AtLeastOnce, 1)
        })
    };
    let subscribe = |v5: bool, properties| {
        let o = SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            no_local: v5,
            retain_as_published: v5,
            retain_handling: if v5 {
                RetainHandling::SendIfNew
            } else {
                RetainHandling::SendAtSubscribe
            },
        };
        Packet::Subscribe(Box::new(Subscribe {
            packet_id: 2,
            filters: vec![
                SubscribeFilter { filter: "a/+/c".into(), options: o },
                SubscribeFilter { filter: "#".into(), options: SubscriptionOptions::default() },
            ],
            properties,
        }))
    };
    let unsubscribe = Packet::Unsubscribe(Box::new(Unsubscribe {
        packet_id: 3,
        filters: vec!["a/+/c".into()],
        properties: Properties::default(),
    }));
    let resp = |code: u8, reason: bool| PubResponse {
        packet_id: 1,
        code: ReasonCode(code),
        properties: if reason {
            props(|p| p.reason_string = Some("why".into())).into()
        } else {
            PublishProperties::none()
        },
    };
    let connack = |properties| {
        Packet::ConnAck(Box::new(ConnAck {
            session_present: false,
            code: ReasonCode::SUCCESS,
            properties,
        }))
    };
    let suback = Packet::SubAck(Box::new(SubAck {
        packet_id: 2,
        codes: vec![ReasonCode(1), ReasonCode(0x80)],
        properties: Properties::default(),
    }));
    let unsuback = |codes| {
        Packet::UnsubAck(Box::new(UnsubAck {
            packet_id: 3,
            codes,
            properties: Properties::default(),
        }))
    };
    let disconnect = Packet::Disconnect(Box::new(Disconnect {
        code: ReasonCode(0x04),
        properties: props(|p| p.session_expiry_interval = Some(0)),
    }));
    vec![
        (
            "v3_session",
            0,
            vec![
                (connect(P3, true, Properties::default()), P3),
                (qos1(Properties::default()), P3),
                (Packet::PingReq, P3),
                (subscribe(false, Properties::default()), P3),
                (unsubscribe.clone(), P3),
                (Packet::Disconnect(Box::default()), P3),
            ],
        ),
        (
            "v3_minimal_connect",
            0,
            vec![(
                Packet::Connect(Box::new(Connect {
                    protocol: P3,
                    clean_start: false,
                    keep_alive: 0,
                    client_id: String::new(),
                    will: None,
                    username: None,
                    password: None,
                    properties: Properties::default(),
                })),
                P3,
            )],
        ),
        (
            "v5_session",
            0,
            vec![
                (
                    connect(
                        P5,
                        true,
                        props(|p| {
                            p.session_expiry_interval = Some(60);
                            p.receive_maximum = Some(10);
                            p.maximum_packet_size = Some(1 << 20);
                            p.topic_alias_maximum = Some(4);
                            p.user_properties = vec![("k".into(), "v".into())];
                        }),
                    ),
                    P5,
                ),
                (
                    qos1(props(|p| {
                        p.message_expiry_interval = Some(9);
                        p.response_topic = Some("r/t".into());
                        p.correlation_data = Some(Bytes::from_static(b"id"));
                    })),
                    P5,
                ),
                (disconnect, P5),
            ],
        ),
        (
            "v3_qos2_flow",
            1,
            vec![
                (Packet::Publish(publish("q/2", QoS::ExactlyOnce, 1)), P3),
                (Packet::PubRec(resp(0, false)), P3),
                (Packet::PubRel(resp(0, false)), P3),
                (Packet::PubComp(resp(0, false)), P3),
            ],
        ),
        (
            "v5_acks",
            2,
            vec![
                (Packet::PubAck(resp(0x10, true)), P5),
                (Packet::PubRec(resp(0x80, false)), P5),
                (Packet::PubRel(resp(0x92, true)), P5),
                (Packet::PubComp(resp(0, false)), P5),
            ],
        ),
        (
            "v5_subscribe",
            2,
            vec![
                (subscribe(true, props(|p| p.subscription_identifiers = vec![7])), P5),
                (suback.clone(), P5),
                (unsubscribe, P5),
                (unsuback(vec![ReasonCode(0x11)]), P5),
            ],
        ),
        (
            "v3_server_side",
            1,
            vec![
                (connack(Properties::default()), P3),
                (suback, P3),
                (unsuback(vec![]), P3),
                (Packet::PingResp, P3),
            ],
        ),
        (
            "v5_connack",
            2,
            vec![(
                connack(props(|p| {
                    p.assigned_client_identifier = Some("gen-1".into());
                    p.server_keep_alive = Some(30);
                    p.maximum_qos = Some(1);
                    p.retain_available = Some(0);
                    p.wildcard_subscription_available = Some(1);
                    p.shared_subscription_available = Some(0);
                    p.subscription_identifier_available = Some(1);
                    p.reason_string = Some("ok".into());
                })),
                P5,
            )],
        ),
        (
            "v5_auth",
            2,
            vec![
                (
                    Packet::Auth(Box::new(Auth {
                        code: ReasonCode::CONTINUE_AUTHENTICATION,
                        properties: props(|p| {
                            p.authentication_method = Some("SCRAM-SHA-1".into());
                            p.authentication_data = Some(Bytes::from_static(b"nonce"));
                        }),
                    })),
                    P5,
                ),
                (Packet::Auth(Box::default()), P5),
            ],
        ),
        (
            "v5_publish_alias",
            2,
            vec![(
                Packet::Publish(Publish {
                    topic: String::new(),
                    properties: props(|p| {
                        p.topic_alias = Some(3);
                        p.subscription_identifiers = vec![1, 300];
                        p.user_properties =
                            vec![("a".into(), "b".into()), ("a".into(), "c".into())];
                    })
                    .into(),
                    ..publish("", QoS::AtMostOnce, 0)
                }),
                P5,
            )],
        ),
    ]
}

/// Regenerates `fuzz/corpus/decode/`: `cargo test --lib mqtt::codec -- --ignored write_fuzz_seeds`.
#[test]
#[ignore = "writes files; run by hand to regenerate the fuzz seed corpus"]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, selector, packets) in seed_streams() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[selector]);
        for (packet, version) in &packets {
            encode(packet, *version, &mut buf).unwrap();
        }
        std::fs::write(dir.join(name), &buf).unwrap();
    }
}
