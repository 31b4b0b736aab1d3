//! The gateway loses RabbitMQ and gets it back: /readyz follows, nothing is acknowledged while
//! the broker is away, and forwarding resumes after the reconnect.

use std::time::Duration;

use crate::support::proxy::Proxy;
use crate::support::*;
use mqgate::mqtt::codec::{Packet, ProtocolVersion, QoS, ReasonCode};

async fn ready_status(app: &mqgate::app::App) -> u16 {
    http_get(app.admin_addr, "/readyz").await.map(|(s, _)| s).unwrap_or(0)
}

async fn wait_status(app: &mqgate::app::App, want: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ready_status(app).await != want {
        assert!(tokio::time::Instant::now() < deadline, "/readyz never became {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn broker_loss_is_reported_and_forwarding_resumes_after_reconnect() {
    let conn = rabbit().await;
    let (ch, exchange, queue) = exchange_with_queue(&conn, "#").await;
    let proxy = Proxy::start().await;
    let yaml = config_one_rule("r/#", &exchange, "").replace(
        "127.0.0.1:5672/%2f\"",
        &format!("{}/%2f\"\n    reconnect_min: 50ms\n    reconnect_max: 200ms", proxy.addr),
    );
    let app = gateway(&yaml).await;
    wait_ready(&app).await;

    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "reconnect").await;
    c.publish("r/1", QoS::AtLeastOnce, 1, b"before").await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::SUCCESS));

    proxy.cut();
    wait_status(&app, 503).await;
    c.publish("r/1", QoS::AtLeastOnce, 2, b"during").await;
    expect_disconnect(&mut c, ReasonCode::SERVER_BUSY).await;

    proxy.restore();
    wait_status(&app, 200).await;
    let mut c = RawClient::connect(app.mqtt_addr, ProtocolVersion::V5, "reconnect").await;
    c.publish("r/1", QoS::AtLeastOnce, 3, b"after").await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(a)) if a.code == ReasonCode::SUCCESS));

    let mut got = Vec::new();
    while let Some(m) = get(&ch, &queue, Duration::from_millis(500)).await {
        got.push(m.data);
    }
    assert_eq!(got, vec![b"before".to_vec(), b"after".to_vec()], "only acknowledged messages");
    app.stop().await;
}
