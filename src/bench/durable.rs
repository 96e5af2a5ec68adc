//! The durable bare server: the bare 202 server, except that each request's body is on disk
//! before its 202 — what durable acknowledgement alone costs on this machine.
//!
//! Why a third baseline: the bare server answers without keeping anything, so its rate is
//! what HTTP alone costs; courier must also put every event on disk before answering. This
//! server does that and nothing else, the cheapest way courier knows: a thread of its own
//! appends every body waiting to courier's own ingest journal ([`crate::store::journal`]:
//! one `O_DIRECT | O_DSYNC` write per batch, group commit) and hands the answers back to a
//! task on the runtime, one hand-over per batch, as courier's journal thread does. No JSON,
//! no ids, no database: the distance from its rate to courier's is courier's own work, and
//! from the bare server's to its rate the price of durability on this disk.
//!
//! The journal's files live in a temporary directory of their own on the data disk (the
//! system's temporary directory, or the one given), removed when the server stops. Laps go
//! on from file to file without checkpoints: nothing here is ever read back.

use std::path::Path;

use axum::body::Bytes;
use axum::http::StatusCode;
use tokio::sync::{mpsc, oneshot};

use crate::store::journal::Journal;
// Batches as courier's journal thread makes them, so that the two compare.
use crate::store::journaler::{MAX_BATCH, MAX_BATCH_BYTES};

type Waiter = oneshot::Sender<()>;

/// The journal id its records are checksummed with (nothing else ever shares its files).
const JOURNAL_ID: u64 = 0x6265_6e63_6820_6a6c;

/// The journal's first file, in the server's directory.
const JOURNAL_FILE: &str = "bench.journal";

/// A running durable bare server's state: dropping it (with the router holding its sender)
/// ends the journal thread and removes the files.
pub(super) struct Durable {
    /// Removed when dropped.
    _dir: tempfile::TempDir,
}

/// The durable bare server's router, and what keeps its journal. Must be called inside a
/// tokio runtime (the task that answers runs on it).
pub(super) fn app(parent: Option<&Path>) -> anyhow::Result<(axum::Router, Durable)> {
    use anyhow::Context;
    let dir = match parent {
        Some(p) => tempfile::Builder::new()
            .prefix("courier-bench-")
            .tempdir_in(p),
        None => tempfile::Builder::new().prefix("courier-bench-").tempdir(),
    }
    .context("cannot create the durable bare server's directory")?;
    let (journal, _) = Journal::open(&dir.path().join(JOURNAL_FILE), JOURNAL_ID, 0)
        .context("cannot open the durable bare server's journal")?;
    let (tx, rx) = mpsc::channel::<(Bytes, Waiter)>(MAX_BATCH);
    let (answers, mut batches) = mpsc::unbounded_channel::<Vec<Waiter>>();
    tokio::spawn(async move {
        while let Some(batch) = batches.recv().await {
            for w in batch {
                let _ = w.send(());
            }
        }
    });
    std::thread::Builder::new()
        .name("bench-journal".into())
        .spawn(move || journal_thread(rx, answers, journal))
        .context("cannot start the durable bare server's journal thread")?;
    let router = axum::Router::new().fallback(move |body: Bytes| {
        let tx = tx.clone();
        async move {
            let (w, done) = oneshot::channel();
            if tx.send((body, w)).await.is_err() {
                return StatusCode::SERVICE_UNAVAILABLE;
            }
            match done.await {
                Ok(()) => StatusCode::ACCEPTED,
                Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
            }
        }
    });
    Ok((router, Durable { _dir: dir }))
}

/// Whether `dir` is in memory (`tmpfs` or `ramfs`, as `/tmp` is on many systems), where a
/// synchronous write never waits for a disk: a durable baseline measured there is not what
/// durability costs.
pub(super) fn in_memory(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `statfs` only writes the struct it is given, which outlives the call; the path
    // is a NUL-terminated string.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut fs) } != 0 {
        return false;
    }
    /// `ramfs`'s magic number (linux/magic.h; not in the libc crate).
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    fs.f_type == libc::TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC
}

/// Writes each batch of waiting bodies with one synchronous write, then hands its waiters to
/// the answering task. A failed write drops them (their producers get a 500).
fn journal_thread(
    mut rx: mpsc::Receiver<(Bytes, Waiter)>,
    answers: mpsc::UnboundedSender<Vec<Waiter>>,
    mut journal: Journal,
) {
    while let Some((body, w)) = rx.blocking_recv() {
        let mut waiters = Vec::with_capacity(64);
        journal.push_with(|buf| buf.extend_from_slice(&body));
        waiters.push(w);
        while waiters.len() < MAX_BATCH && journal.buffered() < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok((body, w)) => {
                    journal.push_with(|buf| buf.extend_from_slice(&body));
                    waiters.push(w);
                }
                Err(_) => break,
            }
        }
        if let Err(e) = journal.write() {
            tracing::error!(error = %e, "durable bare server: journal write failed");
            continue;
        }
        if journal.lap_full() {
            journal.switch();
        }
        if answers.send(waiters).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_memory_file_systems_from_others() {
        if Path::new("/dev/shm").is_dir() {
            assert!(in_memory(Path::new("/dev/shm")));
        }
        assert!(!in_memory(Path::new("/proc")));
        assert!(!in_memory(Path::new("/no/such/dir")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_body_is_in_the_journal_when_its_202_comes() {
        let parent = tempfile::tempdir().unwrap();
        let (app, keep) = app(Some(parent.path())).unwrap();
        let dir = std::fs::read_dir(parent.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/events", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::new();
        let sent: Vec<String> = (0..40).map(|i| format!("{{\"n\":{i}}}")).collect();
        let posts = sent.iter().map(|b| http.post(&url).body(b.clone()).send());
        for r in futures_util::future::join_all(posts).await {
            assert_eq!(r.unwrap().status(), 202);
        }
        // Read back as a crash would find it: every body answered 202 is there.
        let (_, records) = Journal::open(&dir.join(JOURNAL_FILE), JOURNAL_ID, 0).unwrap();
        let mut got: Vec<String> = records
            .into_iter()
            .map(|(_, p)| String::from_utf8(p).unwrap())
            .collect();
        got.sort();
        let mut want = sent.clone();
        want.sort();
        assert_eq!(got, want);
        // Stopped, it leaves nothing behind.
        server.abort();
        drop(keep);
        assert!(!dir.exists());
    }
}
