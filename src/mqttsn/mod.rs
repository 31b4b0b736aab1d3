//! The MQTT-SN 1.2 gateway: MQTT for sensor networks over UDP (behind forwarders for 6LoWPAN,
//! Zigbee or serial links), with the same sessions, subscriptions, retained messages, rules,
//! ACL and acknowledgement promise as MQTT clients.
//!
//! - `codec/`: the wire format (no I/O, never panics on input).
//! - `config.rs`: `mqttsn:` and its checks.
//! - `gateway.rs`: the UDP socket's task: reads every datagram (unwrapping a forwarder's
//!   encapsulation: each node behind it is a client of its own), answers SEARCHGW, sends
//!   ADVERTISE, hands QoS -1 PUBLISHes to their task, starts a client task on CONNECT and
//!   passes each client's datagrams to its task (a bounded queue: full, dropped and counted).
//! - `client.rs`: one task per connected client, the state machine (will exchange, active,
//!   asleep, awake, lost): its session is a broker session like an MQTT client's
//!   (`SessionState`, parked and resumed by client id), its PUBLISHes go through
//!   `routing::route` and the session's `PendingQueue`, so a QoS 1 PUBACK leaves only once
//!   every target confirmed, in arrival order.
//! - `topics.rs`: registered and predefined topic ids.
//!
//! Only the gateway's tasks write to its socket; every queue is bounded (datagrams per client,
//! the session's queue in messages and bytes, topic ids, pending acknowledgements).

mod client;
pub mod codec;
pub mod config;
mod gateway;
pub mod metrics;
mod topics;

pub use config::MqttSnConfig;
pub use gateway::{bind, run};
