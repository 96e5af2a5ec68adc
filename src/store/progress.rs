//! How far the write path has got, as journal sequence numbers: the last record on disk (its
//! producer may have been answered), the last one the database shows readers, and the last one
//! the database's durable state covers — with the waits on each.
//!
//! Why: the journal thread answers producers before the writer has applied their events, so
//! readers that must see an acknowledged event wait for `applied` to reach `journaled`
//! ([`super::Store::settle`]), and the journal thread waits for `checkpointed` before it writes
//! over a file's older records.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use tokio::sync::watch;

pub(crate) struct Progress {
    journaled: AtomicU64,
    /// When the database last moved (applied records), or began to have some to apply, as
    /// nanoseconds since `born`: how long it has been stuck, if records wait
    /// ([`Progress::stuck_for`]). (An atomic: it is set on every commit and journal write.)
    moved: AtomicU64,
    born: std::time::Instant,
    /// The last record applied; the watch also wakes readers waiting for it.
    applied: watch::Sender<u64>,
    checkpointed: Mutex<u64>,
    checkpointed_cv: Condvar,
}

/// Why [`Progress::settle`] gave up.
pub(crate) enum Unsettled {
    /// The writer has stopped (the store is closing).
    Closed,
    /// The database did not reach this record in time.
    TimedOut(u64),
}

impl Progress {
    /// Everything up to `seq` is on disk, in the database and covered by its durable state.
    pub(crate) fn new(seq: u64) -> Self {
        Progress {
            journaled: AtomicU64::new(seq),
            moved: AtomicU64::new(0),
            born: std::time::Instant::now(),
            applied: watch::Sender::new(seq),
            checkpointed: Mutex::new(seq),
            checkpointed_cv: Condvar::new(),
        }
    }

    /// Records up to `seq` are on disk in the journal (called before their producers are
    /// answered).
    pub(crate) fn set_journaled(&self, seq: u64) {
        // Nothing waited until now: a wait, if any, starts here (marked before the records
        // are, so that no look in between takes the idle time before for a stuck one).
        if self.settled() {
            self.mark_moved();
        }
        self.journaled.store(seq, Ordering::SeqCst);
    }

    pub(crate) fn applied(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Records up to `seq` are committed to the database and visible to readers.
    pub(crate) fn set_applied(&self, seq: u64) {
        self.mark_moved();
        self.applied.send_replace(seq);
    }

    fn mark_moved(&self) {
        let now = self.born.elapsed().as_nanos() as u64;
        self.moved.store(now, Ordering::SeqCst);
    }

    /// How long acknowledged records have waited for a database that applies none of them:
    /// `None` while it holds everything (or moved just now).
    pub(crate) fn stuck_for(&self) -> Option<Duration> {
        if self.settled() {
            return None;
        }
        let moved = Duration::from_nanos(self.moved.load(Ordering::SeqCst));
        Some(self.born.elapsed().saturating_sub(moved))
    }

    /// Records up to `seq` are covered by a durable commit of the database.
    pub(crate) fn set_checkpointed(&self, seq: u64) {
        let mut c = self.checkpointed.lock().expect("checkpointed lock");
        if seq > *c {
            *c = seq;
            self.checkpointed_cv.notify_all();
        }
    }

    /// Blocks until the database's durable state covers record `seq`, at most `timeout`;
    /// returns whether it does, and how long it blocked (zero when it already did).
    pub(crate) fn wait_checkpointed(
        &self,
        seq: u64,
        timeout: std::time::Duration,
    ) -> (bool, std::time::Duration) {
        let c = self.checkpointed.lock().expect("checkpointed lock");
        if *c >= seq {
            return (true, std::time::Duration::ZERO);
        }
        let started = std::time::Instant::now();
        let (c, _) = self
            .checkpointed_cv
            .wait_timeout_while(c, timeout, |c| *c < seq)
            .expect("checkpointed lock");
        (*c >= seq, started.elapsed())
    }

    /// Waits until the database shows every record on disk at the time of the call, at most
    /// `timeout`.
    /// Whether the database holds everything acknowledged so far.
    pub(crate) fn settled(&self) -> bool {
        self.applied() >= self.journaled.load(Ordering::SeqCst)
    }

    pub(crate) async fn settle(&self, timeout: Duration) -> Result<(), Unsettled> {
        let target = self.journaled.load(Ordering::SeqCst);
        if self.applied() >= target {
            return Ok(());
        }
        let mut rx = self.applied.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|a| *a >= target)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Unsettled::Closed),
            Err(_) => Err(Unsettled::TimedOut(target)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn settling_waits_for_the_database_to_reach_what_was_on_disk_at_the_call() {
        let p = Arc::new(Progress::new(5));
        // Nothing journaled beyond what is applied: no wait.
        assert!(p.settle(Duration::from_secs(5)).await.is_ok());
        p.set_journaled(9);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.settle(Duration::from_secs(30)).await.is_ok() })
        };
        p.set_applied(7);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "settled before record 9 was applied");
        // Records journaled after the call are not waited for.
        p.set_journaled(12);
        p.set_applied(9);
        assert!(waiter.await.unwrap());
        // A database that never gets there: the caller hears so.
        match p.settle(Duration::from_millis(20)).await {
            Err(Unsettled::TimedOut(12)) => {}
            _ => panic!("expected a time-out at record 12"),
        }
    }

    #[test]
    fn a_database_that_applies_nothing_while_records_wait_is_stuck_for_that_long() {
        let p = Progress::new(5);
        std::thread::sleep(Duration::from_millis(30));
        // Idle for a while is not stuck: nothing waits.
        assert_eq!(p.stuck_for(), None);
        // Records wait: counted from when they began to.
        let began = std::time::Instant::now();
        p.set_journaled(9);
        assert!(p.stuck_for().unwrap() <= began.elapsed());
        std::thread::sleep(Duration::from_millis(40));
        assert!(p.stuck_for().unwrap() >= Duration::from_millis(40));
        // It moves (not yet through): counted from then.
        let moved = std::time::Instant::now();
        p.set_applied(7);
        assert!(p.stuck_for().unwrap() <= moved.elapsed());
        p.set_applied(9);
        assert_eq!(p.stuck_for(), None);
    }

    #[test]
    fn the_journal_thread_waits_for_a_checkpoint_covering_the_records_it_writes_over() {
        let p = Arc::new(Progress::new(0));
        let long = Duration::from_secs(60);
        assert!(p.wait_checkpointed(0, long).0);
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || p.wait_checkpointed(40, long).0)
        };
        p.set_checkpointed(30);
        p.set_checkpointed(20); // never goes back
        p.set_checkpointed(41);
        assert!(waiter.join().unwrap());
        assert_eq!(*p.checkpointed.lock().unwrap(), 41);
        // Not covered in time: the caller is told so.
        assert!(!p.wait_checkpointed(50, Duration::from_millis(10)).0);
    }
}
