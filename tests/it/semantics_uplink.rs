//! The uplink rows of docs/semantics.md (MQTT → AMQP, issue 4), each against the real
//! RabbitMQ on 127.0.0.1:5672 with our raw MQTT client and lapin as the AMQP consumer.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::Channel;
use mqgate::mqtt::codec::{Packet, Properties, ProtocolVersion, PubResponse, QoS, ReasonCode};
use mqgate::rules::mapping::{decode_routing_key, TopicMapping};
use mqgate::targets::amqp::{last_value_queue_name, MESSAGE_ID_PREFIX};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V311;

/// One AMQP target to `exchange` from `filter`, with extra target lines (indented 10) and
/// extra rule lines (indented 4).
fn rule(name: &str, filter: &str, exchange: &str, target_extra: &str, rule_extra: &str) -> String {
    format!(
        "  - name: {name}\n    from: \"{filter}\"\n{rule_extra}    to:\n      - amqp:\n          broker: rabbit\n          exchange: \"{exchange}\"\n{target_extra}"
    )
}

/// Publishes and returns the PUBACK (QoS 1) or PUBREC (QoS 2).
async fn publish_ack(c: &mut RawClient, p: mqgate::mqtt::codec::Publish) -> PubResponse {
    let qos = p.qos;
    c.send(&Packet::Publish(p)).await;
    match (qos, c.recv().await) {
        (QoS::AtLeastOnce, Some(Packet::PubAck(a))) => a,
        (QoS::ExactlyOnce, Some(Packet::PubRec(a))) => a,
        (_, other) => panic!("expected PUBACK/PUBREC, got {other:?}"),
    }
}

/// The number of messages in `queue` (a passive declare).
async fn queue_len(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(
        ShortString::from(queue),
        QueueDeclareOptions { passive: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .expect("queue exists")
    .message_count()
}

async fn delete_queue(conn: &lapin::Connection, queue: &str) {
    let ch = conn.create_channel().await.expect("channel");
    let _ = ch.queue_delete(ShortString::from(queue), QueueDeleteOptions::default()).await;
}

#[tokio::test]
async fn qos2_message_id_is_the_same_for_a_resend_of_the_same_packet() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "q2.#").await;
    let app = gateway(&config_rules("", &rule("r", "q2/#", &exchange, "", ""))).await;
    wait_ready(&app).await;
    let id = unique("q2");

    // A persistent session; the connection drops right after the PUBLISH, before the PUBREC
    // (mqgate has forwarded it, the client never heard).
    let mut c = RawClient::tcp(app.mqtt_addr, V311).await;
    let mut connect = connect_packet(V311, &id);
    connect.clean_start = false;
    c.send(&Packet::Connect(Box::new(connect.clone()))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
    c.publish("q2/a", QoS::ExactlyOnce, 7, b"once").await;
    drop(c);
    let first = get(&ch, &queue, Duration::from_secs(5)).await.expect("first attempt forwarded");

    // The client resends with DUP and the same packet id.
    let mut c = RawClient::tcp(app.mqtt_addr, V311).await;
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.session_present));
    let mut p = publish_packet("q2/a", QoS::ExactlyOnce, 7, b"once");
    p.dup = true;
    assert_eq!(publish_ack(&mut c, p).await.code, ReasonCode::SUCCESS);
    let second = get(&ch, &queue, Duration::from_secs(5)).await.expect("resend forwarded");
    // Another message (another packet id) gets another id.
    let p = publish_packet("q2/a", QoS::ExactlyOnce, 8, b"once");
    assert_eq!(publish_ack(&mut c, p).await.code, ReasonCode::SUCCESS);
    let third = get(&ch, &queue, Duration::from_secs(5)).await.expect("third forwarded");

    let id_of = |d: &lapin::message::Delivery| {
        d.properties.message_id().as_ref().map(|m| m.as_str().to_owned()).expect("message_id")
    };
    assert!(id_of(&first).starts_with(MESSAGE_ID_PREFIX));
    assert_eq!(id_of(&first), id_of(&second), "a resend keeps its message_id");
    assert_ne!(id_of(&first), id_of(&third));
    assert_eq!(*first.properties.delivery_mode(), Some(2), "QoS 2 is persistent");
    app.stop().await;
}

#[tokio::test]
async fn mandatory_unroutable_messages_fail_with_0x10_or_an_error_and_are_counted() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "m.bound.#").await;
    let rules = rule("quiet", "m/#", &exchange, "          mandatory: true\n", "")
        + &rule(
            "loud",
            "e/#",
            &exchange,
            "          mandatory: true\n          unroutable: error\n",
            "",
        );
    let app = gateway(&config_rules("", &rules)).await;
    wait_ready(&app).await;

    let mut c = RawClient::connect(app.mqtt_addr, V5, &unique("mand")).await;
    // Pipelined: routable, unroutable, routable; each gets its own answer, in order.
    for (id, topic) in [(1, "m/bound/a"), (2, "m/nowhere"), (3, "m/bound/b")] {
        c.publish(topic, QoS::AtLeastOnce, id, topic.as_bytes()).await;
    }
    let mut codes = Vec::new();
    for _ in 0..3 {
        match c.recv().await {
            Some(Packet::PubAck(a)) => {
                codes.push((a.packet_id, a.code, a.properties.reason_string.clone()))
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    assert_eq!(codes[0].1, ReasonCode::SUCCESS);
    assert_eq!(codes[1].1, ReasonCode::NO_MATCHING_SUBSCRIBERS, "{codes:?}");
    assert!(codes[1].2.as_deref().unwrap_or("").contains("unroutable"), "{codes:?}");
    assert_eq!(codes[2].1, ReasonCode::SUCCESS);
    let p = publish_packet("e/nowhere", QoS::AtLeastOnce, 4, b"x");
    assert_eq!(publish_ack(&mut c, p).await.code, ReasonCode::UNSPECIFIED_ERROR);
    // QoS 2: PUBREC 0x10 goes on to PUBREL / PUBCOMP like any accepted message.
    let p = publish_packet("m/nowhere", QoS::ExactlyOnce, 5, b"x");
    assert_eq!(publish_ack(&mut c, p).await.code, ReasonCode::NO_MATCHING_SUBSCRIBERS);
    c.send(&Packet::PubRel(PubResponse {
        packet_id: 5,
        code: ReasonCode::SUCCESS,
        properties: mqgate::mqtt::codec::PublishProperties::none(),
    }))
    .await;
    match c.recv().await {
        Some(Packet::PubComp(r)) => assert_eq!((r.packet_id, r.code), (5, ReasonCode::SUCCESS)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }

    // 3.1.1 cannot say it: the PUBACK is withheld and the connection closed.
    let mut c3 = RawClient::connect(app.mqtt_addr, V311, &unique("mand3")).await;
    c3.publish("m/nowhere", QoS::AtLeastOnce, 1, b"x").await;
    assert!(c3.recv().await.is_none(), "3.1.1 got an answer for an unroutable message");

    assert!(get(&ch, &queue, Duration::from_secs(2)).await.is_some());
    assert!(get(&ch, &queue, Duration::from_secs(2)).await.is_some());
    let text = metrics(&app).await;
    assert!(
        text.contains("mqgate_amqp_returned_total{broker=\"rabbit\"} 4"),
        "returns not counted:\n{text}"
    );
    app.stop().await;
}

#[tokio::test]
async fn lossless_mapping_keeps_dots_and_the_topic_header() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "v1%2E2.*").await;
    let target = "          topic_mapping: lossless\n";
    let app = gateway(&config_rules("", &rule("r", "v1.2/+", &exchange, target, ""))).await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, V311, &unique("lossless")).await;
    publish_qos1(&mut c, "v1.2/a*b", 1, b"x").await;
    let m = get(&ch, &queue, Duration::from_secs(5)).await.expect("forwarded");
    assert_eq!(m.routing_key.as_str(), "v1%2E2.a%2Ab");
    let back = decode_routing_key(TopicMapping::Lossless, m.routing_key.as_str());
    assert_eq!(back.as_deref(), Ok("v1.2/a*b"), "the routing key maps back to the topic");
    assert_eq!(header(&m, "x-mqtt-topic").as_deref(), Some("v1.2/a*b"));
    app.stop().await;
}

#[tokio::test]
async fn templates_and_when_route_by_payload_and_properties_and_errors_follow_on_error() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "alerts.#").await;
    let target = "          routing_key: \"alerts.{{ levels[1] }}.{{ user_properties.site }}\"\n";
    let rules = rule("hot", "t/+/temp", &exchange, target, "    when: \"json.temp > 30\"\n")
        + &rule(
            "lenient",
            "s/+/temp",
            &exchange,
            target,
            "    when: \"json.temp > 30\"\n    on_error: skip\n",
        );
    let app = gateway(&config_rules("", &rules)).await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, &unique("tmpl")).await;
    let with_site = |topic: &str, id: u16, payload: &[u8]| {
        let mut p = publish_packet(topic, QoS::AtLeastOnce, id, payload);
        p.properties.user_properties = vec![("site".to_owned(), "north".to_owned())];
        p
    };

    let hot = publish_ack(&mut c, with_site("t/dev1/temp", 1, br#"{"temp": 31}"#)).await;
    assert_eq!(hot.code, ReasonCode::SUCCESS);
    let m = get(&ch, &queue, Duration::from_secs(5)).await.expect("hot reading forwarded");
    assert_eq!(m.routing_key.as_str(), "alerts.dev1.north");

    let cold = publish_ack(&mut c, with_site("t/dev1/temp", 2, br#"{"temp": 3}"#)).await;
    assert_eq!(cold.code, ReasonCode::NO_MATCHING_SUBSCRIBERS, "when: false is no match");

    // Not JSON: the condition cannot be evaluated. on_error fail (default): not delivered.
    let bad = publish_ack(&mut c, with_site("t/dev1/temp", 3, b"31 degrees")).await;
    assert_eq!(bad.code, ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR);
    assert!(bad.properties.reason_string.clone().unwrap_or_default().contains("\"hot\""));
    // on_error: skip: as if the rule did not match.
    let skipped = publish_ack(&mut c, with_site("s/dev1/temp", 4, b"31 degrees")).await;
    assert_eq!(skipped.code, ReasonCode::NO_MATCHING_SUBSCRIBERS);

    assert!(get(&ch, &queue, Duration::from_millis(300)).await.is_none(), "nothing else routed");
    let text = metrics(&app).await;
    assert!(text.contains("mqgate_rule_errors_total{rule=\"hot\"} 1"), "{text}");
    assert!(text.contains("mqgate_rule_errors_total{rule=\"lenient\"} 1"), "{text}");
    assert!(text.contains("mqgate_rule_skipped_total{rule=\"hot\"} 1"), "{text}");
    // In: only the message whose condition held (not the one turned away, not the errors).
    assert!(text.contains("mqgate_rule_matched_total{rule=\"hot\"} 1"), "{text}");
    assert!(text.contains("mqgate_rule_matched_total{rule=\"lenient\"} 0"), "{text}");
    app.stop().await;
}

#[tokio::test]
async fn exchange_template_picks_the_exchange_per_message() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let app = gateway(&config_rules(
        "",
        &rule("r", "x/#", "{{ user_properties.exchange }}", "          routing_key: k\n", ""),
    ))
    .await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, &unique("ex")).await;
    let mut p = publish_packet("x/a", QoS::AtLeastOnce, 1, b"m");
    p.properties.user_properties = vec![("exchange".to_owned(), exchange.clone())];
    assert_eq!(publish_ack(&mut c, p).await.code, ReasonCode::SUCCESS);
    let m = get(&ch, &queue, Duration::from_secs(5)).await.expect("routed by the template");
    assert_eq!(m.exchange.as_str(), exchange);
    app.stop().await;
}

#[tokio::test]
async fn a_bad_template_is_a_config_error_with_line_and_column() {
    let text = config_rules(
        "",
        &rule("r", "a/#", "x", "          routing_key: \"{{ topik }}\"\n", "    when: \"qos >\"\n"),
    );
    let e = mqgate::config::Config::parse(std::path::Path::new("t.yaml"), &text).unwrap_err();
    let s = e.to_string();
    assert!(s.contains("unknown variable topik"), "{s}");
    assert!(e.0.iter().all(|e| e.line > 0 && e.column > 0), "{s}");
    assert_eq!(e.0.len(), 2, "{s}");
}

#[tokio::test]
async fn mqtt5_properties_become_amqp_properties_and_headers() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let target = "          topic_mapping: lossless\n";
    let app = gateway(&config_rules("", &rule("r", "p/#", &exchange, target, ""))).await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, &unique("props")).await;
    let mut p = publish_packet("p/a", QoS::AtLeastOnce, 1, b"{}");
    p.properties = Properties {
        content_type: Some("application/json".to_owned()),
        correlation_data: Some(Bytes::from_static(b"req-42")),
        response_topic: Some("reply/dev.1".to_owned()),
        message_expiry_interval: Some(60),
        payload_format_indicator: Some(1),
        user_properties: vec![("site".to_owned(), "north".to_owned())],
        ..Properties::default()
    }
    .into();
    assert_eq!(publish_ack(&mut c, p).await.code, ReasonCode::SUCCESS);
    let m = get(&ch, &queue, Duration::from_secs(5)).await.expect("forwarded");
    let props = &m.properties;
    assert_eq!(props.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
    assert_eq!(props.correlation_id().as_ref().map(|s| s.as_str()), Some("req-42"));
    assert_eq!(props.reply_to().as_ref().map(|s| s.as_str()), Some("reply.dev%2E1"));
    let ms: u64 = props.expiration().as_ref().expect("expiration").as_str().parse().expect("ms");
    assert!((55_000..=60_000).contains(&ms), "{ms}");
    assert_eq!(header(&m, "site").as_deref(), Some("north"));
    assert_eq!(header(&m, "x-mqtt-payload-format-indicator").as_deref(), Some("1"));
    assert_eq!(header(&m, "x-mqtt-response-topic").as_deref(), Some("reply/dev.1"));
    assert!(props.message_id().is_none(), "QoS 1 gets no derived message_id");
    app.stop().await;
}

#[tokio::test]
async fn retained_messages_keep_a_last_value_queue_that_an_empty_payload_purges() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let topic = format!("lv/{}", unique("t"));
    let lv = last_value_queue_name(&topic);
    // mqgate declares it (durable): delete it when the test ends, passed or failed.
    let _cleanup = delete_queues_on_drop(&[&lv]);
    let app = gateway(&config_rules(
        "",
        &rule("r", "lv/#", &exchange, "          last_value: true\n", ""),
    ))
    .await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, V311, &unique("lv")).await;
    for (id, payload, retain) in [(1, "1", true), (2, "2", true), (3, "not kept", false)] {
        let mut p = publish_packet(&topic, QoS::AtLeastOnce, id, payload.as_bytes());
        p.retain = retain;
        c.send(&Packet::Publish(p)).await;
        assert!(matches!(c.recv().await, Some(Packet::PubAck(a)) if a.code.is_success()));
    }
    let m = get(&ch, &queue, Duration::from_secs(5)).await.expect("exchange copy");
    assert_eq!(header(&m, "x-mqtt-retain").as_deref(), Some("true"));
    assert_eq!(queue_len(&ch, &lv).await, 1, "max length 1");
    let last = get(&ch, &lv, Duration::from_secs(5)).await.expect("the last value");
    assert_eq!(last.data, b"2", "drop-head keeps the newest");

    let mut p = publish_packet(&topic, QoS::AtLeastOnce, 4, b"3");
    p.retain = true;
    assert!(publish_ack(&mut c, p).await.code.is_success());
    assert_eq!(queue_len(&ch, &lv).await, 1);
    let mut p = publish_packet(&topic, QoS::AtLeastOnce, 5, b"");
    p.retain = true;
    assert!(publish_ack(&mut c, p).await.code.is_success());
    assert_eq!(queue_len(&ch, &lv).await, 0, "an empty retained payload purges it");
    app.stop().await;
}

#[tokio::test]
async fn a_job_queue_is_declared_with_arguments_and_shared_by_competing_consumers() {
    let conn = rabbit().await;
    let jobs = unique("mqgate-test-jobs");
    // A durable quorum queue (x-expires would change the declare the test checks): deleted
    // when the test ends, passed or failed.
    let _cleanup = delete_queues_on_drop(&[&jobs]);
    let target = format!(
        "          queue: \"{jobs}\"\n          arguments:\n            x-queue-type: quorum\n"
    );
    let app = gateway(&config_rules(
        "",
        &format!(
            "  - name: jobs\n    from: \"jobs/#\"\n    to:\n      - amqp:\n          broker: rabbit\n{target}"
        ),
    ))
    .await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, V311, &unique("jobs")).await;
    publish_qos1(&mut c, "jobs/a", 1, b"job-0").await;

    // It exists now, durable and a quorum queue (a classic redeclare is refused).
    let probe = conn.create_channel().await.expect("channel");
    let classic = probe
        .queue_declare(
            ShortString::from(jobs.as_str()),
            QueueDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await;
    assert!(classic.is_err(), "the queue was not declared as a quorum queue");

    let mut consumers = Vec::new();
    for i in 0..2 {
        let ch = conn.create_channel().await.expect("channel");
        ch.basic_qos(1, BasicQosOptions::default()).await.expect("qos");
        let consumer = ch
            .basic_consume(
                ShortString::from(jobs.as_str()),
                ShortString::from(format!("worker-{i}")),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        consumers.push((ch, consumer));
    }
    for id in 2..=20u16 {
        publish_qos1(&mut c, "jobs/a", id, format!("job-{id}").as_bytes()).await;
    }
    let mut counts = [0usize; 2];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counts.iter().sum::<usize>() < 20 && tokio::time::Instant::now() < deadline {
        for (i, (_, consumer)) in consumers.iter_mut().enumerate() {
            if let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_millis(50), consumer.next()).await
            {
                // A slow worker: the other one gets the next job meanwhile.
                tokio::time::sleep(Duration::from_millis(5)).await;
                d.acker.ack(BasicAckOptions::default()).await.expect("ack");
                counts[i] += 1;
            }
        }
    }
    assert_eq!(counts.iter().sum::<usize>(), 20, "every job consumed once: {counts:?}");
    assert!(counts.iter().all(|&n| n > 0), "both workers got a share: {counts:?}");
    for (ch, _) in consumers {
        let _ = ch.close(200, ShortString::from("done")).await;
    }
    delete_queue(&conn, &jobs).await;

    // The queue deleted under the gateway: the next job fails (mandatory) instead of being
    // dropped, and the one after finds it declared again.
    let mut c5 = RawClient::connect(app.mqtt_addr, V5, &unique("jobs5")).await;
    let p = publish_packet("jobs/a", QoS::AtLeastOnce, 1, b"lost?");
    assert_eq!(publish_ack(&mut c5, p).await.code, ReasonCode::NO_MATCHING_SUBSCRIBERS);
    let p = publish_packet("jobs/a", QoS::AtLeastOnce, 2, b"again");
    assert_eq!(publish_ack(&mut c5, p).await.code, ReasonCode::SUCCESS);
    let ch = conn.create_channel().await.expect("channel");
    let m = get(&ch, &jobs, Duration::from_secs(5)).await.expect("the queue is back");
    assert_eq!(m.data, b"again");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_queue_is_declared_again_after_a_reconnect() {
    let conn = rabbit().await;
    let jobs = unique("mqgate-test-redeclare");
    let _cleanup = delete_queues_on_drop(&[&jobs]);
    let proxy = crate::support::proxy::Proxy::start().await;
    let yaml = config_rules(
        "",
        &format!(
            "  - name: jobs\n    from: \"jobs/#\"\n    to:\n      - amqp:\n          broker: rabbit\n          queue: \"{jobs}\"\n"
        ),
    )
    .replace(AMQP_URL, &proxy.url())
    .replace("    url:", "    reconnect_min: 50ms\n    reconnect_max: 200ms\n    url:");
    let app = gateway(&yaml).await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, V5, &unique("redeclare")).await;
    let p = publish_packet("jobs/a", QoS::AtLeastOnce, 1, b"before");
    assert_eq!(publish_ack(&mut c, p).await.code, ReasonCode::SUCCESS);

    // The connection goes; meanwhile the queue is deleted. The new connection declares it
    // again before its first publish (no returned message, no failure).
    proxy.cut();
    delete_queue(&conn, &jobs).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    wait_ready(&app).await;
    let p = publish_packet("jobs/a", QoS::AtLeastOnce, 2, b"after");
    assert_eq!(publish_ack(&mut c, p).await.code, ReasonCode::SUCCESS);
    let ch = conn.create_channel().await.expect("channel");
    let m = get(&ch, &jobs, Duration::from_secs(5)).await.expect("declared again");
    assert_eq!(m.data, b"after");
    app.stop().await;
}
