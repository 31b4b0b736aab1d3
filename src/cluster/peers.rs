//! What the other nodes subscribe to, so that a node forwards a message only when another node
//! can match it. Pure bookkeeping: the link (`link.rs`) puts the notices on the wire.
//!
//! Every node announces the binding keys of its queue (the coarse keys of its subscriptions,
//! `m.…`): in full when its link comes up (a sync, broadcast, asking every node for theirs)
//! and when another node asks, then as numbered changes (a delta: keys added and removed, one
//! sequence number per delta). Every node keeps, per other node, that node's keys, the sequence
//! number it has applied and whether it is in step; it acknowledges every sync and delta it
//! applied to its sender. A node that sees a gap (a delta or heartbeat with a later number, a
//! node it never heard of, another epoch) marks that node out of step and asks it for its
//! keys: while any node is out of step, or during the first [`GRACE`] after the link came up
//! (every live node's heartbeat arrives within it), the node forwards everything, as without
//! this filter. A SUBACK needing a new key waits until every node this one knows has
//! acknowledged the delta that announced it (or [`SUBACK_WAIT`] passed), so a message
//! published on another node after the SUBACK is forwarded.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::keys;

/// How often a node tells the others its epoch and latest sequence number.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// After the link comes up, how long the node forwards everything and holds SUBACKs for new
/// keys: long enough for a heartbeat of every live node to arrive.
pub const GRACE: Duration = Duration::from_millis(1500);
/// A node not heard from for this long is checked (a passive declare of its queue): gone (404)
/// it is forgotten; there it is asked for its keys again.
pub const SILENCE: Duration = Duration::from_millis(3500);
/// The longest a SUBACK waits for the other nodes' acknowledgements: then it goes anyway (a
/// node that did not answer by then is cut off or overloaded; it is in the failure table).
pub const SUBACK_WAIT: Duration = Duration::from_secs(5);

/// What the forwarding path reads (a copy per thread, replaced when it changes).
#[derive(Debug, Default, Clone)]
pub struct View {
    /// Forward everything: in the grace period, or some node is out of step.
    pub all: bool,
    /// Every other node's binding keys, with how many nodes have each.
    pub keys: HashMap<String, u32>,
    /// The binding keys of this node's own share groups, with how many groups have each: their
    /// messages go through the groups' share queues, even when no other node wants them.
    pub groups: HashMap<String, u32>,
    /// The binding keys of persistent sessions other nodes announced (kept after their node
    /// leaves, until the session expires or moves), with how many sessions have each: their
    /// session queues take what they match while no node serves them.
    pub sessions: HashMap<String, u32>,
}

impl View {
    /// Whether another node may match a live (not retained) message on `topic`.
    pub fn wants(&self, topic: &str) -> bool {
        self.all
            || ((!self.keys.is_empty() || !self.groups.is_empty() || !self.sessions.is_empty())
                && keys::any_binding_matches(topic, |k| {
                    self.keys.contains_key(k)
                        || self.groups.contains_key(k)
                        || self.sessions.contains_key(k)
                }))
    }

    /// A share group with binding key `key` started (`add`) or ended here.
    pub fn own_group(&mut self, key: &str, add: bool) {
        if add {
            *self.groups.entry(key.to_owned()).or_insert(0) += 1;
        } else if let Some(n) = self.groups.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.groups.remove(key);
            }
        }
    }

    /// A persistent session's binding key `key` is announced (`add`) or no longer.
    pub fn session_key(&mut self, key: &str, add: bool) {
        if add {
            *self.sessions.entry(key.to_owned()).or_insert(0) += 1;
        } else if let Some(n) = self.sessions.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.sessions.remove(key);
            }
        }
    }

    fn add(&mut self, key: &str) {
        *self.keys.entry(key.to_owned()).or_insert(0) += 1;
    }

    fn remove(&mut self, key: &str) {
        if let Some(n) = self.keys.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.keys.remove(key);
            }
        }
    }
}

/// One other node.
#[derive(Debug)]
struct Peer {
    /// Its process's epoch.
    epoch: u64,
    /// The sequence number of its last applied sync or delta.
    seq: u64,
    /// Its keys, as last known.
    keys: HashSet<String>,
    /// Whether `keys` is in step with it (else: asked for them, forwarding everything).
    in_step: bool,
    /// The highest of this node's sequence numbers it acknowledged.
    acked: u64,
    /// When a message of it last arrived.
    heard: Instant,
    /// A check of its queue is in progress.
    probing: bool,
}

/// What to do after a notice.
#[derive(Debug, PartialEq, Eq)]
pub enum Then {
    /// Nothing.
    Nothing,
    /// Acknowledge sequence number `seq` of the sender's epoch `epoch`.
    Ack { epoch: u64, seq: u64 },
    /// Out of step: ask the sender for its keys (a sync sent to it alone).
    AskFull,
}

/// The other nodes as this node knows them (the link's, reset with each connection).
#[derive(Debug)]
pub struct Peers {
    nodes: HashMap<String, Peer>,
    /// Until then: everything is forwarded, SUBACKs for new keys wait.
    grace_until: Instant,
}

impl Peers {
    /// No node known, grace from `now`.
    pub fn new(now: Instant) -> Peers {
        Peers { nodes: HashMap::new(), grace_until: now + GRACE }
    }

    /// Whether the grace period is still on at `now`.
    pub fn in_grace(&self, now: Instant) -> bool {
        now < self.grace_until
    }

    /// The view forwarding reads, recomputed as a whole (after a connection came up).
    pub fn view(&self, now: Instant) -> View {
        let mut view = View { all: self.forward_all(now), ..View::default() };
        for p in self.nodes.values() {
            for k in &p.keys {
                view.add(k);
            }
        }
        view
    }

    /// Whether everything is to be forwarded.
    pub fn forward_all(&self, now: Instant) -> bool {
        self.in_grace(now) || self.nodes.values().any(|p| !p.in_step)
    }

    /// A full set of `node`'s keys (a sync or an answer to one).
    pub fn on_full(
        &mut self,
        view: &mut View,
        node: &str,
        (epoch, seq): (u64, u64),
        keys: HashSet<String>,
        now: Instant,
    ) -> Then {
        if let Some(p) = self.nodes.get(node) {
            if p.epoch > epoch {
                return Then::Nothing; // an older incarnation's
            }
            if p.epoch == epoch && p.in_step && p.seq > seq {
                return Then::Ack { epoch, seq: p.seq }; // older than what is applied
            }
        }
        let p = self.nodes.entry(node.to_owned()).or_insert_with(|| Peer {
            epoch,
            seq: 0,
            keys: HashSet::new(),
            in_step: false,
            acked: 0,
            heard: now,
            probing: false,
        });
        for k in p.keys.difference(&keys) {
            view.remove(k);
        }
        for k in keys.difference(&p.keys) {
            view.add(k);
        }
        if p.epoch != epoch {
            p.acked = 0;
        }
        (p.epoch, p.seq, p.keys, p.in_step, p.heard) = (epoch, seq, keys, true, now);
        view.all = self.forward_all(now);
        Then::Ack { epoch, seq }
    }

    /// A delta of `node`: `changes` (key, added) with sequence number `seq`.
    pub fn on_delta(
        &mut self,
        view: &mut View,
        node: &str,
        (epoch, seq): (u64, u64),
        changes: &[(String, bool)],
        now: Instant,
    ) -> Then {
        let Some(p) = self.nodes.get_mut(node) else {
            self.unknown(view, node, epoch, now);
            return Then::AskFull;
        };
        p.heard = now;
        if p.epoch != epoch || !p.in_step {
            if p.epoch < epoch || p.in_step {
                p.in_step = false;
                view.all = true;
                return Then::AskFull;
            }
            return Then::Nothing; // already asked
        }
        if seq <= p.seq {
            return Then::Ack { epoch, seq: p.seq }; // in a full set already
        }
        if seq != p.seq + 1 {
            p.in_step = false;
            view.all = true;
            return Then::AskFull;
        }
        for (k, added) in changes {
            if *added {
                if p.keys.insert(k.clone()) {
                    view.add(k);
                }
            } else if p.keys.remove(k) {
                view.remove(k);
            }
        }
        p.seq = seq;
        Then::Ack { epoch, seq }
    }

    /// A heartbeat of `node`: its epoch and latest sequence number.
    pub fn on_heartbeat(
        &mut self,
        view: &mut View,
        node: &str,
        epoch: u64,
        seq: u64,
        now: Instant,
    ) -> Then {
        let Some(p) = self.nodes.get_mut(node) else {
            self.unknown(view, node, epoch, now);
            return Then::AskFull;
        };
        p.heard = now;
        if p.epoch > epoch {
            return Then::Nothing;
        }
        if p.epoch < epoch || (p.in_step && seq > p.seq) {
            p.in_step = false;
            view.all = true;
        }
        // Out of step: asked again each heartbeat until the answer arrives.
        if p.in_step {
            Then::Nothing
        } else {
            Then::AskFull
        }
    }

    /// `node` acknowledged this node's sequence number `seq` of epoch `epoch` (`ours`).
    pub fn on_ack(&mut self, node: &str, epoch: u64, seq: u64, ours: u64, now: Instant) {
        if epoch != ours {
            return;
        }
        if let Some(p) = self.nodes.get_mut(node) {
            p.acked = p.acked.max(seq);
            p.heard = now;
        }
    }

    /// `node` left (said goodbye, or its queue is gone).
    pub fn remove(&mut self, view: &mut View, node: &str, now: Instant) {
        if let Some(p) = self.nodes.remove(node) {
            for k in &p.keys {
                view.remove(k);
            }
        }
        view.all = self.forward_all(now);
    }

    /// A node never heard of: known now, out of step.
    fn unknown(&mut self, view: &mut View, node: &str, epoch: u64, now: Instant) {
        let peer = Peer {
            epoch,
            seq: 0,
            keys: HashSet::new(),
            in_step: false,
            acked: 0,
            heard: now,
            probing: false,
        };
        self.nodes.insert(node.to_owned(), peer);
        view.all = true;
    }

    /// Whether every known node acknowledged this node's sequence number `seq`.
    pub fn all_acked(&self, seq: u64) -> bool {
        self.nodes.values().all(|p| p.acked >= seq)
    }

    /// Nodes silent for [`SILENCE`] and not being checked: marked as being checked.
    pub fn silent(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        for (node, p) in &mut self.nodes {
            if !p.probing && now.duration_since(p.heard) >= SILENCE {
                p.probing = true;
                out.push(node.clone());
            }
        }
        out
    }

    /// The check of a silent node found its queue (`alive`): it is asked for its keys again
    /// (`true` returned); else it is forgotten.
    pub fn probed(&mut self, view: &mut View, node: &str, alive: bool, now: Instant) -> bool {
        if !alive {
            self.remove(view, node, now);
            return false;
        }
        let Some(p) = self.nodes.get_mut(node) else { return false };
        p.probing = false;
        p.heard = now;
        p.in_step = false;
        view.all = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(keys: &[&str]) -> HashSet<String> {
        keys.iter().map(|k| (*k).to_owned()).collect()
    }

    #[test]
    fn in_step_by_full_sets_and_numbered_deltas() {
        let t0 = Instant::now();
        let mut peers = Peers::new(t0);
        let mut view = View::default();
        assert!(peers.forward_all(t0), "grace");
        let after = t0 + GRACE;
        assert_eq!(
            peers.on_full(&mut view, "b", (7, 3), set(&["m.la.#"]), after),
            Then::Ack { epoch: 7, seq: 3 }
        );
        assert!(!view.all);
        assert!(view.wants("a/x") && !view.wants("b/x"));
        let add = [("m.lb.*".to_owned(), true)];
        assert_eq!(
            peers.on_delta(&mut view, "b", (7, 4), &add, after),
            Then::Ack { epoch: 7, seq: 4 }
        );
        assert!(view.wants("b/x"));
        // A stale delta (already in the full set) is ignored; a gap asks for the full set.
        assert_eq!(
            peers.on_delta(&mut view, "b", (7, 4), &add, after),
            Then::Ack { epoch: 7, seq: 4 }
        );
        let del = [("m.la.#".to_owned(), false)];
        assert_eq!(peers.on_delta(&mut view, "b", (7, 6), &del, after), Then::AskFull);
        assert!(view.all, "out of step: everything forwarded");
        assert_eq!(
            peers.on_full(&mut view, "b", (7, 6), set(&["m.lb.*"]), after),
            Then::Ack { epoch: 7, seq: 6 }
        );
        assert!(!view.all && !view.wants("a/x") && view.wants("b/y"));
        // A heartbeat announcing a later number than applied: a delta was lost.
        assert_eq!(peers.on_heartbeat(&mut view, "b", 7, 6, after), Then::Nothing);
        assert_eq!(peers.on_heartbeat(&mut view, "b", 7, 8, after), Then::AskFull);
        assert!(view.all);
        // A node restarted (new epoch) replaces its keys; an unknown node is asked.
        peers.on_full(&mut view, "b", (8, 1), set(&[]), after);
        assert!(!view.all && view.keys.is_empty());
        assert_eq!(peers.on_heartbeat(&mut view, "c", 1, 0, after), Then::AskFull);
        assert!(view.all);
        peers.remove(&mut view, "c", after);
        assert!(!view.all);
    }

    #[test]
    fn a_suback_waits_for_every_known_node() {
        let t0 = Instant::now();
        let mut peers = Peers::new(t0);
        let mut view = View::default();
        assert!(peers.all_acked(5), "alone: nothing to wait for");
        peers.on_full(&mut view, "b", (1, 0), set(&[]), t0);
        peers.on_full(&mut view, "c", (1, 0), set(&[]), t0);
        peers.on_ack("b", 42, 5, 42, t0);
        assert!(!peers.all_acked(5));
        peers.on_ack("c", 41, 5, 42, t0); // another epoch of this node: not ours
        assert!(!peers.all_acked(5));
        peers.on_ack("c", 42, 6, 42, t0);
        assert!(peers.all_acked(5));
        // A silent node is checked once; gone, it no longer holds SUBACKs.
        let later = t0 + SILENCE;
        let mut silent = peers.silent(later);
        silent.sort();
        assert_eq!(silent, ["b", "c"]);
        assert!(peers.silent(later).is_empty());
        peers.on_ack("b", 42, 1, 42, later);
        peers.on_ack("c", 42, 1, 42, later);
        assert!(!peers.probed(&mut view, "b", false, later));
        assert!(peers.all_acked(6));
        assert!(peers.probed(&mut view, "c", true, later));
        assert!(view.all, "there but silent: asked again, everything forwarded meanwhile");
    }
}
