//! The load plan shared by every publisher kind: which sequence numbers a
//! publisher sends, when (fixed-rate pacing), and the phases a run goes
//! through (connect, go, stop).

use std::time::Duration;

use anyhow::{bail, Result};
use tokio::sync::watch;

use super::payload::{Clock, PayloadBuilder};

/// How long a QoS 1 publisher waits for the next PUBACK / confirm before it
/// gives up.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a run is; publishers watch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Connect and wait.
    Wait,
    /// Send; the value is the run's start in [`Clock`] nanoseconds.
    Go(u64),
    /// The consumer is done: disconnect.
    Stop,
}

/// One publisher's share of the load.
#[derive(Clone, Debug)]
pub struct PubJob {
    /// This publisher's index, 0-based.
    pub index: usize,
    /// Publishers in the run.
    pub publishers: usize,
    /// Messages this publisher sends.
    pub count: u64,
    pub qos: u8,
    /// Unconfirmed messages kept in flight at most (QoS 1), or sends not yet
    /// written (QoS 0, AMQP).
    pub window: usize,
    /// Total messages per second over all publishers; 0 = as fast as possible.
    pub rate: u64,
    pub payload: PayloadBuilder,
    pub clock: Clock,
}

impl PubJob {
    /// The jobs of a run of `messages` messages over `publishers` publishers:
    /// publisher `i` sends sequence numbers `i, i + P, i + 2P, …`.
    pub fn split(
        messages: u64,
        publishers: usize,
        qos: u8,
        window: usize,
        rate: u64,
        payload: &PayloadBuilder,
        clock: Clock,
    ) -> Vec<PubJob> {
        let p = publishers.max(1) as u64;
        (0..publishers.max(1))
            .map(|index| {
                let i = index as u64;
                PubJob {
                    index,
                    publishers: publishers.max(1),
                    count: messages / p + u64::from(i < messages % p),
                    qos,
                    window: window.max(1),
                    rate,
                    payload: payload.clone(),
                    clock,
                }
            })
            .collect()
    }

    /// The sequence number of this publisher's `k`-th message.
    pub fn seq(&self, k: u64) -> u64 {
        k * self.publishers as u64 + self.index as u64
    }

    /// In fixed-rate mode, waits until message `seq` is due: message `s` of
    /// the run is due `s / rate` seconds after the start, so the publishers
    /// together send an evenly spaced stream.
    pub async fn pace(&self, seq: u64, start_ns: u64) {
        if let Some(due) = self.due_ns(seq, start_ns) {
            tokio::time::sleep_until(self.clock.instant_at(due).into()).await;
        }
    }

    /// When message `seq` is due, in fixed-rate mode.
    pub fn due_ns(&self, seq: u64, start_ns: u64) -> Option<u64> {
        (self.rate > 0).then(|| {
            let offset = u128::from(seq) * 1_000_000_000 / u128::from(self.rate);
            start_ns.saturating_add(u64::try_from(offset).unwrap_or(u64::MAX))
        })
    }
}

/// Waits for the go; returns the run's start time.
pub async fn wait_go(phase: &mut watch::Receiver<Phase>) -> Result<u64> {
    loop {
        match *phase.borrow_and_update() {
            Phase::Go(start) => return Ok(start),
            Phase::Stop => bail!("run stopped before it started"),
            Phase::Wait => {}
        }
        if phase.changed().await.is_err() {
            bail!("run abandoned");
        }
    }
}

/// Waits until the run stops (the consumer is done or the run failed).
pub async fn wait_stop(phase: &mut watch::Receiver<Phase>) {
    while *phase.borrow_and_update() != Phase::Stop {
        if phase.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_sequence_number_once() {
        let b = PayloadBuilder::new(16, 0);
        let jobs = PubJob::split(10, 4, 0, 8, 0, &b, Clock::new());
        let mut seqs: Vec<u64> =
            jobs.iter().flat_map(|j| (0..j.count).map(move |k| j.seq(k))).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn pacing_spreads_messages_evenly() {
        let b = PayloadBuilder::new(16, 0);
        let jobs = PubJob::split(10, 2, 0, 8, 2000, &b, Clock::new());
        assert_eq!(jobs[1].due_ns(jobs[1].seq(1), 1_000), Some(1_000 + 1_500_000));
        let free = PubJob::split(10, 2, 0, 8, 0, &b, Clock::new());
        assert_eq!(free[0].due_ns(4, 0), None);
    }
}
