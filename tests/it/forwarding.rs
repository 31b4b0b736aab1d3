//! MQTT in, RabbitMQ out: QoS 0/1 forwarding, headers, and honest acknowledgements, against
//! the real RabbitMQ on 127.0.0.1:5672.

use std::time::Duration;

use crate::support::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS, ReasonCode};

#[tokio::test]
async fn qos0_and_qos1_reach_rabbitmq_with_delivery_mode_and_headers() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "sensors.#").await;
    let app = gateway(&config_one_rule("sensors/+/telemetry", &exchange, "")).await;
    wait_ready(&app).await;

    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "dev-a").await;
    c.publish("sensors/a/telemetry", QoS::AtMostOnce, 0, b"zero").await;
    c.publish("sensors/a/telemetry", QoS::AtLeastOnce, 7, b"\x00one\xff").await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!((a.packet_id, a.code), (7, ReasonCode::SUCCESS)),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // Not matching the rule: not forwarded.
    c.publish("sensors/a/other", QoS::AtMostOnce, 0, b"nope").await;

    let m0 = get(&ch, &queue, Duration::from_secs(5)).await.expect("QoS 0 message forwarded");
    let m1 = get(&ch, &queue, Duration::from_secs(5)).await.expect("QoS 1 message forwarded");
    assert_eq!(m0.data, b"zero");
    assert_eq!(m0.routing_key.as_str(), "sensors.a.telemetry");
    assert_eq!(*m0.properties.delivery_mode(), Some(1));
    assert_eq!(m1.data, b"\x00one\xff", "payload unchanged");
    assert_eq!(*m1.properties.delivery_mode(), Some(2));
    assert_eq!(header(&m1, "x-mqtt-topic").as_deref(), Some("sensors/a/telemetry"));
    assert_eq!(header(&m1, "x-mqtt-qos").as_deref(), Some("1"));
    assert_eq!(header(&m1, "x-mqtt-retain").as_deref(), Some("false"));
    assert_eq!(header(&m1, "x-mqtt-client-id").as_deref(), Some("dev-a"));
    assert_eq!(header(&m0, "x-mqtt-qos").as_deref(), Some("0"));
    assert!(
        get(&ch, &queue, Duration::from_millis(300)).await.is_none(),
        "unmatched topic forwarded"
    );

    let (status, body) = http_get(app.admin_addr, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    assert!(
        body.contains(r#"mqgate_target_forwarded_total{rule="r1",target="amqp:rabbit/"#),
        "per-target counter missing:\n{body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn puback_waits_for_the_confirm_and_is_refused_for_a_missing_exchange() {
    let missing = unique("mqgate-test-missing");
    let app = gateway(&config_one_rule("t/#", &missing, "")).await;
    wait_ready(&app).await;

    // MQTT 5: a PUBACK with an error reason code, never success.
    let mut c5 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "v5-missing").await;
    c5.publish("t/x", QoS::AtLeastOnce, 1, b"m").await;
    match c5.recv().await {
        Some(Packet::PubAck(a)) => {
            assert_eq!(a.packet_id, 1);
            assert!(!a.code.is_success(), "missing exchange acknowledged as success: {a:?}");
            let reason = a.properties.reason_string.clone().unwrap_or_default();
            assert!(reason.contains(&missing), "reason string should name the exchange: {reason}");
        }
        other => panic!("expected a failing PUBACK, got {other:?}"),
    }

    // MQTT 3.1.1 has no negative PUBACK: no PUBACK, the connection is closed.
    let mut c3 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "v3-missing").await;
    c3.publish("t/x", QoS::AtLeastOnce, 1, b"m").await;
    match c3.recv().await {
        None => {}
        Some(p) => panic!("3.1.1 client got {p:?} for an undeliverable message"),
    }
    app.stop().await;
}

#[tokio::test]
async fn a_nacked_publish_is_not_acknowledged_as_delivered() {
    let conn = rabbit().await;
    let (ch, exchange, _) = exchange_with_queue(&conn, "#").await;
    // Also bind a queue that holds a single message and rejects the rest: RabbitMQ then nacks
    // further publishes (x-overflow=reject-publish).
    let queue = unique("mqgate-test-bounded");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    ch.queue_declare(
        ShortString::from(queue.as_str()),
        QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() },
        args,
    )
    .await
    .expect("declare bounded queue");
    ch.queue_bind(
        ShortString::from(queue.as_str()),
        ShortString::from(exchange.as_str()),
        ShortString::from("#"),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let app = gateway(&config_one_rule("n/#", &exchange, "")).await;
    wait_ready(&app).await;

    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "nack").await;
    c.publish("n/1", QoS::AtLeastOnce, 1, b"first").await;
    c.publish("n/1", QoS::AtLeastOnce, 2, b"second").await;
    let a1 = c.recv().await;
    let a2 = c.recv().await;
    match (a1, a2) {
        (Some(Packet::PubAck(a1)), Some(Packet::PubAck(a2))) => {
            assert_eq!((a1.packet_id, a1.code), (1, ReasonCode::SUCCESS));
            assert_eq!(a2.packet_id, 2);
            assert!(!a2.code.is_success(), "nacked publish acknowledged: {a2:?}");
        }
        other => panic!("expected two PUBACKs, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn pubacks_leave_in_publish_order_under_concurrent_confirms() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let app = gateway(&config_one_rule("o/confirmed/#", &exchange, "")).await;
    wait_ready(&app).await;

    // Interleave messages that need a RabbitMQ confirm with messages that match nothing and
    // could be acknowledged at once: the acknowledgements must still follow publish order.
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "order").await;
    let n: u16 = 600;
    for id in 1..=n {
        let topic = if id % 3 == 0 { "o/unrouted" } else { "o/confirmed/x" };
        c.publish(topic, QoS::AtLeastOnce, id, &id.to_be_bytes()).await;
    }
    let mut got = Vec::new();
    while got.len() < usize::from(n) {
        match c.recv().await {
            Some(Packet::PubAck(a)) => got.push(a.packet_id),
            other => panic!("expected PUBACK, got {other:?} after {} acks", got.len()),
        }
    }
    let want: Vec<u16> = (1..=n).collect();
    assert_eq!(got, want, "PUBACKs out of order");
    let mut forwarded = 0;
    while get(&ch, &queue, Duration::from_millis(500)).await.is_some() {
        forwarded += 1;
    }
    assert_eq!(forwarded, 400);
    app.stop().await;
}

#[tokio::test]
async fn qos1_matching_nothing_is_acknowledged_with_no_matching_subscribers() {
    let app = gateway(&config_one_rule("only/this", "amq.topic", "")).await;
    let mut c5 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "nomatch5").await;
    c5.publish("nobody/listens", QoS::AtLeastOnce, 3, b"x").await;
    match c5.recv().await {
        Some(Packet::PubAck(a)) => {
            assert_eq!((a.packet_id, a.code), (3, ReasonCode::NO_MATCHING_SUBSCRIBERS))
        }
        other => panic!("expected PUBACK 0x10, got {other:?}"),
    }
    let mut c3 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "nomatch3").await;
    c3.publish("nobody/listens", QoS::AtLeastOnce, 4, b"x").await;
    match c3.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!((a.packet_id, a.code), (4, ReasonCode::SUCCESS)),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn unreachable_broker_is_not_ready_and_never_acknowledges() {
    // Port 1 on loopback: connection refused, so the sink stays disconnected.
    let yaml = config_one_rule("u/#", "amq.topic", "").replace("127.0.0.1:5672", "127.0.0.1:1");
    let app = gateway(&yaml).await;
    let (status, body) = http_get(app.admin_addr, "/readyz").await.expect("readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("amqp rabbit: disconnected"), "{body}");
    assert_eq!(http_get(app.admin_addr, "/healthz").await.expect("healthz").0, 200);

    let mut c5 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "down5").await;
    c5.publish("u/1", QoS::AtLeastOnce, 1, b"x").await;
    match c5.recv().await {
        Some(Packet::Disconnect(d)) => assert_eq!(d.code, ReasonCode::SERVER_BUSY),
        Some(Packet::PubAck(a)) => assert!(!a.code.is_success(), "acknowledged while down: {a:?}"),
        other => panic!("expected DISCONNECT or a failing PUBACK, got {other:?}"),
    }
    let mut c3 = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "down3").await;
    c3.publish("u/1", QoS::AtLeastOnce, 1, b"x").await;
    assert!(c3.recv().await.is_none(), "3.1.1 client should be disconnected without a PUBACK");
    // QoS 0 still flows to local subscribers while the broker is down.
    let mut sub = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "down-sub").await;
    sub.subscribe("u/#", QoS::AtMostOnce).await;
    let mut publ = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "down-pub").await;
    publ.publish("u/2", QoS::AtMostOnce, 0, b"local").await;
    match sub.recv().await {
        Some(Packet::Publish(p)) => assert_eq!(&p.payload[..], b"local"),
        other => panic!("expected the local delivery, got {other:?}"),
    }
    app.stop().await;
}

#[tokio::test]
async fn a_message_matching_several_rules_reaches_every_target_before_its_puback() {
    let conn = rabbit().await;
    let (ch, ex_a, q_a) = exchange_with_queue(&conn, "#").await;
    let (_, ex_b, q_b) = exchange_with_queue(&conn, "fixed.key").await;
    let yaml = config_rules(
        "",
        &format!(
            r#"  - name: all-sensors
    from: "s/#"
    to:
      - amqp: {{ broker: rabbit, exchange: "{ex_a}" }}
  - name: one-sensor
    from: "s/+/temp"
    to:
      - amqp: {{ broker: rabbit, exchange: "{ex_b}", routing_key: "fixed.key" }}
      - amqp: {{ broker: rabbit, exchange: "{ex_a}" }}
"#
        ),
    );
    let app = gateway(&yaml).await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V311, "fan").await;
    c.publish("s/1/temp", QoS::AtLeastOnce, 1, b"21.5").await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(a)) if a.packet_id == 1));
    // By the time of the PUBACK every target has confirmed, so everything is already queued.
    let a1 = get(&ch, &q_a, Duration::from_millis(1)).await.expect("rule 1 target");
    let a2 = get(&ch, &q_a, Duration::from_millis(1)).await.expect("rule 2, second target");
    let b = get(&ch, &q_b, Duration::from_millis(1)).await.expect("rule 2, fixed routing key");
    assert_eq!(a1.routing_key.as_str(), "s.1.temp");
    assert_eq!(a2.routing_key.as_str(), "s.1.temp");
    assert_eq!(b.routing_key.as_str(), "fixed.key");
    assert!([a1.data, a2.data, b.data].iter().all(|d| d == b"21.5"));
    app.stop().await;
}

#[tokio::test]
async fn qos2_is_pubreced_only_after_the_confirm_and_never_on_failure() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let missing = unique("mqgate-test-missing");
    let yaml = config_rules(
        "",
        &format!(
            r#"  - name: ok
    from: "q2/ok"
    to: [ {{ amqp: {{ broker: rabbit, exchange: "{exchange}" }} }} ]
  - name: broken
    from: "q2/broken"
    to: [ {{ amqp: {{ broker: rabbit, exchange: "{missing}" }} }} ]
"#
        ),
    );
    let app = gateway(&yaml).await;
    wait_ready(&app).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "q2-fwd").await;
    c.publish("q2/ok", QoS::ExactlyOnce, 5, b"exactly").await;
    match c.recv().await {
        Some(Packet::PubRec(r)) => assert_eq!((r.packet_id, r.code), (5, ReasonCode::SUCCESS)),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // PUBREC came after the confirm: the message is already queued.
    let m = get(&ch, &queue, Duration::from_millis(1)).await.expect("forwarded before PUBREC");
    assert_eq!((m.data.as_slice(), *m.properties.delivery_mode()), (&b"exactly"[..], Some(2)));
    assert_eq!(header(&m, "x-mqtt-qos").as_deref(), Some("2"));
    c.send(&Packet::PubRel(mqgate::mqtt::codec::PubResponse::success(5))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubComp(r)) if r.packet_id == 5));

    c.publish("q2/broken", QoS::ExactlyOnce, 6, b"lost").await;
    match c.recv().await {
        Some(Packet::PubRec(r)) => {
            assert_eq!(r.packet_id, 6);
            assert!(!r.code.is_success(), "undeliverable QoS 2 PUBRECed as success: {r:?}");
        }
        other => panic!("expected a failing PUBREC, got {other:?}"),
    }
    app.stop().await;
}
