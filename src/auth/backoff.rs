//! Password checks under attack: a storm of wrong passwords must not make legitimate
//! (re)connects queue behind it for the two verification slots (`super::Authenticator`).
//!
//! - Per-address failure backoff: after `mqtt.login_failures_before_backoff` failed logins
//!   from one IP address, its further logins are refused at once (no argon2) for a time that
//!   doubles with each failure, up to `mqtt.login_backoff_max`.
//! - A bounded cache of recent successful checks (`mqtt.login_cache_size`, expiring after
//!   `mqtt.login_cache_ttl`): user name → keyed SHA-256 of the password; a reconnect with the
//!   same password skips argon2.
//!
//! - Single flight: logins with the same user name and password while one of them is being
//!   checked wait for that check's answer instead of running argon2 again (a fleet of one
//!   user reconnecting at once after a restart costs one check, not one per device). Only
//!   that exact password gets the answer; a shared failure still counts towards each
//!   follower's address backoff; at most `MAX_IN_FLIGHT` checks are shared at once; no lock is
//!   held while hashing (followers wait on a `watch` channel).
//! - Per-address turns: the logins of one address are checked one at a time, so one address
//!   holds at most one of the verification slots (and its backoff is checked after its
//!   previous attempt is known): a flood from one address waits behind itself, not others.
//!
//! Failures are counted by reason in `mqgate_login_failures_total`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::{Authenticator, Refusal};
use crate::metrics::{Metrics, ReasonLabels};

tokio::task_local! {
    /// The client's address during its CONNECT handshake (set by the session, read by
    /// [`LoginGuard::authenticate`]).
    pub static LOGIN_PEER: IpAddr;
}

/// Addresses with failures remembered at most; beyond, old ones are forgotten first, then
/// new ones are not tracked.
const MAX_TRACKED_ADDRESSES: usize = 65_536;
/// Checks of distinct users and passwords shared at most at once (a few MB of argon2 memory
/// each would be the bound long before; this one bounds the map).
const MAX_IN_FLIGHT: usize = 4096;
/// The first refusal period once an address reaches the failure threshold.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The settings (from `mqtt:`).
#[derive(Debug, Clone, Copy)]
pub struct LoginLimits {
    /// Failures from one address before backoff starts (0: never).
    pub failures_before_backoff: u32,
    /// Longest refusal period.
    pub backoff_max: Duration,
    /// Successful checks remembered (0: no cache).
    pub cache_size: usize,
    /// How long one is remembered.
    pub cache_ttl: Duration,
}

/// One address's failures.
#[derive(Debug)]
struct Failures {
    count: u32,
    /// Refused without a check until then (once at the threshold).
    until: Option<Instant>,
    /// The last failure (forgotten `backoff_max` after it).
    last: Instant,
}

/// A remembered successful check.
#[derive(Debug)]
struct Verified {
    digest: [u8; 32],
    expires: Instant,
}

/// Backoff and cache, shared by all sessions.
#[derive(Debug)]
pub struct LoginGuard {
    limits: LoginLimits,
    /// Mixed into every digest, so the cache holds no plain hash of any password.
    key: [u8; 32],
    failures: Mutex<HashMap<IpAddr, Failures>>,
    cache: Mutex<HashMap<String, Verified>>,
    /// Per address: whose turn it is to be checked (entries live while someone holds or
    /// waits for a turn).
    turns: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
    /// `login_failures{reason}` resolved once: bad_password, unknown_user, no_password,
    /// backoff, busy, not_authorized.
    counters: [Counter; 6],
    cache_hits: Counter,
    /// Checks in flight by digest of user and password (at most [`MAX_IN_FLIGHT`]): the
    /// logins that ask meanwhile wait for the answer instead of running argon2 again.
    in_flight: Mutex<HashMap<[u8; 32], watch::Receiver<Option<bool>>>>,
    /// Argon2 verifications run (`mqgate_password_checks_total`).
    password_checks: Counter,
    /// Bumped by a config reload ([`LoginGuard::forget_verified`], under the cache's lock): a
    /// check begun before it is neither cached nor shared with a login begun after it.
    epoch: std::sync::atomic::AtomicU64,
}

const REASONS: [&str; 6] =
    ["bad_password", "unknown_user", "no_password", "backoff", "busy", "not_authorized"];

impl LoginGuard {
    /// A guard with `limits`, counting into `metrics`.
    pub fn new(limits: LoginLimits, metrics: &Metrics) -> LoginGuard {
        let mut key = [0u8; 32];
        // The TLS library's CSPRNG (as for client ids); a failure leaves a fixed key, which
        // still works (the digest is only compared, never shown).
        let _ = rustls::crypto::aws_lc_rs::default_provider().secure_random.fill(&mut key);
        LoginGuard {
            limits,
            key,
            failures: Mutex::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            counters: REASONS.map(|r| {
                metrics.login_failures.get_or_create(&ReasonLabels { reason: r.into() }).clone()
            }),
            cache_hits: metrics.login_cache_hits.clone(),
            in_flight: Mutex::new(HashMap::new()),
            password_checks: metrics.password_checks.clone(),
            epoch: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Checks CONNECT credentials as [`Authenticator::authenticate`] does, with the client's
    /// address's backoff first, then the cache of recent successes, then a check of the same
    /// user and password already in flight, before argon2. A refusal for backoff is
    /// [`Refusal::Busy`] (0x89 / return code 3: retry later).
    pub async fn authenticate(
        &self,
        auth: &Authenticator,
        username: Option<&str>,
        password: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<(), Refusal> {
        let Some(user) = username else {
            let result = auth.authenticate(None, password, deadline).await;
            if let Err(r) = result {
                self.count(r, None, password.is_some());
            }
            return result;
        };
        let peer = LOGIN_PEER.try_with(|p| *p).ok();
        let now = Instant::now();
        if let Some(ip) = peer {
            if self.in_backoff(ip, now) {
                self.counters[3].inc();
                return Err(Refusal::Busy);
            }
        }
        // Read before the cache: what this login learns counts only under these `users:`.
        let epoch = self.epoch.load(std::sync::atomic::Ordering::Acquire);
        let digest = password.map(|p| self.digest(user, p));
        if let Some(digest) = &digest {
            if self.cached(user, digest, now) {
                self.cache_hits.inc();
                return Ok(());
            }
        }
        // The same user and password being checked already: its answer is ours (a success
        // for the same password, or a failure that counts against this address too).
        let mut flight = None;
        if let Some(digest) = digest {
            loop {
                match self.join_flight(flight_key(digest, epoch)) {
                    Flight::Lead(lead) => {
                        flight = Some(lead);
                        break;
                    }
                    Flight::Unshared => break,
                    Flight::Follow(mut answer) => {
                        let shared =
                            tokio::time::timeout_at(deadline, answer.wait_for(Option::is_some))
                                .await
                                .map(|r| r.ok().and_then(|v| *v));
                        let verified = match shared {
                            Err(_) => {
                                self.counters[4].inc();
                                return Err(Refusal::Busy);
                            }
                            // The first login went without an answer (gone, or busy): try again.
                            Ok(None) => continue,
                            Ok(Some(verified)) => verified,
                        };
                        let result = if verified { Ok(()) } else { Err(Refusal::BadCredentials) };
                        self.settle(auth, user, peer, password.is_some(), result);
                        return result;
                    }
                }
            }
        }
        // One check at a time per address; then its backoff again (its previous attempt may
        // have just failed).
        let mut turn = peer.and_then(|ip| self.turn_slot(ip));
        if let Some(t) = &mut turn {
            match tokio::time::timeout_at(deadline, Arc::clone(&t.sem).acquire_owned()).await {
                Ok(Ok(permit)) => t.permit = Some(permit),
                _ => {
                    self.counters[4].inc();
                    return Err(Refusal::Busy);
                }
            }
        }
        if let Some(ip) = peer {
            if self.in_backoff(ip, Instant::now()) {
                self.counters[3].inc();
                return Err(Refusal::Busy);
            }
        }
        let result = auth.authenticate(Some(user), password, deadline).await;
        // `Busy` from the authenticator: no verification slot, no hash checked.
        if result != Err(Refusal::Busy) {
            self.password_checks.inc();
        }
        if let (Ok(()), Some(digest)) = (result, digest) {
            self.remember(user, digest, epoch);
        }
        self.settle(auth, user, peer, password.is_some(), result);
        if let Some(lead) = flight {
            lead.answer(result);
        }
        result
    }

    /// The bookkeeping of a login's answer: a success clears its address's failures; a
    /// failure is counted and, for bad credentials, counts towards the address's backoff.
    fn settle(
        &self,
        auth: &Authenticator,
        user: &str,
        peer: Option<IpAddr>,
        has_password: bool,
        result: Result<(), Refusal>,
    ) {
        match result {
            Ok(()) => {
                if let Some(ip) = peer {
                    if let Ok(mut failures) = self.failures.lock() {
                        failures.remove(&ip);
                    }
                }
            }
            Err(r) => {
                self.count(r, Some(auth.has_user(user)), has_password);
                if r == Refusal::BadCredentials {
                    if let Some(ip) = peer {
                        self.failed(ip);
                    }
                }
            }
        }
    }

    /// Leads the check of `digest` (a user and password), or follows the one in flight.
    /// Beyond [`MAX_IN_FLIGHT`] checks, a new one is neither shared nor waited for.
    fn join_flight(&self, digest: [u8; 32]) -> Flight<'_> {
        let Ok(mut flights) = self.in_flight.lock() else { return Flight::Unshared };
        if let Some(answer) = flights.get(&digest) {
            return Flight::Follow(answer.clone());
        }
        if flights.len() >= MAX_IN_FLIGHT {
            return Flight::Unshared;
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(digest, rx);
        Flight::Lead(Lead { guard: self, digest, tx })
    }

    /// A place in `ip`'s queue of logins (`None` when too many addresses are queued: then it
    /// is not serialized).
    fn turn_slot(&self, ip: IpAddr) -> Option<Turn<'_>> {
        let mut turns = self.turns.lock().ok()?;
        if turns.len() >= MAX_TRACKED_ADDRESSES && !turns.contains_key(&ip) {
            return None;
        }
        let sem = Arc::clone(turns.entry(ip).or_insert_with(|| Arc::new(Semaphore::new(1))));
        Some(Turn { guard: self, ip, sem, permit: None })
    }

    /// Counts a refusal by reason.
    fn count(&self, r: Refusal, known_user: Option<bool>, has_password: bool) {
        let i = match (r, known_user, has_password) {
            (Refusal::Busy, ..) => 4,
            (Refusal::NotAuthorized, ..) => 5,
            (Refusal::BadCredentials, Some(false), _) => 1,
            (Refusal::BadCredentials, _, false) => 2,
            (Refusal::BadCredentials, ..) => 0,
        };
        self.counters[i].inc();
    }

    fn digest(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.key);
        h.update((user.len() as u64).to_be_bytes());
        h.update(user.as_bytes());
        h.update(password);
        h.finalize().into()
    }

    /// Forgets every cached successful check (a config reload: a user removed or given a
    /// new password must not get in on a check made against the old `users:`).
    /// Checks in flight are not shared with logins begun after it, nor cached.
    pub fn forget_verified(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            self.epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            cache.clear();
        }
    }

    fn cached(&self, user: &str, digest: &[u8; 32], now: Instant) -> bool {
        if self.limits.cache_size == 0 {
            return false;
        }
        let Ok(cache) = self.cache.lock() else { return false };
        cache.get(user).is_some_and(|v| v.expires > now && v.digest == *digest)
    }

    /// Caches a success checked under `epoch`'s `users:` (not after a reload since).
    fn remember(&self, user: &str, digest: [u8; 32], epoch: u64) {
        let limits = self.limits;
        if limits.cache_size == 0 {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else { return };
        if self.epoch.load(std::sync::atomic::Ordering::Acquire) != epoch {
            return;
        }
        let now = Instant::now();
        if cache.len() >= limits.cache_size && !cache.contains_key(user) {
            cache.retain(|_, v| v.expires > now);
            if cache.len() >= limits.cache_size {
                // Full of live entries: the one closest to expiry goes.
                let oldest = cache.iter().min_by_key(|(_, v)| v.expires).map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(user.to_owned(), Verified { digest, expires: now + limits.cache_ttl });
    }

    fn in_backoff(&self, ip: IpAddr, now: Instant) -> bool {
        if self.limits.failures_before_backoff == 0 {
            return false;
        }
        let Ok(failures) = self.failures.lock() else { return false };
        failures.get(&ip).and_then(|f| f.until).is_some_and(|until| now < until)
    }

    /// A failed login from `ip`: at the threshold and beyond, a refusal period that doubles.
    fn failed(&self, ip: IpAddr) {
        let limits = self.limits;
        if limits.failures_before_backoff == 0 {
            return;
        }
        let Ok(mut failures) = self.failures.lock() else { return };
        let now = Instant::now();
        if failures.len() >= MAX_TRACKED_ADDRESSES && !failures.contains_key(&ip) {
            failures.retain(|_, f| now < f.last + limits.backoff_max);
            if failures.len() >= MAX_TRACKED_ADDRESSES {
                return;
            }
        }
        let f = failures.entry(ip).or_insert(Failures { count: 0, until: None, last: now });
        if now >= f.last + limits.backoff_max {
            // Quiet for long enough: a fresh start.
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if f.count >= limits.failures_before_backoff {
            let doublings = (f.count - limits.failures_before_backoff).min(20);
            let period = FIRST_BACKOFF.saturating_mul(1 << doublings).min(limits.backoff_max);
            f.until = Some(now + period);
        }
    }
}

/// What a login does about a check of its user and password in flight.
enum Flight<'a> {
    /// None in flight: this login checks, and tells the others.
    Lead(Lead<'a>),
    /// One in flight: wait for its answer (`Some(verified)`; the channel closes without one
    /// if that login goes or gets no verification slot).
    Follow(watch::Receiver<Option<bool>>),
    /// Too many in flight: check alone.
    Unshared,
}

/// The login checking a user and password for everyone who asks meanwhile; its entry goes
/// with it, answered or not.
struct Lead<'a> {
    guard: &'a LoginGuard,
    digest: [u8; 32],
    tx: watch::Sender<Option<bool>>,
}

impl Lead<'_> {
    /// Tells the followers a checked answer (a `Busy` is none: they try again).
    fn answer(self, result: Result<(), Refusal>) {
        match result {
            Ok(()) => self.tx.send_replace(Some(true)),
            Err(Refusal::BadCredentials) => self.tx.send_replace(Some(false)),
            Err(_) => None,
        };
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if let Ok(mut flights) = self.guard.in_flight.lock() {
            // Only the lead inserts or removes its digest's entry, so it is this one.
            flights.remove(&self.digest);
        }
    }
}

/// The in-flight key of a check of `digest` begun under reload epoch `epoch`: logins of
/// different epochs never share a check.
fn flight_key(digest: [u8; 32], epoch: u64) -> [u8; 32] {
    let mut key = digest;
    for (k, e) in key[24..].iter_mut().zip(epoch.to_be_bytes()) {
        *k ^= e;
    }
    key
}

/// One login's place in its address's queue; the entry goes with the last one.
struct Turn<'a> {
    guard: &'a LoginGuard,
    ip: IpAddr,
    sem: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.permit = None;
        if let Ok(mut turns) = self.guard.turns.lock() {
            // The map's and ours: nobody else holds or waits for this address's turn.
            if Arc::strong_count(&self.sem) == 2 {
                turns.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(cache_size: usize) -> LoginGuard {
        let limits = LoginLimits {
            failures_before_backoff: 3,
            backoff_max: Duration::from_secs(60),
            cache_size,
            cache_ttl: Duration::from_secs(60),
        };
        LoginGuard::new(limits, &Metrics::new())
    }

    #[test]
    fn failures_from_one_address_start_a_growing_backoff_for_it_only() {
        let g = guard(4);
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let now = Instant::now();
        g.failed(a);
        g.failed(a);
        assert!(!g.in_backoff(a, now), "below the threshold");
        g.failed(a);
        assert!(g.in_backoff(a, Instant::now()), "at the threshold");
        assert!(!g.in_backoff(b, Instant::now()), "another address is not affected");
        let first = g.failures.lock().expect("lock")[&a].until.expect("until");
        g.failed(a);
        let second = g.failures.lock().expect("lock")[&a].until.expect("until");
        assert!(second - first >= Duration::from_millis(900), "doubles: {:?}", second - first);
    }

    #[test]
    fn a_check_begun_before_a_reload_is_neither_cached_nor_shared_after_it() {
        use std::sync::atomic::Ordering;
        let g = guard(4);
        let d = g.digest("a", b"pa");
        let before = g.epoch.load(Ordering::Acquire);
        let Flight::Lead(_old) = g.join_flight(flight_key(d, before)) else { panic!("leads") };
        g.forget_verified();
        let after = g.epoch.load(Ordering::Acquire);
        let again = g.join_flight(flight_key(d, after));
        assert!(matches!(again, Flight::Lead(_)), "a login after the reload checks anew");
        g.remember("a", d, before);
        assert!(!g.cached("a", &d, Instant::now()), "a check against the old users: not cached");
        g.remember("a", d, after);
        assert!(g.cached("a", &d, Instant::now()), "one against the new users is");
    }

    #[tokio::test]
    async fn a_check_in_flight_is_shared_by_its_digest_and_goes_with_its_lead() {
        let g = guard(4);
        let d = g.digest("a", b"pa");
        let Flight::Lead(lead) = g.join_flight(d) else { panic!("the first leads") };
        let Flight::Follow(mut answer) = g.join_flight(d) else { panic!("the second follows") };
        assert!(matches!(g.join_flight(g.digest("a", b"other")), Flight::Lead(_)), "not shared");
        lead.answer(Err(Refusal::BadCredentials));
        assert_eq!(*answer.wait_for(Option::is_some).await.expect("answered"), Some(false));
        assert!(g.in_flight.lock().expect("lock").is_empty(), "the entry went with its lead");
        let Flight::Lead(lead) = g.join_flight(d) else { panic!("a new check leads") };
        let Flight::Follow(mut answer) = g.join_flight(d) else { panic!("follows") };
        drop(lead);
        assert!(answer.wait_for(Option::is_some).await.is_err(), "gone without an answer");
        let leads: Vec<_> = (0..MAX_IN_FLIGHT as u32)
            .map(|i| g.join_flight(g.digest("u", &i.to_be_bytes())))
            .collect();
        assert!(leads.iter().all(|f| matches!(f, Flight::Lead(_))));
        assert!(matches!(g.join_flight(d), Flight::Unshared), "bounded");
    }

    #[test]
    fn the_cache_is_bounded_and_keyed_by_password() {
        let g = guard(2);
        let now = Instant::now();
        g.remember("a", g.digest("a", b"pa"), 0);
        g.remember("b", g.digest("b", b"pb"), 0);
        assert!(g.cached("a", &g.digest("a", b"pa"), now));
        assert!(!g.cached("a", &g.digest("a", b"wrong"), now), "another password misses");
        g.remember("c", g.digest("c", b"pc"), 0);
        assert_eq!(g.cache.lock().expect("lock").len(), 2, "bounded");
        assert!(!g.cached("a", &g.digest("a", b"pa"), now + Duration::from_secs(61)), "expires");
    }
}
