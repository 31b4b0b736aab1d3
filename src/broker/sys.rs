//! `$SYS/broker/...`: a few statistics published as retained messages every
//! `mqtt.sys_interval`, as Mosquitto does, so any MQTT client can watch the gateway.
//!
//! Reads counters only; publishes through the broker like any message (local subscribers
//! only: `$SYS` topics never match rules with a leading wildcard, and are not forwarded).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::Broker;
use crate::message::Message;
use crate::metrics::Metrics;
use crate::mqtt::codec::{PublishProperties, QoS};

/// Publishes the `$SYS` topics every `interval` until `shutdown`.
pub async fn run(
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let client_id: Arc<str> = Arc::from("$SYS");
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let received: u64 = (0u8..3)
            .map(|q| {
                let labels = crate::metrics::QosLabels { qos: q.to_string() };
                metrics.messages_received.get_or_create(&labels).get()
            })
            .sum();
        let stats = [
            ("$SYS/broker/uptime", format!("{} seconds", started.elapsed().as_secs())),
            ("$SYS/broker/version", format!("mqgate {}", env!("CARGO_PKG_VERSION"))),
            ("$SYS/broker/clients/connected", broker.session_count().to_string()),
            ("$SYS/broker/messages/received", received.to_string()),
            ("$SYS/broker/messages/sent", metrics.messages_delivered_local.get().to_string()),
        ];
        for (topic, value) in stats {
            let msg = Arc::new(Message {
                charge: Default::default(),
                topic: topic.to_owned(),
                payload: Bytes::from(value),
                qos: QoS::AtMostOnce,
                retain: true,
                client_id: Arc::clone(&client_id),
                username: None,
                properties: PublishProperties::none(),
                received: Instant::now(),
                packet_id: None,
            });
            broker.publish(&msg, None, &mut crate::targets::Waits::new());
        }
    }
}
