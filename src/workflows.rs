//! Workflows: async requests whose result is delivered by webhook, optionally followed by a
//! callback from the customer's backend, with every state change broadcast to WebSocket
//! subscribers.
//!
//! A workflow run is a durable **channel** (see [`crate::model::Channel`]). Everything that
//! happens later is a durable **timer** in the store: the upstream call (due at once), the
//! callback timeout, the simulated callback. A timer is removed in the same transaction that
//! records its effect, so after a crash it fires again (the upstream call is retried) and a
//! fired timer never fires twice. Every change is made against the channel version that was
//! read, so a callback and a timeout racing each other cannot both win.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::app::App;
use crate::config::WorkflowConfig;
use crate::hub::Published;
use crate::model::{
    Channel, ChannelMessage, ChannelState, Delivery, DeliveryStatus, Event, TimerKind, new_id,
    now_ms,
};
use crate::store::{AdvanceResult, AppendBatch, ChannelChange, StoreError};
use crate::{observe, outcome};

/// Why a workflow request or callback was refused.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error("unknown workflow `{0}`")]
    UnknownWorkflow(String),
    #[error("no channel `{0}`")]
    NotFound(String),
    #[error("channel `{0}` already completed")]
    AlreadyCompleted(String),
    #[error("channel `{0}` is not waiting for a callback (status {1})")]
    NotWaiting(String, &'static str),
    #[error("channel `{0}` timed out waiting for its callback")]
    TimedOut(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The workflow engine's in-memory part: the timer loop's wake-up, the channels whose
/// timers are being handled right now and each workflow's upstream slots.
#[derive(Default)]
pub struct Workflows {
    wake: Notify,
    busy: Mutex<HashSet<String>>,
    /// How many timers are being handled: upstream calls per workflow, and the others.
    firing: Mutex<Firing>,
    upstream: std::sync::OnceLock<reqwest::Client>,
    /// Per workflow: the `upstream.max_in_flight` its semaphore was made for, and the
    /// semaphore. A reload that changes the limit makes a new one; calls holding slots of
    /// the old one finish on it.
    slots: Mutex<HashMap<String, (usize, Arc<Semaphore>)>>,
}

#[derive(Default)]
struct Firing {
    upstream: HashMap<String, usize>,
    other: usize,
}

/// The most callback timeouts and simulations handled at once (a simulation runs a plugin),
/// so that a burst of them neither spawns a task per channel nor makes every scan of the
/// timers skip past thousands of busy ones. Upstream calls are counted per workflow instead,
/// up to its `max_in_flight`: a workflow's calls beyond that stay in its queue in the store,
/// so a backed-up upstream holds back only its own workflow.
const MAX_FIRING: usize = 1024;

/// The longest the timer loop sleeps without looking at the store.
const MAX_SLEEP: Duration = Duration::from_secs(5);

impl Workflows {
    /// Makes the timer loop look again (a reload may have added a workflow back or raised
    /// its `max_in_flight`).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn upstream_client(&self) -> &reqwest::Client {
        // The upstream is the operator's own service (configured, not customer-supplied), so
        // the SSRF guard does not apply; redirects are still not followed.
        self.upstream.get_or_init(|| {
            reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("courier/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("upstream client")
        })
    }

    /// Waits for one of `wf`'s upstream slots; `None` if courier is shutting down first.
    async fn upstream_slot(
        &self,
        wf: &WorkflowConfig,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut slots = self.slots.lock().expect("slots");
            match slots.get(&wf.name) {
                Some((n, sem)) if *n == wf.upstream_max_in_flight => sem.clone(),
                _ => {
                    let sem = Arc::new(Semaphore::new(wf.upstream_max_in_flight));
                    slots.insert(wf.name.clone(), (wf.upstream_max_in_flight, sem.clone()));
                    sem
                }
            }
        };
        tokio::select! {
            permit = sem.acquire_owned() => Some(permit.expect("slots are never closed")),
            _ = shutdown.cancelled() => None,
        }
    }
}

/// Warns of upstream calls waiting for a workflow that is not configured (removed or renamed
/// by a reload, or missing from the file courier started with): they are neither failed nor
/// made until a workflow of that name is configured again.
pub fn warn_unconfigured(app: &App) {
    const CAP: u64 = 10_000;
    let config = app.config.load();
    match app
        .store
        .upstream_queues(CAP, |w| config.workflow(w).is_none())
    {
        Ok(queues) => {
            for (workflow, n) in queues {
                if config.workflow(&workflow).is_none() {
                    let calls = if n >= CAP {
                        format!("{CAP} or more")
                    } else {
                        n.to_string()
                    };
                    tracing::warn!(workflow = %workflow, calls = %calls, "upstream calls wait for a workflow that is not configured; they are made once it is configured again");
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot read the workflows' upstream queues"),
    }
}

/// Starts the timer loop.
pub fn start(app: &Arc<App>) {
    warn_unconfigured(app);
    let app2 = app.clone();
    app.tasks.spawn(async move { timer_loop(app2).await });
}

async fn timer_loop(app: Arc<App>) {
    loop {
        if app.shutdown.is_cancelled() {
            return;
        }
        let skip = app.workflows.busy.lock().expect("busy").clone();
        let now = now_ms();
        let mut next: Option<u64> = None;
        let mut soonest = |at: Option<u64>| {
            if let Some(at) = at {
                next = Some(next.map_or(at, |n: u64| n.min(at)));
            }
        };
        // Callback timeouts and simulations, up to the cap (at the cap, a finishing timer
        // wakes the loop).
        let other = app.workflows.firing.lock().expect("firing").other;
        let room = MAX_FIRING.saturating_sub(other).min(64);
        if room > 0 {
            match app.store.due_timers(now, room, &skip) {
                Ok((due, at)) => {
                    soonest(at);
                    for (_, id, kind) in due {
                        spawn_fire(&app, id, kind, None);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read workflow timers; retrying in 1s");
                    soonest(Some(now + 1000));
                }
            }
        }
        // Each configured workflow's upstream calls, as many as it has free slots. A
        // workflow removed by a reload keeps its queue until it comes back.
        let config = app.config.load_full();
        for wf in &config.workflows {
            let firing = app
                .workflows
                .firing
                .lock()
                .expect("firing")
                .upstream
                .get(&wf.name)
                .copied()
                .unwrap_or(0);
            let room = wf.upstream_max_in_flight.saturating_sub(firing).min(64);
            if room == 0 {
                continue;
            }
            match app.store.due_upstream_calls(&wf.name, now, room, &skip) {
                Ok((due, at)) => {
                    soonest(at);
                    for (_, id, kind) in due {
                        spawn_fire(&app, id, kind, Some(&wf.name));
                    }
                }
                Err(e) => {
                    tracing::error!(workflow = %wf.name, error = %e, "cannot read workflow upstream calls; retrying in 1s");
                    soonest(Some(now + 1000));
                }
            }
        }
        // Never long: a wake-up lost to a request abandoned at the wrong moment, or a
        // workflow's calls held back for any other reason, wait seconds, not an hour.
        let sleep = next.map_or(MAX_SLEEP, |at| {
            Duration::from_millis(at.saturating_sub(now_ms())).min(MAX_SLEEP)
        });
        tokio::select! {
            _ = app.workflows.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
            _ = app.shutdown.cancelled() => return,
        }
    }
}

/// Handles one due timer on a task of its own, counted against its workflow's upstream slots
/// (`workflow`) or the cap on the other timers, unless the channel is already being handled.
fn spawn_fire(app: &Arc<App>, id: String, kind: TimerKind, workflow: Option<&str>) {
    if !app.workflows.busy.lock().expect("busy").insert(id.clone()) {
        return;
    }
    let workflow = workflow.map(str::to_string);
    {
        let mut firing = app.workflows.firing.lock().expect("firing");
        match &workflow {
            Some(w) => *firing.upstream.entry(w.clone()).or_default() += 1,
            None => firing.other += 1,
        }
    }
    let done = Fired {
        app: app.clone(),
        id,
        workflow,
    };
    app.tasks.spawn(async move {
        fire(&done.app, &done.id, kind).await;
        drop(done);
    });
}

/// A timer being handled. Dropped when its task ends, however it ends (a panic included),
/// it gives back the channel and the slot and wakes the loop: a slot kept by a task that
/// died would stop its workflow's queue for good.
struct Fired {
    app: Arc<App>,
    id: String,
    workflow: Option<String>,
}

impl Drop for Fired {
    fn drop(&mut self) {
        let w = &self.app.workflows;
        if let Ok(mut firing) = w.firing.lock() {
            match &self.workflow {
                Some(name) => {
                    if let Some(n) = firing.upstream.get_mut(name) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            firing.upstream.remove(name);
                        }
                    }
                }
                None => firing.other = firing.other.saturating_sub(1),
            }
        }
        if let Ok(mut busy) = w.busy.lock() {
            busy.remove(&self.id);
        }
        w.wake.notify_one();
    }
}

/// Accepts an async request: stores the channel with its upstream timer; answers once durable.
pub async fn open(
    app: &Arc<App>,
    workflow: &str,
    request: String,
) -> Result<Channel, WorkflowError> {
    let config = app.config.load();
    let wf = config
        .workflow(workflow)
        .ok_or_else(|| WorkflowError::UnknownWorkflow(workflow.to_string()))?;
    let now = now_ms();
    let id = uuid_v4();
    let pending = json!({"channel_id": id, "status": "pending", "workflow": wf.name});
    let channel = Channel {
        id: id.clone(),
        workflow: wf.name.clone(),
        state: ChannelState::Pending,
        version: 1,
        request,
        ai_response: None,
        history: vec![ChannelMessage {
            at_ms: now,
            message: pending.to_string(),
        }],
        timers: vec![(now, TimerKind::Upstream)],
        created_ms: now,
        updated_ms: now,
        delivery_ids: Vec::new(),
    };
    match app
        .store
        .channel_change(ChannelChange {
            channel: channel.clone(),
            expect_version: None,
            append: None,
        })
        .await?
    {
        AdvanceResult::Applied => {}
        other => {
            return Err(WorkflowError::Invalid(format!(
                "channel id collision: {other:?}"
            )));
        }
    }
    app.metrics
        .workflow_requests
        .get_or_create(&vec![("workflow", wf.name.clone())])
        .inc();
    tracing::info!(channel = %id, workflow = %wf.name, "async request accepted");
    app.workflows.wake.notify_one();
    Ok(channel)
}

/// A JSON object's members in the order written, each value exactly as written; a key
/// given twice is an error (also how the API refuses duplicate keys in any JSON body).
pub(crate) struct Members(Vec<(String, Box<serde_json::value::RawValue>)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Members, A::Error> {
                let mut members: Vec<(String, Box<serde_json::value::RawValue>)> = Vec::new();
                let mut seen = std::collections::HashSet::new();
                while let Some((k, v)) =
                    m.next_entry::<String, Box<serde_json::value::RawValue>>()?
                {
                    // A key given twice is refused, as on every other route.
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate field `{k}`")));
                    }
                    members.push((k, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// Splits an async request into its `workflow` and the body the upstream receives: the
/// request minus `workflow`, everything else as the client wrote it — members in their
/// order, numbers to the last digit (a round trip through a JSON value would sort the keys
/// and round large numbers).
pub fn split_request(bytes: &[u8]) -> Result<(String, String), WorkflowError> {
    let Members(members) = serde_json::from_slice(bytes).map_err(|e| {
        WorkflowError::Invalid(format!(
            "the request must be a JSON object with a `workflow`: {e}"
        ))
    })?;
    let mut workflow = None;
    let mut request = String::with_capacity(bytes.len());
    request.push('{');
    for (k, v) in &members {
        if k == "workflow" {
            workflow = serde_json::from_str::<String>(v.get()).ok();
            continue;
        }
        if request.len() > 1 {
            request.push(',');
        }
        request.push_str(&serde_json::to_string(k).expect("a string serializes"));
        request.push(':');
        request.push_str(v.get());
    }
    request.push('}');
    let workflow = workflow.ok_or_else(|| {
        WorkflowError::Invalid("workflow: required (a [[workflows]] name)".into())
    })?;
    Ok((workflow, request))
}

/// A random (version 4) UUID, as the channel id.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

async fn fire(app: &Arc<App>, id: &str, kind: TimerKind) {
    let ch = match app.store.channel(id) {
        Ok(Some(ch)) => ch,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(channel = id, error = %e, "cannot load channel; retrying in 1s");
            // Its timer stays due: without a pause the loop would read it again at once.
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        }
    };
    if !is_due(&ch, kind) {
        return;
    }
    // An upstream call first waits for a slot of its workflow's, before the config is read:
    // one that waited a long time runs with the workflow as it is then.
    let waits = kind == TimerKind::Upstream && ch.state == ChannelState::Pending;
    let _slot = match waits
        .then(|| app.config.load().workflow(&ch.workflow).cloned())
        .flatten()
    {
        Some(wf) => match app.workflows.upstream_slot(&wf, &app.shutdown).await {
            Some(slot) => Some(slot),
            None => return,
        },
        None => None,
    };
    let config = app.config.load_full();
    let Some(wf) = config.workflow(&ch.workflow).cloned() else {
        // The workflow is gone from the configuration (a reload, perhaps one step of a
        // rename): its channels are not failed for it, as an endpoint's queue is not. A
        // callback's deadline still holds; a simulation no longer applies; an upstream call
        // waits for the workflow to come back.
        let outcome = match kind {
            TimerKind::CallbackTimeout if ch.state == ChannelState::AwaitingCallback => {
                time_out(app, ch).await
            }
            TimerKind::Upstream if ch.state == ChannelState::Pending => {
                tracing::warn!(channel = %ch.id, workflow = %ch.workflow, "the channel's workflow is not configured; its upstream call waits for it");
                let mut next = ch.clone();
                for t in next.timers.iter_mut().filter(|(_, k)| *k == kind) {
                    t.0 = now_ms() + WORKFLOW_GONE_RETRY.as_millis() as u64;
                }
                advance(app, &ch, next, None).await
            }
            _ => {
                let mut next = ch.clone();
                next.timers.retain(|(_, k)| *k != kind);
                advance(app, &ch, next, None).await
            }
        };
        if let Advanced::Failed(_) = outcome {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        return;
    };
    let outcome = match kind {
        TimerKind::Upstream if ch.state == ChannelState::Pending => {
            run_upstream(app, ch, &wf).await
        }
        TimerKind::CallbackTimeout if ch.state == ChannelState::AwaitingCallback => {
            time_out(app, ch).await
        }
        // The simulator may have been removed by a reload since the timer was set: then the
        // timer no longer applies, and the callback timeout decides.
        // A simulation plays a callback, so past the channel's deadline it is too late, as
        // a real callback would be (after a restart, say, both timers are due).
        TimerKind::Simulate
            if ch.state == ChannelState::AwaitingCallback
                && is_due(&ch, TimerKind::CallbackTimeout) =>
        {
            time_out(app, ch).await
        }
        TimerKind::Simulate
            if ch.state == ChannelState::AwaitingCallback && wf.simulate.is_some() =>
        {
            simulate(app, ch, &wf).await
        }
        _ => {
            // A timer that no longer applies (state moved on): drop it.
            let mut next = ch.clone();
            next.timers.retain(|(_, k)| *k != kind);
            advance(app, &ch, next, None).await
        }
    };
    if let Advanced::Failed(_) = outcome {
        // The store could not record the change (already logged); the timer stays due, so
        // it is tried again, but not in a tight loop against a failing store.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What committing a channel change came to.
#[derive(Debug)]
enum Advanced {
    /// Committed (and, from `publish_change`, published).
    Applied,
    /// The channel moved on first (another timer, callback or simulation won the race).
    Stale,
    /// The store could not record it; nothing changed.
    Failed(StoreError),
}

/// What the upstream call produced.
struct UpstreamResult {
    data: Result<Value, String>,
    status: Option<u16>,
    duration_ms: u64,
    tries: u32,
}

/// Calls the upstream (with its retries); `None` if courier began shutting down first: the
/// call is given up, and its timer, still due, makes it again after the restart.
async fn call_upstream(app: &App, wf: &WorkflowConfig, request: &str) -> Option<UpstreamResult> {
    tokio::select! {
        r = call_upstream_tries(app, wf, request) => Some(r),
        _ = app.shutdown.cancelled() => None,
    }
}

async fn call_upstream_tries(app: &App, wf: &WorkflowConfig, request: &str) -> UpstreamResult {
    let started = Instant::now();
    let client = app.workflows.upstream_client();
    let mut tries = 0;
    loop {
        tries += 1;
        let mut req = client
            .post(wf.upstream_url.clone())
            .timeout(wf.upstream_timeout)
            .header("content-type", "application/json")
            .body(request.to_string());
        for (k, v) in &wf.upstream_headers {
            req = req.header(k, v);
        }
        let mut wait = wf.upstream_retry_delay;
        let (retryable, result, status) = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                // A rate-limited or overloaded upstream says when to come back: no sooner
                // than that (within reason), never sooner than `retry_delay`.
                if let Some(after) = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(crate::deliver::parse_retry_after)
                {
                    wait = wait.max(after.min(MAX_UPSTREAM_RETRY_AFTER));
                }
                match read_capped(resp, wf.upstream_max_response).await {
                    // Asking again would get the same answer: the channel fails now.
                    Err(Body::TooLarge) => (
                        false,
                        Err(format!(
                            "upstream answered {status} with a body over upstream.max_response ({} bytes)",
                            wf.upstream_max_response
                        )),
                        Some(status),
                    ),
                    Ok(bytes) if (200..300).contains(&status) => {
                        let data = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                            Value::String(String::from_utf8_lossy(&bytes).into_owned())
                        });
                        (false, Ok(data), Some(status))
                    }
                    Ok(bytes) => {
                        let excerpt: String =
                            String::from_utf8_lossy(&bytes).chars().take(512).collect();
                        (
                            status >= 500 || status == 429,
                            Err(format!("upstream answered {status}: {excerpt}")),
                            Some(status),
                        )
                    }
                    Err(Body::Read(e)) => (
                        true,
                        Err(format!("upstream body: {}", e.without_url())),
                        Some(status),
                    ),
                }
            }
            // Without the URL: the error goes to the channel's subscribers (ingest clients)
            // and the customer's endpoint, and the upstream URL's query may hold a key.
            Err(e) => (
                e.is_connect() || e.is_timeout() || e.is_request(),
                Err(format!(
                    "upstream {}: {}",
                    crate::deliver::client::classify(&e),
                    crate::deliver::client::describe(&e.without_url())
                )),
                None,
            ),
        };
        if result.is_ok() || !retryable || tries > wf.upstream_retries {
            return UpstreamResult {
                data: result,
                status,
                duration_ms: started.elapsed().as_millis() as u64,
                tries,
            };
        }
        tokio::time::sleep(wait).await;
    }
}

/// Why an upstream answer's body was not read.
enum Body {
    TooLarge,
    Read(reqwest::Error),
}

/// Reads a body of at most `cap` bytes. It stops at the first chunk past the cap, whether
/// or not a `content-length` said so beforehand, so an endless answer costs no more memory
/// than an allowed one.
async fn read_capped(mut resp: reqwest::Response, cap: u64) -> Result<Vec<u8>, Body> {
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(Body::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(Body::Read)? {
        if (body.len() + chunk.len()) as u64 > cap {
            return Err(Body::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// How often a channel whose workflow is not configured looks for it again.
const WORKFLOW_GONE_RETRY: Duration = Duration::from_secs(10);

/// The longest an upstream's `Retry-After` holds a channel before its next try.
const MAX_UPSTREAM_RETRY_AFTER: Duration = Duration::from_secs(60);

async fn run_upstream(app: &Arc<App>, ch: Channel, wf: &WorkflowConfig) -> Advanced {
    let Some(r) = call_upstream(app, wf, &ch.request).await else {
        tracing::info!(channel = %ch.id, "upstream call given up for shutdown; it is made again after the restart");
        return Advanced::Stale;
    };
    let meta = json!({
        "workflow": wf.name,
        "duration_ms": r.duration_ms,
        "upstream_status": r.status,
        "attempts": r.tries,
    });
    let now = now_ms();
    match r.data {
        Err(error) => {
            tracing::warn!(channel = %ch.id, workflow = %wf.name, error, "upstream failed");
            app.metrics
                .workflow_upstream
                .get_or_create(&vec![
                    ("workflow", wf.name.clone()),
                    ("result", "error".into()),
                ])
                .inc();
            let msg = json!({"channel_id": ch.id, "status": "error", "data": Value::Null, "error": error, "meta": meta});
            let webhook = webhook(app, wf, &ch.id, "ai.failed", &msg);
            finish(app, ch, ChannelState::Failed, msg, webhook).await
        }
        Ok(data) => {
            app.metrics
                .workflow_upstream
                .get_or_create(&vec![
                    ("workflow", wf.name.clone()),
                    ("result", "ok".into()),
                ])
                .inc();
            match &wf.event_name {
                None => {
                    let msg = json!({"channel_id": ch.id, "status": "success", "data": data, "meta": meta});
                    let webhook = webhook(app, wf, &ch.id, "ai.completed", &msg);
                    // The answer is in the final message: nothing later needs it apart.
                    finish(app, ch, ChannelState::Succeeded, msg, webhook).await
                }
                Some(event) => {
                    let public = app.config.load().server.public_url.clone();
                    let body = json!({
                        "type": "task.ai_generated",
                        "event": event,
                        "channel_id": ch.id,
                        "ai_response": data,
                        "callback_url": format!("{public}/v1/callback/{}", ch.id),
                        "callback_required": true,
                    });
                    let send_webhook = wf.simulate.is_none() || wf.simulate_webhook;
                    let hook = send_webhook
                        .then(|| webhook(app, wf, &ch.id, "task.ai_generated", &body))
                        .flatten();
                    let msg = json!({
                        "channel_id": ch.id,
                        "status": "ai_generated",
                        "event": event,
                        "ai_response": data,
                        "meta": meta,
                    });
                    let mut next = ch.clone();
                    next.state = ChannelState::AwaitingCallback;
                    next.ai_response = Some(data.to_string());
                    next.timers = vec![(
                        now + wf.callback_timeout.as_millis() as u64,
                        TimerKind::CallbackTimeout,
                    )];
                    if wf.simulate.is_some() {
                        next.timers.push((
                            now + wf.simulate_delay.as_millis() as u64,
                            TimerKind::Simulate,
                        ));
                    }
                    publish_change(app, &ch, next, msg, hook).await
                }
            }
        }
    }
}

/// Builds the webhook for a workflow message: a normal delivery (signed, retried, audited)
/// to the workflow's endpoint, carrying `mr-channel-id`.
fn webhook(
    app: &App,
    wf: &WorkflowConfig,
    channel: &str,
    event_type: &str,
    body: &Value,
) -> Option<AppendBatch> {
    let Some(ep) = app.endpoints.get(&wf.endpoint) else {
        tracing::error!(workflow = %wf.name, endpoint = %wf.endpoint, "workflow endpoint is not configured; no webhook sent");
        return None;
    };
    let now = now_ms();
    let event_id = new_id("evt");
    let delivery = Delivery {
        id: new_id("dlv"),
        event_id: event_id.clone(),
        endpoint: ep.name.clone(),
        event_type: event_type.to_string(),
        status: DeliveryStatus::Pending,
        attempts: 0,
        round_attempts: 0,
        next_due_ms: Some(now + outcome::first_delay(&ep.schedule).as_millis() as u64),
        created_ms: now,
        updated_ms: now,
        last_error: None,
    };
    Some(AppendBatch {
        event: Event {
            id: event_id,
            event_type: event_type.to_string(),
            content_type: "application/json".into(),
            payload: body.to_string().into_bytes(),
            created_ms: now,
            delivery_ids: vec![delivery.id.clone()],
            headers: vec![("mr-channel-id".into(), channel.to_string())],
        },
        deliveries: vec![delivery],
        idempotency: None,
        reply: Vec::new(),
        id_supplied: false,
    })
}

/// Ends a channel with a final message (and optionally a webhook).
async fn finish(
    app: &Arc<App>,
    ch: Channel,
    state: ChannelState,
    msg: Value,
    hook: Option<AppendBatch>,
) -> Advanced {
    let mut next = ch.clone();
    next.state = state;
    next.timers.clear();
    let done = publish_change(app, &ch, next, msg, hook).await;
    if let Advanced::Applied = done {
        app.metrics
            .workflow_channels
            .get_or_create(&vec![
                ("workflow", ch.workflow.clone()),
                ("status", final_label(state).into()),
            ])
            .inc();
    }
    done
}

/// Marks a stored history message whose `ai_response` is the channel's own: the answer is
/// kept once per channel, not once more in each message that carries it (the
/// `ai_generated` message and an event-driven channel's final one), since the channel is
/// rewritten whole at every step and an answer may be megabytes.
const AI_RESPONSE_REF: &str = "ai_response_is_the_channels";

/// `msg` as kept in `ch`'s history: without its `ai_response` when that is `ch`'s.
fn stored_message(ch: &Channel, mut msg: Value) -> String {
    if let (Some(own), Some(obj)) = (ch.ai_response.as_deref(), msg.as_object_mut())
        && let Some(carried) = obj.get("ai_response")
        && serde_json::from_str::<Value>(own).is_ok_and(|own| &own == carried)
    {
        obj.remove("ai_response");
        obj.insert(AI_RESPONSE_REF.into(), Value::Bool(true));
    }
    msg.to_string()
}

/// A history message as it was published (see [`stored_message`]).
pub fn message_text<'a>(ch: &Channel, m: &'a ChannelMessage) -> std::borrow::Cow<'a, str> {
    if !m.message.contains(AI_RESPONSE_REF) {
        return m.message.as_str().into();
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_str::<Value>(&m.message) else {
        return m.message.as_str().into();
    };
    if obj.remove(AI_RESPONSE_REF) == Some(Value::Bool(true)) {
        let own = ch
            .ai_response
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null);
        obj.insert("ai_response".into(), own);
    }
    Value::Object(obj).to_string().into()
}

fn final_label(state: ChannelState) -> &'static str {
    match state {
        ChannelState::Succeeded => "success",
        ChannelState::TimedOut => "callback_timeout",
        _ => "error",
    }
}

/// Commits `next` (appending `msg` to its history) against `ch`'s version, then publishes.
async fn publish_change(
    app: &Arc<App>,
    ch: &Channel,
    mut next: Channel,
    msg: Value,
    hook: Option<AppendBatch>,
) -> Advanced {
    let text = msg.to_string();
    next.history.push(ChannelMessage {
        at_ms: now_ms(),
        message: stored_message(&next, msg),
    });
    let seq = next.history.len() - 1;
    let last = next.state.is_final();
    let endpoint = hook.as_ref().map(|h| h.deliveries[0].endpoint.clone());
    if let Some(h) = &hook {
        next.delivery_ids.push(h.deliveries[0].id.clone());
    }
    let hook_event = hook
        .as_ref()
        .map(|h| (h.event.id.clone(), h.event.event_type.clone()));
    let done = advance(app, ch, next, hook).await;
    if !matches!(done, Advanced::Applied) {
        return done;
    }
    if let (Some(ep), Some((event_id, event_type))) = (endpoint, hook_event) {
        observe::ingested(&app.metrics, &event_id, &event_type, &[ep.as_str()]);
        crate::scheduler::Scheduler::wake(app, &ep);
    }
    app.hub.publish(
        &ch.id,
        Published {
            seq,
            text: text.into(),
            last,
        },
    );
    done
}

async fn advance(
    app: &App,
    ch: &Channel,
    mut next: Channel,
    hook: Option<AppendBatch>,
) -> Advanced {
    next.version = ch.version + 1;
    next.updated_ms = now_ms();
    match app
        .store
        .channel_change(ChannelChange {
            channel: next,
            expect_version: Some(ch.version),
            append: hook,
        })
        .await
    {
        Ok(AdvanceResult::Applied) => Advanced::Applied,
        Ok(_) => Advanced::Stale,
        Err(e) => {
            tracing::error!(channel = %ch.id, error = %e, "cannot record channel change");
            Advanced::Failed(e)
        }
    }
}

/// Whether `ch` has a timer of `kind` whose time has come.
fn is_due(ch: &Channel, kind: TimerKind) -> bool {
    let now = now_ms();
    ch.timers.iter().any(|(at, k)| *k == kind && *at <= now)
}

/// Ends a channel that waited for its callback past `callback_timeout`.
async fn time_out(app: &Arc<App>, ch: Channel) -> Advanced {
    tracing::warn!(channel = %ch.id, workflow = %ch.workflow, "no callback within callback_timeout");
    let msg = json!({"channel_id": ch.id, "status": "error", "error": "callback_timeout"});
    finish(app, ch, ChannelState::TimedOut, msg, None).await
}

/// A callback body is `{"data", "task_id"?, "metadata"?}`. Anything else is refused before
/// it can complete the channel: a mistaken body (`{"result": ...}`) would otherwise end it
/// for good with `data: null`, and the corrected one would find it completed.
fn check_callback(obj: &serde_json::Map<String, Value>) -> Result<(), WorkflowError> {
    let invalid = |m: String| Err(WorkflowError::Invalid(m));
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "data" | "task_id" | "metadata"))
    {
        return invalid(format!(
            "unknown field `{k}`: a callback body has `data`, and optionally `task_id` and `metadata`"
        ));
    }
    if !obj.contains_key("data") {
        return invalid("a callback body needs `data` (it may be null)".into());
    }
    if obj
        .get("task_id")
        .is_some_and(|t| !(t.is_string() || t.is_number() || t.is_null()))
    {
        return invalid("`task_id` must be a string or a number".into());
    }
    if obj
        .get("metadata")
        .is_some_and(|m| !(m.is_object() || m.is_null()))
    {
        return invalid("`metadata` must be an object".into());
    }
    Ok(())
}

/// The backend's callback: completes a channel that waits for one. Returns the state it
/// committed (the channel's id is `id`).
pub async fn callback(
    app: &Arc<App>,
    id: &str,
    body: Value,
) -> Result<ChannelState, WorkflowError> {
    let Value::Object(obj) = body else {
        return Err(WorkflowError::Invalid(
            "the callback body must be a JSON object".into(),
        ));
    };
    check_callback(&obj)?;
    loop {
        let ch = app
            .store
            .channel(id)?
            .ok_or_else(|| WorkflowError::NotFound(id.to_string()))?;
        match ch.state {
            // Past its deadline the channel has timed out, whether or not its timer has run
            // yet (it may be due this very moment, or courier was down when it fell due): the
            // timeout is recorded now and the callback is too late.
            ChannelState::AwaitingCallback if is_due(&ch, TimerKind::CallbackTimeout) => {
                match time_out(app, ch).await {
                    Advanced::Applied => return Err(WorkflowError::TimedOut(id.to_string())),
                    Advanced::Failed(e) => return Err(WorkflowError::Store(e)),
                    Advanced::Stale => continue,
                }
            }
            ChannelState::AwaitingCallback => {}
            ChannelState::TimedOut => return Err(WorkflowError::TimedOut(id.to_string())),
            ChannelState::Succeeded | ChannelState::Failed => {
                return Err(WorkflowError::AlreadyCompleted(id.to_string()));
            }
            ChannelState::Pending => {
                return Err(WorkflowError::NotWaiting(id.to_string(), ch.state.as_str()));
            }
        }
        match complete(app, &ch, &obj, false).await {
            // The answer is what was committed, not the channel read back: a read that
            // failed now would answer 503 for a callback that was applied (and its retry
            // would get 409).
            Advanced::Applied => return Ok(ChannelState::Succeeded),
            // The store could not record it: the caller gets a 503 and may call again.
            Advanced::Failed(e) => return Err(WorkflowError::Store(e)),
            // Lost a race (a timeout, the simulator or another callback): look again.
            Advanced::Stale => {}
        }
    }
}

/// Finishes a waiting channel with a callback body (real or simulated).
async fn complete(
    app: &Arc<App>,
    ch: &Channel,
    body: &serde_json::Map<String, Value>,
    simulated: bool,
) -> Advanced {
    let ai_response: Value = ch
        .ai_response
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let data = body.get("data").cloned().unwrap_or(Value::Null);
    let mut msg = json!({
        "channel_id": ch.id,
        "status": "success",
        "data": data,
        "ai_response": ai_response,
        "task_id": body.get("task_id").cloned().unwrap_or(Value::Null),
        "metadata": body.get("metadata").cloned().unwrap_or(Value::Null),
    });
    if simulated {
        msg["simulated"] = Value::Bool(true);
    }
    let mut next = ch.clone();
    next.state = ChannelState::Succeeded;
    next.timers.clear();
    let done = publish_change(app, ch, next, msg, None).await;
    if let Advanced::Applied = done {
        app.metrics
            .workflow_channels
            .get_or_create(&vec![
                ("workflow", ch.workflow.clone()),
                ("status", "success".into()),
            ])
            .inc();
        tracing::info!(channel = %ch.id, simulated, "channel completed by callback");
    }
    done
}

async fn simulate(app: &Arc<App>, ch: Channel, wf: &WorkflowConfig) -> Advanced {
    let Some(plugin) = wf.simulate.clone() else {
        return Advanced::Stale;
    };
    let ai_response: Value = ch
        .ai_response
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null);
    let public = app.config.load().server.public_url.clone();
    let message = json!({
        "type": "task.ai_generated",
        "event": wf.event_name,
        "channel_id": ch.id,
        "ai_response": ai_response,
        "callback_url": format!("{public}/v1/callback/{}", ch.id),
        "callback_required": true,
    })
    .to_string();
    let (app2, plugin_name) = (app.clone(), plugin.clone());
    let result = app
        .plugins
        .on_thread(move || app2.plugins.simulate(&app2.metrics, &plugin, &message))
        .await
        .unwrap_or_else(|e| Err(crate::plugins::PluginError::NotLoaded(e.to_string())));
    if is_due(&ch, TimerKind::CallbackTimeout) {
        // The plugin ran past the deadline: its answer comes too late.
        return time_out(app, ch).await;
    }
    // What it returns completes the channel as a real callback would, so it is held to what
    // a real callback is held to: the body limit, and the callback body's fields.
    let limit = app.config.load().server.max_body_bytes;
    let result = result.and_then(|text| {
        if text.len() > limit {
            Err(crate::plugins::PluginError::Call {
                plugin: plugin_name.clone(),
                class: "plugin_error",
                detail: format!(
                    "returned {} bytes; a callback body may have at most {limit} (server.max_body_bytes)",
                    text.len()
                ),
            })
        } else {
            Ok(text)
        }
    });
    // Why the simulation failed, if it did.
    let failed = match result.map(|text| serde_json::from_str::<Value>(&text)) {
        Ok(Ok(Value::Object(obj))) if obj.contains_key("data") => match check_callback(&obj) {
            Ok(()) => return complete(app, &ch, &obj, true).await,
            Err(e) => format!("simulator returned an invalid callback body: {e}"),
        },
        Ok(Ok(other)) => {
            let mut obj = serde_json::Map::new();
            obj.insert("data".into(), other);
            return complete(app, &ch, &obj, true).await;
        }
        Ok(Err(e)) => format!("simulator returned invalid JSON: {e}"),
        Err(e) => e.to_string(),
    };
    let msg = json!({"channel_id": ch.id, "status": "error", "error": format!("simulation_failed: {failed}")});
    finish(app, ch, ChannelState::Failed, msg, None).await
}

/// The channel as `GET /v1/channels/{id}` shows it.
pub fn view(ch: &Channel) -> Value {
    let history: Vec<Value> = ch
        .history
        .iter()
        .map(|m| {
            json!({
                "at": crate::model::rfc3339(m.at_ms),
                "message": serde_json::from_str::<Value>(&message_text(ch, m)).unwrap_or(Value::Null),
            })
        })
        .collect();
    json!({
        "channel_id": ch.id,
        "workflow": ch.workflow,
        "status": ch.state.as_str(),
        "final": ch.state.is_final(),
        "created_at": crate::model::rfc3339(ch.created_ms),
        "updated_at": crate::model::rfc3339(ch.updated_ms),
        "latest": history.last().map(|h| h["message"].clone()),
        "history": history,
        "deliveries": ch.delivery_ids,
    })
}
