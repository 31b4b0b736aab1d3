//! Resting connections: a quiet plain-TCP connection is set aside in a compact form until its
//! socket is readable, something wakes it (a delivery, being told to close, a reload) or its
//! keepalive runs out; then its session runs again in a task of its own.
//!
//! Why: a connection's task (the session future, ~900 bytes with tokio's header) and its
//! socket's tokio registration (256 bytes) were most of what an idle connection cost. A
//! resting connection holds neither: its socket is registered with this pool's own epoll
//! (kernel memory, not ours) and its state is one small allocation (the `T` the session
//! makes of itself, see `session/rest.rs`) that doubles as its waker.
//!
//! The pool's thread also accepts the connections of the listeners handed to it
//! ([`IdlePool::listen`]: plain TCP), handing each to the listener's `Accept` (the direct
//! handshake, `session/direct.rs`), so that a connection which is quiet after its CONNACK
//! goes from the listening socket to this epoll set without a task or a tokio registration.
//!
//! One thread per pool waits on the epoll set (`mio::Poll`) with a coarse tick
//! ([`TICK`]). Each resting item is a [`Slot`] in a slab, its key the epoll token. It is
//! resumed (taken out of the slab, its socket deregistered, the `resume` function's future
//! spawned on the runtime the pool was started from, tracked by the listener's
//! `TaskTracker`) when:
//! - its socket is readable (data, EOF or an error);
//! - its waker is woken: the session registered it with its delivery queue and its registry
//!   link before it could be resumed (`rest`'s `watch`);
//! - its deadline (keepalive) has passed, checked every tick.
//!
//! A busy session is not set aside after every packet: it rests only once it has been quiet
//! for a full tick (`epoch` moved on twice since its last event). The tick also re-polls the
//! quiet sessions that asked for it ([`IdlePool::recheck`]), so a session needs no timer of
//! its own to notice that it has been quiet.
//!
//! One owner of a socket at any time: the slot's lock is held while the item is being set
//! aside, so the thread cannot resume it (and so let a task use the socket) before its socket
//! and waker are registered; a resumed item is gone from the slab before its task starts.
//! While the pool holds any item it holds a token of the `TaskTracker`, so the listener's
//! shutdown waits for resting connections (told to close through their link, they are
//! resumed and end like any other).

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// The pool's tick: quiet sessions are re-polled and deadlines checked this often. A session
/// rests after one to two ticks of quiet; a keepalive is enforced up to a tick late.
pub const TICK: Duration = Duration::from_millis(500);

/// The epoll token of the pool's own waker.
const WAKE: Token = Token(usize::MAX);

/// Listening sockets' epoll tokens count down from here (slots count up from 0).
const LISTENERS: usize = usize::MAX - 1;

/// What a listener the pool accepts for does with each connection (non-blocking, registered
/// nowhere), on the pool's thread.
pub type Accept = Box<dyn FnMut(std::net::TcpStream, std::net::SocketAddr) + Send>;

/// A listening socket the pool's thread accepts from ([`IdlePool::listen`]).
struct Listening {
    socket: mio::net::TcpListener,
    accept: Accept,
    /// An accept failed (out of descriptors...): tried again at the next tick, as an
    /// edge-triggered socket says nothing more until a new connection comes.
    retry: bool,
    /// More connections are waiting than one batch ([`ACCEPT_BATCH`]) took: accepted again
    /// right after the resting connections' events, so a storm does not hold them up.
    more: bool,
}

/// Connections accepted in one go before the thread looks at its other events.
const ACCEPT_BATCH: usize = 512;

/// What the pool spawns to run a resumed item again.
pub type Resume<T> = fn(T, std::net::TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// A pool of resting connections (one thread, one epoll set). Closed when dropped.
pub struct IdlePool<T: Send + 'static> {
    inner: Arc<Inner<T>>,
}

impl<T: Send + 'static> std::fmt::Debug for IdlePool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdlePool").field("resting", &self.len()).finish()
    }
}

struct Inner<T: Send + 'static> {
    registry: Registry,
    waker: mio::Waker,
    state: Mutex<State<T>>,
    /// Slots whose waker was woken, for the thread to resume.
    woken: Mutex<Vec<Arc<Slot<T>>>>,
    /// Wakers of quiet sessions to poll again at the next tick.
    checks: Mutex<Vec<Waker>>,
    /// Ticks since the pool started.
    epoch: AtomicU8,
    closed: AtomicBool,
    handle: tokio::runtime::Handle,
    tracker: TaskTracker,
    resume: Resume<T>,
    /// Items resting, for the metrics.
    gauge: Gauge,
    /// Deadlines are kept as milliseconds since this.
    start: Instant,
    /// Listening sockets by token (`LISTENERS - index`), `None` once given back.
    listeners: Mutex<Vec<Option<Listening>>>,
}

struct State<T: Send + 'static> {
    /// Resting items by key (their epoll token).
    slots: Vec<Option<Arc<Slot<T>>>>,
    /// Free keys.
    free: Vec<u32>,
    /// Items resting.
    len: usize,
    /// Held while any item rests: shutdown waits for them.
    token: Option<TaskTrackerToken>,
}

/// One resting item: its socket and state, and its waker (the slot itself).
struct Slot<T: Send + 'static> {
    pool: Weak<Inner<T>>,
    key: u32,
    /// Already in `woken`.
    queued: AtomicBool,
    /// Milliseconds since the pool's start after which it is resumed anyway (`u64::MAX`:
    /// never).
    due_ms: u64,
    rest: Mutex<Option<(std::net::TcpStream, T)>>,
}

/// The bytes one resting item's allocation takes (its slot and the `Arc`'s two counts),
/// before the allocator rounds it up to a size class; for budget tests.
pub fn slot_bytes<T: Send + 'static>() -> usize {
    std::mem::size_of::<Slot<T>>() + 2 * std::mem::size_of::<usize>()
}

impl<T: Send + 'static> Wake for Slot<T> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(pool) = self.pool.upgrade() else { return };
        lock(&pool.woken).push(Arc::clone(self));
        if let Err(e) = pool.waker.wake() {
            warn!(error = %e, "cannot wake the idle connections' thread");
        }
    }
}

fn lock<X>(m: &Mutex<X>) -> MutexGuard<'_, X> {
    // Every critical section here leaves its data consistent: go on after a panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<T: Send + 'static> IdlePool<T> {
    /// Starts the pool's thread. Resumed items run on the current runtime, tracked by
    /// `tracker`.
    /// `gauge` counts the items resting.
    pub fn start(tracker: TaskTracker, resume: Resume<T>, gauge: Gauge) -> io::Result<IdlePool<T>> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let waker = mio::Waker::new(poll.registry(), WAKE)?;
        let inner = Arc::new(Inner {
            registry,
            waker,
            state: Mutex::new(State { slots: Vec::new(), free: Vec::new(), len: 0, token: None }),
            woken: Mutex::new(Vec::new()),
            checks: Mutex::new(Vec::new()),
            epoch: AtomicU8::new(0),
            closed: AtomicBool::new(false),
            handle: tokio::runtime::Handle::current(),
            tracker,
            resume,
            gauge,
            start: Instant::now(),
            listeners: Mutex::new(Vec::new()),
        });
        let thread = Arc::clone(&inner);
        std::thread::Builder::new().name("mqgate-idle".into()).spawn(move || thread.run(poll))?;
        Ok(IdlePool { inner })
    }

    /// Ticks since the pool started (wrapping).
    pub fn epoch(&self) -> u8 {
        self.inner.epoch.load(Ordering::Relaxed)
    }

    /// Wakes `waker` at the next tick (a quiet session checks then whether it may rest).
    pub fn recheck(&self, waker: &Waker) {
        lock(&self.inner.checks).push(waker.clone());
    }

    /// Items resting now.
    pub fn len(&self) -> usize {
        lock(&self.inner.state).len
    }

    /// Whether no item rests.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Accepts connections from `socket` on the pool's thread, handing each to `accept`
    /// there (inside the runtime the pool was started from, so it may spawn tasks): one
    /// thread waits for new connections and resting ones alike, as Mosquitto's does, and a
    /// connection that rests at once never wakes a worker of the runtime. Returns the
    /// listener's number for [`unlisten`](Self::unlisten).
    pub fn listen(&self, mut socket: mio::net::TcpListener, accept: Accept) -> io::Result<usize> {
        let mut listeners = lock(&self.inner.listeners);
        let index = listeners.len();
        self.inner.registry.register(&mut socket, Token(LISTENERS - index), Interest::READABLE)?;
        listeners.push(Some(Listening { socket, accept, retry: false, more: false }));
        Ok(index)
    }

    /// Stops accepting from listener `index` and closes its socket (shutdown).
    pub fn unlisten(&self, index: usize) {
        let taken = lock(&self.inner.listeners).get_mut(index).and_then(Option::take);
        if let Some(mut l) = taken {
            if let Err(e) = self.inner.registry.deregister(&mut l.socket) {
                debug!(error = %e, "cannot deregister a listening socket");
            }
        }
    }

    /// Sets `item` aside with its socket until the socket is readable, its waker is woken or
    /// `due` passes. `watch` gets the waker before anything can resume the item: it registers
    /// it wherever the item's other events come from, and returns `false` when one is already
    /// there (the item is then resumed at once). An item that cannot be set aside (the pool
    /// is closed, the socket cannot be registered) is resumed at once.
    pub fn rest(
        &self,
        socket: std::net::TcpStream,
        due: Option<Instant>,
        item: T,
        watch: impl FnOnce(&Waker) -> bool,
    ) {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            inner.spawn(socket, item);
            return;
        }
        let due_ms = due.map_or(u64::MAX, |d| {
            u64::try_from(d.saturating_duration_since(inner.start).as_millis()).unwrap_or(u64::MAX)
        });
        let fd = socket.as_raw_fd();
        let slot;
        let guard;
        {
            let mut state = lock(&inner.state);
            let key = match state.free.pop() {
                Some(key) => key,
                None => match u32::try_from(state.slots.len()) {
                    Ok(key) if key < u32::MAX => {
                        state.slots.push(None);
                        key
                    }
                    _ => {
                        drop(state);
                        inner.spawn(socket, item);
                        return;
                    }
                },
            };
            slot = Arc::new(Slot {
                pool: Arc::downgrade(inner),
                key,
                queued: AtomicBool::new(false),
                due_ms,
                rest: Mutex::new(Some((socket, item))),
            });
            // Held until the socket and the waker are registered: the thread takes the item
            // only after this.
            guard = lock(&slot.rest);
            state.slots[key as usize] = Some(Arc::clone(&slot));
            state.len += 1;
            inner.gauge.inc();
            if state.token.is_none() {
                state.token = Some(inner.tracker.token());
            }
        }
        let key = slot.key as usize;
        if let Err(e) = inner.registry.register(&mut SourceFd(&fd), Token(key), Interest::READABLE)
        {
            debug!(error = %e, "cannot register a resting connection's socket; resumed");
            drop(guard);
            inner.resume_key(key, Some(&slot));
            return;
        }
        let waker = Waker::from(Arc::clone(&slot));
        if !watch(&waker) {
            waker.wake_by_ref();
        }
        drop(guard);
    }

    /// Stops the thread; items still resting are dropped (their sockets closed).
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        if let Err(e) = self.inner.waker.wake() {
            warn!(error = %e, "cannot wake the idle connections' thread to stop it");
        }
    }
}

impl<T: Send + 'static> Drop for IdlePool<T> {
    fn drop(&mut self) {
        self.close();
    }
}

impl<T: Send + 'static> Inner<T> {
    /// The thread: waits for sockets, wakers and the tick; resumes what is due.
    fn run(self: Arc<Self>, mut poll: Poll) {
        // Accepted connections may spawn tasks and start timers (`IdlePool::listen`).
        let _runtime = self.handle.enter();
        let mut events = Events::with_capacity(1024);
        let mut next_tick = Instant::now() + TICK;
        let mut more = false;
        loop {
            let timeout = if more {
                Duration::ZERO
            } else {
                next_tick.saturating_duration_since(Instant::now())
            };
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!(error = %e, "idle connections: epoll failed; retrying");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            if self.closed.load(Ordering::Acquire) {
                break;
            }
            for event in &events {
                match event.token() {
                    WAKE => {}
                    // Slot keys are `u32`s: anything above is a listener.
                    Token(t) if t > u32::MAX as usize => self.accept(LISTENERS - t),
                    Token(key) => self.resume_key(key, None),
                }
            }
            if more {
                let pending: Vec<usize> = lock(&self.listeners)
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.as_ref().is_some_and(|l| l.more))
                    .map(|(i, _)| i)
                    .collect();
                for index in pending {
                    self.accept(index);
                }
            }
            more = lock(&self.listeners).iter().flatten().any(|l| l.more);
            let woken = std::mem::take(&mut *lock(&self.woken));
            for slot in woken {
                self.resume_key(slot.key as usize, Some(&slot));
            }
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.epoch.fetch_add(1, Ordering::Relaxed);
                let retry: Vec<usize> = lock(&self.listeners)
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.as_ref().is_some_and(|l| l.retry))
                    .map(|(i, _)| i)
                    .collect();
                for index in retry {
                    self.accept(index);
                }
                for waker in std::mem::take(&mut *lock(&self.checks)) {
                    waker.wake();
                }
                let now_ms =
                    u64::try_from(now.duration_since(self.start).as_millis()).unwrap_or(u64::MAX);
                let due: Vec<usize> = lock(&self.state)
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.as_ref().is_some_and(|s| s.due_ms <= now_ms))
                    .map(|(key, _)| key)
                    .collect();
                for key in due {
                    self.resume_key(key, None);
                }
            }
        }
        // Closed: what still rests is dropped here (sockets closed), whoever still holds a
        // slot's waker.
        let slots: Vec<Arc<Slot<T>>> = {
            let mut state = lock(&self.state);
            self.gauge.dec_by(i64::try_from(state.len).unwrap_or(0));
            state.len = 0;
            state.free.clear();
            state.slots.drain(..).flatten().collect()
        };
        for slot in slots {
            let taken = lock(&slot.rest).take();
            drop(taken);
        }
        lock(&self.state).token = None;
        lock(&self.listeners).clear();
        lock(&self.checks).clear();
        lock(&self.woken).clear();
    }

    /// Accepts the connections waiting on listener `index`, handing each to its `accept`:
    /// until the queue is empty (the socket is edge-triggered), or [`ACCEPT_BATCH`] of them
    /// (then `more` is set, and the thread comes back to it after its other events).
    fn accept(&self, index: usize) {
        let mut listeners = lock(&self.listeners);
        let Some(Some(l)) = listeners.get_mut(index) else { return };
        l.retry = false;
        l.more = true;
        for _ in 0..ACCEPT_BATCH {
            match l.socket.accept() {
                Ok((stream, peer)) => (l.accept)(std::net::TcpStream::from(stream), peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    l.more = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // Out of file descriptors and the like: again at the next tick.
                    warn!(error = %e, "accept failed; retrying in {TICK:?}");
                    l.retry = true;
                    l.more = false;
                    return;
                }
            }
        }
    }

    /// Resumes the item under `key` (only if it is `expected`, when given).
    fn resume_key(&self, key: usize, expected: Option<&Arc<Slot<T>>>) {
        let slot = {
            let mut state = lock(&self.state);
            let Some(entry) = state.slots.get_mut(key) else { return };
            match (entry.as_ref(), expected) {
                (Some(s), Some(e)) if !Arc::ptr_eq(s, e) => return,
                (None, _) => return,
                _ => {}
            }
            let Some(slot) = entry.take() else { return };
            if let Ok(key) = u32::try_from(key) {
                state.free.push(key);
            }
            state.len -= 1;
            self.gauge.dec();
            slot
        };
        let taken = lock(&slot.rest).take();
        if let Some((socket, item)) = taken {
            if let Err(e) = self.registry.deregister(&mut SourceFd(&socket.as_raw_fd())) {
                debug!(error = %e, "cannot deregister a resting connection's socket");
            }
            self.spawn(socket, item);
        }
        let mut state = lock(&self.state);
        if state.len == 0 {
            state.token = None;
        }
    }

    /// Runs `item` again in a task of its own.
    fn spawn(&self, socket: std::net::TcpStream, item: T) {
        let run = (self.resume)(item, socket);
        self.handle.spawn(self.tracker.track_future(run));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::AtomicUsize;

    /// What the test items report when resumed: their number.
    static RESUMED: Mutex<Vec<(u32, Instant)>> = Mutex::new(Vec::new());
    static NEXT: AtomicUsize = AtomicUsize::new(0);

    fn resume(item: u32, socket: std::net::TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(async move {
            lock(&RESUMED).push((item, Instant::now()));
            drop(socket);
        })
    }

    fn resumed(item: u32) -> Option<Instant> {
        lock(&RESUMED).iter().find(|(i, _)| *i == item).map(|(_, at)| *at)
    }

    async fn wait_for(item: u32, within: Duration) -> Option<Instant> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(at) = resumed(item) {
                return Some(at);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (b, _) = l.accept().expect("accept");
        b.set_nonblocking(true).expect("nonblocking");
        (a, b)
    }

    fn item() -> u32 {
        u32::try_from(NEXT.fetch_add(1, Ordering::Relaxed)).expect("few items")
    }

    /// Readable socket, waker, deadline: each resumes its item, once, and nothing else does;
    /// shutdown is held by the tracker token while items rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn resting_items_resume_on_data_wake_and_deadline_only() {
        let tracker = TaskTracker::new();
        let pool = IdlePool::start(tracker.clone(), resume, Gauge::default()).expect("pool");
        // Data.
        let (mut client, server) = pair();
        let by_data = item();
        pool.rest(server, None, by_data, |_| true);
        assert_eq!(pool.len(), 1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(resumed(by_data).is_none(), "resumed with nothing to read");
        tracker.close();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), tracker.wait()).await.is_err(),
            "a resting item holds the tracker"
        );
        client.write_all(b"x").expect("write");
        assert!(wait_for(by_data, Duration::from_secs(2)).await.is_some(), "data resumes");
        // Waker.
        let (_client, server) = pair();
        let by_wake = item();
        let saved: Arc<Mutex<Option<Waker>>> = Arc::default();
        let keep = Arc::clone(&saved);
        pool.rest(server, None, by_wake, move |w| {
            *lock(&keep) = Some(w.clone());
            true
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(resumed(by_wake).is_none());
        let waker = lock(&saved).take().expect("watch got the waker");
        waker.wake_by_ref();
        assert!(wait_for(by_wake, Duration::from_secs(2)).await.is_some(), "waker resumes");
        // A stale waker (its item already resumed) resumes nothing else.
        let (_client2, server) = pair();
        let other = item();
        pool.rest(server, None, other, |_| true);
        waker.wake();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(resumed(other).is_none(), "a stale waker resumed another item");
        // Something already there when watched: resumed at once.
        let (_client3, server) = pair();
        let at_once = item();
        pool.rest(server, None, at_once, |_| false);
        assert!(wait_for(at_once, Duration::from_secs(2)).await.is_some());
        // Deadline.
        let (_client4, server) = pair();
        let by_due = item();
        let start = Instant::now();
        pool.rest(server, Some(start + Duration::from_millis(300)), by_due, |_| true);
        let at = wait_for(by_due, Duration::from_secs(3)).await.expect("deadline resumes");
        let late = at.duration_since(start);
        assert!(late >= Duration::from_millis(300), "resumed before its deadline: {late:?}");
        assert!(late < Duration::from_millis(300) + TICK * 2, "resumed too late: {late:?}");
        // `other` still rests and holds the tracker; closing the pool drops it.
        assert_eq!(pool.len(), 1);
        drop(pool);
        assert!(tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await.is_ok());
    }

    /// A quiet session asks to be polled again at the next tick.
    #[tokio::test]
    async fn recheck_wakes_at_the_next_tick() {
        let pool =
            IdlePool::<u32>::start(TaskTracker::new(), resume, Gauge::default()).expect("pool");
        let e = pool.epoch();
        let woke = Arc::new(AtomicBool::new(false));
        struct Flag(Arc<AtomicBool>);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        pool.recheck(&Waker::from(Arc::new(Flag(Arc::clone(&woke)))));
        tokio::time::sleep(TICK * 2 + Duration::from_millis(100)).await;
        assert!(woke.load(Ordering::SeqCst), "not woken by the tick");
        assert!(pool.epoch().wrapping_sub(e) >= 1);
    }
}
