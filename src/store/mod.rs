//! The store: courier's one narrow interface to durable state (append events, lease due
//! deliveries, record an outcome, query).
//!
//! redb is the embedded backend. New events are made durable by the journal thread
//! (`journaler`, one sequential write per batch, into the `journal` files) and applied to
//! redb behind it by the one writer thread that group-commits every change (`writer`); how far
//! each has got is tracked in `progress`; attempt statistics are kept as per-minute
//! `rollup`s. Reads open their own snapshot and never wait for
//! the writer, except [`Store::settle`], which callers use to see every acknowledged event.
//! Nothing outside this module knows about redb, so another backend (Postgres, for several
//! nodes sharing one queue) can be added behind the same methods.

mod backup;
pub(crate) mod journal;
pub(crate) mod journaler;
pub mod lock;
mod progress;
mod rollup;
mod tables;
mod writer;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, TableHandle};
use tokio::sync::{mpsc, oneshot};

pub use backup::{BackupSummary, Restored, check_backup, restore};
pub use rollup::Rollup;
use tables::*;
use writer::Command;

use crate::model::{Attempt, Channel, Delivery, DeliveryStatus, Event, TimerKind, id_range};

/// Errors at the store boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(String),
    /// The database file failed a read, write or flush: redb refuses every later operation
    /// (as [`StoreError::Broken`]) from this one on.
    #[error("I/O error on the database file: {0}")]
    Io(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("no such delivery: {0}")]
    NotFound(String),
    #[error("the store is shutting down")]
    Closed,
    /// The data dir was written by a newer courier, in a record format this build cannot
    /// read: opening it would misread (and could overwrite) what it holds.
    #[error(
        "the data dir was written by a newer courier (record format {found}; this build reads format {supported} and older); run that version or a newer one, or restore a backup taken before the upgrade"
    )]
    NewerFormat { found: u64, supported: u64 },
    /// The database has not caught up with the ingest journal in time ([`Store::settle`]).
    #[error("{0}")]
    Behind(String),
    /// The database file had an I/O error (a full or failing disk): redb then refuses every
    /// operation until the database is opened again, which only a restart does.
    #[error(
        "the database file had an I/O error (see the log) and refuses every change until courier restarts; acknowledged events are safe in the ingest journal and applied at the next start: fix the disk, then restart courier"
    )]
    Broken,
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(e: E) -> Self {
        match e.into() {
            redb::Error::PreviousIo => StoreError::Broken,
            redb::Error::Io(e) => StoreError::Io(e.to_string()),
            e => StoreError::Db(e.to_string()),
        }
    }
}

/// How long after a failed journal write, with none succeeding since, `/readyz` reports the
/// store unavailable ([`Store::journal_failing`]).
pub const JOURNAL_FAILURE_SHOWN: std::time::Duration = std::time::Duration::from_secs(30);

/// An idempotency key, scoped to the ingest key that used it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IdempotencyKey {
    pub key_id: String,
    pub key: String,
}

/// A new event and its deliveries, to be committed together (and, as written, an ingest
/// journal record).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AppendBatch {
    pub event: Event,
    pub deliveries: Vec<Delivery>,
    pub idempotency: Option<IdempotencyKey>,
    /// The reply sent to the producer, kept for an idempotent repeat.
    pub reply: Vec<u8>,
    /// The producer chose the event id, so it must be checked for reuse (generated ids are
    /// unique by construction and skip that lookup).
    pub id_supplied: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AppendResult {
    /// Committed.
    Created,
    /// The idempotency key was seen before: here is the first reply; nothing was queued.
    Replayed(Vec<u8>),
    /// An event with this id already exists; nothing was queued.
    IdConflict,
}

/// What follows an attempt (or a decision not to attempt).
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Delivered,
    Retry { due_ms: u64, error: Option<String> },
    Dead { reason: String },
    Dropped { reason: String },
}

/// The result of one attempt, recorded in the same transaction that sets the next state.
#[derive(Debug, Clone)]
pub struct OutcomeRecord {
    pub delivery_id: String,
    /// The delivery's `updated_ms` as read when the attempt began, if the outcome is to
    /// apply only to that version of it: nothing else changes a pending delivery while its
    /// attempt is in flight but its endpoint's delete (which drops it) and a replay after
    /// that (a new round, which this attempt's result is no part of).
    pub read_updated_ms: Option<u64>,
    pub attempt: Attempt,
    /// False for a decision made without sending (a transform dropped the delivery).
    pub counts_as_attempt: bool,
    /// Whether the attempt's duration is a request's (false: none was made — a plugin
    /// failed, or the address was refused): only those count in the latency statistics.
    pub measured: bool,
    pub next: Next,
    /// Whether the commit may wait a moment (at most 5 ms, `OUTCOME_HOLD`) for other outcomes to
    /// share its flush: true when nothing but this delivery's own worker waits for it — not
    /// when a FIFO endpoint's next delivery waits for this one to be recorded, nor when its
    /// endpoint runs near its in-flight cap (the next attempts wait for the slot).
    pub may_wait: bool,
}

/// Whether an outcome decided what became of its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    Yes,
    /// No: the delivery was settled meanwhile (its endpoint's delete dropped it) or is in a
    /// round begun since (replayed); the attempt is kept in its audit trail only, with the
    /// outcome [`SUPERSEDED`]. The status the delivery has.
    No(DeliveryStatus),
}

/// The audit trail's outcome for an attempt that decided nothing (see [`Decided::No`]).
pub const SUPERSEDED: &str = "superseded";

/// How long the writer holds an outcome that may wait, so that the outcomes of a moderate
/// rate share a durable commit instead of flushing one each (see the writer's `hold`).
pub(crate) const OUTCOME_HOLD: std::time::Duration = std::time::Duration::from_millis(5);

/// Filter for listing and bulk replay.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub status: Option<DeliveryStatus>,
    pub endpoint: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum ReplayTarget {
    Ids(Vec<String>),
    /// Dead deliveries matching the filter: at most `limit` of the dead index's entries after
    /// `after` (an id; empty to start) are examined, so one command never holds the writer
    /// for long; [`ReplayResult::next`] says where the next page starts.
    Dead {
        filter: Filter,
        after: String,
        limit: usize,
        /// Only deliveries dead since before this time: one that a page requeued and that
        /// died again meanwhile is not replayed twice by the same bulk replay.
        dead_before_ms: u64,
    },
}

/// Every endpoint that exists, by name, with when it was made through the API (0 for one
/// from the config file). Deliveries name their endpoint and nothing more, so after a delete
/// and a create under the same name — perhaps for someone else — a delivery that finished
/// before the new endpoint existed is the old one's, and a replay must not send it to the
/// new one (signed with the new one's secret). Nor is a delivery replayed for a name no
/// endpoint has: it would wait, pending, for whoever takes the name next.
pub type Births = std::sync::Arc<std::collections::HashMap<String, u64>>;

/// Whether a finished delivery last changed at `updated_ms` has no endpoint of its own
/// under its name: none exists (`born` is `None`), or the one there was made at or after
/// that (see [`Births`]). Replay refuses such a delivery; the API shows it as
/// `endpoint_missing`.
pub fn orphaned(updated_ms: u64, born: Option<u64>) -> bool {
    born.is_none_or(|born| updated_ms <= born)
}

/// Where a retention sweep goes on: the finished deliveries it has not examined yet, in the
/// status index's order (delivered, dead, dropped; oldest first within each). A sweep starts
/// from [`PurgeCursor::default`] and passes each round's cursor to the next.
///
/// Why a cursor: a delivery created before the cutoff but finished after it (a slow retry, a
/// replay) is examined and kept; without it, every round would start over at the same kept
/// deliveries, and enough of them would stop the sweep before anything behind them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PurgeCursor {
    /// Which status of [`FINISHED`] the sweep is in; past the last one, it is done.
    pub(crate) status: usize,
    /// The last delivery id examined in that status (empty: from the start).
    pub(crate) after: String,
    /// Whether the sweep has deleted every attempt rollup of a minute before its cutoff
    /// (a round deletes at most its limit of them, and stops looking once done).
    pub(crate) rollups_done: bool,
}

/// The statuses retention purges, in the order a sweep takes them.
pub(crate) const FINISHED: [DeliveryStatus; 3] = [
    DeliveryStatus::Delivered,
    DeliveryStatus::Dead,
    DeliveryStatus::Dropped,
];

impl PurgeCursor {
    /// Whether every finished delivery, and every rollup, has been examined.
    pub fn finished(&self) -> bool {
        self.status >= FINISHED.len() && self.rollups_done
    }
}

/// What one round of a retention sweep did.
#[derive(Debug, Clone, Default)]
pub struct PurgeRound {
    /// Deliveries deleted.
    pub purged: usize,
    /// Idempotency records deleted.
    pub keys_expired: usize,
    /// Finished workflow channels deleted.
    pub channels_purged: usize,
    /// Events stored with no deliveries (no endpoint subscribed) deleted.
    pub events_purged: usize,
    /// Attempt rollups (an endpoint's minute of statistics) deleted.
    pub rollups_purged: usize,
    /// Where the next round goes on.
    pub cursor: PurgeCursor,
}

#[derive(Debug, Clone, Default)]
pub struct ReplayResult {
    pub requeued: Vec<Delivery>,
    pub already_pending: Vec<String>,
    pub not_found: Vec<String>,
    /// Finished before their endpoint was made, or their endpoint is gone (see [`Births`]):
    /// not replayed.
    pub earlier_endpoint: Vec<String>,
    /// Records that could not be read (damaged): not replayed, reported in the log.
    pub unreadable: Vec<String>,
    /// For a page of dead deliveries: the last id examined, if more may follow.
    pub next: Option<String>,
}

/// A channel to create (`expect_version: None`) or to advance from `expect_version`, with the
/// workflow webhook to commit alongside.
#[derive(Debug, Clone)]
pub struct ChannelChange {
    pub channel: Channel,
    pub expect_version: Option<u64>,
    pub append: Option<AppendBatch>,
}

#[derive(Debug, Clone)]
pub enum AdvanceResult {
    Applied,
    NotFound,
    /// The channel changed since it was read (or already exists): here it is now.
    Stale(Channel),
}

/// A write to the API endpoints table: `value` `None` deletes; `create` insists the name is
/// new, otherwise the name must exist.
#[derive(Debug, Clone)]
pub struct EndpointWrite {
    pub name: String,
    pub value: Option<Vec<u8>>,
    pub create: bool,
    /// With a delete: its pending deliveries are to be dropped. The promise is stored with
    /// the delete, and kept until [`Store::drop_pending`] has dropped the last of them, so
    /// that a crash (or a failed page) between the two does not leave them queued for the
    /// next endpoint of that name; see [`Store::unfinished_drops`].
    pub drop_pending: bool,
}

/// Due workflow timers as (due ms, channel id, kind), and the next due time beyond them.
pub type DueTimers = (Vec<(u64, String, TimerKind)>, Option<u64>);

/// A page of due deliveries for one endpoint.
#[derive(Debug, Default)]
pub struct DuePage {
    pub due: Vec<Delivery>,
    /// The queue position of the last delivery in `due`.
    pub last: Option<(u64, String)>,
    /// When the earliest not-yet-due delivery becomes due, if any.
    pub next_due_ms: Option<u64>,
}

/// State shared between the writer and readers.
pub(crate) struct Shared {
    counts: RwLock<BTreeMap<(String, DeliveryStatus), u64>>,
    /// Write transactions committed, and the commands they carried (their ratio is the
    /// group-commit batch size).
    pub(crate) commits: prometheus_client::metrics::counter::Counter,
    pub(crate) commands: prometheus_client::metrics::counter::Counter,
    /// Commits flushed to the database file (the others were appends made durable by the
    /// ingest journal).
    pub(crate) durable_commits: prometheus_client::metrics::counter::Counter,
    /// Writes to the ingest journal, each making a batch of new events durable.
    pub(crate) journal_writes: prometheus_client::metrics::counter::Counter,
    /// Seconds the journal thread held new events because the database had not yet
    /// checkpointed the journal file it was about to write over (ingest stood still).
    pub(crate) journal_stalled: prometheus_client::metrics::counter::Counter<f64>,
    /// Failed writes to the ingest journal (a full or failing disk): each refused its batch.
    pub(crate) journal_errors: prometheus_client::metrics::counter::Counter,
    /// When the last write to the journal failed, if none has succeeded since (0: none).
    journal_failed_ms: std::sync::atomic::AtomicU64,
    /// Journal records re-applied when the store was opened (after a crash).
    replayed: usize,
    /// Delivery records found damaged (unreadable) and passed over by the scheduler's scan,
    /// a listing or a replay: each is logged and counted once, not at every read that meets
    /// it ([`Shared::found_damaged`]).
    damaged: std::sync::Mutex<HashSet<String>>,
    /// How many distinct damaged delivery records were found since the process started.
    pub(crate) damaged_found: prometheus_client::metrics::counter::Counter,
    writer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set once the database reports its file failed ([`StoreError::Broken`]).
    pub(crate) broken: std::sync::atomic::AtomicBool,
    /// How far the journal and the database have got.
    pub(crate) progress: progress::Progress,
    /// Test-only fault injection: the next this many outcomes fail as a full disk would.
    #[cfg(test)]
    pub(crate) fail_outcomes: std::sync::atomic::AtomicU32,
    /// Test-only fault injection: every journal write fails while this is set.
    #[cfg(test)]
    pub(crate) fail_journal: std::sync::atomic::AtomicBool,
    /// Test-only fault injection: every write transaction fails while this is set.
    #[cfg(test)]
    pub(crate) fail_applies: std::sync::atomic::AtomicBool,
    /// Test-only fault injection: the database file's writes and syncs fail while set, as on
    /// a full disk (redb itself sees the errors).
    #[cfg(test)]
    pub(crate) fail_io: Arc<std::sync::atomic::AtomicBool>,
    /// Test-only fault injection: the writer thread panics at its next transaction.
    #[cfg(test)]
    pub(crate) panic_applies: std::sync::atomic::AtomicBool,
}

/// See [`Store::commit_counters`].
pub struct CommitCounters {
    pub commits: prometheus_client::metrics::counter::Counter,
    pub commands: prometheus_client::metrics::counter::Counter,
    pub durable: prometheus_client::metrics::counter::Counter,
    pub journal_writes: prometheus_client::metrics::counter::Counter,
    pub journal_stalled: prometheus_client::metrics::counter::Counter<f64>,
    pub journal_errors: prometheus_client::metrics::counter::Counter,
    pub damaged: prometheus_client::metrics::counter::Counter,
}

/// See [`Store::closer`].
pub struct Closer(Option<std::thread::JoinHandle<()>>);

impl Closer {
    /// Blocks until the writer thread has exited (and with it the database is closed), at most
    /// `timeout`; `false` if it did not.
    pub fn wait(self, timeout: std::time::Duration) -> bool {
        let Some(handle) = self.0 else { return true };
        let deadline = std::time::Instant::now() + timeout;
        while !handle.is_finished() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        handle.join().is_ok()
    }
}

impl Shared {
    fn new(counts: BTreeMap<(String, DeliveryStatus), u64>, replayed: usize, seq: u64) -> Self {
        Shared {
            counts: RwLock::new(counts),
            commits: Default::default(),
            commands: Default::default(),
            durable_commits: Default::default(),
            journal_writes: Default::default(),
            journal_stalled: Default::default(),
            journal_errors: Default::default(),
            journal_failed_ms: Default::default(),
            replayed,
            damaged: Default::default(),
            damaged_found: Default::default(),
            writer: Default::default(),
            broken: Default::default(),
            progress: progress::Progress::new(seq),
            #[cfg(test)]
            fail_outcomes: Default::default(),
            #[cfg(test)]
            fail_journal: Default::default(),
            #[cfg(test)]
            fail_applies: Default::default(),
            #[cfg(test)]
            fail_io: Default::default(),
            #[cfg(test)]
            panic_applies: Default::default(),
        }
    }

    /// A delivery record that cannot be read was passed over by `what` (a damaged record
    /// stays as it is, for an operator): logged and counted the first time it is met, so
    /// that a scan meeting it every second neither floods the log nor hides it.
    pub(crate) fn found_damaged(&self, what: &str, id: &str, error: &dyn std::fmt::Display) {
        if self.count_damaged(id) {
            tracing::error!(delivery = %id, %error, "{what} passes over a delivery record it cannot read (damaged); it stays as it is");
        }
    }

    /// Notes how the journal's last write went (the journal thread, after each).
    pub(crate) fn journal_written(&self, ok: bool) {
        use std::sync::atomic::Ordering;
        if ok {
            if self.journal_failed_ms.load(Ordering::Relaxed) != 0 {
                self.journal_failed_ms.store(0, Ordering::SeqCst);
            }
        } else {
            self.journal_errors.inc();
            self.journal_failed_ms
                .store(crate::model::now_ms().max(1), Ordering::SeqCst);
        }
    }

    /// Counts a damaged delivery record the first time it is met; `true` then.
    fn count_damaged(&self, id: &str) -> bool {
        let first = self
            .damaged
            .lock()
            .expect("damaged lock")
            .insert(id.to_string());
        if first {
            self.damaged_found.inc();
        }
        first
    }

    fn apply_deltas(&self, deltas: &writer::Deltas) {
        let mut counts = self.counts.write().expect("counts lock");
        for ((endpoint, status), delta) in deltas {
            let c = counts.entry((endpoint.clone(), *status)).or_default();
            *c = (*c as i64 + delta).max(0) as u64;
        }
    }
}

/// The durable store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Arc<Database>,
    /// The data dir's lock ([`lock`]), held as long as the database is open.
    _lock: Arc<lock::DirLock>,
    /// To the writer thread.
    tx: mpsc::Sender<Command>,
    /// To the journal thread (new events).
    journal: mpsc::Sender<journaler::Append>,
    shared: Arc<Shared>,
}

/// Why the store refuses changes after its writer thread failed.
const WRITER_STOPPED: &str = "the database writer has stopped (see the log); events \
     acknowledged before are kept in the ingest journal and applied when courier restarts";

/// How long [`Store::settle`] waits for the database to catch up with the journal before it
/// reports the store unavailable.
pub(crate) const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long an append the writer must answer (one with an idempotency key or a chosen id)
/// waits for it: the journal's own bound (a checkpoint it may wait for) and then the
/// database's, as readers wait in [`Store::settle`].
#[cfg(not(test))]
const APPLY_WAIT: std::time::Duration = SETTLE_TIMEOUT.saturating_mul(2);
#[cfg(test)]
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Largest number of rows a listing examines before handing back a cursor.
const SCAN_CAP: usize = 100_000;

impl Store {
    /// Opens (or creates) the database file and its ingest journal (`path` with the extension
    /// `journal`), re-applies what the journal holds beyond the database's last durable
    /// commit, and starts the writer thread. With `quick_repair`, every durable commit saves
    /// the allocator state so that a crash is recovered from in milliseconds (commits cost
    /// more).
    pub fn open(path: &Path, quick_repair: bool) -> Result<Store, StoreError> {
        // Before anything in the data dir is touched.
        let dir_lock = Arc::new(lock::acquire(path)?);
        let mut builder = Database::builder();
        builder.set_cache_size(64 * 1024 * 1024);
        // The database holds secrets, payloads and URL passwords: a new file is made for
        // courier's user only (an existing one keeps the mode it was given).
        {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(StoreError::Db(format!("{}: {e}", path.display()))),
            }
        }
        #[cfg(not(test))]
        let db = builder.create(path)?;
        // Tests get the same file behind a switch that makes its writes fail like a full disk.
        #[cfg(test)]
        let (db, fail_io) = {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| StoreError::Db(e.to_string()))?;
            let backend = failing::FailingFile::new(file)?;
            let fail_io = backend.fail.clone();
            (builder.create_with_backend(backend)?, fail_io)
        };
        // Create every table up front so that readers never meet a missing table.
        let txn = db.begin_write()?;
        let (checkpoint_seq, journal_id);
        let format;
        {
            // Before anything else touches the file (the migrations below, the journal's
            // replay): a newer format is left as it is. A database made before the format
            // was recorded holds format 1 records.
            {
                let mut meta = txn.open_table(META)?;
                let found = meta.get(FORMAT)?.map(|v| v.value());
                format = match found {
                    Some(found) if found > FORMAT_VERSION => {
                        return Err(StoreError::NewerFormat {
                            found,
                            supported: FORMAT_VERSION,
                        });
                    }
                    Some(found) => found,
                    // A new database is in this build's format; one from before the format
                    // was recorded (it has tables besides this one: some builds of that time
                    // had workflows but no journal id yet) is in format 1, and migrations
                    // below raise it.
                    None => {
                        let existing = txn.list_tables()?.any(|t| t.name() != META.name());
                        let format = if existing { 1 } else { FORMAT_VERSION };
                        meta.insert(FORMAT, format)?;
                        format
                    }
                };
            }
            txn.open_table(EVENTS)?;
            txn.open_table(DELIVERIES)?;
            txn.open_table(ATTEMPTS)?;
            txn.open_table(QUEUE)?;
            txn.open_table(PENDING)?;
            let mut by_status = txn.open_table(BY_STATUS)?;
            txn.open_table(DEAD_BY_ENDPOINT)?;
            let idempotency = txn.open_table(IDEMPOTENCY)?;
            let mut idempotency_age = txn.open_table(IDEMPOTENCY_AGE)?;
            txn.open_table(ROLLUPS)?;
            let channels = txn.open_table(CHANNELS)?;
            txn.open_table(TIMERS)?;
            txn.open_table(UPSTREAM_TIMERS)?;
            txn.open_table(ENDPOINTS)?;
            txn.open_table(COUNTS)?;
            let mut meta = txn.open_table(META)?;
            checkpoint_seq = meta.get(JOURNAL_SEQ)?.map_or(0, |v| v.value());
            let id = meta.get(JOURNAL_ID)?.map(|v| v.value());
            journal_id = match id {
                Some(id) => id,
                None => {
                    let id = ulid::Ulid::new().0 as u64;
                    meta.insert(JOURNAL_ID, id)?;
                    id
                }
            };
            if meta.get(ROLLUPS_BUILT)?.is_none() {
                build_rollups(&txn)?;
                meta.insert(ROLLUPS_BUILT, 1)?;
            }
            if meta.get(DEAD_BY_ENDPOINT_BUILT)?.is_none() {
                build_dead_by_endpoint(&txn, &by_status)?;
                meta.insert(DEAD_BY_ENDPOINT_BUILT, 1)?;
            }
            if meta.get(IDEMPOTENCY_AGE_BUILT)?.is_none() {
                for row in idempotency.iter()? {
                    let (k, v) = row?;
                    let (key_id, key) = k.value();
                    idempotency_age.insert((v.value().0, key_id, key), ())?;
                }
                meta.insert(IDEMPOTENCY_AGE_BUILT, 1)?;
            }
            drop((idempotency, idempotency_age));
            if meta.get(CHANNELS_DONE_BUILT)?.is_none() {
                let mut done = txn.open_table(CHANNELS_DONE)?;
                for row in channels.iter()? {
                    let (_, v) = row?;
                    let ch: Channel = decode(v.value(), "channel")?;
                    if ch.state.is_final() {
                        done.insert((ch.updated_ms, ch.id.as_str()), ())?;
                    }
                }
                meta.insert(CHANNELS_DONE_BUILT, 1)?;
            }
            if format < 2 {
                move_upstream_timers(&txn, &channels)?;
                meta.insert(FORMAT, 2)?;
            }
            if meta.get(BY_STATUS_NO_PENDING)?.is_none() {
                let pending = DeliveryStatus::Pending.as_str();
                by_status.retain_in((pending, "")..(pending, "\u{10ffff}"), |_, _| false)?;
                meta.insert(BY_STATUS_NO_PENDING, 1)?;
            }
        }
        txn.commit()?;
        let (journal, records) =
            journal::Journal::open(&path.with_extension("journal"), journal_id, checkpoint_seq)?;
        // Said before the work, which can take a while with a full journal: an operator
        // watching a slow start learns why (the server says when it is done).
        if !records.is_empty() {
            let bytes: usize = records.iter().map(|(_, payload)| payload.len()).sum();
            tracing::info!(
                records = records.len(),
                bytes,
                "re-applying acknowledged events from the ingest journal (the last run did not shut down cleanly); courier listens once they are in the database"
            );
        }
        let replayed = writer::replay_journal(&db, &records, quick_repair)?;
        let mut counts = BTreeMap::new();
        {
            let txn = db.begin_read()?;
            for row in txn.open_table(COUNTS)?.iter()? {
                let (k, v) = row?;
                let (endpoint, status) = k.value();
                if let Some(st) = DeliveryStatus::parse(status) {
                    counts.insert((endpoint.to_string(), st), v.value());
                }
            }
        }
        let db = Arc::new(db);
        let seq = journal.last_seq();
        #[allow(unused_mut)]
        let mut shared = Shared::new(counts, replayed, seq);
        #[cfg(test)]
        {
            shared.fail_io = fail_io;
        }
        let shared = Arc::new(shared);
        let (tx, rx) = mpsc::channel(65_536);
        let (wdb, wshared, wlock) = (db.clone(), shared.clone(), dir_lock.clone());
        let thread = std::thread::Builder::new()
            .name("courier-writer".into())
            .spawn(move || {
                // Until the writer has closed the database too.
                let _held = wlock;
                writer::run(wdb, rx, wshared, quick_repair)
            })
            .map_err(|e| StoreError::Db(format!("cannot start writer thread: {e}")))?;
        *shared.writer.lock().expect("writer handle") = Some(thread);
        let (jtx, jrx) = mpsc::channel(65_536);
        let (wtx, jshared, jlock) = (tx.clone(), shared.clone(), dir_lock.clone());
        let answers = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let (to, from) = mpsc::unbounded_channel();
            rt.spawn(journaler::answer(from));
            to
        });
        std::thread::Builder::new()
            .name("courier-journal".into())
            .spawn(move || {
                // Until its last write (after a writer that panicked, too).
                let _held = jlock;
                journaler::run(answers, jrx, wtx, jshared, journal)
            })
            .map_err(|e| StoreError::Db(format!("cannot start journal thread: {e}")))?;
        Ok(Store {
            db,
            _lock: dir_lock,
            tx,
            journal: jtx,
            shared,
        })
    }

    /// A handle that waits for the database to be closed cleanly once every `Store` clone is
    /// gone (the writer finishes its last batch and the file is closed, so the next start
    /// needs no repair).
    pub fn closer(&self) -> Closer {
        Closer(self.shared.writer.lock().expect("writer handle").take())
    }

    /// Whether the store can take changes: `Err` once its writer thread has stopped while the
    /// store is open (it failed; see the log), which only a restart mends — the journal
    /// then applies every event acknowledged before. Readiness reports it.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.writer_stopped() {
            return Err(StoreError::Db(WRITER_STOPPED.into()));
        }
        if self.shared.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Broken);
        }
        Ok(())
    }

    /// Whether the ingest journal's last write failed (no write has succeeded since) within
    /// the last [`JOURNAL_FAILURE_SHOWN`]: new events are refused meanwhile. Past that the
    /// store is reported ready again, so that a load balancer that stopped sending events
    /// sends some again, and the next write says whether the disk has room now (no event
    /// arrives to find out otherwise).
    pub fn journal_failing(&self) -> bool {
        let at = self
            .shared
            .journal_failed_ms
            .load(std::sync::atomic::Ordering::SeqCst);
        at != 0
            && crate::model::now_ms().saturating_sub(at) < JOURNAL_FAILURE_SHOWN.as_millis() as u64
    }

    fn writer_stopped(&self) -> bool {
        // The handle is taken by [`Store::closer`] when courier shuts down.
        self.shared
            .writer
            .lock()
            .expect("writer handle")
            .as_ref()
            .is_some_and(|h| h.is_finished())
    }

    /// What a caller is told when the writer or the journal thread is no longer there.
    fn gone(&self) -> StoreError {
        match self.check() {
            Ok(()) => StoreError::Closed,
            Err(e) => e,
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Command,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())?
    }

    /// Commits an event with its deliveries; returns once it is on disk (in the ingest
    /// journal; the database may apply it a moment later: see [`Store::settle`]).
    ///
    /// An append with an idempotency key or a chosen id is answered by the writer once the
    /// database has it (its answer depends on what the database holds). While the database
    /// cannot commit (a full disk), the writer keeps retrying, and such a caller gets
    /// [`StoreError::Behind`] after [`APPLY_WAIT`] instead of waiting without end; its event
    /// may still be accepted, and asking again with the same key or id tells.
    pub async fn append(&self, batch: AppendBatch) -> Result<AppendResult, StoreError> {
        // The journal could take more, but nothing would apply it before a restart: the
        // producer is better told now than after the journal fills.
        if self.shared.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Broken);
        }
        let needs_writer = !journaler::creates_for_sure(&batch);
        let (tx, rx) = oneshot::channel();
        self.journal
            .send(journaler::Append::Event(batch, tx))
            .await
            .map_err(|_| self.gone())?;
        if !needs_writer {
            // The journal thread answers within its own bound (a checkpoint it waits for).
            return rx.await.map_err(|_| self.gone())?;
        }
        match tokio::time::timeout(APPLY_WAIT, rx).await {
            Ok(answer) => answer.map_err(|_| self.gone())?,
            Err(_) => Err(StoreError::Behind(format!(
                "the database has not applied this event within {APPLY_WAIT:?} (see the log \
                 for its write errors); it may still be accepted: send it again with the same \
                 idempotency key or id to learn its outcome"
            ))),
        }
    }

    /// Returns once every append handed to the journal before this call is in the writer's
    /// queue (or was refused), so that a change sent to the writer after it is applied after
    /// them. An append whose caller went away (a producer that hung up) is still written once
    /// it was handed over; an endpoint's delete waits for those before it drops what is
    /// queued for the endpoint (see [`crate::gate`]).
    pub async fn journal_barrier(&self) {
        let (tx, rx) = oneshot::channel();
        if self
            .journal
            .send(journaler::Append::Barrier(tx))
            .await
            .is_ok()
        {
            // Dropped unanswered only when the journal thread stopped, taking nothing more.
            let _ = rx.await;
        }
    }

    /// Waits until the database shows every event acknowledged before this call (the writer
    /// applies journaled events a moment after their producers were answered). Readers that
    /// must see what was just ingested call this first: the API before every request but the
    /// ingest routes, a delivery worker before it looks for due work.
    pub async fn settle(&self) -> Result<(), StoreError> {
        use progress::Unsettled;
        match self.shared.progress.settle(SETTLE_TIMEOUT).await {
            Ok(()) => Ok(()),
            Err(Unsettled::Closed) => Err(StoreError::Closed),
            Err(Unsettled::TimedOut(target)) => Err(StoreError::Behind(format!(
                "the database has not applied the ingest journal's records up to {target} \
                 within {SETTLE_TIMEOUT:?} (see the log for the write errors)"
            ))),
        }
    }

    /// How long acknowledged events have waited for a database that applies none of them
    /// (`None`: it holds them all, or is moving).
    pub fn stuck_for(&self) -> Option<std::time::Duration> {
        self.shared.progress.stuck_for()
    }

    /// Whether the database already shows every acknowledged event ([`Store::settle`]
    /// would return at once).
    pub fn is_settled(&self) -> bool {
        self.shared.progress.settled()
    }

    /// Like [`Store::settle`], but gives up after `timeout`; says whether the database
    /// caught up. For readers that would rather show figures a moment old than none (the
    /// metrics scrape, which must answer while the database is in trouble).
    pub async fn settle_within(&self, timeout: std::time::Duration) -> bool {
        self.shared.progress.settle(timeout).await.is_ok()
    }

    /// Records an attempt and the delivery's next state in one transaction.
    pub async fn record_outcome(&self, rec: OutcomeRecord) -> Result<Decided, StoreError> {
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering;
            let fail = &self.shared.fail_outcomes;
            if fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(StoreError::Db("injected: no space left on device".into()));
            }
        }
        self.call(|tx| Command::Outcome(rec, tx)).await
    }

    /// Test-only: every write transaction fails (as on a full disk) while `on`.
    #[cfg(test)]
    pub(crate) fn fail_writes(&self, on: bool) {
        self.shared
            .fail_applies
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Test-only: makes every journal write fail (as on a full disk) while `on`.
    #[cfg(test)]
    pub(crate) fn fail_journal_writes(&self, on: bool) {
        self.shared
            .fail_journal
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Test-only: makes the next `n` outcomes fail.
    #[cfg(test)]
    pub(crate) fn fail_next_outcomes(&self, n: u32) {
        self.shared
            .fail_outcomes
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Starts a new round of attempts for finished deliveries, except those that finished
    /// before their endpoint of that name was made (`births`).
    pub async fn replay(
        &self,
        target: ReplayTarget,
        births: Births,
    ) -> Result<ReplayResult, StoreError> {
        let result = self.call(|tx| Command::Replay(target, births, tx)).await?;
        // The writer logs each one it skips (a replay is an operator's request).
        for id in &result.unreadable {
            self.shared.count_damaged(id);
        }
        Ok(result)
    }

    /// One round of a retention sweep: examines up to `limit` finished deliveries from
    /// `cursor` on and deletes those last changed before `before_ms` (with their events once
    /// no delivery of theirs remains), then up to `limit` idempotency records created before
    /// `idempotency_before_ms`.
    pub async fn purge(
        &self,
        before_ms: u64,
        idempotency_before_ms: u64,
        limit: usize,
        cursor: PurgeCursor,
    ) -> Result<PurgeRound, StoreError> {
        self.call(|reply| Command::Purge {
            before_ms,
            idempotency_before_ms,
            limit,
            cursor,
            reply,
        })
        .await
    }

    /// Creates or advances a workflow channel (see [`ChannelChange`]).
    pub async fn channel_change(&self, change: ChannelChange) -> Result<AdvanceResult, StoreError> {
        self.call(|tx| Command::Channel(change, tx)).await
    }

    /// Writes an API endpoint (see [`EndpointWrite`]); `false` on a name conflict or absence.
    pub async fn write_endpoint(&self, w: EndpointWrite) -> Result<bool, StoreError> {
        self.call(|tx| Command::Endpoint(w, tx)).await
    }

    /// Pauses (`true`) or resumes the config-file endpoint `name`; durable once it returns.
    pub async fn set_config_paused(&self, name: &str, paused: bool) -> Result<(), StoreError> {
        self.call(|reply| Command::ConfigPause {
            name: name.to_string(),
            paused,
            reply,
        })
        .await
    }

    /// The config-file endpoints paused through the API.
    pub fn config_paused(&self) -> Result<Vec<String>, StoreError> {
        self.meta_names(CONFIG_PAUSED)
    }

    /// The names after `prefix` of the [`META`] keys that start with it.
    fn meta_names(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let mut names = Vec::new();
        for row in meta.range(prefix..)? {
            let (k, _) = row?;
            match k.value().strip_prefix(prefix) {
                Some(name) => names.push(name.to_string()),
                None => break,
            }
        }
        Ok(names)
    }

    /// Endpoints deleted with their pending deliveries to drop whose drop has not finished
    /// (courier stopped, or a page failed, in between).
    pub fn unfinished_drops(&self) -> Result<Vec<String>, StoreError> {
        self.meta_names(DROPPING)
    }

    /// Drops up to `limit` of `endpoint`'s pending deliveries, with `reason`; returns how
    /// many it dropped (fewer than `limit`: none are left, and a delete's promise to drop
    /// them is kept). In pages, so that a large backlog never holds the writer for long.
    /// A `limit` of 0 drops nothing and lets a delete's promise go.
    pub async fn drop_pending(
        &self,
        endpoint: &str,
        reason: &str,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.call(|reply| Command::DropPending {
            endpoint: endpoint.to_string(),
            reason: reason.to_string(),
            limit,
            reply,
        })
        .await
    }

    /// Every stored API endpoint (name, JSON).
    pub fn endpoints(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ENDPOINTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    pub fn channel(&self, id: &str) -> Result<Option<Channel>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CHANNELS)?;
        match t.get(id)? {
            Some(v) => Ok(Some(decode(v.value(), "channel")?)),
            None => Ok(None),
        }
    }

    /// Workflow timers but upstream calls (see [`Store::due_upstream_calls`]) due at
    /// `now_ms` (at most `limit`, skipping channels in `skip`), and the next due time beyond
    /// them.
    pub fn due_timers(
        &self,
        now_ms: u64,
        limit: usize,
        skip: &HashSet<String>,
    ) -> Result<DueTimers, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(TIMERS)?;
        let mut due = Vec::new();
        for row in t.iter()? {
            let (k, _) = row?;
            let (at, id, code) = k.value();
            if skip.contains(id) {
                continue;
            }
            if at > now_ms {
                return Ok((due, Some(at)));
            }
            if due.len() >= limit {
                return Ok((due, Some(at)));
            }
            if let Some(kind) = TimerKind::from_code(code) {
                due.push((at, id.to_string(), kind));
            }
        }
        Ok((due, None))
    }

    /// Upstream calls of `workflow` due at `now_ms`, oldest due first (at most `limit`,
    /// skipping channels in `skip`), and the next due time beyond them.
    pub fn due_upstream_calls(
        &self,
        workflow: &str,
        now_ms: u64,
        limit: usize,
        skip: &HashSet<String>,
    ) -> Result<DueTimers, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(UPSTREAM_TIMERS)?;
        let mut due = Vec::new();
        for row in t.range((workflow, 0, "")..=(workflow, u64::MAX, "\u{10ffff}"))? {
            let (k, _) = row?;
            let (_, at, id) = k.value();
            if skip.contains(id) {
                continue;
            }
            if at > now_ms || due.len() >= limit {
                return Ok((due, Some(at)));
            }
            due.push((at, id.to_string(), TimerKind::Upstream));
        }
        Ok((due, None))
    }

    /// Every workflow with upstream calls waiting in its queue that `counted` selects, and
    /// how many (at most `cap` counted per workflow).
    pub fn upstream_queues(
        &self,
        cap: u64,
        counted: impl Fn(&str) -> bool,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(UPSTREAM_TIMERS)?;
        let mut out = Vec::new();
        let mut from: Option<String> = None;
        loop {
            // The next workflow's first row: past every key of the last one (channel ids
            // are UUIDs, far below U+10FFFF).
            let first = match &from {
                None => t.iter()?.next(),
                Some(w) => t.range((w.as_str(), u64::MAX, "\u{10ffff}")..)?.next(),
            };
            let Some(row) = first else {
                return Ok(out);
            };
            let workflow = row?.0.value().0.to_string();
            if !counted(&workflow) {
                from = Some(workflow);
                continue;
            }
            let mut n = 0;
            for row in
                t.range((workflow.as_str(), 0, "")..=(workflow.as_str(), u64::MAX, "\u{10ffff}"))?
            {
                row?;
                n += 1;
                if n >= cap {
                    break;
                }
            }
            out.push((workflow.clone(), n));
            from = Some(workflow);
        }
    }

    /// Deliveries of `endpoint` due at `now_ms`, oldest due first, at most `limit`, skipping
    /// those in `skip` (already in flight) and starting after the queue position `after` (the
    /// last one the caller took, so that a busy endpoint's in-flight entries are not
    /// re-scanned on every call).
    pub fn due(
        &self,
        endpoint: &str,
        now_ms: u64,
        limit: usize,
        skip: &HashSet<String>,
        after: Option<(u64, &str)>,
    ) -> Result<DuePage, StoreError> {
        use std::ops::Bound;
        let txn = self.db.begin_read()?;
        let queue = txn.open_table(QUEUE)?;
        let deliveries = txn.open_table(DELIVERIES)?;
        let mut page = DuePage::default();
        let start = match after {
            Some((due, id)) => Bound::Excluded((endpoint, due, id)),
            None => Bound::Included((endpoint, 0u64, "")),
        };
        let end = Bound::Excluded((endpoint, u64::MAX, ""));
        for row in queue.range::<(&str, u64, &str)>((start, end))? {
            let (k, _) = row?;
            let (_, due, id) = k.value();
            if skip.contains(id) {
                continue;
            }
            if due > now_ms {
                page.next_due_ms = Some(due);
                break;
            }
            if page.due.len() >= limit {
                break;
            }
            if let Some(v) = deliveries.get(id)? {
                // A damaged record is passed over: failing the page would stop the whole
                // endpoint's queue behind it for good. It stays as it is, for an operator.
                match decode::<Delivery>(v.value(), "delivery") {
                    Ok(d) => page.due.push(d),
                    Err(e) => self.shared.found_damaged(
                        &format!("the delivery queue of `{endpoint}`"),
                        id,
                        &e,
                    ),
                }
                page.last = Some((due, id.to_string()));
            }
        }
        Ok(page)
    }

    /// The oldest pending delivery of `endpoint` (ingest order), for FIFO endpoints.
    pub fn head(&self, endpoint: &str) -> Result<Option<Delivery>, StoreError> {
        let txn = self.db.begin_read()?;
        let pending = txn.open_table(PENDING)?;
        let deliveries = txn.open_table(DELIVERIES)?;
        let first = pending
            .range((endpoint, "")..(endpoint, "\u{10ffff}"))?
            .next();
        match first {
            Some(row) => {
                let (k, _) = row?;
                let id = k.value().1;
                match deliveries.get(id)? {
                    Some(v) => Ok(Some(decode(v.value(), "delivery")?)),
                    // An index that names a missing delivery: said loudly (the worker logs it
                    // at every look), not taken for an empty queue behind which the rest
                    // would wait unseen.
                    None => Err(StoreError::Corrupt(format!(
                        "the pending index of `{endpoint}` names delivery {id}, which is missing"
                    ))),
                }
            }
            None => Ok(None),
        }
    }

    pub fn delivery(&self, id: &str) -> Result<Option<Delivery>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(DELIVERIES)?;
        match t.get(id)? {
            Some(v) => Ok(Some(decode(v.value(), "delivery")?)),
            None => Ok(None),
        }
    }

    /// The reply first given to an ingest with this idempotency key, if any. A keyed append
    /// is answered only once the database has it, so this sees every key already answered.
    pub fn idempotent_reply(&self, key: &IdempotencyKey) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(IDEMPOTENCY)?;
        Ok(t.get((key.key_id.as_str(), key.key.as_str()))?
            .map(|v| v.value().1.to_vec()))
    }

    pub fn event(&self, id: &str) -> Result<Option<Event>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(EVENTS)?;
        match t.get(id)? {
            Some(v) => Ok(Some(decode(v.value(), "event")?)),
            None => Ok(None),
        }
    }

    /// Every attempt of a delivery, in order.
    pub fn attempts(&self, id: &str) -> Result<Vec<Attempt>, StoreError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(ATTEMPTS)?;
        let mut out = Vec::new();
        for row in t.range((id, 0u32)..=(id, u32::MAX))? {
            let (_, v) = row?;
            out.push(decode(v.value(), "attempt")?);
        }
        Ok(out)
    }

    /// Deliveries matching `filter`, newest first, after `cursor` (a delivery id from the
    /// previous page). Returns the page and the cursor for the next one.
    pub fn list(
        &self,
        filter: &Filter,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<(Vec<Delivery>, Option<String>), StoreError> {
        let txn = self.db.begin_read()?;
        let deliveries = txn.open_table(DELIVERIES)?;
        let (lo, mut hi) = id_range("dlv", filter.since_ms, filter.until_ms);
        if let Some(c) = cursor
            && c < hi.as_str()
        {
            hi = c.to_string();
        }
        let mut out = Vec::new();
        let mut examined = 0;
        let mut last_examined = None;
        // One more than the page: a next page is promised only when there is one.
        let want = limit.saturating_add(1);
        let mut consider = |id: &str, out: &mut Vec<Delivery>| -> Result<bool, StoreError> {
            examined += 1;
            last_examined = Some(id.to_string());
            if let Some(v) = deliveries.get(id)? {
                // One damaged record does not make every page that holds it unreadable.
                let d: Delivery = match decode(v.value(), "delivery") {
                    Ok(d) => d,
                    Err(e) => {
                        self.shared.found_damaged("a listing", id, &e);
                        return Ok(out.len() >= want || examined >= SCAN_CAP);
                    }
                };
                if filter.endpoint.as_deref().is_none_or(|e| e == d.endpoint)
                    && filter.status.is_none_or(|s| s == d.status)
                {
                    out.push(d);
                }
            }
            Ok(out.len() >= want || examined >= SCAN_CAP)
        };
        let mut exhausted = true;
        if filter.status == Some(DeliveryStatus::Pending) {
            // Pending deliveries are indexed per endpoint: merge the endpoints' ranges, newest
            // first.
            let idx = txn.open_table(PENDING)?;
            let endpoints = match &filter.endpoint {
                Some(e) => vec![e.clone()],
                None => endpoints_with_pending(&txn)?,
            };
            let mut ranges = Vec::with_capacity(endpoints.len());
            for e in &endpoints {
                ranges.push(
                    idx.range((e.as_str(), lo.as_str())..(e.as_str(), hi.as_str()))?
                        .rev(),
                );
            }
            let mut heads = std::collections::BinaryHeap::new();
            for (i, r) in ranges.iter_mut().enumerate() {
                if let Some(row) = r.next() {
                    heads.push((row?.0.value().1.to_string(), i));
                }
            }
            while let Some((id, i)) = heads.pop() {
                if consider(&id, &mut out)? {
                    exhausted = false;
                    break;
                }
                if let Some(row) = ranges[i].next() {
                    heads.push((row?.0.value().1.to_string(), i));
                }
            }
        } else if let (Some(DeliveryStatus::Dead), Some(endpoint)) =
            (filter.status, filter.endpoint.as_deref())
        {
            // One endpoint's dead-letter queue has an index of its own.
            let idx = txn.open_table(DEAD_BY_ENDPOINT)?;
            for row in idx
                .range((endpoint, lo.as_str())..(endpoint, hi.as_str()))?
                .rev()
            {
                let (k, _) = row?;
                if consider(k.value().1, &mut out)? {
                    exhausted = false;
                    break;
                }
            }
        } else if let Some(status) = filter.status {
            let idx = txn.open_table(BY_STATUS)?;
            for row in idx
                .range((status.as_str(), lo.as_str())..(status.as_str(), hi.as_str()))?
                .rev()
            {
                let (k, _) = row?;
                if consider(k.value().1, &mut out)? {
                    exhausted = false;
                    break;
                }
            }
        } else {
            for row in deliveries.range(lo.as_str()..hi.as_str())?.rev() {
                let (k, _) = row?;
                if consider(k.value(), &mut out)? {
                    exhausted = false;
                    break;
                }
            }
        }
        let next = if out.len() > limit {
            out.truncate(limit);
            out.last().map(|d| d.id.clone())
        } else if exhausted {
            None
        } else {
            // The scan cap was reached: the next page goes on from where this one looked.
            last_examined
        };
        Ok((out, next))
    }

    /// The write path's counters: commits, the changes they carried, the commits flushed to
    /// the database file, and the journal's writes.
    pub fn commit_counters(&self) -> CommitCounters {
        CommitCounters {
            commits: self.shared.commits.clone(),
            commands: self.shared.commands.clone(),
            durable: self.shared.durable_commits.clone(),
            journal_writes: self.shared.journal_writes.clone(),
            journal_stalled: self.shared.journal_stalled.clone(),
            journal_errors: self.shared.journal_errors.clone(),
            damaged: self.shared.damaged_found.clone(),
        }
    }

    /// Ingest-journal records re-applied when the store was opened: events acknowledged
    /// before a crash that the database's last durable commit did not yet hold.
    pub fn replayed_on_open(&self) -> usize {
        self.shared.replayed
    }

    /// Deliveries per (endpoint, status), exact, from memory.
    pub fn counts(&self) -> BTreeMap<(String, DeliveryStatus), u64> {
        self.shared.counts.read().expect("counts lock").clone()
    }

    /// Drops `endpoint`'s count of `status` if it is 0 (a missing count reads as 0
    /// everywhere). Counts are kept in memory for every (endpoint, status) that had one;
    /// without this, each endpoint deleted keeps its zeros until the next start. Called once
    /// the metrics have taken the endpoint's series away (see `api::health`), which they do
    /// on seeing the zero.
    pub fn forget_zero_count(&self, endpoint: &str, status: DeliveryStatus) {
        let mut counts = self.shared.counts.write().expect("counts lock");
        let key = (endpoint.to_string(), status);
        if counts.get(&key) == Some(&0) {
            counts.remove(&key);
        }
    }

    /// Pending deliveries of one endpoint.
    pub fn pending_count(&self, endpoint: &str) -> u64 {
        self.shared
            .counts
            .read()
            .expect("counts lock")
            .get(&(endpoint.to_string(), DeliveryStatus::Pending))
            .copied()
            .unwrap_or(0)
    }

    /// The attempts of `endpoint` (every endpoint if `None`) from the minute of `since_ms`
    /// on, summed from the per-minute rollups (one row read per endpoint and minute).
    pub fn attempt_stats(
        &self,
        since_ms: u64,
        endpoint: Option<&str>,
    ) -> Result<Rollup, StoreError> {
        let txn = self.db.begin_read()?;
        rollup::sum(&txn.open_table(ROLLUPS)?, endpoint, since_ms)
    }

    /// The time the oldest pending delivery has waited since it was created, across all
    /// endpoints, from the pending index.
    pub fn oldest_pending_ms(&self) -> Result<Option<u64>, StoreError> {
        let txn = self.db.begin_read()?;
        let idx = txn.open_table(PENDING)?;
        let mut oldest: Option<String> = None;
        for e in endpoints_with_pending(&txn)? {
            if let Some(row) = idx
                .range((e.as_str(), "")..(e.as_str(), "\u{10ffff}"))?
                .next()
            {
                let id = row?.0.value().1.to_string();
                if oldest.as_ref().is_none_or(|o| id < *o) {
                    oldest = Some(id);
                }
            }
        }
        Ok(oldest.and_then(|id| {
            id.strip_prefix("dlv_")
                .and_then(|u| ulid::Ulid::from_string(u).ok())
                .map(|u| u.timestamp_ms())
        }))
    }
}

/// The endpoints with at least one pending delivery in the snapshot `txn` reads.
fn endpoints_with_pending(txn: &redb::ReadTransaction) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for row in txn.open_table(COUNTS)?.iter()? {
        let (k, v) = row?;
        let (endpoint, status) = k.value();
        if status == DeliveryStatus::Pending.as_str() && v.value() > 0 {
            out.push(endpoint.to_string());
        }
    }
    Ok(out)
}

/// Builds the attempt rollups of a database made before them from its attempt log, and
/// deletes the log (it is written no more). Runs once, in the transaction that opens such a
/// database.
fn build_rollups(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut rows: BTreeMap<(String, u64), Rollup> = BTreeMap::new();
    {
        let log = txn.open_table(ATTEMPT_LOG)?;
        for row in log.iter()? {
            let (k, v) = row?;
            let (started_ms, _, number) = k.value();
            let e: AttemptLogEntry = decode(v.value(), "attempt log")?;
            rows.entry((e.endpoint, rollup::minute(started_ms)))
                .or_default()
                .add(Some(e.duration_ms), e.success, number == 1);
        }
    }
    if !rows.is_empty() {
        tracing::info!(
            rows = rows.len(),
            "attempt statistics: built per-minute rollups from the attempt log"
        );
    }
    let mut t = txn.open_table(ROLLUPS)?;
    for ((endpoint, minute), r) in &rows {
        t.insert((endpoint.as_str(), *minute), encode(r).as_slice())?;
    }
    drop(t);
    txn.delete_table(ATTEMPT_LOG)?;
    Ok(())
}

/// Builds the per-endpoint dead index of a database made before it, from the status index.
/// Runs once, in the transaction that opens such a database.
fn build_dead_by_endpoint(
    txn: &redb::WriteTransaction,
    by_status: &redb::Table<(&str, &str), ()>,
) -> Result<(), StoreError> {
    let deliveries = txn.open_table(DELIVERIES)?;
    let mut index = txn.open_table(DEAD_BY_ENDPOINT)?;
    let dead = DeliveryStatus::Dead.as_str();
    for row in by_status.range((dead, "")..(dead, "\u{10ffff}"))? {
        let (k, _) = row?;
        let id = k.value().1;
        if let Some(v) = deliveries.get(id)? {
            let d: Delivery = decode(v.value(), "delivery")?;
            index.insert((d.endpoint.as_str(), id), ())?;
        }
    }
    Ok(())
}

/// Moves the upstream-call timers of a format 1 database from [`TIMERS`] to their workflow's
/// queue in [`UPSTREAM_TIMERS`] (format 2). Runs once, in the transaction that opens such a
/// database; a timer whose channel is gone is dropped, as firing it would have.
fn move_upstream_timers(
    txn: &redb::WriteTransaction,
    channels: &redb::Table<&str, &[u8]>,
) -> Result<(), StoreError> {
    let upstream = TimerKind::Upstream.code();
    let mut timers = txn.open_table(TIMERS)?;
    let mut queues = txn.open_table(UPSTREAM_TIMERS)?;
    let mut moved = Vec::new();
    for row in timers.iter()? {
        let (k, _) = row?;
        let (due, id, code) = k.value();
        if code == upstream {
            moved.push((due, id.to_string()));
        }
    }
    for (due, id) in &moved {
        timers.remove((*due, id.as_str(), upstream))?;
        if let Some(v) = channels.get(id.as_str())? {
            let ch: Channel = decode(v.value(), "channel")?;
            queues.insert((ch.workflow.as_str(), *due, id.as_str()), ())?;
        }
    }
    if !moved.is_empty() {
        tracing::info!(
            timers = moved.len(),
            "workflow upstream calls: moved to a queue per workflow"
        );
    }
    Ok(())
}

/// A database file whose writes can be made to fail, for tests of a failing disk.
#[cfg(test)]
mod failing {
    use std::ops::Bound;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use redb::backends::FileBackend;
    use redb::{BackendError, StorageBackend};

    // What the backend's I/O methods return without redb's experimental API.
    type BackendIoError = std::io::Error;

    #[derive(Debug)]
    pub struct FailingFile {
        inner: FileBackend,
        pub fail: Arc<AtomicBool>,
    }

    impl FailingFile {
        pub fn new(file: std::fs::File) -> Result<Self, redb::DatabaseError> {
            Ok(FailingFile {
                inner: FileBackend::new(file)?,
                fail: Arc::default(),
            })
        }

        fn check(&self) -> Result<(), BackendIoError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            Ok(())
        }
    }

    impl StorageBackend for FailingFile {
        fn len(&self) -> Result<u64, BackendIoError> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
            self.check()?;
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> Result<(), BackendIoError> {
            self.check()?;
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
            self.check()?;
            self.inner.write(offset, data)
        }
        fn close(&self) -> Result<(), BackendIoError> {
            self.inner.close()
        }
        fn try_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(s, e)
        }
        fn try_lock_shared_range(
            &self,
            s: Bound<u64>,
            e: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(s, e)
        }
        fn lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_range(s, e)
        }
        fn lock_shared_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_shared_range(s, e)
        }
        fn unlock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(s, e)
        }
        fn query_lock_range(&self, s: Bound<u64>, e: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.query_lock_range(s, e)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::new_id;

    pub(crate) fn batch(key: &str, created_ms: u64) -> AppendBatch {
        let id = new_id("evt");
        let d = Delivery {
            id: new_id("dlv"),
            event_id: id.clone(),
            endpoint: "e".into(),
            event_type: "t".into(),
            status: DeliveryStatus::Pending,
            attempts: 0,
            round_attempts: 0,
            next_due_ms: Some(created_ms),
            created_ms,
            updated_ms: created_ms,
            last_error: None,
        };
        AppendBatch {
            event: Event {
                id,
                event_type: "t".into(),
                content_type: "application/json".into(),
                payload: b"{}".to_vec(),
                created_ms,
                delivery_ids: vec![d.id.clone()],
                headers: Vec::new(),
            },
            deliveries: vec![d],
            idempotency: Some(IdempotencyKey {
                key_id: "k".into(),
                key: key.into(),
            }),
            reply: key.as_bytes().to_vec(),
            id_supplied: false,
        }
    }

    /// A store on `dir/live/courier.redb`.
    fn live_store(dir: &Path) -> (std::path::PathBuf, Store) {
        let db = dir.join("live").join("courier.redb");
        std::fs::create_dir_all(db.parent().unwrap()).unwrap();
        let store = Store::open(&db, true).unwrap();
        (db, store)
    }

    /// Copies the database and its journal files next to `db` into `to`: what a power cut
    /// leaves behind, taken while the store runs.
    fn copy_data_files(db: &Path, to: &Path) {
        for name in ["courier.redb", "courier.journal", "courier.journal2"] {
            std::fs::copy(db.with_file_name(name), to.join(name)).unwrap();
        }
    }

    /// The format recorded in the database at `path` (the store must be closed).
    fn recorded_format(path: &Path) -> Option<u64> {
        let db = Database::create(path).unwrap();
        let txn = db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        meta.get(FORMAT).unwrap().map(|v| v.value())
    }

    /// Records `format` in the database at `path` (none: removes it), as another build of
    /// courier would have (the store must be closed).
    fn set_recorded_format(path: &Path, format: Option<u64>) {
        let db = Database::create(path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            match format {
                Some(f) => drop(meta.insert(FORMAT, f).unwrap()),
                None => drop(meta.remove(FORMAT).unwrap()),
            }
        }
        txn.commit().unwrap();
    }

    fn closed(store: Store) {
        let closer = store.closer();
        drop(store);
        assert!(closer.wait(std::time::Duration::from_secs(10)));
    }

    #[tokio::test]
    async fn a_data_dir_of_a_newer_format_is_refused_and_left_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("courier.redb");
        let store = Store::open(&path, true).unwrap();
        let b = batch("k", 1_000);
        let event_id = b.event.id.clone();
        store.append(b).await.unwrap();
        closed(store);
        assert_eq!(recorded_format(&path), Some(FORMAT_VERSION));

        // A later courier moved the data dir on to the next format.
        set_recorded_format(&path, Some(FORMAT_VERSION + 1));
        let err = match Store::open(&path, true) {
            Err(e) => e,
            Ok(_) => panic!("a newer format was opened"),
        };
        assert!(
            matches!(err, StoreError::NewerFormat { found, supported }
                if found == FORMAT_VERSION + 1 && supported == FORMAT_VERSION),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("newer courier"), "{text}");
        assert_eq!(recorded_format(&path), Some(FORMAT_VERSION + 1));

        // Back at this build's format (as a downgrade migration would leave it), it opens
        // and holds what it held.
        set_recorded_format(&path, Some(FORMAT_VERSION));
        let store = Store::open(&path, true).unwrap();
        assert!(store.event(&event_id).unwrap().is_some());
    }

    /// A FIFO endpoint's queue whose first entry names a delivery that is gone is reported
    /// as damage, not taken for an empty queue (behind which every later delivery of the
    /// endpoint would wait unseen).
    #[tokio::test]
    async fn a_queue_head_that_names_a_missing_delivery_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("courier.redb");
        let store = Store::open(&path, true).unwrap();
        let first = batch("k1", 1_000);
        let missing = first.deliveries[0].id.clone();
        store.append(first).await.unwrap();
        store.append(batch("k2", 2_000)).await.unwrap();
        assert_eq!(store.head("e").unwrap().unwrap().id, missing);
        closed(store);
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            drop(
                txn.open_table(DELIVERIES)
                    .unwrap()
                    .remove(missing.as_str())
                    .unwrap(),
            );
            txn.commit().unwrap();
        }
        let store = Store::open(&path, true).unwrap();
        match store.head("e") {
            Err(StoreError::Corrupt(text)) => {
                assert!(text.contains(&missing) && text.contains("`e`"), "{text}")
            }
            other => panic!("a missing head was answered {other:?}"),
        }
        // Other endpoints' queues are unaffected.
        assert!(store.head("other").unwrap().is_none());
    }

    #[tokio::test]
    async fn a_database_from_before_the_format_was_recorded_is_format_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("courier.redb");
        let store = Store::open(&path, true).unwrap();
        let b = batch("k", 1_000);
        let event_id = b.event.id.clone();
        store.append(b).await.unwrap();
        let mut ch = channel("a", crate::model::ChannelState::Pending, 1, 1_000);
        ch.timers = vec![(5, TimerKind::Upstream)];
        store
            .channel_change(ChannelChange {
                channel: ch,
                expect_version: None,
                append: None,
            })
            .await
            .unwrap();
        closed(store);
        // As format 1 kept it: the upstream call among the other timers.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(UPSTREAM_TIMERS)
                .unwrap()
                .retain(|_, _| false)
                .unwrap();
            txn.open_table(TIMERS)
                .unwrap()
                .insert((5, "a", TimerKind::Upstream.code()), ())
                .unwrap();
            txn.commit().unwrap();
        }
        set_recorded_format(&path, None);
        assert_eq!(recorded_format(&path), None);
        // Nor a journal id: builds with workflows came before it.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            drop(txn.open_table(META).unwrap().remove(JOURNAL_ID).unwrap());
            txn.commit().unwrap();
        }
        let store = Store::open(&path, true).unwrap();
        assert!(store.event(&event_id).unwrap().is_some());
        // Counted as format 1, and migrated from there.
        let due = store
            .due_upstream_calls("w", 100, 10, &HashSet::new())
            .unwrap();
        assert_eq!(due.0.len(), 1, "{due:?}");
        closed(store);
        assert_eq!(recorded_format(&path), Some(FORMAT_VERSION));
    }

    #[tokio::test]
    async fn a_database_with_an_attempt_log_gets_its_rollups_once_and_retention_drops_old_minutes()
    {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        // A database of an earlier version: statistics in a log of attempts.
        let minute = 60_000u64;
        let old = 1_000 * minute; // minute 1,000
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(ATTEMPT_LOG).unwrap();
                let entry = |endpoint: &str, duration_ms, success| {
                    encode(&AttemptLogEntry {
                        endpoint: endpoint.into(),
                        duration_ms,
                        success,
                    })
                };
                // "a": two deliveries, one retried; "b": one slow attempt a minute later.
                log.insert((old + 5, "dlv_1", 1), entry("a", 10, false).as_slice())
                    .unwrap();
                log.insert((old + 900, "dlv_1", 2), entry("a", 12, true).as_slice())
                    .unwrap();
                log.insert((old + 1_000, "dlv_2", 1), entry("a", 14, true).as_slice())
                    .unwrap();
                log.insert(
                    (old + minute, "dlv_3", 1),
                    entry("b", 2_000, false).as_slice(),
                )
                .unwrap();
            }
            txn.commit().unwrap();
        }
        let check = |store: &Store| {
            let a = store.attempt_stats(0, Some("a")).unwrap();
            assert_eq!((a.attempts, a.successes, a.first_attempts), (3, 2, 2));
            assert_eq!(a.percentile(0.5), Some(12));
            let all = store.attempt_stats(0, None).unwrap();
            assert_eq!((all.attempts, all.successes, all.first_attempts), (4, 2, 3));
            let p99 = all.percentile(0.99).unwrap();
            assert!((2_000..=2_125).contains(&p99), "{p99}");
            // A window from the second minute on holds only "b".
            let late = store.attempt_stats(old + minute, None).unwrap();
            assert_eq!(late.attempts, 1);
        };
        let store = Store::open(&path, true).unwrap();
        check(&store);
        let closer = store.closer();
        drop(store);
        assert!(closer.wait(std::time::Duration::from_secs(10)));
        // Opened again: built once, not twice, and the log is gone.
        let store = Store::open(&path, true).unwrap();
        check(&store);
        {
            let txn = store.db.begin_read().unwrap();
            assert!(txn.open_table(ATTEMPT_LOG).is_err(), "the log was deleted");
        }
        // Retention drops the minutes wholly before its cutoff: here the first one.
        store
            .purge(old + minute, 0, 100, PurgeCursor::default())
            .await
            .unwrap();
        assert_eq!(
            store.attempt_stats(0, Some("a")).unwrap(),
            Rollup::default()
        );
        assert_eq!(store.attempt_stats(0, None).unwrap().attempts, 1);
    }

    /// Plain appends are answered by a task on the runtime the store was opened in; without
    /// one, or once it is gone, the journal thread answers them itself.
    #[test]
    fn appends_are_answered_with_or_without_the_runtime_the_store_was_opened_in() {
        let plain = || AppendBatch {
            idempotency: None,
            reply: Vec::new(),
            ..batch("unused", 1_000)
        };
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let outside = Store::open(&dir.path().join("a.redb"), true).unwrap();
        let rt = runtime();
        assert_eq!(
            rt.block_on(outside.append(plain())).unwrap(),
            AppendResult::Created
        );

        let first = runtime();
        let inside = first.block_on(async { Store::open(&dir.path().join("b.redb"), true) });
        let inside = inside.unwrap();
        assert_eq!(
            first.block_on(inside.append(plain())).unwrap(),
            AppendResult::Created
        );
        drop(first);
        assert_eq!(
            rt.block_on(inside.append(plain())).unwrap(),
            AppendResult::Created
        );
        rt.block_on(inside.settle()).unwrap();
        assert_eq!(inside.counts().values().sum::<u64>(), 2);
    }

    #[tokio::test]
    async fn idempotency_keys_expire_by_age_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        assert_eq!(
            store.append(batch("old", 1_000)).await.unwrap(),
            AppendResult::Created
        );
        assert_eq!(
            store.append(batch("new", 5_000)).await.unwrap(),
            AppendResult::Created
        );
        assert_eq!(
            store.append(batch("old", 6_000)).await.unwrap(),
            AppendResult::Replayed(b"old".to_vec())
        );
        // Expire keys created before 2,000 ms: "old" goes, "new" stays.
        store
            .purge(0, 2_000, 100, PurgeCursor::default())
            .await
            .unwrap();
        assert_eq!(
            store.append(batch("old", 7_000)).await.unwrap(),
            AppendResult::Created
        );
        assert_eq!(
            store.append(batch("new", 7_000)).await.unwrap(),
            AppendResult::Replayed(b"new".to_vec())
        );
    }

    /// An append without an idempotency key or a chosen id is answered once its journal
    /// record is on disk; a reader that settles first sees it, and a crash right after the
    /// answer (the database may not have it yet) loses nothing.
    #[tokio::test]
    async fn plain_appends_are_answered_from_the_journal_and_seen_after_settling() {
        let dir = tempfile::tempdir().unwrap();
        let (db, store) = live_store(dir.path());
        let crashed = dir.path().join("crashed");
        std::fs::create_dir_all(&crashed).unwrap();
        let mut ids = Vec::new();
        for i in 0..200u64 {
            let mut b = batch("unused", 1_000 + i);
            b.idempotency = None;
            ids.push(b.event.id.clone());
            assert_eq!(store.append(b).await.unwrap(), AppendResult::Created);
            if i == 150 {
                // The files as a power cut would leave them right after this answer.
                copy_data_files(&db, &crashed);
            }
        }
        store.settle().await.unwrap();
        for id in &ids {
            assert!(
                store.event(id).unwrap().is_some(),
                "{id} not visible after settle"
            );
        }
        assert_eq!(store.pending_count("e"), 200);
        let after = Store::open(&crashed.join("courier.redb"), true).unwrap();
        for id in &ids[..=150] {
            assert!(after.event(id).unwrap().is_some(), "{id} lost");
        }
        assert_eq!(after.pending_count("e"), 151);
    }

    /// Far more than a lap of the journal: the two files take turns, each written over only
    /// after a checkpoint covers it, and a crash at any point loses nothing.
    #[tokio::test]
    async fn the_journal_goes_round_its_files_without_losing_appends() {
        let dir = tempfile::tempdir().unwrap();
        let (db, store) = live_store(dir.path());
        let mut ids = Vec::new();
        let payload = vec![b'x'; 64 * 1024];
        // 64 KiB each: 8 MiB laps turn over every ~128 appends.
        for round in 0..5 {
            let sends = (0..100u64).map(|i| {
                let mut b = batch("unused", 1_000 + i);
                b.idempotency = None;
                b.event.payload = payload.clone();
                ids.push(b.event.id.clone());
                let store = store.clone();
                async move { store.append(b).await }
            });
            for r in futures_util::future::join_all(sends.collect::<Vec<_>>()).await {
                assert_eq!(r.unwrap(), AppendResult::Created);
            }
            let crashed = dir.path().join(format!("crashed{round}"));
            std::fs::create_dir_all(&crashed).unwrap();
            copy_data_files(&db, &crashed);
            let after = Store::open(&crashed.join("courier.redb"), true).unwrap();
            assert_eq!(after.pending_count("e"), ids.len() as u64, "round {round}");
            drop(after);
        }
        // 32 MiB went through 8 MiB laps: each file was written over at least once (a file
        // is taken again only after a checkpoint covers it, so two had to happen), and
        // neither grew beyond a lap and a batch.
        let durable = store.commit_counters().durable;
        assert!(durable.get() >= 2, "checkpoints: {}", durable.get());
        for name in ["courier.journal", "courier.journal2"] {
            let len = std::fs::metadata(db.with_file_name(name)).unwrap().len();
            assert!(len < 2 * journal::LAP_BYTES, "{name}: {len} bytes");
        }
    }

    /// A copy of the data files taken while the store runs is what a power cut leaves behind:
    /// appends committed without a database flush must come back from the journal.
    #[tokio::test]
    async fn appends_acknowledged_through_the_journal_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (db, store) = live_store(dir.path());
        let mut ids = Vec::new();
        for i in 0..50 {
            let b = batch(&format!("k{i}"), 1_000 + i);
            ids.push(b.event.id.clone());
            assert_eq!(store.append(b).await.unwrap(), AppendResult::Created);
        }
        let c = store.commit_counters();
        let (commits, durable) = (c.commits, c.durable);
        assert!(
            commits.get() > durable.get(),
            "appends alone should not flush the database ({} commits, {} durable)",
            commits.get(),
            durable.get()
        );
        // The writer is idle now: every append above has its reply.
        let crashed = dir.path().join("crashed");
        std::fs::create_dir_all(&crashed).unwrap();
        copy_data_files(&db, &crashed);

        let after = Store::open(&crashed.join("courier.redb"), true).unwrap();
        assert!(
            after.replayed_on_open() > 0,
            "nothing came from the journal"
        );
        for id in &ids {
            assert!(after.event(id).unwrap().is_some(), "{id} lost");
        }
        assert_eq!(
            after
                .counts()
                .get(&("e".to_string(), DeliveryStatus::Pending)),
            Some(&50)
        );
        // Idempotency keys came back with their events, and numbering goes on.
        assert_eq!(
            after.append(batch("k7", 9_000)).await.unwrap(),
            AppendResult::Replayed(b"k7".to_vec())
        );
        assert_eq!(
            after.append(batch("k50", 9_000)).await.unwrap(),
            AppendResult::Created
        );
        drop(after);

        // A clean shutdown checkpoints: the next start has nothing to replay.
        let closer = store.closer();
        drop(store);
        assert!(closer.wait(std::time::Duration::from_secs(10)));
        let reopened = Store::open(&db, true).unwrap();
        assert_eq!(reopened.replayed_on_open(), 0);
        assert!(reopened.event(&ids[49]).unwrap().is_some());
    }

    fn to(endpoint: &str, n: u64) -> AppendBatch {
        let mut b = batch(&format!("{endpoint}-{n}"), 1_000 + n);
        b.deliveries[0].endpoint = endpoint.into();
        b
    }

    /// A new API endpoint `x`: a write that is a durable commit of its own.
    fn endpoint_x() -> EndpointWrite {
        EndpointWrite {
            name: "x".into(),
            value: Some(b"{}".to_vec()),
            create: true,
            drop_pending: false,
        }
    }

    /// Endpoints from the config file by these names (so replays may go to them).
    fn config_endpoints(names: &[&str]) -> Births {
        std::sync::Arc::new(names.iter().map(|n| (n.to_string(), 0)).collect())
    }

    /// Appends `n` events for `endpoint`; their delivery ids.
    async fn appended(store: &Store, endpoint: &str, n: u64) -> Vec<String> {
        let mut ids = Vec::new();
        for i in 0..n {
            let b = to(endpoint, i);
            ids.push(b.deliveries[0].id.clone());
            store.append(b).await.unwrap();
        }
        ids
    }

    /// Records one attempt answered `status`, with `next` as its outcome.
    async fn attempted(store: &Store, id: &str, status: u16, next: Next) {
        let attempt = Attempt {
            number: 1,
            started_ms: crate::model::now_ms(),
            duration_ms: 1,
            status_code: Some(status),
            error: None,
            error_detail: None,
            response_body: String::new(),
            outcome: if next == Next::Delivered {
                "delivered"
            } else {
                "dead"
            }
            .into(),
        };
        store
            .record_outcome(OutcomeRecord {
                delivery_id: id.into(),
                read_updated_ms: None,
                attempt,
                counts_as_attempt: true,
                measured: true,
                next,
                may_wait: false,
            })
            .await
            .unwrap();
    }

    async fn deliver(store: &Store, id: &str) {
        attempted(store, id, 200, Next::Delivered).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ingest_is_refused_not_left_hanging_when_the_database_cannot_checkpoint() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        store.shared.fail_applies.store(true, Ordering::SeqCst);
        let event = |n: u64| {
            let mut b = to("e", n);
            b.idempotency = None;
            b.reply.clear();
            b.event.payload = vec![b'7'; 64 << 10];
            b
        };
        // Two laps of the journal are accepted; then the journal would write over records
        // the database has not checkpointed, and appends are refused.
        let mut accepted = Vec::new();
        let mut refused = None;
        for n in 0..400 {
            let b = event(n);
            let id = b.event.id.clone();
            let r = tokio::time::timeout(std::time::Duration::from_secs(15), store.append(b))
                .await
                .expect("an append is answered, not left waiting");
            match r {
                Ok(AppendResult::Created) => accepted.push(id),
                Err(StoreError::Behind(msg)) => {
                    refused = Some(msg);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let msg = refused.expect("refused once two laps are full");
        assert!(msg.contains("not accepted"), "{msg}");
        assert!(accepted.len() * (64 << 10) >= 2 * journal::LAP_BYTES as usize - (1 << 20));
        // The wait shows in the metric operators read (the refused batch waited a second).
        let stalled = store.commit_counters().journal_stalled.get();
        assert!(stalled >= 0.5, "stalled {stalled} s");
        // Once the database can write again, appends are accepted and nothing acknowledged
        // is missing.
        store.shared.fail_applies.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match store.append(event(1_000)).await {
                Ok(_) => break,
                Err(StoreError::Behind(_)) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await
                }
                other => panic!("{other:?}"),
            }
        }
        store.settle().await.unwrap();
        for id in &accepted {
            assert!(store.event(id).unwrap().is_some(), "{id} was acknowledged");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_keyed_append_gets_an_answer_while_the_database_cannot_commit() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        store.shared.fail_applies.store(true, Ordering::SeqCst);
        // Its answer needs the database, which keeps failing: the caller is told so in
        // bounded time instead of waiting for it without end.
        let b = batch("key-1", 1_000);
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(APPLY_WAIT * 3, store.append(b.clone()))
            .await
            .expect("answered, not left waiting");
        match r {
            Err(StoreError::Behind(msg)) => {
                assert!(msg.contains("same idempotency key"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() >= APPLY_WAIT);
        // It was journaled, so once the database can write it is applied, and asking again
        // with the same key returns the first answer: one event, not two.
        store.shared.fail_applies.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while store.settle().await.is_err() {
            assert!(std::time::Instant::now() < deadline, "never applied");
        }
        assert!(store.event(&b.event.id).unwrap().is_some());
        let mut again = batch("key-1", 2_000);
        again.reply = b"second".to_vec();
        match store.append(again.clone()).await.unwrap() {
            AppendResult::Replayed(reply) => assert_eq!(reply, b"key-1"),
            other => panic!("{other:?}"),
        }
        assert!(store.event(&again.event.id).unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dead_writer_stops_ingest_and_every_acknowledged_event_survives() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, true).unwrap();
        store.append(to("e", 0)).await.unwrap();
        store.settle().await.unwrap();
        store.shared.panic_applies.store(true, Ordering::SeqCst);
        // Plain appends are answered by the journal thread: accepted while the writer lives
        // (and as the batch that finds it gone, which is on disk), then refused. The writer
        // lets go of its end only after its panic is reported (a backtrace may take seconds).
        let mut accepted = vec![];
        let mut refused = None;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        for n in 1.. {
            if std::time::Instant::now() > deadline {
                break;
            }
            if n > 1 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let mut b = to("e", n);
            b.idempotency = None;
            let id = b.event.id.clone();
            let r = tokio::time::timeout(std::time::Duration::from_secs(10), store.append(b))
                .await
                .expect("answered, not left waiting");
            match r {
                Ok(AppendResult::Created) => accepted.push(id),
                Err(StoreError::Closed | StoreError::Db(_)) => {
                    refused = Some(id);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let refused = refused.expect("ingest stops once the writer is gone");
        assert!(!accepted.is_empty());
        // Readiness says why, and so does every later change.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.check().is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer is reported"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let mut b = to("e", 300);
        b.idempotency = None;
        match store.append(b).await {
            Err(StoreError::Db(msg)) => assert!(msg.contains("writer has stopped"), "{msg}"),
            other => panic!("{other:?}"),
        }
        drop(store);
        // The next start applies every acknowledged event from the journal, and nothing it
        // refused.
        let store = Store::open(&path, true).unwrap();
        store.settle().await.unwrap();
        for id in &accepted {
            assert!(store.event(id).unwrap().is_some(), "{id} was acknowledged");
        }
        assert!(store.event(&refused).unwrap().is_none());
        store.append(to("e", 500)).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_database_file_that_fails_a_write_is_reported_until_a_restart_applies_the_journal() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, true).unwrap();
        let mut first = to("e", 0);
        first.idempotency = None;
        let first_id = first.event.id.clone();
        store.append(first).await.unwrap();
        store.settle().await.unwrap();
        // The disk fills up: the next commit to the database file fails, and redb refuses
        // everything after that.
        store.shared.fail_io.store(true, Ordering::SeqCst);
        let mut second = to("e", 1);
        second.idempotency = None;
        let second_id = second.event.id.clone();
        store.append(second).await.unwrap(); // on disk in the journal: acknowledged
        let r = store.write_endpoint(endpoint_x()).await;
        assert!(r.is_err(), "{r:?}");
        // The disk has room again; the database file still refuses until it is reopened.
        store.shared.fail_io.store(false, Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while store.check().is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the failed database is reported"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(store.check().unwrap_err().to_string().contains("restart"));
        let mut third = to("e", 2);
        third.idempotency = None;
        assert!(matches!(store.append(third).await, Err(StoreError::Broken)));
        let closer = store.closer();
        drop(store);
        closer.wait(std::time::Duration::from_secs(10));
        // The restart applies the acknowledged event from the journal.
        let store = Store::open(&path, true).unwrap();
        store.settle().await.unwrap();
        assert!(store.check().is_ok());
        for id in [&first_id, &second_id] {
            assert!(store.event(id).unwrap().is_some(), "{id} was acknowledged");
        }
        store.append(to("e", 3)).await.unwrap();
    }

    /// A journal that cannot be written (a full disk) refuses new events and says so
    /// (`/readyz`, `courier_store_journal_write_errors_total`) until a write succeeds again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_journal_is_reported_until_a_write_succeeds() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        store.append(to("e", 0)).await.unwrap();
        assert!(!store.journal_failing());
        store.shared.fail_journal.store(true, Ordering::SeqCst);
        let refused = to("e", 1);
        let refused_id = refused.event.id.clone();
        let r = store.append(refused).await;
        assert!(r.is_err(), "{r:?}");
        assert!(store.journal_failing());
        assert_eq!(store.commit_counters().journal_errors.get(), 1);
        // The disk has room again: the next event goes in, and the store is ready.
        store.shared.fail_journal.store(false, Ordering::SeqCst);
        store.append(to("e", 2)).await.unwrap();
        assert!(!store.journal_failing());
        store.settle().await.unwrap();
        assert!(store.event(&refused_id).unwrap().is_none());
    }

    /// The database file's first I/O error is reported at once (`/readyz`), though nothing
    /// else is waiting to be written: redb refuses everything after it until a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_io_error_of_the_database_file_is_reported_at_once() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        store.append(to("e", 0)).await.unwrap();
        store.settle().await.unwrap();
        store.shared.fail_io.store(true, Ordering::SeqCst);
        let r = store.write_endpoint(endpoint_x()).await;
        assert!(matches!(r, Err(StoreError::Io(_))), "{r:?}");
        store.shared.fail_io.store(false, Ordering::SeqCst);
        assert!(matches!(store.check(), Err(StoreError::Broken)));
    }

    /// Closes `store`, takes out of its file what `forget` deletes and the [`META`] `flag`
    /// saying it was built (as a version from before it left the file), and opens it again.
    fn reopen_as_before(
        store: Store,
        path: &Path,
        flag: &str,
        forget: impl FnOnce(&redb::WriteTransaction),
    ) -> Store {
        let closer = store.closer();
        drop(store);
        assert!(closer.wait(std::time::Duration::from_secs(10)));
        {
            let db = Database::create(path).unwrap();
            let txn = db.begin_write().unwrap();
            forget(&txn);
            txn.open_table(META).unwrap().remove(flag).unwrap();
            txn.commit().unwrap();
        }
        Store::open(path, true).unwrap()
    }

    fn channel(id: &str, state: crate::model::ChannelState, version: u64, at: u64) -> Channel {
        Channel {
            id: id.into(),
            workflow: "w".into(),
            state,
            version,
            request: "{}".into(),
            ai_response: None,
            history: Vec::new(),
            timers: Vec::new(),
            created_ms: 1_000,
            updated_ms: at,
            delivery_ids: Vec::new(),
        }
    }

    #[tokio::test]
    async fn upstream_calls_wait_in_a_queue_per_workflow_also_in_a_format_1_database() {
        use crate::model::ChannelState::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, true).unwrap();
        let with = |id: &str, workflow: &str, state, timer: (u64, TimerKind)| {
            let mut ch = channel(id, state, 1, 1_000);
            ch.workflow = workflow.into();
            ch.timers = vec![timer];
            ChannelChange {
                channel: ch,
                expect_version: None,
                append: None,
            }
        };
        for change in [
            with("a", "w", Pending, (5, TimerKind::Upstream)),
            with("b", "v", Pending, (7, TimerKind::Upstream)),
            with("c", "w", AwaitingCallback, (9, TimerKind::CallbackTimeout)),
        ] {
            let r = store.channel_change(change).await.unwrap();
            assert!(matches!(r, AdvanceResult::Applied), "{r:?}");
        }
        let none = HashSet::new();
        let ids = |due: DueTimers| -> (Vec<String>, Option<u64>) {
            (due.0.into_iter().map(|(_, id, _)| id).collect(), due.1)
        };
        let check = |store: &Store| {
            assert_eq!(
                ids(store.due_upstream_calls("w", 100, 10, &none).unwrap()),
                (vec!["a".to_string()], None)
            );
            assert_eq!(
                ids(store.due_upstream_calls("v", 6, 10, &none).unwrap()),
                (vec![], Some(7))
            );
            assert_eq!(
                ids(store.due_timers(100, 10, &none).unwrap()),
                (vec!["c".to_string()], None)
            );
        };
        check(&store);

        // The same channels in a database of format 1: upstream calls among the other
        // timers (and one whose channel is gone).
        let closer = store.closer();
        drop(store);
        assert!(closer.wait(std::time::Duration::from_secs(10)));
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut queues = txn.open_table(UPSTREAM_TIMERS).unwrap();
                queues.retain(|_, _| false).unwrap();
                let mut timers = txn.open_table(TIMERS).unwrap();
                let up = TimerKind::Upstream.code();
                for (due, id) in [(5, "a"), (7, "b"), (3, "gone")] {
                    timers.insert((due, id, up), ()).unwrap();
                }
                txn.open_table(META).unwrap().insert(FORMAT, 1).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&path, true).unwrap();
        check(&store);
        assert_eq!(
            ids(store.due_upstream_calls("v", 100, 10, &none).unwrap()),
            (vec!["b".to_string()], None)
        );
        // A channel that moves on takes its call out of the queue.
        let mut a = store.channel("a").unwrap().unwrap();
        a.timers.clear();
        a.version = 2;
        let r = store
            .channel_change(ChannelChange {
                channel: a,
                expect_version: Some(1),
                append: None,
            })
            .await
            .unwrap();
        assert!(matches!(r, AdvanceResult::Applied), "{r:?}");
        assert_eq!(
            ids(store.due_upstream_calls("w", 100, 10, &none).unwrap()),
            (vec![], None)
        );
        closed(store);
        assert_eq!(recorded_format(&path), Some(2));
    }

    #[tokio::test]
    async fn retention_deletes_the_channels_that_finished_before_its_cutoff() {
        use crate::model::ChannelState::*;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, true).unwrap();
        let put = |ch: Channel, expect_version: Option<u64>| {
            let store = store.clone();
            async move {
                let change = ChannelChange {
                    channel: ch,
                    expect_version,
                    append: None,
                };
                let r = store.channel_change(change).await.unwrap();
                assert!(matches!(r, AdvanceResult::Applied), "{r:?}");
            }
        };
        put(channel("old-done", Succeeded, 1, 1_000), None).await;
        put(channel("old-timeout", TimedOut, 1, 1_500), None).await;
        put(channel("new-failed", Failed, 1, 5_000), None).await;
        put(channel("old-waiting", AwaitingCallback, 1, 1_000), None).await;
        // Opened long ago, finished recently: it counts from when it finished.
        put(channel("late", Pending, 1, 1_000), None).await;
        put(channel("late", Succeeded, 2, 6_000), Some(1)).await;
        let round = store
            .purge(2_000, 0, 100, PurgeCursor::default())
            .await
            .unwrap();
        assert_eq!(round.channels_purged, 2);
        let kept = |id: &str| store.channel(id).unwrap().is_some();
        assert!(!kept("old-done") && !kept("old-timeout"));
        assert!(kept("new-failed") && kept("late"));
        assert!(
            kept("old-waiting"),
            "a channel still waiting is never purged"
        );
        // A round takes at most its limit; the next goes on.
        let round = store
            .purge(7_000, 0, 1, PurgeCursor::default())
            .await
            .unwrap();
        assert_eq!(round.channels_purged, 1);
        let round = store
            .purge(7_000, 0, 1, PurgeCursor::default())
            .await
            .unwrap();
        assert_eq!(round.channels_purged, 1);
        assert!(!kept("new-failed") && !kept("late") && kept("old-waiting"));

        // A database made before the index: it is built when the store is opened.
        put(channel("before", Failed, 1, 3_000), None).await;
        let store = reopen_as_before(store, &path, CHANNELS_DONE_BUILT, |txn| {
            txn.delete_table(CHANNELS_DONE).unwrap();
        });
        let round = store
            .purge(7_000, 0, 100, PurgeCursor::default())
            .await
            .unwrap();
        assert_eq!(round.channels_purged, 1);
        assert!(store.channel("before").unwrap().is_none());
        assert!(store.channel("old-waiting").unwrap().is_some());
    }

    #[tokio::test]
    async fn retention_deletes_old_events_that_had_no_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        let unrouted = |created_ms: u64| {
            let mut b = batch("unused", created_ms);
            b.deliveries.clear();
            b.event.delivery_ids.clear();
            b.idempotency = None;
            b
        };
        let (old, new) = (unrouted(1_000), unrouted(5_000));
        let routed = batch("k", 1_000);
        for b in [&old, &new, &routed] {
            let r = store.append(b.clone()).await.unwrap();
            assert!(matches!(r, AppendResult::Created), "{r:?}");
        }
        let round = store
            .purge(2_000, 0, 100, PurgeCursor::default())
            .await
            .unwrap();
        assert_eq!(round.events_purged, 1);
        let kept = |id: &str| store.event(id).unwrap().is_some();
        assert!(!kept(&old.event.id), "the old one is gone");
        assert!(kept(&new.event.id), "the new one stays");
        assert!(
            kept(&routed.event.id),
            "an event with a pending delivery stays"
        );
        // A round takes at most its limit.
        let round = store
            .purge(9_000, 0, 0, PurgeCursor::default())
            .await
            .unwrap();
        assert_eq!(round.events_purged, 0);
        assert!(kept(&new.event.id));
    }

    #[tokio::test]
    async fn a_drop_of_nothing_lets_an_interrupted_deletes_promise_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        let write = |value: Option<Vec<u8>>, create: bool| EndpointWrite {
            name: "x".into(),
            value,
            create,
            drop_pending: true,
        };
        assert!(
            store
                .write_endpoint(write(Some(b"{}".to_vec()), true))
                .await
                .unwrap()
        );
        assert!(store.write_endpoint(write(None, false)).await.unwrap());
        assert_eq!(store.unfinished_drops().unwrap(), ["x"]);
        assert_eq!(store.drop_pending("x", "", 0).await.unwrap(), 0);
        assert!(store.unfinished_drops().unwrap().is_empty());
    }

    /// A producer that hangs up after its event was handed to the journal: the append is
    /// still written, and a change sent to the writer after the barrier (an endpoint's drop)
    /// comes after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_abandoned_after_the_hand_over_reach_the_writer_before_the_barrier_returns() {
        use futures_util::FutureExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        let n = 3000;
        for _ in 0..n {
            let mut b = batch("unused", crate::model::now_ms());
            b.idempotency = None;
            // One poll hands it over (the queue has room; the task's scheduling budget, spent
            // after a hundred or so, is set aside); then its caller goes away.
            let abandoned = tokio::task::unconstrained(store.append(b));
            assert!(abandoned.now_or_never().is_none());
        }
        store.journal_barrier().await;
        let dropped = store.drop_pending("e", "deleted", 2 * n).await.unwrap();
        assert_eq!(dropped, n);
    }

    async fn kill(store: &Store, id: &str) {
        let reason = "http_500".to_string();
        attempted(store, id, 500, Next::Dead { reason }).await;
    }

    #[tokio::test]
    async fn a_bulk_replay_goes_page_by_page_and_never_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        let mut ids = Vec::new();
        for n in 0..7 {
            let b = to(if n % 3 == 0 { "other" } else { "e" }, n);
            ids.push((b.deliveries[0].endpoint.clone(), b.deliveries[0].id.clone()));
            store.append(b).await.unwrap();
        }
        store.settle().await.unwrap();
        for (_, id) in &ids {
            kill(&store, id).await;
        }
        let started = crate::model::now_ms();
        let filter = Filter {
            endpoint: Some("e".into()),
            ..Filter::default()
        };
        let page = |after: String, dead_before_ms: u64| ReplayTarget::Dead {
            filter: filter.clone(),
            after,
            limit: 2,
            dead_before_ms,
        };
        let mut requeued = Vec::new();
        let mut after = String::new();
        let mut pages = 0;
        loop {
            let r = store
                .replay(page(after, started + 1), config_endpoints(&["a", "b", "e"]))
                .await
                .unwrap();
            pages += 1;
            assert!(r.requeued.len() <= 2);
            for d in &r.requeued {
                // One requeued delivery dies again while the replay goes on.
                kill(&store, &d.id).await;
                requeued.push(d.id.clone());
            }
            match r.next {
                Some(n) => after = n,
                None => break,
            }
        }
        let expected: Vec<String> = ids
            .iter()
            .filter(|(e, _)| e == "e")
            .map(|(_, id)| id.clone())
            .collect();
        assert_eq!(
            requeued, expected,
            "each of `e`'s dead deliveries once, in order"
        );
        assert_eq!(
            pages, 2,
            "`e`'s 4 dead entries, 2 per page; the other endpoint's are not even examined"
        );
        // The other endpoint's stayed dead.
        for (e, id) in &ids {
            if e == "other" {
                assert_eq!(
                    store.delivery(id).unwrap().unwrap().status,
                    DeliveryStatus::Dead
                );
            }
        }
    }

    /// A deleted endpoint's pending deliveries are dropped in pages; an attempt that was in
    /// flight meanwhile is recorded, and only a success changes the dropped status.
    #[tokio::test]
    async fn dropping_an_endpoints_queue_goes_in_pages_and_in_flight_outcomes_do_not_revive_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        let mut ids = Vec::new();
        for n in 0..5 {
            let b = to(if n == 4 { "kept" } else { "gone" }, n);
            ids.push(b.deliveries[0].id.clone());
            store.append(b).await.unwrap();
        }
        store.settle().await.unwrap();
        assert_eq!(store.drop_pending("gone", "deleted", 3).await.unwrap(), 3);
        assert_eq!(store.drop_pending("gone", "deleted", 3).await.unwrap(), 1);
        assert_eq!(store.drop_pending("gone", "deleted", 3).await.unwrap(), 0);
        let status = |id: &str| store.delivery(id).unwrap().unwrap().status;
        for id in &ids[..4] {
            assert_eq!(status(id), DeliveryStatus::Dropped);
        }
        assert_eq!(status(&ids[4]), DeliveryStatus::Pending);
        assert_eq!(store.pending_count("gone"), 0);
        assert_eq!(store.pending_count("kept"), 1);
        let retry = Next::Retry {
            due_ms: 0,
            error: None,
        };
        attempted(&store, &ids[0], 500, retry).await;
        assert_eq!(status(&ids[0]), DeliveryStatus::Dropped);
        assert_eq!(store.attempts(&ids[0]).unwrap().len(), 1);
        attempted(&store, &ids[1], 200, Next::Delivered).await;
        assert_eq!(status(&ids[1]), DeliveryStatus::Delivered);
        assert_eq!(store.pending_count("gone"), 0);
    }

    /// One endpoint's dead-letter queue is read from its own index, which a database made
    /// before that index gets built when opened.
    #[tokio::test]
    async fn one_endpoints_dead_letters_are_listed_from_its_own_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, true).unwrap();
        let mut ids = Vec::new();
        for n in 0..6 {
            let b = to(if n % 3 == 0 { "b" } else { "a" }, n);
            ids.push((b.deliveries[0].endpoint.clone(), b.deliveries[0].id.clone()));
            store.append(b).await.unwrap();
        }
        store.settle().await.unwrap();
        for (_, id) in &ids[..5] {
            kill(&store, id).await;
        }
        let dead_of = |store: &Store, endpoint: &str| -> Vec<String> {
            let filter = Filter {
                status: Some(DeliveryStatus::Dead),
                endpoint: Some(endpoint.into()),
                ..Filter::default()
            };
            let (page, next) = store.list(&filter, 10, None).unwrap();
            assert_eq!(next, None);
            page.into_iter().map(|d| d.id).collect()
        };
        let expected = |endpoint: &str| -> Vec<String> {
            let mut v: Vec<String> = ids[..5]
                .iter()
                .filter(|(e, _)| e == endpoint)
                .map(|(_, id)| id.clone())
                .collect();
            v.reverse();
            v
        };
        assert_eq!(dead_of(&store, "b"), expected("b"), "newest first");
        assert_eq!(dead_of(&store, "a"), expected("a"));
        // A replayed delivery leaves its endpoint's dead-letter queue.
        store
            .replay(
                ReplayTarget::Ids(vec![ids[3].1.clone()]),
                config_endpoints(&["a", "b", "e"]),
            )
            .await
            .unwrap();
        assert_eq!(dead_of(&store, "b"), vec![ids[0].1.clone()]);
        // What an older version left: no per-endpoint dead index.
        let store = reopen_as_before(store, &path, DEAD_BY_ENDPOINT_BUILT, |txn| {
            txn.delete_table(DEAD_BY_ENDPOINT).unwrap();
        });
        assert_eq!(dead_of(&store, "b"), vec![ids[0].1.clone()]);
        assert_eq!(dead_of(&store, "a"), expected("a"));
    }

    fn ulid_ms(id: &str) -> u64 {
        ulid::Ulid::from_string(id.strip_prefix("dlv_").unwrap())
            .unwrap()
            .timestamp_ms()
    }

    /// Runs a whole retention sweep; returns the deliveries it deleted.
    async fn sweep(store: &Store, before_ms: u64, limit: usize) -> usize {
        let mut cursor = PurgeCursor::default();
        let mut purged = 0;
        for _ in 0..100 {
            let round = store.purge(before_ms, 0, limit, cursor).await.unwrap();
            purged += round.purged;
            if round.cursor.finished() {
                return purged;
            }
            cursor = round.cursor;
        }
        panic!("the sweep never finished");
    }

    #[tokio::test]
    async fn retention_gets_past_old_deliveries_that_finished_after_the_cutoff() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        let ids = appended(&store, "e", 4).await;
        let pause = || tokio::time::sleep(std::time::Duration::from_millis(5));
        pause().await;
        // The newest two finish before the cutoff; the oldest two (retried, say) after it, so
        // they sort first among the candidates but are kept.
        deliver(&store, &ids[2]).await;
        deliver(&store, &ids[3]).await;
        pause().await;
        let cut = crate::model::now_ms();
        pause().await;
        deliver(&store, &ids[0]).await;
        deliver(&store, &ids[1]).await;
        // Rounds of one: the kept ones take whole rounds, and the sweep still gets past them.
        assert_eq!(sweep(&store, cut, 1).await, 2);
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(store.delivery(id).unwrap().is_some(), n < 2, "delivery {n}");
        }
        // Once they are old enough too, the next sweep takes them.
        assert_eq!(sweep(&store, crate::model::now_ms() + 1, 1).await, 2);
        assert!(store.delivery(&ids[0]).unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_gets_past_a_record_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, true).unwrap();
        let ids = appended(&store, "e", 3).await;
        for id in &ids {
            deliver(&store, id).await;
        }
        // The oldest one's record is damaged.
        let store = reopen_as_before(store, &path, "no such flag", |txn| {
            txn.open_table(DELIVERIES)
                .unwrap()
                .insert(ids[0].as_str(), b"\xffnot a delivery".as_slice())
                .unwrap();
        });
        assert!(store.delivery(&ids[0]).is_err());
        assert_eq!(sweep(&store, crate::model::now_ms() + 1, 10).await, 2);
        assert!(store.delivery(&ids[1]).unwrap().is_none());
        assert!(store.delivery(&ids[2]).unwrap().is_none());
        // The store goes on taking changes.
        store.append(to("e", 9)).await.unwrap();
    }

    /// One event fanned out to many endpoints: its deliveries go over several rounds, and the
    /// event stays until its last delivery has gone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_keeps_a_fanned_out_event_until_its_last_delivery_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        let mut b = batch("fan", 1_000);
        let first = b.deliveries[0].clone();
        b.deliveries = (0..1_200)
            .map(|n| Delivery {
                id: new_id("dlv"),
                endpoint: format!("e{n}"),
                ..first.clone()
            })
            .collect();
        b.event.delivery_ids = b.deliveries.iter().map(|d| d.id.clone()).collect();
        let (event, ids) = (b.event.id.clone(), b.event.delivery_ids.clone());
        store.append(b).await.unwrap();
        for id in &ids {
            deliver(&store, id).await;
        }
        let cut = crate::model::now_ms() + 1;
        let round = store
            .purge(cut, 0, 500, PurgeCursor::default())
            .await
            .unwrap();
        assert_eq!(round.purged, 500);
        assert!(
            store.event(&event).unwrap().is_some(),
            "700 deliveries left"
        );
        assert_eq!(sweep(&store, cut, 500).await, 700);
        assert!(
            store.event(&event).unwrap().is_none(),
            "the last one took it"
        );
        assert!(ids.iter().all(|id| store.delivery(id).unwrap().is_none()));
    }

    /// Old attempt statistics go a limited number a round (a retention lowered from a month
    /// to a day leaves millions), and the sweep goes on until none is left.
    #[tokio::test]
    async fn retention_deletes_old_rollups_a_limited_number_a_round() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let minute = 60_000u64;
        // 600 minutes of statistics for each of two endpoints, from an attempt log.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut log = txn.open_table(ATTEMPT_LOG).unwrap();
                for m in 0..600u64 {
                    for (n, endpoint) in ["a", "b"].into_iter().enumerate() {
                        let entry = encode(&AttemptLogEntry {
                            endpoint: endpoint.into(),
                            duration_ms: 10,
                            success: true,
                        });
                        log.insert((m * minute, "dlv_1", n as u32), entry.as_slice())
                            .unwrap();
                    }
                }
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&path, true).unwrap();
        assert_eq!(store.attempt_stats(0, None).unwrap().attempts, 1_200);
        // The first 550 minutes of each are past the cutoff: 1,100 rows, in rounds of 500.
        let cut = 550 * minute;
        let mut cursor = PurgeCursor::default();
        let mut rounds = Vec::new();
        loop {
            let round = store.purge(cut, 0, 500, cursor).await.unwrap();
            rounds.push(round.rollups_purged);
            if round.cursor.finished() {
                break;
            }
            cursor = round.cursor;
        }
        assert_eq!(rounds, [500, 500, 100]);
        assert_eq!(store.attempt_stats(0, None).unwrap().attempts, 100);
        assert_eq!(store.attempt_stats(0, Some("b")).unwrap().attempts, 50);
    }

    /// A damaged dead record neither stops a bulk replay (every later one would stop at it)
    /// nor makes the dead-letter listing fail: it is passed over and reported.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_and_listing_get_past_a_record_they_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, true).unwrap();
        let ids = appended(&store, "e", 3).await;
        for id in &ids {
            let reason = "gave up".to_string();
            attempted(&store, id, 500, Next::Dead { reason }).await;
        }
        let store = reopen_as_before(store, &path, "no such flag", |txn| {
            txn.open_table(DELIVERIES)
                .unwrap()
                .insert(ids[1].as_str(), b"\xffnot a delivery".as_slice())
                .unwrap();
        });
        let filter = Filter {
            status: Some(DeliveryStatus::Dead),
            ..Filter::default()
        };
        let (page, _) = store.list(&filter, 10, None).unwrap();
        let mut listed: Vec<String> = page.into_iter().map(|d| d.id).collect();
        listed.sort();
        assert_eq!(listed, [ids[0].clone(), ids[2].clone()]);
        let result = store
            .replay(
                ReplayTarget::Dead {
                    filter,
                    after: String::new(),
                    limit: 10,
                    dead_before_ms: crate::model::now_ms() + 1,
                },
                config_endpoints(&["e"]),
            )
            .await
            .unwrap();
        let mut requeued: Vec<String> = result.requeued.into_iter().map(|d| d.id).collect();
        requeued.sort();
        assert_eq!(requeued, [ids[0].clone(), ids[2].clone()]);
        assert_eq!(result.unreadable, [ids[1].clone()]);
        // Met by the listing and the replay: one damaged record (`/metrics`).
        assert_eq!(store.commit_counters().damaged.get(), 1);
    }

    /// A damaged pending delivery does not stop its endpoint's queue: the scheduler's scan
    /// passes over it and finds the ones behind it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_due_scan_gets_past_a_pending_delivery_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, true).unwrap();
        let ids = appended(&store, "e", 3).await;
        let store = reopen_as_before(store, &path, "no such flag", |txn| {
            txn.open_table(DELIVERIES)
                .unwrap()
                .insert(ids[1].as_str(), b"\xffnot a delivery".as_slice())
                .unwrap();
        });
        let far = crate::model::now_ms() + 3_600_000;
        let page = store.due("e", far, 10, &HashSet::new(), None).unwrap();
        let mut due: Vec<String> = page.due.into_iter().map(|d| d.id).collect();
        due.sort();
        assert_eq!(due, [ids[0].clone(), ids[2].clone()]);
        // Again (the second time it is not logged): the same page.
        let again = store.due("e", far, 10, &HashSet::new(), None).unwrap();
        assert_eq!(again.due.len(), 2);
        assert_eq!(store.commit_counters().damaged.get(), 1);
    }

    /// Idempotency keys a database holds from before their age index existed are indexed
    /// when it is opened, so that they expire like the others.
    #[tokio::test]
    async fn idempotency_keys_from_before_the_age_index_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, true).unwrap();
        // Keys "e-0" and "e-1", created at 1,000 and 1,001.
        appended(&store, "e", 2).await;
        let key = |k: &str| IdempotencyKey {
            key_id: "k".into(),
            key: k.into(),
        };
        assert!(store.idempotent_reply(&key("e-0")).unwrap().is_some());
        let store = reopen_as_before(store, &path, IDEMPOTENCY_AGE_BUILT, |txn| {
            txn.delete_table(IDEMPOTENCY_AGE).unwrap();
        });
        let round = store
            .purge(0, 1_001, 100, PurgeCursor::default())
            .await
            .unwrap();
        assert_eq!(round.keys_expired, 1);
        assert!(store.idempotent_reply(&key("e-0")).unwrap().is_none());
        assert!(store.idempotent_reply(&key("e-1")).unwrap().is_some());
    }

    #[tokio::test]
    async fn a_time_filter_past_the_end_of_ids_is_the_open_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        let b = to("e", 0);
        let id = b.deliveries[0].id.clone();
        store.append(b).await.unwrap();
        store.settle().await.unwrap();
        let filter = Filter {
            until_ms: Some(u64::MAX),
            ..Filter::default()
        };
        let (listed, _) = store.list(&filter, 10, None).unwrap();
        assert_eq!(listed.len(), 1);
        // Replay runs on the writer: a time it could not handle would stop every write.
        let r = store
            .replay(
                ReplayTarget::Dead {
                    filter: filter.clone(),
                    after: String::new(),
                    limit: 100,
                    dead_before_ms: u64::MAX,
                },
                config_endpoints(&["a", "b", "e"]),
            )
            .await
            .unwrap();
        assert!(r.requeued.is_empty());
        assert!(store.delivery(&id).unwrap().is_some());
        store.append(to("e", 1)).await.unwrap();
    }

    #[tokio::test]
    async fn pending_deliveries_are_listed_across_endpoints_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.redb"), true).unwrap();
        let mut ids = Vec::new();
        for n in 0..7 {
            let b = to(["a", "b", "c"][n % 3], n as u64);
            ids.push(b.deliveries[0].id.clone());
            store.append(b).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        deliver(&store, &ids[3]).await;
        let pending = Filter {
            status: Some(DeliveryStatus::Pending),
            ..Filter::default()
        };
        // Two at a time, following the cursor.
        let mut listed = Vec::new();
        let mut cursor = None;
        loop {
            let (page, next) = store.list(&pending, 2, cursor.as_deref()).unwrap();
            listed.extend(page.into_iter().map(|d| d.id));
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let expected: Vec<String> = [6, 5, 4, 2, 1, 0].iter().map(|&i| ids[i].clone()).collect();
        assert_eq!(listed, expected);
        let only_b = Filter {
            endpoint: Some("b".into()),
            ..pending.clone()
        };
        let (page, _) = store.list(&only_b, 10, None).unwrap();
        let got: Vec<&str> = page.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(got, [ids[4].as_str(), ids[1].as_str()]);
        let only_a = Filter {
            endpoint: Some("a".into()),
            ..pending.clone()
        };
        let (page, _) = store.list(&only_a, 10, None).unwrap();
        let got: Vec<&str> = page.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(
            got,
            [ids[6].as_str(), ids[0].as_str()],
            "a's third was delivered"
        );
        let delivered = Filter {
            status: Some(DeliveryStatus::Delivered),
            ..Filter::default()
        };
        let (page, _) = store.list(&delivered, 10, None).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].id, ids[3]);

        assert_eq!(store.oldest_pending_ms().unwrap(), Some(ulid_ms(&ids[0])));
        deliver(&store, &ids[0]).await;
        assert_eq!(store.oldest_pending_ms().unwrap(), Some(ulid_ms(&ids[1])));
        for i in [1, 2, 4, 5, 6] {
            deliver(&store, &ids[i]).await;
        }
        assert_eq!(store.oldest_pending_ms().unwrap(), None);
        assert!(store.list(&pending, 10, None).unwrap().0.is_empty());
    }

    /// Databases written before the status index stopped holding pending deliveries are
    /// cleared of those rows once, when first opened.
    #[tokio::test]
    async fn pending_rows_left_in_the_status_index_by_an_older_version_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let store = Store::open(&path, true).unwrap();
        let ids = appended(&store, "a", 3).await;
        deliver(&store, &ids[0]).await;
        let closer = store.closer();
        drop(store);
        assert!(closer.wait(std::time::Duration::from_secs(10)));
        let rows = |db: &Database, status: &str| -> usize {
            let txn = db.begin_read().unwrap();
            let t = txn.open_table(BY_STATUS).unwrap();
            t.range((status, "")..(status, "\u{10ffff}"))
                .unwrap()
                .count()
        };
        {
            // What an older version left: every pending delivery in the status index too.
            let db = Database::create(&path).unwrap();
            assert_eq!(rows(&db, "pending"), 0);
            let txn = db.begin_write().unwrap();
            {
                let mut t = txn.open_table(BY_STATUS).unwrap();
                for id in &ids[1..] {
                    t.insert(("pending", id.as_str()), ()).unwrap();
                }
                txn.open_table(META)
                    .unwrap()
                    .remove(BY_STATUS_NO_PENDING)
                    .unwrap();
            }
            txn.commit().unwrap();
            assert_eq!(rows(&db, "pending"), 2);
        }
        let store = Store::open(&path, true).unwrap();
        assert_eq!(rows(&store.db, "pending"), 0);
        assert_eq!(rows(&store.db, "delivered"), 1);
        let pending = Filter {
            status: Some(DeliveryStatus::Pending),
            ..Filter::default()
        };
        assert_eq!(store.list(&pending, 10, None).unwrap().0.len(), 2);
    }
}
