//! The direct handshake: a plain-TCP connection accepted by the idle pool's thread
//! (`mqtt/idle.rs`, `IdlePool::listen`: a non-blocking socket registered nowhere yet) is
//! answered there and, if it is quiet after its CONNACK, put to rest in the pool without ever
//! having had a task or a tokio registration: one `epoll_ctl`, and one thread that sleeps in
//! `epoll_wait` for new and resting connections alike, as Mosquitto's does.
//!
//! The CONNECT has usually arrived by the time its connection is accepted, and a fresh
//! socket's send buffer is empty, so one non-blocking `read` and one `write` do. The
//! handshake itself is the same code as every other connection's (`connect::admit`), polled
//! once in place: with nothing to wait for (no password to verify off-thread, no previous
//! connection of the client id to wait for, no cluster lock) it completes in that poll.
//! Whatever does not fit goes on as any connection does, in a task of its own:
//! - no CONNECT yet, or only part of one: the task reads the rest (what was read is kept);
//! - the handshake has to wait (argon2 off-thread, a takeover, a cluster claim): the
//!   handshake's future goes on in a task, which then runs the session;
//! - the CONNACK could not all be written, bytes came behind the CONNECT (a PUBLISH in the
//!   same segment), or a resumed session has deliveries queued or in flight: the session
//!   runs in a task at once, as it would have;
//! - a refused CONNECT gets its CONNACK written the same way, and the socket is closed.
//!
//! One owner of the socket at any time: the pool's thread until it hands the socket to the
//! pool's epoll set (`Resting::set_aside`) or to a task (registered with tokio first, then
//! read only by that task).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::connect::{self, Connected};
use super::rest::{Closed, Resting};
use super::{End, Session, SessionShared};
use crate::mqtt::codec::Packet;
use crate::mqtt::connection::Connection;
use crate::mqtt::listener::ConnSlot;

/// A boxed future, for the task a connection continues in.
type Boxed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Starts the session of a plain-TCP connection accepted outside tokio (non-blocking, not
/// registered anywhere): answered and set to rest here when it can be, else handed to a task
/// tracked by `tasks`.
pub(crate) fn start(
    socket: std::net::TcpStream,
    peer: SocketAddr,
    shared: Arc<SessionShared>,
    slot: ConnSlot,
    tasks: &TaskTracker,
) {
    let mut conn = super::new_connection(socket, &shared);
    let deadline = Instant::now() + shared.limits.connect_timeout;
    let connect = match conn.read_direct() {
        Ok(Some(0)) => return,
        Ok(Some(_)) => match conn.decode() {
            Ok(Some(Packet::Connect(c))) => Some(c),
            Ok(None) => None,
            Ok(Some(other)) => {
                shared.metrics.protocol_error("first_packet_not_connect");
                debug!(%peer, packet = other.name(), "first packet is not CONNECT");
                return;
            }
            Err(e) => {
                connect::refuse_undecodable(&mut conn, &shared, &e);
                let _ = conn.write_direct();
                return;
            }
        },
        Ok(None) => None,
        Err(e) => {
            debug!(%peer, error = %e, "connection closed before CONNECT completed");
            return;
        }
    };
    let Some(connect) = connect else {
        // Not there yet, or in pieces: a task reads the rest, what came is kept.
        match conn.map_stream(tokio::net::TcpStream::from_std) {
            Ok(conn) => {
                tasks.spawn(super::run_connection(conn, peer, shared, slot));
            }
            Err(e) => debug!(%peer, error = %e, "cannot register a connection's socket"),
        }
        return;
    };
    let handshake = async move {
        let connected = connect::admit(&mut conn, &shared, peer, connect, None, deadline).await;
        (conn, shared, connected)
    };
    let mut handshake = Box::pin(crate::auth::backoff::LOGIN_PEER.scope(peer.ip(), handshake));
    // Polled once here: a future re-registers its waker at every poll, so one that has to
    // wait goes on in a task as if it had started there.
    match handshake.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready((conn, shared, connected)) => {
            if let Some(task) = settle(conn, shared, peer, slot, connected) {
                tasks.spawn(task);
            }
        }
        Poll::Pending => {
            tasks.spawn(async move {
                let (conn, shared, connected) = handshake.await;
                if let Some(task) = settle(conn, shared, peer, slot, connected) {
                    task.await;
                }
            });
        }
    }
}

/// After the handshake: writes the answer, then rests the session, or returns the task to
/// run it in (`None`: rested or closed).
fn settle(
    mut conn: Connection<std::net::TcpStream>,
    shared: Arc<SessionShared>,
    peer: SocketAddr,
    slot: ConnSlot,
    connected: Option<Connected>,
) -> Option<Boxed> {
    let Some(connected) = connected else {
        // Refused: the CONNACK saying why (if any), then the socket is closed.
        let _ = conn.write_direct();
        return None;
    };
    let written = matches!(conn.write_direct(), Ok(true));
    let quiet = written
        && !conn.has_buffered_input()
        && connected.state.inflight.is_empty()
        && connected.state.subscriber.queue.is_empty();
    if let (true, Some(pool)) = (quiet, shared.idle.get()) {
        super::log_connected(&connected.client_id, peer, connected.version);
        let due = connected.keepalive.map(|k| std::time::Instant::now() + k);
        let max = conn.client_max_packet_size();
        let resting = Resting::connected(connected, max, Arc::clone(&shared), slot);
        resting.set_aside(pool, conn.into_stream(), due);
        return None;
    }
    Some(match conn.map_stream(tokio::net::TcpStream::from_std) {
        Ok(conn) => {
            let session = Session::new(conn, connected, shared, peer, slot, true);
            Box::pin(super::drive(session))
        }
        Err(e) => {
            // Not expected (tokio could not register the socket): the session is finished
            // (parked, its client id released, its will sent) as if the socket had failed.
            let conn = Connection::new(Closed, shared.limits.max_packet_size as usize);
            let session = Session::new(conn, connected, shared, peer, slot, false);
            Box::pin(session.finish(End::Io(e)))
        }
    })
}
