//! The embedded store: one redb file (`<store.path>/mqgate.redb`) for everything mqgate keeps
//! on disk (retained messages, persistent sessions, the spool, dead letters).
//!
//! One writer owns every write: a dedicated thread (an fsync must not block an async worker)
//! that takes all the [`WriteBatch`]es queued while it was busy and applies them in one redb
//! transaction with one durable commit (group commit), then answers each caller. So many small
//! durable writes cost one fsync, and a caller's `commit(..).await` returning `Ok` means its
//! writes are on disk. The request queue is bounded: when the disk is the bottleneck, callers
//! wait (backpressure), memory does not grow.
//!
//! Reads do not go through the writer: redb gives any thread a consistent snapshot
//! ([`Store::read`]), which sees every commit that returned before it was taken.
//!
//! Tables are byte keyed and byte valued ([`Table`]); each user owns its key layout. Messages
//! are stored with [`codec`].

pub mod codec;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{
    Database, DatabaseError, ReadTransaction, ReadableDatabase, StorageError, TableDefinition,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// The store file's name inside `store.path`.
pub const FILE_NAME: &str = "mqgate.redb";
/// Batches waiting for the writer at most; more callers wait to queue theirs.
const QUEUE: usize = 4096;
/// Operations applied in one transaction at most (a commit this large is already cheap per
/// operation; more would only delay the callers at its front).
const MAX_OPS_PER_COMMIT: usize = 65_536;
/// After a failed write, the first wait before reopening the file and writing again; it
/// doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between two attempts to write after a failure.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A byte-keyed, byte-valued table.
type Def = TableDefinition<'static, &'static [u8], &'static [u8]>;

/// The store's tables. Every table exists once the store is open, so a reader can open any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Retained messages: topic → message.
    Retained,
    /// Persistent sessions: client id → session state (subscriptions, expiry).
    Sessions,
    /// Messages queued or in flight for persistent sessions.
    SessionQueue,
    /// Spooled messages (`ack: spool`), per target, in order.
    Spool,
    /// Messages that failed for good, with the reason, rule and target.
    DeadLetters,
    /// Small values: format version, sequence counters.
    Meta,
}

impl Table {
    /// Every table.
    pub const ALL: [Table; 6] = [
        Table::Retained,
        Table::Sessions,
        Table::SessionQueue,
        Table::Spool,
        Table::DeadLetters,
        Table::Meta,
    ];

    /// The redb definition.
    pub fn def(self) -> Def {
        TableDefinition::new(match self {
            Table::Retained => "retained",
            Table::Sessions => "sessions",
            Table::SessionQueue => "session_queue",
            Table::Spool => "spool",
            Table::DeadLetters => "dead_letters",
            Table::Meta => "meta",
        })
    }
}

/// One write operation.
#[derive(Debug, Clone)]
enum Op {
    Put(Table, Vec<u8>, Vec<u8>),
    Delete(Table, Vec<u8>),
    /// Deletes the keys in `[from, to)`.
    DeleteRange(Table, Vec<u8>, Vec<u8>),
}

/// Writes applied together, atomically: all or none.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    ops: Vec<Op>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value` in `table`.
    pub fn put(&mut self, table: Table, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(Op::Put(table, key.into(), value.into()));
    }

    /// Removes `key` from `table` (nothing if absent).
    pub fn delete(&mut self, table: Table, key: impl Into<Vec<u8>>) {
        self.ops.push(Op::Delete(table, key.into()));
    }

    /// Removes every key `k` with `from <= k < to` from `table`.
    pub fn delete_range(&mut self, table: Table, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.ops.push(Op::DeleteRange(table, from.into(), to.into()));
    }

    /// Whether the batch holds no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Operations in the batch.
    pub fn len(&self) -> usize {
        self.ops.len()
    }
}

/// Why the store cannot be opened, read or written.
#[derive(Debug, Error, Clone)]
pub enum StoreError {
    /// The directory or file cannot be created or read (permissions, a file where the
    /// directory should be, ...).
    #[error("store {path}: {reason}")]
    Open {
        /// The store file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// Another process (another mqgate) has the store open.
    #[error("store {path}: locked: another process has it open (is another mqgate running with the same store.path?)")]
    Locked {
        /// The store file.
        path: PathBuf,
    },
    /// The file is not a store, or is damaged beyond what redb repairs at open.
    #[error("store {path}: corrupt or not an mqgate store: {reason} (move the file away to start with an empty store)")]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What redb reported.
        reason: String,
    },
    /// A read or write failed while running (disk full, I/O error).
    #[error("store: {0}")]
    Io(String),
    /// A stored value cannot be decoded.
    #[error("store: a stored value cannot be decoded: {0}")]
    Decode(String),
    /// The writer has stopped (after a failed commit, or at shutdown).
    #[error("store: the writer has stopped")]
    Closed,
    /// The writer's queue is full ([`Store::try_commit`] does not wait for room).
    #[error("store: the writer is busy (its queue is full)")]
    Busy,
}

impl StoreError {
    fn io(e: impl std::fmt::Display) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// A request to the writer.
struct Request {
    batch: WriteBatch,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// A cheap-to-clone handle on the open store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    path: PathBuf,
    tx: mpsc::Sender<Request>,
    stats: Arc<Stats>,
}

/// What the writer and the readers share.
struct Shared {
    /// The open database; `None` while the writer reopens it after an I/O error.
    db: RwLock<Option<Arc<Database>>>,
    /// Why the store cannot write, while it cannot (shown by `/readyz`).
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn db(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_db(&self, db: Option<Arc<Database>>) -> Option<Arc<Database>> {
        std::mem::replace(&mut *self.db.write().unwrap_or_else(|p| p.into_inner()), db)
    }

    fn set_failure(&self, failure: Option<String>) -> Option<String> {
        std::mem::replace(&mut *self.failure.lock().unwrap_or_else(|p| p.into_inner()), failure)
    }
}

/// What the writer counts (read by the metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Durable commits made.
    pub commits: AtomicU64,
    /// Batches those commits carried.
    pub batches: AtomicU64,
    /// Microseconds spent committing, in all.
    pub commit_micros: AtomicU64,
    /// Attempts to write that failed with an I/O error (disk full); each is retried.
    pub write_failures: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.inner.path).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the store in directory `dir` and starts its writer thread.
    /// A file left by a killed process opens (redb repairs it); a damaged or foreign file, or
    /// one another process holds, is a clear error.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(FILE_NAME);
        let open_err = |reason: String| StoreError::Open { path: path.clone(), reason };
        std::fs::create_dir_all(dir)
            .map_err(|e| open_err(format!("cannot create directory {}: {e}", dir.display())))?;
        if path.is_dir() {
            return Err(open_err("is a directory".into()));
        }
        let db = Database::builder().create(&path).map_err(|e| classify(&path, e))?;
        // Every table exists from now on: readers can open any of them.
        let txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        for t in Table::ALL {
            txn.open_table(t.def()).map_err(|e| open_err(e.to_string()))?;
        }
        txn.commit().map_err(|e| open_err(e.to_string()))?;
        let shared =
            Arc::new(Shared { db: RwLock::new(Some(Arc::new(db))), failure: Mutex::new(None) });
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer_shared = Arc::clone(&shared);
        let writer_stats = Arc::clone(&stats);
        let writer_path = path.clone();
        std::thread::Builder::new()
            .name("mqgate-store".into())
            .spawn(move || writer(&writer_path, &writer_shared, rx, &writer_stats))
            .map_err(|e| open_err(format!("cannot start the writer thread: {e}")))?;
        Ok(Store { inner: Arc::new(Inner { shared, path, tx, stats }) })
    }

    /// Applies `batch` atomically and durably; returns once it is on disk. Batches from many
    /// callers share one commit. An empty batch waits for every batch queued before it.
    ///
    /// When the disk fails (full), the caller keeps waiting: the writer reopens the file and
    /// writes the same batch again until it is on disk (see [`Store::failure`]).
    pub async fn commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        self.inner.tx.send(Request { batch, done }).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues `batch` for the writer without waiting, for a caller that cannot await (a sink's
    /// loop recording a dead letter). The batch is committed like any other, but nobody
    /// learns when or whether: a failed commit is only logged by the writer. `Busy` when the
    /// writer's queue is full (the caller decides what is dropped).
    pub fn try_commit(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let (done, _) = oneshot::channel();
        self.inner.tx.try_send(Request { batch, done }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Busy,
            mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
        })
    }

    /// A consistent snapshot for reading: sees every commit that returned before this call.
    /// Keep it short-lived (the file cannot reuse pages a live snapshot still sees).
    /// While the writer reopens the file after an I/O error, an `Io` error.
    pub fn read(&self) -> Result<ReadTransaction, StoreError> {
        let db = self.inner.shared.db().ok_or_else(|| {
            StoreError::Io("the store is being reopened after a write failed".into())
        })?;
        db.begin_read().map_err(StoreError::io)
    }

    /// Why the store cannot write now (disk full, I/O error), `None` when it can: writes wait
    /// (nothing is acknowledged) until the writer has written them.
    pub fn failure(&self) -> Option<String> {
        self.inner.shared.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The store file's size in bytes (0 if it cannot be read).
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.inner.path).map(|m| m.len()).unwrap_or(0)
    }

    /// The writer's counters.
    pub fn stats(&self) -> &Stats {
        &self.inner.stats
    }
}

/// The error of opening `path`, classified for the operator.
fn classify(path: &Path, e: DatabaseError) -> StoreError {
    let path = path.to_path_buf();
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Locked { path }
        }
        DatabaseError::Storage(StorageError::Io(io)) => {
            StoreError::Open { path, reason: io.to_string() }
        }
        DatabaseError::Storage(s) => StoreError::Corrupt { path, reason: s.to_string() },
        DatabaseError::UpgradeRequired(v) => StoreError::Corrupt {
            path,
            reason: format!("written in an unsupported file format (version {v})"),
        },
        other => StoreError::Corrupt { path, reason: other.to_string() },
    }
}

/// The writer thread: group commit until every handle is gone.
fn writer(path: &Path, shared: &Shared, mut rx: mpsc::Receiver<Request>, stats: &Stats) {
    let mut reqs: Vec<Request> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut ops = first.batch.ops.len();
        reqs.push(first);
        while ops < MAX_OPS_PER_COMMIT {
            match rx.try_recv() {
                Ok(r) => {
                    ops += r.batch.ops.len();
                    reqs.push(r);
                }
                Err(_) => break,
            }
        }
        let t0 = Instant::now();
        let result =
            if ops == 0 { Ok(()) } else { write_until_stored(path, shared, &rx, &reqs, stats) };
        let n = reqs.len() as u64;
        if ops > 0 {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            stats.commit_micros.fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        }
        stats.batches.fetch_add(n, Ordering::Relaxed);
        debug!(batches = n, ops, micros = t0.elapsed().as_micros() as u64, "store commit");
        if let Err(e) = &result {
            error!(error = %e, batches = n, "store commit failed");
        }
        for r in reqs.drain(..) {
            let _ = r.done.send(result.clone());
        }
    }
}

/// Why [`apply`] failed.
enum Failed {
    /// The file or the disk (full, I/O error): redb latches these, the database must be
    /// reopened; the same batch is written again.
    Io(String),
    /// Anything else (a value too large...): the callers get the error.
    Other(StoreError),
}

impl<E: Into<redb::Error>> From<E> for Failed {
    fn from(e: E) -> Self {
        match e.into() {
            e @ (redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed) => {
                Failed::Io(e.to_string())
            }
            e => Failed::Other(StoreError::io(e)),
        }
    }
}

/// Writes `reqs` in one durable commit. After an I/O error (disk full) nothing is answered:
/// the failure is shown by [`Store::failure`], the database is dropped and reopened (redb
/// refuses every write after an I/O error), with a growing pause, and the same batches are
/// written again, until they are on disk or every handle on the store is gone.
fn write_until_stored(
    path: &Path,
    shared: &Shared,
    rx: &mpsc::Receiver<Request>,
    reqs: &[Request],
    stats: &Stats,
) -> Result<(), StoreError> {
    let mut pause = RETRY_FIRST;
    loop {
        let reason = match shared.db() {
            None => "the store is closed".to_owned(),
            Some(db) => match apply(&db, reqs) {
                Ok(()) => {
                    if let Some(was) = shared.set_failure(None) {
                        info!(was = %was, "store writable again; the waiting writes are on disk");
                    }
                    return Ok(());
                }
                Err(Failed::Other(e)) => return Err(e),
                Err(Failed::Io(reason)) => reason,
            },
        };
        stats.write_failures.fetch_add(1, Ordering::Relaxed);
        if shared.set_failure(Some(reason.clone())).is_none() {
            error!(
                error = %reason,
                "store write failed (disk full?): nothing more is acknowledged until it is \
                 written; reopening the store and retrying"
            );
        }
        if rx.is_closed() {
            return Err(StoreError::Io(reason));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(RETRY_MAX);
        // Reopen: the old handle goes first (the file is locked while it is open; a reader's
        // snapshot still open keeps it, the next round tries again).
        drop(shared.set_db(None));
        match Database::builder().create(path) {
            Ok(db) => {
                shared.set_db(Some(Arc::new(db)));
            }
            Err(e) => {
                warn!(error = %e, "store not reopened yet; retrying");
                shared.set_failure(Some(format!("reopening: {e}")));
            }
        }
    }
}

/// Applies every request's batch in one transaction and commits it durably.
fn apply(db: &Database, reqs: &[Request]) -> Result<(), Failed> {
    let txn = db.begin_write()?;
    {
        let mut tables = Vec::with_capacity(Table::ALL.len());
        for t in Table::ALL {
            tables.push(txn.open_table(t.def())?);
        }
        let index = |t: Table| Table::ALL.iter().position(|x| *x == t).unwrap_or(0);
        for op in reqs.iter().flat_map(|r| &r.batch.ops) {
            match op {
                Op::Put(t, k, v) => {
                    tables[index(*t)].insert(k.as_slice(), v.as_slice())?;
                }
                Op::Delete(t, k) => {
                    tables[index(*t)].remove(k.as_slice())?;
                }
                Op::DeleteRange(t, from, to) => {
                    tables[index(*t)].retain_in(from.as_slice()..to.as_slice(), |_, _| false)?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;

    fn get(store: &Store, t: Table, k: &[u8]) -> Option<Vec<u8>> {
        let r = store.read().expect("read");
        let table = r.open_table(t.def()).expect("table");
        table.get(k).expect("get").map(|v| v.value().to_vec())
    }

    #[tokio::test]
    async fn commits_are_visible_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            let mut b = WriteBatch::new();
            b.put(Table::Retained, b"a/b".to_vec(), b"one".to_vec());
            b.put(Table::Meta, b"k".to_vec(), b"v".to_vec());
            store.commit(b).await.expect("commit");
            assert_eq!(get(&store, Table::Retained, b"a/b").as_deref(), Some(&b"one"[..]));
            let mut b = WriteBatch::new();
            b.delete(Table::Meta, b"k".to_vec());
            store.commit(b).await.expect("commit");
            assert_eq!(get(&store, Table::Meta, b"k"), None);
        }
        // The writer thread ends when the last handle is dropped; the lock goes with the db.
        let mut reopened = None;
        for _ in 0..50 {
            match Store::open(dir.path()) {
                Ok(s) => {
                    reopened = Some(s);
                    break;
                }
                Err(StoreError::Locked { .. }) => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
        let store = reopened.expect("reopened");
        assert_eq!(get(&store, Table::Retained, b"a/b").as_deref(), Some(&b"one"[..]));
    }

    #[tokio::test]
    async fn many_concurrent_batches_share_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut set = tokio::task::JoinSet::new();
        for i in 0..2000u32 {
            let s = store.clone();
            set.spawn(async move {
                let mut b = WriteBatch::new();
                b.put(Table::Spool, i.to_be_bytes().to_vec(), vec![1u8; 64]);
                s.commit(b).await
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("task").expect("commit");
        }
        let r = store.read().expect("read");
        let t = r.open_table(Table::Spool.def()).expect("table");
        assert_eq!(t.len().expect("len"), 2000);
        let commits = store.stats().commits.load(Ordering::Relaxed);
        assert!(commits < 2000, "2000 concurrent batches took {commits} commits: no group commit");
        drop(t);
        drop(r);
        let mut b = WriteBatch::new();
        b.delete_range(Table::Spool, 0u32.to_be_bytes().to_vec(), 1000u32.to_be_bytes().to_vec());
        store.commit(b).await.expect("delete range");
        let r = store.read().expect("read");
        assert_eq!(r.open_table(Table::Spool.def()).expect("table").len().expect("len"), 1000);
    }

    #[test]
    fn a_second_opener_is_told_the_store_is_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _first = Store::open(dir.path()).expect("open");
        match Store::open(dir.path()) {
            Err(e @ StoreError::Locked { .. }) => assert!(e.to_string().contains("locked")),
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn a_foreign_file_is_a_clear_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(FILE_NAME), vec![0x5au8; 8192]).expect("write");
        match Store::open(dir.path()) {
            Err(e @ (StoreError::Corrupt { .. } | StoreError::Open { .. })) => {
                assert!(e.to_string().contains(FILE_NAME), "{e}")
            }
            other => panic!("expected a clear error, got {other:?}"),
        }
    }
}
