//! The MQTT accept loops: one per listener (`listeners::bind`), all under one connection cap,
//! and waiting for the sessions to finish on shutdown. A plain-TCP listener is accepted from
//! by the idle pool's thread (the direct handshake, `session/direct.rs`); the others spawn
//! one session task per client. A connection's errors end in its own task (or in the direct
//! handshake), never here.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::idle::{Accept, IdlePool};
use super::session::{self, Resting, SessionShared};
use crate::listeners::{self, Listener};

/// How long, beyond `shutdown_timeout` (the sessions' own deadline for their in-flight
/// messages), shutdown waits for sessions to close before giving up on them.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Accepts connections on every listener until `shared.shutdown` is cancelled, then waits
/// (bounded) for every session to end: each finishes the QoS 1/2 PUBLISHes it has read
/// (outcome and acknowledgement) within `shutdown_timeout`, then closes. `max_connections`
/// counts the connections of all listeners together.
pub async fn run(listeners: Vec<Listener>, shared: Arc<SessionShared>, max_connections: usize) {
    let limit = Arc::new(ConnLimit {
        permits: Semaphore::new(max_connections),
        gauge: shared.metrics.connections.clone(),
    });
    let tasks = TaskTracker::new();
    // Quiet plain-TCP connections rest in the idle pool (`idle.rs`) instead of a task each.
    let resting = shared.metrics.connections_resting.clone();
    match IdlePool::start(tasks.clone(), Resting::resume, resting) {
        Ok(pool) => {
            if shared.idle.set(pool).is_err() {
                warn!("the MQTT listener was started twice: the first one's idle pool is kept");
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot start the idle connections' pool: quiet connections keep their tasks")
        }
    }
    let limits = &shared.limits;
    let rate =
        ConnectRate::new(limits.max_connect_rate_per_address, limits.connect_burst_per_address)
            .map(Arc::new);
    let rate = rate.as_ref();
    let loops = listeners.into_iter().map(|l| accept_loop(l, &shared, &limit, &tasks, rate));
    futures::future::join_all(loops).await;
    // Sessions wait for shutdown through their registry link, not on the token (an idle
    // session's future stores no waiter for it). One registering after this sees the token.
    shared.broker.close_connections();
    tasks.close();
    info!(sessions = tasks.len(), "MQTT listeners stopped; waiting for sessions to close");
    let deadline = shared.limits.shutdown_timeout + CLOSE_GRACE;
    if tokio::time::timeout(deadline, tasks.wait()).await.is_err() {
        warn!(sessions = tasks.len(), "sessions still open after {deadline:?}; leaving them");
    }
    // Told to close through their links, resting sessions were resumed and have ended (the
    // pool held the tracker while any rested); what still rests now is dropped.
    if let Some(pool) = shared.idle.get() {
        pool.close();
    }
}

/// A connection's place under `mqtt.max_connections` (and in `mqgate_connections`): taken at
/// accept, given back when its session ends. A resting session (`idle.rs`) keeps it.
/// One pointer: a resting session holds it.
#[derive(Debug)]
pub struct ConnSlot(Arc<ConnLimit>);

/// `mqtt.max_connections` and the `mqgate_connections` gauge.
#[derive(Debug)]
struct ConnLimit {
    permits: Semaphore,
    gauge: Gauge,
}

impl ConnSlot {
    /// A place, if one is free.
    fn take(limit: &Arc<ConnLimit>) -> Option<ConnSlot> {
        limit.permits.try_acquire().ok()?.forget();
        limit.gauge.inc();
        Some(ConnSlot(Arc::clone(limit)))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.gauge.dec();
        self.0.permits.add_permits(1);
    }
}

/// What every accepted connection goes through before its session, whichever thread
/// accepted it: the connect rate per address, the connection cap and the counters.
struct Admission {
    shared: Arc<SessionShared>,
    limit: Arc<ConnLimit>,
    /// `mqtt.max_connect_rate_per_address` (not behind a PROXY header: the address would be
    /// the proxy's).
    rate: Option<Arc<ConnectRate>>,
    accepted_total: Counter,
    rejected_rate: Counter,
    label: Arc<str>,
}

impl Admission {
    /// The connection's place, or `None` when it must be closed (rate, cap).
    fn admit(&self, peer: SocketAddr) -> Option<ConnSlot> {
        if self.rate.as_ref().is_some_and(|r| !r.allow(peer.ip())) {
            self.rejected_rate.inc();
            debug!(%peer, listener = %self.label, "connection closed: mqtt.max_connect_rate_per_address");
            return None;
        }
        let Some(slot) = ConnSlot::take(&self.limit) else {
            self.shared.metrics.connections_refused.inc();
            warn!(%peer, listener = %self.label, "connection refused: mqtt.max_connections reached");
            return None;
        };
        self.accepted_total.inc();
        self.shared.metrics.connections_total.inc();
        Some(slot)
    }
}

/// One listener's accept loop. A plain-TCP listener's socket goes to the idle pool's thread,
/// which accepts from it and answers each new connection's handshake there
/// (`session::start_direct`): a connection that is quiet after its CONNACK rests at once,
/// registered with one epoll set only, the pool's, and no worker of the runtime is woken for
/// it. Other listeners (TLS, WebSocket, PROXY protocol), or every listener without a pool,
/// accept here, one task per connection.
async fn accept_loop(
    listener: Listener,
    shared: &Arc<SessionShared>,
    limit: &Arc<ConnLimit>,
    tasks: &TaskTracker,
    rate: Option<&Arc<ConnectRate>>,
) {
    let Listener { tcp: socket, prelude } = listener;
    let admission = Arc::new(Admission {
        shared: Arc::clone(shared),
        limit: Arc::clone(limit),
        rate: rate.filter(|_| !prelude.proxy_protocol).cloned(),
        accepted_total: shared
            .metrics
            .listeners
            .accepted
            .get_or_create(&listeners::ListenerLabels { listener: prelude.label.to_string() })
            .clone(),
        rejected_rate: shared
            .metrics
            .connections_rejected
            .get_or_create(&crate::metrics::ReasonLabels { reason: "connect_rate".into() })
            .clone(),
        label: Arc::clone(&prelude.label),
    });
    if let (true, Some(pool)) = (prelude.is_direct(), shared.idle.get()) {
        let listening = socket.into_std().and_then(|std| {
            std.set_nonblocking(true)?;
            let tasks = tasks.clone();
            let admission = Arc::clone(&admission);
            let accept: Accept = Box::new(move |stream, peer| {
                let Some(slot) = admission.admit(peer) else { return };
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(%peer, error = %e, "set_nodelay failed");
                }
                session::start_direct(stream, peer, Arc::clone(&admission.shared), slot, &tasks);
            });
            pool.listen(mio::net::TcpListener::from_std(std), accept)
        });
        match listening {
            Ok(index) => {
                shared.shutdown.cancelled().await;
                pool.unlisten(index);
            }
            Err(e) => {
                error!(listener = %prelude.label, error = %e, "cannot accept on this listener");
            }
        }
        return;
    }
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            () = shared.shutdown.cancelled() => break,
            a = socket.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // Out of file descriptors and the like: wait, then go on accepting.
                error!(listener = %prelude.label, error = %e, "accept failed; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Some(slot) = admission.admit(peer) else { continue };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "set_nodelay failed");
        }
        let shared = Arc::clone(shared);
        if prelude.is_direct() {
            // The session's future is made here and moved in: made inside the task, the
            // socket and address it starts from would keep their own space in the task for
            // its whole life (see `session::run`).
            tasks.spawn(session::run(stream, peer, shared, slot));
        } else {
            tasks.spawn(listeners::serve(stream, peer, shared, Arc::clone(&prelude), slot));
        }
    }
}

/// Addresses tracked by the connect rate limit at most; beyond, refilled ones are forgotten.
const CONNECT_RATE_ADDRESSES: usize = 65_536;

/// `mqtt.max_connect_rate_per_address`: a token bucket per IP address, shared by every listener.
#[derive(Debug)]
struct ConnectRate {
    /// Connections per second.
    rate: f64,
    /// Bucket size.
    burst: f64,
    /// Tokens left and when they were counted, by address (bounded: `CONNECT_RATE_ADDRESSES`).
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl ConnectRate {
    /// `None` without a limit.
    fn new(rate: u32, burst: u32) -> Option<ConnectRate> {
        (rate > 0).then(|| ConnectRate {
            rate: f64::from(rate),
            burst: f64::from(if burst == 0 { rate } else { burst }),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `ip` may open a connection now (and counts it).
    fn allow(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else { return true };
        if buckets.len() >= CONNECT_RATE_ADDRESSES && !buckets.contains_key(&ip) {
            // Forget the addresses whose buckets are full again (they are as good as new).
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst
            });
            if buckets.len() >= CONNECT_RATE_ADDRESSES {
                // Every tracked address is busy: let this one through untracked rather than
                // grow the table.
                return true;
            }
        }
        let (tokens, at) = buckets.entry(ip).or_insert((self.burst, now));
        let refilled = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.rate)
            .min(self.burst);
        *at = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            true
        } else {
            *tokens = refilled;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_rate_allows_the_burst_then_the_rate_per_address() {
        let r = ConnectRate::new(10, 3).expect("limit");
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        assert!((0..3).all(|_| r.allow(a)), "the burst");
        assert!(!r.allow(a), "beyond the burst");
        assert!(r.allow(b), "another address has its own bucket");
        std::thread::sleep(Duration::from_millis(120));
        assert!(r.allow(a), "refilled at 10/s");
        assert!(ConnectRate::new(0, 5).is_none(), "0: no limit");
    }
}
