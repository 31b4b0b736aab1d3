//! MQTT bridges to upstream brokers (EMQX, HiveMQ, Mosquitto, another mqgate): `bridges:`
//! connections, `- mqtt:` rule targets (uplink) and `bridge:` sources (downlink).
//!
//! - `config.rs`: `bridges.NAME`, `- mqtt:` and their checks.
//! - `client.rs`: the one connection per bridge, on mqgate's own codec (both directions).
//! - `target.rs`: the `- mqtt:` target (topic template, QoS, RETAIN; no loops).
//! - `kind.rs`: the kind's registration.

pub mod client;
pub mod config;
mod kind;
pub mod target;

pub use client::{Bridge, BridgeMetrics, Downlink, Outgoing};
pub use kind::{MqttKind, MqttSourceKind};
