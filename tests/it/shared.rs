//! Shared subscriptions (`$share/{group}/{filter}`) with real clients: our raw client for exact
//! reason codes and flags, rumqttc and mosquitto_sub as any user would run them.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use crate::support::*;
use mqgate::mqtt::codec::{
    self, Packet, Properties, ProtocolVersion, PubResponse, Publish, QoS, ReasonCode,
    SubscribeFilter, SubscriptionOptions,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet as RPacket};
use tokio::process::Command;

const V311: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;
const NO_RULES: &str = "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n";

/// The next PUBLISH, or `None` when nothing comes within `wait` (or the connection closed).
async fn next_publish(c: &mut RawClient, wait: Duration) -> Option<Publish> {
    match c.recv_within(wait).await {
        Ok(Some(Packet::Publish(p))) => Some(p),
        Ok(Some(other)) => panic!("expected PUBLISH, got {other:?}"),
        Ok(None) | Err(()) => None,
    }
}

/// Reads PUBLISHes until none comes for 500 ms; acknowledges QoS 1 ones.
async fn drain(c: &mut RawClient) -> Vec<Publish> {
    let mut got = Vec::new();
    while let Some(p) = next_publish(c, Duration::from_millis(500)).await {
        if p.qos == QoS::AtLeastOnce {
            c.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
        }
        got.push(p);
    }
    got
}

#[tokio::test]
async fn connack_says_shared_subscriptions_are_available() {
    let app = gateway(NO_RULES).await;
    let mut c = RawClient::tcp(app.mqtt_addr, V5).await;
    c.send(&Packet::Connect(Box::new(connect_packet(V5, "share-connack")))).await;
    match c.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.properties.shared_subscription_available, Some(1)),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn three_members_of_both_versions_share_30_messages_round_robin() {
    let app = gateway(NO_RULES).await;
    let mut members = Vec::new();
    for (i, version) in [V311, V5, V311].into_iter().enumerate() {
        let mut c = RawClient::connect(app.mqtt_addr, version, &format!("rr-{i}")).await;
        let granted = c.subscribe("$share/workers/jobs/+", QoS::AtLeastOnce).await;
        assert_eq!(granted, vec![ReasonCode(1)]);
        members.push(c);
    }
    let mut publisher = RawClient::connect(app.mqtt_addr, V5, "rr-pub").await;
    for i in 0..30u16 {
        publish_qos1(&mut publisher, "jobs/a", i + 1, &i.to_be_bytes()).await;
    }
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut counts = Vec::new();
    for m in &mut members {
        let got = drain(m).await;
        counts.push(got.len());
        for p in got {
            assert!(!p.dup);
            assert_eq!(p.topic, "jobs/a");
            *seen.entry(p.payload.to_vec()).or_default() += 1;
        }
    }
    assert_eq!(counts, vec![10, 10, 10], "round robin over three members");
    assert_eq!(seen.len(), 30, "every message arrived");
    assert!(seen.values().all(|n| *n == 1), "each message to exactly one member");
    app.stop().await;
}

#[tokio::test]
async fn invalid_share_filters_are_refused_per_version() {
    let app = gateway(NO_RULES).await;
    let bad = ["$share/", "$share/g", "$share//a", "$share/g+/a", "$share/#/a", "$share/g/a#"];
    for (version, code) in [(V5, ReasonCode::TOPIC_FILTER_INVALID), (V311, ReasonCode(0x80))] {
        let mut c = RawClient::connect(app.mqtt_addr, version, &unique("bad-share")).await;
        for filter in bad {
            assert_eq!(c.subscribe(filter, QoS::AtLeastOnce).await, vec![code], "{filter}");
        }
        // The connection is still usable.
        assert_eq!(c.subscribe("$share/g/ok", QoS::AtMostOnce).await, vec![ReasonCode(0)]);
    }
    app.stop().await;
}

#[tokio::test]
async fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let app = gateway(NO_RULES).await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, "share-nolocal").await;
    c.send(&Packet::Subscribe(Box::new(codec::Subscribe {
        packet_id: 1,
        filters: vec![SubscribeFilter {
            filter: "$share/g/a".into(),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                ..Default::default()
            },
        }],
        properties: Properties::default(),
    })))
    .await;
    expect_disconnect(&mut c, ReasonCode::PROTOCOL_ERROR).await;
    app.stop().await;
}

#[tokio::test]
async fn unacknowledged_deliveries_of_a_member_that_leaves_go_to_another_member() {
    let app = gateway(NO_RULES).await;
    let mut a = RawClient::connect(app.mqtt_addr, V311, "leaver").await;
    assert_eq!(a.subscribe("$share/g/work", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let mut b = RawClient::connect(app.mqtt_addr, V5, "stayer").await;
    assert_eq!(b.subscribe("$share/g/work", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let mut publisher = RawClient::connect(app.mqtt_addr, V5, "leave-pub").await;
    for i in 0..6u8 {
        publish_qos1(&mut publisher, "work", u16::from(i) + 1, &[i]).await;
    }
    // `a` reads its PUBLISHes and never acknowledges them; `b` acknowledges.
    let mut unacked = Vec::new();
    while let Some(p) = next_publish(&mut a, Duration::from_millis(500)).await {
        unacked.push(p.payload.to_vec());
    }
    let first = drain(&mut b).await;
    assert_eq!((unacked.len(), first.len()), (3, 3), "round robin before the leave");
    drop(a); // closes the socket: a clean session ends, its deliveries are unacknowledged.
    let mut again: Vec<Vec<u8>> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while again.len() < 3 && tokio::time::Instant::now() < deadline {
        for p in drain(&mut b).await {
            assert!(!p.dup, "a new delivery to another member, not a resend");
            again.push(p.payload.to_vec());
        }
    }
    again.sort();
    unacked.sort();
    assert_eq!(again, unacked, "the leaver's unacknowledged messages reach the other member");
    app.stop().await;
}

#[tokio::test]
async fn unsubscribe_completes_sent_deliveries_and_leaves_only_that_group() {
    let app = gateway(NO_RULES).await;
    let mut a = RawClient::connect(app.mqtt_addr, V5, "unsub-a").await;
    assert_eq!(a.subscribe("$share/g/t", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    assert_eq!(a.subscribe("$share/h/t", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let mut b = RawClient::connect(app.mqtt_addr, V5, "unsub-b").await;
    assert_eq!(b.subscribe("$share/g/t", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let mut publisher = RawClient::connect(app.mqtt_addr, V5, "unsub-pub").await;
    publish_qos1(&mut publisher, "t", 1, b"m1").await;
    publish_qos1(&mut publisher, "t", 2, b"m2").await;
    // `a` is in both groups: both copies of m1 (g, h), m2 from h; `b` gets m2 from g.
    let mut got_a = Vec::new();
    while let Some(p) = next_publish(&mut a, Duration::from_millis(500)).await {
        got_a.push(p.payload.to_vec());
    }
    got_a.sort();
    assert_eq!(got_a, vec![b"m1".to_vec(), b"m1".to_vec(), b"m2".to_vec()]);
    let got_b: Vec<Vec<u8>> = drain(&mut b).await.into_iter().map(|p| p.payload.to_vec()).collect();
    assert_eq!(got_b, vec![b"m2".to_vec()]);
    a.send(&Packet::Unsubscribe(Box::new(codec::Unsubscribe {
        packet_id: 9,
        filters: vec!["$share/g/t".into()],
        properties: Properties::default(),
    })))
    .await;
    match a.recv().await {
        Some(Packet::UnsubAck(u)) => assert_eq!(u.codes, vec![ReasonCode::SUCCESS]),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    // m1 of group g was already sent to `a`: its delivery is completed with `a` (the spec
    // requires it on UNSUBSCRIBE), not handed to `b`; so is its packet id, which stays taken.
    assert!(drain(&mut b).await.is_empty(), "a sent delivery is not handed over on UNSUBSCRIBE");
    // `a` is still in group h (alone there), not in g.
    publish_qos1(&mut publisher, "t", 3, b"m3").await;
    let p = next_publish(&mut a, Duration::from_secs(5)).await.expect("m3 through group h");
    assert_eq!(&p.payload[..], b"m3");
    assert!(next_publish(&mut a, Duration::from_millis(300)).await.is_none(), "one copy only");
    let got_b: Vec<Vec<u8>> = drain(&mut b).await.into_iter().map(|p| p.payload.to_vec()).collect();
    assert_eq!(got_b, vec![b"m3".to_vec()]);
    app.stop().await;
}

#[tokio::test]
async fn a_normal_and_a_shared_subscription_each_get_a_copy() {
    let app = gateway(NO_RULES).await;
    let mut c = RawClient::connect(app.mqtt_addr, V311, "both").await;
    assert_eq!(c.subscribe("news/#", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    assert_eq!(c.subscribe("$share/g/news/+", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let mut publisher = RawClient::connect(app.mqtt_addr, V5, "both-pub").await;
    publish_qos1(&mut publisher, "news/x", 1, b"hello").await;
    let got = drain(&mut c).await;
    assert_eq!(got.len(), 2, "one copy per subscription: {got:?}");
    assert!(got.iter().all(|p| &p.payload[..] == b"hello"));
    app.stop().await;
}

#[tokio::test]
async fn retained_messages_are_not_sent_on_a_shared_subscription() {
    let app = gateway(NO_RULES).await;
    let mut publisher = RawClient::connect(app.mqtt_addr, V5, "ret-pub").await;
    let mut p = publish_packet("state/door", QoS::AtLeastOnce, 1, b"open");
    p.retain = true;
    publisher.send(&Packet::Publish(p)).await;
    assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    let mut shared = RawClient::connect(app.mqtt_addr, V5, "ret-shared").await;
    assert_eq!(shared.subscribe("$share/g/state/#", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let mut plain = RawClient::connect(app.mqtt_addr, V5, "ret-plain").await;
    assert_eq!(plain.subscribe("state/#", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let p = next_publish(&mut plain, Duration::from_secs(5)).await.expect("retained to plain");
    assert!(p.retain && &p.payload[..] == b"open");
    assert!(
        next_publish(&mut shared, Duration::from_millis(500)).await.is_none(),
        "no retained message on a shared subscription"
    );
    // Live messages do arrive on it.
    publish_qos1(&mut publisher, "state/door", 2, b"closed").await;
    let p = next_publish(&mut shared, Duration::from_secs(5)).await.expect("live message");
    assert_eq!(&p.payload[..], b"closed");
    app.stop().await;
}

#[tokio::test]
async fn share_group_dollar_topics_and_full_groups() {
    // A tiny queue and a member that never reads (its in-flight window full): the group
    // drops what no member can take and counts it.
    let app = gateway(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n  outbound_queue: 1\n  max_inflight_out: 1\nadmin:\n  listen: \"127.0.0.1:0\"\n",
    )
    .await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, "full-member").await;
    assert_eq!(c.subscribe("$share/g/#", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let mut publisher = RawClient::connect(app.mqtt_addr, V5, "full-pub").await;
    // '#' in the first level does not match a '$' topic, shared or not.
    publish_qos1(&mut publisher, "$x/y", 1, b"dollar").await;
    for i in 0..5u16 {
        publish_qos1(&mut publisher, "q", i + 2, b"m").await;
    }
    let first = next_publish(&mut c, Duration::from_secs(5)).await.expect("first delivery");
    assert_eq!(first.topic, "q");
    let m = metrics(&app).await;
    assert!(
        m.contains(r#"mqgate_messages_dropped_total{reason="shared_group_full"}"#),
        "drops of a full group are counted:\n{m}"
    );
    app.stop().await;
}

#[tokio::test]
async fn mosquitto_sub_and_rumqttc_share_a_group() {
    let app = gateway(NO_RULES).await;
    let port = app.mqtt_addr.port().to_string();
    let sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-V", "mqttv5", "-q", "1"])
        .args(["-t", "$share/g/x/#", "-C", "5", "-W", "10", "-v"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub (install mosquitto-clients)");
    let mut o = MqttOptions::new("share-rumq", "127.0.0.1", app.mqtt_addr.port());
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut events) = AsyncClient::new(o, 100);
    client.subscribe("$share/g/x/#", rumqttc::QoS::AtLeastOnce).await.expect("subscribe");
    loop {
        if let Event::Incoming(RPacket::SubAck(_)) = events.poll().await.expect("rumqttc") {
            break;
        }
    }
    // Give mosquitto_sub's subscription time to land.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut publisher = RawClient::connect(app.mqtt_addr, V5, "share-mixed-pub").await;
    for i in 0..10u16 {
        publish_qos1(&mut publisher, &format!("x/{i}"), i + 1, format!("m{i}").as_bytes()).await;
    }
    let mut rumq = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rumq.len() < 5 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, events.poll()).await {
            Ok(Ok(Event::Incoming(RPacket::Publish(p)))) => rumq.push(p.topic),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("rumqttc: {e}"),
            Err(_) => break,
        }
    }
    let out = sub.wait_with_output().await.expect("mosquitto_sub output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "mosquitto_sub: {text} {}", String::from_utf8_lossy(&out.stderr));
    let mosq: Vec<&str> = text.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!((mosq.len(), rumq.len()), (5, 5), "mosquitto_sub {mosq:?}, rumqttc {rumq:?}");
    let mut all: Vec<String> = mosq.iter().map(|s| s.to_string()).chain(rumq).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "each message to exactly one of them: {all:?}");
    app.stop().await;
}

#[tokio::test]
async fn deliveries_still_queued_for_a_member_that_leaves_go_to_another_member() {
    // A window of 2: the leaver has 2 deliveries in flight and the rest still in its queue.
    let app = gateway(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n  max_inflight_out: 2\nadmin:\n  listen: \"127.0.0.1:0\"\n",
    )
    .await;
    let mut a = RawClient::connect(app.mqtt_addr, V5, "queued-leaver").await;
    assert_eq!(a.subscribe("$share/g/q", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let mut b = RawClient::connect(app.mqtt_addr, V311, "queued-stayer").await;
    assert_eq!(b.subscribe("$share/g/q", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let mut publisher = RawClient::connect(app.mqtt_addr, V5, "queued-pub").await;
    for i in 0..10u8 {
        publish_qos1(&mut publisher, "q", u16::from(i) + 1, &[i]).await;
    }
    let mut read_by_a = Vec::new();
    while let Some(p) = next_publish(&mut a, Duration::from_millis(500)).await {
        read_by_a.push(p.payload[0]);
    }
    assert_eq!(read_by_a.len(), 2, "the leaver's window");
    let mut got_b: Vec<u8> = drain(&mut b).await.iter().map(|p| p.payload[0]).collect();
    assert_eq!(got_b.len(), 5);
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while got_b.len() < 10 && tokio::time::Instant::now() < deadline {
        got_b.extend(drain(&mut b).await.iter().map(|p| p.payload[0]));
    }
    got_b.sort();
    assert_eq!(got_b, (0..10).collect::<Vec<u8>>(), "in-flight and queued ones, once each");
    app.stop().await;
}

#[tokio::test]
async fn parked_members_get_messages_only_when_no_member_is_online() {
    let app = gateway(NO_RULES).await;
    // A persistent 3.1.1 member that goes away.
    let mut p = RawClient::tcp(app.mqtt_addr, V311).await;
    let mut connect = connect_packet(V311, "parked-member");
    connect.clean_start = false;
    p.send(&Packet::Connect(Box::new(connect.clone()))).await;
    assert!(matches!(p.recv().await, Some(Packet::ConnAck(_))));
    assert_eq!(p.subscribe("$share/g/p", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    p.send(&Packet::Disconnect(Box::default())).await;
    let _ = p.recv_within(Duration::from_secs(5)).await;
    let mut online = RawClient::connect(app.mqtt_addr, V5, "online-member").await;
    assert_eq!(online.subscribe("$share/g/p", QoS::AtLeastOnce).await, vec![ReasonCode(1)]);
    let mut publisher = RawClient::connect(app.mqtt_addr, V5, "parked-pub").await;
    for i in 0..4u16 {
        publish_qos1(&mut publisher, "p", i + 1, b"while online").await;
    }
    assert_eq!(drain(&mut online).await.len(), 4, "the online member gets them all");
    drop(online);
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish_qos1(&mut publisher, "p", 10, b"for the parked one").await;
    // The parked member gets, on its return, only what came while it was the only member.
    let mut p = RawClient::tcp(app.mqtt_addr, V311).await;
    p.send(&Packet::Connect(Box::new(connect))).await;
    match p.recv().await {
        Some(Packet::ConnAck(a)) => assert!(a.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let got: Vec<Vec<u8>> = drain(&mut p).await.into_iter().map(|p| p.payload.to_vec()).collect();
    assert_eq!(got, vec![b"for the parked one".to_vec()]);
    app.stop().await;
}
