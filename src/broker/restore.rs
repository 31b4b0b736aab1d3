//! At start, what the store holds goes back into the broker: retained messages into the
//! retained map (at most `mqtt.max_retained`), persistent sessions back into the registry as
//! parked sessions: their subscriptions in the tree, their queued messages in their bounded
//! queues in the order they were queued, their sent and unacknowledged QoS 1/2 deliveries
//! in flight again (resent with DUP, or PUBREL, when the client reconnects, as after any
//! reconnect). Expired sessions, and messages of sessions the store no longer has, are
//! deleted. Runs once, before the listener accepts anyone.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use redb::{ReadableTable, ReadableTableMetadata};
use tokio::time::Instant;

use super::persist::{self, DeliveryStage, Persist, SessionKey, SessionRecord};
use super::sessions::{InFlight, SessionState};
use super::{Broker, Outbound, Retained};
use crate::mqtt::topic;
use crate::store::{codec, StoreError, Table};

/// What [`Broker::restore`] found, for the start-up log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Retained messages loaded.
    pub retained: usize,
    /// Retained messages left in the store because `mqtt.max_retained` was reached.
    pub retained_over_limit: usize,
    /// Persistent sessions parked again.
    pub sessions: usize,
    /// Messages queued or in flight for them.
    pub messages: usize,
    /// Sessions that had expired while mqgate was stopped (deleted).
    pub expired: usize,
    /// Stored values that could not be decoded (deleted, logged).
    pub unreadable: usize,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl Broker {
    /// Loads the retained messages and persistent sessions the store holds (nothing without
    /// a store). A restored session's queue holds `capacity` messages (the persistent
    /// session queue, `mqtt.max_queued_messages`); what is beyond is dropped and counted.
    pub fn restore(&self, capacity: usize, max_bytes: usize) -> Result<Restored, StoreError> {
        let Some(p) = &self.persist else {
            return Ok(Restored::default());
        };
        let mut restored = Restored::default();
        let read = p.store().read()?;
        let retained = read.open_table(Table::Retained.def()).map_err(io)?;
        for entry in retained.iter().map_err(io)? {
            let (k, v) = entry.map_err(io)?;
            match codec::decode_message(v.value()) {
                Ok(msg) => match self.retained.set(&msg) {
                    Retained::Stored => restored.retained += 1,
                    Retained::Full => restored.retained_over_limit += 1,
                    Retained::Cleared | Retained::Unchanged => {}
                },
                Err(e) => {
                    tracing::warn!(error = %e, "a stored retained message cannot be read; deleted");
                    restored.unreadable += 1;
                    if let Ok(topic) = std::str::from_utf8(k.value()) {
                        p.retained(topic, None);
                    }
                }
            }
        }
        let sessions = read.open_table(Table::Sessions.def()).map_err(io)?;
        let queue = read.open_table(Table::SessionQueue.def()).map_err(io)?;
        let mut live: HashSet<Vec<u8>> =
            HashSet::with_capacity(sessions.len().map_err(io)? as usize);
        let now = SystemTime::now();
        for entry in sessions.iter().map_err(io)? {
            let (k, v) = entry.map_err(io)?;
            let Ok(client_id) = std::str::from_utf8(k.value()) else {
                restored.unreadable += 1;
                continue;
            };
            let key = SessionKey::new(&Arc::from(client_id));
            let record = match SessionRecord::decode(v.value()) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(client_id = %crate::logtext::LogText(client_id), error = %e, "a stored session cannot be read; deleted");
                    restored.unreadable += 1;
                    p.delete_session(&key);
                    continue;
                }
            };
            let remaining = record.remaining(now);
            if remaining.is_some_and(|d| d.is_zero()) {
                restored.expired += 1;
                p.delete_session(&key);
                continue;
            }
            if record.disconnected.is_none() {
                // Its connection ended with the previous process: its expiry runs from now.
                let record = SessionRecord { disconnected: Some(now), ..record.clone() };
                p.put_session(&key, record.encode());
            }
            live.insert(k.value().to_vec());
            let limits = (capacity, max_bytes);
            let state = self.restore_session(p, key, record, &queue, limits, &mut restored)?;
            let expires = remaining.map(|d| Instant::now() + d);
            if let Some(other) = self.sessions.park(client_id, state, expires) {
                self.discard(other, false);
            }
            restored.sessions += 1;
        }
        // The sequence goes on after the highest stored one; messages of sessions the store
        // no longer has are deleted.
        let mut orphans: HashSet<Vec<u8>> = HashSet::new();
        for entry in queue.iter().map_err(io)? {
            let (k, _) = entry.map_err(io)?;
            let k = k.value();
            let Some(pos) = k.iter().position(|b| *b == 0) else { continue };
            if let Ok(seq) = <[u8; 8]>::try_from(&k[pos + 1..]) {
                p.sequence_after(u64::from_be_bytes(seq));
            }
            if !live.contains(&k[..pos]) {
                orphans.insert(k[..pos].to_vec());
            }
        }
        for client_id in orphans {
            if let Ok(id) = std::str::from_utf8(&client_id) {
                p.delete_session(&SessionKey::new(&Arc::from(id)));
            }
        }
        Ok(restored)
    }

    /// One stored session as a parked session state: subscribed again, its messages queued
    /// or in flight.
    fn restore_session(
        &self,
        p: &Persist,
        key: SessionKey,
        record: SessionRecord,
        queue: &redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
        (capacity, max_bytes): (usize, usize),
        restored: &mut Restored,
    ) -> Result<SessionState, StoreError> {
        let (from, to) = key.range();
        let mut state = SessionState::with_bytes(self.next_id(), capacity, max_bytes, Some(key));
        state.version = record.version;
        state.owner = record.owner.clone();
        state.awaiting_rel = record.awaiting_rel.into_iter().collect();
        for (filter, options) in record.subscriptions {
            if topic::parse_subscription(&filter).is_err() {
                continue;
            }
            self.subscribe(state.id, &filter, options, &state.subscriber);
            state.filters.insert(filter, options);
        }
        let subscriber = Arc::clone(&state.subscriber);
        let Some(key) = subscriber.stored() else {
            return Ok(state);
        };
        for entry in queue.range(from.as_slice()..to.as_slice()).map_err(io)? {
            let (k, v) = entry.map_err(io)?;
            let Some(seq) = key.seq_of(k.value()) else { continue };
            let d = match persist::decode_delivery(v.value()) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(client_id = %crate::logtext::LogText(&key.client_id), error = %e, "a stored message cannot be read; deleted");
                    restored.unreadable += 1;
                    p.delete_delivery(key, seq);
                    continue;
                }
            };
            let msg = Arc::new(d.msg);
            match d.stage {
                DeliveryStage::Sent(packet_id, stage) if state.inflight_ids.insert(packet_id) => {
                    state.last_id = packet_id;
                    state.inflight.push_back(InFlight {
                        packet_id,
                        msg,
                        qos: d.qos,
                        retain: d.retain,
                        stage,
                        shared: None,
                        subscription_ids: d.subscription_ids,
                        ticket: None,
                        stored: Some(seq),
                    });
                    restored.messages += 1;
                }
                _ => {
                    let out = Outbound {
                        msg,
                        qos: d.qos,
                        retain: d.retain,
                        shared: None,
                        subscription_ids: d.subscription_ids,
                        ticket: None,
                        stored: Some(seq),
                    };
                    if subscriber.queue.try_send(out).is_ok() {
                        restored.messages += 1;
                    } else {
                        // mqtt.max_queued_messages was lowered since they were queued.
                        p.delete_delivery(key, seq);
                        self.metrics.dropped("session_queue_full");
                    }
                }
            }
        }
        Ok(state)
    }
}
