//! The database file, with its flushes taken off the writer thread.
//!
//! Why: a durable commit ends in `fdatasync` (two of them with `quick_repair`, which needs a
//! two-phase commit), and on this kind of machine that call is the largest single cost of a
//! commit: it waits for the disk, and it spends CPU in the kernel queueing the pages. redb
//! makes it synchronously inside `commit()`, so the writer thread could not start on the next
//! batch until the disk had answered. Here `sync_data` only asks a thread of its own for the
//! flush and returns, and the writer hands the batch's replies over with
//! [`SyncHandle::when_durable`], to be sent once the flush that ends the commit has
//! completed. Nobody hears "committed" before the data is on disk.
//!
//! The file sees the same operations in the same order as with synchronous flushes: every
//! `write` and `set_len` first waits until every flush asked for so far has completed. So the
//! next transaction's pages cannot reach the file before the previous commit is durable,
//! redb's two-phase commit (data, flush, header, flush) keeps its order, pages a commit freed
//! are not overwritten before that commit is on disk, and whatever a crash leaves behind is a
//! state a crash of plain redb could leave too. What overlaps is the writer's work on the next
//! batch in memory (collecting it, B-tree updates, encoding) with the last flush of the
//! previous commit, and the kernel's share of that flush runs on the other core.
//!
//! Why not queue the page writes too: measured (`cargo bench --bench store`), letting the
//! writer run ahead of the disk made its batches smaller and the commits more numerous, which
//! cost more than the overlap saved. Waiting for the previous flush before writing keeps the
//! group commit's batches large.

use std::fmt;
use std::ops::Bound;
use std::sync::{Arc, Condvar, Mutex};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// redb's backend I/O error type (without its experimental API).
type BackendIoError = std::io::Error;

/// Called once the flush that covers a commit has completed (or failed).
pub(crate) type Completion = Box<dyn FnOnce(Result<(), String>) + Send>;

struct State {
    /// Flushes asked for so far.
    requested: u64,
    /// Flushes completed: everything written before flush number `done` was asked for is on
    /// disk.
    done: u64,
    /// A flush failed: the file's durable state is unknown, so every later operation fails.
    failed: Option<String>,
    /// Replies waiting for a flush, with the flush number they wait for.
    waiting: std::collections::VecDeque<(u64, Completion)>,
    closing: bool,
}

struct Inner {
    file: FileBackend,
    state: Mutex<State>,
    changed: Condvar,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("flush state")
    }
}

/// A [`FileBackend`] whose flushes run on a thread of their own.
pub(crate) struct SyncBackend {
    inner: Arc<Inner>,
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl fmt::Debug for SyncBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyncBackend").finish_non_exhaustive()
    }
}

fn io_error(message: &str) -> BackendIoError {
    std::io::Error::other(message.to_string())
}

impl SyncBackend {
    pub(crate) fn new(file: std::fs::File) -> Result<SyncBackend, redb::DatabaseError> {
        let inner = Arc::new(Inner {
            file: FileBackend::new(file)?,
            state: Mutex::new(State {
                requested: 0,
                done: 0,
                failed: None,
                waiting: Default::default(),
                closing: false,
            }),
            changed: Condvar::new(),
        });
        let worker = inner.clone();
        let flusher = std::thread::Builder::new()
            .name("courier-flush".into())
            .spawn(move || flush_loop(&worker))
            .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
        Ok(SyncBackend {
            inner,
            flusher: Mutex::new(Some(flusher)),
        })
    }

    /// The writer's handle, to wait for the flush that ends a commit.
    pub(crate) fn handle(&self) -> SyncHandle {
        SyncHandle(self.inner.clone())
    }

    /// Waits until every flush asked for so far has completed; fails if one failed.
    fn settle(&self) -> Result<(), BackendIoError> {
        let mut st = self.inner.lock();
        while st.done < st.requested && st.failed.is_none() {
            st = self.inner.changed.wait(st).expect("flush state");
        }
        match &st.failed {
            Some(e) => Err(io_error(e)),
            None => Ok(()),
        }
    }
}

/// The writer's side of [`SyncBackend`].
#[derive(Clone)]
pub(crate) struct SyncHandle(Arc<Inner>);

impl SyncHandle {
    /// Runs `done` once every flush asked for so far has completed — right away if they
    /// have. Called after a commit: the commit's last flush is among them.
    pub(crate) fn when_durable(&self, done: Completion) {
        let mut st = self.0.lock();
        if let Some(e) = &st.failed {
            let e = e.clone();
            drop(st);
            done(Err(e));
        } else if st.done >= st.requested {
            drop(st);
            done(Ok(()));
        } else {
            let n = st.requested;
            st.waiting.push_back((n, done));
        }
    }
}

/// The flusher thread: flushes whenever a flush was asked for, then hands the replies that
/// waited for it their answer.
fn flush_loop(inner: &Inner) {
    loop {
        let target = {
            let mut st = inner.lock();
            while st.done == st.requested && !st.closing {
                st = inner.changed.wait(st).expect("flush state");
            }
            if st.done == st.requested {
                return; // closing, and nothing left to flush
            }
            st.requested
        };
        // No write can happen while a flush is outstanding (`write` waits), so this one
        // covers everything written before flush number `target` was asked for.
        let result = inner.file.sync_data();
        let mut ready = Vec::new();
        let mut st = inner.lock();
        if let Err(e) = result {
            tracing::error!(error = %e, "flushing the database file failed");
            st.failed.get_or_insert_with(|| e.to_string());
        }
        st.done = target;
        while st.waiting.front().is_some_and(|(n, _)| *n <= target) {
            ready.extend(st.waiting.pop_front());
        }
        let outcome = st.failed.clone();
        drop(st);
        inner.changed.notify_all();
        for (_, done) in ready {
            done(match &outcome {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            });
        }
    }
}

impl Drop for SyncBackend {
    /// redb closes the backend before dropping it; this only makes sure the flusher thread
    /// never outlives it (it would keep the file open).
    fn drop(&mut self) {
        self.inner.lock().closing = true;
        self.inner.changed.notify_all();
    }
}

impl StorageBackend for SyncBackend {
    fn len(&self) -> Result<u64, BackendIoError> {
        self.inner.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        self.inner.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        self.settle()?;
        self.inner.file.set_len(len)
    }

    /// Asks for a flush and returns; see the module comment.
    fn sync_data(&self) -> Result<(), BackendIoError> {
        let mut st = self.inner.lock();
        if let Some(e) = &st.failed {
            return Err(io_error(e));
        }
        st.requested += 1;
        drop(st);
        self.inner.changed.notify_all();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        self.settle()?;
        self.inner.file.write(offset, data)
    }

    fn close(&self) -> Result<(), BackendIoError> {
        let settled = self.settle();
        self.inner.lock().closing = true;
        self.inner.changed.notify_all();
        if let Some(t) = self.flusher.lock().expect("flusher").take() {
            let _ = t.join();
        }
        settled?;
        self.inner.file.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.file.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.file.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.file.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.file.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.file.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.file.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, ReadableDatabase, ReadableTableMetadata, TableDefinition};
    use std::sync::atomic::{AtomicU64, Ordering};

    const T: TableDefinition<u64, &[u8]> = TableDefinition::new("t");

    fn open(path: &std::path::Path) -> (Database, SyncHandle) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        let backend = SyncBackend::new(file).unwrap();
        let handle = backend.handle();
        (
            Database::builder().create_with_backend(backend).unwrap(),
            handle,
        )
    }

    #[test]
    fn replies_wait_for_the_flush_and_the_file_is_a_normal_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (db, flushes) = open(&path);
        let answered = Arc::new(AtomicU64::new(0));
        for i in 0..50u64 {
            let mut txn = db.begin_write().unwrap();
            txn.set_quick_repair(i % 2 == 0);
            txn.open_table(T)
                .unwrap()
                .insert(i, &[i as u8; 3000][..])
                .unwrap();
            txn.commit().unwrap();
            let asked = flushes.0.lock().requested;
            let (answered, inner) = (answered.clone(), flushes.0.clone());
            flushes.when_durable(Box::new(move |r| {
                r.unwrap();
                // Every flush asked for by the end of this commit has completed.
                assert!(inner.lock().done >= asked, "answered before its flush");
                answered.fetch_add(1, Ordering::SeqCst);
            }));
        }
        drop(db);
        assert_eq!(
            answered.load(Ordering::SeqCst),
            50,
            "every commit answered by close"
        );
        // The file opens with redb's own backend and holds every commit.
        let db = Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let t = txn.open_table(T).unwrap();
        assert_eq!(t.len().unwrap(), 50);
        assert_eq!(t.get(49).unwrap().unwrap().value(), &[49u8; 3000][..]);
    }

    #[test]
    fn a_failed_flush_fails_the_waiting_replies_and_every_later_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let (db, flushes) = open(&path);
        let txn = db.begin_write().unwrap();
        txn.open_table(T).unwrap().insert(1, &b"one"[..]).unwrap();
        txn.commit().unwrap();
        // What the flusher does when the disk reports an error.
        flushes.0.lock().failed = Some("simulated EIO".into());
        let got = Arc::new(Mutex::new(None));
        let g = got.clone();
        flushes.when_durable(Box::new(move |r| *g.lock().unwrap() = Some(r)));
        assert_eq!(
            got.lock().unwrap().clone(),
            Some(Err("simulated EIO".to_string()))
        );
        let txn = db.begin_write().unwrap();
        txn.open_table(T).unwrap().insert(2, &b"two"[..]).unwrap();
        assert!(
            txn.commit().is_err(),
            "a commit after a failed flush must fail"
        );
    }
}
