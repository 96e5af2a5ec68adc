//! The ingest gate: lets an endpoint's delete wait out the ingests that may have found the
//! endpoint before it went.
//!
//! Why: an ingest looks up its endpoints, then hands the event to the store; a delete removes
//! the endpoint, then drops the deliveries queued for it. An ingest that found the endpoint
//! just before it went could reach the store after that drop, and its delivery would then go
//! to whatever endpoint is made next under the name (perhaps another tenant's). So each ingest
//! holds a [`Pass`] over that span, and the delete, once the endpoint is gone, waits until
//! every pass taken before has been given back.
//!
//! A pass can be given back early, when the producer hangs up and its request is dropped
//! after the event was handed to the journal but before the writer has it. A pass alone
//! therefore covers the lookup until the hand-over to the journal (a hand-over is never
//! half done); the delete then waits on [`crate::store::Store::journal_barrier`] for the
//! journal to pass everything it took on to the writer.
//!
//! Why not a read-write lock: every ingest takes a pass, and an async lock's release takes a
//! mutex that both HTTP workers contend for — in interleaved runs that cost durable ingest
//! over a tenth of its rate. A pass is one atomic increment and one decrement, on a counter
//! of the CPU it is taken on; the rare delete does the waiting, over every counter. Passes
//! are counted on two sides: a delete moves new passes to the other side and waits for its
//! side to empty, so a steady stream of ingests cannot hold it off.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

/// Counters per side: one per CPU (modulo), so that the HTTP workers on different cores do
/// not pass one cache line back and forth on every ingest.
const SHARDS: usize = 16;

/// See the module docs.
pub struct IngestGate {
    /// Which side new passes count on (its lowest bit).
    epoch: AtomicUsize,
    /// Passes held, per side and shard; each on a cache line of its own, away from `epoch`,
    /// which every ingest reads.
    held: [[Padded; SHARDS]; 2],
}

impl Default for IngestGate {
    fn default() -> Self {
        IngestGate {
            epoch: AtomicUsize::new(0),
            held: std::array::from_fn(|_| std::array::from_fn(|_| Padded::default())),
        }
    }
}

#[derive(Default)]
#[repr(align(128))]
struct Padded(AtomicUsize);

/// Held by an ingest from looking up its endpoints until its event is in the store.
pub struct Pass<'a> {
    gate: &'a IngestGate,
    side: usize,
    shard: usize,
}

impl IngestGate {
    pub fn pass(&self) -> Pass<'_> {
        let side = self.epoch.load(SeqCst) & 1;
        let shard = cpu() % SHARDS;
        self.held[side][shard].0.fetch_add(1, SeqCst);
        Pass {
            gate: self,
            side,
            shard,
        }
    }

    /// Returns once every pass taken before the call has been given back. A pass taken
    /// meanwhile is not waited for: its ingest looks up its endpoints after this began (the
    /// sequentially consistent increment and check see to that), so it cannot find one
    /// removed before.
    pub async fn wait_out(&self) {
        let side = self.epoch.fetch_add(1, SeqCst) & 1;
        while self.held[side].iter().any(|c| c.0.load(SeqCst) != 0) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        // Given back on the shard it was taken on, whichever CPU the task is on now.
        self.gate.held[self.side][self.shard].0.fetch_sub(1, SeqCst);
    }
}

/// The CPU this thread runs on (a hint: the thread may move at once; any shard is correct).
fn cpu() -> usize {
    // SAFETY: no arguments; it returns -1 where it cannot tell.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_wait_outlasts_the_passes_taken_before_it_and_no_later_ones() {
        let gate = Arc::new(IngestGate::default());
        let wait = || {
            let gate = gate.clone();
            tokio::spawn(async move { gate.wait_out().await })
        };
        let early = gate.pass();
        let waiting = wait();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A pass taken after the wait began does not hold it.
        let late = gate.pass();
        assert!(!waiting.is_finished(), "the early pass is still held");
        drop(early);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the wait ends once the early pass is back")
            .unwrap();
        // The next wait waits for the late pass, taken on the side it empties.
        let again = wait();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!again.is_finished(), "the late pass is still held");
        drop(late);
        tokio::time::timeout(Duration::from_secs(5), again)
            .await
            .expect("ends")
            .unwrap();
    }
}
