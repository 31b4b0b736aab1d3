//! The `- mqtt:` target: hands each message to its bridge's queue with the upstream topic,
//! QoS and RETAIN flag. A message that came in through the same bridge is never sent back.

use std::sync::Arc;

use super::client::{Bridge, Outgoing};
use super::config::{MqttTargetConfig, RetainPolicy};
use crate::message::Message;
use crate::metrics::TargetMetrics;
use crate::mqtt::codec::QoS;
use crate::rules::LazyContext;
use crate::targets::{Explained, Handoff, Target};
use crate::template::{self, Template, TemplateError};

/// The upstream topic of a target.
#[derive(Debug)]
enum TopicSpec {
    /// The message's own topic.
    Same,
    /// A fixed topic.
    Fixed(String),
    /// A template over the message.
    Template(Template),
}

/// One `- mqtt:` target.
#[derive(Debug)]
pub struct MqttTarget {
    id: String,
    bridge: Bridge,
    topic: TopicSpec,
    qos: Option<QoS>,
    retain: RetainPolicy,
    metrics: TargetMetrics,
}

impl MqttTarget {
    /// Compiles target `t` (id `id`) on `bridge`.
    pub fn build(
        id: &str,
        t: &MqttTargetConfig,
        bridge: &Bridge,
        metrics: TargetMetrics,
    ) -> Result<MqttTarget, TemplateError> {
        let topic = match &t.topic {
            None => TopicSpec::Same,
            Some(s) if template::is_template(&s.value) => {
                TopicSpec::Template(Template::compile(&s.value)?)
            }
            Some(s) => TopicSpec::Fixed(s.value.clone()),
        };
        let qos = t.qos.as_ref().map(|q| match q.value {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        });
        Ok(MqttTarget {
            id: id.to_owned(),
            bridge: bridge.clone(),
            topic,
            qos,
            retain: t.retain,
            metrics,
        })
    }

    /// Whether `msg` came in through this target's bridge (then it is never sent back).
    fn came_from_bridge(&self, msg: &Message) -> bool {
        Arc::ptr_eq(&msg.client_id, self.bridge.origin())
            || *msg.client_id == **self.bridge.origin()
    }

    /// The RETAIN flag upstream.
    fn retain_for(&self, msg: &Message) -> bool {
        match self.retain {
            RetainPolicy::AsPublished => msg.retain,
            RetainPolicy::True => true,
            RetainPolicy::False => false,
        }
    }

    fn topic_for(
        &self,
        msg: &Arc<Message>,
        ctx: &mut LazyContext,
    ) -> Result<String, TemplateError> {
        let topic = match &self.topic {
            TopicSpec::Same => return Ok(msg.topic.clone()),
            TopicSpec::Fixed(t) => return Ok(t.clone()),
            TopicSpec::Template(t) => t.render_for(msg, ctx)?,
        };
        crate::mqtt::topic::validate_name(&topic)
            .map_err(|e| TemplateError(format!("upstream topic {topic:?}: {e}")))?;
        Ok(topic)
    }
}

impl Target for MqttTarget {
    fn counters(&self) -> Option<&crate::metrics::TargetMetrics> {
        Some(&self.metrics)
    }

    fn id(&self) -> &str {
        &self.id
    }

    fn hand_over(
        &self,
        msg: &Arc<Message>,
        ctx: &mut LazyContext,
        hand: &mut Handoff<'_>,
    ) -> Result<(), TemplateError> {
        if self.came_from_bridge(msg) {
            // It came from this bridge: never back (no loops). Nothing to wait for.
            return Ok(());
        }
        let topic = self.topic_for(msg, ctx)?;
        let retain = self.retain_for(msg);
        let out = Outgoing {
            topic,
            msg: Arc::clone(msg),
            qos: self.qos.unwrap_or(msg.qos),
            retain,
            ack: hand.ack(),
            metrics: Some(self.metrics.clone()),
        };
        hand.offer(
            out,
            |out| self.bridge.try_publish(out),
            |out| {
                let bridge = self.bridge.clone();
                Box::pin(async move { bridge.publish(out).await })
            },
        );
        Ok(())
    }

    fn explain(&self, msg: &Arc<Message>, ctx: &mut LazyContext) -> Explained {
        let mut e = Explained::new(&self.id, "mqtt");
        e.field("bridge", self.bridge.name());
        if self.came_from_bridge(msg) {
            e.note("not sent: the message came in through this bridge (never sent back)");
        }
        match self.topic_for(msg, ctx) {
            Ok(topic) => e.field("topic", topic),
            Err(error) => e.error = Some(error.to_string()),
        }
        e.field("qos", self.qos.unwrap_or(msg.qos) as u8);
        e.field("retain", self.retain_for(msg));
        e
    }
}
