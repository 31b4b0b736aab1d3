//! Local publish/subscribe between real MQTT clients (mosquitto_pub/mosquitto_sub and
//! rumqttc), as from any broker.

use std::process::Stdio;
use std::time::Duration;

use crate::support::*;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS, ReasonCode};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as RPacket};
use tokio::process::Command;

const NO_RULES: &str = "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n";

fn mosquitto(bin: &str) -> Command {
    let mut c = Command::new(bin);
    c.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    c
}

#[tokio::test]
async fn mosquitto_clients_pub_sub_with_wildcards_both_versions() {
    let app = gateway(NO_RULES).await;
    let port = app.mqtt_addr.port().to_string();
    for (version, filter) in [("mqttv311", "home/+/temp"), ("mqttv5", "home/#")] {
        let sub = mosquitto("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", "1", "-t", filter])
            .args(["-C", "2", "-W", "10", "-v"])
            .spawn()
            .expect("mosquitto_sub (install mosquitto-clients; scripts/test.sh does)");
        // Give the subscription time to land before publishing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (topic, qos) in [("home/kitchen/temp", "0"), ("home/hall/temp", "1")] {
            let status = mosquitto("mosquitto_pub")
                .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-q", qos])
                .args(["-t", topic, "-m", &format!("{topic} {qos}")])
                .status()
                .await
                .expect("mosquitto_pub");
            assert!(status.success(), "mosquitto_pub failed ({version})");
        }
        let out = sub.wait_with_output().await.expect("mosquitto_sub output");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "mosquitto_sub {version}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("home/kitchen/temp home/kitchen/temp 0"), "{version}: {text}");
        assert!(text.contains("home/hall/temp home/hall/temp 1"), "{version}: {text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn rumqttc_clients_exchange_messages_at_qos1() {
    let app = gateway(NO_RULES).await;
    let opts = |id: &str| {
        let mut o = MqttOptions::new(id, "127.0.0.1", app.mqtt_addr.port());
        o.set_keep_alive(Duration::from_secs(10));
        o
    };
    let (sub, mut sub_loop) = AsyncClient::new(opts("rumq-sub"), 100);
    let (publ, mut pub_loop) = AsyncClient::new(opts("rumq-pub"), 100);
    sub.subscribe("fleet/#", rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
    // Wait for SUBACK.
    loop {
        if let Event::Incoming(RPacket::SubAck(_)) = sub_loop.poll().await.expect("sub loop") {
            break;
        }
    }
    for i in 0..20u8 {
        publ.publish(format!("fleet/{i}"), rumqttc::QoS::AtLeastOnce, false, vec![i])
            .await
            .expect("publish");
    }
    let publisher = tokio::spawn(async move {
        let mut acks = 0;
        while acks < 20 {
            if let Event::Incoming(RPacket::PubAck(_)) = pub_loop.poll().await.expect("pub loop") {
                acks += 1;
            }
        }
    });
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 20 {
        let ev =
            tokio::time::timeout_at(deadline, sub_loop.poll()).await.expect("messages in time");
        if let Event::Incoming(RPacket::Publish(p)) = ev.expect("sub loop") {
            assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
            got.push(p.payload[0]);
        }
    }
    assert_eq!(got, (0..20).collect::<Vec<u8>>(), "in order, exactly once");
    tokio::time::timeout(Duration::from_secs(10), publisher).await.expect("PUBACKs").expect("task");
    app.stop().await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_and_dollar_topics_skip_wildcards() {
    let app = gateway(NO_RULES).await;
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "overlap").await;
    assert_eq!(sub.subscribe("a/#", QoS::AtMostOnce).await, vec![ReasonCode::GRANTED_QOS_0]);
    assert_eq!(sub.subscribe("a/+", QoS::AtLeastOnce).await, vec![ReasonCode::GRANTED_QOS_1]);
    assert_eq!(sub.subscribe("#", QoS::AtMostOnce).await, vec![ReasonCode::GRANTED_QOS_0]);
    let mut publ = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "overlap-pub").await;
    publ.publish("a/b", QoS::AtLeastOnce, 1, b"once").await;
    publ.publish("$SYS/x", QoS::AtMostOnce, 0, b"dollar").await;
    publ.publish("a/c", QoS::AtMostOnce, 0, b"last").await;
    match sub.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(&p.payload[..], b"once");
            assert_eq!(p.qos, QoS::AtLeastOnce, "highest granted QoS");
            sub.send(&Packet::PubAck(mqgate::mqtt::codec::PubResponse::success(p.packet_id))).await;
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    match sub.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!(&p.payload[..], b"last", "one copy only; '#' skips $SYS")
        }
        other => panic!("expected PUBLISH, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn sys_topics_report_statistics_to_explicit_subscribers_only() {
    let yaml = "mqtt:\n  listen: \"127.0.0.1:0\"\n  sys_interval: 200ms\nadmin:\n  listen: \"127.0.0.1:0\"\n";
    let app = gateway(yaml).await;
    let mut all = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "hash-sub").await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut sys = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "sys-sub").await;
    sys.subscribe("$SYS/broker/clients/connected", QoS::AtMostOnce).await;
    // The retained value may predate the two connections; a fresher one follows each interval.
    let mut seen = Vec::new();
    while !seen.iter().any(|n| *n >= 2) {
        match sys.recv().await {
            Some(Packet::Publish(p)) => {
                assert_eq!(p.topic, "$SYS/broker/clients/connected");
                let text = std::str::from_utf8(&p.payload).expect("utf8").to_owned();
                seen.push(text.parse::<usize>().expect("a number"));
            }
            other => panic!("expected a $SYS message, got {other:?}"),
        }
        assert!(seen.len() < 20, "clients/connected never reached 2: {seen:?}");
    }
    assert_eq!(
        all.recv_within(Duration::from_millis(600)).await,
        Err(()),
        "'#' must not match $SYS"
    );
    app.stop().await;
}

#[tokio::test]
async fn mqtt5_topic_aliases_set_use_and_reject() {
    let yaml = "mqtt:\n  listen: \"127.0.0.1:0\"\n  topic_alias_maximum: 4\nadmin:\n  listen: \"127.0.0.1:0\"\n";
    let app = gateway(yaml).await;
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "alias-sub").await;
    sub.subscribe("alias/#", QoS::AtMostOnce).await;

    let mut c = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V5).await;
    c.send(&Packet::Connect(Box::new(connect_packet(ProtocolVersion::V5, "aliaser")))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.properties.topic_alias_maximum, Some(4)),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut first = publish_packet("alias/long/topic/name", QoS::AtMostOnce, 0, b"set");
    first.properties.topic_alias = Some(2);
    c.send(&Packet::Publish(first)).await;
    let mut second = publish_packet("", QoS::AtMostOnce, 0, b"used");
    second.properties.topic_alias = Some(2);
    c.send(&Packet::Publish(second)).await;
    for want in [&b"set"[..], b"used"] {
        match sub.recv().await {
            Some(Packet::Publish(p)) => {
                assert_eq!((p.topic.as_str(), &p.payload[..]), ("alias/long/topic/name", want));
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    // An alias never set: protocol error. Above the maximum: 0x94.
    let mut unknown = publish_packet("", QoS::AtMostOnce, 0, b"x");
    unknown.properties.topic_alias = Some(3);
    c.send(&Packet::Publish(unknown)).await;
    expect_disconnect(&mut c, ReasonCode::PROTOCOL_ERROR).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "aliaser2").await;
    let mut too_big = publish_packet("alias/x", QoS::AtMostOnce, 0, b"x");
    too_big.properties.topic_alias = Some(5);
    c.send(&Packet::Publish(too_big)).await;
    expect_disconnect(&mut c, ReasonCode::TOPIC_ALIAS_INVALID).await;
    app.stop().await;
}

#[tokio::test]
async fn retained_messages_reach_new_wildcard_subscribers_and_an_empty_payload_clears_them() {
    let app = gateway(NO_RULES).await;
    let mut publ = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "ret-pub").await;
    let mut keep = publish_packet("ret/a/state", QoS::AtLeastOnce, 1, b"on");
    keep.retain = true;
    publ.send(&Packet::Publish(keep)).await;
    assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));

    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "ret-sub").await;
    sub.subscribe("ret/+/state", QoS::AtLeastOnce).await;
    match sub.recv().await {
        Some(Packet::Publish(p)) => {
            assert!(p.retain, "sent on subscribe with RETAIN set");
            assert_eq!((p.topic.as_str(), &p.payload[..]), ("ret/a/state", &b"on"[..]));
        }
        other => panic!("expected the retained message, got {other:?}"),
    }
    let mut clear = publish_packet("ret/a/state", QoS::AtMostOnce, 0, b"");
    clear.retain = true;
    publ.send(&Packet::Publish(clear)).await;
    let mut late = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "ret-late").await;
    late.subscribe("ret/#", QoS::AtMostOnce).await;
    assert_eq!(late.recv_within(Duration::from_millis(300)).await, Err(()), "cleared");
    app.stop().await;
}

#[tokio::test]
async fn the_will_goes_out_on_an_ungraceful_end_only() {
    let app = gateway(NO_RULES).await;
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "will-sub").await;
    sub.subscribe("wills/#", QoS::AtLeastOnce).await;
    let with_will = |id: &str| {
        let mut c = connect_packet(ProtocolVersion::V311, id);
        c.will = Some(mqgate::mqtt::codec::LastWill {
            topic: format!("wills/{id}"),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
        });
        c
    };
    // A normal DISCONNECT: no will.
    let mut polite = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V311).await;
    polite.send(&Packet::Connect(Box::new(with_will("polite")))).await;
    assert!(matches!(polite.recv().await, Some(Packet::ConnAck(_))));
    polite.send(&Packet::Disconnect(Default::default())).await;
    assert_eq!(polite.recv().await, None);
    // The socket just closes: the will is published.
    let mut rude = RawClient::tcp(app.mqtt_addr, ProtocolVersion::V311).await;
    rude.send(&Packet::Connect(Box::new(with_will("rude")))).await;
    assert!(matches!(rude.recv().await, Some(Packet::ConnAck(_))));
    drop(rude);
    match sub.recv().await {
        Some(Packet::Publish(p)) => {
            assert_eq!((p.topic.as_str(), &p.payload[..]), ("wills/rude", &b"gone"[..]));
        }
        other => panic!("expected the will of 'rude' (and none of 'polite'), got {other:?}"),
    }
    app.stop().await;
}
