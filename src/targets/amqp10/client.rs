//! One AMQP 1.0 broker: a cheap handle ([`Amqp10Broker`]) in front of one connection task and
//! one task per sender link (per target address).
//!
//! - The **connection task** owns the fe2o3-amqp connection and its one session: connects
//!   (TCP, TLS with the `tls:` rustls config, SASL PLAIN from the URL or ANONYMOUS, open,
//!   begin), attaches sender links when a link task asks, and reconnects with backoff. A
//!   session the broker ends (some brokers end it for a refused attach) is begun again on the
//!   same connection.
//! - A **link task** per address owns its queue (bounded in count and bytes), its `Sender`
//!   and a settle task: it sends each message unsettled (`send_batchable`: the transfer goes
//!   out as soon as the link has credit; waiting for credit is the backpressure, which fills
//!   this address's queue only), hands the delivery to the settle task (at most
//!   `max_unsettled` at once) and takes the next. The settle task reports outcomes in order:
//!   `accepted` is delivered; `rejected` a final failure with the broker's error (dead
//!   letter); `released`, `modified`, a lost link, session or connection, or no outcome
//!   within `outcome_timeout`, retryable.
//! - While the broker is not connected a request fails at once (retryable), as for the
//!   AMQP 0-9-1 sink: `ack: sink` tells the device, `ack: spool` keeps it and retries.
//!
//! A link with nothing queued or unsettled for `link_idle_timeout` detaches and ends its
//! task; at most `max_links` at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::delivery::DeliveryFut;
use fe2o3_amqp::link::{SendError, SenderAttachError};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::definitions::SenderSettleMode;
use fe2o3_amqp::types::definitions::{Error as AmqpError, ErrorCondition};
use fe2o3_amqp::types::messaging::Outcome as AmqpOutcome;
use fe2o3_amqp::types::primitives::Symbol;
use fe2o3_amqp::{Connection, Sender, Session};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::config::{Amqp10BrokerConfig, BrokerUrl};
use super::message::{amqp_message, Shape};
use crate::deadletters::Recorder;
use crate::message::Message;
use crate::metrics::TargetMetrics;
use crate::targets::{AckSender, Failure, Outcome};

/// One message for one address.
#[derive(Debug)]
pub struct Request {
    /// The target address (rendered).
    pub address: String,
    /// The message.
    pub msg: Arc<Message>,
    /// The target's header and property choices.
    pub shape: Arc<Shape>,
    /// `Some` when someone waits for the outcome (QoS 1/2, spool, replay).
    pub ack: Option<AckSender>,
    /// The rule target's forwarded/failed counters.
    pub metrics: TargetMetrics,
    /// Where a final failure is kept (a session's message with a store).
    pub dead_letter: Option<Arc<Recorder>>,
}

impl Request {
    fn bytes(&self) -> u64 {
        self.msg.payload.len() as u64
    }

    /// Reports the outcome: counts it, keeps a final failure as a dead letter.
    fn settle(self, outcome: Outcome) {
        match &outcome {
            Outcome::Delivered => {
                self.metrics.forwarded.inc();
            }
            Outcome::Failed(f) => {
                self.metrics.failed.inc();
                if let (Some(r), false) = (&self.dead_letter, f.retryable) {
                    r.record(&self.msg, &f.reason);
                }
            }
        }
        if let Some(ack) = self.ack {
            let _ = ack.send(outcome);
        }
    }

    fn fail(self, failure: Failure) {
        self.settle(Outcome::Failed(failure));
    }
}

/// Counters and gauges of one broker.
#[derive(Debug, Clone, Default)]
pub struct BrokerMetrics {
    /// Deliveries the broker accepted.
    pub accepted: Counter,
    /// Deliveries it rejected (final failures).
    pub rejected: Counter,
    /// Deliveries it released or modified (retryable failures).
    pub released: Counter,
    /// Requests failed without an outcome (not connected, link or connection lost, attach
    /// refused).
    pub failed: Counter,
    /// QoS 0 messages dropped because their address's queue was full.
    pub dropped_full: Counter,
    /// Connections made (the first and every reconnect).
    pub connects: Counter,
    /// 1 while connected.
    pub connected: Gauge,
    /// Sender links attached now.
    pub links: Gauge,
}

/// The limits of a broker's links, from its config.
#[derive(Debug, Clone)]
struct Limits {
    queue: usize,
    max_bytes: u64,
    max_unsettled: usize,
    max_links: usize,
    idle: Duration,
    attach_timeout: Duration,
    outcome_timeout: Duration,
}

/// A cheap-to-clone handle on one AMQP 1.0 broker.
#[derive(Clone)]
pub struct Amqp10Broker {
    shared: Arc<Shared>,
}

struct Shared {
    name: String,
    limits: Limits,
    /// The link queues by address.
    links: Mutex<HashMap<String, Arc<LinkQueue>>>,
    /// Attach requests to the connection task.
    attach_tx: mpsc::Sender<Attach>,
    /// Its receiver, until the connection task starts.
    attach_rx: Mutex<Option<mpsc::Receiver<Attach>>>,
    /// The session generation: bumped at every new session (link tasks re-attach).
    session: watch::Sender<u64>,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
    metrics: BrokerMetrics,
    /// The link tasks (awaited at shutdown before the connection closes).
    tasks: TaskTracker,
    /// Set once the connection task runs: only then are link tasks spawned.
    running: AtomicBool,
    shutdown: Mutex<CancellationToken>,
    /// Link names are unique per connection: a counter.
    next_link: AtomicU64,
}

/// One address's queue, shared by the handles and its link task.
struct LinkQueue {
    tx: mpsc::Sender<Request>,
    /// Bytes of the payloads in `tx` and the one waiting for credit.
    queued_bytes: AtomicU64,
    /// The bound of `queued_bytes` (`max_queued_bytes`).
    max_bytes: u64,
    /// Signalled when bytes are released.
    room: Notify,
}

/// A link task's request to the connection task.
struct Attach {
    address: String,
    reply: oneshot::Sender<Result<(u64, Sender), Failure>>,
}

impl std::fmt::Debug for Amqp10Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqp10Broker")
            .field("name", &self.shared.name)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Amqp10Broker {
    /// A handle on broker `name`; the connection starts with [`Amqp10Broker::start`] (never,
    /// for the route dry-run: its requests fail as not connected).
    pub fn new(name: &str, cfg: &Amqp10BrokerConfig, metrics: BrokerMetrics) -> Amqp10Broker {
        let (attach_tx, attach_rx) = mpsc::channel(64);
        let limits = Limits {
            queue: cfg.queue.max(1),
            max_bytes: cfg.max_queued_bytes.0.max(1),
            max_unsettled: cfg.max_unsettled.max(1),
            max_links: cfg.max_links.max(1),
            idle: cfg.link_idle_timeout.0.max(Duration::from_millis(10)),
            attach_timeout: cfg.connect_timeout.0,
            outcome_timeout: cfg.outcome_timeout.0.max(Duration::from_millis(1)),
        };
        metrics.connected.set(0);
        Amqp10Broker {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                limits,
                links: Mutex::new(HashMap::new()),
                attach_tx,
                attach_rx: Mutex::new(Some(attach_rx)),
                session: watch::channel(0).0,
                connected: AtomicBool::new(false),
                last_error: Mutex::new(None),
                metrics,
                tasks: TaskTracker::new(),
                running: AtomicBool::new(false),
                shutdown: Mutex::new(CancellationToken::new()),
                next_link: AtomicU64::new(0),
            }),
        }
    }

    /// The broker's key under `amqp10:`.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// True while the connection and its session are up.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    /// Why the last connection attempt or connection failed, while disconnected.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Starts the connection task (once); it ends after `shutdown`, once the link tasks
    /// have settled what they sent (bounded).
    pub fn start(
        &self,
        cfg: &Amqp10BrokerConfig,
        shutdown: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let rx = self.shared.attach_rx.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        *self.shared.shutdown.lock().unwrap_or_else(|e| e.into_inner()) = shutdown.clone();
        self.shared.running.store(true, Ordering::Release);
        let task = ConnTask { shared: Arc::clone(&self.shared), cfg: cfg.clone(), rx, shutdown };
        Some(tokio::spawn(task.run()))
    }

    /// Queues `req` if its address's queue has room, without waiting. A QoS 0 message that
    /// finds it full is dropped and counted; a QoS 1/2 one is handed back (then
    /// [`send`](Self::send) waits). A request that cannot succeed now fails at once.
    pub fn try_send(&self, req: Request) -> Result<(), Request> {
        let Some(req) = self.admit(req) else { return Ok(()) };
        let mut req = req;
        for _ in 0..2 {
            let link = match self.link(&req.address) {
                Ok(link) => link,
                Err(f) => {
                    self.shared.metrics.failed.inc();
                    req.fail(f);
                    return Ok(());
                }
            };
            if !admit_bytes(&link, &req) {
                return self.full(req);
            }
            let bytes = req.bytes();
            link.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
            match link.tx.try_send(req) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(r)) => {
                    link.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                    return self.full(r);
                }
                // The link task ended (idle) as we looked it up: a new one.
                Err(mpsc::error::TrySendError::Closed(r)) => {
                    link.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                    self.forget(&r.address, &link);
                    req = r;
                }
            }
        }
        self.fail_unavailable(req);
        Ok(())
    }

    /// Queues `req`, waiting while its address's queue is full (count or bytes).
    pub async fn send(&self, req: Request) {
        let Some(mut req) = self.admit(req) else { return };
        for _ in 0..2 {
            let link = match self.link(&req.address) {
                Ok(link) => link,
                Err(f) => {
                    self.shared.metrics.failed.inc();
                    req.fail(f);
                    return;
                }
            };
            loop {
                let notified = link.room.notified();
                if admit_bytes(&link, &req) {
                    break;
                }
                notified.await;
            }
            let bytes = req.bytes();
            link.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
            match link.tx.send(req).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(r)) => {
                    link.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                    self.forget(&r.address, &link);
                    req = r;
                }
            }
        }
        self.fail_unavailable(req);
    }

    /// The checks before queueing: fails (and consumes) a request that cannot succeed now.
    fn admit(&self, req: Request) -> Option<Request> {
        if !self.is_connected() {
            self.fail_unavailable(req);
            return None;
        }
        Some(req)
    }

    fn fail_unavailable(&self, req: Request) {
        self.shared.metrics.failed.inc();
        req.fail(Failure::retryable(format!(
            "AMQP 1.0 broker {} is not connected",
            self.shared.name
        )));
    }

    fn full(&self, req: Request) -> Result<(), Request> {
        if req.ack.is_some() {
            return Err(req);
        }
        self.shared.metrics.dropped_full.inc();
        req.metrics.failed.inc();
        Ok(())
    }

    /// The queue of `address`, its link task started if there is none.
    fn link(&self, address: &str) -> Result<Arc<LinkQueue>, Failure> {
        let s = &self.shared;
        let mut links = s.links.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(link) = links.get(address) {
            return Ok(Arc::clone(link));
        }
        if !s.running.load(Ordering::Acquire) {
            return Err(Failure::retryable(format!("AMQP 1.0 broker {} is not running", s.name)));
        }
        if links.len() >= s.limits.max_links {
            return Err(Failure::retryable(format!(
                "AMQP 1.0 broker {}: {} links open (max_links), none for {address:?}",
                s.name,
                links.len()
            )));
        }
        let (tx, rx) = mpsc::channel(s.limits.queue);
        let link = Arc::new(LinkQueue {
            tx,
            queued_bytes: AtomicU64::new(0),
            max_bytes: s.limits.max_bytes,
            room: Notify::new(),
        });
        links.insert(address.to_owned(), Arc::clone(&link));
        let task = LinkTask {
            shared: Arc::clone(s),
            address: address.to_owned(),
            queue: Arc::clone(&link),
            rx,
        };
        s.tasks.spawn(task.run());
        Ok(link)
    }

    /// Removes `link` from the map if it is still the one for `address`.
    fn forget(&self, address: &str, link: &Arc<LinkQueue>) {
        let mut links = self.shared.links.lock().unwrap_or_else(|e| e.into_inner());
        if links.get(address).is_some_and(|l| Arc::ptr_eq(l, link)) {
            links.remove(address);
        }
    }
}

fn admit_bytes(link: &LinkQueue, req: &Request) -> bool {
    let held = link.queued_bytes.load(Ordering::Relaxed);
    // One message larger than the whole budget still goes through an empty queue.
    held == 0 || held + req.bytes() <= link.max_bytes
}

impl crate::targets::kinds::Health for Amqp10Broker {
    fn name(&self) -> String {
        format!("amqp10 {}", self.shared.name)
    }

    fn state(&self) -> Result<String, String> {
        if self.is_connected() {
            Ok("connected".into())
        } else {
            match self.last_error() {
                Some(e) => Err(format!("disconnected ({e})")),
                None => Err("connecting".into()),
            }
        }
    }
}

impl Shared {
    fn set_connected(&self, up: bool) {
        self.connected.store(up, Ordering::Release);
        self.metrics.connected.set(i64::from(up));
        if up {
            *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    fn set_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    /// Tells the link tasks that their senders are gone (a new or a lost session).
    fn bump_session(&self) -> u64 {
        let mut now = 0;
        self.session.send_modify(|g| {
            *g += 1;
            now = *g;
        });
        now
    }

    fn shutdown(&self) -> CancellationToken {
        self.shutdown.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// How long the link tasks may take at shutdown to get the outcomes of what they sent.
const DRAIN: Duration = Duration::from_secs(3);

/// Why a connection ended.
enum End {
    Shutdown,
    Lost(String),
}

/// The task that owns the connection and its session.
struct ConnTask {
    shared: Arc<Shared>,
    cfg: Amqp10BrokerConfig,
    rx: mpsc::Receiver<Attach>,
    shutdown: CancellationToken,
}

impl ConnTask {
    async fn run(mut self) {
        let min = self.cfg.reconnect_min.0.max(Duration::from_millis(10));
        let max = self.cfg.reconnect_max.0.max(min);
        let mut backoff = min;
        let url = BrokerUrl::parse(&self.cfg.url.value);
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            let (name, cfg) = (self.shared.name.clone(), self.cfg.clone());
            let url = url.clone();
            let attempt = async move {
                let url = url?;
                tokio::time::timeout(cfg.connect_timeout.0, connect(&name, &cfg, &url))
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
            };
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    r = &mut attempt => break Some(r),
                    () = self.shutdown.cancelled() => break None,
                    Some(a) = self.rx.recv() => refuse(&self.shared, a),
                }
            };
            let end = match result {
                None => break,
                Some(Ok(mut conn)) => {
                    backoff = min;
                    self.shared.metrics.connects.inc();
                    let end = self.serve(&mut conn).await;
                    self.shared.set_connected(false);
                    self.shared.bump_session();
                    if let End::Shutdown = end {
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
                    }
                    end
                }
                Some(Err(e)) => End::Lost(e),
            };
            match end {
                End::Shutdown => break,
                End::Lost(reason) => {
                    warn!(broker = %self.shared.name, %reason, retry_in = ?backoff, "AMQP 1.0 broker disconnected");
                    self.shared.set_error(reason);
                }
            }
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = &mut sleep => break,
                    () = self.shutdown.cancelled() => break,
                    Some(a) = self.rx.recv() => refuse(&self.shared, a),
                }
            }
            backoff = (backoff * 2).min(max);
        }
        self.shared.running.store(false, Ordering::Release);
        self.shared.tasks.close();
        self.rx.close();
        while let Ok(a) = self.rx.try_recv() {
            refuse(&self.shared, a);
        }
        let _ = tokio::time::timeout(DRAIN, self.shared.tasks.wait()).await;
    }

    /// Runs sessions on `conn` until it ends: a session the broker ends is begun again.
    async fn serve(&mut self, conn: &mut ConnectionHandle<()>) -> End {
        loop {
            let begin = tokio::time::timeout(self.cfg.connect_timeout.0, Session::begin(conn));
            let mut session = match begin.await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return End::Lost(format!("begin session: {e}")),
                Err(_) => return End::Lost("begin session timed out".into()),
            };
            let generation = self.shared.bump_session();
            self.shared.set_connected(true);
            info!(broker = %self.shared.name, session = generation, "AMQP 1.0 broker connected");
            loop {
                tokio::select! {
                    biased;
                    () = self.shutdown.cancelled() => {
                        self.drain_links().await;
                        let _ = tokio::time::timeout(Duration::from_secs(1), session.end()).await;
                        return End::Shutdown;
                    }
                    r = conn.on_close() => {
                        return End::Lost(match r {
                            Ok(()) => "the broker closed the connection".to_owned(),
                            Err(e) => format!("connection closed: {e}"),
                        });
                    }
                    r = session.on_end() => {
                        if conn.is_closed() {
                            return End::Lost("the connection ended".into());
                        }
                        let why = match r {
                            Ok(()) => "ended by the broker".to_owned(),
                            Err(e) => e.to_string(),
                        };
                        warn!(broker = %self.shared.name, reason = %why, "AMQP 1.0 session ended; beginning another");
                        self.shared.set_connected(false);
                        break;
                    }
                    Some(a) = self.rx.recv() => self.attach(&mut session, generation, a).await,
                }
            }
        }
    }

    /// Attaches a sender link to `a.address` on `session` and hands it to the link task.
    async fn attach(&self, session: &mut SessionHandle<()>, generation: u64, a: Attach) {
        let n = self.shared.next_link.fetch_add(1, Ordering::Relaxed);
        let name = format!("mqgate-{}-{n}", self.shared.name);
        let attach = Sender::builder()
            .name(name)
            .target(a.address.as_str())
            .sender_settle_mode(SenderSettleMode::Unsettled)
            .attach(session);
        let result = match tokio::time::timeout(self.shared.limits.attach_timeout, attach).await {
            Ok(Ok(sender)) => Ok((generation, sender)),
            Ok(Err(e)) => Err(attach_failure(&self.shared.name, &a.address, e)),
            Err(_) => Err(Failure::retryable(format!(
                "AMQP 1.0 broker {}: attaching a link to {:?} timed out",
                self.shared.name, a.address
            ))),
        };
        if let Err(f) = &result {
            warn!(broker = %self.shared.name, address = %a.address, reason = %f.reason, "AMQP 1.0 link not attached");
        }
        let _ = a.reply.send(result);
    }

    /// At shutdown: lets the link tasks get the outcomes of what they sent (bounded).
    async fn drain_links(&mut self) {
        self.shared.running.store(false, Ordering::Release);
        self.shared.tasks.close();
        let wait = self.shared.tasks.wait();
        tokio::pin!(wait);
        let deadline = tokio::time::sleep(DRAIN);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut wait => break,
                () = &mut deadline => break,
                Some(a) = self.rx.recv() => refuse(&self.shared, a),
            }
        }
    }
}

/// Answers an attach request while there is no session.
fn refuse(shared: &Shared, a: Attach) {
    let why = format!("AMQP 1.0 broker {} is not connected", shared.name);
    let _ = a.reply.send(Err(Failure::retryable(why)));
}

/// TCP, TLS (`amqps://`, with the `tls:` rustls config), SASL and open (also the AMQP 1.0
/// sources' connection, `sources/amqp10.rs`).
pub(crate) async fn connect(
    name: &str,
    cfg: &Amqp10BrokerConfig,
    url: &BrokerUrl,
) -> Result<ConnectionHandle<()>, String> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("connect to {}:{}: {e}", url.host, url.port))?;
    let _ = tcp.set_nodelay(true);
    let container = cfg.container_id.clone().unwrap_or_else(|| format!("mqgate-{name}"));
    let profile = match &url.credentials {
        Some((username, password)) => {
            SaslProfile::Plain { username: username.clone(), password: password.clone() }
        }
        None => SaslProfile::Anonymous,
    };
    // The TLS stream is made here, so the builder is told "amqp": no AMQP TLS header exchange
    // (brokers expect TLS from the first byte on the amqps port).
    let builder = Connection::builder()
        .container_id(container)
        .hostname(url.host.as_str())
        .scheme("amqp")
        .sasl_profile(profile);
    let open = if url.tls {
        let tls = cfg.tls.clone().unwrap_or_default();
        let config = tls.client_config().map_err(|e| e.to_string())?;
        let server = tls.server_name(&url.host).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(server, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        builder.open_with_stream(stream).await
    } else {
        builder.open_with_stream(tcp).await
    };
    // Errors name the host, never the URL (it may carry the password).
    open.map_err(|e| format!("open the AMQP 1.0 connection to {}:{}: {e}", url.host, url.port))
}

/// A broker error as `condition: description`.
fn describe(e: &AmqpError) -> String {
    let condition = match &e.condition {
        ErrorCondition::AmqpError(c) => Symbol::from(c).0,
        ErrorCondition::ConnectionError(c) => Symbol::from(c).0,
        ErrorCondition::SessionError(c) => Symbol::from(c).0,
        ErrorCondition::LinkError(c) => Symbol::from(c).0,
        ErrorCondition::Custom(s) => s.0.clone(),
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    };
    match &e.description {
        Some(d) => format!("{condition}: {d}"),
        None => condition,
    }
}

/// A refused attach: final when the broker says the address cannot be used as is (it does
/// not exist, is not allowed, ...), retryable otherwise.
fn attach_failure(broker: &str, address: &str, e: SenderAttachError) -> Failure {
    use fe2o3_amqp::link::SessionStopReason;
    use fe2o3_amqp::types::definitions::AmqpError as Cond;
    // RabbitMQ 3.x ends the whole session for an address it cannot attach to.
    let err = match &e {
        SenderAttachError::RemoteClosedWithError(err)
        | SenderAttachError::SessionStopped(SessionStopReason::RemoteEndedWithError(err)) => err,
        other => {
            return Failure::retryable(format!(
                "AMQP 1.0 broker {broker}: no link to {address:?}: {other}"
            ))
        }
    };
    let reason =
        format!("AMQP 1.0 broker {broker} refused a link to {address:?}: {}", describe(err));
    match err.condition {
        ErrorCondition::AmqpError(
            Cond::NotFound
            | Cond::UnauthorizedAccess
            | Cond::NotAllowed
            | Cond::InvalidField
            | Cond::PreconditionFailed
            | Cond::ResourceDeleted
            | Cond::NotImplemented,
        ) => Failure::fatal(reason),
        _ => Failure::retryable(reason),
    }
}

/// A delivery sent and waiting for its outcome.
type Unsettled = (
    DeliveryFut<Result<AmqpOutcome, SendError>>,
    Request,
    tokio::sync::OwnedSemaphorePermit,
    tokio::time::Instant,
);

/// What the link task does next.
enum Next {
    Send(Request),
    Idle,
    Stop,
}

/// The task of one address: its queue, its sender, its settle task.
struct LinkTask {
    shared: Arc<Shared>,
    address: String,
    queue: Arc<LinkQueue>,
    rx: mpsc::Receiver<Request>,
}

impl LinkTask {
    async fn run(mut self) {
        let shutdown = self.shared.shutdown();
        let window = Arc::new(tokio::sync::Semaphore::new(self.shared.limits.max_unsettled));
        let (settle_tx, settle_rx) = mpsc::unbounded_channel::<Unsettled>();
        let settler = tokio::spawn(settle(Arc::clone(&self.shared), settle_rx));
        let mut session = self.shared.session.subscribe();
        let mut sender: Option<(u64, Sender)> = None;
        let mut retired = false;
        loop {
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => Next::Stop,
                r = tokio::time::timeout(self.shared.limits.idle, self.rx.recv()) => match r {
                    Ok(Some(req)) => Next::Send(req),
                    Ok(None) => Next::Stop,
                    Err(_) => Next::Idle,
                },
            };
            match next {
                Next::Send(req) => {
                    self.send(req, &mut sender, &mut session, &window, &settle_tx, &shutdown).await;
                }
                Next::Idle => {
                    let all_settled =
                        window.available_permits() == self.shared.limits.max_unsettled;
                    if all_settled && self.retire() {
                        retired = true;
                        break;
                    }
                }
                Next::Stop => break,
            }
        }
        if retired {
            // What slipped in between the lookup and the retirement is still sent.
            self.rx.close();
            while let Some(req) = self.rx.recv().await {
                self.send(req, &mut sender, &mut session, &window, &settle_tx, &shutdown).await;
            }
        } else {
            self.rx.close();
            let mut links = self.shared.links.lock().unwrap_or_else(|e| e.into_inner());
            if links.get(&self.address).is_some_and(|l| Arc::ptr_eq(l, &self.queue)) {
                links.remove(&self.address);
            }
            drop(links);
            while let Ok(req) = self.rx.try_recv() {
                self.release(&req);
                self.shared.metrics.failed.inc();
                let why = format!("AMQP 1.0 broker {} is stopping", self.shared.name);
                req.fail(Failure::retryable(why));
            }
        }
        drop(settle_tx);
        let _ = tokio::time::timeout(DRAIN, settler).await;
        if let Some((_, s)) = sender {
            self.shared.metrics.links.dec();
            let _ = tokio::time::timeout(Duration::from_secs(1), s.close()).await;
        }
    }

    /// Leaves the broker's map if nothing is queued (under the map's lock, so no handle finds
    /// this queue afterwards).
    fn retire(&self) -> bool {
        let mut links = self.shared.links.lock().unwrap_or_else(|e| e.into_inner());
        if !self.rx.is_empty() {
            return false;
        }
        if links.get(&self.address).is_some_and(|l| Arc::ptr_eq(l, &self.queue)) {
            links.remove(&self.address);
        }
        true
    }

    fn release(&self, req: &Request) {
        self.queue.queued_bytes.fetch_sub(req.bytes(), Ordering::Relaxed);
        self.queue.room.notify_waiters();
    }

    /// Sends `req` unsettled on the link (attaching it first if needed), waiting for credit
    /// and for room in the unsettled window; its outcome goes to the settle task.
    #[allow(clippy::too_many_arguments)]
    async fn send(
        &self,
        req: Request,
        sender: &mut Option<(u64, Sender)>,
        session: &mut watch::Receiver<u64>,
        window: &Arc<tokio::sync::Semaphore>,
        settle_tx: &mpsc::UnboundedSender<Unsettled>,
        shutdown: &CancellationToken,
    ) {
        let current = *session.borrow_and_update();
        if sender.as_ref().is_some_and(|(g, _)| *g != current) {
            // Its session is gone: so is the link.
            *sender = None;
            self.shared.metrics.links.dec();
        }
        if sender.is_none() {
            match self.attach().await {
                Ok(s) => {
                    *sender = Some(s);
                    self.shared.metrics.links.inc();
                }
                Err(f) => {
                    self.release(&req);
                    self.shared.metrics.failed.inc();
                    req.fail(f);
                    return;
                }
            }
        }
        let Some((_, link)) = sender.as_mut() else { return };
        let permit = tokio::select! {
            p = Arc::clone(window).acquire_owned() => p.ok(),
            () = shutdown.cancelled() => None,
        };
        let Some(permit) = permit else {
            self.release(&req);
            self.shared.metrics.failed.inc();
            req.fail(Failure::retryable(format!(
                "AMQP 1.0 broker {} is stopping",
                self.shared.name
            )));
            return;
        };
        let message = amqp_message(&req.msg, &req.shape);
        let sent = tokio::select! {
            r = link.send_batchable(message) => Some(r),
            _ = session.changed() => None,
            () = shutdown.cancelled() => None,
        };
        self.release(&req);
        match sent {
            Some(Ok(fut)) => {
                let deadline = tokio::time::Instant::now() + self.shared.limits.outcome_timeout;
                if let Err(mpsc::error::SendError((_, req, _, _))) =
                    settle_tx.send((fut, req, permit, deadline))
                {
                    self.shared.metrics.failed.inc();
                    req.fail(Failure::retryable("the AMQP 1.0 settle task ended"));
                }
            }
            Some(Err(SendError::MessageSizeExceeded(e))) => {
                self.shared.metrics.failed.inc();
                req.fail(Failure::fatal(format!("AMQP 1.0 link to {:?}: {e}", self.address)));
            }
            Some(Err(e)) => {
                *sender = None;
                self.shared.metrics.links.dec();
                self.shared.metrics.failed.inc();
                req.fail(Failure::retryable(format!(
                    "AMQP 1.0 link to {:?} lost: {e}",
                    self.address
                )));
            }
            None => {
                *sender = None;
                self.shared.metrics.links.dec();
                self.shared.metrics.failed.inc();
                req.fail(Failure::retryable(format!(
                    "AMQP 1.0 broker {}: the session ended while waiting for link credit",
                    self.shared.name
                )));
            }
        }
    }

    /// Asks the connection task for a sender link to this address.
    async fn attach(&self) -> Result<(u64, Sender), Failure> {
        let not_connected =
            || Failure::retryable(format!("AMQP 1.0 broker {} is not connected", self.shared.name));
        let (reply, rx) = oneshot::channel();
        let a = Attach { address: self.address.clone(), reply };
        self.shared.attach_tx.send(a).await.map_err(|_| not_connected())?;
        rx.await.unwrap_or_else(|_| Err(not_connected()))
    }
}

/// Reports the outcomes of one link's deliveries, in the order they were sent.
async fn settle(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Unsettled>) {
    let m = &shared.metrics;
    while let Some((fut, req, permit, deadline)) = rx.recv().await {
        let Ok(outcome) = tokio::time::timeout_at(deadline, fut).await else {
            drop(permit);
            m.failed.inc();
            req.fail(Failure::retryable(format!(
                "AMQP 1.0 broker {}: no outcome within {:?} (outcome_timeout)",
                shared.name, shared.limits.outcome_timeout
            )));
            continue;
        };
        drop(permit);
        match outcome {
            Ok(AmqpOutcome::Accepted(_)) => {
                m.accepted.inc();
                req.settle(Outcome::Delivered);
            }
            Ok(AmqpOutcome::Rejected(r)) => {
                m.rejected.inc();
                let why = r.error.as_ref().map_or_else(|| "no error given".to_owned(), describe);
                req.fail(Failure::fatal(format!(
                    "rejected by AMQP 1.0 broker {}: {why}",
                    shared.name
                )));
            }
            Ok(AmqpOutcome::Released(_)) => {
                m.released.inc();
                req.fail(Failure::retryable(format!(
                    "released by AMQP 1.0 broker {}",
                    shared.name
                )));
            }
            Ok(AmqpOutcome::Modified(x)) => {
                m.released.inc();
                req.fail(Failure::retryable(format!(
                    "modified by AMQP 1.0 broker {} (delivery failed: {}, undeliverable here: {})",
                    shared.name,
                    x.delivery_failed.unwrap_or(false),
                    x.undeliverable_here.unwrap_or(false)
                )));
            }
            #[allow(unreachable_patterns)]
            Ok(other) => {
                m.failed.inc();
                req.fail(Failure::retryable(format!(
                    "AMQP 1.0 broker {}: unexpected outcome {other:?}",
                    shared.name
                )));
            }
            Err(e) => {
                m.failed.inc();
                req.fail(Failure::retryable(format!(
                    "AMQP 1.0 broker {}: no outcome ({e})",
                    shared.name
                )));
            }
        }
    }
}
