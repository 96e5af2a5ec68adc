//! The single writer: every change to the database goes through one thread that batches all
//! waiting commands into one write transaction (group commit).
//!
//! Why: the disk flushes a few hundred times a second under sustained load, so one commit per
//! event would cap ingest there. New events reach this thread already on disk in the ingest
//! journal ([`super::journaler`] wrote and, for most, acknowledged them); they are applied and
//! committed without a flush. Every other command is a durable commit, and its caller's
//! oneshot fires only after that commit returned — which is what makes an answer mean "on
//! disk". A durable commit also covers every journaled record applied before it (a
//! checkpoint), which is what lets the journal write over its older records. An attempt's
//! outcome may wait a moment for others to share its durable commit ([`Held`]).

use std::collections::HashMap;
use std::sync::Arc;

use redb::{Database, Durability, ReadableTable};
use tokio::sync::{mpsc, oneshot};

use super::rollup::{Rollup, minute};
use super::tables::*;
use super::{
    AdvanceResult, AppendBatch, AppendResult, ChannelChange, Decided, EndpointWrite, FINISHED,
    OUTCOME_HOLD, OutcomeRecord, PurgeCursor, PurgeRound, ReplayResult, ReplayTarget, SUPERSEDED,
    Shared, StoreError,
};
use crate::model::{
    Channel, Delivery, DeliveryStatus, Event, TimerKind, id_floor, id_range, now_ms,
};

/// Most commands folded into one transaction.
const MAX_BATCH: usize = 4096;

// Commands are moved once through a channel; their size does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Command {
    /// New events, already on disk in the journal (records up to `last_seq`).
    Journaled(Journaled),
    /// A durable commit of nothing new, asked for by the journal thread when it leaves a file
    /// for the other: it covers every record applied so far.
    Checkpoint,
    Outcome(OutcomeRecord, oneshot::Sender<Result<Decided, StoreError>>),
    Replay(
        ReplayTarget,
        super::Births,
        oneshot::Sender<Result<ReplayResult, StoreError>>,
    ),
    Purge {
        before_ms: u64,
        idempotency_before_ms: u64,
        limit: usize,
        cursor: PurgeCursor,
        reply: oneshot::Sender<Result<PurgeRound, StoreError>>,
    },
    Channel(
        ChannelChange,
        oneshot::Sender<Result<AdvanceResult, StoreError>>,
    ),
    Endpoint(EndpointWrite, oneshot::Sender<Result<bool, StoreError>>),
    /// Pauses (or resumes) the config-file endpoint `name` until resumed.
    ConfigPause {
        name: String,
        paused: bool,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Drops up to `limit` of an endpoint's pending deliveries (it was deleted).
    DropPending {
        endpoint: String,
        reason: String,
        limit: usize,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
}

/// A batch of appends the journal thread wrote, in journal order.
pub(crate) struct Journaled {
    /// Each append, with the caller to answer once it is committed — `None` when the journal
    /// thread answered already (an append without an idempotency key or a chosen id can only
    /// create its event).
    pub(crate) appends: Vec<(AppendBatch, Option<AppendReply>)>,
    /// The sequence number of the batch's last record.
    pub(crate) last_seq: u64,
}

pub(crate) type AppendReply = oneshot::Sender<Result<AppendResult, StoreError>>;

enum Reply {
    Journaled(Vec<Result<AppendResult, StoreError>>),
    Checkpoint,
    Outcome(Result<Decided, StoreError>),
    Replay(Result<ReplayResult, StoreError>),
    Purge(Result<PurgeRound, StoreError>),
    Channel(Result<AdvanceResult, StoreError>),
    Endpoint(Result<bool, StoreError>),
    ConfigPause(Result<(), StoreError>),
    DropPending(Result<usize, StoreError>),
}

pub(crate) fn run(
    db: Arc<Database>,
    mut rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    quick_repair: bool,
) {
    yield_cpu_to_the_front();
    let mut cmds: Vec<Command> = Vec::with_capacity(MAX_BATCH);
    // Journaled records committed without a flush since the last durable commit.
    let mut dirty = false;
    let mut closed = false;
    let mut retry_delay = RETRY_MIN;
    let mut held = Held::default();
    // Only for waiting on the channel with a deadline while outcomes are held.
    let timer = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "no timer for the writer: outcomes are committed without waiting for others");
            None
        }
    };
    loop {
        // Work was waiting for this thread when it finished the last batch.
        let busy = !rx.is_empty();
        if cmds.is_empty() {
            match (held.since, &timer) {
                (Some(since), Some(timer)) => {
                    let left = OUTCOME_HOLD.saturating_sub(since.elapsed());
                    // The timeout is made inside `block_on`: its timer needs the runtime.
                    match timer.block_on(async { tokio::time::timeout(left, rx.recv()).await }) {
                        Ok(Some(c)) => cmds.push(c),
                        Ok(None) => closed = true,
                        // Time is up for the held outcomes: `hold` hands them back.
                        Err(_) => {}
                    }
                }
                _ => match rx.blocking_recv() {
                    Some(c) => cmds.push(c),
                    None => break,
                },
            }
        }
        closed |= drain(&mut rx, &mut cmds);
        if busy && !closed && lingers(&cmds) {
            std::thread::sleep(LINGER);
            closed |= drain(&mut rx, &mut cmds);
        }
        held.hold(&mut cmds, closed || timer.is_none());
        if cmds.is_empty() {
            if closed && held.is_empty() {
                break;
            }
            continue;
        }
        let mut deltas = Deltas::new();
        #[cfg(test)]
        if shared
            .panic_applies
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            panic!("injected: the writer failed");
        }
        #[cfg(test)]
        let result = if shared
            .fail_applies
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            Err(StoreError::Db("injected: no space left on device".into()))
        } else {
            apply(&db, &cmds, &mut deltas, quick_repair)
        };
        #[cfg(not(test))]
        let result = apply(&db, &cmds, &mut deltas, quick_repair);
        match result {
            Ok((replies, durability, journaled)) => {
                retry_delay = RETRY_MIN;
                shared.apply_deltas(&deltas);
                // Counted before the commit is published: whoever waits for it (the API
                // settling on the journal) then also sees it in the metrics.
                shared.commits.inc();
                shared.commands.inc_by(changes(&cmds));
                let immediate = matches!(durability, Durability::Immediate);
                if immediate {
                    shared.durable_commits.inc();
                }
                if let Some(seq) = journaled {
                    shared.progress.set_applied(seq);
                }
                dirty = !immediate;
                if immediate {
                    shared.progress.set_checkpointed(shared.progress.applied());
                }
                for (cmd, reply) in cmds.drain(..).zip(replies) {
                    send(cmd, reply);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, commands = cmds.len(), "write transaction failed");
                // redb refuses everything after its file's first I/O error: said at once
                // (`/readyz`), not at the next write, which an idle courier may never make.
                if matches!(e, StoreError::Broken | StoreError::Io(_)) {
                    shared
                        .broken
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
                // Journaled appends are on disk and mostly acknowledged: they are kept, in
                // order, and tried again (readers wait for them), and so is a checkpoint the
                // journal thread waits for; everything else fails.
                let mut keep = Vec::new();
                for cmd in cmds.drain(..) {
                    match cmd {
                        Command::Journaled(_) | Command::Checkpoint => keep.push(cmd),
                        other => fail(other, e.clone()),
                    }
                }
                if closed {
                    // Shutting down: the next start re-applies them from the journal.
                    break;
                }
                cmds = keep;
                if !cmds.is_empty() {
                    std::thread::sleep(retry_delay);
                    retry_delay = (retry_delay * 2).min(RETRY_MAX);
                }
            }
        }
        if closed && cmds.is_empty() {
            break;
        }
    }
    // Shutting down: leave a database that needs no journal on the next start.
    if dirty && let Err(e) = checkpoint(&db, quick_repair) {
        tracing::warn!(error = %e, "final checkpoint failed; the journal will be replayed on the next start")
    }
}

/// How much lower than the rest of courier the writer's CPU priority is (a nice value, added
/// to the process's).
const WRITER_NICE: i32 = 10;

/// Lowers this thread's CPU priority by [`WRITER_NICE`].
///
/// Why: the writer is behind the acknowledgement. A producer's 202 waits for the HTTP workers
/// and the journal thread, never for the writer, which applies journaled events to the
/// database a moment later. At equal priority the writer takes the CPU in equal turns with the
/// HTTP workers, and under sustained ingest the cores then sit idle whenever every producer
/// waits for the same journal write — while the writer could have done its catching up right
/// then. At a lower priority it yields to the request path and soaks up those idle moments.
/// In interleaved runs durable ingest was a few per cent to 18% faster (more, the more
/// contended the cores), and the delivered rate and the latency at a moderate rate did not
/// change (BENCHMARKS.md). It cannot fall behind without bound: a writer a journal lap behind
/// holds ingest until it checkpoints, and then it has the cores.
/// On Linux a nice value belongs to the thread; under a service manager it competes only
/// within courier's own cgroup. Raising one's own nice value needs no privilege; where it
/// fails the writer runs as it is.
#[cfg(target_os = "linux")]
fn yield_cpu_to_the_front() {
    // SAFETY: plain system calls about the calling thread (`who` = 0); no pointers involved.
    let lowered = unsafe {
        // getpriority may return -1 as a value: only errno tells a failure.
        *libc::__errno_location() = 0;
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        (current != -1 || *libc::__errno_location() == 0)
            && libc::setpriority(libc::PRIO_PROCESS, 0, (current + WRITER_NICE).min(19)) == 0
    };
    if !lowered {
        tracing::debug!("could not lower the writer thread's CPU priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn yield_cpu_to_the_front() {}

/// How long the writer waits for more journaled appends when it is behind (see [`lingers`]).
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
/// A batch of this many journaled appends is worth committing without waiting for more.
const LINGER_ENOUGH: usize = 512;
/// Fewer journaled appends than this arrived during the last commit: the rate is moderate and
/// waiting would only add latency.
const LINGER_FROM: usize = 16;

/// Whether to wait a moment for more before committing `cmds`: only journaled appends (their
/// producers have their answer; nothing else waits on this commit but a reader settling),
/// at least [`LINGER_FROM`] and fewer than [`LINGER_ENOUGH`] of them.
///
/// Why: under sustained ingest the writer commits whatever arrived while it committed the
/// last batch, a few dozen events at a time, and each commit opens every table and copies the
/// paths it touched; a millisecond more per batch halves the commits and takes 8-14% off the
/// writer's CPU per event, CPU the HTTP workers get instead (BENCHMARKS.md). The caller
/// lingers only when the writer is behind — a batch was already waiting when it finished the
/// last one, and it holds many appends — so at a moderate rate nothing waits.
fn lingers(cmds: &[Command]) -> bool {
    let mut appends = 0;
    for c in cmds {
        match c {
            Command::Journaled(j) => appends += j.appends.len(),
            _ => return false,
        }
    }
    (LINGER_FROM..LINGER_ENOUGH).contains(&appends)
}

/// Held outcomes are committed at once from this many.
const OUTCOME_HOLD_ENOUGH: usize = 64;

/// Outcomes waiting to share a durable commit, and since when the first of them waits.
///
/// Why: every outcome is a durable commit (two flushes, the allocator state, the tables
/// opened), and at a moderate rate each one arrives alone: at 1,000 events/s commits took
/// ~70% of the writer's CPU, and courier as a whole two thirds of a core (BENCHMARKS.md).
/// Held for at most [`OUTCOME_HOLD`], the outcomes of a few deliveries share one. New events
/// are not held back meanwhile (their deliveries wait for them to be applied): they are
/// applied without a flush as they come, ahead of the held outcomes — which is safe, as an
/// appended event only adds rows and never touches an existing delivery. Any other command
/// takes the held outcomes with it, in their order before its own; and an outcome that may
/// not wait (a FIFO endpoint's, or one of an endpoint near its in-flight cap, whose next
/// attempts wait for the slot) is committed at once, with the held ones.
#[derive(Default)]
struct Held {
    outcomes: Vec<Command>,
    since: Option<std::time::Instant>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.outcomes.is_empty()
    }

    /// Takes the outcomes of `cmds` that may wait into the held ones, or puts every held one
    /// back in front of `cmds` when it is time to commit them: they have waited their time,
    /// there are enough of them, `cmds` holds anything but new events and outcomes that may
    /// wait, or `now` (the writer is closing, or cannot wait).
    fn hold(&mut self, cmds: &mut Vec<Command>, now: bool) {
        let may_wait = |c: &Command| match c {
            Command::Journaled(_) => true,
            Command::Outcome(rec, _) => rec.may_wait,
            _ => false,
        };
        let is_outcome = |c: &Command| matches!(c, Command::Outcome(..));
        if !now && cmds.iter().all(may_wait) {
            // A batch of new events alone (full-load ingest) goes through untouched.
            if cmds.iter().any(is_outcome) {
                let (outcomes, appends): (Vec<_>, Vec<_>) =
                    std::mem::take(cmds).into_iter().partition(is_outcome);
                self.outcomes.extend(outcomes);
                *cmds = appends;
            }
            if self.outcomes.is_empty() {
                return;
            }
            let since = *self.since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() < OUTCOME_HOLD && self.outcomes.len() < OUTCOME_HOLD_ENOUGH {
                return;
            }
        }
        if !self.outcomes.is_empty() {
            self.outcomes.append(cmds);
            std::mem::swap(&mut self.outcomes, cmds);
        }
        self.since = None;
    }
}

/// Moves every command waiting in `rx` into `cmds` (up to [`MAX_BATCH`]); true once the
/// channel is closed.
fn drain(rx: &mut mpsc::Receiver<Command>, cmds: &mut Vec<Command>) -> bool {
    while cmds.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(c) => cmds.push(c),
            Err(mpsc::error::TryRecvError::Empty) => return false,
            Err(mpsc::error::TryRecvError::Disconnected) => return true,
        }
    }
    false
}

/// The changes `cmds` carry: each journaled append counts, a checkpoint does not.
fn changes(cmds: &[Command]) -> u64 {
    cmds.iter()
        .map(|c| match c {
            Command::Journaled(j) => j.appends.len() as u64,
            Command::Checkpoint => 0,
            _ => 1,
        })
        .sum()
}

/// How long the writer waits before trying a failed batch of journaled appends again, at
/// first and at most.
const RETRY_MIN: std::time::Duration = std::time::Duration::from_millis(50);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// A durable commit of nothing new: makes every earlier commit durable in the database.
fn checkpoint(db: &Database, quick_repair: bool) -> Result<(), StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.set_quick_repair(quick_repair);
    txn.commit()?;
    Ok(())
}

/// Re-applies journal records that the database's durable state does not cover (after a
/// crash), in one durable commit; returns how many there were.
pub(crate) fn replay_journal(
    db: &Database,
    records: &[super::journal::Record],
    quick_repair: bool,
) -> Result<usize, StoreError> {
    let Some((last, _)) = records.last() else {
        return Ok(0);
    };
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.set_quick_repair(quick_repair);
    let mut applied = 0;
    {
        let mut t = Tables::new(&txn);
        let mut deltas = Deltas::new();
        for (seq, payload) in records {
            let batch: AppendBatch = decode(payload, &format!("journal record {seq}"))?;
            // Every commit that applies records notes the last one, so none of these can be
            // in the database already; should one be, it is not counted twice.
            if t.events.open()?.get(batch.event.id.as_str())?.is_some() {
                continue;
            }
            // The record was applied once, in this order, against this state: an idempotent
            // repeat or an id conflict then is one again now.
            if t.append(&batch, &mut deltas)? == AppendResult::Created {
                applied += 1;
            }
        }
        t.apply_counts(&deltas)?;
        t.meta.open()?.insert(JOURNAL_SEQ, *last)?;
    }
    txn.commit()?;
    Ok(applied)
}

fn send(cmd: Command, reply: Reply) {
    // A caller that went away (client disconnected) no longer needs the answer; the change
    // is committed either way.
    match (cmd, reply) {
        (Command::Journaled(j), Reply::Journaled(results)) => {
            for ((_, tx), r) in j.appends.into_iter().zip(results) {
                match tx {
                    Some(tx) => drop(tx.send(r)),
                    // Answered already: it can only have created its event.
                    None => debug_assert!(matches!(r, Ok(AppendResult::Created)), "{r:?}"),
                }
            }
        }
        (Command::Checkpoint, Reply::Checkpoint) => {}
        (Command::Outcome(_, tx), Reply::Outcome(r)) => drop(tx.send(r)),
        (Command::Replay(_, _, tx), Reply::Replay(r)) => drop(tx.send(r)),
        (Command::Purge { reply, .. }, Reply::Purge(r)) => drop(reply.send(r)),
        (Command::Channel(_, tx), Reply::Channel(r)) => drop(tx.send(r)),
        (Command::Endpoint(_, tx), Reply::Endpoint(r)) => drop(tx.send(r)),
        (Command::ConfigPause { reply, .. }, Reply::ConfigPause(r)) => drop(reply.send(r)),
        (Command::DropPending { reply, .. }, Reply::DropPending(r)) => drop(reply.send(r)),
        _ => unreachable!("replies are produced in command order"),
    }
}

fn fail(cmd: Command, e: StoreError) {
    match cmd {
        Command::Journaled(j) => {
            for (_, tx) in j.appends {
                if let Some(tx) = tx {
                    drop(tx.send(Err(e.clone())));
                }
            }
        }
        Command::Checkpoint => {}
        Command::Outcome(_, tx) => drop(tx.send(Err(e))),
        Command::Replay(_, _, tx) => drop(tx.send(Err(e))),
        Command::Purge { reply, .. } => drop(reply.send(Err(e))),
        Command::Channel(_, tx) => drop(tx.send(Err(e))),
        Command::Endpoint(_, tx) => drop(tx.send(Err(e))),
        Command::ConfigPause { reply, .. } => drop(reply.send(Err(e))),
        Command::DropPending { reply, .. } => drop(reply.send(Err(e))),
    }
}

/// Changes to the per-(endpoint, status) counters made by one transaction.
pub(crate) type Deltas = HashMap<(String, DeliveryStatus), i64>;

/// Applies `cmds` in one transaction and commits it; returns the replies, whether the commit
/// was durable in the database (`Immediate`) or left to the journal (`None`: journaled appends
/// alone), and the last journal record it applied, if any.
fn apply(
    db: &Database,
    cmds: &[Command],
    deltas: &mut Deltas,
    quick_repair: bool,
) -> Result<(Vec<Reply>, Durability, Option<u64>), StoreError> {
    let mut txn = db.begin_write()?;
    // Save the allocator state with each durable commit, so that opening the database after a
    // crash takes milliseconds instead of a walk over the whole file (see BENCHMARKS.md).
    txn.set_quick_repair(quick_repair);
    let mut replies = Vec::with_capacity(cmds.len());
    let mut journaled = None;
    let durability = if cmds.iter().all(|c| matches!(c, Command::Journaled(_))) {
        Durability::None
    } else {
        Durability::Immediate
    };
    {
        let mut t = Tables::new(&txn);
        for cmd in cmds {
            replies.push(match cmd {
                Command::Journaled(j) => {
                    journaled = Some(j.last_seq);
                    Reply::Journaled(j.appends.iter().map(|(b, _)| t.append(b, deltas)).collect())
                }
                Command::Checkpoint => Reply::Checkpoint,
                Command::Outcome(rec, _) => Reply::Outcome(t.outcome(rec, deltas)),
                Command::Replay(target, births, _) => {
                    Reply::Replay(t.replay(target, births, deltas))
                }
                Command::DropPending {
                    endpoint,
                    reason,
                    limit,
                    ..
                } => Reply::DropPending(t.drop_pending(endpoint, reason, *limit, deltas)),
                Command::Purge {
                    before_ms,
                    idempotency_before_ms,
                    limit,
                    cursor,
                    ..
                } => Reply::Purge(t.purge(
                    *before_ms,
                    *idempotency_before_ms,
                    *limit,
                    cursor,
                    deltas,
                )),
                Command::Channel(change, _) => Reply::Channel(t.channel(change, deltas)),
                Command::Endpoint(w, _) => Reply::Endpoint(t.endpoint(w)),
                Command::ConfigPause { name, paused, .. } => {
                    Reply::ConfigPause(t.config_pause(name, *paused))
                }
            });
        }
        // A storage error inside a command leaves the transaction in an unknown state: fail
        // the whole batch rather than commit half of a change.
        for r in &replies {
            let err = match r {
                Reply::Journaled(rs) => rs.iter().find_map(|r| r.as_ref().err()),
                Reply::Outcome(Err(e)) => Some(e),
                Reply::Replay(Err(e)) | Reply::Purge(Err(e)) | Reply::Channel(Err(e)) => Some(e),
                Reply::Endpoint(Err(e)) | Reply::DropPending(Err(e)) => Some(e),
                Reply::ConfigPause(Err(e)) => Some(e),
                _ => None,
            };
            if let Some(
                e @ (StoreError::Db(_)
                | StoreError::Io(_)
                | StoreError::Corrupt(_)
                | StoreError::Broken),
            ) = err
            {
                return Err(e.clone());
            }
        }
        t.apply_counts(deltas)?;
        t.flush_rollups()?;
        if let Some(seq) = journaled {
            t.meta.open()?.insert(JOURNAL_SEQ, seq)?;
        }
    }
    txn.set_durability(durability)?;
    txn.commit()?;
    Ok((replies, durability, journaled))
}

/// A table of a write transaction, opened the first time it is used.
///
/// Why: opening a table looks it up in the table tree, and closing it writes its root back.
/// At a moderate rate a commit carries one event or a few outcomes and uses 6 to 9 of the
/// tables; opening all of them for every commit took ~10% of the writer's CPU at 1,000
/// events/s (BENCHMARKS.md).
struct Lazy<'t, K: redb::Key + 'static, V: redb::Value + 'static> {
    txn: &'t redb::WriteTransaction,
    definition: redb::TableDefinition<'static, K, V>,
    table: Option<redb::Table<'t, K, V>>,
}

impl<'t, K: redb::Key + 'static, V: redb::Value + 'static> Lazy<'t, K, V> {
    fn new(
        txn: &'t redb::WriteTransaction,
        definition: redb::TableDefinition<'static, K, V>,
    ) -> Self {
        Lazy {
            txn,
            definition,
            table: None,
        }
    }

    fn open(&mut self) -> Result<&mut redb::Table<'t, K, V>, StoreError> {
        if self.table.is_none() {
            self.table = Some(self.txn.open_table(self.definition)?);
        }
        Ok(self.table.as_mut().expect("opened above"))
    }
}

/// Every table of a write transaction, each opened the first time a command uses it.
struct Tables<'t> {
    events: Lazy<'t, &'static str, &'static [u8]>,
    deliveries: Lazy<'t, &'static str, &'static [u8]>,
    attempts: Lazy<'t, (&'static str, u32), &'static [u8]>,
    queue: Lazy<'t, (&'static str, u64, &'static str), ()>,
    pending: Lazy<'t, (&'static str, &'static str), u64>,
    by_status: Lazy<'t, (&'static str, &'static str), ()>,
    dead_by_endpoint: Lazy<'t, (&'static str, &'static str), ()>,
    counts: Lazy<'t, (&'static str, &'static str), u64>,
    idempotency: Lazy<'t, (&'static str, &'static str), (u64, &'static [u8])>,
    idempotency_age: Lazy<'t, (u64, &'static str, &'static str), ()>,
    rollups: Lazy<'t, (&'static str, u64), &'static [u8]>,
    /// This transaction's attempts by (endpoint, minute), written to `rollups` once each at
    /// the end ([`Tables::flush_rollups`]).
    new_rollups: HashMap<(String, u64), Rollup>,
    channels: Lazy<'t, &'static str, &'static [u8]>,
    channels_done: Lazy<'t, (u64, &'static str), ()>,
    unrouted: Lazy<'t, (u64, &'static str), ()>,
    timers: Lazy<'t, (u64, &'static str, u8), ()>,
    upstream_timers: Lazy<'t, (&'static str, u64, &'static str), ()>,
    endpoints: Lazy<'t, &'static str, &'static [u8]>,
    meta: Lazy<'t, &'static str, u64>,
    /// The bytes of the record being inserted: one buffer for every insert of the
    /// transaction instead of a growing allocation per record.
    scratch: Vec<u8>,
}

impl<'t> Tables<'t> {
    fn new(txn: &'t redb::WriteTransaction) -> Self {
        Tables {
            events: Lazy::new(txn, EVENTS),
            deliveries: Lazy::new(txn, DELIVERIES),
            attempts: Lazy::new(txn, ATTEMPTS),
            queue: Lazy::new(txn, QUEUE),
            pending: Lazy::new(txn, PENDING),
            by_status: Lazy::new(txn, BY_STATUS),
            dead_by_endpoint: Lazy::new(txn, DEAD_BY_ENDPOINT),
            counts: Lazy::new(txn, COUNTS),
            idempotency: Lazy::new(txn, IDEMPOTENCY),
            idempotency_age: Lazy::new(txn, IDEMPOTENCY_AGE),
            rollups: Lazy::new(txn, ROLLUPS),
            new_rollups: HashMap::new(),
            channels: Lazy::new(txn, CHANNELS),
            channels_done: Lazy::new(txn, CHANNELS_DONE),
            unrouted: Lazy::new(txn, UNROUTED),
            timers: Lazy::new(txn, TIMERS),
            upstream_timers: Lazy::new(txn, UPSTREAM_TIMERS),
            endpoints: Lazy::new(txn, ENDPOINTS),
            meta: Lazy::new(txn, META),
            scratch: Vec::new(),
        }
    }

    fn load(&mut self, id: &str) -> Result<Option<Delivery>, StoreError> {
        match self.deliveries.open()?.get(id)? {
            Some(v) => Ok(Some(decode(v.value(), "delivery")?)),
            None => Ok(None),
        }
    }

    /// The one place a delivery changes state: the record and every index move together.
    fn put(
        &mut self,
        old: Option<&Delivery>,
        new: &Delivery,
        deltas: &mut Deltas,
    ) -> Result<(), StoreError> {
        if let Some(old) = old {
            self.unindex(old)?;
            if old.status != new.status {
                *deltas
                    .entry((old.endpoint.clone(), old.status))
                    .or_default() -= 1;
            }
        }
        self.index(new)?;
        if old.map(|o| o.status) != Some(new.status) {
            *deltas
                .entry((new.endpoint.clone(), new.status))
                .or_default() += 1;
        }
        self.deliveries
            .open()?
            .insert(new.id.as_str(), encode_in(new, &mut self.scratch))?;
        Ok(())
    }

    /// Enters `d` in the indexes of its state: the due-time and pending indexes while it is
    /// pending, the status index once it is finished.
    fn index(&mut self, d: &Delivery) -> Result<(), StoreError> {
        if d.status == DeliveryStatus::Pending {
            let due = d.next_due_ms.unwrap_or(0);
            self.queue
                .open()?
                .insert((d.endpoint.as_str(), due, d.id.as_str()), ())?;
            self.pending
                .open()?
                .insert((d.endpoint.as_str(), d.id.as_str()), due)?;
        } else {
            self.by_status
                .open()?
                .insert((d.status.as_str(), d.id.as_str()), ())?;
            if d.status == DeliveryStatus::Dead {
                self.dead_by_endpoint
                    .open()?
                    .insert((d.endpoint.as_str(), d.id.as_str()), ())?;
            }
        }
        Ok(())
    }

    /// Takes `d` out of the indexes [`Tables::index`] entered it in.
    fn unindex(&mut self, d: &Delivery) -> Result<(), StoreError> {
        if d.status == DeliveryStatus::Pending {
            if let Some(due) = d.next_due_ms {
                self.queue
                    .open()?
                    .remove((d.endpoint.as_str(), due, d.id.as_str()))?;
            }
            self.pending
                .open()?
                .remove((d.endpoint.as_str(), d.id.as_str()))?;
        } else {
            self.by_status
                .open()?
                .remove((d.status.as_str(), d.id.as_str()))?;
            if d.status == DeliveryStatus::Dead {
                self.dead_by_endpoint
                    .open()?
                    .remove((d.endpoint.as_str(), d.id.as_str()))?;
            }
        }
        Ok(())
    }

    fn remove_delivery(&mut self, d: &Delivery, deltas: &mut Deltas) -> Result<(), StoreError> {
        self.unindex(d)?;
        *deltas.entry((d.endpoint.clone(), d.status)).or_default() -= 1;
        self.deliveries.open()?.remove(d.id.as_str())?;
        self.attempts
            .open()?
            .retain_in((d.id.as_str(), 0u32)..=(d.id.as_str(), u32::MAX), |_, _| {
                false
            })?;
        Ok(())
    }

    fn append(&mut self, b: &AppendBatch, deltas: &mut Deltas) -> Result<AppendResult, StoreError> {
        if let Some(idem) = &b.idempotency
            && let Some(found) = self
                .idempotency
                .open()?
                .get((idem.key_id.as_str(), idem.key.as_str()))?
        {
            let (_, reply) = found.value();
            return Ok(AppendResult::Replayed(reply.to_vec()));
        }
        if b.id_supplied && self.events.open()?.get(b.event.id.as_str())?.is_some() {
            return Ok(AppendResult::IdConflict);
        }
        self.events
            .open()?
            .insert(b.event.id.as_str(), encode_in(&b.event, &mut self.scratch))?;
        for d in &b.deliveries {
            self.put(None, d, deltas)?;
        }
        if b.deliveries.is_empty() {
            self.unrouted
                .open()?
                .insert((b.event.created_ms, b.event.id.as_str()), ())?;
        }
        if let Some(idem) = &b.idempotency {
            self.idempotency.open()?.insert(
                (idem.key_id.as_str(), idem.key.as_str()),
                (b.event.created_ms, b.reply.as_slice()),
            )?;
            self.idempotency_age.open()?.insert(
                (b.event.created_ms, idem.key_id.as_str(), idem.key.as_str()),
                (),
            )?;
        }
        Ok(AppendResult::Created)
    }

    fn outcome(&mut self, rec: &OutcomeRecord, deltas: &mut Deltas) -> Result<Decided, StoreError> {
        let Some(old) = self.load(&rec.delivery_id)? else {
            return Err(StoreError::NotFound(rec.delivery_id.clone()));
        };
        // Dropped while its attempt was in flight (its endpoint was deleted): the attempt is
        // still part of the audit trail, but only a success changes what became of it.
        let settled = old.status != DeliveryStatus::Pending;
        if settled && old.status != DeliveryStatus::Dropped {
            tracing::warn!(delivery = %old.id, status = old.status.as_str(), "outcome for a delivery that is no longer pending");
        }
        // Pending again, in a round begun since this attempt did (dropped while it was in
        // flight, then replayed): the attempt joins the audit trail, and the new round —
        // its attempts, its schedule, its state — is none of its business.
        let other_round = !settled && rec.read_updated_ms.is_some_and(|u| u != old.updated_ms);
        if other_round {
            tracing::warn!(delivery = %old.id, "outcome of an attempt from before the delivery was replayed: kept in its audit trail only");
        }
        // Whether this outcome decides what becomes of the delivery: not for another round,
        // nor for a settled delivery but by a late success. (The attempt's record says so.)
        let decided = !other_round && (!settled || rec.next == super::Next::Delivered);
        let mut new = old.clone();
        // A settled delivery keeps the time it was settled (by its endpoint's delete), even
        // when a late success changes it: the replay guard compares that time with the birth
        // of an endpoint made later under the name, and the delivery stays the old one's.
        // (The new round's own attempt in flight checks it too.)
        if !settled && !other_round {
            new.updated_ms = now_ms();
        }
        if rec.counts_as_attempt {
            new.attempts += 1;
            if !other_round {
                new.round_attempts += 1;
            }
            let mut attempt = rec.attempt.clone();
            attempt.number = new.attempts;
            if !decided {
                attempt.outcome = SUPERSEDED.into();
            }
            self.attempts.open()?.insert(
                (old.id.as_str(), attempt.number),
                encode_in(&attempt, &mut self.scratch),
            )?;
            self.new_rollups
                .entry((old.endpoint.clone(), minute(attempt.started_ms)))
                .or_default()
                .add(
                    rec.measured.then_some(attempt.duration_ms),
                    rec.next == super::Next::Delivered,
                    attempt.number == 1,
                );
        }
        match &rec.next {
            _ if !decided => {}
            super::Next::Delivered => {
                new.status = DeliveryStatus::Delivered;
                new.next_due_ms = None;
                new.last_error = None;
            }
            super::Next::Retry { due_ms, error } => {
                new.status = DeliveryStatus::Pending;
                new.next_due_ms = Some(*due_ms);
                new.last_error = error.clone();
            }
            super::Next::Dead { reason } => {
                new.status = DeliveryStatus::Dead;
                new.next_due_ms = None;
                new.last_error = Some(reason.clone());
            }
            super::Next::Dropped { reason } => {
                new.status = DeliveryStatus::Dropped;
                new.next_due_ms = None;
                new.last_error = Some(reason.clone());
            }
        }
        self.put(Some(&old), &new, deltas)?;
        Ok(if decided {
            Decided::Yes
        } else {
            Decided::No(new.status)
        })
    }

    fn drop_pending(
        &mut self,
        endpoint: &str,
        reason: &str,
        limit: usize,
        deltas: &mut Deltas,
    ) -> Result<usize, StoreError> {
        let mut ids = Vec::new();
        for row in self
            .pending
            .open()?
            .range((endpoint, "")..(endpoint, "\u{10ffff}"))?
        {
            if ids.len() >= limit {
                break;
            }
            ids.push(row?.0.value().1.to_string());
        }
        let now = now_ms();
        for id in &ids {
            let Some(old) = self.load(id)? else { continue };
            let mut new = old.clone();
            new.status = DeliveryStatus::Dropped;
            new.next_due_ms = None;
            new.last_error = Some(reason.to_string());
            new.updated_ms = now;
            self.put(Some(&old), &new, deltas)?;
        }
        // Fewer than asked: none are left. A limit of 0 drops nothing and only lets the
        // promise go (a config endpoint serves the name now and keeps its queue).
        if ids.len() < limit || limit == 0 {
            let key = format!("{DROPPING}{endpoint}");
            self.meta.open()?.remove(key.as_str())?;
        }
        Ok(ids.len())
    }

    fn replay(
        &mut self,
        target: &ReplayTarget,
        births: &super::Births,
        deltas: &mut Deltas,
    ) -> Result<ReplayResult, StoreError> {
        use std::ops::Bound;
        let mut result = ReplayResult::default();
        let ids: Vec<String> = match target {
            ReplayTarget::Ids(ids) => ids.clone(),
            ReplayTarget::Dead {
                filter,
                after,
                limit,
                ..
            } => {
                let (lo, hi) = id_range("dlv", filter.since_ms, filter.until_ms);
                // One endpoint's dead letters from its own index, all of them from the
                // status index: both are keyed (prefix, delivery id).
                let (index, prefix) = match filter.endpoint.as_deref() {
                    Some(endpoint) => (self.dead_by_endpoint.open()?, endpoint),
                    None => (self.by_status.open()?, DeliveryStatus::Dead.as_str()),
                };
                let start = if after.as_str() >= lo.as_str() {
                    Bound::Excluded((prefix, after.as_str()))
                } else {
                    Bound::Included((prefix, lo.as_str()))
                };
                let mut ids = Vec::new();
                for row in index.range((start, Bound::Excluded((prefix, hi.as_str()))))? {
                    if ids.len() >= *limit {
                        result.next = ids.last().cloned();
                        break;
                    }
                    let (k, _) = row?;
                    ids.push(k.value().1.to_string());
                }
                ids
            }
        };
        let now = now_ms();
        for id in ids {
            // A record that cannot be read is passed over (and reported), as retention does:
            // failing would fail every change committed with this one, and every later bulk
            // replay would stop at the same record.
            let old = match self.load(&id) {
                Ok(Some(old)) => old,
                Ok(None) => {
                    result.not_found.push(id);
                    continue;
                }
                Err(StoreError::Corrupt(e)) => {
                    tracing::error!(delivery = %id, error = %e, "replay skips a delivery it cannot read");
                    result.unreadable.push(id);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let ReplayTarget::Dead {
                filter,
                dead_before_ms,
                ..
            } = target
                && (filter
                    .endpoint
                    .as_deref()
                    .is_some_and(|e| e != old.endpoint)
                    || old.updated_ms >= *dead_before_ms)
            {
                continue;
            }
            if old.status == DeliveryStatus::Pending {
                result.already_pending.push(id);
                continue;
            }
            if super::orphaned(old.updated_ms, births.get(&old.endpoint).copied()) {
                result.earlier_endpoint.push(id);
                continue;
            }
            let mut new = old.clone();
            new.status = DeliveryStatus::Pending;
            new.round_attempts = 0;
            new.next_due_ms = Some(now);
            new.updated_ms = now;
            new.last_error = None;
            self.put(Some(&old), &new, deltas)?;
            result.requeued.push(new);
        }
        Ok(result)
    }

    /// One round of a retention sweep (see [`super::Store::purge`]): examines at most
    /// `limit` finished deliveries after `from`, so the writer is never held for long.
    fn purge(
        &mut self,
        before_ms: u64,
        idempotency_before_ms: u64,
        limit: usize,
        from: &PurgeCursor,
        deltas: &mut Deltas,
    ) -> Result<PurgeRound, StoreError> {
        use std::ops::Bound;
        // Only deliveries created before the cutoff can have finished before it.
        let hi = id_floor("dlv", before_ms);
        let mut cursor = from.clone();
        let mut victims = Vec::new();
        while cursor.status < FINISHED.len() && victims.len() < limit {
            let status = FINISHED[cursor.status].as_str();
            let start = match cursor.after.as_str() {
                "" => Bound::Included((status, "")),
                after => Bound::Excluded((status, after)),
            };
            let mut exhausted = true;
            for row in self
                .by_status
                .open()?
                .range((start, Bound::Excluded((status, hi.as_str()))))?
            {
                if victims.len() >= limit {
                    exhausted = false;
                    break;
                }
                let (k, _) = row?;
                victims.push(k.value().1.to_string());
            }
            match exhausted {
                true => {
                    cursor = PurgeCursor {
                        status: cursor.status + 1,
                        after: String::new(),
                        rollups_done: cursor.rollups_done,
                    }
                }
                false => cursor.after = victims.last().cloned().unwrap_or_default(),
            }
        }
        let mut purged = 0;
        // The delivery ids of the events this round's deliveries belong to, each event read
        // once (with its payload) rather than once per delivery: one event fanned out to
        // thousands of endpoints has its deliveries purged together.
        let mut siblings: HashMap<String, Option<Vec<String>>> = HashMap::new();
        for id in victims {
            // A record that cannot be read is left where it is (and reported): failing the
            // sweep would fail every change committed with it, and every later sweep would
            // stop at the same record, so nothing after it would ever be purged.
            let d = match self.load(&id) {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(StoreError::Corrupt(e)) => {
                    tracing::error!(delivery = %id, error = %e, "retention skips a delivery it cannot read");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if d.updated_ms >= before_ms {
                continue;
            }
            self.remove_delivery(&d, deltas)?;
            purged += 1;
            if !siblings.contains_key(&d.event_id) {
                let ids = match self.events.open()?.get(d.event_id.as_str())? {
                    Some(v) => match decode::<Event>(v.value(), "event") {
                        Ok(e) => Some(e.delivery_ids),
                        Err(e) => {
                            tracing::error!(event = %d.event_id, error = %e, "retention keeps an event it cannot read");
                            None
                        }
                    },
                    None => None,
                };
                siblings.insert(d.event_id.clone(), ids);
            }
            if let Some(Some(ids)) = siblings.get(&d.event_id) {
                // From the last: deliveries are purged in id order, so a sibling still there
                // is most likely a later one.
                let mut remaining = false;
                for other in ids.iter().rev() {
                    if self.deliveries.open()?.get(other.as_str())?.is_some() {
                        remaining = true;
                        break;
                    }
                }
                if !remaining {
                    self.events.open()?.remove(d.event_id.as_str())?;
                    siblings.remove(&d.event_id);
                }
            }
        }
        // Attempt statistics of the minutes wholly before `before_ms`, at most `limit` rows a
        // round (a retention lowered from 30 days to one leaves millions), until none is left.
        let cutoff = minute(before_ms);
        let mut rollups_purged = 0;
        if !cursor.rollups_done {
            let mut old = Vec::new();
            for name in super::rollup::endpoints(self.rollups.open()?)? {
                for row in self
                    .rollups
                    .open()?
                    .range((name.as_str(), 0)..(name.as_str(), cutoff))?
                    .take(limit - old.len())
                {
                    old.push((name.clone(), row?.0.value().1));
                }
                if old.len() >= limit {
                    break;
                }
            }
            rollups_purged = old.len();
            for (name, at) in old {
                self.rollups.open()?.remove((name.as_str(), at))?;
            }
            cursor.rollups_done = rollups_purged < limit;
        }
        let mut stale = Vec::new();
        for row in self
            .idempotency_age
            .open()?
            .range((0u64, "", "")..(idempotency_before_ms, "", ""))?
            .take(limit)
        {
            let (k, _) = row?;
            let (at, a, b) = k.value();
            stale.push((at, a.to_string(), b.to_string()));
        }
        let keys_expired = stale.len();
        for (at, a, b) in stale {
            self.idempotency.open()?.remove((a.as_str(), b.as_str()))?;
            self.idempotency_age
                .open()?
                .remove((at, a.as_str(), b.as_str()))?;
        }
        // Workflow channels that finished before the cutoff (a finished channel has no
        // timers left; its webhook deliveries go their own way above).
        let mut done = Vec::new();
        for row in self
            .channels_done
            .open()?
            .range((0u64, "")..(before_ms, ""))?
            .take(limit)
        {
            let (k, _) = row?;
            let (at, id) = k.value();
            done.push((at, id.to_string()));
        }
        let channels_purged = done.len();
        for (at, id) in done {
            self.channels_done.open()?.remove((at, id.as_str()))?;
            self.channels.open()?.remove(id.as_str())?;
        }
        // Events no endpoint subscribed to, stored before the cutoff.
        let mut unrouted = Vec::new();
        for row in self
            .unrouted
            .open()?
            .range((0u64, "")..(before_ms, ""))?
            .take(limit)
        {
            let (k, _) = row?;
            let (at, id) = k.value();
            unrouted.push((at, id.to_string()));
        }
        let events_purged = unrouted.len();
        for (at, id) in unrouted {
            self.unrouted.open()?.remove((at, id.as_str()))?;
            self.events.open()?.remove(id.as_str())?;
        }
        Ok(PurgeRound {
            purged,
            keys_expired,
            channels_purged,
            events_purged,
            rollups_purged,
            cursor,
        })
    }

    /// Creates or advances a channel, moving its timers with it, and appends the workflow's
    /// webhook (if any) in the same transaction. An advance applies only against the version
    /// the caller read.
    fn channel(
        &mut self,
        change: &ChannelChange,
        deltas: &mut Deltas,
    ) -> Result<AdvanceResult, StoreError> {
        let current: Option<Channel> =
            match self.channels.open()?.get(change.channel.id.as_str())? {
                Some(v) => Some(decode(v.value(), "channel")?),
                None => None,
            };
        match (&current, change.expect_version) {
            (Some(_), None) => return Ok(AdvanceResult::Stale(current.expect("present"))),
            (None, Some(_)) => return Ok(AdvanceResult::NotFound),
            (Some(cur), Some(v)) if cur.version != v => {
                return Ok(AdvanceResult::Stale(cur.clone()));
            }
            _ => {}
        }
        if let Some(cur) = &current {
            for (due, kind) in &cur.timers {
                self.timer(cur, *due, *kind, false)?;
            }
        }
        let new = &change.channel;
        if let Some(cur) = current.as_ref().filter(|c| c.state.is_final()) {
            self.channels_done
                .open()?
                .remove((cur.updated_ms, cur.id.as_str()))?;
        }
        if new.state.is_final() {
            self.channels_done
                .open()?
                .insert((new.updated_ms, new.id.as_str()), ())?;
        }
        for (due, kind) in &new.timers {
            self.timer(new, *due, *kind, true)?;
        }
        self.channels
            .open()?
            .insert(new.id.as_str(), encode_in(new, &mut self.scratch))?;
        if let Some(batch) = &change.append {
            match self.append(batch, deltas)? {
                AppendResult::Created => {}
                other => {
                    return Err(StoreError::Corrupt(format!(
                        "workflow delivery not appended: {other:?}"
                    )));
                }
            }
        }
        Ok(AdvanceResult::Applied)
    }

    /// Inserts (or removes) one of `ch`'s timers: an upstream call in its workflow's queue,
    /// any other in the shared timer table.
    fn timer(
        &mut self,
        ch: &Channel,
        due: u64,
        kind: TimerKind,
        insert: bool,
    ) -> Result<(), StoreError> {
        let id = ch.id.as_str();
        if kind == TimerKind::Upstream {
            let key = (ch.workflow.as_str(), due, id);
            let t = self.upstream_timers.open()?;
            if insert {
                t.insert(key, ())?;
            } else {
                t.remove(key)?;
            }
        } else {
            let key = (due, id, kind.code());
            let t = self.timers.open()?;
            if insert {
                t.insert(key, ())?;
            } else {
                t.remove(key)?;
            }
        }
        Ok(())
    }

    /// Creates, replaces or deletes an API endpoint; `false` when the name is taken (create)
    /// or absent (replace, delete).
    fn endpoint(&mut self, w: &EndpointWrite) -> Result<bool, StoreError> {
        let exists = self.endpoints.open()?.get(w.name.as_str())?.is_some();
        if exists == w.create {
            return Ok(false);
        }
        match &w.value {
            Some(v) => self
                .endpoints
                .open()?
                .insert(w.name.as_str(), v.as_slice())?,
            None => self.endpoints.open()?.remove(w.name.as_str())?,
        };
        if w.value.is_none() && w.drop_pending {
            let key = format!("{DROPPING}{}", w.name);
            self.meta.open()?.insert(key.as_str(), now_ms())?;
        }
        Ok(true)
    }

    fn config_pause(&mut self, name: &str, paused: bool) -> Result<(), StoreError> {
        let key = format!("{CONFIG_PAUSED}{name}");
        if paused {
            self.meta.open()?.insert(key.as_str(), now_ms())?;
        } else {
            self.meta.open()?.remove(key.as_str())?;
        }
        Ok(())
    }

    /// Adds this transaction's attempts to their rollup rows, one update per row.
    fn flush_rollups(&mut self) -> Result<(), StoreError> {
        for ((endpoint, minute), new) in std::mem::take(&mut self.new_rollups) {
            let key = (endpoint.as_str(), minute);
            let mut row: Rollup = match self.rollups.open()?.get(key)? {
                Some(v) => decode(v.value(), "attempt rollup")?,
                None => Rollup::default(),
            };
            row.merge(&new);
            self.rollups
                .open()?
                .insert(key, encode_in(&row, &mut self.scratch))?;
        }
        Ok(())
    }

    fn apply_counts(&mut self, deltas: &Deltas) -> Result<(), StoreError> {
        for ((endpoint, status), delta) in deltas {
            if *delta == 0 {
                continue;
            }
            let key = (endpoint.as_str(), status.as_str());
            let current = self
                .counts
                .open()?
                .get(key)?
                .map(|v| v.value())
                .unwrap_or(0);
            let next = (current as i64 + delta).max(0) as u64;
            if next == 0 {
                self.counts.open()?.remove(key)?;
            } else {
                self.counts.open()?.insert(key, next)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journaled(appends: usize) -> Command {
        Command::Journaled(Journaled {
            appends: (0..appends)
                .map(|i| (super::super::tests::batch(&format!("k{i}"), 1), None))
                .collect(),
            last_seq: appends as u64,
        })
    }

    /// This thread's nice value, as the kernel reports it.
    #[cfg(target_os = "linux")]
    fn own_nice() -> i64 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // Fields after the command name (which may hold spaces): state is the 3rd, nice the 19th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(19 - 3).unwrap().parse().unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_writer_thread_runs_below_the_request_path() {
        let before = own_nice();
        let writer = std::thread::spawn(|| {
            yield_cpu_to_the_front();
            own_nice()
        })
        .join()
        .unwrap();
        assert_eq!(writer, (before + WRITER_NICE as i64).min(19));
        assert_eq!(own_nice(), before, "only the writer's thread is lowered");
    }

    #[test]
    fn the_writer_lingers_only_over_a_busy_stream_of_journaled_appends() {
        // A moderate rate: a few appends per commit are committed at once.
        assert!(!lingers(&[journaled(1)]));
        assert!(!lingers(&[journaled(LINGER_FROM - 1)]));
        // Many appends arrived during the last commit: wait for more.
        assert!(lingers(&[journaled(LINGER_FROM)]));
        assert!(lingers(&[journaled(10), journaled(LINGER_FROM)]));
        // Enough for one commit.
        assert!(!lingers(&[journaled(LINGER_ENOUGH)]));
        // Someone waits on this commit: a checkpoint (the journal thread) or any other change.
        assert!(!lingers(&[journaled(LINGER_FROM), Command::Checkpoint]));
        let (tx, _rx) = oneshot::channel();
        assert!(!lingers(&[
            journaled(LINGER_FROM),
            Command::Endpoint(
                EndpointWrite {
                    name: "e".into(),
                    value: None,
                    create: false,
                    drop_pending: false,
                },
                tx
            )
        ]));
    }

    fn outcome(id: &str, may_wait: bool) -> Command {
        let (tx, _rx) = oneshot::channel();
        Command::Outcome(
            OutcomeRecord {
                delivery_id: id.into(),
                read_updated_ms: None,
                attempt: crate::model::Attempt {
                    number: 0,
                    started_ms: 0,
                    duration_ms: 0,
                    status_code: Some(204),
                    error: None,
                    error_detail: None,
                    response_body: String::new(),
                    outcome: "delivered".into(),
                },
                counts_as_attempt: true,
                measured: true,
                next: super::super::Next::Delivered,
                may_wait,
            },
            tx,
        )
    }

    /// What each command is, in order: `J` new events, `O<id>` an outcome, `C` a checkpoint.
    fn kinds(cmds: &[Command]) -> Vec<String> {
        cmds.iter()
            .map(|c| match c {
                Command::Journaled(_) => "J".to_string(),
                Command::Outcome(rec, _) => format!("O{}", rec.delivery_id),
                Command::Checkpoint => "C".to_string(),
                _ => "?".to_string(),
            })
            .collect()
    }

    #[test]
    fn outcomes_wait_to_share_a_commit_but_new_events_do_not() {
        let mut held = Held::default();
        // Outcomes that may wait are held; the new events with them go on at once.
        let mut cmds = vec![outcome("1", true), journaled(2), outcome("2", true)];
        held.hold(&mut cmds, false);
        assert_eq!(kinds(&cmds), ["J"]);
        assert_eq!(held.outcomes.len(), 2);
        let mut cmds = vec![outcome("3", true)];
        held.hold(&mut cmds, false);
        assert!(cmds.is_empty() && held.outcomes.len() == 3);
        // Any other command takes them along, in their order before its own.
        let mut cmds = vec![journaled(1), Command::Checkpoint];
        held.hold(&mut cmds, false);
        assert_eq!(kinds(&cmds), ["O1", "O2", "O3", "J", "C"]);
        assert!(held.is_empty() && held.since.is_none());
        // So does an outcome that may not wait (a FIFO endpoint's).
        let mut cmds = vec![outcome("4", true)];
        held.hold(&mut cmds, false);
        let mut cmds = vec![outcome("5", false)];
        held.hold(&mut cmds, false);
        assert_eq!(kinds(&cmds), ["O4", "O5"]);
        // Enough of them, or their time up, or the writer closing: committed now.
        let mut cmds: Vec<Command> = (0..OUTCOME_HOLD_ENOUGH)
            .map(|i| outcome(&i.to_string(), true))
            .collect();
        held.hold(&mut cmds, false);
        assert_eq!(cmds.len(), OUTCOME_HOLD_ENOUGH);
        assert!(held.is_empty());
        let mut cmds = vec![outcome("6", true)];
        held.hold(&mut cmds, false);
        std::thread::sleep(OUTCOME_HOLD);
        let mut cmds = vec![journaled(1)];
        held.hold(&mut cmds, false);
        assert_eq!(kinds(&cmds), ["O6", "J"]);
        let mut cmds = vec![outcome("7", true)];
        held.hold(&mut cmds, true);
        assert_eq!(kinds(&cmds), ["O7"]);
        assert!(held.is_empty());
    }
}
