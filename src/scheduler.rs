//! The scheduler: one worker task per endpoint reads that endpoint's due deliveries from the
//! store's due-time index, in pages, and starts attempts within the endpoint's limits.
//!
//! Why per endpoint: a slow, failing or throttled endpoint occupies its own worker, its own
//! in-flight slots and its own slice of the index. The one thing endpoints share is the
//! process-wide cap on attempts in flight (`max_attempts_in_flight`), of which no endpoint
//! takes more than half: one slow endpoint cannot delay the others, though two slow ones
//! with large `max_in_flight` can fill it until their attempts time out (`connect_timeout`
//! bounds a receiver that never answers the connection). Nothing is held in memory but the
//! in-flight set; the backlog stays on disk.
//! Workers sleep until the earliest due time they know of, or until ingest, replay or a
//! finished attempt wakes them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use crate::app::App;
use crate::config::{EndpointConfig, Ordering};
use crate::model::{Attempt, Delivery, DeliveryStatus, now_ms, rfc3339};
use crate::plugins::{AttemptInfo, BackoffDecision, TransformContext, Transformed};
use crate::store::{Decided, Next, OutcomeRecord};
use crate::{deliver, observe, outcome};

/// An endpoint's health as the circuit breaker sees it.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Health {
    pub consecutive_failures: u32,
    /// Circuit open: the endpoint is failing and is only probed, one attempt at a time.
    pub circuit_open: bool,
    pub last_attempt_ms: Option<u64>,
    pub last_success_ms: Option<u64>,
    /// Until when the endpoint is sent nothing: a `429` or `503` with `Retry-After` speaks
    /// for the receiver, not for one delivery, so its other deliveries wait too instead of
    /// each spending an attempt on the same answer.
    pub held_until_ms: Option<u64>,
    /// When the circuit last opened: the first probe waits a probe interval from here.
    #[serde(skip)]
    pub opened_ms: u64,
    /// When the last probe was sent plus a probe interval: the next waits until then.
    #[serde(skip)]
    pub probe_after_ms: u64,
    /// The URL the streak is about: results for another (the endpoint's URL was changed)
    /// start a new one.
    #[serde(skip)]
    pub url: Option<url::Url>,
}

impl Health {
    pub fn state(&self) -> &'static str {
        if self.circuit_open { "open" } else { "closed" }
    }

    /// While the circuit is open, when the next probe may go: a probe interval after the
    /// circuit opened and after the last probe.
    pub fn next_probe_ms(&self, interval: Duration) -> Option<u64> {
        self.circuit_open.then(|| {
            self.probe_after_ms
                .max(self.opened_ms + interval.as_millis() as u64)
        })
    }
}

/// A running endpoint worker: its wake-up, and a flag that a wake-up is pending (so that a
/// worker about to exit for lack of work can tell it was just handed some).
struct WorkerHandle {
    notify: Arc<Notify>,
    woken: Arc<AtomicBool>,
    /// The earliest due time of work enqueued since the worker last looked (`u64::MAX`:
    /// none). Concurrent ingests can commit out of id order, so new work may sort before the
    /// worker's scan position; it rewinds to here.
    rewind: Arc<AtomicU64>,
}

/// Workers exist only for endpoints with work: an idle endpoint costs its configuration and
/// nothing else, which is what lets thousands of endpoints be registered.
#[derive(Default)]
pub struct Scheduler {
    workers: Mutex<HashMap<String, WorkerHandle>>,
    health: Mutex<HashMap<String, Health>>,
    /// When each deleted endpoint's health was forgotten: attempts it started before then
    /// may still finish, and their results are the old endpoint's, not the new one's.
    forgotten: Mutex<HashMap<String, u64>>,
    /// The token buckets of endpoints with a `rate_limit` whose workers retired: the next
    /// worker goes on with its bucket as it was, not a full one (which would let an endpoint
    /// that goes idle between events take a whole burst each time).
    buckets: Mutex<HashMap<String, (f64, Bucket)>>,
    /// Outcomes in a row the store could not record (or events it could not read): each
    /// such delivery is held back for a pause that doubles with this count, so that a store
    /// in trouble does not turn into the same webhook sent again and again.
    store_failures: std::sync::atomic::AtomicU32,
}

/// Sent by an attempt task to its worker once the outcome is committed (and the endpoint's
/// health updated with it).
struct Done {
    id: String,
    /// When the delivery is due again if it is still pending (a retry, or an outcome that
    /// could not be recorded): the worker's scan may have passed that time already.
    again_ms: Option<u64>,
    /// Handed back unsent after waiting for a slot: the rate-limit token it took is the
    /// endpoint's again (a change to the endpoint must not cost it a token, which at `1/m`
    /// is a minute's delay).
    unsent: bool,
}

/// What one attempt came to, for its worker.
struct Attempted {
    /// `Some(true)` for a 2xx, `Some(false)` for a failed attempt, `None` when nothing was
    /// sent (or the answer says nothing about the endpoint's health).
    success: Option<bool>,
    /// When the delivery is due again, if it is still pending.
    again_ms: Option<u64>,
    /// Until when the receiver asked the endpoint to wait.
    hold_until_ms: Option<u64>,
}

impl Attempted {
    fn unsent(again_ms: Option<u64>) -> Attempted {
        Attempted {
            success: None,
            again_ms,
            hold_until_ms: None,
        }
    }
}

/// The longest a receiver's `Retry-After` holds back its endpoint's other deliveries (the
/// delivery that got it waits as long as it says, up to a day): one answer from a proxy in
/// front of the receiver cannot stop an endpoint for a day, and when the hold ends while
/// the receiver still refuses, its next answer holds the endpoint again.
pub const ENDPOINT_HOLD_MAX: Duration = Duration::from_secs(600);

/// How often idle endpoints with pending deliveries are looked for ([`Scheduler::start_sweeper`]):
/// the most a delivery whose announcement went missing waits beyond its due time.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The shortest wait a backoff plugin can set after an attempt that sent nothing (as the
/// schedule's fallback waits at least this long too).
pub const UNSENT_RETRY_FLOOR: Duration = Duration::from_secs(1);

/// How long a deleted endpoint's name is remembered for telling its late attempt results
/// from those of one made again under the name (far longer than any attempt runs).
const FORGOTTEN_FOR_MS: u64 = 24 * 3600 * 1000;

impl Scheduler {
    /// Wakes the worker of `endpoint` (new or requeued work, or a changed definition),
    /// starting one if there is none.
    pub fn wake(app: &Arc<App>, endpoint: &str) {
        Self::wake_due(app, endpoint, 0);
    }

    /// Wakes the worker of `endpoint` for work that is due at `due_ms` or later.
    pub fn wake_due(app: &Arc<App>, endpoint: &str, due_ms: u64) {
        let mut workers = app.scheduler.workers.lock().expect("workers lock");
        if let Some(w) = workers.get(endpoint) {
            w.rewind.fetch_min(due_ms, AtomicOrdering::SeqCst);
            w.woken.store(true, AtomicOrdering::SeqCst);
            w.notify.notify_one();
            return;
        }
        if app.shutdown.is_cancelled() {
            return;
        }
        let handle = WorkerHandle {
            notify: Arc::new(Notify::new()),
            woken: Arc::new(AtomicBool::new(false)),
            rewind: Arc::new(AtomicU64::new(u64::MAX)),
        };
        let signals = Signals {
            notify: handle.notify.clone(),
            woken: handle.woken.clone(),
            rewind: handle.rewind.clone(),
        };
        workers.insert(endpoint.to_string(), handle);
        app.tasks
            .spawn(worker(app.clone(), endpoint.to_string(), signals));
    }

    /// Wakes every running worker (after a configuration change).
    pub fn notify_all(&self) {
        for w in self.workers.lock().expect("workers lock").values() {
            w.rewind.store(0, AtomicOrdering::SeqCst);
            w.woken.store(true, AtomicOrdering::SeqCst);
            w.notify.notify_one();
        }
    }

    /// Number of running workers (endpoints with work in hand).
    pub fn workers(&self) -> usize {
        self.workers.lock().expect("workers lock").len()
    }

    pub fn health(&self, endpoint: &str) -> Health {
        self.health
            .lock()
            .expect("health lock")
            .get(endpoint)
            .cloned()
            .unwrap_or_default()
    }

    /// Notes an attempt picked at `now` for `endpoint`: if its circuit is open, it is the
    /// probe, and the next waits a probe interval.
    fn probe_sent(&self, app: &App, endpoint: &str, now: u64) {
        let interval = app.config.load().delivery.circuit_probe_interval;
        if let Some(h) = self.health.lock().expect("health lock").get_mut(endpoint)
            && h.circuit_open
        {
            h.probe_after_ms = now + interval.as_millis() as u64;
        }
    }

    /// Forgets an endpoint's health (its circuit and failure streak): it was deleted, and an
    /// endpoint made later under the same name — perhaps another URL, for someone else —
    /// starts afresh.
    pub fn forget(&self, endpoint: &str) {
        let mut health = self.health.lock().expect("health lock");
        health.remove(endpoint);
        let now = now_ms();
        let mut forgotten = self.forgotten.lock().expect("forgotten lock");
        // Names deleted long ago have no attempts left in flight to tell apart: without this,
        // endpoints made and deleted by the thousand would grow the map for good.
        forgotten.retain(|_, at| now.saturating_sub(*at) < FORGOTTEN_FOR_MS);
        forgotten.insert(endpoint.to_string(), now);
        drop(forgotten);
        // A rate-limited endpoint's idle bucket goes too (one made again starts full).
        self.buckets.lock().expect("buckets lock").remove(endpoint);
    }

    /// Starts `h`'s streak afresh for `url`: failures of another URL say nothing about it
    /// (an operator who fixes a wrong URL does not wait for the next probe).
    fn new_url(app: &App, endpoint: &str, h: &mut Health, url: &url::Url) {
        h.consecutive_failures = 0;
        h.held_until_ms = None;
        if h.circuit_open {
            h.circuit_open = false;
            observe::circuit(&app.metrics, endpoint, false, 0);
        }
        h.url = Some(url.clone());
    }

    /// The endpoint's health, its streak started afresh first if it is about another URL
    /// than `url` (the endpoint's URL now).
    fn health_at(&self, app: &App, endpoint: &str, url: &url::Url) -> Health {
        let mut all = self.health.lock().expect("health lock");
        match all.get_mut(endpoint) {
            Some(h) => {
                if h.url.as_ref().is_some_and(|u| u != url) {
                    Self::new_url(app, endpoint, h, url);
                }
                h.clone()
            }
            None => Health::default(),
        }
    }

    /// Endpoints that have made attempts, with their health.
    pub fn all_health(&self) -> Vec<(String, Health)> {
        self.health
            .lock()
            .expect("health lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Starts workers for every endpoint with pending deliveries (at start-up).
    pub fn start_workers(app: &Arc<App>) {
        for ((endpoint, status), n) in app.store.counts() {
            if status == crate::model::DeliveryStatus::Pending && n > 0 {
                Self::wake(app, &endpoint);
            }
        }
    }

    /// Every [`SWEEP_INTERVAL`], wakes each endpoint that has pending deliveries but no
    /// worker. Work is announced by whoever queues it, after its commit; an announcement
    /// can still go missing — a producer that hangs up while its event is being committed
    /// cancels the request before it wakes anyone, and a worker that looked while the
    /// database was behind the journal may have retired without seeing it. The sweep reads
    /// only the in-memory counts, so it costs nothing with thousands of endpoints.
    pub fn start_sweeper(app: &Arc<App>) {
        let app2 = app.clone();
        app.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
                    _ = app2.shutdown.cancelled() => return,
                }
                for ((endpoint, status), n) in app2.store.counts() {
                    if status != crate::model::DeliveryStatus::Pending || n == 0 {
                        continue;
                    }
                    // A removed endpoint's queue waits for it; a paused one's waits too.
                    if app2.endpoints.get(&endpoint).is_none_or(|ep| ep.paused) {
                        continue;
                    }
                    let idle = !app2
                        .scheduler
                        .workers
                        .lock()
                        .expect("workers lock")
                        .contains_key(&endpoint);
                    if idle {
                        tracing::debug!(endpoint = %endpoint, pending = n, "sweep: waking an idle endpoint with pending deliveries");
                        Self::wake(&app2, &endpoint);
                    }
                }
            }
        });
    }

    fn record(
        &self,
        app: &App,
        endpoint: &str,
        success: bool,
        started_ms: u64,
        url: &url::Url,
        hold_until_ms: Option<u64>,
    ) {
        // An attempt to a URL the endpoint no longer has (changed while it was in flight)
        // says nothing about the one it has now. (Looked up before the health lock is taken.)
        if app.endpoints.get(endpoint).is_some_and(|ep| ep.url != *url) {
            return;
        }
        let threshold = app.config.load().delivery.circuit_failures;
        let mut all = self.health.lock().expect("health lock");
        // Under the health lock, as `forget` takes it: a result is the old endpoint's or the
        // new one's, never counted for the new after it was forgotten.
        let forgotten = self
            .forgotten
            .lock()
            .expect("forgotten lock")
            .get(endpoint)
            .copied();
        if forgotten.is_some_and(|at| started_ms <= at) {
            return;
        }
        let h = all.entry(endpoint.to_string()).or_default();
        if h.url.as_ref() != Some(url) {
            Self::new_url(app, endpoint, h, url);
        }
        let now = now_ms();
        h.last_attempt_ms = Some(now);
        if let Some(until) = hold_until_ms {
            h.held_until_ms = h.held_until_ms.max(Some(until));
        }
        if success {
            h.consecutive_failures = 0;
            h.last_success_ms = Some(now);
            if h.circuit_open {
                h.circuit_open = false;
                observe::circuit(&app.metrics, endpoint, false, 0);
            }
        } else {
            h.consecutive_failures += 1;
            if !h.circuit_open && h.consecutive_failures >= threshold {
                h.circuit_open = true;
                h.opened_ms = now;
                observe::circuit(&app.metrics, endpoint, true, h.consecutive_failures);
            }
        }
    }
}

/// A token bucket for `rate_limit`; holds up to one second's worth of tokens (at least one).
struct Bucket {
    rate_per_ms: f64,
    capacity: f64,
    tokens: f64,
    at_ms: u64,
}

impl Bucket {
    fn new(per_second: f64, now: u64) -> Bucket {
        let capacity = per_second.max(1.0);
        Bucket {
            rate_per_ms: per_second / 1000.0,
            capacity,
            tokens: capacity,
            at_ms: now,
        }
    }

    fn refill(&mut self, now: u64) {
        let elapsed = now.saturating_sub(self.at_ms) as f64;
        self.tokens = (self.tokens + elapsed * self.rate_per_ms).min(self.capacity);
        self.at_ms = now;
    }

    fn available(&mut self, now: u64) -> usize {
        self.refill(now);
        self.tokens.floor() as usize
    }

    fn take(&mut self) {
        self.tokens -= 1.0;
    }

    /// Returns a token taken for an attempt that was not made.
    fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.capacity);
    }

    /// When the next whole token will be there.
    fn next_token_ms(&self) -> u64 {
        let missing = (1.0 - self.tokens).max(0.0);
        self.at_ms + (missing / self.rate_per_ms).ceil() as u64
    }
}

/// A worker's ends of its [`WorkerHandle`].
struct Signals {
    notify: Arc<Notify>,
    woken: Arc<AtomicBool>,
    rewind: Arc<AtomicU64>,
}

async fn worker(app: Arc<App>, name: String, signals: Signals) {
    let Signals {
        notify,
        woken,
        rewind,
    } = signals;
    let mut in_flight: HashSet<String> = HashSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut bucket = app
        .scheduler
        .buckets
        .lock()
        .expect("buckets lock")
        .remove(&name);
    // Where the last page ended. Everything before it is in flight or done; work enqueued
    // since is announced with its due time (`rewind`) and the scan moves back to it. With
    // nothing in flight the scan starts over from the head.
    let mut resume: Option<(u64, String)> = None;
    loop {
        woken.store(false, AtomicOrdering::SeqCst);
        let back_to = rewind.swap(u64::MAX, AtomicOrdering::SeqCst);
        if in_flight.is_empty() || back_to == 0 {
            resume = None;
        } else if resume.as_ref().is_some_and(|(due, _)| back_to <= *due) {
            // Start at the first entry due at `back_to` (ids are ASCII, so every id sorts
            // below U+10FFFF).
            resume = Some((back_to - 1, "\u{10ffff}".to_string()));
        }
        // Work announced by an ingest may be on disk in the journal and not yet in the
        // database: wait until it is before looking for it.
        if let Err(e) = app.store.settle().await {
            tracing::warn!(endpoint = %name, error = %e, "looking for due work without it");
        }
        let stopping = app.shutdown.is_cancelled();
        let Some(ep) = app.endpoints.get(&name) else {
            // Removed (config file or API): its queue stays on disk untouched and resumes if
            // the endpoint comes back.
            if in_flight.is_empty() {
                if retire(&app, &name, &woken, &mut bucket) {
                    tracing::info!(endpoint = %name, "endpoint removed; its queued deliveries wait for it");
                    break;
                }
                continue;
            }
            if let Some(done) = done_rx.recv().await {
                finish(&mut in_flight, &rewind, &mut bucket, done);
            }
            continue;
        };
        let now = now_ms();
        let mut wake: Option<u64> = None;
        if !stopping {
            // No endpoint holds more than half of the slots all endpoints share: one slow
            // receiver with a large `max_in_flight` cannot keep every other endpoint waiting.
            let own_cap = ep.max_in_flight.min((app.attempt_slots / 2).max(1));
            let mut capacity = if ep.paused {
                0
            } else {
                own_cap.saturating_sub(in_flight.len())
            };
            let health = app.scheduler.health_at(&app, &name, &ep.url);
            if health.circuit_open {
                // Failing endpoint: one probe at a time, at the probe pace, the first one a
                // probe interval after the circuit opened.
                let interval = app.config.load().delivery.circuit_probe_interval;
                let probe_at = health.next_probe_ms(interval).unwrap_or(now);
                if in_flight.is_empty() && now >= probe_at {
                    capacity = capacity.min(1);
                } else {
                    capacity = 0;
                    if in_flight.is_empty() {
                        wake = Some(probe_at);
                    }
                }
            }
            if let Some(until) = health.held_until_ms.filter(|until| *until > now) {
                // The receiver asked for a pause (`Retry-After`): nothing goes out until then.
                capacity = 0;
                wake = min_opt(wake, Some(until));
            }
            match ep.rate_limit {
                Some(rl) => {
                    let rate = rl.per_second();
                    if bucket.as_ref().is_none_or(|(r, _)| *r != rate) {
                        // A changed rate keeps the tokens there are (up to its own
                        // capacity): a change is no occasion for a burst.
                        let mut b = Bucket::new(rate, now);
                        if let Some((_, old)) = bucket.as_mut() {
                            old.refill(now);
                            b.tokens = old.tokens.min(b.capacity);
                        }
                        bucket = Some((rate, b));
                    }
                }
                None => bucket = None,
            }
            // Whether due work may be waiting for a token: then the worker wakes when the
            // next one is there. Only then: a worker that found less due work than it had
            // tokens for has nothing to wait for.
            let mut token_limited = false;
            if let Some((_, b)) = bucket.as_mut() {
                let avail = b.available(now);
                if avail < capacity {
                    capacity = avail;
                    token_limited = true;
                }
            }
            let mut awaits_token = token_limited && capacity == 0;
            if capacity > 0 {
                let page = match ep.ordering {
                    Ordering::Fifo => app.store.head(&name).map(|head| {
                        let mut page = crate::store::DuePage::default();
                        if let Some(h) = head {
                            match h.next_due_ms {
                                Some(due) if due > now => page.next_due_ms = Some(due),
                                _ if in_flight.contains(&h.id) => {}
                                _ => page.due.push(h),
                            }
                        }
                        page
                    }),
                    Ordering::Unordered => {
                        let after = resume.as_ref().map(|(d, id)| (*d, id.as_str()));
                        app.store.due(&name, now, capacity, &in_flight, after)
                    }
                };
                match page {
                    Ok(page) => {
                        if token_limited && page.due.len() >= capacity {
                            awaits_token = true;
                        }
                        if page.last.is_some() {
                            resume = page.last.clone();
                        }
                        for d in page.due {
                            if let Some((_, b)) = bucket.as_mut() {
                                b.take();
                            }
                            app.scheduler.probe_sent(&app, &name, now);
                            in_flight.insert(d.id.clone());
                            // Whether the attempt's outcome may wait a moment to share a
                            // durable commit: not when this worker's next attempts wait for
                            // it — a FIFO endpoint's next delivery, or the slots of an
                            // endpoint running near its in-flight cap.
                            let may_wait =
                                ep.ordering != Ordering::Fifo && in_flight.len() * 2 <= own_cap;
                            let (app2, ep2, tx) = (app.clone(), ep.clone(), done_tx.clone());
                            let started_ms = now_ms();
                            let url = ep.url.clone();
                            app.tasks.spawn(async move {
                                use futures_util::FutureExt;
                                let id = d.id.clone();
                                let due = d.next_due_ms;
                                // One of the attempts all endpoints may have in flight at
                                // once. One that had to wait for it sends only if what it
                                // was picked with still holds; otherwise (or at shutdown) it
                                // hands the delivery back to the worker, which looks again.
                                let permit = match app2.attempts.clone().try_acquire_owned() {
                                    Ok(p) => Some(p),
                                    Err(_) => {
                                        let waited = tokio::select! {
                                            p = app2.attempts.clone().acquire_owned() => p.ok(),
                                            _ = app2.shutdown.cancelled() => None,
                                        };
                                        waited.filter(|_| still_as_picked(&app2, &ep2, &d))
                                    }
                                };
                                let Some(_permit) = permit else {
                                    // Looked for again from its own due time: the scan is
                                    // past it, and from "now" it would not move back to it
                                    // while anything else of this endpoint is in flight.
                                    let _ = tx.send(Done {
                                        id,
                                        again_ms: Some(due.unwrap_or(0)),
                                        unsent: true,
                                    });
                                    return;
                                };
                                // A panic must not leave the delivery in flight for good: it
                                // is logged and the delivery held back, then tried again.
                                let name = ep2.name.clone();
                                let attempt =
                                    std::panic::AssertUnwindSafe(run_attempt(
                                        &app2, ep2, d, may_wait,
                                    ))
                                        .catch_unwind()
                                        .await;
                                let attempted = match attempt {
                                    Ok(r) => r,
                                    Err(_) => {
                                        tracing::error!(delivery = %id, "the attempt panicked; the delivery will be attempted again after a pause");
                                        Attempted::unsent(Some(hold_back(&app2, due).await))
                                    }
                                };
                                // The endpoint's health (its circuit, a receiver's hold) is
                                // updated before this attempt's slot is given up: an attempt
                                // waiting for that slot sees it before it sends.
                                if let Some(success) = attempted.success {
                                    app2.scheduler.record(
                                        &app2,
                                        &name,
                                        success,
                                        started_ms,
                                        &url,
                                        attempted.hold_until_ms,
                                    );
                                }
                                let _ = tx.send(Done {
                                    id,
                                    again_ms: attempted.again_ms,
                                    unsent: false,
                                });
                            });
                        }
                        wake = min_opt(wake, page.next_due_ms);
                    }
                    Err(e) => {
                        tracing::error!(endpoint = %name, error = %e, "cannot read the queue; retrying in 1s");
                        wake = Some(now + 1000);
                    }
                }
            }
            if awaits_token && let Some((_, b)) = bucket.as_ref() {
                wake = min_opt(wake, Some(b.next_token_ms()));
            }
        } else if in_flight.is_empty() {
            app.scheduler
                .workers
                .lock()
                .expect("workers lock")
                .remove(&name);
            break;
        }
        // Nothing in hand and nothing scheduled (or paused): the worker goes away until the
        // next wake-up starts a new one.
        if !stopping
            && in_flight.is_empty()
            && wake.is_none()
            && retire(&app, &name, &woken, &mut bucket)
        {
            break;
        }

        let sleep = match wake {
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = notify.notified() => {}
            Some(done) = done_rx.recv() => {
                finish(&mut in_flight, &rewind, &mut bucket, done);
            }
            _ = tokio::time::sleep(sleep) => {}
            _ = app.shutdown.cancelled(), if !stopping => {}
        }
        while let Ok(done) = done_rx.try_recv() {
            finish(&mut in_flight, &rewind, &mut bucket, done);
        }
    }
}

/// Deregisters an idle worker unless a wake-up arrived meanwhile (checked under the same
/// lock `wake` takes, so no wake-up is lost), leaving its token bucket to the next one (under
/// that lock too, so the next worker finds it).
fn retire(app: &App, name: &str, woken: &AtomicBool, bucket: &mut Option<(f64, Bucket)>) -> bool {
    let mut workers = app.scheduler.workers.lock().expect("workers lock");
    if woken.swap(false, AtomicOrdering::SeqCst) {
        return false;
    }
    // Kept for the endpoint's next worker, unless the endpoint is gone (deleted, or dropped
    // from the config): one made again under the name starts with a full bucket, and names
    // that come and go leave nothing behind.
    if let Some(b) = bucket.take()
        && app.endpoints.get(name).is_some()
    {
        let mut buckets = app.scheduler.buckets.lock().expect("buckets lock");
        buckets.insert(name.to_string(), b);
    }
    workers.remove(name);
    true
}

fn finish(
    in_flight: &mut HashSet<String>,
    rewind: &AtomicU64,
    bucket: &mut Option<(f64, Bucket)>,
    done: Done,
) {
    in_flight.remove(&done.id);
    if done.unsent
        && let Some((_, b)) = bucket.as_mut()
    {
        b.give_back();
    }
    // Still pending: the scan looks from its due time again, should it be behind the scan.
    if let Some(at) = done.again_ms {
        rewind.fetch_min(at, AtomicOrdering::SeqCst);
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether an attempt picked with endpoint `ep` and delivery `d` may still be made after a
/// wait: the endpoint is the same definition, not paused and not held back by a receiver's
/// `Retry-After` since, and the delivery is the same pending version (not dropped, replayed
/// or attempted meanwhile).
fn still_as_picked(app: &App, ep: &Arc<EndpointConfig>, d: &Delivery) -> bool {
    let same_endpoint = app
        .endpoints
        .get(&ep.name)
        .is_some_and(|now| Arc::ptr_eq(&now, ep) && !now.paused);
    let held = app
        .scheduler
        .health(&ep.name)
        .held_until_ms
        .is_some_and(|until| until > now_ms());
    same_endpoint
        && !held
        && matches!(
            app.store.delivery(&d.id),
            Ok(Some(now)) if now.status == DeliveryStatus::Pending && now.updated_ms == d.updated_ms
        )
}

/// Makes one attempt of `d` and records it. Returns whether the endpoint answered 2xx
/// (`None` when nothing was sent), when a retry is due, and any pause the receiver asked for.
async fn run_attempt(
    app: &Arc<App>,
    ep: Arc<EndpointConfig>,
    d: Delivery,
    may_wait: bool,
) -> Attempted {
    let event = match app.store.event(&d.event_id) {
        Ok(Some(e)) => e,
        Ok(None) => {
            let reason = format!("event {} is missing from the store", d.event_id);
            tracing::error!(endpoint = %d.endpoint, delivery = %d.id, %reason, "delivery is dead (moved to the DLQ): its event is missing");
            let next = Next::Dead { reason };
            // If the outcome cannot be recorded, the delivery is still pending at its due time
            // and the worker must look for it again.
            let again = record(app, &d, None, next, may_wait).await;
            return Attempted::unsent(again);
        }
        Err(e) => {
            tracing::error!(delivery = %d.id, error = %e, "cannot load event; will retry");
            return Attempted::unsent(Some(hold_back(app, d.next_due_ms).await));
        }
    };
    let delivery_cfg = app.config.load().delivery.clone();
    let backoff = ep.backoff.as_ref().map(|p| app.plugins.backoff(p));
    let out = deliver::outgoing(&ep, &event);
    // Transforms run before signing, so the signature covers the bytes actually sent.
    let transformed = if ep.transforms.is_empty() {
        Ok(Transformed::Send(out))
    } else {
        let ctx = TransformContext {
            endpoint: ep.name.clone(),
            event_type: event.event_type.clone(),
            event_id: event.id.clone(),
            timestamp: rfc3339(event.created_ms),
            max_body: app.config.load().server.max_body_bytes.saturating_mul(2),
        };
        let (app2, ep2) = (app.clone(), ep.clone());
        app.plugins
            .on_thread(move || {
                app2.plugins
                    .run_transforms(&app2.metrics, &ep2.transforms, out, &ctx)
            })
            .await
            .unwrap_or_else(|e| {
                Err(crate::plugins::PluginError::Call {
                    plugin: ep.transforms.join(","),
                    class: "plugin_trap",
                    detail: format!("plugin call panicked: {e}"),
                })
            })
    };
    let out = match transformed {
        Ok(Transformed::Send(out)) => out,
        Ok(Transformed::Drop(reason)) => {
            observe::dropped(&ep.name, &d.id, &reason);
            let again = record(app, &d, None, Next::Dropped { reason }, may_wait).await;
            return Attempted::unsent(again);
        }
        Err(e) => {
            // A failing plugin is an attempt error (audited, retried), not the endpoint's
            // fault: it does not count toward the circuit breaker.
            let result = deliver::AttemptResult::not_sent(e.class(), e.to_string());
            let next = decide(app, &ep, backoff, &d, &result, delivery_cfg.jitter).await;
            let again = record(app, &d, Some(result), next, may_wait).await;
            return Attempted::unsent(again);
        }
    };
    let client = app.client.load_full();
    let result = deliver::send(
        &client.http,
        out,
        &ep.signing_secrets(now_ms()),
        &event.id,
        ep.timeout,
        client.allow_private_networks,
        &[],
    )
    .await;
    let next = decide(app, &ep, backoff, &d, &result, delivery_cfg.jitter).await;
    // A deliberate "never retry this one" (410, `webhook-delivery: abort`) comes from a
    // receiver that works, and a refused address never reached it: neither says anything
    // about the endpoint's health, so neither counts for its circuit.
    let health = match outcome::final_answer(&result) {
        Some(Next::Dead { .. }) => None,
        _ => Some(result.success()),
    };
    let hold_until_ms = match (result.status, result.retry_after) {
        (Some(429 | 503), Some(after)) if !after.is_zero() => {
            Some(now_ms() + after.min(ENDPOINT_HOLD_MAX).as_millis() as u64)
        }
        _ => None,
    };
    let again = record(app, &d, Some(result), next, may_wait).await;
    Attempted {
        success: health,
        again_ms: again,
        hold_until_ms,
    }
}

/// The next state after an attempt: final answers first, then the endpoint's backoff plugin
/// (if any; on failure the schedule is used instead), then the schedule.
async fn decide(
    app: &Arc<App>,
    ep: &EndpointConfig,
    backoff: Option<Result<Arc<crate::plugins::host::Loaded>, crate::plugins::PluginError>>,
    d: &Delivery,
    result: &deliver::AttemptResult,
    jitter: f64,
) -> Next {
    if let Some(next) = outcome::final_answer(result) {
        return next;
    }
    let now = now_ms();
    if let (Some(policy), Some(plugin)) = (&ep.backoff, backoff) {
        let info = AttemptInfo {
            endpoint: ep.name.clone(),
            event_type: d.event_type.clone(),
            attempt: d.round_attempts + 1,
            status: result.status,
            error: result.error.map(str::to_string),
            retry_after_ms: result.retry_after.map(|r| r.as_millis() as u64),
        };
        let (app2, policy2) = (app.clone(), policy.clone());
        let decision = app
            .plugins
            .on_thread(move || {
                app2.plugins
                    .next_delay(&app2.metrics, &policy2, plugin, &info)
            })
            .await
            .unwrap_or_else(|e| {
                Err(crate::plugins::PluginError::NotLoaded(format!(
                    "{policy}: {e}"
                )))
            });
        match decision {
            Ok(BackoffDecision::RetryAfterMs(ms)) => {
                // A 429/503's Retry-After is the receiver's word: a plugin may wait longer,
                // never less.
                let floor = match (result.status, result.retry_after) {
                    (Some(429 | 503), Some(after)) => after.as_millis() as u64,
                    // An attempt that sent nothing (a failing transform, a refused address)
                    // counts toward no circuit breaker, so nothing else slows its retries: a
                    // plugin answering 0 would loop, a plugin call and a commit each turn.
                    _ if !result.measured => UNSENT_RETRY_FLOOR.as_millis() as u64,
                    _ => 0,
                };
                let ms = ms.max(floor);
                return Next::Retry {
                    due_ms: now + ms.min(outcome::MAX_RETRY_AFTER.as_millis() as u64),
                    error: Some(outcome::describe_failure(result)),
                };
            }
            Ok(BackoffDecision::GiveUp(reason)) => {
                return Next::Dead {
                    reason: format!("{reason}; last: {}", outcome::describe_failure(result)),
                };
            }
            Err(e) => {
                tracing::warn!(endpoint = %ep.name, error = %e, "backoff plugin failed; using the schedule");
                return outcome::fallback(result, d.round_attempts, &ep.schedule, jitter, now);
            }
        }
    }
    outcome::scheduled(result, d.round_attempts, &ep.schedule, jitter, now)
}

/// Records an attempt's outcome (`result`: what the attempt got, `None` for a decision made
/// without one) and only then logs and counts it, as what the store made of it: an attempt
/// that ended after its delivery was dropped or replayed decided nothing, and is told so.
/// Returns when the delivery is due again if it is a retry.
async fn record(
    app: &App,
    d: &Delivery,
    result: Option<deliver::AttemptResult>,
    next: Next,
    may_wait: bool,
) -> Option<u64> {
    let outcome_label = match &next {
        Next::Delivered => "delivered",
        Next::Retry { .. } => "retry",
        Next::Dead { .. } => "dead",
        Next::Dropped { .. } => "dropped",
    };
    // What the log line and the metrics need of the attempt, once its outcome is on disk
    // (its response excerpt goes to the store).
    let seen = result.as_ref().map(|r| deliver::AttemptResult {
        error_detail: r.error_detail.clone(),
        body_excerpt: String::new(),
        ..*r
    });
    let measured = result.as_ref().is_some_and(|r| r.measured);
    let counts = result.is_some();
    let attempt = match result {
        Some(r) => Attempt {
            number: 0,
            started_ms: r.started_ms,
            duration_ms: r.duration_ms,
            status_code: r.status,
            error: r.error.map(str::to_string),
            error_detail: r.error_detail,
            response_body: r.body_excerpt,
            outcome: outcome_label.into(),
        },
        None => Attempt {
            number: 0,
            started_ms: now_ms(),
            duration_ms: 0,
            status_code: None,
            error: None,
            error_detail: None,
            response_body: String::new(),
            outcome: outcome_label.into(),
        },
    };
    let again = match &next {
        Next::Retry { due_ms, .. } => Some(*due_ms),
        _ => None,
    };
    let rec = OutcomeRecord {
        delivery_id: d.id.clone(),
        read_updated_ms: Some(d.updated_ms),
        attempt,
        counts_as_attempt: counts,
        measured,
        next: next.clone(),
        may_wait,
    };
    let recorded = app.store.record_outcome(rec).await;
    if let Some(r) = &seen {
        // An outcome that could not be recorded is told as the attempt went: the error
        // below says it will be attempted again.
        let decided = recorded.as_ref().copied().unwrap_or(Decided::Yes);
        observe::attempt(
            &app.metrics,
            &d.endpoint,
            &d.id,
            d.attempts + 1,
            r,
            &next,
            decided,
        );
    }
    match recorded {
        Ok(decided) => {
            app.scheduler
                .store_failures
                .store(0, AtomicOrdering::Relaxed);
            if outcome_label != "retry" && decided == Decided::Yes {
                observe::finished(&app.metrics, &d.endpoint, outcome_label, 1);
            }
            again
        }
        Err(e) => {
            // The delivery stays pending at its old due time, so it is attempted again.
            tracing::error!(delivery = %d.id, error = %e, "cannot record attempt outcome; the delivery will be attempted again after a pause");
            Some(hold_back(app, d.next_due_ms).await)
        }
    }
}

/// Holds a delivery whose attempt could not be recorded (or whose event could not be read)
/// in flight for a pause: 1 s, doubling with each such failure in a row up to a minute, cut
/// short by shutdown. Returns its due time, to which the worker's scan goes back.
async fn hold_back(app: &App, due: Option<u64>) -> u64 {
    let streak = app
        .scheduler
        .store_failures
        .fetch_add(1, AtomicOrdering::Relaxed)
        .min(6);
    let pause = Duration::from_secs(1u64 << streak).min(Duration::from_secs(60));
    tokio::select! {
        _ = tokio::time::sleep(pause) => {}
        _ = app.shutdown.cancelled() => {}
    }
    due.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver that answers 200 and notes when each request came.
    async fn receiver() -> (String, Arc<Mutex<Vec<std::time::Instant>>>) {
        let seen: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
        let seen2 = seen.clone();
        let app = axum::Router::new().fallback(move || {
            let seen = seen2.clone();
            async move {
                seen.lock().unwrap().push(std::time::Instant::now());
                "ok"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, seen)
    }

    /// courier on a temporary data dir with one endpoint, `app`, at `url`.
    async fn start_with_app(url: &str) -> (tempfile::TempDir, crate::server::Running) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[keys]]\ntoken = \"test-token-0123456789\"\nscopes = [\"ingest\", \"admin\"]\n[delivery]\nallow_private_networks = true\n[[endpoints]]\nname = \"app\"\nurl = \"{url}\"\n",
            dir.path().join("data").display()
        );
        let config = crate::config::Config::parse(&text, dir.path(), None, "test.toml").unwrap();
        let running = crate::server::start(config).await.unwrap();
        (dir, running)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outcome_the_store_cannot_record_holds_the_delivery_back_instead_of_resending_at_once()
     {
        let (url, seen) = receiver().await;
        let (_dir, running) = start_with_app(&url).await;
        // The first two outcomes fail as on a full disk; the third is recorded.
        running.app.store.fail_next_outcomes(2);
        let body = reqwest::Client::new()
            .post(format!("http://{}/v1/events", running.addr))
            .bearer_auth("test-token-0123456789")
            .header("content-type", "application/json")
            .body(r#"{"event_type": "t", "payload": {}}"#)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let id = reply["deliveries"][0]["id"].as_str().unwrap().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            running.app.store.settle().await.unwrap();
            let d = running.app.store.delivery(&id).unwrap().expect("stored");
            if d.status == crate::model::DeliveryStatus::Delivered {
                assert_eq!(
                    d.attempts, 1,
                    "only the recorded attempt is in the audit trail"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never delivered: {d:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let times = seen.lock().unwrap().clone();
        assert_eq!(
            times.len(),
            3,
            "sent once per failed record, then once more"
        );
        // Held back 1 s, then 2 s: not resent in a tight loop.
        assert!(
            times[1] - times[0] >= Duration::from_millis(900),
            "{times:?}"
        );
        assert!(
            times[2] - times[1] >= Duration::from_millis(1900),
            "{times:?}"
        );
        // Delivered once, as the metrics say too (the unrecorded outcomes are not counted).
        let metrics = running.app.metrics.encode();
        assert!(
            metrics
                .lines()
                .any(|l| l
                    == "courier_deliveries_final_total{endpoint=\"app\",state=\"delivered\"} 1"),
            "{metrics}"
        );
        running.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pending_delivery_nobody_announced_is_found_by_the_sweep() {
        let (url, seen) = receiver().await;
        let (_dir, running) = start_with_app(&url).await;
        // What an ingest whose producer hung up mid-commit leaves: the event is stored, and
        // nobody told the endpoint's (idle) worker.
        let mut batch = crate::store::tests::batch("k", now_ms());
        batch.deliveries[0].endpoint = "app".into();
        batch.idempotency = None;
        running.app.store.append(batch).await.unwrap();
        assert_eq!(running.app.scheduler.workers(), 0, "no worker was started");
        let started = std::time::Instant::now();
        while seen.lock().unwrap().is_empty() {
            assert!(
                started.elapsed() < SWEEP_INTERVAL * 4,
                "the delivery was never attempted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        running.shutdown().await;
    }

    #[test]
    fn bucket_paces_tokens() {
        let mut b = Bucket::new(10.0, 0);
        assert_eq!(b.available(0), 10);
        for _ in 0..10 {
            b.take();
        }
        assert_eq!(b.available(0), 0);
        assert_eq!(b.next_token_ms(), 100);
        assert_eq!(b.available(100), 1);
        assert_eq!(b.available(10_000), 10);
        let mut slow = Bucket::new(0.5, 0);
        assert_eq!(slow.available(0), 1);
        slow.take();
        assert_eq!(slow.next_token_ms(), 2000);
    }
}
