//! One bridge: a single MQTT client connection to an upstream broker, on mqgate's own codec
//! (no second MQTT implementation), carrying both directions.
//!
//! Uplink: `- mqtt:` targets queue [`Outgoing`] messages (bounded in count and bytes); the task
//! publishes them in queue order, at most the upstream's Receive Maximum (and `max_inflight`)
//! unacknowledged, and reports each one's outcome when the upstream answers: PUBACK (QoS 1),
//! PUBCOMP (QoS 2), or at once for QoS 0 once written. An upstream error reason code is a
//! final failure carrying that code (MQTT 5 devices get it); a lost connection fails what was
//! in flight as retryable (the device resends; nothing acknowledged is lost), then the task
//! reconnects with backoff.
//!
//! Downlink: the bridge's sources subscribe (MQTT 5 No Local, so the upstream does not echo
//! what the bridge published) on a persistent upstream session; each upstream PUBLISH is
//! published into the broker tracked, like an AMQP delivery, and acknowledged upstream (in
//! order) only once MQTT has taken it locally (`broker::tracking`). A delivery that failed
//! locally is not acknowledged: the connection is closed and the upstream resends it.
//!
//! Loops: a message that came in from a bridge has the bridge's origin as client id
//! (`$bridge/NAME`), and the bridge's own targets never send it back. Against an MQTT 3.1.1
//! upstream, which has no No Local, the bridge drops a PUBLISH that matches one it sent itself
//! within the last seconds (topic and payload digest): the upstream's echo.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::{BridgeConfig, BridgeUrl, BridgeVersion};
use crate::broker::tracking::{Done, Fate, Mode, Summary, Tracker};
use crate::broker::Broker;
use crate::message::Message;
use crate::mqtt::codec::{
    Connect, Packet, Properties, ProtocolVersion, PubResponse, Publish, PublishProperties, QoS,
    ReasonCode, Subscribe, SubscribeFilter, SubscriptionOptions,
};
use crate::mqtt::connection::Connection;
use crate::targets::{AckSender, Failure, Outcome};
use crate::template::Template;

/// What a bridge connection runs over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// How long a message the bridge published upstream is remembered to recognise its echo from
/// an MQTT 3.1.1 upstream.
const ECHO_WINDOW: Duration = Duration::from_secs(10);
/// At most this many remembered (oldest forgotten first).
const ECHO_MAX: usize = 65_536;

/// One message for the upstream.
#[derive(Debug)]
pub struct Outgoing {
    /// The upstream topic.
    pub topic: String,
    /// The message (payload and MQTT 5 properties are sent as they are).
    pub msg: Arc<Message>,
    /// The upstream QoS.
    pub qos: QoS,
    /// The upstream RETAIN flag.
    pub retain: bool,
    /// Where the outcome goes (`None`: nobody waits).
    pub ack: Option<AckSender>,
    /// The rule target's forwarded/failed counters.
    pub metrics: Option<crate::metrics::TargetMetrics>,
}

impl Outgoing {
    fn bytes(&self) -> u64 {
        (self.topic.len() + self.msg.payload.len()) as u64
    }
}

/// A source of the bridge: upstream filters whose messages are published locally.
#[derive(Debug, Clone)]
pub struct Downlink {
    /// The source's name (metrics, logs).
    pub name: String,
    /// Upstream filters to subscribe to.
    pub filters: Vec<String>,
    /// The subscription QoS.
    pub qos: QoS,
    /// The local topic: a template over the upstream message (`topic_name` ...); `None`: as is.
    pub topic: Option<Template>,
    /// Broadcast or work.
    pub mode: Mode,
}

/// Counters of one bridge.
#[derive(Debug, Clone, Default)]
pub struct BridgeMetrics {
    /// Messages the upstream took (PUBACK/PUBCOMP; QoS 0: written).
    pub published: Counter,
    /// Messages the upstream refused or that were in flight when the connection was lost.
    pub failed: Counter,
    /// QoS 0 messages dropped because the bridge's queue was full.
    pub dropped_full: Counter,
    /// Messages received from the upstream and taken locally.
    pub received: Counter,
    /// Upstream PUBLISHes recognised as the echo of our own (3.1.1 upstreams).
    pub echoes: Counter,
    /// Connections made (the first one and every reconnect).
    pub connects: Counter,
}

/// A cheap-to-clone handle on one bridge: its connections (`connections:`, default 1), each
/// with its own queue and task. A message goes to the connection of its upstream topic, so
/// the order per topic is kept.
#[derive(Clone)]
pub struct Bridge {
    links: Arc<[Arc<Shared>]>,
}

struct Shared {
    name: String,
    /// The client id of messages that came in through this bridge (`$bridge/NAME`).
    origin: Arc<str>,
    tx: mpsc::Sender<Outgoing>,
    /// Bytes queued in `tx` (topic and payload).
    queued_bytes: AtomicU64,
    max_bytes: u64,
    /// Signalled when queued bytes are released.
    room: Notify,
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
    metrics: BridgeMetrics,
    /// The task's receiver, until the task starts.
    rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
    /// The broker for the downlink, set before the task starts.
    broker: OnceLock<Arc<Broker>>,
    /// The bridge's sources, added by the MQTT source kind before the task starts.
    downlinks: Mutex<Vec<Downlink>>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge").field("name", &self.links[0].name).finish()
    }
}

impl Bridge {
    /// A bridge named `name`: its queues exist at once (targets can be built), its
    /// connections start with [`Bridge::start`].
    pub fn new(name: &str, cfg: &BridgeConfig, metrics: BridgeMetrics) -> Bridge {
        let origin: Arc<str> = Arc::from(origin_of(name));
        let links: Vec<Arc<Shared>> = (0..cfg.connections.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(cfg.queue.max(1));
                Arc::new(Shared {
                    name: name.to_owned(),
                    origin: Arc::clone(&origin),
                    tx,
                    queued_bytes: AtomicU64::new(0),
                    max_bytes: cfg.max_queued_bytes.0.max(1),
                    room: Notify::new(),
                    connected: AtomicBool::new(false),
                    last_error: Mutex::new(None),
                    metrics: metrics.clone(),
                    rx: Mutex::new(Some(rx)),
                    broker: OnceLock::new(),
                    downlinks: Mutex::new(Vec::new()),
                })
            })
            .collect();
        Bridge { links: links.into() }
    }

    /// The bridge's name.
    pub fn name(&self) -> &str {
        &self.links[0].name
    }

    /// The client id of the messages that came in through this bridge.
    pub fn origin(&self) -> &Arc<str> {
        &self.links[0].origin
    }

    /// Whether every upstream connection is up.
    pub fn is_connected(&self) -> bool {
        self.links.iter().all(|l| l.connected.load(Ordering::Relaxed))
    }

    /// Why a connection attempt or connection last failed.
    pub fn last_error(&self) -> Option<String> {
        self.links
            .iter()
            .find_map(|l| l.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Adds a source (upstream filters published locally) to the bridge, before it starts.
    pub fn add_downlink(&self, downlink: Downlink) {
        self.links[0].downlinks.lock().unwrap_or_else(|e| e.into_inner()).push(downlink);
    }

    /// Starts the connection tasks (once): uplink on every connection, the downlinks (into
    /// `broker`) on the first. Connection `i > 0` uses client id `CLIENT_ID-i`.
    pub fn start(
        &self,
        cfg: BridgeConfig,
        broker: Arc<Broker>,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let downlinks =
            std::mem::take(&mut *self.links[0].downlinks.lock().unwrap_or_else(|e| e.into_inner()));
        let mut tasks = Vec::new();
        for (i, link) in self.links.iter().enumerate() {
            let Some(rx) = link.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
                continue;
            };
            let _ = link.broker.set(Arc::clone(&broker));
            let mut cfg = cfg.clone();
            if i > 0 {
                cfg.client_id.value = format!("{}-{i}", cfg.client_id.value);
            }
            let downlinks = if i == 0 { downlinks.clone() } else { Vec::new() };
            let task = Task::new(Arc::clone(link), cfg, downlinks, rx, shutdown.clone());
            tasks.push(tokio::spawn(task.run()));
        }
        tasks
    }

    /// The connection of `topic`: always the same one (order per topic).
    fn link(&self, topic: &str) -> &Arc<Shared> {
        use std::hash::BuildHasher;
        if self.links.len() == 1 {
            return &self.links[0];
        }
        let h = foldhash::fast::FixedState::with_seed(0x6d71_6762).hash_one(topic);
        &self.links[(h % self.links.len() as u64) as usize]
    }

    fn admit(s: &Shared, out: &Outgoing) -> bool {
        let held = s.queued_bytes.load(Ordering::Relaxed);
        // One message larger than the whole budget still goes through an empty queue.
        held == 0 || held + out.bytes() <= s.max_bytes
    }

    /// Queues `out` if there is room, without waiting. A QoS 0 message that finds the queue
    /// full is dropped and counted; a QoS 1/2 one is handed back (then [`publish`]
    /// (Self::publish) waits for room: the backpressure).
    pub fn try_publish(&self, out: Outgoing) -> Result<(), Outgoing> {
        let s = self.link(&out.topic);
        if !Self::admit(s, &out) {
            return Self::full(s, out);
        }
        let bytes = out.bytes();
        s.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        match s.tx.try_send(out) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(out)) => {
                s.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                Self::full(s, out)
            }
            Err(mpsc::error::TrySendError::Closed(out)) => {
                s.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                fail(out.ack, Failure::retryable(format!("bridge {} is not running", s.name)));
                Ok(())
            }
        }
    }

    fn full(s: &Shared, out: Outgoing) -> Result<(), Outgoing> {
        if out.ack.is_some() {
            return Err(out);
        }
        s.metrics.dropped_full.inc();
        Ok(())
    }

    /// Queues `out`, waiting while the queue is full (count or bytes).
    pub async fn publish(&self, out: Outgoing) {
        let s = self.link(&out.topic);
        loop {
            let notified = s.room.notified();
            if Self::admit(s, &out) {
                break;
            }
            notified.await;
        }
        let bytes = out.bytes();
        s.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(out)) = s.tx.send(out).await {
            s.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            fail(out.ack, Failure::retryable(format!("bridge {} is not running", s.name)));
        }
    }
}

/// The client id of messages that came in through bridge `name`.
pub fn origin_of(name: &str) -> String {
    format!("$bridge/{name}")
}

fn fail(ack: Option<AckSender>, failure: Failure) {
    if let Some(ack) = ack {
        let _ = ack.send(Outcome::Failed(failure));
    }
}

/// A QoS 1/2 PUBLISH sent upstream, waiting for its acknowledgement.
struct InFlight {
    ack: Option<AckSender>,
    metrics: Option<crate::metrics::TargetMetrics>,
    qos: QoS,
    /// QoS 2: PUBREC received, PUBREL sent.
    released: bool,
}

/// An upstream PUBLISH handed to the broker, waiting for its local fate.
struct Incoming {
    packet_id: u16,
    qos: QoS,
    /// `None` until the tracker reports.
    summary: Option<Summary>,
}

/// Why a connection ended.
enum End {
    Shutdown,
    Lost(String),
}

struct Task {
    shared: Arc<Shared>,
    cfg: BridgeConfig,
    url: Result<BridgeUrl, String>,
    version: ProtocolVersion,
    downlinks: Vec<Downlink>,
    rx: mpsc::Receiver<Outgoing>,
    shutdown: CancellationToken,
    /// Packet ids in use by uplink PUBLISHes, in send order.
    inflight: HashMap<u16, InFlight>,
    order: VecDeque<u16>,
    next_id: u16,
    /// The upstream's Receive Maximum (and ours, `max_inflight`).
    window: usize,
    /// Downlink messages in arrival order, acknowledged from the front.
    incoming: VecDeque<Incoming>,
    /// Tracker token → index key: the upstream packet id.
    report_tx: mpsc::UnboundedSender<Done>,
    report_rx: mpsc::UnboundedReceiver<Done>,
    /// QoS 2 downlink ids PUBRECed and not yet released (kept across reconnects: a resent
    /// PUBLISH with one of them is not delivered twice).
    awaiting_rel: HashSet<u16>,
    /// Recently published (topic, payload) digests, to drop a 3.1.1 upstream's echo.
    echoes: VecDeque<(Instant, u64)>,
    echo_set: HashMap<u64, usize>,
}

impl Task {
    fn new(
        shared: Arc<Shared>,
        cfg: BridgeConfig,
        downlinks: Vec<Downlink>,
        rx: mpsc::Receiver<Outgoing>,
        shutdown: CancellationToken,
    ) -> Task {
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let version = match cfg.version {
            BridgeVersion::V5 => ProtocolVersion::V5,
            BridgeVersion::V311 => ProtocolVersion::V311,
        };
        Task {
            url: BridgeUrl::parse(&cfg.url.value),
            shared,
            version,
            cfg,
            downlinks,
            rx,
            shutdown,
            inflight: HashMap::new(),
            order: VecDeque::new(),
            next_id: 0,
            window: 1,
            incoming: VecDeque::new(),
            report_tx,
            report_rx,
            awaiting_rel: HashSet::new(),
            echoes: VecDeque::new(),
            echo_set: HashMap::new(),
        }
    }

    async fn run(mut self) {
        let min = self.cfg.reconnect_min.0.max(Duration::from_millis(10));
        let max = self.cfg.reconnect_max.0.max(min);
        let mut backoff = min;
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            let shutdown = self.shutdown.clone();
            let attempt = tokio::time::timeout(self.cfg.connect_timeout.0, self.connect());
            let end = match tokio::select! {
                r = attempt => r,
                () = shutdown.cancelled() => break,
            } {
                Ok(Ok((conn, connack))) => {
                    backoff = min;
                    self.shared.metrics.connects.inc();
                    self.shared.connected.store(true, Ordering::Relaxed);
                    *self.shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    let upstream_max = connack.properties.receive_maximum;
                    info!(bridge = %self.shared.name, session_present = connack.session_present, ?upstream_max, "bridge connected");
                    let end = self.session(conn, &connack).await;
                    self.shared.connected.store(false, Ordering::Relaxed);
                    self.lost();
                    end
                }
                Ok(Err(e)) => End::Lost(e),
                Err(_) => End::Lost("connect timed out".to_owned()),
            };
            match end {
                End::Shutdown => break,
                End::Lost(reason) => {
                    warn!(bridge = %self.shared.name, %reason, retry_in = ?backoff, "bridge disconnected");
                    *self.shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(reason);
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(max);
        }
        // What is still queued gets a retryable failure as its sender drops: never a success.
        self.rx.close();
        while let Ok(out) = self.rx.try_recv() {
            self.release(&out);
            fail(out.ack, Failure::retryable(format!("bridge {} stopped", self.shared.name)));
        }
    }

    /// TCP, TLS, WebSocket, then CONNECT/CONNACK.
    async fn connect(
        &mut self,
    ) -> Result<(Connection<Box<dyn Stream>>, crate::mqtt::codec::ConnAck), String> {
        let url = self.url.clone()?;
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| format!("connect to {}:{}: {e}", url.host, url.port))?;
        let _ = tcp.set_nodelay(true);
        let mut stream: Box<dyn Stream> = Box::new(tcp);
        if url.tls() {
            let tls = self.cfg.tls.clone().unwrap_or_default();
            let config = tls.client_config().map_err(|e| e.to_string())?;
            let name = tls.server_name(&url.host).map_err(|e| e.to_string())?;
            let connector = tokio_rustls::TlsConnector::from(config);
            let s = connector.connect(name, stream).await.map_err(|e| format!("TLS: {e}"))?;
            stream = Box::new(s);
        }
        if url.websocket() {
            let scheme = if url.tls() { "wss" } else { "ws" };
            let uri = format!("{scheme}://{}:{}{}", url.host, url.port, url.path);
            let mut request =
                tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                    uri.as_str(),
                )
                .map_err(|e| format!("WebSocket URL: {e}"))?;
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                tokio_tungstenite::tungstenite::http::HeaderValue::from_static("mqtt"),
            );
            let (ws, _) = tokio_tungstenite::client_async(request, stream)
                .await
                .map_err(|e| format!("WebSocket handshake: {e}"))?;
            stream = Box::new(crate::listeners::ws::WsStream::new(ws));
        }
        let mut conn = Connection::new(stream, self.cfg.max_packet_size as usize);
        conn.set_version(self.version, None);
        let password = match &self.cfg.password {
            Some(p) => Some(Bytes::from(
                crate::config::env::substitute_env(&p.value).map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        let mut properties = Properties::default();
        if self.version == ProtocolVersion::V5 {
            let expiry = self.cfg.session_expiry.0.as_secs().min(u64::from(u32::MAX)) as u32;
            properties.session_expiry_interval = (expiry > 0).then_some(expiry);
            properties.receive_maximum = Some(u16::MAX);
            properties.maximum_packet_size = Some(self.cfg.max_packet_size);
        }
        let connect = Connect {
            protocol: self.version,
            clean_start: self.cfg.clean_start,
            keep_alive: self.cfg.keepalive.0.as_secs().min(u64::from(u16::MAX)) as u16,
            client_id: self.cfg.client_id.value.clone(),
            will: None,
            username: self.cfg.username.clone(),
            password,
            properties,
        };
        conn.queue(&Packet::Connect(Box::new(connect))).map_err(|e| format!("CONNECT: {e}"))?;
        conn.flush().await.map_err(|e| format!("send CONNECT: {e}"))?;
        loop {
            if let Some(p) =
                conn.decode().map_err(|e| format!("upstream sent a bad packet: {e}"))?
            {
                return match p {
                    Packet::ConnAck(a) if a.code.is_success() => Ok((conn, *a)),
                    Packet::ConnAck(a) => {
                        Err(format!("upstream refused the connection: {:?}", a.code))
                    }
                    other => Err(format!("expected CONNACK, got {}", other.name())),
                };
            }
            if !conn.fill().await.map_err(|e| format!("read CONNACK: {e}"))? {
                return Err("upstream closed the connection before CONNACK".to_owned());
            }
        }
    }

    /// Runs one connection until it ends.
    async fn session(
        &mut self,
        mut conn: Connection<Box<dyn Stream>>,
        connack: &crate::mqtt::codec::ConnAck,
    ) -> End {
        let upstream_max = connack.properties.receive_maximum.unwrap_or(u16::MAX);
        self.window = usize::from(self.cfg.max_inflight.min(upstream_max).max(1));
        if !connack.session_present {
            // A new upstream session has none of our QoS 2 ids.
            self.awaiting_rel.clear();
        }
        if let Err(e) = self.subscribe(&mut conn) {
            return End::Lost(e);
        }
        let keepalive = match connack.properties.server_keep_alive {
            Some(k) => Duration::from_secs(u64::from(k)),
            None => self.cfg.keepalive.0,
        };
        let mut last_read = Instant::now();
        let mut last_write = Instant::now();
        let mut ping_sent: Option<Instant> = None;
        let tick = if keepalive.is_zero() { Duration::from_secs(3600) } else { keepalive / 4 };
        let mut ticker = tokio::time::interval(tick.max(Duration::from_millis(100)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        enum Ev {
            Read(std::io::Result<bool>),
            Out(Option<Outgoing>),
            Report(Done),
            Tick,
            Shutdown,
        }
        loop {
            if conn.has_pending_writes() {
                if let Err(e) = conn.flush().await {
                    return End::Lost(format!("write: {e}"));
                }
                last_write = Instant::now();
            }
            let room = self.inflight.len() < self.window;
            let ev = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => Ev::Shutdown,
                r = conn.fill() => Ev::Read(r),
                Some(done) = self.report_rx.recv() => Ev::Report(done),
                out = self.rx.recv(), if room => Ev::Out(out),
                _ = ticker.tick() => Ev::Tick,
            };
            match ev {
                Ev::Shutdown => {
                    self.drain(&mut conn).await;
                    return End::Shutdown;
                }
                Ev::Read(Ok(true)) => {
                    last_read = Instant::now();
                    ping_sent = None;
                    loop {
                        match conn.decode() {
                            Ok(Some(p)) => {
                                if let Err(e) = self.on_packet(&mut conn, p) {
                                    return End::Lost(e);
                                }
                            }
                            Ok(None) => break,
                            Err(e) => return End::Lost(format!("upstream sent a bad packet: {e}")),
                        }
                    }
                }
                Ev::Read(Ok(false)) => return End::Lost("upstream closed the connection".into()),
                Ev::Read(Err(e)) => return End::Lost(format!("read: {e}")),
                Ev::Out(None) => {
                    self.drain(&mut conn).await;
                    return End::Shutdown;
                }
                Ev::Out(Some(out)) => {
                    if let Err(e) = self.send(&mut conn, out) {
                        return End::Lost(e);
                    }
                    // More of what is queued, as the window allows, in the same write.
                    while self.inflight.len() < self.window {
                        let Ok(out) = self.rx.try_recv() else { break };
                        if let Err(e) = self.send(&mut conn, out) {
                            return End::Lost(e);
                        }
                    }
                }
                Ev::Report(done) => {
                    if let Err(e) = self.on_report(&mut conn, done) {
                        return End::Lost(e);
                    }
                }
                Ev::Tick => {
                    if !keepalive.is_zero() {
                        if let Some(at) = ping_sent {
                            if at.elapsed() > keepalive {
                                return End::Lost("upstream did not answer PINGREQ".into());
                            }
                        } else if last_write.elapsed() >= keepalive * 3 / 4
                            || last_read.elapsed() >= keepalive
                        {
                            if let Err(e) = conn.queue(&Packet::PingReq) {
                                return End::Lost(format!("PINGREQ: {e}"));
                            }
                            ping_sent = Some(Instant::now());
                        }
                    }
                    self.forget_echoes();
                }
            }
        }
    }

    /// At shutdown: waits (briefly) for the outcomes of what is in flight, then DISCONNECT.
    async fn drain(&mut self, conn: &mut Connection<Box<dyn Stream>>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while !self.inflight.is_empty() {
            let _ = conn.flush().await;
            match tokio::time::timeout_at(deadline, conn.fill()).await {
                Ok(Ok(true)) => {}
                _ => break,
            }
            while let Ok(Some(p)) = conn.decode() {
                if self.on_packet(conn, p).is_err() {
                    break;
                }
            }
        }
        let disconnect = crate::mqtt::codec::Disconnect {
            code: ReasonCode::SUCCESS,
            properties: Properties::default(),
        };
        let _ = conn.queue(&Packet::Disconnect(Box::new(disconnect)));
        let _ = conn.flush().await;
    }

    fn subscribe(&mut self, conn: &mut Connection<Box<dyn Stream>>) -> Result<(), String> {
        let filters: Vec<SubscribeFilter> = self
            .downlinks
            .iter()
            .flat_map(|d| {
                d.filters.iter().map(|f| SubscribeFilter {
                    filter: f.clone(),
                    options: SubscriptionOptions {
                        qos: d.qos,
                        // The upstream does not send back what this connection published.
                        no_local: self.version == ProtocolVersion::V5,
                        retain_as_published: true,
                        ..SubscriptionOptions::default()
                    },
                })
            })
            .collect();
        if filters.is_empty() {
            return Ok(());
        }
        let packet_id = self.take_id().ok_or("no free packet id for SUBSCRIBE")?;
        let sub = Subscribe { packet_id, filters, properties: Properties::default() };
        conn.queue(&Packet::Subscribe(Box::new(sub))).map_err(|e| format!("SUBSCRIBE: {e}"))?;
        // Not an uplink message: only reserves the id until SUBACK.
        let reserved = InFlight { ack: None, metrics: None, qos: QoS::AtMostOnce, released: true };
        self.inflight.insert(packet_id, reserved);
        Ok(())
    }

    /// The next free packet id (1..=65535), or `None` if every id is in use.
    fn take_id(&mut self) -> Option<u16> {
        for _ in 0..u16::MAX {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_id) {
                return Some(self.next_id);
            }
        }
        None
    }

    fn release(&self, out: &Outgoing) {
        self.shared.queued_bytes.fetch_sub(out.bytes(), Ordering::Relaxed);
        self.shared.room.notify_waiters();
    }

    /// Publishes one queued message upstream.
    fn send(
        &mut self,
        conn: &mut Connection<Box<dyn Stream>>,
        out: Outgoing,
    ) -> Result<(), String> {
        self.release(&out);
        let packet_id = if out.qos == QoS::AtMostOnce {
            0
        } else {
            match self.take_id() {
                Some(id) => id,
                None => {
                    fail(out.ack, Failure::retryable("no free packet id upstream"));
                    return Ok(());
                }
            }
        };
        let properties = if self.version == ProtocolVersion::V5 {
            let mut p = out.msg.properties.clone();
            if !p.is_empty() {
                // Ours only: a topic alias, subscription ids are per connection.
                p.topic_alias = None;
                p.subscription_identifiers.clear();
            }
            p
        } else {
            PublishProperties::none()
        };
        let publish = Publish {
            dup: false,
            qos: out.qos,
            retain: out.retain,
            topic: out.topic,
            packet_id,
            properties,
            payload: out.msg.payload.clone(),
        };
        if self.version == ProtocolVersion::V311 && !self.downlinks.is_empty() {
            self.remember_echo(&publish.topic, &publish.payload);
        }
        if let Err(e) = conn.queue(&Packet::Publish(publish)) {
            // Too large for the upstream, say: final for this message.
            self.shared.metrics.failed.inc();
            if let Some(m) = &out.metrics {
                m.failed.inc();
            }
            fail(out.ack, Failure::fatal(format!("bridge {}: {e}", self.shared.name)));
            return Ok(());
        }
        if out.qos == QoS::AtMostOnce {
            self.shared.metrics.published.inc();
            if let Some(m) = &out.metrics {
                m.forwarded.inc();
            }
            if let Some(ack) = out.ack {
                let _ = ack.send(Outcome::Delivered);
            }
        } else {
            let f = InFlight { ack: out.ack, metrics: out.metrics, qos: out.qos, released: false };
            self.inflight.insert(packet_id, f);
            self.order.push_back(packet_id);
        }
        Ok(())
    }

    /// Resolves an uplink PUBLISH.
    fn settle(&mut self, packet_id: u16, code: ReasonCode, reason: Option<&str>) {
        let Some(f) = self.inflight.remove(&packet_id) else { return };
        if let Some(i) = self.order.iter().position(|id| *id == packet_id) {
            self.order.remove(i);
        }
        let outcome = if code.is_success() {
            self.shared.metrics.published.inc();
            if let Some(m) = &f.metrics {
                m.forwarded.inc();
            }
            Outcome::Delivered
        } else {
            self.shared.metrics.failed.inc();
            if let Some(m) = &f.metrics {
                m.failed.inc();
            }
            let text = match reason {
                Some(r) => format!("upstream {}: {code:?}: {r}", self.shared.name),
                None => format!("upstream {}: {code:?}", self.shared.name),
            };
            Outcome::Failed(Failure::with_code(text, code))
        };
        if let Some(ack) = f.ack {
            let _ = ack.send(outcome);
        }
    }

    fn on_packet(
        &mut self,
        conn: &mut Connection<Box<dyn Stream>>,
        p: Packet,
    ) -> Result<(), String> {
        match p {
            Packet::PubAck(r) => {
                if self.inflight.get(&r.packet_id).is_some_and(|f| f.qos == QoS::AtLeastOnce) {
                    self.settle(r.packet_id, r.code, r.properties.reason_string.as_deref());
                }
            }
            Packet::PubRec(r) => {
                let known =
                    self.inflight.get(&r.packet_id).is_some_and(|f| f.qos == QoS::ExactlyOnce);
                if known && !r.code.is_success() {
                    self.settle(r.packet_id, r.code, r.properties.reason_string.as_deref());
                } else if known {
                    if let Some(f) = self.inflight.get_mut(&r.packet_id) {
                        f.released = true;
                    }
                    conn.queue(&Packet::PubRel(PubResponse::success(r.packet_id)))
                        .map_err(|e| format!("PUBREL: {e}"))?;
                } else {
                    // Not ours (any more): release it so the upstream can free the id.
                    let mut rel = PubResponse::success(r.packet_id);
                    if self.version == ProtocolVersion::V5 {
                        rel.code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                    }
                    conn.queue(&Packet::PubRel(rel)).map_err(|e| format!("PUBREL: {e}"))?;
                }
            }
            Packet::PubComp(r) => {
                if self
                    .inflight
                    .get(&r.packet_id)
                    .is_some_and(|f| f.qos == QoS::ExactlyOnce && f.released)
                {
                    self.settle(r.packet_id, ReasonCode::SUCCESS, None);
                }
            }
            Packet::SubAck(a) => {
                self.inflight.remove(&a.packet_id);
                for (code, filter) in
                    a.codes.iter().zip(self.downlinks.iter().flat_map(|d| d.filters.iter()))
                {
                    if !code.is_success() {
                        warn!(bridge = %self.shared.name, %filter, ?code, "upstream refused a bridge subscription");
                    }
                }
            }
            Packet::Publish(p) => self.on_publish(conn, p)?,
            Packet::PubRel(r) => {
                let known = self.awaiting_rel.remove(&r.packet_id);
                let mut comp = PubResponse::success(r.packet_id);
                if !known && self.version == ProtocolVersion::V5 {
                    comp.code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
                }
                conn.queue(&Packet::PubComp(comp)).map_err(|e| format!("PUBCOMP: {e}"))?;
            }
            Packet::PingResp => {}
            Packet::Disconnect(d) => {
                return Err(format!(
                    "upstream sent DISCONNECT {:?}{}",
                    d.code,
                    d.properties
                        .reason_string
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                ));
            }
            other => return Err(format!("unexpected {} from the upstream", other.name())),
        }
        Ok(())
    }

    /// An upstream PUBLISH: into the broker, tracked; acknowledged once taken.
    fn on_publish(
        &mut self,
        conn: &mut Connection<Box<dyn Stream>>,
        p: Publish,
    ) -> Result<(), String> {
        if p.qos == QoS::ExactlyOnce && self.awaiting_rel.contains(&p.packet_id) {
            // A resend of one already taken: acknowledge again, do not deliver twice.
            conn.queue(&Packet::PubRec(PubResponse::success(p.packet_id)))
                .map_err(|e| format!("PUBREC: {e}"))?;
            return Ok(());
        }
        let echo = self.version == ProtocolVersion::V311 && self.is_echo(&p.topic, &p.payload);
        let Some(broker) = self.shared.broker.get().cloned() else { return Ok(()) };
        let downlink = self
            .downlinks
            .iter()
            .find(|d| d.filters.iter().any(|f| crate::mqtt::topic::matches(f, &p.topic)));
        let (Some(downlink), false) = (downlink, echo) else {
            if echo {
                self.shared.metrics.echoes.inc();
            }
            // Nothing local wants it (or it is our own echo): acknowledged, as a broker drops
            // a message nobody subscribed to.
            self.ack_now(conn, p.packet_id, p.qos)?;
            return Ok(());
        };
        let mut msg = Message {
            charge: Default::default(),
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            client_id: Arc::clone(&self.shared.origin),
            username: None,
            properties: p.properties,
            received: std::time::Instant::now(),
            packet_id: None,
        };
        if let Some(t) = &downlink.topic {
            let m = Arc::new(msg.clone());
            match t.render_for(&m, &mut None) {
                Ok(topic) if crate::mqtt::topic::validate_name(&topic).is_ok() => msg.topic = topic,
                Ok(topic) => {
                    warn!(bridge = %self.shared.name, source = %downlink.name, topic = %crate::logtext::LogText(&topic), "downlink topic is no valid topic name; dropped");
                    self.ack_now(conn, p.packet_id, msg.qos)?;
                    return Ok(());
                }
                Err(e) => {
                    warn!(bridge = %self.shared.name, source = %downlink.name, error = %e, "downlink topic template failed; dropped");
                    self.ack_now(conn, p.packet_id, msg.qos)?;
                    return Ok(());
                }
            }
        }
        let msg = Arc::new(msg);
        let mode = downlink.mode;
        if msg.qos == QoS::AtMostOnce {
            broker.publish(&msg, None, &mut crate::targets::Waits::new());
            self.shared.metrics.received.inc();
            return Ok(());
        }
        let root = Tracker::root(u64::from(p.packet_id), mode, self.report_tx.clone());
        self.incoming.push_back(Incoming { packet_id: p.packet_id, qos: msg.qos, summary: None });
        broker.publish_tracked(&msg, &root);
        root.finish(Fate::Gone);
        Ok(())
    }

    fn ack_now(
        &mut self,
        conn: &mut Connection<Box<dyn Stream>>,
        packet_id: u16,
        qos: QoS,
    ) -> Result<(), String> {
        match qos {
            QoS::AtMostOnce => Ok(()),
            _ if !self.incoming.is_empty() => {
                // Keep the order: behind what is still waiting.
                self.incoming.push_back(Incoming {
                    packet_id,
                    qos,
                    summary: Some(Summary::NoSubscriber),
                });
                self.ack_front(conn)
            }
            QoS::AtLeastOnce => conn
                .queue(&Packet::PubAck(PubResponse::success(packet_id)))
                .map_err(|e| format!("PUBACK: {e}")),
            QoS::ExactlyOnce => {
                self.awaiting_rel.insert(packet_id);
                conn.queue(&Packet::PubRec(PubResponse::success(packet_id)))
                    .map_err(|e| format!("PUBREC: {e}"))
            }
        }
    }

    /// A tracker's report: acknowledge upstream from the front, in arrival order.
    fn on_report(
        &mut self,
        conn: &mut Connection<Box<dyn Stream>>,
        done: Done,
    ) -> Result<(), String> {
        let id = u16::try_from(done.token).unwrap_or(0);
        if let Some(entry) =
            self.incoming.iter_mut().find(|i| i.packet_id == id && i.summary.is_none())
        {
            entry.summary = Some(done.summary);
        }
        self.ack_front(conn)
    }

    fn ack_front(&mut self, conn: &mut Connection<Box<dyn Stream>>) -> Result<(), String> {
        while let Some(front) = self.incoming.front() {
            let Some(summary) = front.summary else { break };
            let (packet_id, qos) = (front.packet_id, front.qos);
            self.incoming.pop_front();
            if matches!(summary, Summary::Failed | Summary::Returned) {
                // Not taken locally: the upstream keeps it and sends it again.
                return Err("a downlink message could not be delivered locally; reconnecting so the upstream resends it".into());
            }
            if summary == Summary::Taken {
                self.shared.metrics.received.inc();
            }
            match qos {
                QoS::AtLeastOnce => conn
                    .queue(&Packet::PubAck(PubResponse::success(packet_id)))
                    .map_err(|e| format!("PUBACK: {e}"))?,
                QoS::ExactlyOnce => {
                    self.awaiting_rel.insert(packet_id);
                    conn.queue(&Packet::PubRec(PubResponse::success(packet_id)))
                        .map_err(|e| format!("PUBREC: {e}"))?
                }
                QoS::AtMostOnce => {}
            }
        }
        Ok(())
    }

    /// The connection is gone: what was in flight upstream fails (retryable: the device
    /// resends); downlink messages not yet acknowledged will be resent by the upstream.
    fn lost(&mut self) {
        for (_, f) in self.inflight.drain() {
            if f.ack.is_some() {
                self.shared.metrics.failed.inc();
            }
            if let Some(m) = &f.metrics {
                m.failed.inc();
            }
            fail(
                f.ack,
                Failure::retryable(format!("connection to upstream {} lost", self.shared.name)),
            );
        }
        self.order.clear();
        self.incoming.clear();
        // Reports of the old connection's trackers are stale.
        while self.report_rx.try_recv().is_ok() {}
    }

    fn digest(topic: &str, payload: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(0x6d71_6765).hash_one((topic, payload))
    }

    fn remember_echo(&mut self, topic: &str, payload: &[u8]) {
        let d = Self::digest(topic, payload);
        self.echoes.push_back((Instant::now(), d));
        *self.echo_set.entry(d).or_default() += 1;
        if self.echoes.len() > ECHO_MAX {
            self.forget_one();
        }
    }

    fn is_echo(&mut self, topic: &str, payload: &[u8]) -> bool {
        self.forget_echoes();
        let d = Self::digest(topic, payload);
        match self.echo_set.get_mut(&d) {
            Some(n) if *n > 0 => {
                *n -= 1;
                if *n == 0 {
                    self.echo_set.remove(&d);
                }
                true
            }
            _ => false,
        }
    }

    fn forget_echoes(&mut self) {
        while self.echoes.front().is_some_and(|(at, _)| at.elapsed() > ECHO_WINDOW) {
            self.forget_one();
        }
    }

    fn forget_one(&mut self) {
        if let Some((_, d)) = self.echoes.pop_front() {
            if let Some(n) = self.echo_set.get_mut(&d) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.echo_set.remove(&d);
                }
            }
        }
    }
}

impl crate::targets::kinds::Health for Bridge {
    fn name(&self) -> String {
        format!("mqtt bridge {}", Bridge::name(self))
    }

    fn state(&self) -> Result<String, String> {
        match (self.is_connected(), self.last_error()) {
            (true, _) => Ok("connected".to_owned()),
            (false, Some(e)) => Err(format!("disconnected ({e})")),
            (false, None) => Err("connecting".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let u = BridgeUrl::parse("mqtts://broker.example.com:8883").expect("ok");
        assert_eq!(
            (u.host.as_str(), u.port, u.tls(), u.websocket()),
            ("broker.example.com", 8883, true, false)
        );
        let u = BridgeUrl::parse("ws://127.0.0.1:8080").expect("ok");
        assert_eq!((u.port, u.path.as_str(), u.websocket()), (8080, "/mqtt", true));
        let u = BridgeUrl::parse("mqtt://[::1]").expect("ok");
        assert_eq!((u.host.as_str(), u.port), ("::1", 1883));
        assert!(BridgeUrl::parse("http://x").is_err());
        assert!(BridgeUrl::parse("mqtt://user:pw@x").is_err());
        assert!(BridgeUrl::parse("mqtt://x/path").is_err());
    }
}
