//! The broker core shared by all sessions: local subscriptions, retained messages (in memory
//! for now) and the registry of connected client ids (for session takeover).
//!
//! No I/O and no `.await` under a lock: subscriptions sit behind a std `RwLock` taken for the
//! length of one tree walk, and delivery to a subscriber is a `try_send` on its bounded queue
//! outside the lock. A full queue drops the message for that subscriber and counts it.

pub mod sys;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::message::Message;
use crate::metrics::Metrics;
use crate::mqtt::codec::QoS;
use crate::mqtt::topic::TopicTree;

/// A message on its way to one subscriber's session.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The message, shared with every other recipient.
    pub msg: Arc<Message>,
    /// The QoS to deliver at: the lower of the publish QoS and the granted QoS.
    pub qos: QoS,
    /// The RETAIN flag to deliver with: set for retained messages sent on subscribe, and for
    /// live ones only with MQTT 5 Retain As Published.
    pub retain: bool,
}

/// The options of one subscription that matter when delivering.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeOptions {
    /// Granted QoS.
    pub qos: QoS,
    /// MQTT 5 No Local: not delivered messages this session published itself.
    pub no_local: bool,
    /// MQTT 5 Retain As Published.
    pub retain_as_published: bool,
}

/// One subscription in the tree.
#[derive(Debug, Clone)]
struct Subscription {
    /// The subscribing session (unique per connection).
    session_id: u64,
    /// Granted QoS and flags.
    options: SubscribeOptions,
    /// The session's outbound queue.
    tx: mpsc::Sender<Outbound>,
}

/// A connected session as the registry knows it.
#[derive(Debug)]
struct Registered {
    /// Which connection holds the client id now.
    session_id: u64,
    /// Cancelled to close that connection when another one takes the client id over.
    takeover: CancellationToken,
}

/// Shared state of the MQTT broker side. One per gateway, behind an `Arc`.
#[derive(Debug)]
pub struct Broker {
    /// Local subscriptions by filter.
    subs: RwLock<TopicTree<Subscription>>,
    /// Connected client ids.
    sessions: Mutex<HashMap<String, Registered>>,
    /// Retained messages by topic.
    retained: RwLock<HashMap<String, Arc<Message>>>,
    /// Most topics with a retained message; a new one beyond it is not retained (counted).
    max_retained: usize,
    /// Source of session ids.
    next_id: AtomicU64,
    /// Where drops are counted.
    metrics: Arc<Metrics>,
}

impl Broker {
    /// An empty broker.
    pub fn new(metrics: Arc<Metrics>, max_retained: usize) -> Arc<Broker> {
        Arc::new(Broker {
            subs: RwLock::new(TopicTree::default()),
            sessions: Mutex::new(HashMap::new()),
            retained: RwLock::new(HashMap::new()),
            max_retained,
            next_id: AtomicU64::new(1),
            metrics,
        })
    }

    /// Registers `client_id` for a new connection, cancelling the token of any connection that
    /// held it (takeover). Returns the new session id and its takeover token.
    pub fn register(&self, client_id: &str) -> (u64, CancellationToken) {
        let session_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let takeover = CancellationToken::new();
        let entry = Registered { session_id, takeover: takeover.clone() };
        let old = self.lock_sessions().insert(client_id.to_owned(), entry);
        if let Some(old) = old {
            old.takeover.cancel();
        }
        (session_id, takeover)
    }

    /// Forgets `client_id` if it is still held by `session_id`.
    pub fn unregister(&self, client_id: &str, session_id: u64) {
        let mut sessions = self.lock_sessions();
        if sessions.get(client_id).is_some_and(|r| r.session_id == session_id) {
            sessions.remove(client_id);
        }
    }

    /// Number of connected sessions.
    pub fn session_count(&self) -> usize {
        self.lock_sessions().len()
    }

    /// Adds (or replaces) the subscription of `session_id` to `filter`.
    pub fn subscribe(
        &self,
        session_id: u64,
        filter: &str,
        options: SubscribeOptions,
        tx: mpsc::Sender<Outbound>,
    ) {
        let mut subs = self.subs.write().unwrap_or_else(|p| p.into_inner());
        subs.remove(filter, |s| s.session_id == session_id);
        subs.insert(filter, Subscription { session_id, options, tx });
    }

    /// Removes the subscription of `session_id` to `filter`; true if there was one.
    pub fn unsubscribe(&self, session_id: u64, filter: &str) -> bool {
        let mut subs = self.subs.write().unwrap_or_else(|p| p.into_inner());
        subs.remove(filter, |s| s.session_id == session_id) > 0
    }

    /// Stores or clears the retained message of `msg.topic` (when `msg.retain`), then hands
    /// `msg` to every local subscriber whose filter matches: one copy per session at the
    /// highest granted QoS. `publisher` is the publishing session, for No Local. Returns how
    /// many sessions matched (delivered or dropped).
    pub fn publish(&self, msg: &Arc<Message>, publisher: Option<u64>) -> usize {
        if msg.retain {
            let mut retained = self.retained.write().unwrap_or_else(|p| p.into_inner());
            if msg.payload.is_empty() {
                retained.remove(&msg.topic);
            } else if retained.len() < self.max_retained || retained.contains_key(&msg.topic) {
                // The payload is a slice of the connection's read buffer; copy it so a small
                // retained value does not keep a whole buffer alive.
                let mut kept = Message::clone(msg);
                kept.payload = bytes::Bytes::copy_from_slice(&msg.payload);
                retained.insert(msg.topic.clone(), Arc::new(kept));
            } else {
                // Still delivered live below; only not kept as the topic's last value.
                self.metrics.dropped("retained_store_full");
            }
        }
        let mut hits: Vec<(u64, SubscribeOptions, mpsc::Sender<Outbound>)> = Vec::new();
        {
            let subs = self.subs.read().unwrap_or_else(|p| p.into_inner());
            subs.for_each_match(&msg.topic, |s| {
                if s.options.no_local && publisher == Some(s.session_id) {
                    return;
                }
                match hits.iter_mut().find(|h| h.0 == s.session_id) {
                    Some(h) => {
                        h.1.qos = h.1.qos.max(s.options.qos);
                        h.1.retain_as_published |= s.options.retain_as_published;
                    }
                    None => hits.push((s.session_id, s.options, s.tx.clone())),
                }
            });
        }
        for (_, options, tx) in &hits {
            let out = Outbound {
                msg: Arc::clone(msg),
                qos: msg.qos.min(options.qos),
                retain: msg.retain && options.retain_as_published,
            };
            match tx.try_send(out) {
                Ok(()) => {
                    self.metrics.messages_delivered_local.inc();
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.metrics.dropped("subscriber_queue_full");
                }
                // The session is ending; its subscriptions are about to be removed.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.metrics.dropped("subscriber_gone");
                }
            }
        }
        hits.len()
    }

    /// The retained messages whose topics match `filter`.
    pub fn retained_matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let retained = self.retained.read().unwrap_or_else(|p| p.into_inner());
        retained
            .values()
            .filter(|m| crate::mqtt::topic::matches(filter, &m.topic))
            .cloned()
            .collect()
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Registered>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}
