//! An ACL that filters instead of refusing: a deny entry no longer refuses the wildcard
//! subscriptions that overlap it; its topics are withheld at delivery (retained ones too);
//! `$SYS` is not for clients to publish; `#` does not match `$` topics; share groups can be
//! restricted (issue 13, item 2).

use std::time::Duration;

use mqgate::mqtt::codec::{Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};

use crate::support::*;

fn config(extra_mqtt: &str, acl: &str) -> String {
    format!(
        "mqtt:\n  listen: \"127.0.0.1:0\"\n{extra_mqtt}admin:\n  listen: \"127.0.0.1:0\"\n{acl}"
    )
}

/// The Paho suites' policy: one deny entry.
const DENY_ONE: &str = "acl:\n  - deny: subscribe\n    topic: \"test/nosubscribe\"\n";

/// What arrives until nothing came for `wait` (or 3 s in all).
async fn topics(c: &mut RawClient, wait: Duration) -> Vec<(String, bool)> {
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Ok(Some(p))) = tokio::time::timeout_at(until, c.recv_within(wait)).await {
        if let Packet::Publish(p) = p {
            if p.qos == QoS::AtLeastOnce {
                c.send(&Packet::PubAck(PubResponse::success(p.packet_id))).await;
            }
            got.push((p.topic.clone(), p.retain));
        }
    }
    got
}

async fn publish(addr: std::net::SocketAddr, topic: &str, retain: bool) -> ReasonCode {
    let mut p = RawClient::connect(addr, ProtocolVersion::V5, &unique("pub")).await;
    let mut packet = publish_packet(topic, QoS::AtLeastOnce, 1, b"x");
    packet.retain = retain;
    p.send(&Packet::Publish(packet)).await;
    match p.recv().await {
        Some(Packet::PubAck(a)) => a.code,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_entry_filters_wildcards_live_and_retained() {
    let app = gateway(&config("", DENY_ONE)).await;
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let retained_topic = format!("test/retained-{version:?}");
        let mut c = RawClient::connect(app.mqtt_addr, version, &unique("sub")).await;
        // Overlapping the deny: granted (the Paho suites subscribe to `#` and `+/+`); retained
        // messages of the first round arrive in between and are skipped here.
        for filter in ["#", "+/+", "test/#"] {
            let codes = c.subscribe(filter, QoS::AtLeastOnce).await;
            assert_eq!(codes, vec![ReasonCode::GRANTED_QOS_1], "{filter} {version:?}");
            topics(&mut c, Duration::from_millis(100)).await;
        }
        // Retained, sent on a new subscription: the allowed one, never test/nosubscribe.
        assert!(publish(app.mqtt_addr, "test/nosubscribe", true).await.is_success());
        assert!(publish(app.mqtt_addr, &retained_topic, true).await.is_success());
        topics(&mut c, Duration::from_millis(300)).await;
        let mut fresh = RawClient::connect(app.mqtt_addr, version, &unique("fresh")).await;
        let codes = fresh.subscribe("+/+", QoS::AtLeastOnce).await;
        assert_eq!(codes, vec![ReasonCode::GRANTED_QOS_1]);
        let retained = topics(&mut fresh, Duration::from_millis(400)).await;
        assert!(retained.contains(&(retained_topic.clone(), true)), "{retained:?}");
        assert!(retained.iter().all(|(t, _)| t != "test/nosubscribe"), "{retained:?}");
        // Wholly inside the deny: refused as before.
        let refused = c.subscribe("test/nosubscribe", QoS::AtLeastOnce).await;
        let want = match version {
            ProtocolVersion::V311 => ReasonCode::UNSPECIFIED_ERROR,
            ProtocolVersion::V5 => ReasonCode::NOT_AUTHORIZED,
        };
        assert_eq!(refused, vec![want]);
        // Live: withheld at delivery.
        publish(app.mqtt_addr, "test/nosubscribe", false).await;
        publish(app.mqtt_addr, "test/other", false).await;
        let live = topics(&mut c, Duration::from_millis(400)).await;
        assert!(!live.is_empty() && live.iter().all(|(t, _)| t == "test/other"), "{live:?}");
    }
    let m = metrics(&app).await;
    assert!(m.contains("mqgate_acl_denied_total{action=\"deliver\"}"), "{m}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_may_not_publish_to_sys_and_wildcards_do_not_match_dollar_topics() {
    let app = gateway(&config("  sys_interval: 1s\n", "")).await;
    assert_eq!(
        publish(app.mqtt_addr, "$SYS/broker/uptime", false).await,
        ReasonCode::NOT_AUTHORIZED
    );
    let mut all = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("all")).await;
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut plus = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("plus")).await;
    plus.subscribe("+/#", QoS::AtMostOnce).await;
    let mut sys = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("sys")).await;
    sys.subscribe("$SYS/#", QoS::AtMostOnce).await;
    let got_sys = topics(&mut sys, Duration::from_millis(1500)).await;
    assert!(
        got_sys.iter().any(|(t, _)| t.starts_with("$SYS/")),
        "mqgate publishes $SYS: {got_sys:?}"
    );
    for c in [&mut all, &mut plus] {
        let got = topics(c, Duration::from_millis(300)).await;
        assert!(got.iter().all(|(t, _)| !t.starts_with('$')), "{got:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn share_group_names_can_be_restricted() {
    let acl = "acl:\n  - allow: subscribe\n    topic: \"$share/workers/jobs/#\"\n  - deny: subscribe\n    topic: \"$share/+/jobs/#\"\n";
    let app = gateway(&config("", acl)).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, &unique("w")).await;
    assert_eq!(
        c.subscribe("$share/workers/jobs/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::GRANTED_QOS_1]
    );
    assert_eq!(
        c.subscribe("$share/intruders/jobs/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::NOT_AUTHORIZED]
    );
    assert_eq!(
        c.subscribe("$share/intruders/news/#", QoS::AtLeastOnce).await,
        vec![ReasonCode::GRANTED_QOS_1]
    );
    app.stop().await;
}
