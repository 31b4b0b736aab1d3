//! A SUBSCRIBE's retained messages, sent as the client takes them.
//!
//! A wildcard SUBSCRIBE may match more retained messages than the session's queue holds
//! (`#` over 100,000 topics). Each such SUBSCRIBE starts a walk over the retained store
//! (`RetainedStore::walk`): a step queues the matches among a bounded number of topics
//! (the read lock is held for those only) and no more than the queue has room for, and
//! remembers where it stopped; the next step runs when the queue has room again (the
//! session's own deliveries make it) and, with `mqtt.max_retained_rate`, when the client's
//! token bucket allows. Nothing is dropped for want of room, and a client that re-subscribes
//! `#` in a loop restarts its walk (one per filter) and is sent no more than the rate: its
//! SUBSCRIBEs cost the other clients a bounded amount of work.
//!
//! The state lives in a box that exists only while a walk is under way, a bucket is still
//! refilling or a stored session's SUBACK is held (`outbound::Held`, which shares the box):
//! an idle session pays one pointer for both. `mqtt.max_subscribe_rate`'s bucket (topic
//! filters of SUBSCRIBE and UNSUBSCRIBE) lives here too: when a packet overdraws it, the
//! session's timer stops reading until it is back at zero (`Session::handle_charged`).

use std::collections::VecDeque;
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::task::Context;

use tokio::io::{AsyncRead, AsyncWrite};

use super::outbound::Held;
use super::Session;
use crate::broker::queue::TrySendError;
use crate::broker::Outbound;
use crate::mqtt::codec::QoS;

/// Topics one step looks at (under the retained store's read lock).
const LOOKED_PER_STEP: usize = 1024;

/// The walks under way and the rate limit's bucket, and a held SUBACK/UNSUBACK.
pub(super) struct SubscribeWork {
    /// A stored session's SUBACK/UNSUBACK waiting for its record (taken by the loop at once).
    held: Option<Held>,
    walks: VecDeque<Walk>,
    /// `mqtt.max_retained_rate` (a second's worth of burst); `None`: no limit.
    rate: Option<Bucket>,
    /// While the bucket holds the walks back: wakes the session when a message may go.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// `mqtt.max_subscribe_rate` (topic filters, a second's worth of burst); `None`: no limit.
    /// Overdrawn, the session stops reading (its timer's throttle) until it is back at zero.
    filters: Option<Bucket>,
}

/// One SUBSCRIBE filter's walk.
struct Walk {
    filter: String,
    granted: QoS,
    subscription_id: Option<u32>,
    /// Where the next step starts: after the last topic looked at, or at the topic of a
    /// match the queue had no room for; `None`: from the start.
    from: Option<(String, bool)>,
}

/// A token bucket: `rate` tokens per second, at most `rate` held.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: tokio::time::Instant,
}

impl Bucket {
    fn refill(&mut self, now: tokio::time::Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        self.tokens
    }

    /// When the bucket holds one token again.
    fn next_token(&self) -> tokio::time::Instant {
        let wait = ((1.0 - self.tokens) / self.rate).max(0.0);
        self.at + std::time::Duration::from_secs_f64(wait)
    }
}

impl Bucket {
    /// A full bucket of `rate` per second; `None` for 0 (no limit).
    fn new(rate: u32) -> Option<Bucket> {
        (rate > 0).then(|| Bucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: tokio::time::Instant::now(),
        })
    }

    /// True once it holds `rate` tokens again (refilling first).
    fn full(&mut self, now: tokio::time::Instant) -> bool {
        self.refill(now) >= self.rate
    }
}

impl SubscribeWork {
    fn new(limits: &super::SessionLimits) -> Box<SubscribeWork> {
        Box::new(SubscribeWork {
            held: None,
            walks: VecDeque::new(),
            rate: Bucket::new(limits.max_retained_rate),
            sleep: None,
            filters: Bucket::new(limits.max_subscribe_rate),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Holds a stored session's SUBACK/UNSUBACK until its record is durable: the loop takes
    /// it ([`Session::take_held`]) before it reads on.
    pub(super) fn hold(&mut self, held: Held) {
        let limits = &self.shared.limits;
        self.subscribe_work.get_or_insert_with(|| SubscribeWork::new(limits)).held = Some(held);
    }

    /// The held SUBACK/UNSUBACK, if any (boxed: the loop awaits it, and a `Held` inline
    /// would stay in every session's future).
    pub(super) fn take_held(&mut self) -> Option<Box<Held>> {
        let held = self.subscribe_work.as_mut()?.held.take();
        self.drop_idle_work(tokio::time::Instant::now());
        held.map(Box::new)
    }

    /// Charges a SUBSCRIBE's or UNSUBSCRIBE's `filters` to `mqtt.max_subscribe_rate`; when
    /// that overdraws the bucket, until when the session must not read.
    pub(super) fn charge_subscribe(&mut self, filters: usize) -> Option<tokio::time::Instant> {
        if self.shared.limits.max_subscribe_rate == 0 {
            return None;
        }
        let limits = &self.shared.limits;
        let work = self.subscribe_work.get_or_insert_with(|| SubscribeWork::new(limits));
        let bucket = work.filters.as_mut()?;
        let now = tokio::time::Instant::now();
        #[allow(clippy::cast_precision_loss)]
        let cost = filters as f64;
        let tokens = bucket.refill(now) - cost;
        bucket.tokens = tokens;
        (tokens < 0.0).then(|| now + std::time::Duration::from_secs_f64(-tokens / bucket.rate))
    }

    /// Drops the box once nothing in it is under way.
    fn drop_idle_work(&mut self, now: tokio::time::Instant) {
        if let Some(work) = self.subscribe_work.as_mut() {
            if work.held.is_none()
                && work.walks.is_empty()
                && work.rate.as_mut().is_none_or(|b| b.full(now))
                && work.filters.as_mut().is_none_or(|b| b.full(now))
            {
                self.subscribe_work = None;
            }
        }
    }

    /// Starts sending the retained messages matching `filter` (a SUBSCRIBE granted it with
    /// `granted`), restarting the walk of the same filter if one is under way. A filter
    /// without wildcards matches at most one message: sent at once, without a walk, as long
    /// as no walk is waiting for room or the rate.
    pub(super) fn start_retained(
        &mut self,
        filter: String,
        granted: QoS,
        subscription_id: Option<u32>,
    ) {
        let idle = self.subscribe_work.as_ref().is_none_or(|w| w.walks.is_empty());
        if idle && !filter.contains(['+', '#']) {
            let (found, _) = self.shared.broker.retained_walk(&filter, Bound::Unbounded, 1, 1);
            for msg in found {
                let out = Outbound {
                    qos: msg.qos.min(granted),
                    msg,
                    retain: true,
                    shared: None,
                    subscription_ids: subscription_id.into_iter().collect(),
                    ticket: None,
                    stored: None,
                };
                if self.out.state.subscriber.queue.try_send(out).is_err() {
                    self.shared.metrics.dropped("subscriber_queue_full");
                }
            }
            return;
        }
        let limits = &self.shared.limits;
        let walks = self.subscribe_work.get_or_insert_with(|| SubscribeWork::new(limits));
        walks.walks.retain(|w| w.filter != filter);
        walks.walks.push_back(Walk { filter, granted, subscription_id, from: None });
    }

    /// Whether a walk step may run now: a walk is under way, the queue has room and the rate
    /// allows. Registers `cx` with the rate's timer when only the rate holds it back (the
    /// queue's room comes from this session's own deliveries, which poll again).
    pub(super) fn poll_retained(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(walks) = self.subscribe_work.as_mut() else { return false };
        if walks.walks.is_empty() {
            // Done walking: the box goes once the bucket is full again (checked whenever the
            // session wakes, a PINGREQ at the latest), so a quiet client does not keep it.
            self.drop_idle_work(tokio::time::Instant::now());
            return false;
        }
        if self.out.state.subscriber.queue.room() == 0 {
            return false;
        }
        let Some(bucket) = walks.rate.as_mut() else { return true };
        let now = tokio::time::Instant::now();
        if bucket.refill(now) >= 1.0 {
            walks.sleep = None;
            return true;
        }
        let due = bucket.next_token();
        let sleep = walks.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if sleep.deadline() != due {
            sleep.as_mut().reset(due);
        }
        if sleep.as_mut().poll(cx).is_ready() {
            walks.sleep = None;
            return true;
        }
        false
    }

    /// Runs one step of the front walk: queues what it finds (as many as the queue and the
    /// rate allow) and moves the walk on, or ends it. The box goes once no walk is left and
    /// the bucket is full again.
    pub(super) fn retained_step(&mut self) {
        let Some(walks) = self.subscribe_work.as_mut() else { return };
        let queue = &self.out.state.subscriber.queue;
        let now = tokio::time::Instant::now();
        let mut allowed = queue.room();
        if let Some(bucket) = walks.rate.as_mut() {
            // Whole tokens only; `poll_retained` saw at least one.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let tokens = bucket.refill(now).max(0.0) as usize;
            allowed = allowed.min(tokens);
        }
        if let Some(walk) = walks.walks.front_mut().filter(|_| allowed > 0) {
            let from = match &walk.from {
                None => Bound::Unbounded,
                Some((topic, true)) => Bound::Included(topic.as_str()),
                Some((topic, false)) => Bound::Excluded(topic.as_str()),
            };
            let (found, next) =
                self.shared.broker.retained_walk(&walk.filter, from, allowed, LOOKED_PER_STEP);
            let mut sent = 0usize;
            let mut stopped_at = None;
            for msg in found {
                let out = Outbound {
                    qos: msg.qos.min(walk.granted),
                    msg,
                    retain: true,
                    shared: None,
                    subscription_ids: walk.subscription_id.into_iter().collect(),
                    ticket: None,
                    stored: None,
                };
                match queue.try_send(out) {
                    Ok(()) => sent += 1,
                    // The queue's byte bound: resume with this message once there is room.
                    Err(TrySendError::Full(out)) => {
                        stopped_at = Some(out.msg.topic.clone());
                        break;
                    }
                    Err(TrySendError::Closed(_)) => return,
                }
            }
            if let Some(bucket) = walks.rate.as_mut() {
                #[allow(clippy::cast_precision_loss)]
                let spent = sent as f64;
                bucket.tokens -= spent;
            }
            match (stopped_at, next) {
                (Some(topic), _) => walk.from = Some((topic, true)),
                (None, Some(next)) => walk.from = Some((next, false)),
                (None, None) => {
                    walks.walks.pop_front();
                }
            }
        }
        self.drop_idle_work(now);
    }
}
