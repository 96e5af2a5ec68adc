//! `courier bench`: a load tool shipped with courier, as redis-benchmark ships with Redis.
//!
//! It starts a fast receiver in this process, registers a temporary endpoint pointing at it
//! on the courier under test (through the endpoint API), drives courier with C concurrent
//! producers over keep-alive connections, and measures what a user asks: events accepted per
//! second (durably: every 202 means committed), events delivered per second, and the
//! ingest→delivery latency, taken from the send time carried in each payload. In the same run
//! it measures baselines on this machine — a bare HTTP server that only answers 202 (in this
//! process, and in a process of its own as courier is: `courier bench-server`), the same
//! server made durable ([`durable`]: each body on disk before its 202), and a bare
//! client→receiver loop — so every courier figure also comes as a ratio to what HTTP alone,
//! and HTTP with durable acknowledgement, cost here.

mod durable;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use serde_json::{Value, json};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// courier's base URL.
    pub url: String,
    /// A token with the ingest and admin scopes.
    pub token: String,
    /// Events to send.
    pub events: usize,
    /// Concurrent producers.
    pub concurrency: usize,
    /// Payload size in bytes.
    pub size: usize,
    /// Events per second across all producers (0 = as fast as possible).
    pub rate: u64,
    /// Deliver to this receiver instead of the built-in one (no latency figures then).
    pub receiver: Option<String>,
    /// Skip the baselines.
    pub no_baselines: bool,
    /// Report this process's peak RSS (a courier on this machine).
    pub pid: Option<u32>,
    /// How long to wait for the last deliveries.
    pub drain_timeout: Duration,
    /// How long one request to courier may take (a timed-out request is an error).
    pub request_timeout: Duration,
    /// Only fill the queue: do not wait for deliveries.
    pub no_wait: bool,
    /// Backlog mode: the bench endpoint is paused while the events go in (a receiver that is
    /// down), then resumed; reports the drain rate.
    pub backlog: bool,
    /// A courier binary to run the bare 202 server in a process of its own (`courier
    /// bench-server`), as courier runs apart from the producers; `None` measures only the
    /// in-process one.
    pub bare_server_exe: Option<std::path::PathBuf>,
    /// Where the durable bare server keeps its journal (a temporary directory is made under
    /// it): on the disk courier's data dir is on, for a fair comparison. `None`: the
    /// system's temporary directory.
    pub durable_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// Backlog mode (deliveries held back while the events went in).
    pub backlog: bool,
    pub events: usize,
    pub concurrency: usize,
    pub size_bytes: usize,
    pub target_rate: Option<u64>,
    pub accepted: usize,
    pub errors: usize,
    /// The errors by HTTP status (`"403"`, `"503"`…) or, for a request that got no answer,
    /// by what went wrong (`"timeout"`, `"connect"`, `"transport"`).
    pub errors_by_status: BTreeMap<String, usize>,
    /// The first error: its status and the start of its body, or the transport error.
    pub first_error: Option<String>,
    pub accepted_per_sec: f64,
    /// Accepted events that reached the built-in receiver, each counted once (`None` when
    /// the deliveries were not awaited: `--no-wait` or `--receiver`).
    pub delivered: Option<usize>,
    /// The bench endpoint's dead deliveries, as courier's stats give them (`None`: not
    /// awaited, or the stats could not be read).
    pub dead: Option<usize>,
    /// Accepted events neither delivered nor dead when the wait ended.
    pub missing: Option<usize>,
    /// Deliveries still queued for the bench endpoint when it was deleted at the end of the
    /// run, dropped with it (the built-in receiver ends with the run: with `--no-wait`, what
    /// was not delivered while the tool ran). `None`: the endpoint was kept (`--receiver`),
    /// or courier's answer did not say.
    pub dropped_at_exit: Option<u64>,
    /// Deliveries of an event that had already arrived (redeliveries): not counted in
    /// `delivered`.
    pub duplicates: Option<usize>,
    /// Events delivered whose ingest request failed here (an error or a timeout after
    /// courier had taken them in): not counted in `delivered`.
    pub delivered_not_accepted: Option<usize>,
    pub delivered_per_sec: Option<f64>,
    pub latency: Option<Latency>,
    /// The process given with `--pid`, whose memory and CPU time are reported.
    pub pid: Option<u32>,
    /// The peak RSS of the process given with `--pid` (`None` without it).
    pub peak_rss_kib: Option<u64>,
    /// A bare HTTP server answering 202: requests/s with the same producers (the mean of a
    /// run before and a run after courier's).
    pub baseline_202_per_sec: Option<f64>,
    /// The two runs of that baseline, before and after courier's.
    pub baseline_202_runs: Option<[f64; 2]>,
    /// The same bare server in a process of its own, like courier (the in-process one shares
    /// the producers' threads, which no server process can): mean of a run before and after.
    pub baseline_202_process_per_sec: Option<f64>,
    /// The two runs of that baseline.
    pub baseline_202_process_runs: Option<[f64; 2]>,
    /// A bare client→receiver loop: requests/s with `baseline_send_concurrency` senders.
    pub baseline_send_per_sec: Option<f64>,
    /// The senders of that loop: as many as the producers, but at most
    /// [`BENCH_MAX_IN_FLIGHT`], the most deliveries courier has in flight to the bench
    /// endpoint.
    pub baseline_send_concurrency: Option<usize>,
    pub accepted_vs_baseline: Option<f64>,
    /// Accepted events/s against the bare server in a process of its own.
    pub accepted_vs_process_baseline: Option<f64>,
    pub delivered_vs_baseline: Option<f64>,
    /// Backlog mode: peak RSS once the backlog is in, and the drain rate after resuming.
    pub backlog_rss_kib: Option<u64>,
    pub drain_per_sec: Option<f64>,
    /// The courier process's CPU time (user and system, all threads) per accepted event, over
    /// its part of the run: in backlog mode, the ingest until the database holds every event;
    /// otherwise until the last delivery arrived (with `--no-wait` or an outside receiver,
    /// until the last 202). Needs `--pid`; /proc's clock-tick resolution (10 ms).
    pub courier_cpu_us_per_event: Option<f64>,
    /// That CPU time by thread name (`tokio-rt-worker` are the HTTP workers and the delivery
    /// tasks, `courier-writer` applies changes to the database, `courier-journal` makes new
    /// events durable), over the threads alive at the end.
    pub courier_cpu_by_thread_us_per_event: Option<BTreeMap<String, f64>>,
    /// Backlog mode: the courier process's CPU time per event drained, from the resume to the
    /// last delivery.
    pub drain_cpu_us_per_event: Option<f64>,
    /// This tool's own CPU time per accepted event while it drove courier (its producers, and
    /// unless in backlog mode its receiver): what the load generator took from the machine.
    pub tool_cpu_us_per_event: Option<f64>,
    /// The bare server in a process of its own: its CPU time per request answered, what HTTP
    /// alone costs a server process here (compare `courier_cpu_us_per_event` in backlog mode).
    pub baseline_202_process_cpu_us_per_request: Option<f64>,
    /// The durable bare server, in a process of its own: like the bare server, but each
    /// request's body is on disk (courier's ingest journal, one synchronous write per batch)
    /// before its 202 — what durable acknowledgement alone costs on this machine's disk.
    /// Mean of a run before and a run after courier's.
    pub baseline_durable_202_per_sec: Option<f64>,
    /// The two runs of that baseline.
    pub baseline_durable_202_runs: Option<[f64; 2]>,
    /// Accepted events/s against the durable bare server: how close courier comes to the
    /// cheapest durable server on the same disk.
    pub accepted_vs_durable_baseline: Option<f64>,
    /// The durable bare server process's CPU time per request answered.
    pub baseline_durable_202_cpu_us_per_request: Option<f64>,
    /// Whether the durable bare server's directory was in memory (`tmpfs`): then its rate is
    /// not what durability costs on a disk (see `--durable-dir`).
    pub baseline_durable_202_in_memory: Option<bool>,
    /// Why the run failed (empty when it did not): events not accepted, accepted events not
    /// delivered. The command exits 1 when there is any.
    pub problems: Vec<String>,
}

impl Report {
    fn set_courier_cpu(&mut self, (total, by_thread): CourierCpu) {
        self.courier_cpu_us_per_event = total;
        self.courier_cpu_by_thread_us_per_event = by_thread;
    }
}

/// A set of sequence numbers `0..len`, shared between threads without a lock.
struct Seqs {
    words: Vec<AtomicU64>,
    len: usize,
}

impl Seqs {
    fn new(len: usize) -> Seqs {
        Seqs {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Adds `i`: whether it was new (`None` out of range).
    fn insert(&self, i: usize) -> Option<bool> {
        if i >= self.len {
            return None;
        }
        let bit = 1u64 << (i % 64);
        Some(self.words[i / 64].fetch_or(bit, Ordering::Relaxed) & bit == 0)
    }

    /// How many are in both sets.
    fn common(&self, other: &Seqs) -> usize {
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| {
                (a.load(Ordering::Relaxed) & b.load(Ordering::Relaxed)).count_ones() as usize
            })
            .sum()
    }
}

/// The receiver: counts requests and, recording, the distinct events among them (by the
/// sequence number each payload carries) and each event's latency from its send time, taken
/// at its first receipt.
struct Received {
    requests: AtomicUsize,
    /// The events received (recording only).
    seen: Seqs,
    distinct: AtomicUsize,
    /// Requests carrying an event already received.
    duplicates: AtomicUsize,
    latencies_us: Mutex<Vec<u64>>,
    /// The last first receipt.
    last_us: AtomicU64,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// How many of the bench endpoint's deliveries are dead; `None` when courier does not say
/// within `within`.
async fn dead_count(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    name: &str,
    within: Duration,
) -> Option<usize> {
    let ask = async {
        let r = http
            .get(format!("{base}/v1/endpoints/{name}/stats"))
            .bearer_auth(token)
            .timeout(within)
            .send()
            .await
            .ok()?;
        let bytes = r.bytes().await.ok()?;
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()?
            .get("counts")?
            .get("dead")?
            .as_u64()
    };
    tokio::time::timeout(within, ask)
        .await
        .ok()
        .flatten()
        .map(|d| d as usize)
}

/// Starts the built-in receiver; returns its address. With `events`, it records which of
/// the events `0..events` arrive, and their latencies.
pub async fn start_receiver(
    events: Option<usize>,
) -> anyhow::Result<(SocketAddr, Arc<ReceiverHandle>)> {
    let state = Arc::new(ReceiverHandle {
        got: Received {
            requests: AtomicUsize::new(0),
            seen: Seqs::new(events.unwrap_or(0)),
            distinct: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            latencies_us: Mutex::new(Vec::with_capacity(events.unwrap_or(0))),
            last_us: AtomicU64::new(0),
        },
        record: events.is_some(),
    });
    let st = state.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let st = st.clone();
        async move {
            let now = now_us();
            st.got.requests.fetch_add(1, Ordering::Relaxed);
            if st.record {
                // The payload starts with {"sent_at_us":N,"seq":S, …}: read them without
                // parsing all.
                let seq = number_after(&body, "\"seq\":").and_then(|s| usize::try_from(s).ok());
                match seq.and_then(|s| st.got.seen.insert(s)) {
                    Some(true) => {
                        if let Some(sent) = number_after(&body, "\"sent_at_us\":") {
                            st.got
                                .latencies_us
                                .lock()
                                .expect("latencies")
                                .push(now.saturating_sub(sent));
                        }
                        st.got.last_us.fetch_max(now, Ordering::Relaxed);
                        st.got.distinct.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(false) => {
                        st.got.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                    // Not one of the bench's events.
                    None => {}
                }
            }
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, state))
}

pub struct ReceiverHandle {
    got: Received,
    record: bool,
}

impl ReceiverHandle {
    /// Requests received.
    pub fn count(&self) -> usize {
        self.got.requests.load(Ordering::Relaxed)
    }

    /// Distinct events received (recording).
    pub fn distinct(&self) -> usize {
        self.got.distinct.load(Ordering::Relaxed)
    }
}

/// The number after `key` in the head of a payload.
fn number_after(body: &[u8], key: &str) -> Option<u64> {
    let s = std::str::from_utf8(body.get(..HEAD_MAX.min(body.len()))?).ok()?;
    let rest = s.split(key).nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The payload's fields before its padding take at most this many bytes.
const HEAD_MAX: usize = 96;

/// The smallest payload size (`-s`) for a run of `events` events: the payload's own fields
/// (send time, sequence number, empty padding) with the largest sequence number. Every
/// payload of a run is exactly its size from there on.
pub fn min_size(events: usize) -> usize {
    payload(0, events.saturating_sub(1)).len()
}

/// A payload of about `size` bytes carrying its send time.
fn payload(size: usize, seq: usize) -> String {
    let mut s = String::with_capacity(size.max(64));
    push_payload(&mut s, size, seq);
    s
}

/// Appends [`payload`] to `out`. The padding is copied in runs, not character by character:
/// the tool shares the cores with what it measures, so its own work per request is kept
/// small.
fn push_payload(out: &mut String, size: usize, seq: usize) {
    use std::fmt::Write;
    const XS: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    let start = out.len();
    let _ = write!(
        out,
        "{{\"sent_at_us\":{},\"seq\":{seq},\"pad\":\"",
        now_us()
    );
    let mut pad = size.saturating_sub(out.len() - start + 2);
    while pad > 0 {
        let n = pad.min(XS.len());
        out.push_str(&XS[..n]);
        pad -= n;
    }
    out.push_str("\"}");
}

/// What a run of requests came to: successes (and which, if asked), errors by cause and the
/// first one's text.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    errors: AtomicUsize,
    /// Errors by HTTP status or transport error kind, and the first error's text.
    failures: Mutex<(BTreeMap<String, usize>, Option<String>)>,
    /// Which requests succeeded (when tracked).
    accepted: Option<Seqs>,
}

impl Tally {
    /// A tally that also keeps which of requests `0..n` succeeded.
    fn tracking(n: usize) -> Tally {
        Tally {
            accepted: Some(Seqs::new(n)),
            ..Tally::default()
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    fn succeeded(&self, i: usize) {
        if let Some(a) = &self.accepted {
            a.insert(i);
        }
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    fn failed(&self, cause: String, text: impl FnOnce() -> String) {
        let mut f = self.failures.lock().expect("failures");
        *f.0.entry(cause).or_default() += 1;
        if f.1.is_none() {
            f.1 = Some(text());
        }
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn failures(&self) -> (BTreeMap<String, usize>, Option<String>) {
        self.failures.lock().expect("failures").clone()
    }
}

/// What went wrong with a request that got no answer.
fn transport_cause(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    }
}

/// An error's text with its causes, on one line.
fn transport_text(e: reqwest::Error) -> String {
    let cause = transport_cause(&e);
    let text = format!("{:#}", anyhow::Error::new(e));
    if cause == "timeout" && !text.contains("timed out") {
        format!("{text} (timed out)")
    } else {
        text
    }
}

/// The start of an error answer's body, on one line.
fn snippet(body: &str) -> String {
    const MAX: usize = 300;
    let one_line = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &one_line[..at]),
        None => one_line,
    }
}

/// Sends `n` requests with `c` producers (optionally at `rate`/s overall), counting them in
/// `tally`; returns the elapsed time. The producers stop if this future is dropped.
async fn drive(
    n: usize,
    c: usize,
    rate: u64,
    make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync>,
    ok_status: u16,
    tally: &Arc<Tally>,
) -> Duration {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c.max(1) {
        let (next, tally, make) = (next.clone(), tally.clone(), make.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                if rate > 0 {
                    let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                match make(i).send().await {
                    Ok(r) if r.status().as_u16() == ok_status => {
                        let _ = r.bytes().await;
                        tally.succeeded(i);
                    }
                    Ok(r) => {
                        let status = r.status();
                        let body = r.text().await.unwrap_or_default();
                        tally.failed(status.as_u16().to_string(), || {
                            format!("{status}: {}", snippet(&body))
                        });
                    }
                    Err(e) => tally.failed(transport_cause(&e).to_string(), || transport_text(e)),
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    started.elapsed()
}

/// An HTTP client for `c` producers whose every request gives up after `timeout`.
fn client(c: usize, timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(c.max(1))
        .tcp_nodelay(true)
        .no_proxy()
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .timeout(timeout)
        .build()
        .expect("client")
}

/// The mean of a baseline's run before and run after courier's.
fn mean([before, after]: [f64; 2]) -> f64 {
    (before + after) / 2.0
}

fn pct(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0
}

/// A file of a process's `/proc` directory (this process's without a pid).
fn proc_file(pid: Option<u32>, file: &str) -> Option<String> {
    let dir = pid.map_or_else(|| "self".to_string(), |p| p.to_string());
    std::fs::read_to_string(format!("/proc/{dir}/{file}")).ok()
}

/// A memory figure (`VmRSS`, `VmHWM`, …) of a process's `/proc/<pid>/status`, in KiB.
fn proc_status_kib(pid: Option<u32>, field: &str) -> Option<u64> {
    status_field_kib(&proc_file(pid, "status")?, field)
}

/// One `Field:   123 kB` figure out of a `/proc/…/status` text.
fn status_field_kib(text: &str, field: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_start_matches(':')
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()
}

/// The CPU time (user and system, every thread, living or exited) a process has used, from
/// `/proc/<pid>/stat` (this process's without a pid); `None` where there is no /proc.
pub fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    parse_stat(&proc_file(pid, "stat")?).map(|(_, cpu)| cpu)
}

/// The name and CPU time (user and system) in a `/proc/…/stat` line.
fn parse_stat(text: &str) -> Option<(String, Duration)> {
    // The name (the second field) is in parentheses and may hold spaces and parentheses
    // itself: the fields go on after the last closing one, the state (field 3) first; utime
    // and stime are fields 14 and 15.
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let name = text.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (name, Duration::from_secs_f64(ticks as f64 / hz as f64)))
}

/// A process's CPU time, in all and per thread name (summed over the threads alive at the
/// reading that bear it), so that a run can say which of courier's threads took the CPU.
#[derive(Debug, Clone)]
struct CpuReading {
    total: Duration,
    by_thread: BTreeMap<String, Duration>,
}

fn read_cpu(pid: u32) -> Option<CpuReading> {
    let total = cpu_time(Some(pid))?;
    let mut by_thread: BTreeMap<String, Duration> = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        // A thread may end between the listing and the read.
        if let Some((name, cpu)) = std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|t| parse_stat(&t))
        {
            *by_thread.entry(name).or_default() += cpu;
        }
    }
    Some(CpuReading { total, by_thread })
}

/// Microseconds of CPU per unit of work between two readings of [`cpu_time`].
fn cpu_us_per(before: Option<Duration>, after: Option<Duration>, units: usize) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if units > 0 => {
            Some(a.saturating_sub(b).as_secs_f64() * 1e6 / units as f64)
        }
        _ => None,
    }
}

/// Courier's CPU per event: in all, and per thread name.
type CourierCpu = (Option<f64>, Option<BTreeMap<String, f64>>);

/// Courier's CPU per event between two readings (thread names that took less than 0.05 µs
/// per event are left out).
fn courier_cpu_per(
    before: &Option<CpuReading>,
    after: &Option<CpuReading>,
    units: usize,
) -> CourierCpu {
    let (Some(b), Some(a)) = (before, after) else {
        return (None, None);
    };
    let total = cpu_us_per(Some(b.total), Some(a.total), units);
    let by_thread = a
        .by_thread
        .iter()
        .filter_map(|(name, cpu)| {
            let was = b.by_thread.get(name).copied().unwrap_or_default();
            let us = cpu_us_per(Some(was), Some(*cpu), units)?;
            (us >= 0.05).then(|| (name.clone(), us))
        })
        .collect();
    (total, total.map(|_| by_thread))
}

/// Current RSS of a process, in KiB.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// Peak RSS of a process, in KiB.
pub fn peak_rss_kib(pid: Option<u32>) -> Option<u64> {
    proc_status_kib(pid, "VmHWM")
}

/// The most deliveries courier has in flight to the bench endpoint (its `max_in_flight`).
pub const BENCH_MAX_IN_FLIGHT: usize = 256;

/// A run stopped by SIGINT or SIGTERM (after removing the bench endpoint).
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {}", signal_name(*.signal))]
pub struct Interrupted {
    /// The signal's number.
    pub signal: i32,
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// SIGINT and SIGTERM, taken from their installation on (for the rest of the process).
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// The next one's number.
    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
        }
    }
}

/// What the options ask for that cannot be run (the command line refuses it first, with its
/// usage).
fn check_options(opts: &Options) -> anyhow::Result<()> {
    if opts.events == 0 {
        bail!("-n/--events must be at least 1");
    }
    if opts.concurrency == 0 {
        bail!("-c/--concurrency must be at least 1");
    }
    let min = min_size(opts.events);
    if opts.size < min {
        bail!(
            "-s/--size {}: the payload's own fields (send time, sequence number) take {min} bytes with -n {}; give -s {min} or more",
            opts.size,
            opts.events
        );
    }
    if let Some(dir) = &opts.durable_dir {
        check_durable_dir(dir)?;
    }
    Ok(())
}

/// `--durable-dir` must be a directory the durable bare server can make its own in.
fn check_durable_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!("--durable-dir {}: not a directory", dir.display());
    }
    tempfile::Builder::new()
        .prefix(".courier-bench-check-")
        .tempdir_in(dir)
        .and_then(|d| d.close())
        .with_context(|| {
            format!(
                "--durable-dir {}: not writable (cannot make a directory in it)",
                dir.display()
            )
        })
}

/// The bench endpoint's life on courier.
const NOT_ASKED: u8 = 0;
/// Asked for: perhaps made (no answer yet).
const ASKED: u8 = 1;
const MADE: u8 = 2;

/// The temporary endpoint on courier: removed on every way out of a run once it was asked
/// for ([`BenchEndpoint::finish`]), unless it keeps queued deliveries for an outside receiver
/// (`--receiver`). The built-in receiver ends with the run, so deliveries still queued for it
/// then (`--no-wait`, a drain timeout) could only fail: they are dropped with the endpoint.
struct BenchEndpoint {
    http: reqwest::Client,
    base: String,
    token: String,
    name: String,
    /// With `--receiver`: kept once an event for it was accepted.
    keep_with_events: bool,
    state: std::sync::atomic::AtomicU8,
    /// The deliveries still queued for it when it was deleted, dropped with it (courier's
    /// `pending_dropped`; `u64::MAX`: not deleted, or not said).
    dropped: AtomicU64,
    finished: std::sync::atomic::AtomicBool,
    /// Courier's run (its accepted events).
    tally: Arc<Tally>,
}

impl BenchEndpoint {
    /// How many deliveries were still queued when it was deleted (and dropped with it).
    fn dropped(&self) -> Option<u64> {
        Some(self.dropped.load(Ordering::SeqCst)).filter(|&n| n != u64::MAX)
    }

    /// Removes it (or says that it stays), once.
    async fn finish(&self) {
        let state = self.state.load(Ordering::SeqCst);
        if state == NOT_ASKED || self.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        let name = &self.name;
        if self.keep_with_events && self.tally.ok() > 0 {
            eprintln!(
                "the bench endpoint `{name}` stays; delete it with DELETE /v1/endpoints/{name} once its deliveries are done"
            );
            return;
        }
        // Twice if need be: a run whose requests courier refused (a 413 closes the
        // connection after its answer) can leave a pooled connection that is closing as the
        // delete goes out on it. A delete is safe to repeat; a 404 to the repeat means the
        // first one did its work.
        let mut failure = String::new();
        for retry in [false, true] {
            let deleted = self
                .http
                .delete(format!("{}/v1/endpoints/{name}", self.base))
                .bearer_auth(&self.token)
                .send()
                .await;
            failure = match deleted {
                Ok(r) if r.status().is_success() => {
                    // `{"deleted": name, "pending_dropped": N}`
                    let answer: Value = match r.bytes().await {
                        Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
                        Err(_) => Value::Null,
                    };
                    if let Some(n) = answer["pending_dropped"].as_u64() {
                        self.dropped.store(n, Ordering::SeqCst);
                    }
                    return;
                }
                // Never made, or deleted by the first try.
                Ok(r) if r.status() == 404 && (state == ASKED || retry) => return,
                Ok(r) => {
                    failure = r.status().to_string();
                    break;
                }
                Err(e) => transport_text(e),
            };
        }
        eprintln!(
            "courier bench: cannot delete the bench endpoint `{name}` ({failure}); delete it with DELETE /v1/endpoints/{name}"
        );
    }
}

/// Runs the benchmark against a running courier. Once the bench endpoint is asked for, it is
/// removed on every way out: the end of the run, an error, SIGINT or SIGTERM (then the run
/// ends with [`Interrupted`]).
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    // Checked before anything is made on courier.
    check_options(opts)?;
    let http = client(opts.concurrency, opts.request_timeout);
    let ep = BenchEndpoint {
        http,
        base: opts.url.trim_end_matches('/').to_string(),
        token: opts.token.clone(),
        name: format!("bench-{}", &crate::model::new_id("b")[2..]).to_ascii_lowercase(),
        keep_with_events: opts.receiver.is_some(),
        state: NOT_ASKED.into(),
        dropped: u64::MAX.into(),
        finished: false.into(),
        tally: Arc::new(Tally::tracking(opts.events)),
    };
    let mut signals = StopSignals::install()?;
    let outcome = tokio::select! {
        r = session(opts, &ep) => r,
        signal = signals.next() => Err(Interrupted { signal }.into()),
    };
    // The run's tasks are gone with it (producers, bare server processes); the endpoint is
    // left to remove. A second signal does not wait for that.
    tokio::select! {
        _ = ep.finish() => {}
        signal = signals.next() => {
            eprintln!("courier: {}: exiting at once", Interrupted { signal });
            std::process::exit(128 + signal);
        }
    }
    if outcome.is_err()
        && let Some(n) = ep.dropped().filter(|&n| n > 0)
    {
        // No report to say it in.
        eprintln!(
            "courier bench: deleted the bench endpoint `{}` with {n} deliveries still queued for it (dropped)",
            ep.name
        );
    }
    let mut report = outcome?;
    report.problems = problems(&report, opts);
    Ok(report)
}

/// Why a finished run failed: events not accepted, accepted events not delivered.
fn problems(r: &Report, opts: &Options) -> Vec<String> {
    let mut out = Vec::new();
    if r.accepted < r.events {
        let causes: Vec<String> = r
            .errors_by_status
            .iter()
            .map(|(cause, n)| format!("{n} × {cause}"))
            .collect();
        out.push(format!(
            "{} of {} events were not accepted ({}){}",
            r.events - r.accepted,
            r.events,
            causes.join(", "),
            r.first_error
                .as_ref()
                .map(|e| format!("; first error: {e}"))
                .unwrap_or_default()
        ));
    }
    if let Some(delivered) = r.delivered
        && delivered < r.accepted
    {
        let missing = r.missing.unwrap_or(0);
        out.push(format!(
            "{} of {} accepted events were not delivered: {} dead, {missing} missing{}",
            r.accepted - delivered,
            r.accepted,
            r.dead.map_or_else(
                || "? (courier's stats unread)".to_string(),
                |d| d.to_string()
            ),
            if missing > 0 {
                format!(
                    " when the wait for deliveries ended (--drain-timeout {} s)",
                    opts.drain_timeout.as_secs()
                )
            } else {
                String::new()
            }
        ));
    }
    out
}

/// The run itself, from the bench endpoint's creation; removes it (or says that it stays) on
/// its way, before the baselines' second runs.
async fn session(opts: &Options, ep: &BenchEndpoint) -> anyhow::Result<Report> {
    let (http, base, name) = (&ep.http, ep.base.as_str(), ep.name.as_str());
    let mut report = Report {
        backlog: opts.backlog,
        events: opts.events,
        concurrency: opts.concurrency,
        size_bytes: opts.size,
        target_rate: (opts.rate > 0).then_some(opts.rate),
        pid: opts.pid,
        ..Report::default()
    };

    // The receiver, and a temporary endpoint on courier pointing at it.
    let (receiver_url, handle) = match &opts.receiver {
        Some(u) => (u.clone(), None),
        None => {
            let (addr, h) = start_receiver(Some(opts.events)).await?;
            (format!("http://{addr}/bench"), Some(h))
        }
    };
    ep.state.store(ASKED, Ordering::SeqCst);
    let created = http
        .post(format!("{base}/v1/endpoints"))
        .bearer_auth(&opts.token)
        .body(
            json!({
                "name": name,
                "url": receiver_url,
                "max_in_flight": BENCH_MAX_IN_FLIGHT,
                "schedule": ["0s", "1s", "5s", "30s", "2m", "10m", "30m", "1h"],
                "description": "temporary endpoint of courier bench",
            })
            .to_string(),
        )
        .send()
        .await
        .with_context(|| format!("cannot reach courier at {base}"))?;
    if created.status() != 201 {
        ep.state.store(NOT_ASKED, Ordering::SeqCst);
        let status = created.status();
        let body = created.text().await.unwrap_or_default();
        bail!(
            "cannot create the bench endpoint ({status}): {} (the token needs the admin and ingest scopes; private networks must be allowed for the built-in receiver)",
            snippet(&body)
        );
    }
    ep.state.store(MADE, Ordering::SeqCst);

    if opts.backlog {
        let r = http
            .post(format!("{base}/v1/endpoints/{name}/pause"))
            .bearer_auth(&opts.token)
            .send()
            .await
            .context("cannot pause the bench endpoint")?;
        if !r.status().is_success() {
            bail!("cannot pause the bench endpoint: {}", r.status());
        }
    }

    let before_202 = if opts.no_baselines {
        None
    } else {
        Some(bare_202_rate(opts.events, opts.concurrency, opts.size).await?)
    };
    // The bare server processes, plain and durable, measured before courier's run.
    let mut processes = Vec::new();
    if let (Some(exe), false) = (&opts.bare_server_exe, opts.no_baselines) {
        for durable in [None, Some(opts.durable_dir.as_deref())] {
            let p = BareProcess::start(exe, durable).await?;
            processes.push(Measured::before(p, opts.events, opts.concurrency, opts.size).await);
        }
    }

    // Drive courier.
    let size = opts.size;
    // Everything a request shares with the others is made once: the URL parsed, the
    // authorization header, the body's head.
    let url: reqwest::Url = format!("{base}/v1/events")
        .parse()
        .with_context(|| format!("not a URL: {base}"))?;
    let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", opts.token))
        .context("the token cannot be sent in a header")?;
    auth.set_sensitive(true);
    let head = format!("{{\"event_type\":\"bench.event\",\"endpoint\":\"{name}\",\"payload\":");
    let http2 = http.clone();
    let make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync> = Arc::new(move |i| {
        let mut body = String::with_capacity(head.len() + size + 64);
        body.push_str(&head);
        push_payload(&mut body, size, i);
        body.push('}');
        http2
            .post(url.clone())
            .header(reqwest::header::AUTHORIZATION, auth.clone())
            .body(body)
    });
    // Courier's CPU and memory are read only with a pid (never this process's by mistake).
    let courier_cpu = || opts.pid.and_then(read_cpu);
    let courier_cpu_before = courier_cpu();
    let tool_cpu_before = cpu_time(None);
    let first_send = now_us();
    let took = drive(
        opts.events,
        opts.concurrency,
        opts.rate,
        make,
        202,
        &ep.tally,
    )
    .await;
    let ok = ep.tally.ok();
    report.accepted = ok;
    report.errors = ep.tally.errors.load(Ordering::Relaxed);
    (report.errors_by_status, report.first_error) = ep.tally.failures();
    report.accepted_per_sec = ok as f64 / took.as_secs_f64();
    if opts.backlog || opts.no_wait || handle.is_none() {
        report.tool_cpu_us_per_event = cpu_us_per(tool_cpu_before, cpu_time(None), ok);
    }

    let mut drain_start = None;
    let mut drain_cpu_before = None;
    if opts.backlog {
        // Any request the API answers only once the database holds every acknowledged event
        // (see `Store::settle`): the writer's share of the ingest is then counted in full.
        if opts.pid.is_some() {
            let _ = http
                .get(format!("{base}/v1/endpoints/{name}"))
                .bearer_auth(&opts.token)
                .send()
                .await;
            report.set_courier_cpu(courier_cpu_per(&courier_cpu_before, &courier_cpu(), ok));
        }
        report.backlog_rss_kib = opts.pid.and_then(|p| rss_kib(Some(p)));
        drain_start = Some((now_us(), handle.as_ref().map_or(0, |h| h.distinct())));
        let r = http
            .post(format!("{base}/v1/endpoints/{name}/resume"))
            .bearer_auth(&opts.token)
            .send()
            .await
            .context("cannot resume the bench endpoint")?;
        if !r.status().is_success() {
            bail!("cannot resume the bench endpoint: {}", r.status());
        }
        drain_cpu_before = courier_cpu();
    }

    // Wait for the deliveries: every accepted event delivered or dead, or the drain
    // timeout.
    if let Some(h) = &handle
        && !opts.no_wait
    {
        let accepted = ep
            .tally
            .accepted
            .as_ref()
            .expect("courier's run is tracked");
        let delivered = || h.got.seen.common(accepted);
        let started = Instant::now();
        let deadline = started
            .checked_add(opts.drain_timeout)
            .unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 24 * 3600));
        // Asking courier, never past the deadline (its stats may be slow to answer, or
        // never).
        let stats_within = |deadline: Instant| {
            opts.request_timeout
                .min(deadline.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(100))
        };
        let mut dead = None;
        let mut next_poll = started + Duration::from_millis(500);
        while delivered() < ok && Instant::now() < deadline {
            tokio::time::sleep_until(
                deadline
                    .min(Instant::now() + Duration::from_millis(20))
                    .into(),
            )
            .await;
            // Now and then, ask courier how many went dead: those will never arrive, and
            // if all of them do, the receiver is unreachable from courier.
            if Instant::now() >= next_poll && Instant::now() < deadline {
                if let Some(d) =
                    dead_count(http, base, &opts.token, name, stats_within(deadline)).await
                {
                    dead = Some(d);
                    if d > 0 && h.count() == 0 && d >= ok {
                        bail!(
                            "every delivery to the bench receiver went dead: courier refuses loopback destinations unless [delivery] allow_private_networks = true (see GET {base}/v1/endpoints/{name}/stats)"
                        );
                    }
                    if delivered() + d >= ok {
                        break;
                    }
                }
                next_poll = Instant::now() + Duration::from_millis(500);
            }
        }
        let got = delivered();
        if got < ok {
            // The last word on the ones that did not come (a second past the deadline at
            // most).
            let last = Instant::now().max(deadline) + Duration::from_secs(1);
            dead = dead_count(http, base, &opts.token, name, stats_within(last))
                .await
                .or(dead);
        } else {
            dead = Some(dead.unwrap_or(0));
        }
        report.delivered = Some(got);
        report.dead = dead;
        report.missing = Some(ok.saturating_sub(got + dead.unwrap_or(0)));
        report.duplicates = Some(h.got.duplicates.load(Ordering::Relaxed));
        report.delivered_not_accepted = Some(h.distinct().saturating_sub(got));
        let distinct = h.distinct();
        if opts.backlog {
            let drained = drain_start.map_or(0, |(_, before)| distinct.saturating_sub(before));
            report.drain_cpu_us_per_event =
                courier_cpu_per(&drain_cpu_before, &courier_cpu(), drained).0;
        } else {
            report.set_courier_cpu(courier_cpu_per(&courier_cpu_before, &courier_cpu(), ok));
            report.tool_cpu_us_per_event = cpu_us_per(tool_cpu_before, cpu_time(None), ok);
        }
        let last = h.got.last_us.load(Ordering::Relaxed);
        if let Some((start, before)) = drain_start
            && last > start
        {
            report.drain_per_sec =
                Some(distinct.saturating_sub(before) as f64 / ((last - start) as f64 / 1e6));
        }
        if distinct > 0 && last > first_send {
            report.delivered_per_sec = Some(distinct as f64 / ((last - first_send) as f64 / 1e6));
        }
        let mut lat = h.got.latencies_us.lock().expect("latencies").clone();
        lat.sort_unstable();
        if !lat.is_empty() {
            report.latency = Some(Latency {
                p50_ms: pct(&lat, 0.50),
                p90_ms: pct(&lat, 0.90),
                p99_ms: pct(&lat, 0.99),
                max_ms: *lat.last().expect("non-empty") as f64 / 1000.0,
            });
        }
    }
    if !opts.backlog && (opts.no_wait || handle.is_none()) {
        report.set_courier_cpu(courier_cpu_per(&courier_cpu_before, &courier_cpu(), ok));
    }
    report.peak_rss_kib = opts.pid.and_then(|p| peak_rss_kib(Some(p)));
    // Deleted now, whatever is still queued for it: with the built-in receiver, which ends
    // with this run, nothing still queued for it could be delivered later.
    // With an outside receiver it stays, so that queued deliveries are not stranded.
    ep.finish().await;
    report.dropped_at_exit = ep.dropped();

    if let Some(before) = before_202 {
        // Baseline 1: a bare server that answers 202, same producers, same bodies; measured
        // before and after courier's run, so that drift in the machine's speed (large on a
        // shared machine) shows up instead of skewing the ratio.
        let after = bare_202_rate(opts.events, opts.concurrency, size).await?;
        let runs = [before, after];
        report.baseline_202_runs = Some(runs);
        report.baseline_202_per_sec = Some(mean(runs));
        let mut processes = processes.into_iter();
        if let Some(plain) = processes.next() {
            let (runs, cpu) = plain.after(opts.events, opts.concurrency, size).await;
            report.baseline_202_process_runs = Some(runs);
            report.baseline_202_process_per_sec = Some(mean(runs));
            report.baseline_202_process_cpu_us_per_request = cpu;
        }
        if let Some(durable) = processes.next() {
            let (runs, cpu) = durable.after(opts.events, opts.concurrency, size).await;
            report.baseline_durable_202_runs = Some(runs);
            report.baseline_durable_202_per_sec = Some(mean(runs));
            report.baseline_durable_202_cpu_us_per_request = cpu;
            let dir = opts.durable_dir.clone().unwrap_or_else(std::env::temp_dir);
            report.baseline_durable_202_in_memory = Some(durable::in_memory(&dir));
        }

        // Baseline 2: what sending alone costs: a client loop straight to a receiver, with
        // as many senders as courier may have deliveries in flight to the bench endpoint
        // (the producers, up to its max_in_flight).
        let (raddr, _h) = start_receiver(None).await?;
        let senders = opts.concurrency.min(BENCH_MAX_IN_FLIGHT);
        let send = client(senders, opts.request_timeout);
        let url = local_url(raddr, "/bench");
        let make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync> =
            Arc::new(move |i| send.post(url.clone()).body(payload(size, i)));
        let tally = Arc::new(Tally::default());
        let took = drive(opts.events, senders, 0, make, 204, &tally).await;
        report.baseline_send_per_sec = Some(tally.ok() as f64 / took.as_secs_f64());
        report.baseline_send_concurrency = Some(senders);
        report.accepted_vs_baseline = report
            .baseline_202_per_sec
            .map(|b| report.accepted_per_sec / b);
        report.accepted_vs_process_baseline = report
            .baseline_202_process_per_sec
            .map(|b| report.accepted_per_sec / b);
        report.accepted_vs_durable_baseline = report
            .baseline_durable_202_per_sec
            .map(|b| report.accepted_per_sec / b);
        // In backlog mode the delivery rate that matters is the drain after resuming.
        let delivered = if opts.backlog {
            report.drain_per_sec
        } else {
            report.delivered_per_sec
        };
        report.delivered_vs_baseline = match (delivered, report.baseline_send_per_sec) {
            (Some(d), Some(b)) => Some(d / b),
            _ => None,
        };
    }
    Ok(report)
}

/// The bare server: reads each request's body and answers 202, nothing else.
fn bare_app() -> axum::Router {
    axum::Router::new()
        .fallback(|_body: axum::body::Bytes| async { axum::http::StatusCode::ACCEPTED })
}

/// Requests/s that `c` producers get out of a bare HTTP server answering 202 to `n` requests
/// with bodies of `size` bytes (the server runs in this process).
async fn bare_202_rate(n: usize, c: usize, size: usize) -> anyhow::Result<f64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = AbortOnDrop(tokio::spawn(async move {
        let _ = axum::serve(listener, bare_app()).await;
    }));
    let rate = rate_202(addr, n, c, size).await;
    drop(server);
    Ok(rate)
}

/// A task stopped when this is dropped (also when the run is, on an error or a signal).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a request to one of the tool's own local servers may take.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(30);

/// `http://{addr}{path}`, parsed once for every request of a run.
fn local_url(addr: SocketAddr, path: &str) -> reqwest::Url {
    reqwest::Url::parse(&format!("http://{addr}{path}")).expect("a socket address makes a URL")
}

/// Requests/s that `c` producers get out of the bare server at `addr`.
async fn rate_202(addr: SocketAddr, n: usize, c: usize, size: usize) -> f64 {
    let bare = client(c, LOCAL_TIMEOUT);
    let url = local_url(addr, "/v1/events");
    let make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync> =
        Arc::new(move |i| bare.post(url.clone()).body(payload(size, i)));
    let tally = Arc::new(Tally::default());
    let took = drive(n, c, 0, make, 202, &tally).await;
    tally.ok() as f64 / took.as_secs_f64()
}

/// `courier bench-server`: the bare server on its own runtime (the same as `courier serve`
/// builds), until stdin closes, so that it never outlives the bench that started it. With
/// `durable`, the durable bare server ([`durable`]), its journal in a temporary directory
/// under `dir` (the system's temporary directory if `None`).
pub fn serve_bare(durable: bool, dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let served = rt.block_on(async {
        let (app, _journal) = if durable {
            let (app, journal) = durable::app(dir)?;
            (app, Some(journal))
        } else {
            (bare_app(), None)
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening {}", listener.local_addr()?);
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        });
        // Ctrl-C at the terminal reaches this child too: it stops the same way, so that the
        // durable server still removes its journal.
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                tokio::select! {
                    _ = stdin_closed => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            })
            .await?;
        Ok(())
    });
    // Not waiting for the thread still reading stdin (when stopped by Ctrl-C).
    rt.shutdown_background();
    served
}

/// A `courier bench-server` child process.
struct BareProcess {
    /// Not killed when dropped: dropping it closes its stdin, and it stops by itself once
    /// this process's connections to it are gone.
    child: tokio::process::Child,
    addr: SocketAddr,
    /// For its CPU time.
    pid: Option<u32>,
    /// The durable server's: a temporary directory made here, which the server makes its
    /// own in; removed when this is dropped (after the process stopped in [`Self::stop`]),
    /// so that nothing stays even when the server had to be killed, or the run ended in an
    /// error.
    dir: Option<tempfile::TempDir>,
}

impl BareProcess {
    /// Starts `exe bench-server`: the durable one with `durable`, its journal in a
    /// temporary directory under the directory given (the system's temporary directory if
    /// none).
    async fn start(
        exe: &std::path::Path,
        durable: Option<Option<&std::path::Path>>,
    ) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let dir = match durable {
            None => None,
            Some(parent) => {
                let parent = parent.map_or_else(std::env::temp_dir, |p| p.to_path_buf());
                Some(
                    tempfile::Builder::new()
                        .prefix("courier-bench-")
                        .tempdir_in(&parent)
                        .with_context(|| {
                            format!(
                                "cannot create the durable bare server's directory in {}",
                                parent.display()
                            )
                        })?,
                )
            }
        };
        let mut command = tokio::process::Command::new(exe);
        command.arg("bench-server");
        if let Some(d) = &dir {
            command.arg("--durable").arg("--dir").arg(d.path());
        }
        let mut child = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} bench-server", exe.display()))?;
        let stdout = child.stdout.take().context("bench-server stdout")?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .context("bench-server did not start within 10 s")??;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("bench-server said {line:?}, not its address"))?;
        Ok(BareProcess {
            pid: child.id(),
            child,
            addr,
            dir,
        })
    }

    /// Closes its stdin and waits (up to 5 s) for it to stop by itself; killed if it does
    /// not. Its directory is removed either way.
    async fn stop(self) {
        self.stop_within(Duration::from_secs(5)).await;
    }

    async fn stop_within(mut self, grace: Duration) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        if let Some(dir) = self.dir.take()
            && let Err(e) = dir.close()
        {
            eprintln!("courier bench: cannot remove the durable bare server's directory: {e}");
        }
    }
}

/// A bare server process, measured before courier's run and again after it.
struct Measured {
    process: BareProcess,
    /// Its CPU time before its first run: it idles between its two runs, so its CPU from
    /// there to the end of the second is what answering them cost.
    cpu_before: Option<Duration>,
    before: f64,
}

impl Measured {
    async fn before(process: BareProcess, n: usize, c: usize, size: usize) -> Self {
        let cpu_before = cpu_time(process.pid);
        let before = rate_202(process.addr, n, c, size).await;
        Measured {
            process,
            cpu_before,
            before,
        }
    }

    /// The second run: both rates, and the CPU per request over the two. Stops the process.
    async fn after(self, n: usize, c: usize, size: usize) -> ([f64; 2], Option<f64>) {
        let after = rate_202(self.process.addr, n, c, size).await;
        let cpu = cpu_us_per(self.cpu_before, cpu_time(self.process.pid), 2 * n);
        self.process.stop().await;
        ([self.before, after], cpu)
    }
}

/// The human-readable report.
pub fn human(r: &Report) -> String {
    let mut out = format!(
        "courier bench: {} events of {} bytes, {} producers{}\n",
        r.events,
        r.size_bytes,
        r.concurrency,
        r.target_rate
            .map(|t| format!(", paced at {t}/s"))
            .unwrap_or_default()
    );
    out.push_str(&format!(
        "  accepted (durable)  {:>10.0} events/s   ({} accepted, {} errors)\n",
        r.accepted_per_sec, r.accepted, r.errors
    ));
    if r.errors > 0 {
        let causes: Vec<String> = r
            .errors_by_status
            .iter()
            .map(|(cause, n)| format!("{n} × {cause}"))
            .collect();
        out.push_str(&format!(
            "  errors              {}{}\n",
            causes.join(", "),
            r.first_error
                .as_ref()
                .map(|e| format!("; first: {e}"))
                .unwrap_or_default()
        ));
    }
    match r.delivered {
        Some(delivered) => {
            let rate = r
                .delivered_per_sec
                .map_or_else(|| format!("{:>10}", "–"), |d| format!("{d:>10.0}"));
            let mut counts = format!(
                "{delivered} delivered, {} dead, {} missing",
                r.dead.map_or_else(|| "?".to_string(), |d| d.to_string()),
                r.missing.unwrap_or(0)
            );
            if let Some(d) = r.duplicates.filter(|&d| d > 0) {
                counts.push_str(&format!(", {d} duplicates"));
            }
            if let Some(n) = r.delivered_not_accepted.filter(|&n| n > 0) {
                counts.push_str(&format!(", {n} delivered after an ingest error"));
            }
            out.push_str(&format!(
                "  delivered           {rate} events/s   ({counts})\n"
            ));
        }
        None => out.push_str(
            "  delivered           not counted (--no-wait, or deliveries to --receiver)\n",
        ),
    }
    if let Some(n) = r
        .dropped_at_exit
        .filter(|&n| n > 0 || r.delivered.is_none())
    {
        out.push_str(&format!(
            "  dropped at exit     {n} deliveries still queued, deleted with the bench endpoint (its built-in receiver ends with this run)\n"
        ));
    }
    if let Some(l) = &r.latency {
        out.push_str(&format!(
            "  ingest→delivery     p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms\n",
            l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        ));
    }
    if let Some(rss) = r.backlog_rss_kib {
        out.push_str(&format!(
            "  RSS with the backlog {:>9.1} MiB\n",
            rss as f64 / 1024.0
        ));
    }
    if let Some(d) = r.drain_per_sec {
        out.push_str(&format!("  backlog drained at  {:>10.0} events/s\n", d));
    }
    match r.peak_rss_kib {
        Some(rss) => out.push_str(&format!(
            "  peak RSS            {:>10.1} MiB\n",
            rss as f64 / 1024.0
        )),
        None => match r.pid {
            Some(pid) => out.push_str(&format!(
                "  peak RSS            not measured: no process {pid} to read in /proc\n"
            )),
            None => out.push_str(
                "  peak RSS            not measured: give --pid with courier's process id (courier on this machine)\n",
            ),
        },
    }
    if let Some(c) = r.courier_cpu_us_per_event {
        out.push_str(&format!(
            "  courier CPU         {c:>10.1} µs per event{}\n",
            // Only the ingest compares with a server that only answers.
            r.baseline_202_process_cpu_us_per_request
                .filter(|&b| b > 0.0 && r.backlog)
                .map(|b| format!(" ({:.1}× the bare server process's per request)", c / b))
                .unwrap_or_default()
        ));
    }
    if let Some(threads) = r
        .courier_cpu_by_thread_us_per_event
        .as_ref()
        .filter(|t| !t.is_empty())
    {
        let mut by: Vec<(&String, &f64)> = threads.iter().collect();
        by.sort_by(|a, b| b.1.total_cmp(a.1));
        let list: Vec<String> = by.iter().map(|(n, us)| format!("{n} {us:.1}")).collect();
        out.push_str(&format!("    by thread: {}\n", list.join(", ")));
    }
    if let Some(c) = r.drain_cpu_us_per_event {
        out.push_str(&format!("  courier CPU, drain  {c:>10.1} µs per event\n"));
    }
    if let Some(c) = r.tool_cpu_us_per_event {
        out.push_str(&format!("  load tool CPU       {c:>10.1} µs per event\n"));
    }
    let servers = [
        (
            "bare 202 server",
            r.baseline_202_per_sec,
            r.baseline_202_runs,
            r.accepted_vs_baseline,
            None,
        ),
        (
            "the same in a process of its own",
            r.baseline_202_process_per_sec,
            r.baseline_202_process_runs,
            r.accepted_vs_process_baseline,
            r.baseline_202_process_cpu_us_per_request,
        ),
        (
            "durable 202 server (each body on disk first), in a process of its own",
            r.baseline_durable_202_per_sec,
            r.baseline_durable_202_runs,
            r.accepted_vs_durable_baseline,
            r.baseline_durable_202_cpu_us_per_request,
        ),
    ];
    for (label, mean, runs, ratio, cpu) in servers {
        let Some(b) = mean else { continue };
        out.push_str(&format!(
            "  baseline: {label} {b:.0} req/s{} → courier accepts at {:.0}% of it{}\n",
            runs.map(|[x, y]| format!(" (mean of {x:.0} before and {y:.0} after)"))
                .unwrap_or_default(),
            ratio.unwrap_or(0.0) * 100.0,
            cpu.map(|c| format!("; it used {c:.1} µs of CPU per request"))
                .unwrap_or_default()
        ));
    }
    if r.baseline_durable_202_in_memory == Some(true) {
        out.push_str(
            "  note: the durable server's directory is in memory (tmpfs), not on a disk: its rate \
             is not what durability costs there; give --durable-dir on the disk of courier's data dir\n",
        );
    }
    if let Some(b) = r.baseline_send_per_sec {
        out.push_str(&format!(
            "  baseline: client → receiver {:.0} req/s{}{}\n",
            b,
            r.baseline_send_concurrency
                .filter(|&s| s != r.concurrency)
                .map(|s| format!(
                    " ({s} senders, not {}: courier has at most {BENCH_MAX_IN_FLIGHT} deliveries to the bench endpoint in flight)",
                    r.concurrency
                ))
                .unwrap_or_default(),
            r.delivered_vs_baseline
                .map(|d| format!(" → courier delivers at {:.0}% of it", d * 100.0))
                .unwrap_or_default()
        ));
    }
    out
}

/// The JSON report.
pub fn json(r: &Report) -> Value {
    serde_json::to_value(r).expect("report serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_memory_figures() {
        // Both figures from one snapshot: the kernel reports the peak as at least the RSS of
        // the same moment, but between two reads other test threads may free memory in ways
        // that leave the recorded peak below the earlier RSS.
        let text = proc_file(None, "status").unwrap();
        let rss = status_field_kib(&text, "VmRSS").unwrap();
        let peak = status_field_kib(&text, "VmHWM").unwrap();
        assert!(rss > 0 && peak >= rss, "VmRSS {rss} kB, VmHWM {peak} kB");
        assert!(rss_kib(None).unwrap() > 0 && peak_rss_kib(None).unwrap() > 0);
        assert_eq!(
            status_field_kib("VmPeak:\t  9 kB\nVmHWM:\t   2048 kB\n", "VmHWM"),
            Some(2048)
        );
        assert_eq!(status_field_kib("VmRSS:\t 1 kB\n", "VmHWM"), None);
    }

    #[test]
    fn reads_cpu_time_that_grows_with_work() {
        // /proc counts in clock ticks: spin until one more has passed (bounded).
        let before = cpu_time(None).unwrap();
        let started = Instant::now();
        let (mut x, mut after) = (0u64, before);
        while after <= before && started.elapsed() < Duration::from_secs(10) {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            after = cpu_time(None).unwrap();
        }
        assert!(after > before, "{before:?} -> {after:?}");
        assert_eq!(cpu_time(Some(u32::MAX)), None, "no such process");
        // A thread name with spaces and parentheses does not shift the fields.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let (name, cpu) =
            parse_stat("42 (a (b) c) S 1 1 1 0 -1 0 0 0 0 0 30 12 0 0 20 0 1 0").unwrap();
        assert_eq!(name, "a (b) c");
        assert!((cpu.as_secs_f64() - 42.0 / hz).abs() < 1e-9, "{cpu:?}");
        let me = read_cpu(std::process::id()).unwrap();
        assert!(!me.by_thread.is_empty() && me.total >= Duration::ZERO);
        assert_eq!(
            cpu_us_per(
                Some(Duration::from_millis(1)),
                Some(Duration::from_millis(3)),
                4
            ),
            Some(500.0)
        );
        assert_eq!(cpu_us_per(None, Some(Duration::from_millis(3)), 4), None);
        assert_eq!(
            cpu_us_per(Some(Duration::ZERO), Some(Duration::ZERO), 0),
            None
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bench_server_that_does_not_stop_is_killed_and_its_directory_removed() {
        use std::os::unix::fs::PermissionsExt;
        // A durable bench-server that makes its journal in the directory it is given, says
        // where it listens, and then ignores its stdin closing.
        let bin = tempfile::tempdir().unwrap();
        let exe = bin.path().join("stubborn-bench-server");
        std::fs::write(
            &exe,
            "#!/bin/sh\n[ \"$2\" = --durable ] || exit 3\nmkdir \"$4/courier-bench-child\" && \
             echo journal > \"$4/courier-bench-child/bench.journal\"\n\
             echo listening 127.0.0.1:9\nexec sleep 60\n",
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let parent = tempfile::tempdir().unwrap();
        let entries = || std::fs::read_dir(parent.path()).unwrap().count();
        let p = loop {
            match BareProcess::start(&exe, Some(Some(parent.path()))).await {
                // Another test thread forked while the script was open for writing.
                Err(e) if format!("{e:#}").contains("Text file busy") => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                r => break r.unwrap(),
            }
        };
        assert_eq!(entries(), 1);
        let pid = p.pid.unwrap();
        p.stop_within(Duration::from_millis(200)).await;
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "killed"
        );
        assert_eq!(entries(), 0, "its directory is gone with it");
    }

    #[test]
    fn sets_of_sequence_numbers() {
        let (a, b) = (Seqs::new(130), Seqs::new(130));
        assert_eq!(a.insert(0), Some(true));
        assert_eq!(a.insert(0), Some(false), "already there");
        assert_eq!(a.insert(129), Some(true));
        assert_eq!(a.insert(130), None, "out of range");
        for i in [0, 64, 129] {
            b.insert(i);
        }
        assert_eq!(a.common(&b), 2);
    }

    #[test]
    fn payload_carries_its_send_time_and_size() {
        for size in [100, 1024, 5000] {
            let p = payload(size, 7);
            assert_eq!(p.len(), size);
            let v: Value = serde_json::from_str(&p).unwrap();
            assert_eq!(v["seq"], 7);
            assert_eq!(
                number_after(p.as_bytes(), "\"sent_at_us\":"),
                v["sent_at_us"].as_u64()
            );
            assert_eq!(number_after(p.as_bytes(), "\"seq\":"), Some(7));
        }
        // Smaller than its own head: the head alone, still valid JSON; that is the smallest
        // size a run may ask for (with its largest sequence number).
        let v: Value = serde_json::from_str(&payload(10, 1)).unwrap();
        assert_eq!(v["pad"], "");
        assert_eq!(min_size(1000), payload(0, 999).len());
        assert_eq!(payload(min_size(1000), 999).len(), min_size(1000));
        assert_eq!(payload(min_size(1000), 0).len(), min_size(1000));
        assert!(min_size(1000) < HEAD_MAX);
    }
}
