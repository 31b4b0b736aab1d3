//! The AMQP 1.0 target (ActiveMQ Artemis and Classic, Azure Service Bus, Qpid, Solace,
//! RabbitMQ): `amqp10:` brokers and `- amqp10:` rule targets, on the fe2o3-amqp client.
//!
//! - `config.rs`: `amqp10.NAME`, `- amqp10:` and their checks (pure).
//! - `message.rs`: an MQTT message as an AMQP 1.0 message (pure).
//! - `client.rs`: the connection task and one task per sender link; outcomes.
//! - `target.rs`: the `- amqp10:` target (address template, header choices).
//! - `kind.rs`: the kind's registration and metrics.
//!
//! Delivered means the broker's `accepted` outcome, nothing less; link credit is the
//! backpressure, per address.

pub mod client;
pub mod config;
mod kind;
pub mod message;
pub mod target;

pub use client::{Amqp10Broker, BrokerMetrics};
pub use kind::Amqp10Kind;
