//! The AMQP side of the bench (lapin 4): topology, the consumer that every
//! gateway and direct run is measured on, and the direct publisher that
//! gives the ceiling.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use tokio::sync::watch;
use tokio::time::timeout;

use super::load::{self, Phase, PubJob, CONNECT_TIMEOUT, STALL_TIMEOUT};
use super::payload::Clock;
use super::stats::{PubStats, RecvStats, Tracker};

/// Unacknowledged deliveries the broker may push to the consumer.
const PREFETCH: u16 = 1000;
/// The consumer acks (multiple) after this many deliveries.
const ACK_EVERY: u64 = 250;

/// Connects to RabbitMQ.
pub async fn connect(url: &str) -> Result<Connection> {
    timeout(CONNECT_TIMEOUT, Connection::connect(url, ConnectionProperties::default()))
        .await
        .map_err(|_| anyhow!("connecting to AMQP {} timed out", redact(url)))?
        .with_context(|| format!("connect to AMQP {}", redact(url)))
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// Declares the bench's topic exchange (non-durable; deleted by
/// [`delete_exchange`] at the end).
pub async fn declare_exchange(conn: &Connection, exchange: &str) -> Result<()> {
    let ch = conn.create_channel().await.context("open AMQP channel")?;
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("declare exchange {exchange}"))?;
    let _ = ch.close(200, "ok".into()).await;
    Ok(())
}

/// Checks that an exchange exists without declaring it.
pub async fn check_exchange(conn: &Connection, exchange: &str) -> Result<()> {
    let ch = conn.create_channel().await.context("open AMQP channel")?;
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions { passive: true, ..ExchangeDeclareOptions::default() },
        FieldTable::default(),
    )
    .await
    .with_context(|| format!("exchange {exchange} does not exist"))?;
    let _ = ch.close(200, "ok".into()).await;
    Ok(())
}

pub async fn delete_exchange(conn: &Connection, exchange: &str) -> Result<()> {
    let ch = conn.create_channel().await.context("open AMQP channel")?;
    ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await
        .with_context(|| format!("delete exchange {exchange}"))?;
    let _ = ch.close(200, "ok".into()).await;
    Ok(())
}

/// A run's queue: server-named, exclusive to the control connection, bound
/// to the exchange with `binding`, consumed on its own channel.
pub struct BenchQueue {
    channel: Channel,
    name: ShortString,
}

impl BenchQueue {
    pub async fn declare(conn: &Connection, exchange: &str, binding: &str) -> Result<Self> {
        let channel = conn.create_channel().await.context("open AMQP channel")?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declare bench queue")?;
        let name = queue.name().clone();
        channel
            .queue_bind(
                name.clone(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("bind queue to {exchange} with {binding}"))?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await
            .context("set consumer prefetch")?;
        Ok(BenchQueue { channel, name })
    }

    /// Starts consuming; the returned future runs until every expected
    /// message arrived or `idle` passed without one.
    pub async fn consume(
        self,
        mut tracker: Tracker,
        clock: Clock,
        idle: Duration,
    ) -> Result<impl std::future::Future<Output = Result<RecvStats>>> {
        let mut consumer = self
            .channel
            .basic_consume(
                self.name.clone(),
                "mqgate-bench".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("start consumer")?;
        Ok(async move {
            let idle_ns = u64::try_from(idle.as_nanos()).unwrap_or(u64::MAX);
            let mut last = clock.now_ns();
            let idle_timer = tokio::time::sleep(idle);
            tokio::pin!(idle_timer);
            let mut unacked = 0u64;
            let mut last_tag = None;
            while !tracker.complete() {
                tokio::select! {
                    delivery = consumer.next() => {
                        let delivery = match delivery {
                            Some(Ok(d)) => d,
                            Some(Err(e)) => return Err(anyhow::Error::new(e).context("consume")),
                            None => bail!("consumer cancelled by the broker"),
                        };
                        last = clock.now_ns();
                        tracker.record(&delivery.data, last);
                        unacked += 1;
                        if unacked >= ACK_EVERY {
                            delivery
                                .acker
                                .ack(BasicAckOptions { multiple: true })
                                .await
                                .context("ack deliveries")?;
                            unacked = 0;
                            last_tag = None;
                        } else {
                            last_tag = Some(delivery.acker);
                        }
                    }
                    () = &mut idle_timer => {
                        let deadline = last.saturating_add(idle_ns);
                        if clock.now_ns() >= deadline {
                            break;
                        }
                        idle_timer.as_mut().reset(clock.instant_at(deadline).into());
                    }
                }
            }
            if let Some(acker) = last_tag {
                let _ = acker.ack(BasicAckOptions { multiple: true }).await;
            }
            // Nothing routed after this run may land in the next run's queue.
            let _ =
                self.channel.queue_delete(self.name.clone(), QueueDeleteOptions::default()).await;
            let _ = self.channel.close(200, "done".into()).await;
            Ok(tracker.finish())
        })
    }
}

/// A direct AMQP publisher, the ceiling for the gateway: its own connection
/// and channel, routing key `bench.<index>`. QoS 0 is a transient publish
/// (delivery mode 1) without confirms; QoS 1 a persistent publish (delivery
/// mode 2) on a confirm channel, pipelined with at most `job.window`
/// unconfirmed.
pub async fn direct_publisher(
    url: String,
    exchange: String,
    job: PubJob,
    ready: tokio::sync::mpsc::Sender<()>,
    mut phase: watch::Receiver<Phase>,
) -> Result<PubStats> {
    let conn = connect(&url).await?;
    let channel = conn.create_channel().await.context("open AMQP channel")?;
    let qos1 = job.qos == 1;
    if qos1 {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("enable publisher confirms")?;
    }
    let props = BasicProperties::default().with_delivery_mode(if qos1 { 2 } else { 1 });
    let exchange: ShortString = exchange.into();
    let routing_key: ShortString = format!("bench.{}", job.index).into();
    let _ = ready.send(()).await;
    let start_ns = load::wait_go(&mut phase).await?;

    // Each in-flight future is one publish: written, then (QoS 1) confirmed.
    // The futures borrow the channel: cloning a lapin `Channel` per message
    // costs more than the publish.
    let mut inflight = FuturesUnordered::new();
    let mut stats = PubStats::default();
    for k in 0..job.count {
        let seq = job.seq(k);
        if let Some(due) = job.due_ns(seq, start_ns) {
            // Keep the in-flight publishes moving while waiting.
            let sleep = tokio::time::sleep_until(job.clock.instant_at(due).into());
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    biased;
                    () = &mut sleep => break,
                    Some(r) = inflight.next(), if !inflight.is_empty() => account(r, &mut stats)?,
                }
            }
        }
        while inflight.len() >= job.window {
            match timeout(STALL_TIMEOUT, inflight.next()).await {
                Ok(Some(r)) => account(r, &mut stats)?,
                Ok(None) => break,
                Err(_) => bail!("no publisher confirm for {STALL_TIMEOUT:?}"),
            }
        }
        let body = job.payload.build(seq, job.clock.now_ns());
        let (ch, ex, rk, props) = (&channel, exchange.clone(), routing_key.clone(), props.clone());
        let fut = async move {
            ch.basic_publish(ex, rk, BasicPublishOptions::default(), &body, props).await?.await
        };
        inflight.push(fut);
        stats.sent += 1;
    }
    loop {
        match timeout(STALL_TIMEOUT, inflight.next()).await {
            Ok(Some(r)) => account(r, &mut stats)?,
            Ok(None) => break,
            Err(_) => bail!("no publisher confirm for {STALL_TIMEOUT:?}"),
        }
    }
    stats.done_ns = job.clock.now_ns();
    load::wait_stop(&mut phase).await;
    let _ = timeout(Duration::from_secs(2), conn.close(200, "done".into())).await;
    Ok(stats)
}

/// Counts one finished publish.
fn account(r: lapin::Result<Confirmation>, stats: &mut PubStats) -> Result<()> {
    match r.context("publish")? {
        Confirmation::Ack(_) => stats.acked += 1,
        Confirmation::Nack(_) => stats.errors += 1,
        Confirmation::NotRequested => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_password() {
        assert_eq!(
            redact("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
