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
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
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
        }
    }

    /// Checks CONNECT credentials as [`Authenticator::authenticate`] does, with the client's
    /// address's backoff first and the cache of recent successes before argon2. A refusal for
    /// backoff is [`Refusal::Busy`] (0x89 / return code 3: retry later).
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
        let digest = password.map(|p| self.digest(user, p));
        if let Some(digest) = &digest {
            if self.cached(user, digest, now) {
                self.cache_hits.inc();
                return Ok(());
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
        match result {
            Ok(()) => {
                if let Some(digest) = digest {
                    self.remember(user, digest);
                }
                if let Some(ip) = peer {
                    if let Ok(mut failures) = self.failures.lock() {
                        failures.remove(&ip);
                    }
                }
            }
            Err(r) => {
                self.count(r, Some(auth.has_user(user)), password.is_some());
                if r == Refusal::BadCredentials {
                    if let Some(ip) = peer {
                        self.failed(ip);
                    }
                }
            }
        }
        result
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
    pub fn forget_verified(&self) {
        if let Ok(mut cache) = self.cache.lock() {
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

    fn remember(&self, user: &str, digest: [u8; 32]) {
        let limits = self.limits;
        if limits.cache_size == 0 {
            return;
        }
        let Ok(mut cache) = self.cache.lock() else { return };
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
    fn the_cache_is_bounded_and_keyed_by_password() {
        let g = guard(2);
        let now = Instant::now();
        g.remember("a", g.digest("a", b"pa"));
        g.remember("b", g.digest("b", b"pb"));
        assert!(g.cached("a", &g.digest("a", b"pa"), now));
        assert!(!g.cached("a", &g.digest("a", b"wrong"), now), "another password misses");
        g.remember("c", g.digest("c", b"pc"));
        assert_eq!(g.cache.lock().expect("lock").len(), 2, "bounded");
        assert!(!g.cached("a", &g.digest("a", b"pa"), now + Duration::from_secs(61)), "expires");
    }
}
