//! Live message traces for the web console (`GET /api/v1/trace`): a copy of what routing sees,
//! for the messages whose topic matches a trace's filter, sampled and bounded.
//!
//! Free when nobody traces: [`Tracer::offer`] is one relaxed atomic load until a trace is
//! open. With traces open, a matching message is summarised (topic, QoS, client, user, a
//! payload preview, the rules it matched) and `try_send` to each trace's bounded channel: a
//! browser that reads too slowly loses events, counted per trace (told to it in the stream)
//! and in `mqgate_trace_dropped_total`. At most [`MAX_TRACES`] traces at once; each samples
//! one message in `sample`. Nothing here waits or does I/O; the trace list's lock is taken
//! only while traces are open, for one walk of the (few) traces.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::message::Message;

/// Traces open at once, over every admin client.
pub const MAX_TRACES: usize = 4;
/// Events a trace's channel holds before new ones are dropped (the browser is slow).
pub const TRACE_BUFFER: usize = 256;
/// Payload characters (or bytes, in hex) an event carries.
const PREVIEW: usize = 256;

/// What a trace is told of one message.
#[derive(Debug, Clone, Serialize)]
pub struct TraceEvent {
    /// When it was routed, RFC 3339.
    pub at: String,
    /// The topic.
    pub topic: String,
    /// 0, 1 or 2.
    pub qos: u8,
    /// The RETAIN flag.
    pub retain: bool,
    /// The publisher's client id.
    pub client_id: String,
    /// The publisher's user, if any.
    pub user: Option<String>,
    /// Payload bytes.
    pub payload_bytes: usize,
    /// Its start as text (control characters escaped), or `0x` and hex when not UTF-8.
    pub payload_preview: String,
    /// The rules whose filter matched (their `when:` is not evaluated again here).
    pub rules: Vec<String>,
    /// Where it came from: `publish` (MQTT, HTTP) or `source` (AMQP → MQTT).
    pub origin: &'static str,
}

/// One open trace as the tracer keeps it.
struct Slot {
    id: u64,
    filter: String,
    /// One message in `sample` is sent (1: every one).
    sample: u64,
    seen: AtomicU64,
    tx: mpsc::Sender<TraceEvent>,
    /// Events this trace lost to a full channel.
    dropped: Arc<AtomicU64>,
}

/// The traces of one gateway. Cheap to clone.
#[derive(Clone)]
pub struct Tracer {
    inner: Arc<Inner>,
}

struct Inner {
    /// Open traces: the only thing the hot path reads when there are none.
    active: AtomicUsize,
    slots: Mutex<Vec<Arc<Slot>>>,
    next_id: AtomicU64,
    /// `mqgate_trace_dropped_total`.
    dropped: Counter,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").field("active", &self.active()).finish()
    }
}

impl Default for Tracer {
    fn default() -> Self {
        Tracer::new(Counter::default())
    }
}

/// Why a trace cannot start.
#[derive(Debug, PartialEq, Eq)]
pub enum TraceRefused {
    /// [`MAX_TRACES`] are open.
    Full,
}

/// An open trace: its events, and its registration, removed when this is dropped (the
/// browser went away).
pub struct Trace {
    /// The events.
    pub events: mpsc::Receiver<TraceEvent>,
    /// Events lost so far to a full channel.
    pub dropped: Arc<AtomicU64>,
    tracer: Tracer,
    id: u64,
}

impl Drop for Trace {
    fn drop(&mut self) {
        let mut slots = self.tracer.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.retain(|s| s.id != self.id);
        self.tracer.inner.active.store(slots.len(), Ordering::Relaxed);
    }
}

impl Tracer {
    /// A tracer counting lost events in `dropped`.
    pub fn new(dropped: Counter) -> Tracer {
        Tracer {
            inner: Arc::new(Inner {
                active: AtomicUsize::new(0),
                slots: Mutex::new(Vec::new()),
                next_id: AtomicU64::new(1),
                dropped,
            }),
        }
    }

    /// Traces open now.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Relaxed)
    }

    /// Opens a trace of the messages matching `filter` (a valid topic filter), one in
    /// `sample` of them (0 counts as 1).
    pub fn open(&self, filter: &str, sample: u64) -> Result<Trace, TraceRefused> {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() >= MAX_TRACES {
            return Err(TraceRefused::Full);
        }
        let (tx, rx) = mpsc::channel(TRACE_BUFFER);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let dropped = Arc::new(AtomicU64::new(0));
        slots.push(Arc::new(Slot {
            id,
            filter: filter.to_owned(),
            sample: sample.max(1),
            seen: AtomicU64::new(0),
            tx,
            dropped: Arc::clone(&dropped),
        }));
        self.inner.active.store(slots.len(), Ordering::Relaxed);
        Ok(Trace { events: rx, dropped, tracer: self.clone(), id })
    }

    /// Offers a routed message to the open traces; `rules` names the rules it matched. One
    /// relaxed load when no trace is open.
    #[inline]
    pub fn offer<'a>(
        &self,
        msg: &Message,
        origin: &'static str,
        rules: impl FnOnce() -> Vec<&'a str>,
    ) {
        if self.inner.active.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.offer_slow(msg, origin, rules);
    }

    #[cold]
    fn offer_slow<'a>(
        &self,
        msg: &Message,
        origin: &'static str,
        rules: impl FnOnce() -> Vec<&'a str>,
    ) {
        let wanted: Vec<Arc<Slot>> = {
            let slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .iter()
                .filter(|s| crate::mqtt::topic::matches(&s.filter, &msg.topic))
                .filter(|s| s.seen.fetch_add(1, Ordering::Relaxed) % s.sample == 0)
                .cloned()
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let event = TraceEvent {
            at: crate::timefmt::rfc3339(now).as_str().to_owned(),
            topic: msg.topic.clone(),
            qos: msg.qos as u8,
            retain: msg.retain,
            client_id: msg.client_id.to_string(),
            user: msg.username.as_deref().map(str::to_owned),
            payload_bytes: msg.payload.len(),
            payload_preview: preview(&msg.payload),
            rules: rules().into_iter().map(str::to_owned).collect(),
            origin,
        };
        for slot in wanted {
            if slot.tx.try_send(event.clone()).is_err() {
                slot.dropped.fetch_add(1, Ordering::Relaxed);
                self.inner.dropped.inc();
            }
        }
    }
}

/// The start of a payload: text when it is UTF-8 (control characters escaped), else hex.
pub fn preview(payload: &[u8]) -> String {
    let text = match std::str::from_utf8(payload) {
        Ok(t) => t,
        Err(e) if e.error_len().is_none() => {
            std::str::from_utf8(&payload[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => {
            let n = payload.len().min(PREVIEW / 2);
            let hex: String = payload[..n].iter().map(|b| format!("{b:02x}")).collect();
            let more = if payload.len() > n { "…" } else { "" };
            return format!("0x{hex}{more}");
        }
    };
    let mut out = String::with_capacity(text.len().min(PREVIEW));
    for c in text.chars().take(PREVIEW) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if text.chars().count() > PREVIEW {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::codec::{PublishProperties, QoS};

    fn msg(topic: &str) -> Message {
        Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"hi\n"),
            qos: QoS::AtLeastOnce,
            retain: false,
            client_id: Arc::from("c"),
            username: None,
            properties: PublishProperties::none(),
            received: std::time::Instant::now(),
            packet_id: None,
            charge: Default::default(),
        }
    }

    #[test]
    fn traces_filter_sample_bound_and_close() {
        let dropped = Counter::default();
        let tracer = Tracer::new(dropped.clone());
        let mut called = false;
        tracer.offer(&msg("a/b"), "publish", || {
            called = true;
            Vec::new()
        });
        assert!(!called, "no trace: nothing is built");
        let mut every = tracer.open("a/#", 1).expect("open");
        let mut half = tracer.open("a/b", 2).expect("open");
        for _ in 0..4 {
            tracer.offer(&msg("a/b"), "publish", || vec!["r1"]);
        }
        tracer.offer(&msg("x/y"), "publish", Vec::new);
        let mut got = 0;
        while let Ok(e) = every.events.try_recv() {
            assert_eq!((e.topic.as_str(), e.rules.as_slice()), ("a/b", &["r1".to_owned()][..]));
            assert_eq!(e.payload_preview, "hi\\n");
            got += 1;
        }
        assert_eq!(got, 4);
        let mut sampled = 0;
        while half.events.try_recv().is_ok() {
            sampled += 1;
        }
        assert_eq!(sampled, 2, "one in two");
        let _c = tracer.open("#", 1).expect("open");
        let _d = tracer.open("#", 1).expect("open");
        assert_eq!(tracer.open("#", 1).err(), Some(TraceRefused::Full));
        drop(half);
        assert_eq!(tracer.active(), 3);
        // Nobody reads `every`: past its buffer, events are dropped and counted.
        for _ in 0..TRACE_BUFFER + 10 {
            tracer.offer(&msg("a/b"), "publish", Vec::new);
        }
        assert_eq!(every.dropped.load(Ordering::Relaxed), 10);
        assert!(dropped.get() >= 10);
        drop((every, _c, _d));
        assert_eq!(tracer.active(), 0);
    }
}
