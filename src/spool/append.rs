//! The append task of one spool: takes every append queued since its last commit, encodes
//! them into one [`WriteBatch`], commits it durably (the store's writer shares the fsync with
//! whatever else is queued), then tells each session `Delivered`. A session is told only
//! after the commit returned: an acknowledged message is on disk.
//!
//! Full spool: `backpressure` keeps the appends that do not fit (in order) until the
//! forwarder frees room; the queue in front fills and the sessions wait. `drop_oldest`
//! deletes the oldest entries in the same batch, counted.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::config::OnFull;
use super::state::Shared;
use super::{entry_size, key, Append};
use crate::store::{codec, Store, Table, WriteBatch};
use crate::targets::{Failure, Outcome};

/// Appends committed together at most (a commit this large already costs little per
/// message; a larger one only delays the sessions at its front).
const MAX_BATCH: usize = 4096;

/// An append with its stored bytes.
struct Encoded {
    append: Append,
    value: Vec<u8>,
}

/// Runs until shutdown (then commits what is already queued) or until every handle is gone.
pub(super) async fn run(
    shared: Arc<Shared>,
    store: Store,
    mut rx: mpsc::Receiver<Append>,
    on_full: OnFull,
    shutdown: CancellationToken,
) {
    let mut received = Vec::with_capacity(MAX_BATCH);
    // Encoded appends not yet admitted (the spool was full), in arrival order.
    let mut waiting: VecDeque<Encoded> = VecDeque::new();
    let mut stopping = false;
    loop {
        if waiting.is_empty() {
            let n = if stopping {
                // Shutdown: what is already queued is still committed, nothing waits.
                rx.close();
                rx.recv_many(&mut received, MAX_BATCH).await
            } else {
                tokio::select! {
                    n = rx.recv_many(&mut received, MAX_BATCH) => n,
                    () = shutdown.cancelled() => {
                        stopping = true;
                        continue;
                    }
                }
            };
            if n == 0 {
                return;
            }
            for append in received.drain(..) {
                match codec::encode_message(&append.msg) {
                    Ok(value) => waiting.push_back(Encoded { append, value }),
                    Err(e) => append.fail(Failure::fatal(format!("cannot be spooled: {e}"))),
                }
            }
        }
        let (batch, admitted) = admit(&shared, &mut waiting, on_full);
        if admitted.is_empty() {
            if waiting.is_empty() {
                continue;
            }
            // Backpressure: wait for the forwarder to free room.
            if stopping {
                for e in waiting.drain(..) {
                    e.append.fail(Failure::retryable("spool full at shutdown"));
                }
                continue;
            }
            tokio::select! {
                () = shared.space.notified() => {}
                () = shutdown.cancelled() => stopping = true,
            }
            continue;
        }
        commit(&shared, &store, batch, admitted).await;
    }
}

/// Takes from the front of `waiting` what fits (dropping the oldest entries first with
/// `drop_oldest`) into a batch; returns it with the admitted appends and their sizes.
fn admit(
    shared: &Shared,
    waiting: &mut VecDeque<Encoded>,
    on_full: OnFull,
) -> (WriteBatch, Vec<(Append, u32)>) {
    let mut batch = WriteBatch::new();
    let mut admitted = Vec::new();
    let mut state = shared.lock();
    let mut bytes = state.bytes;
    let first = state.end;
    let (head_before, mut dropped) = (state.head, 0u64);
    while let Some(e) = waiting.front() {
        let size = entry_size(&shared.id, e.value.len());
        if size > shared.max_bytes {
            if let Some(e) = waiting.pop_front() {
                let reason = format!(
                    "message of {size} bytes is larger than spool.max_bytes ({})",
                    shared.max_bytes
                );
                e.append.fail(Failure::fatal(reason));
            }
            continue;
        }
        if bytes + size > shared.max_bytes {
            if on_full == OnFull::Backpressure || state.depth() == 0 {
                break;
            }
            // Drop the oldest until the new entry fits (the spool never goes below empty;
            // entries of this batch are not dropped: they fit next round).
            while bytes + size > shared.max_bytes && state.depth() > 0 {
                let oldest = state.head + 1;
                let (n, freed) = state.release(oldest);
                dropped += n;
                bytes -= freed;
            }
            if bytes + size > shared.max_bytes {
                break;
            }
        }
        let Some(e) = waiting.pop_front() else { break };
        let seq = first + admitted.len() as u64;
        bytes += size;
        batch.put(Table::Spool, key(&shared.id, seq), e.value);
        // Entry sizes are bounded by max_packet_size (u32) plus a small header.
        admitted.push((e.append, u32::try_from(size).unwrap_or(u32::MAX)));
    }
    if dropped > 0 {
        batch.delete_range(Table::Spool, key(&shared.id, head_before), key(&shared.id, state.head));
        shared.metrics.dropped.inc_by(dropped);
        shared.gauges(&state);
        warn!(target_id = %shared.id, dropped, "spool full: oldest messages dropped (on_full: drop_oldest)");
    }
    (batch, admitted)
}

/// Commits `batch`; on success records the entries and tells the sessions.
async fn commit(shared: &Shared, store: &Store, batch: WriteBatch, admitted: Vec<(Append, u32)>) {
    match store.commit(batch).await {
        Ok(()) => {
            let n = admitted.len() as u64;
            let mut acks = Vec::with_capacity(admitted.len());
            {
                let mut state = shared.lock();
                state.appended(admitted.into_iter().map(|(a, size)| {
                    acks.push(a.ack);
                    (a.msg, size)
                }));
                shared.gauges(&state);
            }
            shared.metrics.appended.inc_by(n);
            shared.appended.notify_one();
            for ack in acks.into_iter().flatten() {
                let _ = ack.send(Outcome::Delivered);
            }
        }
        Err(e) => {
            error!(target_id = %shared.id, error = %e, messages = admitted.len(), "spool append failed; not acknowledged");
            for (a, _) in admitted {
                a.fail(Failure::retryable(format!("cannot be spooled: {e}")));
            }
        }
    }
}
