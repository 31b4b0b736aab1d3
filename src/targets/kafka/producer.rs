//! One Kafka cluster: librdkafka's idempotent producer (acks=all), the byte and count budget of
//! what it holds, and the delivery reports that become outcomes.
//!
//! A record is handed to librdkafka from the publisher's own task ([`Cluster::try_send`]: it
//! copies the record into its queue and never blocks). librdkafka batches (linger), retries with
//! backoff and reports each record once, on its polling thread, where [`Ctx::delivery`] turns
//! the report into the record's [`Outcome`]. What librdkafka holds is bounded by two semaphores
//! (records and bytes) taken before the hand-over and released with the report: at the bound the
//! hand-over waits ([`Cluster::send`]), which is the backpressure to the MQTT client.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use super::config::KafkaClusterConfig;
use crate::deadletters::Recorder;
use crate::message::Message;
use crate::metrics::TargetMetrics;
use crate::targets::kinds::Health;
use crate::targets::{AckSender, Failure, Outcome};

/// One record on its way to the cluster.
pub struct Record {
    /// The Kafka topic.
    pub topic: String,
    /// The record key.
    pub key: Option<String>,
    /// The value.
    pub payload: Bytes,
    /// The headers.
    pub headers: OwnedHeaders,
    /// Bytes the record counts against `max_queued_bytes`.
    pub size: usize,
    /// What the report goes to.
    pub pending: Box<Pending>,
}

/// What a delivery report resolves: the outcome sender (QoS 1/2), the dead-letter recorder of a
/// final failure, the target's counters, and the budget the record holds until then.
pub struct Pending {
    /// The outcome sender; `None` when nobody waits (QoS 0).
    pub ack: Option<AckSender>,
    /// Where a final failure is kept.
    pub dead_letter: Option<(Arc<Recorder>, Arc<Message>)>,
    /// The target's counters.
    pub metrics: TargetMetrics,
    /// The record's share of the budget, released when the report comes.
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

impl Pending {
    /// A pending report.
    pub fn new(
        ack: Option<AckSender>,
        dead_letter: Option<(Arc<Recorder>, Arc<Message>)>,
        metrics: TargetMetrics,
    ) -> Box<Pending> {
        Box::new(Pending { ack, dead_letter, metrics, permits: None })
    }

    /// Reports `outcome` (once): counters, the dead letter of a final failure, the sender.
    fn resolve(mut self, outcome: Outcome) {
        self.permits = None;
        match &outcome {
            Outcome::Delivered => {
                self.metrics.forwarded.inc();
            }
            Outcome::Failed(f) => {
                self.metrics.failed.inc();
                if let (false, Some((recorder, msg))) = (f.retryable, &self.dead_letter) {
                    recorder.record(msg, &f.reason);
                }
            }
        };
        if let Some(ack) = self.ack.take() {
            let _ = ack.send(outcome);
        }
    }
}

/// What librdkafka calls back into: delivery reports, errors and logs.
pub struct Ctx {
    shared: Arc<Shared>,
}

/// The cluster's state that the callbacks and `/readyz` share.
struct Shared {
    name: String,
    /// True after a broker-wide error until a record is delivered again.
    down: AtomicBool,
    /// The last error librdkafka reported (for `/readyz`).
    last_error: Mutex<String>,
    /// The last refusal of the brokers' TLS or SASL (a certificate not trusted, a wrong
    /// password): kept until a record is delivered again, so `/readyz` names it rather than the
    /// "all brokers down" that follows it.
    refused: Mutex<Option<String>>,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let cluster = &self.shared.name;
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => warn!(%cluster, facility = fac, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                info!(%cluster, facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => debug!(%cluster, facility = fac, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let cluster = &self.shared.name;
        warn!(%cluster, %error, reason, "Kafka client error");
        if let Ok(mut last) = self.shared.last_error.lock() {
            *last = format!("{error}: {reason}");
        }
        match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL) => {
                if let Ok(mut refused) = self.shared.refused.lock() {
                    *refused = Some(reason.to_owned());
                }
                self.shared.down.store(true, Ordering::Relaxed);
            }
            Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::Fatal) => {
                self.shared.down.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        match result {
            Ok(_) => {
                if self.shared.down.swap(false, Ordering::Relaxed) {
                    if let Ok(mut refused) = self.shared.refused.lock() {
                        *refused = None;
                    }
                }
                pending.resolve(Outcome::Delivered);
            }
            Err((e, _)) => pending.resolve(Outcome::Failed(failure(e))),
        }
    }
}

/// What a librdkafka error means for the record: final when sending it again cannot help.
fn failure(e: &KafkaError) -> Failure {
    use RDKafkaErrorCode as C;
    let reason = format!("Kafka: {e}");
    match e.rdkafka_error_code() {
        Some(
            C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidRecord
            | C::InvalidTopic
            | C::UnknownTopic
            | C::UnknownTopicOrPartition
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::PolicyViolation
            | C::InvalidArgument,
        ) => Failure::fatal(reason),
        _ => Failure::retryable(reason),
    }
}

/// A running cluster: the producer (none for the route dry-run) and its budget.
pub struct Cluster {
    shared: Arc<Shared>,
    producer: Option<ThreadedProducer<Ctx>>,
    records: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("name", &self.shared.name).finish_non_exhaustive()
    }
}

/// The librdkafka properties of cluster `c`.
pub fn client_config(c: &KafkaClusterConfig) -> anyhow::Result<ClientConfig> {
    let mut cc = ClientConfig::new();
    cc.set("client.id", "mqgate");
    for (k, v) in &c.options {
        cc.set(k, v);
    }
    let kbytes = c.max_queued_bytes.0 / 1024 + 1024;
    cc.set("bootstrap.servers", c.bootstrap.value.join(","))
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", c.linger.0.as_millis().to_string())
        .set("compression.type", c.compression.as_str())
        .set("message.timeout.ms", c.delivery_timeout.0.as_millis().to_string())
        // librdkafka's own bounds sit above mqgate's, which are what holds.
        .set(
            "queue.buffering.max.messages",
            (c.queue.saturating_add(1024)).min(i32::MAX as usize).to_string(),
        )
        .set("queue.buffering.max.kbytes", kbytes.min(i32::MAX as u64).to_string());
    let protocol = match (c.sasl.is_some(), c.tls.is_some()) {
        (false, false) => "plaintext",
        (false, true) => "ssl",
        (true, false) => "sasl_plaintext",
        (true, true) => "sasl_ssl",
    };
    cc.set("security.protocol", protocol);
    if let Some(s) = &c.sasl {
        let password = crate::config::env::substitute_env(&s.password.value)?;
        cc.set("sasl.mechanisms", s.mechanism.value.as_str())
            .set("sasl.username", &s.username)
            .set("sasl.password", password);
    }
    if let Some(tls) = &c.tls {
        if let Some(ca) = &tls.ca {
            cc.set("ssl.ca.location", ca.value.display().to_string());
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            cc.set("ssl.certificate.location", cert.value.display().to_string())
                .set("ssl.key.location", key.value.display().to_string());
        }
    }
    cc.set_log_level(RDKafkaLogLevel::Warning);
    Ok(cc)
}

impl Cluster {
    /// Cluster `name`: with `connect`, its producer (librdkafka starts its threads and
    /// connects); without, only what the targets need to be built (the route dry-run).
    pub fn new(name: &str, c: &KafkaClusterConfig, connect: bool) -> anyhow::Result<Cluster> {
        use anyhow::Context;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            down: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            refused: Mutex::new(None),
        });
        let producer = if connect {
            let cc = client_config(c)?;
            let ctx = Ctx { shared: Arc::clone(&shared) };
            Some(
                cc.create_with_context::<_, ThreadedProducer<Ctx>>(ctx)
                    .with_context(|| format!("kafka.{name}: cannot create the producer"))?,
            )
        } else {
            None
        };
        let max_bytes = usize::try_from(c.max_queued_bytes.0).unwrap_or(usize::MAX).max(1);
        Ok(Cluster {
            shared,
            producer,
            records: Arc::new(Semaphore::new(c.queue.max(1))),
            bytes: Arc::new(Semaphore::new(max_bytes.min(Semaphore::MAX_PERMITS))),
            max_bytes: max_bytes.min(Semaphore::MAX_PERMITS),
        })
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The bytes `size` takes from the budget (a record larger than the whole budget takes all
    /// of it, so it waits for an empty queue instead of forever).
    fn weight(&self, size: usize) -> u32 {
        size.clamp(1, self.max_bytes).min(u32::MAX as usize) as u32
    }

    /// Hands `r` over when the budget has room; gives it back when not.
    pub fn try_send(&self, mut r: Record) -> Result<(), Record> {
        let Ok(one) = Arc::clone(&self.records).try_acquire_owned() else { return Err(r) };
        let Ok(bytes) = Arc::clone(&self.bytes).try_acquire_many_owned(self.weight(r.size)) else {
            return Err(r);
        };
        r.pending.permits = Some((one, bytes));
        match self.produce(r) {
            Ok(()) => Ok(()),
            Err(mut r) => {
                r.pending.permits = None;
                Err(r)
            }
        }
    }

    /// Hands `r` over, waiting for room in the budget (the slow path).
    pub async fn send(self: Arc<Self>, mut r: Record) {
        let (Ok(one), Ok(bytes)) = (
            Arc::clone(&self.records).acquire_owned().await,
            Arc::clone(&self.bytes).acquire_many_owned(self.weight(r.size)).await,
        ) else {
            r.pending.resolve(Outcome::Failed(Failure::retryable("the Kafka producer is closed")));
            return;
        };
        r.pending.permits = Some((one, bytes));
        // librdkafka's own queue bounds sit above the budget, so it is not full in practice;
        // should it be, wait a little and try again.
        loop {
            match self.produce(r) {
                Ok(()) => return,
                Err(back) => {
                    r = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    /// Gives `r` to librdkafka. A record it cannot take for good (too large, a name it
    /// refuses) is reported at once; a full queue gives the record back.
    fn produce(&self, r: Record) -> Result<(), Record> {
        let Some(producer) = &self.producer else {
            r.pending
                .resolve(Outcome::Failed(Failure::retryable("the Kafka producer is not running")));
            return Ok(());
        };
        let Record { topic, key, payload, headers, size, pending } = r;
        let mut record = BaseRecord::<str, [u8], Box<Pending>>::with_opaque_to(&topic, pending)
            .payload(&payload[..])
            .headers(headers);
        if let Some(k) = &key {
            record = record.key(k.as_str());
        }
        match producer.send(record) {
            Ok(()) => Ok(()),
            Err((e, record)) => {
                let headers = record.headers.unwrap_or_default();
                let pending = record.delivery_opaque;
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) {
                    return Err(Record { topic, key, payload, headers, size, pending });
                }
                pending.resolve(Outcome::Failed(failure(&e)));
                Ok(())
            }
        }
    }

    /// Waits up to `timeout` for every record handed over to be reported (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Some(p) = &self.producer {
            if let Err(e) = p.flush(timeout) {
                warn!(cluster = %self.shared.name, error = %e, "Kafka records still unacknowledged at shutdown");
            }
        }
    }
}

impl Health for Cluster {
    fn name(&self) -> String {
        format!("kafka {}", self.shared.name)
    }

    fn state(&self) -> Result<String, String> {
        if self.shared.down.load(Ordering::Relaxed) {
            let refused = self.shared.refused.lock().ok().and_then(|r| r.clone());
            let last = refused.unwrap_or_else(|| {
                self.shared.last_error.lock().map(|l| l.clone()).unwrap_or_default()
            });
            Err(format!("disconnected ({last})"))
        } else {
            Ok("up".into())
        }
    }
}
