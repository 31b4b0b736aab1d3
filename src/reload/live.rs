//! What a config reload swaps: the rule set with its spools, the users and the ACL, the
//! systems' health. One immutable [`Live`] snapshot at a time, behind a [`LiveCell`].
//!
//! Readers never lock per message: a session keeps an `Arc<Live>` and compares its
//! generation with the cell's (one atomic load) before it routes a PUBLISH; only when they
//! differ does it take the cell's lock to load the new snapshot. A message is routed by the
//! snapshot its session held when routing began, so wholly by the old or wholly by the new
//! rule set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::auth::Authenticator;
use crate::rules::RuleSet;
use crate::spool::Spools;
use crate::targets::kinds::Health;

/// One config's routing state: everything a reload replaces at once.
#[derive(Debug)]
pub struct Live {
    /// Increases by one per successful reload (0 at start).
    pub generation: u64,
    /// The compiled rules.
    pub rules: Arc<RuleSet>,
    /// The spool of each target of every `ack: spool` rule, by rule index in `rules`.
    pub spools: Spools,
    /// Users, the anonymous policy and the ACL.
    pub auth: Arc<Authenticator>,
    /// Every target kind's systems, for `/readyz`.
    pub health: Vec<Arc<dyn Health>>,
    /// The sha256 of the config file's bytes, hex.
    pub hash: String,
}

impl std::fmt::Debug for dyn Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// The current [`Live`] and its generation.
#[derive(Debug)]
pub struct LiveCell {
    /// The generation of `current`, readable without the lock.
    generation: AtomicU64,
    /// The snapshot. Written only by a reload; read when a generation changed (and once per
    /// CONNECT, admin request or will).
    current: RwLock<Arc<Live>>,
}

impl LiveCell {
    /// A cell holding `live`.
    pub fn new(live: Live) -> LiveCell {
        LiveCell {
            generation: AtomicU64::new(live.generation),
            current: RwLock::new(Arc::new(live)),
        }
    }

    /// The generation of the current snapshot (one atomic load).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current snapshot.
    pub fn load(&self) -> Arc<Live> {
        match self.current.read() {
            Ok(live) => Arc::clone(&live),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the snapshot; returns the previous one.
    pub fn store(&self, live: Live) -> Arc<Live> {
        let generation = live.generation;
        let live = Arc::new(live);
        let old = match self.current.write() {
            Ok(mut current) => std::mem::replace(&mut *current, live),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), live),
        };
        self.generation.store(generation, Ordering::Release);
        old
    }
}
