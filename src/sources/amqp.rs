//! One source's AMQP consumer: connect, declare/bind, `basic.qos` + `basic.consume`, publish
//! each delivery to the MQTT broker as a tracked message, and ack or nack it from the
//! tracker's summary. Reconnects with backoff; a lost connection's unacked deliveries are
//! redelivered by RabbitMQ to the next one.
//!
//! One task per source owns its connection (our own AMQP codec, `targets::amqp::wire`, no
//! client library): a `select!` over the socket, the trackers' reports, a tick (heartbeats,
//! requeue delays) and shutdown. Memory is bounded by `prefetch`: at most that many
//! deliveries are unacked, each holds one message, one tracker and at most one report.
//! It never blocks the broker: publishing is `Broker::publish_tracked`, synchronous.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::acks::Acks;
use super::config::{NackPolicy, SourceConfig, SourceMode};
use super::mapping::{self, Delivered, TopicTemplate};
use crate::broker::tracking::{Done, Fate, Mode, Summary, Tracker};
use crate::broker::Broker;
use crate::config::AmqpBrokerConfig;
use crate::message::Message;
use crate::metrics::SourceMetrics;
use crate::mqtt::codec::QoS;
use crate::targets::amqp::transport::{self, describe, Transport, Uri};
use crate::targets::amqp::wire::consume::{
    self, BasicProperties, ConsumerFrame, ConsumerMethod, Deliver,
};
use crate::targets::amqp::wire::frame;
use crate::targets::amqp::wire::methods::{self, Method, REPLY_SUCCESS};
use crate::targets::amqp::wire::methods::{queue_bind, queue_declare, QueueFlags};

/// How often heartbeats and requeue delays are looked at.
const TICK: Duration = Duration::from_millis(100);
/// On shutdown, how long the broker may take to answer `connection.close`.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A source, compiled from its config.
#[derive(Debug)]
pub struct Settings {
    /// The source's name (also the `client_id` of the messages it publishes).
    pub name: Arc<str>,
    /// The broker's URL (with credentials: never logged).
    url: String,
    /// TLS and the SASL mechanism of the broker.
    security: transport::Security,
    /// The queue.
    queue: String,
    /// Declare it (flags, arguments), or only check it exists.
    declare: Option<(QueueFlags, Vec<(String, crate::config::ArgumentValue)>)>,
    /// Bindings (exchange, binding key).
    bind: Vec<(String, String)>,
    /// `basic.qos` prefetch count.
    prefetch: u16,
    /// The topic template, or `None` for the routing key translated back.
    template: Option<TopicTemplate>,
    /// QoS without a header.
    qos: QoS,
    /// Header that sets the QoS ("" for none).
    qos_header: String,
    /// RETAIN without a header.
    retain: bool,
    /// Broadcast or work.
    mode: Mode,
    /// Forward to the cluster's other nodes and persistent sessions (`cluster: forward`).
    forward: bool,
    /// No subscriber matched.
    on_no_subscriber: NackPolicy,
    /// Delivery failed.
    on_failure: NackPolicy,
    /// Held this long before a requeueing nack.
    requeue_delay: Duration,
    /// Time allowed for connecting and the setup.
    connect_timeout: Duration,
    /// First reconnect delay.
    reconnect_min: Duration,
    /// Longest reconnect delay.
    reconnect_max: Duration,
}

impl Settings {
    /// The settings of `cfg` on the broker `broker` (validated config).
    pub fn new(cfg: &SourceConfig, broker: &AmqpBrokerConfig) -> Settings {
        let declare = cfg.declare.as_ref().map(|d| {
            let flags = QueueFlags {
                passive: false,
                durable: d.durable,
                exclusive: false,
                auto_delete: d.auto_delete,
            };
            (flags, d.arguments.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        });
        let reconnect_min = broker.reconnect_min.0.max(Duration::from_millis(1));
        Settings {
            name: Arc::from(cfg.name.value.as_str()),
            url: broker.url.value.clone(),
            queue: cfg.queue.as_ref().map(|q| q.value.clone()).unwrap_or_default(),
            declare,
            bind: cfg
                .bind
                .iter()
                .map(|b| (b.exchange.value.clone(), b.routing_key.value.clone()))
                .collect(),
            prefetch: u16::try_from(cfg.prefetch.value.clamp(1, 65_535)).unwrap_or(u16::MAX),
            template: cfg.topic.as_ref().and_then(|t| TopicTemplate::parse(&t.value).ok()),
            qos: match cfg.qos.value {
                0 => QoS::AtMostOnce,
                2 => QoS::ExactlyOnce,
                _ => QoS::AtLeastOnce,
            },
            qos_header: cfg.qos_header.clone(),
            retain: cfg.retain,
            mode: match cfg.mode {
                SourceMode::Broadcast => Mode::Broadcast,
                SourceMode::Work => Mode::Work,
            },
            forward: cfg.cluster == super::config::SourceCluster::Forward,
            on_no_subscriber: cfg.on_no_subscriber,
            on_failure: cfg.on_failure,
            requeue_delay: cfg.requeue_delay.0,
            connect_timeout: broker.connect_timeout.0,
            security: broker.security(),
            reconnect_min,
            reconnect_max: broker.reconnect_max.0.max(reconnect_min),
        }
    }
}

/// Runs the source until `shutdown`: connect, consume, reconnect with backoff.
pub async fn run(
    settings: Settings,
    broker: Arc<Broker>,
    metrics: SourceMetrics,
    shutdown: CancellationToken,
) {
    let name = Arc::clone(&settings.name);
    metrics.connected.set(0);
    let uri = match settings.url.parse::<Uri>() {
        Ok(uri) => uri,
        Err(e) => {
            warn!(source = %name, error = %e, "url is not a valid AMQP URI; the source is idle");
            shutdown.cancelled().await;
            return;
        }
    };
    let endpoint = format!("{}:{} (vhost {:?})", uri.host, uri.port, uri.vhost);
    let mut delay = settings.reconnect_min;
    loop {
        let attempt = tokio::time::timeout(settings.connect_timeout, setup(&uri, &settings));
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return,
            a = attempt => a,
        };
        match attempt {
            Ok(Ok((t, ch))) => {
                delay = settings.reconnect_min;
                info!(source = %name, %endpoint, queue = %settings.queue, "source consuming");
                metrics.connected.set(1);
                let mut c = Consumer::new(&settings, &broker, &metrics, t, ch);
                let ended = c.run(&shutdown).await;
                metrics.connected.set(0);
                match ended {
                    None => return,
                    Some(reason) => {
                        warn!(source = %name, %endpoint, %reason, retry_in = ?delay,
                            "source lost its AMQP connection")
                    }
                }
            }
            Ok(Err(e)) => {
                warn!(source = %name, %endpoint, error = %e, retry_in = ?delay,
                    "source could not start consuming")
            }
            Err(_) => warn!(source = %name, %endpoint, retry_in = ?delay,
                "source could not start consuming within connect_timeout"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(jitter(delay)) => {}
        }
        delay = (delay * 2).min(settings.reconnect_max);
    }
}

/// Connects, declares or checks the queue, binds it, sets the prefetch and starts consuming.
/// Returns the transport and the consuming channel.
async fn setup(uri: &Uri, s: &Settings) -> Result<(Transport, u16), String> {
    let link = transport::connect(uri, &s.security, &format!("source/{}", s.name), 1)
        .await
        .map_err(|e| e.to_string())?;
    let mut t = link.transport;
    // The plain (non-confirm) channel `connect` opens after the confirm one.
    let ch = link.confirm_channels + 1;
    let wire = |e: crate::targets::amqp::wire::WireError| e.to_string();
    match &s.declare {
        Some((flags, args)) => {
            let args = crate::targets::amqp::queues::argument_table(args);
            queue_declare(&mut t.wbuf, ch, &s.queue, *flags, &args).map_err(wire)?;
        }
        None => {
            let flags = QueueFlags { passive: true, ..QueueFlags::default() };
            queue_declare(&mut t.wbuf, ch, &s.queue, flags, &[]).map_err(wire)?;
        }
    }
    expect(&mut t, ch, "queue.declare-ok", |m| matches!(m, ConsumerMethod::QueueDeclareOk { .. }))
        .await?;
    for (exchange, key) in &s.bind {
        queue_bind(&mut t.wbuf, ch, &s.queue, exchange, key).map_err(wire)?;
        expect(&mut t, ch, "queue.bind-ok", |m| matches!(m, ConsumerMethod::QueueBindOk)).await?;
    }
    consume::basic_qos(&mut t.wbuf, ch, s.prefetch);
    expect(&mut t, ch, "basic.qos-ok", |m| matches!(m, ConsumerMethod::QosOk)).await?;
    let tag = format!("mqgate/{}", s.name);
    consume::basic_consume(&mut t.wbuf, ch, &s.queue, &tag).map_err(wire)?;
    expect(&mut t, ch, "basic.consume-ok", |m| matches!(m, ConsumerMethod::ConsumeOk(_))).await?;
    Ok((t, ch))
}

/// Writes what is buffered, waiting as needed.
pub(crate) async fn flush_all(t: &mut Transport) -> Result<(), String> {
    while !t.try_flush().map_err(|e| format!("write failed: {e}"))? {
        t.stream.writable().await.map_err(|e| format!("write failed: {e}"))?;
    }
    Ok(())
}

/// Flushes, then reads until a method on `ch` that `want` accepts. A close is an error
/// naming the broker's reason (e.g. "404 NOT_FOUND - no queue 'x'").
pub(crate) async fn expect(
    t: &mut Transport,
    ch: u16,
    what: &str,
    want: impl Fn(&ConsumerMethod) -> bool,
) -> Result<ConsumerMethod, String> {
    flush_all(t).await?;
    loop {
        while let Some(frame) = t.next_consumer_frame().map_err(|e| e.to_string())? {
            match frame {
                ConsumerFrame::Method { channel, method } if channel == ch && want(&method) => {
                    return Ok(method)
                }
                ConsumerFrame::Method {
                    method: ConsumerMethod::Common(Method::ChannelClose(c)),
                    ..
                }
                | ConsumerFrame::Method {
                    method: ConsumerMethod::Common(Method::ConnectionClose(c)),
                    ..
                } => return Err(format!("the broker refused {what}: {}", describe(&c))),
                _ => {}
            }
        }
        t.stream.readable().await.map_err(|e| format!("read failed: {e}"))?;
        if !t.try_fill().map_err(|e| format!("read failed: {e}"))? {
            return Err("the broker closed the connection".into());
        }
    }
}

/// A delivery being assembled from its frames.
enum Assembly {
    /// Between messages.
    Idle,
    /// `basic.deliver` came; its content header is next.
    Header(Deliver),
    /// Header came; body frames until `size` bytes.
    Body { deliver: Deliver, properties: Box<BasicProperties>, size: usize, body: BytesMut },
}

/// The consuming loop on one connection.
struct Consumer<'a> {
    /// The source's settings.
    s: &'a Settings,
    /// Where messages are published.
    broker: &'a Broker,
    /// Its counters.
    metrics: &'a SourceMetrics,
    /// The socket and its buffers.
    t: Transport,
    /// The consuming channel.
    ch: u16,
    /// The delivery being assembled.
    assembly: Assembly,
    /// Trackers report here (a new channel per connection: reports about an old connection's
    /// deliveries go nowhere, their tags mean nothing on this one).
    report_tx: mpsc::UnboundedSender<Done>,
    /// Reports.
    report_rx: mpsc::UnboundedReceiver<Done>,
    /// Deliveries waiting for their requeueing nack, by due time (FIFO: one delay for all).
    held: VecDeque<(Instant, u64)>,
    /// Unsettled deliveries, for coalescing acks.
    acks: Acks,
}

impl<'a> Consumer<'a> {
    fn new(
        s: &'a Settings,
        broker: &'a Broker,
        metrics: &'a SourceMetrics,
        t: Transport,
        ch: u16,
    ) -> Self {
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        Consumer {
            s,
            broker,
            metrics,
            t,
            ch,
            assembly: Assembly::Idle,
            report_tx,
            report_rx,
            held: VecDeque::new(),
            acks: Acks::default(),
        }
    }

    /// Consumes until the connection is lost (`Some(reason)`) or shutdown (`None`).
    async fn run(&mut self, shutdown: &CancellationToken) -> Option<String> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let want_write = self.t.has_pending_writes();
            let res = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.close().await;
                    return None;
                }
                Some(done) = self.report_rx.recv() => {
                    self.on_report(done);
                    // Every report already there goes out in the same write.
                    while let Ok(done) = self.report_rx.try_recv() {
                        self.on_report(done);
                    }
                    self.ack_settled();
                    Ok(())
                }
                r = self.t.stream.readable() => match r {
                    Ok(()) => self.on_readable(),
                    Err(e) => Err(format!("read failed: {e}")),
                },
                r = self.t.stream.writable(), if want_write => match r {
                    Ok(()) => Ok(()),
                    Err(e) => Err(format!("write failed: {e}")),
                },
                _ = tick.tick() => self.on_tick(),
            };
            if let Err(reason) = res {
                return Some(reason);
            }
            if let Err(e) = self.t.try_flush() {
                return Some(format!("write failed: {e}"));
            }
        }
    }

    /// Reads what is there and handles every complete frame.
    fn on_readable(&mut self) -> Result<(), String> {
        if !self.t.try_fill().map_err(|e| format!("read failed: {e}"))? {
            return Err("the broker closed the connection".into());
        }
        while let Some(frame) = self.t.next_consumer_frame().map_err(|e| e.to_string())? {
            self.on_frame(frame)?;
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: ConsumerFrame) -> Result<(), String> {
        match frame {
            ConsumerFrame::Heartbeat => {}
            ConsumerFrame::Method { channel, method } => return self.on_method(channel, method),
            ConsumerFrame::Header { channel, body_size, properties } if channel == self.ch => {
                let Assembly::Header(deliver) =
                    std::mem::replace(&mut self.assembly, Assembly::Idle)
                else {
                    return Err("content header without basic.deliver".into());
                };
                let size = usize::try_from(body_size).map_err(|_| "body too large")?;
                if size == 0 {
                    self.on_delivery(deliver, &properties, BytesMut::new());
                } else {
                    // The body comes in frames of at most frame_max; reserve no more than one
                    // frame up front (a header cannot make us allocate what never comes).
                    let body = BytesMut::with_capacity(size.min(self.t.frame_max as usize));
                    self.assembly = Assembly::Body { deliver, properties, size, body };
                }
            }
            ConsumerFrame::Body { channel, bytes } if channel == self.ch => {
                let Assembly::Body { body, size, .. } = &mut self.assembly else {
                    return Err("content body without a header".into());
                };
                body.extend_from_slice(&bytes);
                if body.len() >= *size {
                    if let Assembly::Body { deliver, properties, body, .. } =
                        std::mem::replace(&mut self.assembly, Assembly::Idle)
                    {
                        self.on_delivery(deliver, &properties, body);
                    }
                }
            }
            ConsumerFrame::Header { .. } | ConsumerFrame::Body { .. } => {}
        }
        Ok(())
    }

    fn on_method(&mut self, channel: u16, method: ConsumerMethod) -> Result<(), String> {
        match method {
            ConsumerMethod::Deliver(d) if channel == self.ch => {
                self.assembly = Assembly::Header(d);
            }
            ConsumerMethod::Cancel(tag) => {
                consume::basic_cancel_ok(&mut self.t.wbuf, channel, &tag);
                return Err("the broker cancelled the consumer (queue deleted?)".into());
            }
            ConsumerMethod::Common(Method::ConnectionClose(c)) => {
                methods::connection_close_ok(&mut self.t.wbuf);
                let _ = self.t.try_flush();
                return Err(format!("the broker closed the connection: {}", describe(&c)));
            }
            ConsumerMethod::Common(Method::ChannelClose(c)) if channel == self.ch => {
                methods::channel_close_ok(&mut self.t.wbuf, channel);
                return Err(format!("the broker closed the channel: {}", describe(&c)));
            }
            ConsumerMethod::Common(Method::ChannelFlow(active)) => {
                methods::channel_flow_ok(&mut self.t.wbuf, channel, active);
            }
            other => debug!(source = %self.s.name, channel, ?other, "ignored AMQP method"),
        }
        Ok(())
    }

    /// One complete delivery: publish it to MQTT, tracked, or apply the failure policy.
    fn on_delivery(&mut self, d: Deliver, properties: &BasicProperties, body: BytesMut) {
        let s = self.s;
        self.acks.delivered(d.delivery_tag);
        let delivered = Delivered {
            routing_key: &d.routing_key,
            exchange: &d.exchange,
            queue: &s.queue,
            properties,
        };
        let topic = match mapping::topic_for(s.template.as_ref(), &delivered) {
            Ok(topic) => topic,
            Err(reason) => {
                warn!(source = %s.name, %reason, "delivery has no usable MQTT topic");
                self.apply(d.delivery_tag, s.on_failure);
                return;
            }
        };
        let msg = Arc::new(Message {
            charge: Default::default(),
            topic,
            payload: body.freeze(),
            qos: mapping::qos_for(properties, &s.qos_header, s.qos),
            retain: mapping::retain_for(properties, s.retain),
            client_id: Arc::clone(&s.name),
            username: None,
            properties: mapping::properties_for(properties, &s.qos_header).into(),
            received: Instant::now(),
            packet_id: None,
        });
        let root = Tracker::root(d.delivery_tag, s.mode, self.report_tx.clone());
        self.broker.publish_source(&msg, &root, s.forward);
        root.finish(Fate::Gone);
    }

    /// A tracker's summary: ack, or the policy.
    fn on_report(&mut self, done: Done) {
        match done.summary {
            Summary::Taken => {
                if !self.acks.ack(done.token) {
                    consume::basic_ack(&mut self.t.wbuf, self.ch, done.token, false);
                    self.acks.settled(done.token);
                }
                self.metrics.delivered.inc();
            }
            Summary::NoSubscriber => self.apply(done.token, self.s.on_no_subscriber),
            Summary::Failed | Summary::Returned => self.apply(done.token, self.s.on_failure),
        }
    }

    /// Sends one `basic.ack multiple` for the deliveries acked in tag order since the last.
    fn ack_settled(&mut self) {
        if let Some(tag) = self.acks.take_multiple() {
            consume::basic_ack(&mut self.t.wbuf, self.ch, tag, true);
        }
    }

    /// Applies `policy` to delivery `tag`.
    fn apply(&mut self, tag: u64, policy: NackPolicy) {
        match policy {
            NackPolicy::Requeue if self.s.requeue_delay.is_zero() => self.requeue(tag),
            NackPolicy::Requeue => {
                self.held.push_back((Instant::now() + self.s.requeue_delay, tag))
            }
            NackPolicy::DeadLetter => {
                consume::basic_nack(&mut self.t.wbuf, self.ch, tag, false, false);
                self.acks.settled(tag);
                self.metrics.dead_lettered.inc();
            }
            NackPolicy::Drop => {
                consume::basic_ack(&mut self.t.wbuf, self.ch, tag, false);
                self.acks.settled(tag);
                self.metrics.dropped.inc();
            }
        }
    }

    fn requeue(&mut self, tag: u64) {
        consume::basic_nack(&mut self.t.wbuf, self.ch, tag, false, true);
        self.acks.settled(tag);
        self.metrics.requeued.inc();
    }

    /// Heartbeats, the broker's silence, requeue delays.
    fn on_tick(&mut self) -> Result<(), String> {
        let now = Instant::now();
        while self.held.front().is_some_and(|(due, _)| *due <= now) {
            if let Some((_, tag)) = self.held.pop_front() {
                self.requeue(tag);
            }
        }
        keep_alive(&mut self.t, now)
    }

    /// Closes the connection on shutdown; unacked deliveries go back to the queue.
    async fn close(&mut self) {
        close_connection(&mut self.t, "mqgate source stopping").await;
    }
}

/// Reads until `connection.close-ok` (or the socket closes).
/// The connection's heartbeats at `now`: an error once the broker has been silent for two
/// heartbeat intervals; a heartbeat queued when nothing was written for half of one.
pub(crate) fn keep_alive(t: &mut Transport, now: Instant) -> Result<(), String> {
    if let Some(hb) = t.heartbeat {
        if now.duration_since(t.last_read) > hb * 2 {
            return Err(format!("no data from the broker for {:?}", hb * 2));
        }
        if t.wbuf.is_empty() && now.duration_since(t.last_write) >= hb / 2 {
            frame::heartbeat(&mut t.wbuf);
        }
    }
    Ok(())
}

/// Closes the connection with `reason`, waiting at most [`CLOSE_WAIT`] for the broker's
/// close-ok (what was delivered on it and not acknowledged goes back to its queues).
pub(crate) async fn close_connection(t: &mut Transport, reason: &str) {
    methods::connection_close(&mut t.wbuf, REPLY_SUCCESS, reason);
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        flush_all(t).await?;
        expect_close_ok(t).await
    })
    .await;
}

pub(crate) async fn expect_close_ok(t: &mut Transport) -> Result<(), String> {
    loop {
        while let Some(frame) = t.next_consumer_frame().map_err(|e| e.to_string())? {
            if let ConsumerFrame::Method {
                method: ConsumerMethod::Common(Method::ConnectionCloseOk),
                ..
            } = frame
            {
                return Ok(());
            }
        }
        t.stream.readable().await.map_err(|e| e.to_string())?;
        if !t.try_fill().map_err(|e| e.to_string())? {
            return Ok(());
        }
    }
}

/// `delay` give or take 10 %, so that many gateways do not reconnect in step.
pub(crate) fn jitter(delay: Duration) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(delay.as_nanos() as u64);
    let unit = (h.finish() % 10_001) as f64 / 10_000.0;
    delay.mul_f64(0.9 + 0.2 * unit)
}
