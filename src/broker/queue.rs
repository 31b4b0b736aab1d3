//! A session's bounded queue of messages to deliver: many senders (`Broker::publish`, share
//! groups, retained messages on SUBSCRIBE), one receiver (the session's task).
//!
//! Its own type rather than a tokio `mpsc` channel for memory: an empty queue holds no heap
//! memory at all (tokio's channel allocates a block of 32 slots up front, about 1.4 KB with
//! its shared state), which matters at a million mostly idle sessions. It grows with what is
//! queued, up to its capacity, and gives most of that back once it has been emptied.
//!
//! No `.await` under its lock: a send is a push and a wake, a receive a pop.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use super::Outbound;

/// Slots an emptied queue keeps allocated; a larger one is shrunk to this.
const KEEP_SLOTS: usize = 32;

/// The largest bound a queue keeps (messages or bytes); a larger one is taken as this
/// (the config refuses one: `mqtt.outbound_queue`, `max_queued_messages`, `max_queued_bytes`).
pub const MAX_BOUND: u32 = u32::MAX;

/// `n` as a queue bound: at least 1, at most [`MAX_BOUND`].
fn bound(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(MAX_BOUND).max(1)
}

/// Why a message was not queued; the message is handed back.
#[derive(Debug)]
pub enum TrySendError {
    /// The queue holds its capacity.
    Full(Outbound),
    /// The receiver closed the queue (the session is ending).
    Closed(Outbound),
}

/// A bounded multi-producer, single-consumer queue of [`Outbound`] messages.
#[derive(Debug)]
pub struct Queue {
    /// Most messages queued at once.
    capacity: u32,
    /// Most bytes (topics and payloads) queued at once; one message larger than this still
    /// fits an empty queue. Both bounds are `u32` (checked at config time, [`MAX_BOUND`]):
    /// every session has a queue, and 8 bytes less keep its `Subscriber` in mimalloc's
    /// 112-byte class rather than 128.
    max_bytes: u32,
    /// The messages, the receiver's waker and whether it is closed.
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Messages in send order.
    items: Items,
    /// The receiver waiting in [`Queue::recv`], woken by the next send.
    waker: Option<Waker>,
    /// Set by [`Queue::close`]: sends fail from then on.
    closed: bool,
    /// Bytes (topics and payloads) of `items`: at most `max_bytes`, or one message's (a
    /// packet's size, under 256 MiB), so a `u32`.
    bytes: u32,
}

/// The queued messages: a `VecDeque` boxed, made on the first send and given back when an
/// empty queue is watched by a resting connection. Every session has a queue and most are
/// empty: one pointer instead of the deque's 32 bytes keeps the `Subscriber` in mimalloc's
/// 80-byte class (112 before; `mqtt/session/rest.rs` holds the budget).
/// Boxed on purpose (the size of a pointer is the point), as `Resting`'s maps are.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)]
struct Items(Option<Box<VecDeque<Outbound>>>);

impl Items {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn front(&self) -> Option<&Outbound> {
        self.0.as_ref()?.front()
    }

    fn push_back(&mut self, out: Outbound) {
        self.0.get_or_insert_with(Box::default).push_back(out);
    }

    /// The oldest message; an emptied deque that grew large is shrunk to [`KEEP_SLOTS`].
    fn pop_front(&mut self) -> Option<Outbound> {
        let q = self.0.as_mut()?;
        let out = q.pop_front();
        if q.is_empty() && q.capacity() > KEEP_SLOTS {
            q.shrink_to(KEEP_SLOTS);
        }
        out
    }

    /// Gives the deque back if it is empty.
    fn release_if_empty(&mut self) {
        if self.is_empty() {
            self.0 = None;
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Outbound> {
        self.0.iter().flat_map(|q| q.iter())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Outbound> {
        self.0.iter_mut().flat_map(|q| q.iter_mut())
    }

    /// Every message, leaving nothing allocated.
    fn take(&mut self) -> VecDeque<Outbound> {
        self.0.take().map(|q| *q).unwrap_or_default()
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.0.as_ref().map_or(0, |q| q.capacity())
    }
}

/// What a queued message counts against the byte bound (a packet's size fits a `u32`).
fn size(out: &Outbound) -> u32 {
    u32::try_from(out.msg.topic.len() + out.msg.payload.len()).unwrap_or(u32::MAX)
}

/// Whether `bytes` queued and `n` more stay within `max`.
fn fits(bytes: u32, n: u32, max: u32) -> bool {
    u64::from(bytes) + u64::from(n) <= u64::from(max)
}

impl Queue {
    /// An empty queue of `capacity` messages (at least 1); allocates nothing.
    pub fn new(capacity: usize) -> Self {
        Queue::with_bytes(capacity, usize::MAX)
    }

    /// An empty queue of at most `capacity` messages and `max_bytes` bytes.
    pub fn with_bytes(capacity: usize, max_bytes: usize) -> Self {
        Queue {
            capacity: bound(capacity),
            max_bytes: bound(max_bytes),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic under this lock leaves the queue consistent (push/pop only): go on.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `out` unless the queue is full or closed.
    pub fn try_send(&self, out: Outbound) -> Result<(), TrySendError> {
        let waker = {
            let mut inner = self.lock();
            if inner.closed {
                return Err(TrySendError::Closed(out));
            }
            let n = size(&out);
            if inner.items.len() >= self.capacity as usize
                || (!inner.items.is_empty() && !fits(inner.bytes, n, self.max_bytes))
            {
                return Err(TrySendError::Full(out));
            }
            // Within `max_bytes`, or 0 before: no overflow.
            inner.bytes = inner.bytes.saturating_add(n);
            inner.items.push_back(out);
            inner.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// The oldest message, if any, without waiting.
    pub fn try_recv(&self) -> Option<Outbound> {
        let mut inner = self.lock();
        let out = inner.items.pop_front();
        if let Some(out) = &out {
            inner.bytes = inner.bytes.saturating_sub(size(out));
        }
        out
    }

    /// The oldest message if its topic and payload take at most `room` bytes, without
    /// waiting (`mqtt.max_outbound_bytes`: what does not fit the write buffer stays queued).
    pub fn try_recv_within(&self, room: usize) -> Option<Outbound> {
        let mut inner = self.lock();
        if size(inner.items.front()?) as usize > room {
            return None;
        }
        let out = inner.items.pop_front();
        if let Some(out) = &out {
            inner.bytes = inner.bytes.saturating_sub(size(out));
        }
        out
    }

    /// Waits for the oldest message; `None` once closed and empty. Cancel-safe: a message is
    /// taken only when it is returned. One receiver only (a second one's waker replaces the
    /// first's).
    pub async fn recv(&self) -> Option<Outbound> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Registers `waker` to be woken by the next send, unless something is queued already or
    /// the queue is closed (then `false`): for a receiver that waits elsewhere (a resting
    /// connection, `mqtt/idle.rs`). Takes nothing.
    pub fn watch(&self, waker: &Waker) -> bool {
        let mut inner = self.lock();
        if !inner.items.is_empty() || inner.closed {
            return false;
        }
        // The receiver rests: nothing kept for it while it waits.
        inner.items.release_if_empty();
        inner.waker = Some(waker.clone());
        true
    }

    /// [`recv`](Self::recv) as a poll, for a receiver that waits for several things in one poll.
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Outbound>> {
        let mut inner = self.lock();
        if let Some(out) = inner.items.pop_front() {
            inner.bytes = inner.bytes.saturating_sub(size(&out));
            return Poll::Ready(Some(out));
        }
        if inner.closed {
            return Poll::Ready(None);
        }
        match &mut inner.waker {
            Some(w) => w.clone_from(cx.waker()),
            None => inner.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Takes the delivery tickets of every queued message (they stay queued, untracked), for
    /// a session that is parked: what its queue holds, MQTT has taken.
    pub fn take_tickets(&self) -> Vec<super::tracking::Ticket> {
        let mut inner = self.lock();
        inner.items.iter_mut().filter_map(|out| out.ticket.take()).collect()
    }

    /// Removes the queued messages `keep` says no to, and returns them (in order).
    pub fn remove_unless(&self, mut keep: impl FnMut(&Outbound) -> bool) -> Vec<Outbound> {
        let mut inner = self.lock();
        let mut removed = Vec::new();
        let mut kept = Items::default();
        for out in inner.items.take() {
            if keep(&out) {
                kept.push_back(out);
            } else {
                removed.push(out);
            }
        }
        inner.items = kept;
        inner.bytes = inner.items.iter().map(size).fold(0, u32::saturating_add);
        removed
    }

    /// Whether `out` would fit now (a hint: [`try_send`](Self::try_send) decides; a closed
    /// queue answers true so that the send reports it closed).
    pub fn has_room_for(&self, out: &Outbound) -> bool {
        let inner = self.lock();
        inner.closed
            || (inner.items.len() < self.capacity as usize
                && (inner.items.is_empty() || fits(inner.bytes, size(out), self.max_bytes)))
    }

    /// Refuses further sends; what is queued can still be received.
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Messages queued now.
    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many more messages fit now by count (the byte bound may take fewer).
    pub fn room(&self) -> usize {
        (self.capacity as usize).saturating_sub(self.len())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::message::Message;
    use crate::mqtt::codec::QoS;

    fn out(n: u8) -> Outbound {
        let msg = Arc::new(Message {
            charge: Default::default(),
            topic: format!("t/{n}"),
            payload: bytes::Bytes::from(vec![n]),
            qos: QoS::AtMostOnce,
            retain: false,
            client_id: "c".into(),
            username: None,
            properties: crate::mqtt::codec::PublishProperties::none(),
            received: std::time::Instant::now(),
            packet_id: None,
        });
        Outbound {
            msg,
            qos: QoS::AtMostOnce,
            retain: false,
            shared: None,
            subscription_ids: Default::default(),
            ticket: None,
            stored: None,
        }
    }

    #[tokio::test]
    async fn bounded_in_order_and_closable() {
        let q = Queue::new(2);
        q.try_send(out(1)).unwrap();
        q.try_send(out(2)).unwrap();
        assert!(matches!(q.try_send(out(3)), Err(TrySendError::Full(_))));
        assert_eq!(q.recv().await.unwrap().msg.payload[..], [1]);
        assert_eq!(q.try_recv().unwrap().msg.payload[..], [2]);
        assert!(q.try_recv().is_none());
        q.try_send(out(4)).unwrap();
        q.close();
        assert!(matches!(q.try_send(out(5)), Err(TrySendError::Closed(_))));
        assert_eq!(q.recv().await.unwrap().msg.payload[..], [4]);
        assert!(q.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_send_wakes_the_receiver_and_an_emptied_queue_shrinks() {
        let q = Arc::new(Queue::new(1000));
        let rx = Arc::clone(&q);
        let task = tokio::spawn(async move { rx.recv().await.map(|o| o.msg.payload[0]) });
        tokio::task::yield_now().await;
        q.try_send(out(7)).unwrap();
        assert_eq!(task.await.unwrap(), Some(7));
        for i in 0..500 {
            q.try_send(out(i as u8)).unwrap();
        }
        while q.try_recv().is_some() {}
        assert!(q.lock().items.capacity() <= KEEP_SLOTS);
        // Watched empty (its receiver rests): nothing left allocated.
        assert!(q.watch(std::task::Waker::noop()));
        assert!(q.lock().items.0.is_none(), "an empty watched queue holds no deque");
        q.try_send(out(9)).unwrap();
        assert!(!q.watch(std::task::Waker::noop()), "something queued: not watched");
        assert_eq!(q.try_recv().map(|o| o.msg.payload[0]), Some(9));
    }
}
