//! The durable write path alone: events of 1 KiB with one delivery each, appended through
//! `Store::append` (the call an ingest makes; it returns once the event is on disk in the
//! ingest journal) by K concurrent appenders, with no HTTP in the way. Reports appends/s,
//! commits/s (and how many of them flushed the database: the others applied journaled
//! events), events per commit, and the write path's CPU (journal and writer threads) per
//! commit and per event, so that the fixed cost of a commit and the cost of one more event in
//! it can be told apart (group commit sizing).
//!
//!     cargo bench --bench store            # quick_repair on and off, K = 1 … 256
//!     cargo bench --bench store -- 64      # only K = 64
//!
//! Each case uses a fresh database in a temporary directory (`TMPDIR`). Under `cargo test`
//! (no `--bench` argument) it makes one short run as a smoke test.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// The allocator courier's binary uses.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use courier::model::{Delivery, DeliveryStatus, Event, new_id, now_ms};
use courier::store::{AppendBatch, Store};

/// CPU seconds used so far by this process's thread named `name`.
fn thread_cpu(name: &str) -> f64 {
    let mut total = 0.0;
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
        total += ticks / 100.0;
    }
    total
}

/// CPU seconds used so far by the write path: the journal thread and the writer thread.
fn write_path_cpu() -> f64 {
    thread_cpu("courier-journal") + thread_cpu("courier-writer")
}

fn batch(payload: &[u8]) -> AppendBatch {
    let now = now_ms();
    let event_id = new_id("evt");
    let delivery = Delivery {
        id: new_id("dlv"),
        event_id: event_id.clone(),
        endpoint: "bench".into(),
        event_type: "bench.event".into(),
        status: DeliveryStatus::Pending,
        attempts: 0,
        round_attempts: 0,
        next_due_ms: Some(now),
        created_ms: now,
        updated_ms: now,
        last_error: None,
    };
    AppendBatch {
        event: Event {
            id: event_id,
            event_type: "bench.event".into(),
            content_type: "application/json".into(),
            payload: payload.to_vec(),
            created_ms: now,
            delivery_ids: vec![delivery.id.clone()],
            headers: Vec::new(),
        },
        deliveries: vec![delivery],
        idempotency: None,
        reply: Vec::new(),
        id_supplied: false,
    }
}

struct Case {
    appends_per_sec: f64,
    commits_per_sec: f64,
    durable_per_sec: f64,
    per_commit: f64,
    writer_us_per_commit: f64,
    writer_us_per_event: f64,
}

async fn run_case(k: usize, quick_repair: bool, total: usize) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("courier.redb"), quick_repair).unwrap();
    let payload = Arc::new(vec![b'x'; 1024]);
    // Warm up: the first commits create the trees.
    for _ in 0..200 {
        store.append(batch(&payload)).await.unwrap();
    }
    let counters = store.commit_counters();
    let (commits, commands, durable) = (counters.commits, counters.commands, counters.durable);
    let (c0, n0, d0) = (commits.get(), commands.get(), durable.get());
    let cpu0 = write_path_cpu();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..k {
        let (store, next, payload) = (store.clone(), next.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                store.append(batch(&payload)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    // Every append is on disk; the database applies the last ones a moment later.
    store.settle().await.unwrap();
    let cpu = write_path_cpu() - cpu0;
    let (c, n) = ((commits.get() - c0) as f64, (commands.get() - n0) as f64);
    let d = (durable.get() - d0) as f64;
    assert_eq!(
        store.pending_count("bench"),
        (total + 200) as u64,
        "every acknowledged append is in the store"
    );
    let closer = store.closer();
    drop(store);
    closer.wait(Duration::from_secs(30));
    Case {
        appends_per_sec: total as f64 / took,
        commits_per_sec: c / took,
        durable_per_sec: d / took,
        per_commit: n / c,
        writer_us_per_commit: cpu / c * 1e6,
        writer_us_per_event: cpu / n * 1e6,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let only: Option<usize> = args.iter().find_map(|a| a.parse().ok());
    let ks: Vec<usize> = match only {
        Some(k) => vec![k],
        None if smoke => vec![8],
        None => vec![1, 8, 32, 64, 128, 256],
    };
    println!(
        "{:>12} {:>5} {:>12} {:>10} {:>10} {:>10} {:>16} {:>15}",
        "quick_repair",
        "K",
        "appends/s",
        "commits/s",
        "durable/s",
        "per commit",
        "write µs/commit",
        "write µs/event"
    );
    for quick_repair in [true, false] {
        for &k in &ks {
            let total = match (smoke, k) {
                (true, _) => 500,
                (false, 1) => 2_000,
                _ => 40_000,
            };
            let c = run_case(k, quick_repair, total).await;
            println!(
                "{:>12} {:>5} {:>12.0} {:>10.0} {:>10.0} {:>10.1} {:>16.0} {:>15.1}",
                quick_repair,
                k,
                c.appends_per_sec,
                c.commits_per_sec,
                c.durable_per_sec,
                c.per_commit,
                c.writer_us_per_commit,
                c.writer_us_per_event
            );
        }
    }
}
