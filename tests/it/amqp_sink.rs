//! The AMQP sink against the real RabbitMQ on 127.0.0.1:5672 (guest/guest).
//!
//! These tests never skip: without a reachable broker they fail, saying so. Every test uses
//! its own exchange and queue names (pid + counter). The test's own side (declaring, binding,
//! reading queues) shares one lapin connection, kept on a runtime of its own so that it
//! outlives each test's runtime. Connection loss is produced with a small TCP proxy (below)
//! that can pause either direction or cut every connection.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::proxy::Proxy;
use mqgate::config::AmqpBrokerConfig;
use mqgate::message::Message;
use mqgate::metrics::{Metrics, ReasonLabels, TargetMetrics};
use mqgate::mqtt::codec::{Properties, QoS};
use mqgate::targets::amqp::{AmqpBroker, PublishRequest};
use mqgate::targets::{Failure, Outcome};

const RABBIT_ADDR: &str = "127.0.0.1:5672";
const RABBIT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

// ---------------------------------------------------------------------------------------------
// The test's own side of RabbitMQ.

/// One connection for the whole test binary, on a runtime that lives as long as the process.
struct Rabbit {
    /// Drives the connection's heartbeats; kept alive for the whole process.
    _runtime: tokio::runtime::Runtime,
    /// The test side's only connection.
    conn: Connection,
}

static RABBIT: OnceLock<Rabbit> = OnceLock::new();

fn rabbit() -> &'static Connection {
    &RABBIT
        .get_or_init(|| {
            std::thread::spawn(|| {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("test runtime");
                let connect = async {
                    let connect = Connection::connect(RABBIT_URL, ConnectionProperties::default());
                    tokio::time::timeout(Duration::from_secs(5), connect).await
                };
                let conn = match runtime.block_on(connect) {
                    Ok(Ok(conn)) => conn,
                    Ok(Err(e)) => panic!(
                        "RabbitMQ is not reachable on {RABBIT_ADDR} as guest/guest ({e}); \
                         these tests need a real broker (`docker run -p 5672:5672 rabbitmq:3`)"
                    ),
                    Err(_) => panic!(
                        "RabbitMQ on {RABBIT_ADDR} did not complete the AMQP handshake within 5 s; \
                         these tests need a real broker"
                    ),
                };
                Rabbit { _runtime: runtime, conn }
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
        .conn
}

async fn channel() -> Channel {
    rabbit().create_channel().await.expect("test channel")
}

fn unique(what: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("mqgate-test-{what}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A fresh exchange with a fresh queue bound to it with routing key `rk`.
struct Topology {
    /// The test's channel for declaring and reading.
    ch: Channel,
    /// A direct exchange, auto-deleted with its last binding.
    exchange: String,
    /// An exclusive queue bound to `exchange` with [`RK`].
    queue: String,
}

const RK: &str = "sensors.a.telemetry";

async fn topology() -> Topology {
    let ch = channel().await;
    let exchange = unique("x");
    let queue = unique("q");
    declare_exchange(&ch, &exchange).await;
    let options = QueueDeclareOptions { exclusive: true, ..QueueDeclareOptions::default() };
    ch.queue_declare(queue.as_str().into(), options, FieldTable::default())
        .await
        .expect("queue.declare");
    let t = Topology { ch, exchange, queue };
    t.bind(&t.exchange, RK).await;
    t
}

async fn declare_exchange(ch: &Channel, exchange: &str) {
    let options = ExchangeDeclareOptions { auto_delete: true, ..ExchangeDeclareOptions::default() };
    ch.exchange_declare(exchange.into(), ExchangeKind::Direct, options, FieldTable::default())
        .await
        .expect("exchange.declare");
}

impl Topology {
    /// Binds the queue to `exchange` with `key`.
    async fn bind(&self, exchange: &str, key: &str) {
        let (options, args) = (QueueBindOptions::default(), FieldTable::default());
        let queue = self.queue.as_str().into();
        self.ch.queue_bind(queue, exchange.into(), key.into(), options, args).await.expect("bind");
    }

    /// Messages in the queue now.
    async fn depth(&self) -> u32 {
        let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
        self.ch
            .queue_declare(self.queue.as_str().into(), options, FieldTable::default())
            .await
            .expect("passive queue.declare")
            .message_count()
    }

    /// Takes one message, if there is one.
    async fn get(&self) -> Option<lapin::message::Delivery> {
        self.ch
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
            .map(|m| m.delivery)
    }

    /// Waits up to 5 s for a message.
    async fn get_within_5s(&self) -> lapin::message::Delivery {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(d) = self.get().await {
                return d;
            }
            assert!(
                Instant::now() < deadline,
                "no message arrived in queue {} within 5 s",
                self.queue
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The sink's side.

fn broker_config(url: &str) -> AmqpBrokerConfig {
    let yaml = format!(
        "url: \"{url}\"\nchannels: 2\nmax_unconfirmed: 256\nqueue: 64\nconnect_timeout: 2s\n\
         reconnect_min: 50ms\nreconnect_max: 200ms\n"
    );
    serde_saphyr::from_str(&yaml).expect("broker config")
}

/// A running sink and what the test needs to observe and stop it.
struct Sink {
    /// The handle under test.
    broker: AmqpBroker,
    /// Its supervisor task.
    task: JoinHandle<()>,
    /// Cancels it.
    shutdown: CancellationToken,
    /// Its registry (one per sink, so counts are this test's own).
    metrics: Arc<Metrics>,
    /// Its broker name.
    name: String,
}

fn spawn_sink(url: &str) -> Sink {
    let metrics = Metrics::new();
    let name = unique("broker");
    let shutdown = CancellationToken::new();
    let (broker, task) = AmqpBroker::spawn(&name, &broker_config(url), &metrics, shutdown.clone());
    Sink { broker, task, shutdown, metrics, name }
}

impl Sink {
    async fn connected_within(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.broker.is_connected() {
            assert!(Instant::now() < deadline, "sink did not connect within {within:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Publishes with an ack (QoS 1) and returns where the outcome will come.
    async fn publish_ack(
        &self,
        exchange: &str,
        rk: &str,
        msg: Arc<Message>,
        target: &TargetMetrics,
    ) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.broker.publish(request(exchange, rk, msg, Some(tx), target)).await;
        rx
    }

    /// Publishes without an ack (QoS 0).
    async fn publish_qos0(
        &self,
        exchange: &str,
        rk: &str,
        msg: Arc<Message>,
        target: &TargetMetrics,
    ) {
        self.broker.publish(request(exchange, rk, msg, None, target)).await;
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("sink task did not end within 10 s of shutdown")
            .expect("sink task panicked");
    }

    fn dropped_unavailable(&self) -> u64 {
        let labels = ReasonLabels { reason: "amqp_unavailable".to_owned() };
        self.metrics.messages_dropped.get_or_create(&labels).get()
    }
}

fn request(
    exchange: &str,
    rk: &str,
    msg: Arc<Message>,
    ack: Option<oneshot::Sender<Outcome>>,
    target: &TargetMetrics,
) -> PublishRequest {
    PublishRequest {
        exchange: Arc::from(exchange),
        routing_key: rk.to_owned(),
        msg,
        ack,
        metrics: target.clone(),
        options: Default::default(),
        dead_letter: None,
    }
}

/// A QoS 1 message.
fn msg1(payload: &'static [u8]) -> Arc<Message> {
    message(payload, QoS::AtLeastOnce, None)
}

/// A QoS 0 message.
fn msg0(payload: &'static [u8]) -> Arc<Message> {
    message(payload, QoS::AtMostOnce, None)
}

fn message(payload: &'static [u8], qos: QoS, content_type: Option<&str>) -> Arc<Message> {
    Arc::new(Message {
        charge: Default::default(),
        topic: "sensors/a/telemetry".to_owned(),
        payload: Bytes::from_static(payload),
        qos,
        retain: qos == QoS::AtMostOnce,
        client_id: Arc::from("device-42"),
        username: None,
        properties: Properties {
            content_type: content_type.map(str::to_owned),
            ..Properties::default()
        }
        .into(),
        received: Instant::now(),
        packet_id: None,
    })
}

/// The one outcome of a request, within `within`; fails the test if none comes (or the sender
/// was dropped without one).
async fn outcome(rx: oneshot::Receiver<Outcome>, within: Duration) -> Outcome {
    match tokio::time::timeout(within, rx).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => panic!("the sink dropped an ack without reporting an outcome"),
        Err(_) => panic!("no outcome within {within:?}"),
    }
}

fn assert_failed(outcome: &Outcome, retryable: bool, reason_part: &str) {
    match outcome {
        Outcome::Failed(Failure { retryable: r, reason, .. }) => {
            assert_eq!(*r, retryable, "retryable flag of {reason:?}");
            assert!(
                reason.contains(reason_part),
                "reason {reason:?} should mention {reason_part:?}"
            );
        }
        Outcome::Delivered => {
            panic!("expected a failure mentioning {reason_part:?}, got Delivered")
        }
    }
}

fn header<'a>(d: &'a lapin::message::Delivery, key: &str) -> &'a AMQPValue {
    let headers = d.properties.headers().as_ref().expect("message has headers");
    headers.inner().get(key).unwrap_or_else(|| panic!("header {key} missing"))
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_and_qos1_arrive_unchanged_with_headers_and_delivery_mode() {
    let t = topology().await;
    let sink = spawn_sink(RABBIT_URL);
    sink.connected_within(Duration::from_secs(5)).await;
    let target = TargetMetrics::default();

    let payload0: &'static [u8] = b"\x00qos0 \xff\xfe binary";
    sink.publish_qos0(&t.exchange, RK, message(payload0, QoS::AtMostOnce, None), &target).await;
    let d0 = t.get_within_5s().await;
    assert_eq!(d0.data, payload0);
    assert_eq!(d0.properties.delivery_mode(), &Some(1));
    assert_eq!(d0.properties.content_type(), &None);
    assert_eq!(header(&d0, "x-mqtt-qos"), &AMQPValue::LongInt(0));
    assert_eq!(header(&d0, "x-mqtt-retain"), &AMQPValue::Boolean(true));

    let payload1: &'static [u8] = b"{\"t\": 21.5}";
    let rx = sink
        .publish_ack(
            &t.exchange,
            RK,
            message(payload1, QoS::AtLeastOnce, Some("application/json")),
            &target,
        )
        .await;
    assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    let d1 = t.get().await.expect("a confirmed message is in the queue");
    assert_eq!(d1.data, payload1);
    assert_eq!(d1.routing_key.as_str(), RK);
    assert_eq!(d1.properties.delivery_mode(), &Some(2));
    assert_eq!(
        d1.properties.content_type().as_ref().map(ShortString::as_str),
        Some("application/json")
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let ts = d1.properties.timestamp().expect("timestamp set");
    assert!(ts.abs_diff(now) < 60, "timestamp {ts} is not now ({now})");
    assert_eq!(header(&d1, "x-mqtt-topic"), &long_string("sensors/a/telemetry"));
    assert_eq!(header(&d1, "x-mqtt-qos"), &AMQPValue::LongInt(1));
    assert_eq!(header(&d1, "x-mqtt-retain"), &AMQPValue::Boolean(false));
    assert_eq!(header(&d1, "x-mqtt-client-id"), &long_string("device-42"));

    assert_eq!(target.forwarded.get(), 2);
    assert_eq!(target.failed.get(), 0);
    let bm = sink.metrics.broker(&sink.name);
    assert_eq!(bm.connects.get(), 1);
    assert_eq!(bm.connected.get(), 1);
    assert_eq!(bm.unconfirmed.get(), 0);
    sink.stop().await;
    assert_eq!(bm.connected.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_is_delivered_only_once_rabbitmq_has_the_message_and_confirmed_it() {
    let t = topology().await;
    let proxy = Proxy::start().await;
    let sink = spawn_sink(&proxy.url());
    sink.connected_within(Duration::from_secs(5)).await;
    let target = TargetMetrics::default();

    // Verify the exchange first, so what is held below is the publish itself.
    let rx = sink.publish_ack(&t.exchange, RK, msg1(b"first"), &target).await;
    assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    assert!(t.get().await.is_some());

    // Bytes to RabbitMQ held: the message is not in the queue, and no outcome may come.
    proxy.pause_to_broker.send_replace(true);
    let mut rx = sink.publish_ack(&t.exchange, RK, msg1(b"held"), &target).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(rx.try_recv().is_err(), "an outcome came before RabbitMQ got the message");
    assert_eq!(t.depth().await, 0);
    proxy.pause_to_broker.send_replace(false);
    assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    assert_eq!(t.get().await.expect("in the queue when Delivered").data, b"held");

    // Confirms from RabbitMQ held: the message is in the queue, but Delivered must wait for them.
    proxy.pause_to_client.send_replace(true);
    let mut rx = sink.publish_ack(&t.exchange, RK, msg1(b"unconfirmed"), &target).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.depth().await == 0 {
        assert!(Instant::now() < deadline, "the message never reached the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "Delivered was reported before the broker's confirm arrived");
    assert_eq!(sink.metrics.broker(&sink.name).unconfirmed.get(), 1);
    proxy.pause_to_client.send_replace(false);
    assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    assert!(confirm_latency_count(&sink.metrics.broker(&sink.name)) >= 3);
    sink.stop().await;
}

/// The number of confirm latencies observed, read from the encoded histogram.
fn confirm_latency_count(bm: &mqgate::metrics::BrokerMetrics) -> u64 {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("lat", "confirm latency", bm.confirm_latency.clone());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    let count = text.lines().find_map(|l| l.strip_prefix("lat_count "));
    count.and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no count in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_exchange_fails_fast_and_spares_publishes_to_a_valid_one() {
    let t = topology().await;
    let missing = unique("missing");
    let sink = spawn_sink(RABBIT_URL);
    sink.connected_within(Duration::from_secs(5)).await;
    let good = TargetMetrics::default();
    let bad = TargetMetrics::default();

    let started = Instant::now();
    let mut outcomes = Vec::new();
    for i in 0..100 {
        let (exchange, target) =
            if i % 2 == 0 { (t.exchange.as_str(), &good) } else { (missing.as_str(), &bad) };
        let rx = sink.publish_ack(exchange, RK, msg1(b"burst"), target).await;
        outcomes.push((i % 2 == 0, rx));
    }
    sink.publish_qos0(&missing, RK, msg0(b"qos0"), &bad).await;
    for (valid, rx) in outcomes {
        let o = outcome(rx, Duration::from_secs(5)).await;
        if valid {
            assert_eq!(o, Outcome::Delivered);
        } else {
            assert_failed(&o, false, &format!("exchange '{missing}' does not exist in the vhost"));
        }
    }
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert_eq!(t.depth().await, 50);
    assert_eq!(good.forwarded.get(), 50);
    let deadline = Instant::now() + Duration::from_secs(2);
    while bad.failed.get() < 51 {
        assert!(Instant::now() < deadline, "bad target failed count is {}", bad.failed.get());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Created later, it works once the ~1 s "missing" memory has passed.
    declare_exchange(&t.ch, &missing).await;
    t.bind(&missing, RK).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rx = sink.publish_ack(&missing, RK, msg1(b"now it exists"), &good).await;
    assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    assert_eq!(sink.metrics.broker(&sink.name).connects.get(), 1, "no reconnect was needed");
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_deleted_while_in_use_fails_its_publishes_and_the_sink_recovers() {
    let t = topology().await;
    let doomed = unique("doomed");
    declare_exchange(&t.ch, &doomed).await;
    let sink = spawn_sink(RABBIT_URL);
    sink.connected_within(Duration::from_secs(5)).await;
    let target = TargetMetrics::default();

    // Verified and cached on the sink's connection...
    let rx = sink.publish_ack(&doomed, RK, msg1(b"first"), &target).await;
    assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    // ...then deleted behind its back.
    t.ch.exchange_delete(doomed.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .expect("exchange.delete");

    let mut outcomes = Vec::new();
    for i in 0..40 {
        let exchange = if i % 2 == 0 { doomed.as_str() } else { t.exchange.as_str() };
        let rx = sink.publish_ack(exchange, RK, msg1(b"during"), &target).await;
        outcomes.push((i % 2 == 0, rx));
        sink.publish_qos0(&doomed, RK, msg0(b"qos0"), &target).await;
    }
    for (to_doomed, rx) in outcomes {
        let o = outcome(rx, Duration::from_secs(10)).await;
        if to_doomed {
            assert_ne!(
                o,
                Outcome::Delivered,
                "a publish to a deleted exchange was reported Delivered"
            );
        } else if let Outcome::Failed(f) = &o {
            assert!(f.retryable, "an innocent publish failed for good: {f:?}");
        }
    }

    // Settled: the deleted exchange fails for good, the valid one delivers, on the same connection.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let rx = sink.publish_ack(&doomed, RK, msg1(b"after"), &target).await;
    assert_failed(&outcome(rx, Duration::from_secs(5)).await, false, "does not exist");
    for _ in 0..10 {
        let rx = sink.publish_ack(&t.exchange, RK, msg1(b"after"), &target).await;
        assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    }
    assert!(sink.broker.is_connected());
    assert_eq!(sink.metrics.broker(&sink.name).connects.get(), 1, "recovered without reconnecting");
    assert_eq!(sink.metrics.broker(&sink.name).unconfirmed.get(), 0);
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_names_fail_for_good_without_a_panic() {
    let t = topology().await;
    let sink = spawn_sink(RABBIT_URL);
    sink.connected_within(Duration::from_secs(5)).await;
    let target = TargetMetrics::default();
    let long_key = "k".repeat(300);

    let rx = sink.publish_ack(&t.exchange, &long_key, msg1(b"x"), &target).await;
    assert_failed(
        &outcome(rx, Duration::from_secs(1)).await,
        false,
        "routing key longer than 255 bytes",
    );
    sink.publish_qos0(&t.exchange, &long_key, msg0(b"x"), &target).await;
    let rx = sink.publish_ack(&"e".repeat(256), RK, msg1(b"x"), &target).await;
    assert_failed(
        &outcome(rx, Duration::from_secs(1)).await,
        false,
        "exchange name longer than 255 bytes",
    );
    // A multi-byte key: 128 × 2 bytes = 256 bytes although only 128 characters.
    let rx = sink.publish_ack(&t.exchange, &"é".repeat(128), msg1(b"x"), &target).await;
    assert_failed(
        &outcome(rx, Duration::from_secs(1)).await,
        false,
        "routing key longer than 255 bytes",
    );
    assert_eq!(target.failed.get(), 4);

    // A key of exactly 255 bytes is fine, and the sink is still healthy.
    let key = "r".repeat(255);
    t.bind(&t.exchange, &key).await;
    let rx = sink.publish_ack(&t.exchange, &key, msg1(b"255"), &target).await;
    assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    assert_eq!(t.get().await.expect("delivered").routing_key.as_str(), key);
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_fails_requests_at_once_and_counts_qos0_drops() {
    rabbit(); // the suite needs RabbitMQ anyway; fail early and clearly without it
    let sink = spawn_sink("amqp://guest:guest@127.0.0.1:1/%2f");
    let target = TargetMetrics::default();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sink.broker.is_connected());

    let started = Instant::now();
    let rx = sink.publish_ack("events", RK, msg1(b"x"), &target).await;
    assert_failed(&outcome(rx, Duration::from_secs(1)).await, true, "is not connected");
    assert!(started.elapsed() < Duration::from_millis(500));
    sink.publish_qos0("events", RK, msg0(b"x"), &target).await;
    assert_eq!(target.failed.get(), 2);
    assert_eq!(target.forwarded.get(), 0);
    assert_eq!(sink.dropped_unavailable(), 1);
    let bm = sink.metrics.broker(&sink.name);
    assert_eq!(bm.connected.get(), 0);
    assert_eq!(bm.connects.get(), 0);
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_loss_fails_every_unconfirmed_publish_and_the_sink_reconnects() {
    let t = topology().await;
    let proxy = Proxy::start().await;
    let sink = spawn_sink(&proxy.url());
    sink.connected_within(Duration::from_secs(5)).await;
    let target = TargetMetrics::default();

    // 1. Publishes whose confirms cannot come back when the connection dies: each fails,
    //    retryable, for the connection loss — none is Delivered, none hangs. (One publish
    //    first, so that the exchange is verified before the broker's answers are held.)
    let rx = sink.publish_ack(&t.exchange, RK, msg1(b"first"), &target).await;
    assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    assert!(t.get().await.is_some());
    proxy.pause_to_client.send_replace(true);
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(sink.publish_ack(&t.exchange, RK, msg1(b"held"), &target).await);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.depth().await < 50 {
        assert!(Instant::now() < deadline, "the held publishes never reached the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.cut();
    for rx in held {
        assert_failed(&outcome(rx, Duration::from_secs(5)).await, true, "lost");
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while sink.broker.is_connected() {
        assert!(Instant::now() < deadline, "is_connected() still true after the cut");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sink.metrics.broker(&sink.name).unconfirmed.get(), 0);

    // 2. A stream cut in the middle: every request gets exactly one outcome; Delivered ones are
    //    really in the queue; failures are retryable.
    proxy.restore();
    sink.connected_within(Duration::from_secs(5)).await;
    let _ = t.ch.queue_purge(t.queue.as_str().into(), Default::default()).await.expect("purge");
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let broker = sink.broker.clone();
        let (exchange, target, stop) = (t.exchange.clone(), target.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut rxs = Vec::new();
            while !stop.load(Ordering::Relaxed) && rxs.len() < 50_000 {
                let (tx, rx) = oneshot::channel();
                broker.publish(request(&exchange, RK, msg1(b"stream"), Some(tx), &target)).await;
                rxs.push(rx);
                if rxs.len() % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            rxs
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let rxs = publisher.await.expect("publisher task");
    let (mut delivered, mut failed) = (0u32, 0u32);
    for rx in rxs {
        match outcome(rx, Duration::from_secs(10)).await {
            Outcome::Delivered => delivered += 1,
            o => {
                assert_failed(&o, true, "");
                failed += 1;
            }
        }
    }
    assert!(delivered > 0, "nothing was delivered before the cut");
    assert!(failed > 0, "the cut failed nothing");
    proxy.restore();
    sink.connected_within(Duration::from_secs(5)).await;
    assert!(t.depth().await >= delivered, "a Delivered message is missing from the queue");

    // 3. After the reconnect, publishing works again.
    let rx = sink.publish_ack(&t.exchange, RK, msg1(b"after"), &target).await;
    assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    let bm = sink.metrics.broker(&sink.name);
    assert!(bm.connects.get() >= 3, "connects = {}", bm.connects.get());
    assert_eq!(bm.unconfirmed.get(), 0);
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_confirms_then_fails_what_is_left() {
    // Two sinks, each with 5 publishes sent whose confirms are held by its proxy: one gets its
    // confirms during the drain (Delivered), the other never (Failed once the drain time is up).
    let (a, b) = tokio::join!(sink_with_held_confirms(), sink_with_held_confirms());
    let ((sink_a, proxy_a, rxs_a, target), (sink_b, _proxy_b, rxs_b, _)) = (a, b);
    let (broker_a, broker_b) = (sink_a.broker.clone(), sink_b.broker.clone());
    let started = Instant::now();
    let stop_a = tokio::spawn(async move {
        sink_a.stop().await;
        started.elapsed()
    });
    let stop_b = tokio::spawn(async move {
        sink_b.stop().await;
        started.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy_a.pause_to_client.send_replace(false);

    let took_a = stop_a.await.expect("stop a");
    assert!(took_a < Duration::from_secs(3), "shutdown with confirms arriving took {took_a:?}");
    for rx in rxs_a {
        assert_eq!(outcome(rx, Duration::from_secs(1)).await, Outcome::Delivered);
    }
    let took_b = stop_b.await.expect("stop b");
    assert!(
        took_b >= Duration::from_secs(4) && took_b < Duration::from_secs(9),
        "shutdown took {took_b:?}"
    );
    for rx in rxs_b {
        assert_failed(&outcome(rx, Duration::from_secs(1)).await, true, "shut down");
    }

    // The sinks are gone: a late publish fails at once, it is never left hanging.
    for broker in [broker_a, broker_b] {
        assert!(!broker.is_connected());
        let (tx, rx) = oneshot::channel();
        broker.publish(request("x", RK, msg1(b"late"), Some(tx), &target)).await;
        assert!(
            matches!(outcome(rx, Duration::from_secs(1)).await, Outcome::Failed(f) if f.retryable)
        );
    }
}

/// A connected sink behind a proxy that holds its confirms, with 5 publishes already in the queue.
async fn sink_with_held_confirms() -> (Sink, Proxy, Vec<oneshot::Receiver<Outcome>>, TargetMetrics)
{
    let t = topology().await;
    let proxy = Proxy::start().await;
    let sink = spawn_sink(&proxy.url());
    sink.connected_within(Duration::from_secs(5)).await;
    let target = TargetMetrics::default();
    // The first publish verifies the exchange (an answer from the broker).
    let rx = sink.publish_ack(&t.exchange, RK, msg1(b"first"), &target).await;
    assert_eq!(outcome(rx, Duration::from_secs(5)).await, Outcome::Delivered);
    assert!(t.get().await.is_some());
    proxy.pause_to_client.send_replace(true);
    let mut rxs = Vec::new();
    for _ in 0..5 {
        rxs.push(sink.publish_ack(&t.exchange, RK, msg1(b"held"), &target).await);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.depth().await < 5 {
        assert!(Instant::now() < deadline, "the publishes never reached the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (sink, proxy, rxs, target)
}
