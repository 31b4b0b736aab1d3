//! Kafka: `kafka:` clusters and `- kafka:` rule targets, through librdkafka's idempotent
//! producer (acks=all): a device's PUBACK leaves once its record's batch is acknowledged.
//!
//! - `config.rs`: `kafka.NAME`, `- kafka:` and their checks.
//! - `producer.rs`: one producer per cluster, its byte and count budget, delivery reports.
//! - `target.rs`: the `- kafka:` target (topic and key templates, headers).
//! - `kind.rs`: the kind's registration.

pub mod config;
mod kind;
pub mod producer;
pub mod target;

pub use kind::KafkaKind;
