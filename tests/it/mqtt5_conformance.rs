//! MQTT 5 conformance: server-to-client topic aliases, request/response (issue 13, item 10).

/// MQTT 5 server-to-client topic aliases (issue 13, item 10): a client that allows them gets
/// the first topics by alias (set on the first delivery, the name left out after), and by name
/// once they are all taken; a client that does not, never gets one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_use_topic_aliases_when_the_client_allows_them() {
    use mqgate::mqtt::codec::{Packet, ProtocolVersion, PubResponse, QoS};
    let app = crate::support::gateway(
        "mqtt:\n  listen: \"127.0.0.1:0\"\nadmin:\n  listen: \"127.0.0.1:0\"\n",
    )
    .await;
    for allowed in [1u16, 0] {
        let mut sub = crate::support::RawClient::tcp(app.mqtt_addr, ProtocolVersion::V5).await;
        let mut connect =
            crate::support::connect_packet(ProtocolVersion::V5, &crate::support::unique("alias"));
        if allowed > 0 {
            connect.properties.topic_alias_maximum = Some(allowed);
        }
        sub.send(&Packet::Connect(Box::new(connect))).await;
        assert!(matches!(sub.recv().await, Some(Packet::ConnAck(a)) if a.code.is_success()));
        sub.subscribe("alias/#", QoS::AtLeastOnce).await;
        let mut p = crate::support::RawClient::connect(
            app.mqtt_addr,
            ProtocolVersion::V5,
            &crate::support::unique("p"),
        )
        .await;
        for (i, topic) in ["alias/a", "alias/a", "alias/b", "alias/a"].iter().enumerate() {
            let id = u16::try_from(i + 1).expect("small");
            p.publish(topic, QoS::AtLeastOnce, id, b"x").await;
            assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
        }
        let mut got = Vec::new();
        while let Ok(Some(Packet::Publish(m))) =
            sub.recv_within(std::time::Duration::from_millis(300)).await
        {
            sub.send(&Packet::PubAck(PubResponse::success(m.packet_id))).await;
            got.push((m.topic.clone(), m.properties.topic_alias));
        }
        let want: Vec<(String, Option<u16>)> = if allowed > 0 {
            vec![
                ("alias/a".into(), Some(1)),
                (String::new(), Some(1)),
                ("alias/b".into(), None),
                (String::new(), Some(1)),
            ]
        } else {
            ["alias/a", "alias/a", "alias/b", "alias/a"]
                .iter()
                .map(|t| ((*t).into(), None))
                .collect()
        };
        assert_eq!(got, want, "allowed {allowed}");
    }
    app.stop().await;
}
