//! The `- kafka:` target: renders the Kafka topic and key, maps the MQTT properties to record
//! headers and hands the record to its cluster's producer.
//!
//! Headers (values as bytes): `x-mqtt-topic`, `x-mqtt-qos` (`0`/`1`/`2`), `x-mqtt-retain`
//! (`true`/`false`), `x-mqtt-client-id`; for MQTT 5 messages also `content-type`,
//! `x-mqtt-response-topic`, `x-mqtt-correlation-data`, `x-mqtt-payload-format-indicator`, and
//! each user property in order (Kafka headers may repeat a name, so none is lost; names starting
//! with `x-mqtt-` are mqgate's and are not taken from users).

use std::sync::Arc;

use rdkafka::message::{Header, OwnedHeaders};

use super::config::{check_topic_name, KafkaTargetConfig};
use super::producer::{Cluster, Pending, Record};
use crate::message::Message;
use crate::metrics::TargetMetrics;
use crate::rules::LazyContext;
use crate::targets::{Explained, Handoff, Target};
use crate::template::{self, Template, TemplateError};

/// Text, or a template over the message.
#[derive(Debug)]
enum Spec {
    Fixed(String),
    Template(Template),
}

impl Spec {
    fn compile(text: &str) -> Result<Spec, TemplateError> {
        Ok(if template::is_template(text) {
            Spec::Template(Template::compile(text)?)
        } else {
            Spec::Fixed(text.to_owned())
        })
    }

    fn render(&self, msg: &Arc<Message>, ctx: &mut LazyContext) -> Result<String, TemplateError> {
        match self {
            Spec::Fixed(t) => Ok(t.clone()),
            Spec::Template(t) => t.render_for(msg, ctx),
        }
    }
}

/// One `- kafka:` target.
#[derive(Debug)]
pub struct KafkaTarget {
    id: String,
    cluster: Arc<Cluster>,
    topic: Spec,
    /// `None`: the MQTT topic name.
    key: Option<Spec>,
    metrics: TargetMetrics,
}

impl KafkaTarget {
    /// Compiles target `t` (id `id`) on `cluster`.
    pub fn build(
        id: &str,
        t: &KafkaTargetConfig,
        cluster: &Arc<Cluster>,
        metrics: TargetMetrics,
    ) -> Result<KafkaTarget, TemplateError> {
        Ok(KafkaTarget {
            id: id.to_owned(),
            cluster: Arc::clone(cluster),
            topic: Spec::compile(&t.topic.value)?,
            key: t.key.as_ref().map(|k| Spec::compile(&k.value)).transpose()?,
            metrics,
        })
    }

    /// The Kafka topic and key of `msg`.
    fn resolve(
        &self,
        msg: &Arc<Message>,
        ctx: &mut LazyContext,
    ) -> Result<(String, String), TemplateError> {
        let topic = self.topic.render(msg, ctx)?;
        if matches!(self.topic, Spec::Template(_)) {
            check_topic_name(&topic).map_err(TemplateError)?;
        }
        let key = match &self.key {
            None => msg.topic.clone(),
            Some(k) => k.render(msg, ctx)?,
        };
        Ok((topic, key))
    }
}

/// The record headers of `msg` (see the module's documentation), with their byte count.
pub fn headers(msg: &Message) -> (OwnedHeaders, usize) {
    let p = &msg.properties;
    let qos = [b'0' + msg.qos as u8];
    let retain: &[u8] = if msg.retain { b"true" } else { b"false" };
    let mut fixed: [(&str, &[u8]); 4] = [
        ("x-mqtt-topic", msg.topic.as_bytes()),
        ("x-mqtt-qos", &qos),
        ("x-mqtt-retain", retain),
        ("x-mqtt-client-id", msg.client_id.as_bytes()),
    ];
    let more = usize::from(p.content_type.is_some())
        + usize::from(p.response_topic.is_some())
        + usize::from(p.correlation_data.is_some())
        + usize::from(p.payload_format_indicator.is_some())
        + p.user_properties.len();
    let mut h = OwnedHeaders::new_with_capacity(fixed.len() + more);
    let mut size = 0;
    for (key, value) in fixed.iter_mut() {
        size += key.len() + value.len();
        h = h.insert(Header { key, value: Some(*value) });
    }
    let mut add = |h: OwnedHeaders, key: &str, value: &[u8]| {
        size += key.len() + value.len();
        h.insert(Header { key, value: Some(value) })
    };
    if let Some(ct) = &p.content_type {
        h = add(h, "content-type", ct.as_bytes());
    }
    if let Some(rt) = &p.response_topic {
        h = add(h, "x-mqtt-response-topic", rt.as_bytes());
    }
    if let Some(cd) = &p.correlation_data {
        h = add(h, "x-mqtt-correlation-data", cd);
    }
    if let Some(pf) = p.payload_format_indicator {
        h = add(h, "x-mqtt-payload-format-indicator", &[b'0' + pf.min(9)]);
    }
    for (name, value) in &p.user_properties {
        if !name.starts_with("x-mqtt-") {
            h = add(h, name, value.as_bytes());
        }
    }
    (h, size)
}

impl Target for KafkaTarget {
    fn id(&self) -> &str {
        &self.id
    }

    fn hand_over(
        &self,
        msg: &Arc<Message>,
        ctx: &mut LazyContext,
        hand: &mut Handoff<'_>,
    ) -> Result<(), TemplateError> {
        let (topic, key) = self.resolve(msg, ctx)?;
        let (headers, header_bytes) = headers(msg);
        let dead_letter = hand.dead_letter().map(|r| (r, Arc::clone(msg)));
        let record = Record {
            size: topic.len() + key.len() + msg.payload.len() + header_bytes,
            topic,
            key: Some(key),
            payload: msg.payload.clone(),
            headers,
            pending: Pending::new(hand.ack(), dead_letter, self.metrics.clone()),
        };
        hand.offer(
            record,
            |r| self.cluster.try_send(r),
            |r| Box::pin(Arc::clone(&self.cluster).send(r)),
        );
        Ok(())
    }

    fn explain(&self, msg: &Arc<Message>, ctx: &mut LazyContext) -> Explained {
        let mut e = Explained::new(&self.id, "kafka");
        e.field("cluster", self.cluster.name());
        match self.resolve(msg, ctx) {
            Ok((topic, key)) => {
                e.field("topic", topic);
                e.field("key", key);
            }
            Err(error) => e.error = Some(error.to_string()),
        }
        let (headers, _) = headers(msg);
        use rdkafka::message::Headers;
        let names: Vec<String> = headers.iter().map(|h| h.key.to_owned()).collect();
        e.field("headers", names);
        e.note("the partition is chosen by librdkafka from the key (murmur2, as the Java client)");
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn headers_carry_the_mqtt_fields_and_every_user_property() {
        let msg = Message {
            charge: Default::default(),
            topic: "a/b".to_owned(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: crate::mqtt::codec::QoS::AtLeastOnce,
            retain: true,
            client_id: Arc::from("dev-1"),
            username: None,
            properties: crate::mqtt::codec::Properties {
                content_type: Some("application/json".into()),
                user_properties: vec![
                    ("k".into(), "1".into()),
                    ("k".into(), "2".into()),
                    ("x-mqtt-qos".into(), "9".into()),
                ],
                ..Default::default()
            }
            .into(),
            received: std::time::Instant::now(),
            packet_id: None,
        };
        let (h, size) = headers(&msg);
        let got: Vec<(String, Vec<u8>)> =
            h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect();
        let want: Vec<(String, Vec<u8>)> = [
            ("x-mqtt-topic", &b"a/b"[..]),
            ("x-mqtt-qos", b"1"),
            ("x-mqtt-retain", b"true"),
            ("x-mqtt-client-id", b"dev-1"),
            ("content-type", b"application/json"),
            ("k", b"1"),
            ("k", b"2"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
        assert_eq!(got, want);
        assert_eq!(size, want.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>());
    }
}
