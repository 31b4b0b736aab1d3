//! One AMQP 1.0 source (`amqp10:` + `address:`): a receiver link on a broker under `amqp10:`
//! (Artemis, ActiveMQ, Qpid, Service Bus, RabbitMQ's AMQP 1.0 support). Each delivery is
//! published to the MQTT broker tracked, exactly as the AMQP 0-9-1 source does
//! (`broker::tracking`), and settled from its tracker's summary: `accepted` once MQTT took it;
//! for no subscriber or a failure, the source's policy: `requeue` → `released` (after
//! `requeue_delay`), `dead_letter` → `rejected`, `drop` → `accepted`.
//!
//! One task per source owns its connection, session and link (fe2o3-amqp): a `select!` over the
//! link, the trackers' reports, a tick (requeue delays) and shutdown. The link's credit is
//! `prefetch` (fe2o3's auto mode refills it as deliveries are settled), so at most about that
//! many deliveries are unsettled, each holding one message and one tracker. Reconnects with
//! backoff; what was not settled when a link went is redelivered by the broker.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fe2o3_amqp::link::delivery::DeliveryInfo;
use fe2o3_amqp::link::receiver::CreditMode;
use fe2o3_amqp::types::messaging::{Body, Message as AmqpMessage, MessageId};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Receiver, Session};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::{NackPolicy, SourceConfig, SourceMode};
use crate::broker::tracking::{Done, Fate, Mode, Summary, Tracker};
use crate::broker::Broker;
use crate::message::Message;
use crate::metrics::SourceMetrics;
use crate::mqtt::codec::{Properties, QoS};
use crate::targets::amqp10::config::{Amqp10BrokerConfig, BrokerUrl};

/// How often requeue delays are looked at.
const TICK: Duration = Duration::from_millis(100);

/// An AMQP 1.0 source, compiled from its config.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The source's name (also the `client_id` of the messages it publishes).
    pub name: Arc<str>,
    /// The broker's key under `amqp10:`.
    broker_name: String,
    /// The broker's config (URL, TLS, timeouts).
    broker: Amqp10BrokerConfig,
    /// The address the link receives from.
    address: String,
    /// Link credit.
    prefetch: u32,
    /// A fixed MQTT topic; `None`: the message's `subject`, else its `x-mqtt-topic`
    /// application property.
    topic: Option<String>,
    /// QoS without the application property `qos_header`.
    qos: QoS,
    /// The application property that sets the QoS ("" for none).
    qos_header: String,
    /// RETAIN without an `x-mqtt-retain` application property.
    retain: bool,
    /// Broadcast or work.
    mode: Mode,
    /// Forward to the cluster's other nodes and persistent sessions (`cluster: forward`).
    forward: bool,
    /// No subscriber matched.
    on_no_subscriber: NackPolicy,
    /// Delivery failed.
    on_failure: NackPolicy,
    /// Held this long before `released`.
    requeue_delay: Duration,
}

impl Settings {
    /// The settings of `cfg` on broker `broker` (validated config).
    pub fn new(cfg: &SourceConfig, broker_name: &str, broker: &Amqp10BrokerConfig) -> Settings {
        Settings {
            name: Arc::from(cfg.name.value.as_str()),
            broker_name: broker_name.to_owned(),
            broker: broker.clone(),
            address: cfg.address.as_ref().map(|a| a.value.clone()).unwrap_or_default(),
            prefetch: cfg.prefetch.value.clamp(1, 65_535),
            topic: cfg.topic.as_ref().map(|t| t.value.clone()),
            qos: match cfg.qos.value {
                0 => QoS::AtMostOnce,
                2 => QoS::ExactlyOnce,
                _ => QoS::AtLeastOnce,
            },
            qos_header: cfg.qos_header.clone(),
            retain: cfg.retain,
            mode: match cfg.mode {
                SourceMode::Broadcast => Mode::Broadcast,
                SourceMode::Work => Mode::Work,
            },
            forward: cfg.cluster == super::config::SourceCluster::Forward,
            on_no_subscriber: cfg.on_no_subscriber,
            on_failure: cfg.on_failure,
            requeue_delay: cfg.requeue_delay.0,
        }
    }
}

/// Runs the source until `shutdown`: connect, receive, reconnect with backoff.
pub async fn run(
    s: Settings,
    broker: Arc<Broker>,
    metrics: SourceMetrics,
    shutdown: CancellationToken,
) {
    metrics.connected.set(0);
    let min = s.broker.reconnect_min.0.max(Duration::from_millis(10));
    let max = s.broker.reconnect_max.0.max(min);
    let mut delay = min;
    loop {
        match receive(&s, &broker, &metrics, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                metrics.connected.set(0);
                warn!(source = %s.name, broker = %s.broker_name, error = %e, "AMQP 1.0 source disconnected; reconnecting");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(max);
    }
    metrics.connected.set(0);
}

/// One connection: attach, then receive and settle until shutdown (`Ok`) or an error.
async fn receive(
    s: &Settings,
    broker: &Arc<Broker>,
    metrics: &SourceMetrics,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let url = BrokerUrl::parse(&s.broker.url.value)?;
    let wait = s.broker.connect_timeout.0;
    let setup = async {
        let mut conn =
            crate::targets::amqp10::client::connect(&s.broker_name, &s.broker, &url).await?;
        let mut session =
            Session::begin(&mut conn).await.map_err(|e| format!("begin a session: {e}"))?;
        let receiver = Receiver::builder()
            .name(format!("mqgate-source-{}", s.name))
            .source(s.address.as_str())
            .credit_mode(CreditMode::Auto(s.prefetch))
            .attach(&mut session)
            .await
            .map_err(|e| format!("attach a receiver link to {:?}: {e}", s.address))?;
        Ok::<_, String>((conn, session, receiver))
    };
    let (mut conn, mut session, mut receiver) = tokio::time::timeout(wait, setup)
        .await
        .map_err(|_| format!("connecting took longer than {wait:?}"))??;
    metrics.connected.set(1);
    info!(source = %s.name, broker = %s.broker_name, address = %s.address, "AMQP 1.0 source receiving");
    let mut link = Link {
        s,
        broker,
        metrics,
        receiver: &mut receiver,
        unsettled: HashMap::new(),
        next: 0,
        held: VecDeque::new(),
    };
    let (report_tx, mut reports) = mpsc::unbounded_channel::<Done>();
    let mut tick = tokio::time::interval(TICK);
    let end = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            d = link.receiver.recv::<Body<Value>>() => match d {
                Ok(d) => link.on_delivery(d, &report_tx),
                Err(e) => break Err(format!("receive: {e}")),
            },
            Some(done) = reports.recv() => {
                if let Err(e) = link.on_report(done).await {
                    break Err(e);
                }
            }
            _ = tick.tick() => {
                if let Err(e) = link.release_due().await {
                    break Err(e);
                }
            }
        }
    };
    // Unsettled deliveries go back to the broker with the link.
    let _ = tokio::time::timeout(Duration::from_secs(1), receiver.close()).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), session.end()).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
    end
}

/// The state of one attached link.
struct Link<'a> {
    s: &'a Settings,
    broker: &'a Arc<Broker>,
    metrics: &'a SourceMetrics,
    receiver: &'a mut Receiver,
    /// Deliveries published and not yet settled, by tracker token.
    unsettled: HashMap<u64, DeliveryInfo>,
    /// The next tracker token.
    next: u64,
    /// Deliveries to release once their `requeue_delay` passed.
    held: VecDeque<(Instant, u64)>,
}

impl Link<'_> {
    /// One delivery: published to MQTT, tracked; or the failure policy.
    fn on_delivery(
        &mut self,
        d: fe2o3_amqp::link::delivery::Delivery<Body<Value>>,
        report: &mpsc::UnboundedSender<Done>,
    ) {
        let token = self.next;
        self.next += 1;
        self.unsettled.insert(token, DeliveryInfo::from(&d));
        let s = self.s;
        let message = d.into_message();
        let msg = match to_mqtt(s, &message) {
            Ok(msg) => msg,
            Err(reason) => {
                warn!(source = %s.name, %reason, "AMQP 1.0 delivery cannot be published to MQTT");
                let _ = report.send(Done { token, summary: Summary::Failed });
                return;
            }
        };
        let root = Tracker::root(token, s.mode, report.clone());
        self.broker.publish_source(&Arc::new(msg), &root, s.forward);
        root.finish(Fate::Gone);
    }

    /// A tracker's summary: `accepted`, or the policy.
    async fn on_report(&mut self, done: Done) -> Result<(), String> {
        let policy = match done.summary {
            Summary::Taken => {
                self.metrics.delivered.inc();
                return self.settle(done.token, NackPolicy::Drop, false).await;
            }
            Summary::NoSubscriber => self.s.on_no_subscriber,
            Summary::Failed | Summary::Returned => self.s.on_failure,
        };
        if policy == NackPolicy::Requeue && !self.s.requeue_delay.is_zero() {
            self.held.push_back((Instant::now() + self.s.requeue_delay, done.token));
            return Ok(());
        }
        self.settle(done.token, policy, true).await
    }

    /// Releases the held deliveries whose delay passed.
    async fn release_due(&mut self) -> Result<(), String> {
        let now = Instant::now();
        while self.held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, token)) = self.held.pop_front() {
                self.settle(token, NackPolicy::Requeue, true).await?;
            }
        }
        Ok(())
    }

    /// Settles delivery `token`: `Drop` (and a taken message) `accepted`, `Requeue`
    /// `released`, `DeadLetter` `rejected`; `count` the policy's metric.
    async fn settle(&mut self, token: u64, policy: NackPolicy, count: bool) -> Result<(), String> {
        let Some(info) = self.unsettled.remove(&token) else { return Ok(()) };
        let m = self.metrics;
        let r = match policy {
            NackPolicy::Drop => {
                if count {
                    m.dropped.inc();
                }
                self.receiver.accept(info).await
            }
            NackPolicy::Requeue => {
                m.requeued.inc();
                self.receiver.release(info).await
            }
            NackPolicy::DeadLetter => {
                m.dead_lettered.inc();
                self.receiver.reject(info, None).await
            }
        };
        r.map_err(|e| format!("settle a delivery: {e}"))
    }
}

/// An AMQP 1.0 message as the MQTT message the source publishes (pure): topic (the source's
/// `topic:`, else `subject`, else the `x-mqtt-topic` application property), QoS and RETAIN
/// (application properties `qos_header` and `x-mqtt-retain`, else the source's), payload (the
/// data sections, or a string or binary value).
fn to_mqtt(s: &Settings, m: &AmqpMessage<Body<Value>>) -> Result<Message, String> {
    let app = m.application_properties.as_ref().map(|a| &a.0);
    let prop = |name: &str| app.and_then(|a| a.get(name));
    let topic = match &s.topic {
        Some(t) => t.clone(),
        None => m
            .properties
            .as_ref()
            .and_then(|p| p.subject.clone())
            .or_else(|| match prop("x-mqtt-topic") {
                Some(SimpleValue::String(t)) => Some(t.clone()),
                _ => None,
            })
            .ok_or("no MQTT topic: no subject and no x-mqtt-topic application property")?,
    };
    crate::mqtt::topic::validate_name(&topic).map_err(|e| format!("topic {topic:?}: {e}"))?;
    let qos = match prop(&s.qos_header).and_then(int) {
        Some(0) => QoS::AtMostOnce,
        Some(1) => QoS::AtLeastOnce,
        Some(2) => QoS::ExactlyOnce,
        _ => s.qos,
    };
    let retain = match prop("x-mqtt-retain") {
        Some(SimpleValue::Bool(b)) => *b,
        _ => s.retain,
    };
    let payload = match &m.body {
        Body::Data(sections) => {
            let mut out = Vec::new();
            for d in sections.iter() {
                out.extend_from_slice(&d.0);
            }
            Bytes::from(out)
        }
        Body::Value(v) => match &v.0 {
            Value::String(t) => Bytes::from(t.clone().into_bytes()),
            Value::Binary(b) => Bytes::from(b.to_vec()),
            other => return Err(format!("an amqp-value body of type {other:?} is not a payload")),
        },
        Body::Empty => Bytes::new(),
        Body::Sequence(_) => return Err("an amqp-sequence body is not a payload".into()),
    };
    Ok(Message {
        charge: Default::default(),
        topic,
        payload,
        qos,
        retain,
        client_id: Arc::clone(&s.name),
        username: None,
        properties: properties(m, &s.qos_header).into(),
        received: Instant::now(),
        packet_id: None,
    })
}

/// MQTT 5 properties, the `- amqp10:` target's mapping reversed: content type; correlation
/// id → correlation data (a string's bytes, a binary as is, a number in decimal); reply-to →
/// response topic (when it is a topic name); header `ttl` (ms) → message expiry (s, rounded
/// up); application property `x-mqtt-payload-format-indicator` → payload format indicator;
/// the other scalar application properties → user properties (mqgate's own `x-mqtt-*` and
/// `qos_header` left out).
fn properties(m: &AmqpMessage<Body<Value>>, qos_header: &str) -> Properties {
    let mut out = Properties::default();
    if let Some(p) = &m.properties {
        out.content_type = p.content_type.as_ref().map(|c| c.0.clone());
        out.correlation_data = p.correlation_id.as_ref().map(|c| match c {
            MessageId::String(t) => Bytes::from(t.clone().into_bytes()),
            MessageId::Binary(b) => Bytes::from(b.to_vec()),
            MessageId::Ulong(n) => Bytes::from(n.to_string().into_bytes()),
            MessageId::Uuid(u) => Bytes::copy_from_slice(u.as_ref()),
        });
        out.response_topic =
            p.reply_to.clone().filter(|t| crate::mqtt::topic::validate_name(t).is_ok());
    }
    if let Some(ttl) = m.header.as_ref().and_then(|h| h.ttl) {
        out.message_expiry_interval = Some(u64::from(ttl).div_ceil(1000).max(1) as u32);
    }
    if let Some(app) = &m.application_properties {
        for (k, v) in app.0.iter() {
            if k == "x-mqtt-payload-format-indicator" {
                out.payload_format_indicator =
                    int(v).filter(|f| *f == 0 || *f == 1).map(|f| f as u8);
                continue;
            }
            if k.starts_with("x-mqtt-") || k == qos_header {
                continue;
            }
            let text = match v {
                SimpleValue::String(t) => Some(t.clone()),
                SimpleValue::Symbol(t) => Some(t.0.clone()),
                SimpleValue::Bool(b) => Some(b.to_string()),
                SimpleValue::Char(c) => Some(c.to_string()),
                other => int(other).map(|n| n.to_string()),
            };
            if let Some(text) = text {
                out.user_properties.push((k.clone(), text));
            }
        }
    }
    out
}

/// An integer application property's value.
fn int(v: &SimpleValue) -> Option<i64> {
    match v {
        SimpleValue::Byte(x) => Some(i64::from(*x)),
        SimpleValue::Short(x) => Some(i64::from(*x)),
        SimpleValue::Int(x) => Some(i64::from(*x)),
        SimpleValue::Long(x) => Some(*x),
        SimpleValue::Ubyte(x) => Some(i64::from(*x)),
        SimpleValue::Ushort(x) => Some(i64::from(*x)),
        SimpleValue::Uint(x) => Some(i64::from(*x)),
        SimpleValue::Ulong(x) => i64::try_from(*x).ok(),
        SimpleValue::String(t) => t.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use fe2o3_amqp::types::messaging::{ApplicationProperties, Data, Header, Properties as P};
    use fe2o3_amqp::types::primitives::{Binary, OrderedMap, Symbol};

    use super::*;
    use crate::sources::config::SourceConfig;

    fn settings(yaml_extra: &str) -> Settings {
        let yaml = format!(
            "mqtt:\n  listen: \"127.0.0.1:1883\"\namqp10:\n  b:\n    url: \"amqp://h:5672\"\nsources:\n  - name: s\n    amqp10: b\n    address: a\n{yaml_extra}"
        );
        let c = crate::config::Config::parse(std::path::Path::new("t.yaml"), &yaml).unwrap();
        let cfg: &SourceConfig = &c.sources[0];
        Settings::new(cfg, "b", &c.amqp10["b"])
    }

    fn message(subject: Option<&str>, app: &[(&str, SimpleValue)]) -> AmqpMessage<Body<Value>> {
        let mut map = OrderedMap::new();
        for (k, v) in app {
            map.insert((*k).to_owned(), v.clone());
        }
        AmqpMessage {
            header: Some(Header { ttl: Some(1500), ..Header::default() }),
            delivery_annotations: None,
            message_annotations: None,
            properties: Some(P {
                subject: subject.map(str::to_owned),
                content_type: Some(Symbol::from("application/json")),
                correlation_id: Some(MessageId::String("c-1".into())),
                reply_to: Some("replies/x1".into()),
                ..P::default()
            }),
            application_properties: Some(ApplicationProperties(map)),
            body: Body::Data(
                vec![Data(Binary::from(b"ab".to_vec())), Data(Binary::from(b"c".to_vec()))].into(),
            ),
            footer: None,
        }
    }

    #[test]
    fn topic_qos_retain_payload_and_properties() {
        let s = settings("");
        let m = message(
            Some("cmd/1"),
            &[
                ("x-mqtt-qos", SimpleValue::Int(2)),
                ("x-mqtt-retain", SimpleValue::Bool(true)),
                ("x-mqtt-payload-format-indicator", SimpleValue::Int(1)),
                ("device", SimpleValue::String("d7".into())),
                ("n", SimpleValue::Long(3)),
            ],
        );
        let msg = to_mqtt(&s, &m).unwrap();
        assert_eq!((msg.topic.as_str(), &msg.payload[..]), ("cmd/1", &b"abc"[..]));
        assert_eq!((msg.qos, msg.retain), (QoS::ExactlyOnce, true));
        let p = &msg.properties;
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(p.response_topic.as_deref(), Some("replies/x1"));
        assert_eq!(p.message_expiry_interval, Some(2));
        assert_eq!(p.payload_format_indicator, Some(1));
        assert_eq!(
            p.user_properties,
            vec![("device".to_owned(), "d7".to_owned()), ("n".to_owned(), "3".to_owned())]
        );
    }

    #[test]
    fn the_topic_comes_from_subject_then_x_mqtt_topic_then_config_and_must_be_a_name() {
        let s = settings("");
        let from_app = message(None, &[("x-mqtt-topic", SimpleValue::String("a/b".into()))]);
        assert_eq!(to_mqtt(&s, &from_app).unwrap().topic, "a/b");
        assert!(to_mqtt(&s, &message(None, &[])).unwrap_err().contains("no MQTT topic"));
        assert!(to_mqtt(&s, &message(Some("a/+"), &[])).is_err(), "a wildcard is no topic name");
        let fixed = settings("    topic: \"fixed/t\"\n    qos: 0\n");
        let msg = to_mqtt(&fixed, &message(Some("cmd/1"), &[])).unwrap();
        assert_eq!((msg.topic.as_str(), msg.qos), ("fixed/t", QoS::AtMostOnce));
    }
}
