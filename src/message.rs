//! The message as it travels from a session through the router to local subscribers and sinks.
//!
//! Immutable once built and shared behind an `Arc`, so one PUBLISH fanned out to several rules
//! and subscribers is never copied. Owns no I/O.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::mqtt::codec::{Properties, QoS};

/// One application message received from an MQTT client (or, later, from an AMQP source).
#[derive(Debug, Clone)]
pub struct Message {
    /// The topic name it was published to (after topic-alias resolution).
    pub topic: String,
    /// The payload, unchanged.
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// The RETAIN flag as published.
    pub retain: bool,
    /// The publishing client's identifier (`Arc` because every message of a session shares it).
    pub client_id: Arc<str>,
    /// The publishing client's user name, if it gave one.
    pub username: Option<Arc<str>>,
    /// MQTT 5 PUBLISH properties that travel with the message (topic alias removed).
    pub properties: Properties,
    /// When mqgate received it, for latency metrics and message expiry.
    pub received: Instant,
    /// The client's packet id for QoS 1/2 PUBLISHes; 0 when there is none (QoS 0, wills,
    /// messages mqgate makes itself). With the client id it identifies a QoS 2 message across
    /// the client's resends (the AMQP `message_id` is derived from it).
    pub packet_id: u16,
}
