//! The connection supervisor of one broker: connect, publish while up, back off, reconnect.
//!
//! Owns the broker's request queue for the life of the sink. While there is no connection it
//! fails every request at once (retryable; QoS 0 counted as dropped) rather than holding it;
//! while there is one it hands the queue to `publisher::run`. It logs connects and losses with
//! the broker's name and host, never the URL (which holds the password). It does not publish.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::publisher::{self, Ended};
use super::transport::{self, ConnectError, Link, Uri};
use super::{reject_queued, PublishRequest, Shared};
use crate::config::AmqpBrokerConfig;

/// What the supervisor needs from the broker's config.
pub(crate) struct Settings {
    /// The AMQP URI (with credentials: never logged).
    url: String,
    /// TLS and the SASL mechanism.
    security: transport::Security,
    /// Confirm-mode channels to open.
    channels: usize,
    /// Bound on publishes in flight on the connection.
    max_unconfirmed: usize,
    /// Time allowed for connecting (TCP, AMQP handshake and opening the channels), and for a
    /// later channel reopen or exchange check.
    connect_timeout: Duration,
    /// First reconnect delay.
    reconnect_min: Duration,
    /// Longest reconnect delay.
    reconnect_max: Duration,
}

impl Settings {
    /// Takes the broker's settings from its config.
    pub(crate) fn from_config(cfg: &AmqpBrokerConfig) -> Settings {
        let reconnect_min = cfg.reconnect_min.0.max(Duration::from_millis(1));
        Settings {
            url: cfg.url.value.clone(),
            security: cfg.security(),
            channels: cfg.channels.max(1),
            max_unconfirmed: cfg.max_unconfirmed.max(1),
            connect_timeout: cfg.connect_timeout.0,
            reconnect_min,
            reconnect_max: cfg.reconnect_max.0.max(reconnect_min),
        }
    }
}

/// The task that owns one broker's connection.
pub(crate) struct Supervisor {
    /// State shared with the handles.
    shared: Arc<Shared>,
    /// From the config.
    settings: Settings,
    /// The request queue; the handles hold the sending side.
    rx: mpsc::Receiver<PublishRequest>,
    /// Cancelled when mqgate shuts down.
    shutdown: CancellationToken,
}

impl Supervisor {
    /// A supervisor that has not started yet.
    pub(crate) fn new(
        shared: Arc<Shared>,
        settings: Settings,
        rx: mpsc::Receiver<PublishRequest>,
        shutdown: CancellationToken,
    ) -> Supervisor {
        Supervisor { shared, settings, rx, shutdown }
    }

    /// Connects, publishes and reconnects until shutdown (or until every handle is dropped).
    pub(crate) async fn run(mut self) {
        let name = self.shared.name.clone();
        match self.settings.url.parse::<Uri>() {
            Ok(uri) => self.supervise(&name, uri).await,
            Err(e) => {
                // The error never quotes the URL (it holds the password).
                error!(broker = %name, error = %e,
                    "url is not a valid AMQP URI; every publish to it fails");
                self.while_disconnected(std::future::pending::<()>()).await;
            }
        }
        self.shared.set_connected(false);
        reject_queued(&self.shared, &mut self.rx);
    }

    /// The connect / publish / back off cycle.
    async fn supervise(&mut self, name: &str, uri: Uri) {
        // Where it connects, for the logs: host, port and vhost, without the credentials.
        let endpoint = format!("{}:{} (vhost {:?})", uri.host, uri.port, uri.vhost);
        let mut delay = self.settings.reconnect_min;
        let mut failures = 0u32;
        let security = self.settings.security.clone();
        loop {
            let attempt = connect(
                &uri,
                &security,
                name,
                self.settings.channels,
                self.settings.connect_timeout,
            );
            let Some(attempt) = self.while_disconnected(attempt).await else { return };
            match attempt {
                Ok(link) => {
                    delay = self.settings.reconnect_min;
                    failures = 0;
                    let Some(reason) = self.publish_on(link, name, &endpoint).await else { return };
                    let retry_in = delay;
                    warn!(broker = %name, %endpoint, %reason, ?retry_in, "AMQP connection lost");
                }
                Err(e) => {
                    failures += 1;
                    self.shared.set_last_error(Some(e.to_string()));
                    let retry_in = delay;
                    warn!(broker = %name, %endpoint, error = %e, failures, ?retry_in,
                        "could not connect to the AMQP broker");
                }
            }
            if self.while_disconnected(tokio::time::sleep(jitter(delay))).await.is_none() {
                return;
            }
            delay = (delay * 2).min(self.settings.reconnect_max);
        }
    }

    /// Publishes on `link` until it is lost (`Some(reason)`) or the sink shuts down (`None`).
    async fn publish_on(&mut self, link: Link, name: &str, endpoint: &str) -> Option<String> {
        self.shared.set_connected(true);
        self.shared.metrics.connects.inc();
        let channels = link.confirm_channels;
        let server = &link.server;
        info!(broker = %name, %endpoint, channels, %server, "connected to the AMQP broker");
        let Settings { max_unconfirmed, connect_timeout, .. } = self.settings;
        let shutdown = &self.shutdown;
        let ended = publisher::run(
            &self.shared,
            link,
            &mut self.rx,
            shutdown,
            max_unconfirmed,
            connect_timeout,
        )
        .await;
        self.shared.set_connected(false);
        match ended {
            Ended::Shutdown => None,
            Ended::Lost(reason) => Some(reason),
        }
    }

    /// Runs `fut` to completion while failing every request that arrives meanwhile (there is
    /// no connection to publish on). `None` when shutdown came first or every handle is gone.
    async fn while_disconnected<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => return None,
                out = &mut fut => return Some(out),
                req = self.rx.recv() => match req {
                    Some(req) => self.shared.fail_unavailable(req, || self.shared.not_connected()),
                    None => return None,
                },
            }
        }
    }
}

/// Opens the connection and its channels (`channels` in confirm mode, as many plain for QoS 0),
/// all within `timeout`.
async fn connect(
    uri: &Uri,
    security: &transport::Security,
    name: &str,
    channels: usize,
    timeout: Duration,
) -> Result<Link, ConnectError> {
    match tokio::time::timeout(timeout, transport::connect(uri, security, name, channels)).await {
        Ok(link) => link,
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}

/// `delay` give or take 10 %, so that many gateways do not reconnect in step.
fn jitter(delay: Duration) -> Duration {
    // A fresh RandomState is randomly keyed: enough randomness for a jitter, no extra crate.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(delay.as_nanos() as u64);
    let unit = (h.finish() % 10_001) as f64 / 10_000.0; // 0.0 ..= 1.0
    delay.mul_f64(0.9 + 0.2 * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let d = Duration::from_millis(1000);
        for _ in 0..1000 {
            let j = jitter(d);
            assert!(j >= Duration::from_millis(900) && j <= Duration::from_millis(1100), "{j:?}");
        }
    }
}
