//! `mqtt.max_memory`: one budget for the message bytes mqgate holds in memory.
//!
//! A PUBLISH read from a client is charged its topic and payload bytes when it becomes a
//! message; the charge lives in the `Message` (one `Arc` shared by every holder) and is given
//! back when the last holder drops it: a session queue, an in-flight window, a target's
//! buffer, the retained store, a parked session. A message delivered to a thousand
//! subscribers is charged once. (A sink that keeps only the payload after dropping the
//! message, such as a write buffer, is not counted: it has its own bound.)
//!
//! At the budget (see `Session::on_publish`): a QoS 0 PUBLISH is dropped and counted
//! (`mqgate_messages_dropped_total{reason="max_memory"}`); a QoS 1/2 PUBLISH is taken, and its
//! publisher is not read again until the bytes held fall below seven eighths of the budget
//! (TCP pushes back on it). Nothing is aborted. Sessions that do not publish are never paused:
//! their PUBACKs are what frees memory; a paused publisher with unacknowledged deliveries of
//! its own is read again after half a second at most, so that its PUBACKs come through.

use std::cell::Cell;
use std::pin::Pin;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// The budget; shared by every session. One per gateway, for the life of the process
/// (`'static`: a charged payload points at it without a reference count to bump).
#[derive(Debug)]
pub struct MemoryBudget {
    /// Most bytes held (`i64::MAX`: no budget, nothing is charged).
    limit: i64,
    /// Reading resumes below this (seven eighths of the limit).
    resume: i64,
    /// Charges and releases are summed per thread and applied to `used` once they reach this
    /// much either way (the level may lag by that much per worker thread): two contended
    /// atomic updates per message cost more than the rest of the accounting.
    batch: i64,
    /// Bytes charged and not yet given back; also `mqgate_memory_message_bytes`.
    used: Gauge,
    /// Woken when `used` falls below `resume`.
    freed: Arc<Notify>,
}

/// A message's charge against the budget, given back when the message is dropped. A clone
/// (or the default) carries none.
#[derive(Debug, Default)]
pub struct Charge(Option<(&'static MemoryBudget, i64)>);

impl Clone for Charge {
    fn clone(&self) -> Self {
        Charge(None)
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some((budget, bytes)) = self.0.take() {
            budget.add(-bytes);
        }
    }
}

/// This thread's charges and releases not yet applied, and to which budget.
struct Local {
    budget: Cell<Option<&'static MemoryBudget>>,
    delta: Cell<i64>,
}

impl Drop for Local {
    fn drop(&mut self) {
        if let Some(b) = self.budget.get() {
            b.apply(self.delta.get());
        }
    }
}

thread_local! {
    static LOCAL: Local = const { Local { budget: Cell::new(None), delta: Cell::new(0) } };
}

impl MemoryBudget {
    /// A budget of `limit` bytes (0: none) whose level is `used` (a registered gauge).
    pub fn new(limit: u64, used: Gauge) -> &'static Self {
        let limit = match i64::try_from(limit) {
            Ok(0) | Err(_) => i64::MAX,
            Ok(l) => l,
        };
        let batch = (limit / 256).clamp(1, 64 * 1024);
        Box::leak(Box::new(MemoryBudget {
            limit,
            resume: limit - limit / 8,
            batch,
            used,
            freed: Arc::default(),
        }))
    }

    /// Whether a budget is set.
    pub fn enabled(&self) -> bool {
        self.limit != i64::MAX
    }

    /// Whether the bytes held reached the budget.
    pub fn over(&self) -> bool {
        self.enabled() && self.used.get() >= self.limit
    }

    /// Bytes held now (less what worker threads have not applied yet).
    pub fn used(&self) -> i64 {
        self.used.get()
    }

    /// A charge of `bytes` (a message's topic and payload) until it is dropped; none when no
    /// budget is set.
    pub fn charge(&'static self, bytes: usize) -> Charge {
        if !self.enabled() {
            return Charge(None);
        }
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        self.add(bytes);
        Charge(Some((self, bytes)))
    }

    /// Adds `delta` to this thread's sum, applying it once it is large enough (or when the
    /// thread turns to another budget: tests run several gateways in one process).
    fn add(&'static self, delta: i64) {
        let apply = LOCAL.try_with(|l| {
            if !l.budget.get().is_some_and(|b| std::ptr::eq(b, self)) {
                if let Some(other) = l.budget.replace(Some(self)) {
                    other.apply(l.delta.replace(0));
                }
            }
            let sum = l.delta.get() + delta;
            if sum.abs() >= self.batch {
                l.delta.set(0);
                Some(sum)
            } else {
                l.delta.set(sum);
                None
            }
        });
        match apply {
            Ok(Some(sum)) => self.apply(sum),
            Ok(None) => {}
            // The thread is ending: straight to the level.
            Err(_) => self.apply(delta),
        }
    }

    fn apply(&self, delta: i64) {
        if delta == 0 {
            return;
        }
        let before = self.used.inc_by(delta);
        if delta < 0 && before >= self.resume && before + delta < self.resume {
            self.freed.notify_waiters();
        }
    }

    /// A wait for the bytes held to fall below the resume mark, registered at once (so a
    /// release between this call and the first poll is not missed); `None` when they already
    /// are below it.
    pub fn wait_for_room(&self) -> Option<Pin<Box<OwnedNotified>>> {
        let mut wait = Box::pin(Arc::clone(&self.freed).notified_owned());
        wait.as_mut().enable();
        (self.used.get() >= self.resume).then_some(wait)
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Poll};

    use super::*;

    #[test]
    fn a_charge_is_held_until_dropped_and_clones_carry_none() {
        let budget = MemoryBudget::new(100, Gauge::default());
        let a = budget.charge(64);
        assert_eq!(budget.used(), 64);
        assert!(!budget.over());
        let b = a.clone();
        let c = budget.charge(40);
        assert!(budget.over());
        drop(b);
        assert_eq!(budget.used(), 104, "a clone gives nothing back");
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(c);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn without_a_budget_nothing_is_charged() {
        let budget = MemoryBudget::new(0, Gauge::default());
        let c = budget.charge(10);
        assert_eq!(budget.used(), 0);
        assert!(!budget.over());
        assert!(c.0.is_none());
        assert!(budget.wait_for_room().is_none());
    }

    #[test]
    fn a_waiter_wakes_once_the_level_falls_below_seven_eighths() {
        let budget = MemoryBudget::new(80, Gauge::default());
        let a = budget.charge(40);
        let b = budget.charge(40);
        assert!(budget.over());
        let mut wait = budget.wait_for_room().expect("over the resume mark");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(wait.as_mut().poll(&mut cx) == Poll::Ready(()), "released below 70");
        assert!(budget.wait_for_room().is_none());
        drop(b);
    }

    #[test]
    fn small_charges_are_summed_per_thread_and_lag_by_at_most_one_batch() {
        let budget = MemoryBudget::new(1 << 30, Gauge::default());
        let held: Vec<Charge> = (0..10_000).map(|_| budget.charge(100)).collect();
        let lag = 1_000_000 - budget.used();
        assert!((0..64 * 1024).contains(&lag), "lag {lag}");
        drop(held);
        assert!(budget.used().abs() < 64 * 1024, "left {}", budget.used());
        // Turning to another budget applies what this thread summed for the first.
        let other = MemoryBudget::new(1 << 30, Gauge::default());
        drop(other.charge(1));
        assert_eq!(budget.used(), 0);
    }
}
