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
    pub accepted_per_sec: f64,
    pub delivered: usize,
    pub delivered_per_sec: Option<f64>,
    pub latency: Option<Latency>,
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
    /// A bare client→receiver loop: requests/s with the same concurrency.
    pub baseline_send_per_sec: Option<f64>,
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
}

impl Report {
    fn set_courier_cpu(&mut self, (total, by_thread): CourierCpu) {
        self.courier_cpu_us_per_event = total;
        self.courier_cpu_by_thread_us_per_event = by_thread;
    }
}

/// The receiver: counts requests and records each one's latency from the payload's send time.
#[derive(Default)]
struct Received {
    count: AtomicUsize,
    latencies_us: Mutex<Vec<u64>>,
    last_us: AtomicU64,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// How many of the bench endpoint's deliveries are dead (0 when courier cannot say).
async fn dead_count(http: &reqwest::Client, base: &str, token: &str, name: &str) -> u64 {
    let Ok(r) = http
        .get(format!("{base}/v1/endpoints/{name}/stats"))
        .bearer_auth(token)
        .send()
        .await
    else {
        return 0;
    };
    let Ok(bytes) = r.bytes().await else { return 0 };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["counts"]["dead"].as_u64())
        .unwrap_or(0)
}

/// Starts the built-in receiver; returns its address.
pub async fn start_receiver(record: bool) -> anyhow::Result<(SocketAddr, Arc<ReceiverHandle>)> {
    let state = Arc::new(ReceiverHandle {
        got: Received::default(),
        record,
    });
    let st = state.clone();
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let st = st.clone();
        async move {
            let now = now_us();
            if st.record {
                // The payload starts with {"sent_at_us":N, …}: read N without parsing all.
                if let Some(sent) = sent_at(&body) {
                    st.got
                        .latencies_us
                        .lock()
                        .expect("latencies")
                        .push(now.saturating_sub(sent));
                }
            }
            st.got.count.fetch_add(1, Ordering::Relaxed);
            st.got.last_us.fetch_max(now, Ordering::Relaxed);
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
    pub fn count(&self) -> usize {
        self.got.count.load(Ordering::Relaxed)
    }
}

fn sent_at(body: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(body.get(..64.min(body.len()))?).ok()?;
    let rest = s.split("\"sent_at_us\":").nth(1)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
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

/// Sends `n` requests with `c` producers (optionally at `rate`/s overall); returns the
/// number of successes, errors and the elapsed time.
async fn drive(
    n: usize,
    c: usize,
    rate: u64,
    make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync>,
    ok_status: u16,
) -> (usize, usize, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let err = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c.max(1) {
        let (next, ok, err, make) = (next.clone(), ok.clone(), err.clone(), make.clone());
        tasks.push(tokio::spawn(async move {
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
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        let _ = r.bytes().await;
                        err.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        err.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    (
        ok.load(Ordering::Relaxed),
        err.load(Ordering::Relaxed),
        started.elapsed(),
    )
}

fn client(c: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(c.max(1))
        .tcp_nodelay(true)
        .no_proxy()
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

/// Runs the benchmark against a running courier.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    // Checked before anything is made on courier.
    if let Some(dir) = opts.durable_dir.as_ref().filter(|d| !d.is_dir()) {
        bail!("--durable-dir {}: not a directory", dir.display());
    }
    let base = opts.url.trim_end_matches('/').to_string();
    let http = client(opts.concurrency);
    let mut report = Report {
        backlog: opts.backlog,
        events: opts.events,
        concurrency: opts.concurrency,
        size_bytes: opts.size,
        target_rate: (opts.rate > 0).then_some(opts.rate),
        ..Report::default()
    };

    // The receiver, and a temporary endpoint on courier pointing at it.
    let (receiver_url, handle) = match &opts.receiver {
        Some(u) => (u.clone(), None),
        None => {
            let (addr, h) = start_receiver(true).await?;
            (format!("http://{addr}/bench"), Some(h))
        }
    };
    let name = format!("bench-{}", &crate::model::new_id("b")[2..]).to_ascii_lowercase();
    let created = http
        .post(format!("{base}/v1/endpoints"))
        .bearer_auth(&opts.token)
        .body(
            json!({
                "name": name,
                "url": receiver_url,
                "max_in_flight": 256,
                "schedule": ["0s", "1s", "5s", "30s", "2m", "10m", "30m", "1h"],
                "description": "temporary endpoint of courier bench",
            })
            .to_string(),
        )
        .send()
        .await
        .with_context(|| format!("cannot reach courier at {base}"))?;
    if created.status() != 201 {
        let status = created.status();
        let body = created.text().await.unwrap_or_default();
        bail!(
            "cannot create the bench endpoint ({status}): {body} (the token needs the admin and ingest scopes; private networks must be allowed for the built-in receiver)"
        );
    }

    if opts.backlog {
        let r = http
            .post(format!("{base}/v1/endpoints/{name}/pause"))
            .bearer_auth(&opts.token)
            .send()
            .await?;
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
        let mut durable: Vec<std::ffi::OsString> = vec!["--durable".into()];
        if let Some(dir) = &opts.durable_dir {
            durable.extend(["--dir".into(), dir.into()]);
        }
        for args in [vec![], durable] {
            let p = BareProcess::start(exe, &args).await?;
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
    // Courier's CPU is read only with a pid (never this process's by mistake).
    let courier_cpu = || opts.pid.and_then(read_cpu);
    let courier_cpu_before = courier_cpu();
    let tool_cpu_before = cpu_time(None);
    let first_send = now_us();
    let (ok, errors, took) = drive(opts.events, opts.concurrency, opts.rate, make, 202).await;
    report.accepted = ok;
    report.errors = errors;
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
        report.backlog_rss_kib = rss_kib(opts.pid);
        drain_start = Some((now_us(), handle.as_ref().map_or(0, |h| h.count())));
        let r = http
            .post(format!("{base}/v1/endpoints/{name}/resume"))
            .bearer_auth(&opts.token)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("cannot resume the bench endpoint: {}", r.status());
        }
        drain_cpu_before = courier_cpu();
    }

    // Wait for the deliveries.
    if let Some(h) = &handle
        && !opts.no_wait
    {
        let deadline = Instant::now()
            .checked_add(opts.drain_timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600));
        let mut polls = 0u32;
        while h.count() < ok && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            polls += 1;
            // Now and then, ask courier how many went dead: those will never arrive, and
            // if all of them do, the receiver is unreachable from courier.
            if polls.is_multiple_of(25) {
                let dead = dead_count(&http, &base, &opts.token, &name).await;
                if dead > 0 && h.count() == 0 && dead as usize >= ok {
                    bail!(
                        "every delivery to the bench receiver went dead: courier refuses loopback destinations unless [delivery] allow_private_networks = true (see GET {base}/v1/endpoints/{name}/stats)"
                    );
                }
                if h.count() + dead as usize >= ok {
                    break;
                }
            }
        }
        report.delivered = h.count();
        if opts.backlog {
            let drained = drain_start.map_or(0, |(_, before)| report.delivered - before);
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
                Some((report.delivered - before) as f64 / ((last - start) as f64 / 1e6));
        }
        if report.delivered > 0 && last > first_send {
            report.delivered_per_sec =
                Some(report.delivered as f64 / ((last - first_send) as f64 / 1e6));
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
    report.peak_rss_kib = peak_rss_kib(opts.pid);
    // Deleted only once its deliveries are done: with an outside receiver (nothing to wait
    // on) or --no-wait it stays, so queued deliveries are not stranded without an endpoint.
    if opts.receiver.is_some() || opts.no_wait {
        eprintln!(
            "the bench endpoint `{name}` stays; delete it with DELETE /v1/endpoints/{name} once its deliveries are done"
        );
    } else {
        let _ = http
            .delete(format!("{base}/v1/endpoints/{name}"))
            .bearer_auth(&opts.token)
            .send()
            .await;
    }

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

        // Baseline 2: what sending alone costs: a client loop straight to a receiver.
        let (raddr, _h) = start_receiver(false).await?;
        let send = client(opts.concurrency);
        let url = local_url(raddr, "/bench");
        let make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync> =
            Arc::new(move |i| send.post(url.clone()).body(payload(size, i)));
        let (ok, _, took) = drive(opts.events, opts.concurrency.min(256), 0, make, 204).await;
        report.baseline_send_per_sec = Some(ok as f64 / took.as_secs_f64());
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
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, bare_app()).await;
    });
    let rate = rate_202(addr, n, c, size).await;
    server.abort();
    Ok(rate)
}

/// `http://{addr}{path}`, parsed once for every request of a run.
fn local_url(addr: SocketAddr, path: &str) -> reqwest::Url {
    reqwest::Url::parse(&format!("http://{addr}{path}")).expect("a socket address makes a URL")
}

/// Requests/s that `c` producers get out of the bare server at `addr`.
async fn rate_202(addr: SocketAddr, n: usize, c: usize, size: usize) -> f64 {
    let bare = client(c);
    let url = local_url(addr, "/v1/events");
    let make: Arc<dyn Fn(usize) -> reqwest::RequestBuilder + Send + Sync> =
        Arc::new(move |i| bare.post(url.clone()).body(payload(size, i)));
    let (ok, _, took) = drive(n, c, 0, make, 202).await;
    ok as f64 / took.as_secs_f64()
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

/// A `courier bench-server` child process; killed when dropped.
struct BareProcess {
    /// Not killed when dropped: dropping it closes its stdin, and it stops by itself once
    /// this process's connections to it are gone — so that the durable server removes its
    /// journal even when a run ends in an error.
    child: tokio::process::Child,
    addr: SocketAddr,
    /// For its CPU time.
    pid: Option<u32>,
}

impl BareProcess {
    /// Starts `exe bench-server` with `args` (`--durable` and its directory, or none).
    async fn start(exe: &std::path::Path, args: &[std::ffi::OsString]) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(exe)
            .arg("bench-server")
            .args(args)
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
        })
    }

    /// Closes its stdin and waits (up to 5 s) for it to stop by itself, so that the durable
    /// server removes its journal; killed if it does not.
    async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
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
    if let Some(d) = r.delivered_per_sec {
        out.push_str(&format!(
            "  delivered           {:>10.0} events/s   ({} delivered)\n",
            d, r.delivered
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
    if let Some(rss) = r.peak_rss_kib {
        out.push_str(&format!(
            "  peak RSS            {:>10.1} MiB\n",
            rss as f64 / 1024.0
        ));
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
            "  baseline: client → receiver {:.0} req/s{}\n",
            b,
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

    #[test]
    fn payload_carries_its_send_time_and_size() {
        for size in [100, 1024, 5000] {
            let p = payload(size, 7);
            assert_eq!(p.len(), size);
            let v: Value = serde_json::from_str(&p).unwrap();
            assert_eq!(v["seq"], 7);
            assert_eq!(sent_at(p.as_bytes()), v["sent_at_us"].as_u64());
        }
        // Smaller than its own head: the head alone, still valid JSON.
        let v: Value = serde_json::from_str(&payload(10, 1)).unwrap();
        assert_eq!(v["pad"], "");
    }
}
