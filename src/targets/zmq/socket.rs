//! One ZeroMQ socket (`zmq.NAME`): a task owns the `zeromq` socket (PUB or PUSH, bound or
//! connected) and sends what its queue holds, two frames per message: the MQTT topic, then the
//! payload. The queue is bounded in messages (`sndhwm`) and bytes (`max_queued_bytes`); at the
//! bound a PUB socket drops (ZeroMQ's own PUB semantics; counted in
//! `mqgate_zmq_dropped_total`) and a PUSH socket makes publishers wait (ZeroMQ's PUSH blocks at
//! its high-water mark too).
//!
//! ZeroMQ confirms nothing: "delivered" here means handed to the socket. That is why only
//! `ack: receive` rules may send to it (checked at load).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zeromq::{Socket, SocketSend, ZmqMessage};

use super::config::{ZmqKind, ZmqSocketConfig};
use crate::metrics::TargetMetrics;
use crate::targets::kinds::Health;
use crate::targets::{AckSender, Failure, Outcome};

/// One message for the socket.
pub struct Out {
    /// The first frame: the MQTT topic.
    pub topic: Bytes,
    /// The second frame: the payload.
    pub payload: Bytes,
    /// The outcome sender (`ack: receive` rules do not wait for it; counted all the same).
    pub ack: Option<AckSender>,
    /// The target's counters.
    pub metrics: TargetMetrics,
    /// The message's share of `max_queued_bytes`, released once it is handed to the socket.
    bytes: Option<OwnedSemaphorePermit>,
}

impl Out {
    /// A message for the socket.
    pub fn new(
        topic: Bytes,
        payload: Bytes,
        ack: Option<AckSender>,
        metrics: TargetMetrics,
    ) -> Out {
        Out { topic, payload, ack, metrics, bytes: None }
    }

    fn resolve(mut self, outcome: Outcome) {
        self.bytes = None;
        match &outcome {
            Outcome::Delivered => {
                self.metrics.forwarded.inc();
            }
            Outcome::Failed(_) => {
                self.metrics.failed.inc();
            }
        }
        if let Some(ack) = self.ack.take() {
            let _ = ack.send(outcome);
        }
    }

    fn size(&self) -> u32 {
        u32::try_from(self.topic.len() + self.payload.len()).unwrap_or(u32::MAX).max(1)
    }
}

/// The handle targets send through.
#[derive(Clone)]
pub struct ZmqSocket {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Out>,
}

struct Shared {
    name: String,
    kind: ZmqKind,
    bytes: Arc<Semaphore>,
    max_bytes: u32,
    dropped: Counter,
    state: Mutex<Result<String, String>>,
    /// The queue's receiving end until the task takes it.
    rx: Mutex<Option<mpsc::Receiver<Out>>>,
}

impl std::fmt::Debug for ZmqSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqSocket").field("name", &self.shared.name).finish_non_exhaustive()
    }
}

impl ZmqSocket {
    /// Socket `name`'s handle and queue (no task yet: see [`ZmqSocket::start`]).
    pub fn new(name: &str, cfg: &ZmqSocketConfig, dropped: Counter) -> ZmqSocket {
        let (tx, rx) = mpsc::channel(cfg.sndhwm.max(1));
        let max_bytes = u32::try_from(cfg.max_queued_bytes.0).unwrap_or(u32::MAX).max(1);
        ZmqSocket {
            shared: Arc::new(Shared {
                name: name.to_owned(),
                kind: cfg.kind.value,
                bytes: Arc::new(Semaphore::new(max_bytes as usize)),
                max_bytes,
                dropped,
                state: Mutex::new(Err("not started".into())),
                rx: Mutex::new(Some(rx)),
            }),
            tx,
        }
    }

    /// The socket's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// PUB or PUSH.
    pub fn kind(&self) -> ZmqKind {
        self.shared.kind
    }

    /// Queues `out` when there is room; a full PUB socket drops it (counted), a full PUSH socket
    /// gives it back (the caller waits: [`ZmqSocket::send`]).
    pub fn try_send(&self, mut out: Out) -> Result<(), Out> {
        let weight = out.size().min(self.shared.max_bytes);
        let permit = Arc::clone(&self.shared.bytes).try_acquire_many_owned(weight).ok();
        let full = match permit {
            Some(p) => {
                out.bytes = Some(p);
                match self.tx.try_send(out) {
                    Ok(()) => return Ok(()),
                    Err(mpsc::error::TrySendError::Full(o)) => o,
                    Err(mpsc::error::TrySendError::Closed(o)) => {
                        o.resolve(Outcome::Failed(Failure::retryable(
                            "the ZeroMQ socket is closed",
                        )));
                        return Ok(());
                    }
                }
            }
            None => out,
        };
        match self.shared.kind {
            ZmqKind::Pub => {
                self.shared.dropped.inc();
                full.resolve(Outcome::Failed(Failure::retryable("ZeroMQ PUB queue full: dropped")));
                Ok(())
            }
            ZmqKind::Push => Err(full),
        }
    }

    /// Queues `out`, waiting for room (the slow path of a PUSH socket).
    pub async fn send(self, mut out: Out) {
        let weight = out.size().min(self.shared.max_bytes);
        match Arc::clone(&self.shared.bytes).acquire_many_owned(weight).await {
            Ok(p) => out.bytes = Some(p),
            Err(_) => {
                out.resolve(Outcome::Failed(Failure::retryable("the ZeroMQ socket is closed")));
                return;
            }
        }
        if let Err(mpsc::error::SendError(o)) = self.tx.send(out).await {
            o.resolve(Outcome::Failed(Failure::retryable("the ZeroMQ socket is closed")));
        }
    }

    /// Starts the socket's task (once): bind or connect, then send what the queue holds until
    /// `shutdown`.
    pub fn start(
        &self,
        cfg: &ZmqSocketConfig,
        shutdown: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let rx = self.shared.rx.lock().ok()?.take()?;
        let shared = Arc::clone(&self.shared);
        let (bind, connect) = (
            cfg.bind.as_ref().map(|b| b.value.clone()),
            cfg.connect.as_ref().map(|c| c.value.clone()),
        );
        Some(tokio::spawn(async move {
            match shared.kind {
                ZmqKind::Pub => {
                    run(zeromq::PubSocket::new(), &shared, bind, connect, rx, shutdown).await
                }
                ZmqKind::Push => {
                    run(zeromq::PushSocket::new(), &shared, bind, connect, rx, shutdown).await
                }
            }
        }))
    }
}

fn set_state(shared: &Shared, state: Result<String, String>) {
    if let Ok(mut s) = shared.state.lock() {
        *s = state;
    }
}

/// Messages taken from the queue at once.
const BATCH: usize = 256;

/// The socket task.
async fn run<S: Socket + SocketSend>(
    mut socket: S,
    shared: &Shared,
    bind: Option<String>,
    connect: Option<String>,
    mut rx: mpsc::Receiver<Out>,
    shutdown: CancellationToken,
) {
    let name = &shared.name;
    let mut delay = Duration::from_millis(100);
    // Bind or connect first, retrying (a port in use, a peer not up yet).
    loop {
        let result = match (&bind, &connect) {
            (Some(b), _) => socket.bind(b).await.map(|e| format!("bound {e}")),
            (None, Some(c)) => socket.connect(c).await.map(|()| format!("connected {c}")),
            (None, None) => return,
        };
        match result {
            Ok(state) => {
                info!(socket = %name, "ZeroMQ socket {state}");
                set_state(shared, Ok(state));
                break;
            }
            Err(e) => {
                warn!(socket = %name, error = %e, "ZeroMQ socket cannot bind or connect; retrying");
                set_state(shared, Err(format!("not bound or connected ({e})")));
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    // The queue is drained a batch at a time: one wake-up of this task per batch, and the
    // batch's share of the byte budget given back at once (the semaphore's release takes a
    // lock), once the batch is in the socket's hands.
    let mut batch: Vec<Out> = Vec::with_capacity(BATCH);
    'run: loop {
        let n = tokio::select! {
            biased;
            n = rx.recv_many(&mut batch, BATCH) => n,
            () = shutdown.cancelled() => break,
        };
        if n == 0 {
            break;
        }
        let mut budget: Option<OwnedSemaphorePermit> = None;
        let mut outs = batch.drain(..);
        while let Some(mut out) = outs.next() {
            if let Some(p) = out.bytes.take() {
                match &mut budget {
                    Some(b) => b.merge(p),
                    None => budget = Some(p),
                }
            }
            let frames = vec![std::mem::take(&mut out.topic), std::mem::take(&mut out.payload)];
            let msg = match ZmqMessage::try_from(frames) {
                Ok(m) => m,
                Err(_) => {
                    out.resolve(Outcome::Failed(Failure::fatal("empty ZeroMQ message")));
                    continue;
                }
            };
            // A PUSH socket waits here for a peer (the queue behind it fills: backpressure).
            let sent = tokio::select! {
                biased;
                r = socket.send(msg) => r,
                () = shutdown.cancelled() => {
                    out.resolve(Outcome::Failed(Failure::retryable("mqgate is shutting down")));
                    for rest in outs {
                        rest.resolve(Outcome::Failed(Failure::retryable("mqgate is shutting down")));
                    }
                    break 'run;
                }
            };
            match sent {
                Ok(()) => out.resolve(Outcome::Delivered),
                Err(e) => out.resolve(Outcome::Failed(Failure::retryable(format!("ZeroMQ: {e}")))),
            }
        }
    }
    // What is left is not sent: counted as failed.
    rx.close();
    while let Ok(out) = rx.try_recv() {
        out.resolve(Outcome::Failed(Failure::retryable("mqgate is shutting down")));
    }
}

impl Health for ZmqSocket {
    fn name(&self) -> String {
        format!("zmq {}", self.shared.name)
    }

    fn state(&self) -> Result<String, String> {
        self.shared.state.lock().map(|s| s.clone()).unwrap_or_else(|_| Err("poisoned".into()))
    }
}
