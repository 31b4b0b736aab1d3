//! The message as it travels from a session through the router to local subscribers and sinks.
//!
//! Immutable once built and shared behind an `Arc`, so one PUBLISH fanned out to several rules
//! and subscribers is never copied. Owns no I/O.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::mqtt::codec::{PublishProperties, QoS};

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
    pub properties: PublishProperties,
    /// When mqgate received it, for latency metrics and message expiry.
    pub received: Instant,
    /// The client's packet id of a QoS 1/2 PUBLISH (a resend carries the same one); `None`
    /// for QoS 0, wills and messages mqgate makes itself. Part of HTTP idempotency keys.
    pub packet_id: Option<u16>,
    /// What it counts against `mqtt.max_memory` until it is dropped (nothing for messages
    /// mqgate makes itself, and for clones).
    pub charge: crate::memory::Charge,
}

impl Message {
    /// A stable identity of a QoS 1/2 message, as 32 hex digits: SHA-256 over the client id,
    /// the packet id, the topic and the payload (each length-prefixed). Every retry of the
    /// message by a sink, and the client's resend of the same PUBLISH (same packet id, after
    /// mqgate failed it), get the same identity, so a receiver can drop duplicates: it is the
    /// HTTP `Idempotency-Key` and, for QoS 2, the AMQP `message_id`. `None` without a packet
    /// id (QoS 0, wills, messages mqgate makes itself).
    ///
    /// Limit: packet ids are reused once a flow completes, so the same client later sending
    /// the same payload to the same topic under a reused id gets the same identity; receivers
    /// should keep their dedup window short (minutes).
    pub fn identity(&self) -> Option<String> {
        let mut h = Sha256::new();
        if !self.hash_identity(&mut h) {
            return None;
        }
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut id = String::with_capacity(32);
        for b in &h.finalize()[..16] {
            id.push(char::from(DIGITS[usize::from(b >> 4)]));
            id.push(char::from(DIGITS[usize::from(b & 15)]));
        }
        Some(id)
    }

    /// Feeds what makes up [`identity`](Self::identity) into `h`; false (nothing fed) without
    /// a packet id. A batch's key hashes its messages this way in one pass.
    pub fn hash_identity(&self, h: &mut Sha256) -> bool {
        let Some(packet_id) = self.packet_id else { return false };
        let parts: [&[u8]; 4] = [
            self.client_id.as_bytes(),
            &packet_id.to_be_bytes(),
            self.topic.as_bytes(),
            &self.payload,
        ];
        for part in parts {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        true
    }
}
