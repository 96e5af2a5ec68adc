//! The journal thread: the front of the durable write path. It takes every new event, writes
//! a batch of them to the ingest journal with one synchronous write, answers the producers
//! once that write is on disk, and hands the batch to the writer, which applies it to the
//! database behind it.
//!
//! Why a stage of its own: with the journal written by the writer, each batch waited for the
//! database work of the one before — applying it, committing, and every few thousand events a
//! checkpoint that writes out every page changed since the last one — and producers waited
//! for all of it. Now a producer waits for its batch's journal write alone; the database
//! catches up behind (readers wait for it: [`super::Store::settle`]).
//!
//! An append with an idempotency key or a producer-chosen id is still answered by the writer:
//! whether it creates anything depends on what the database holds (repeats and conflicts are
//! journaled too; re-applied in order against the same state they change nothing again). Any
//! other append can only create its event, so its answer is known once it is on disk.
//!
//! The journal's two files take turns (see [`super::journal`]): when one has taken a lap's
//! worth of records the thread asks the writer for a checkpoint and goes on in the other,
//! which it writes over only once the database covers the records it held.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::journal::Journal;
use super::tables::encode_onto;
use super::writer::{AppendReply, Command, Journaled};
use super::{AppendBatch, AppendResult, Shared, StoreError};

/// Most appends written in one batch.
pub(crate) const MAX_BATCH: usize = 4096;

/// A batch stops taking appends once its records reach this size, so that a file outgrows
/// its lap by at most this (and one record): the files are written over, never truncated.
pub(crate) const MAX_BATCH_BYTES: usize = 4 << 20;

/// How long a batch waits for the database to checkpoint the journal file it is about to
/// write over. Past it the batch is refused (503): the database cannot keep up or cannot
/// write (see the writer's log), and producers get an answer instead of waiting without end.
#[cfg(not(test))]
const CHECKPOINT_WAIT: std::time::Duration = super::SETTLE_TIMEOUT;
#[cfg(test)]
const CHECKPOINT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// Once a wait has run out, later batches wait this long only, until a checkpoint lands.
const CHECKPOINT_WAIT_STALLED: std::time::Duration = std::time::Duration::from_millis(100);

/// What the journal thread takes, in order.
// Not boxed: nearly every message is an event (as large as before there were barriers),
// and a box would cost an allocation per ingest.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Append {
    /// A new event on its way to the journal.
    Event(AppendBatch, AppendReply),
    /// Answered once every append taken before it is in the writer's queue (or was
    /// refused): see [`super::Store::journal_barrier`].
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// Where the journal thread sends the callers of a written batch that it answers itself,
/// all at once: a task on the async runtime ([`answer`]) sends each its answer.
///
/// Why: an answer wakes its caller's task. Woken from this thread, outside the runtime, each
/// task goes through the runtime's shared queue and may wake a parked worker thread (a
/// system call), a dozen or more times per batch; woken from a task on a worker, they join
/// that worker's own queue. One hand-over per batch instead of one per caller cost less CPU
/// here and on the workers, and ingest gained a few percent (BENCHMARKS.md).
pub(crate) type Answers = tokio::sync::mpsc::UnboundedSender<Vec<AppendReply>>;

/// Answers every caller of each batch the journal thread hands over: its event is on disk.
pub(crate) async fn answer(mut batches: tokio::sync::mpsc::UnboundedReceiver<Vec<AppendReply>>) {
    while let Some(batch) = batches.recv().await {
        for tx in batch {
            // A caller that went away no longer needs it.
            drop(tx.send(Ok(AppendResult::Created)));
        }
    }
}

/// Whether the answer to `b` is known before the database sees it (see the module docs).
pub(crate) fn creates_for_sure(b: &AppendBatch) -> bool {
    b.idempotency.is_none() && !b.id_supplied
}

/// The journal thread. Without `answers` (no async runtime to answer from) it answers its
/// callers itself.
pub(crate) fn run(
    answers: Option<Answers>,
    mut rx: mpsc::Receiver<Append>,
    writer: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    mut journal: Journal,
) {
    let mut batch: Vec<(AppendBatch, AppendReply)> = Vec::with_capacity(MAX_BATCH);
    let mut barrier = None;
    // The database must cover this record before the next write, which goes over it.
    let mut must_cover = 0u64;
    let mut stalled = false;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(a) = next.take() {
            match a {
                Append::Event(b, tx) => {
                    journal.push_with(|buf| encode_onto(&b, buf));
                    batch.push((b, tx));
                }
                // Answered once this batch is handed over: nothing after it joins the batch.
                Append::Barrier(tx) => {
                    barrier = Some(tx);
                    break;
                }
            }
            if batch.len() < MAX_BATCH && journal.buffered() < MAX_BATCH_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty()
            && !write_batch(
                &mut batch,
                &mut journal,
                &writer,
                &answers,
                &shared,
                &mut must_cover,
                &mut stalled,
            )
        {
            return;
        }
        if let Some(tx) = barrier.take() {
            let _ = tx.send(());
        }
    }
}

/// Writes one batch to the journal, hands it to the writer and answers the producers it can.
/// Returns `false` once the writer is gone (the thread stops taking appends).
fn write_batch(
    batch: &mut Vec<(AppendBatch, AppendReply)>,
    journal: &mut Journal,
    writer: &mpsc::Sender<Command>,
    answers: &Option<Answers>,
    shared: &Shared,
    must_cover: &mut u64,
    stalled: &mut bool,
) -> bool {
    let wait = if *stalled {
        CHECKPOINT_WAIT_STALLED
    } else {
        CHECKPOINT_WAIT
    };
    let (covered, waited) = shared.progress.wait_checkpointed(*must_cover, wait);
    if !waited.is_zero() {
        shared.journal_stalled.inc_by(waited.as_secs_f64());
    }
    *stalled = !covered;
    if *stalled {
        journal.discard();
        tracing::error!(
            appends = batch.len(),
            "the database has not checkpointed the ingest journal in time; refusing appends until it does"
        );
        let e = StoreError::Behind(format!(
            "the database is behind the ingest journal (it did not checkpoint within {CHECKPOINT_WAIT:?}; see the log for write errors); not accepted"
        ));
        for (_, tx) in batch.drain(..) {
            drop(tx.send(Err(e.clone())));
        }
        return true;
    }
    #[cfg(test)]
    let written = if shared
        .fail_journal
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        journal.discard();
        Err(StoreError::Db("journal: write: injected failure".into()))
    } else {
        journal.write()
    };
    #[cfg(not(test))]
    let written = journal.write();
    shared.journal_written(written.is_ok());
    if let Err(e) = written {
        tracing::error!(error = %e, appends = batch.len(), "ingest journal write failed");
        for (_, tx) in batch.drain(..) {
            drop(tx.send(Err(e.clone())));
        }
        return true;
    }
    let last_seq = journal.last_seq();
    shared.journal_writes.inc();
    shared.progress.set_journaled(last_seq);
    let mut answered: Vec<AppendReply> = Vec::with_capacity(batch.len());
    let appends = batch
        .drain(..)
        .map(|(b, tx)| {
            if creates_for_sure(&b) {
                answered.push(tx);
                (b, None)
            } else {
                (b, Some(tx))
            }
        })
        .collect();
    // Handed over before anyone is answered, so that whatever a producer does next reaches
    // the writer after its event.
    if writer
        .blocking_send(Command::Journaled(Journaled { appends, last_seq }))
        .is_err()
    {
        // The writer is gone while this thread still holds a sender to it: it died (a
        // panic). These records are on disk and the next start applies them, so their
        // producers are told the truth, that their events are accepted (the others, whose
        // answer needs the database, get `Closed` as their replies are dropped). Nothing
        // more is taken: with no writer to checkpoint, the journal would run on into
        // records the database does not hold, and producers would be told of failures
        // for events the next start then delivers.
        tracing::error!(
            appends = answered.len(),
            "the database writer has stopped; the ingest journal refuses new events until courier restarts"
        );
        for tx in answered {
            drop(tx.send(Ok(AppendResult::Created)));
        }
        return false;
    }
    let unsent = match answers {
        Some(_) if answered.is_empty() => None,
        Some(to) => to.send(answered).err().map(|e| e.0),
        None => Some(answered),
    };
    // Without a runtime (or once it is gone, shutting down), answer from here.
    for tx in unsent.into_iter().flatten() {
        drop(tx.send(Ok(AppendResult::Created)));
    }
    if journal.lap_full() {
        // The writer checkpoints once it has applied this file's records (they are ahead
        // of this command on its channel).
        let _ = writer.blocking_send(Command::Checkpoint);
        *must_cover = journal.switch();
    }
    true
}
