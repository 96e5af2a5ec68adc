//! Observability: the Prometheus registry and the functions that emit, from one place, both
//! the log line and the metric for each thing that happens (an ingest, an attempt, a final
//! state). Keeping them together means a log and a dashboard can never disagree.

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::deliver::AttemptResult;
use crate::store::{Decided, Next, SUPERSEDED};

type Labels = Vec<(&'static str, String)>;

/// Every metric courier exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub events_ingested: Counter,
    pub events_unrouted: Counter,
    pub deliveries_created: Family<Labels, Counter>,
    pub ingest_rejected: Family<Labels, Counter>,
    pub attempts: Family<Labels, Counter>,
    pub attempt_duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub deliveries_final: Family<Labels, Counter>,
    pub replays: Counter,
    pub purged: Counter,
    pub queue_depth: Family<Labels, Gauge>,
    pub deliveries: Family<Labels, Gauge>,
    pub oldest_pending_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub circuit_open: Family<Labels, Gauge>,
    pub channel_subscribers: Gauge,
    pub config_reloads: Family<Labels, Counter>,
    pub plugin_calls: Family<Labels, Counter>,
    pub plugin_call_duration: Family<Labels, Histogram, fn() -> Histogram>,
    pub plugin_loads: Family<Labels, Counter>,
    pub workflow_requests: Family<Labels, Counter>,
    pub workflow_upstream: Family<Labels, Counter>,
    pub workflow_channels: Family<Labels, Counter>,
    /// Endpoints the per-endpoint gauges had series for at the last scrape: a deleted
    /// endpoint's series are removed, not left reading their last value for good.
    pub gauged_endpoints: Mutex<std::collections::HashSet<String>>,
    /// Endpoints gone since a scrape (deleted, or dropped from the config): their counter
    /// series are shown once more at their final values (a delete's drops included), then
    /// dropped at every scrape for [`GONE_SERIES_WATCH`] after, so that an attempt that was
    /// in flight as its endpoint went cannot bring a series back for good.
    gone_endpoints: Mutex<std::collections::HashMap<String, Gone>>,
    /// Scrapes are rendered one at a time (see [`Scrapes`]).
    pub scrapes: Scrapes,
}

/// One scrape's rendering at a time, and scrapes that arrive while one is being rendered
/// take its result instead of rendering again: `/metrics` takes no token, and with many
/// endpoints a rendering is megabytes of work, so concurrent scrapes must not multiply it.
/// A rendering runs as a task of its own, so a scraper that hangs up does not cut it short
/// (and make the next one start over). A scrape that arrives with none under way always
/// gets a fresh rendering.
#[derive(Default, Clone)]
pub struct Scrapes {
    /// The rendering under way, if any, with its number.
    under_way: Arc<Mutex<Option<(u64, Rendering)>>>,
    /// Renderings begun.
    begun: Arc<std::sync::atomic::AtomicU64>,
}

type Rendering = futures_util::future::Shared<
    std::pin::Pin<Box<dyn std::future::Future<Output = Arc<String>> + Send>>,
>;

impl Scrapes {
    /// The exposition for a scrape arriving now: the rendering under way when it arrived,
    /// if there is one, or one `render` makes for it.
    pub async fn get<F>(&self, render: F) -> Arc<String>
    where
        F: std::future::Future<Output = String> + Send + 'static,
    {
        use futures_util::FutureExt;
        let rendering = {
            let mut under_way = self.under_way.lock().expect("scrapes lock");
            match &*under_way {
                Some((_, r)) => r.clone(),
                None => {
                    let n = self.begun.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let slot = self.under_way.clone();
                    let task = tokio::spawn(async move {
                        let text = Arc::new(render.await);
                        // Done: the next scrape renders afresh.
                        let mut under_way = slot.lock().expect("scrapes lock");
                        if under_way.as_ref().is_some_and(|(m, _)| *m == n) {
                            *under_way = None;
                        }
                        text
                    });
                    let r: Rendering = async move { task.await.unwrap_or_default() }
                        .boxed()
                        .shared();
                    *under_way = Some((n, r.clone()));
                    r
                }
            }
        };
        rendering.await
    }
}

/// Where a gone endpoint's counter series are.
struct Gone {
    /// When a scrape last saw something of it waiting, or first showed its final values.
    since: std::time::Instant,
    /// Whether a scrape has shown its final values with nothing of it waiting.
    shown: bool,
}

/// How long a gone endpoint's series are watched for (longer than any attempt can run).
const GONE_SERIES_WATCH: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// The `outcome` labels of `courier_attempts_total` and the `state` labels of
/// `courier_deliveries_final_total`, for dropping an endpoint's series.
const ATTEMPT_OUTCOMES: [&str; 4] = ["delivered", "retry", "dead", SUPERSEDED];
const FINAL_STATES: [&str; 3] = ["delivered", "dead", "dropped"];

/// 1 ms to 131 s: past the default 30 s attempt timeout, so that attempts that time out
/// (and the longer timeouts an endpoint may set) land in a bucket of their own, not `+Inf`.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

/// 10 µs to 5.2 s: a plugin's call, including its wait for a free instance.
fn plugin_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            events_ingested: Counter::default(),
            events_unrouted: Counter::default(),
            deliveries_created: Family::default(),
            ingest_rejected: Family::default(),
            attempts: Family::default(),
            attempt_duration: Family::new_with_constructor(latency_histogram),
            deliveries_final: Family::default(),
            replays: Counter::default(),
            purged: Counter::default(),
            queue_depth: Family::default(),
            deliveries: Family::default(),
            oldest_pending_age: Gauge::default(),
            circuit_open: Family::default(),
            channel_subscribers: Gauge::default(),
            gauged_endpoints: Default::default(),
            gone_endpoints: Default::default(),
            scrapes: Default::default(),
            config_reloads: Family::default(),
            plugin_calls: Family::default(),
            plugin_call_duration: Family::new_with_constructor(plugin_histogram),
            plugin_loads: Family::default(),
            workflow_requests: Family::default(),
            workflow_upstream: Family::default(),
            workflow_channels: Family::default(),
        };
        {
            let mut r = m.registry.lock().expect("registry lock");
            r.register(
                "courier_events_ingested",
                "Events accepted and committed",
                m.events_ingested.clone(),
            );
            r.register(
                "courier_events_unrouted",
                "Events accepted that no endpoint subscribed to (stored, nothing to deliver)",
                m.events_unrouted.clone(),
            );
            r.register(
                "courier_deliveries_created",
                "Deliveries created by ingest, per endpoint",
                m.deliveries_created.clone(),
            );
            r.register(
                "courier_ingest_rejected",
                "Ingest requests rejected, per reason",
                m.ingest_rejected.clone(),
            );
            r.register(
                "courier_attempts",
                "Delivery attempts per endpoint and outcome (delivered, retry, dead, superseded)",
                m.attempts.clone(),
            );
            r.register(
                "courier_attempt_duration_seconds",
                "Attempt latency per endpoint",
                m.attempt_duration.clone(),
            );
            r.register(
                "courier_deliveries_final",
                "Deliveries that reached a final state, per endpoint and state",
                m.deliveries_final.clone(),
            );
            r.register(
                "courier_replays",
                "Deliveries requeued by replay",
                m.replays.clone(),
            );
            r.register(
                "courier_retention_purged",
                "Finished deliveries deleted by retention",
                m.purged.clone(),
            );
            r.register(
                "courier_queue_depth",
                "Pending deliveries per endpoint",
                m.queue_depth.clone(),
            );
            r.register(
                "courier_deliveries",
                "Stored deliveries per endpoint and status",
                m.deliveries.clone(),
            );
            r.register(
                "courier_oldest_pending_age_seconds",
                "Age of the oldest pending delivery",
                m.oldest_pending_age.clone(),
            );
            r.register(
                "courier_endpoint_circuit_open",
                "1 while an endpoint's circuit is open (failing), else 0",
                m.circuit_open.clone(),
            );
            r.register(
                "courier_channel_subscribers",
                "Open WebSocket subscriptions to workflow channels",
                m.channel_subscribers.clone(),
            );
            r.register(
                "courier_config_reloads",
                "Configuration reloads by result (ok, error)",
                m.config_reloads.clone(),
            );
            // Both series from the start, at 0: an alert on failed reloads has one to watch.
            for result in ["ok", "error"] {
                let _ = m
                    .config_reloads
                    .get_or_create(&vec![("result", result.to_string())]);
            }
            r.register(
                "courier_plugin_calls",
                "Plugin calls per plugin and result (ok, error)",
                m.plugin_calls.clone(),
            );
            r.register(
                "courier_plugin_call_duration_seconds",
                "Plugin call latency (instantiate + call) per plugin",
                m.plugin_call_duration.clone(),
            );
            r.register(
                "courier_plugin_loads",
                "Plugin file loads per plugin and result (ok, error)",
                m.plugin_loads.clone(),
            );
            r.register(
                "courier_workflow_requests",
                "Async requests accepted per workflow",
                m.workflow_requests.clone(),
            );
            r.register(
                "courier_workflow_upstream_calls",
                "Upstream calls per workflow and result (ok, error): one per channel's call, its retries included, with the last try's result",
                m.workflow_upstream.clone(),
            );
            r.register(
                "courier_workflow_channels_finished",
                "Channels that reached a final state, per workflow and status",
                m.workflow_channels.clone(),
            );
        }
        m
    }

    /// Registers the store's group-commit counters.
    pub fn register_store(&self, store: &crate::store::Store) {
        let c = store.commit_counters();
        let mut r = self.registry.lock().expect("registry lock");
        let replayed = Gauge::<i64>::default();
        replayed.set(store.replayed_on_open() as i64);
        r.register(
            "courier_store_journal_replayed_records",
            "Acknowledged events re-applied from the ingest journal when this process started (above 0: the last run did not stop cleanly)",
            replayed,
        );
        r.register(
            "courier_store_journal_writes",
            "Synchronous writes to the ingest journal, each making a batch of new events durable (events / writes = group-commit batch size at ingest)",
            c.journal_writes,
        );
        r.register(
            "courier_store_journal_stalled_seconds",
            "Seconds new events waited for the database to checkpoint the journal file about to be written over (ingest stood still: the database is behind)",
            c.journal_stalled,
        );
        r.register(
            "courier_store_commits",
            "Write transactions committed (journaled events applied without a flush; everything else flushed by the database)",
            c.commits,
        );
        r.register(
            "courier_store_durable_commits",
            "Commits flushed to the database file (checkpoints of the ingest journal)",
            c.durable,
        );
        r.register(
            "courier_store_journal_write_errors",
            "Writes to the ingest journal that failed (a full or failing disk); each refused its batch of new events with 503",
            c.journal_errors,
        );
        r.register(
            "courier_store_damaged_records",
            "Distinct delivery records found unreadable (damaged) since start and passed over by the delivery queue, a listing or a replay; each is logged once and stays as it is for an operator (a damaged pending delivery still counts in queue_depth)",
            c.damaged,
        );
        r.register(
            "courier_store_commands",
            "Changes carried by those transactions (each new event counts one)",
            c.commands,
        );
    }

    /// Drops the per-endpoint counter series (deliveries created, attempts, their latency,
    /// final states) of endpoints that are gone: `departed` names left the registry since
    /// the last scrape; `exists` says whether a name is an endpoint (again) now, `waiting`
    /// whether deliveries of it are still pending (their series stay while they do).
    pub fn forget_gone_endpoints(
        &self,
        departed: impl IntoIterator<Item = String>,
        exists: impl Fn(&str) -> bool,
        waiting: impl Fn(&str) -> bool,
    ) {
        let now = std::time::Instant::now();
        let mut gone = self.gone_endpoints.lock().expect("gone endpoints");
        for name in departed {
            gone.entry(name).or_insert(Gone {
                since: now,
                shown: false,
            });
        }
        gone.retain(|name, g| {
            if exists(name) {
                return false;
            }
            if waiting(name) || !g.shown {
                // This scrape shows the series as they are (the last time, once nothing
                // waits): a delete's drops are counted the moment it answers, and would
                // otherwise be removed before any scrape saw them.
                g.since = now;
                g.shown = !waiting(name);
                return true;
            }
            let ep = || ("endpoint", name.clone());
            self.deliveries_created.remove(&vec![ep()]);
            self.attempt_duration.remove(&vec![ep()]);
            for o in ATTEMPT_OUTCOMES {
                self.attempts
                    .remove(&vec![ep(), ("outcome", o.to_string())]);
            }
            for s in FINAL_STATES {
                self.deliveries_final
                    .remove(&vec![ep(), ("state", s.to_string())]);
            }
            now.duration_since(g.since) < GONE_SERIES_WATCH
        });
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let r = self.registry.lock().expect("registry lock");
        prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String");
        out
    }
}

/// An event was committed with `deliveries` deliveries.
pub fn ingested(m: &Metrics, event_id: &str, event_type: &str, endpoints: &[&str]) {
    m.events_ingested.inc();
    if endpoints.is_empty() {
        m.events_unrouted.inc();
    }
    for e in endpoints {
        m.deliveries_created
            .get_or_create(&vec![("endpoint", e.to_string())])
            .inc();
    }
    tracing::debug!(
        event = event_id,
        event_type,
        deliveries = endpoints.len(),
        "event accepted"
    );
}

/// An ingest request was refused.
pub fn ingest_rejected(m: &Metrics, reason: &'static str) {
    m.ingest_rejected
        .get_or_create(&vec![("reason", reason.to_string())])
        .inc();
}

/// One attempt finished and its next state was decided.
pub fn attempt(
    m: &Metrics,
    endpoint: &str,
    delivery: &str,
    number: u32,
    r: &AttemptResult,
    next: &Next,
    decided: Decided,
) {
    let outcome = match (decided, next) {
        (Decided::No(_), _) => SUPERSEDED,
        (_, Next::Delivered) => "delivered",
        (_, Next::Retry { .. }) => "retry",
        (_, Next::Dead { .. }) => "dead",
        (_, Next::Dropped { .. }) => "dropped",
    };
    m.attempts
        .get_or_create(&vec![
            ("endpoint", endpoint.to_string()),
            ("outcome", outcome.to_string()),
        ])
        .inc();
    // Only a request's time: an attempt that made none (a plugin failed, the address was
    // refused) would read as the fastest of all.
    if r.measured {
        m.attempt_duration
            .get_or_create(&vec![("endpoint", endpoint.to_string())])
            .observe(r.duration_ms as f64 / 1000.0);
    }
    let result = r.label();
    if let Decided::No(status) = decided {
        tracing::info!(
            endpoint,
            delivery,
            attempt = number,
            result,
            duration_ms = r.duration_ms,
            status = status.as_str(),
            "attempt ended after its delivery was settled or replayed: kept in its audit trail only"
        );
        return;
    }
    match next {
        Next::Delivered => {
            tracing::info!(
                endpoint,
                delivery,
                attempt = number,
                result,
                duration_ms = r.duration_ms,
                "delivered"
            )
        }
        Next::Retry { due_ms, .. } => tracing::warn!(
            endpoint,
            delivery,
            attempt = number,
            result,
            duration_ms = r.duration_ms,
            detail = r.error_detail.as_deref().unwrap_or(""),
            retry_in_ms = due_ms.saturating_sub(crate::model::now_ms()),
            "attempt failed; will retry"
        ),
        Next::Dead { reason } => tracing::warn!(
            endpoint,
            delivery,
            attempt = number,
            result,
            duration_ms = r.duration_ms,
            reason,
            "delivery is dead (moved to the DLQ)"
        ),
        Next::Dropped { reason } => {
            tracing::info!(endpoint, delivery, reason, "delivery dropped")
        }
    }
}

/// `n` deliveries of `endpoint` reached a final state (`delivered`, `dead`, `dropped`) and
/// that is on disk: counted here, and only here, so that an outcome the store could not
/// record (the delivery is attempted again) is not counted twice.
pub fn finished(m: &Metrics, endpoint: &str, state: &'static str, n: u64) {
    m.deliveries_final
        .get_or_create(&vec![
            ("endpoint", endpoint.to_string()),
            ("state", state.to_string()),
        ])
        .inc_by(n);
}

/// A transform plugin dropped a delivery.
pub fn dropped(endpoint: &str, delivery: &str, reason: &str) {
    tracing::info!(
        endpoint,
        delivery,
        reason,
        "delivery dropped by a transform"
    );
}

/// An endpoint's circuit opened or closed.
pub fn circuit(m: &Metrics, endpoint: &str, open: bool, failures: u32) {
    m.circuit_open
        .get_or_create(&vec![("endpoint", endpoint.to_string())])
        .set(open as i64);
    m.gauged_endpoints
        .lock()
        .expect("gauged endpoints")
        .insert(endpoint.to_string());
    if open {
        tracing::warn!(
            endpoint,
            consecutive_failures = failures,
            "endpoint failing: circuit open, probing at a slower pace"
        );
    } else {
        tracing::info!(endpoint, "endpoint recovered: circuit closed");
    }
}

#[cfg(test)]
mod tests {
    use super::Scrapes;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Scrapes that arrive while one is rendered take its result; one that arrives with
    /// none under way renders afresh; a scraper that hangs up does not cut a rendering short.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_scrapes_share_one_rendering_and_later_ones_render_again() {
        let scrapes = Scrapes::default();
        let renders = Arc::new(AtomicUsize::new(0));
        // A rendering finishes only when the test lets it.
        let gate = Arc::new(tokio::sync::Notify::new());
        let render = |renders: Arc<AtomicUsize>, gate: Arc<tokio::sync::Notify>| async move {
            let n = renders.fetch_add(1, Ordering::SeqCst) + 1;
            gate.notified().await;
            format!("rendering {n}")
        };
        // The first scraper hangs up; its rendering goes on, for those who come meanwhile.
        let first = scrapes.get(render(renders.clone(), gate.clone()));
        let hung_up = tokio::time::timeout(std::time::Duration::from_millis(10), first).await;
        assert!(hung_up.is_err());
        // Eight more arrive (each polled once: it has found the rendering under way).
        let mut waiting: Vec<_> = (0..8)
            .map(|_| Box::pin(scrapes.get(render(renders.clone(), gate.clone()))))
            .collect();
        for w in &mut waiting {
            assert!(futures_util::poll!(w.as_mut()).is_pending());
        }
        gate.notify_one();
        for w in futures_util::future::join_all(waiting).await {
            assert_eq!(w.as_str(), "rendering 1");
        }
        assert_eq!(renders.load(Ordering::SeqCst), 1);
        // Nothing under way now: the next scrape sees fresh values.
        gate.notify_one();
        assert_eq!(
            scrapes
                .get(render(renders.clone(), gate.clone()))
                .await
                .as_str(),
            "rendering 2"
        );
    }
}
