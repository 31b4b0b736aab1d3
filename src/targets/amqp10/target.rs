//! The `- amqp10:` target: renders each message's address and hands it to its broker's link
//! queue with the target's header choices.

use std::sync::Arc;

use super::client::{Amqp10Broker, Request};
use super::config::{check_address, Amqp10TargetConfig};
use super::message::Shape;
use crate::message::Message;
use crate::metrics::TargetMetrics;
use crate::mqtt::codec::QoS;
use crate::rules::LazyContext;
use crate::targets::{Explained, Handoff, Target};
use crate::template::{self, Template, TemplateError};

/// The address of a target.
#[derive(Debug)]
enum AddressSpec {
    Fixed(String),
    Template(Template),
}

/// One `- amqp10:` target.
#[derive(Debug)]
pub struct Amqp10Target {
    id: String,
    broker: Amqp10Broker,
    address: AddressSpec,
    shape: Arc<Shape>,
    metrics: TargetMetrics,
}

impl Amqp10Target {
    /// Compiles target `t` (id `id`) on `broker`.
    pub fn build(
        id: &str,
        t: &Amqp10TargetConfig,
        broker: &Amqp10Broker,
        metrics: TargetMetrics,
    ) -> Result<Amqp10Target, TemplateError> {
        let address = if template::is_template(&t.address.value) {
            AddressSpec::Template(Template::compile(&t.address.value)?)
        } else {
            AddressSpec::Fixed(t.address.value.clone())
        };
        let shape = Shape {
            durable: t.durable,
            ttl_ms: t.ttl.map(|d| d.0.as_millis().min(u128::from(u32::MAX)) as u32),
            content_type: t.content_type.clone(),
        };
        Ok(Amqp10Target {
            id: id.to_owned(),
            broker: broker.clone(),
            address,
            shape: Arc::new(shape),
            metrics,
        })
    }

    fn address_for(
        &self,
        msg: &Arc<Message>,
        ctx: &mut LazyContext,
    ) -> Result<String, TemplateError> {
        match &self.address {
            AddressSpec::Fixed(a) => Ok(a.clone()),
            AddressSpec::Template(t) => {
                let a = t.render_for(msg, ctx)?;
                check_address(&a).map_err(|e| TemplateError(format!("address {a:?}: {e}")))?;
                Ok(a)
            }
        }
    }
}

impl Target for Amqp10Target {
    fn id(&self) -> &str {
        &self.id
    }

    fn hand_over(
        &self,
        msg: &Arc<Message>,
        ctx: &mut LazyContext,
        hand: &mut Handoff<'_>,
    ) -> Result<(), TemplateError> {
        let address = self.address_for(msg, ctx)?;
        let req = Request {
            address,
            msg: Arc::clone(msg),
            shape: Arc::clone(&self.shape),
            ack: hand.ack(),
            metrics: self.metrics.clone(),
            dead_letter: hand.dead_letter(),
        };
        hand.offer(
            req,
            |req| self.broker.try_send(req),
            |req| {
                let broker = self.broker.clone();
                Box::pin(async move { broker.send(req).await })
            },
        );
        Ok(())
    }

    fn explain(&self, msg: &Arc<Message>, ctx: &mut LazyContext) -> Explained {
        let mut e = Explained::new(&self.id, "amqp10");
        e.field("broker", self.broker.name());
        match self.address_for(msg, ctx) {
            Ok(address) => e.field("address", address),
            Err(error) => e.error = Some(error.to_string()),
        }
        e.field("durable", self.shape.durable.unwrap_or(msg.qos != QoS::AtMostOnce));
        if let Some(ttl) = self.shape.ttl_ms {
            e.field("ttl_ms", ttl);
        }
        let content_type =
            self.shape.content_type.clone().or_else(|| msg.properties.content_type.clone());
        if let Some(ct) = content_type {
            e.field("content_type", ct);
        }
        e.note("delivered only on the broker's `accepted` outcome; `rejected` is a final failure");
        e
    }
}
