//! Liveness, readiness and the Prometheus exposition.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::AppState;
use crate::model::now_ms;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

pub(super) async fn readyz(State(app): State<AppState>) -> impl IntoResponse {
    // A store whose writer failed still reads, but takes nothing: not ready. (Those two
    // errors say what to do; a failed read's detail, which may name files, goes to the log
    // only: this route takes no token.)
    let probe = app.store.check().and_then(|()| {
        app.store.delivery("dlv_readiness_probe").map_err(|e| {
            tracing::error!(error = %e, "readiness: the database cannot be read");
            crate::store::StoreError::Db("the database cannot be read; see courier's log".into())
        })
    });
    // A database that has applied none of the acknowledged events for as long as a read
    // waits for them answers every read (and soon every ingest) with 503: not ready either.
    let probe = probe.and_then(|_| match app.store.stuck_for() {
        Some(d) if d >= STUCK => {
            tracing::error!(seconds = d.as_secs(), "readiness: the database has applied nothing while acknowledged events wait");
            Err(crate::store::StoreError::Db(format!(
                "the database has applied none of the acknowledged events for {} s; see courier's log",
                d.as_secs()
            )))
        }
        _ => Ok(()),
    });
    // The journal refusing writes (a full disk, say) refuses every new event: not ready, for
    // a while after each failure (see `Store::journal_failing`).
    let probe = probe.and_then(|_| {
        if app.store.journal_failing() {
            Err(crate::store::StoreError::Db(
                "writes to the ingest journal are failing (a full or failing disk? see courier's log): new events are refused".into(),
            ))
        } else {
            Ok(())
        }
    });
    match probe {
        Ok(()) if !app.shutdown.is_cancelled() => {
            (StatusCode::OK, Json(json!({"status": "ready"})))
        }
        // A 503 carries the error object every other error has, besides its status.
        Ok(()) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "shutting_down",
                "error": {"code": "shutting_down", "message": "courier is shutting down"},
            })),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unavailable",
                "error": {"code": "unavailable", "message": e.to_string()},
            })),
        ),
    }
}

/// How long the database may apply nothing while acknowledged events wait before courier is
/// not ready: as long as a read waits for them before it answers 503.
const STUCK: std::time::Duration = crate::store::SETTLE_TIMEOUT;

/// The longest a metrics scrape waits for the database to catch up with the journal.
const METRICS_SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The exposition: the gauges derived from stored state refreshed, then everything encoded
/// (one scrape at a time; see [`crate::observe::Scrapes`]).
async fn metrics(State(app): State<AppState>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    let encoded = app.metrics.scrapes.get(render(app.clone())).await;
    // OpenMetrics to a scraper that asks for it (Prometheus does); the classic Prometheus
    // text format to everyone else, whose parsers may not know OpenMetrics.
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            encoded.as_str().to_owned(),
        )
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            prometheus_text(&encoded),
        )
    }
}

/// Refreshes the gauges that are derived from stored state, then encodes everything (on a
/// blocking thread: with thousands of endpoints that is megabytes of text).
async fn render(app: AppState) -> String {
    // The gauges below read the database: let it show every event acknowledged before the
    // scrape, but never hold a scrape for long (a stuck database is when metrics matter).
    if !app.store.settle_within(METRICS_SETTLE).await {
        tracing::warn!(
            "metrics: the database is behind the ingest journal; gauges may lag acknowledged events"
        );
    }
    let m = &app.metrics;
    let counts = app.store.counts();
    // Series for every endpoint that exists, and for a gone one's deliveries still waiting;
    // an endpoint gone since the last scrape with nothing waiting loses its series.
    let names: std::collections::HashSet<String> = app.endpoints.names().into_iter().collect();
    let mut gauged: std::collections::HashSet<String> = names.clone();
    gauged.extend(
        counts
            .iter()
            .filter(|((_, s), n)| *s == crate::model::DeliveryStatus::Pending && **n > 0)
            .map(|((ep, _), _)| ep.clone()),
    );
    {
        let mut before = m.gauged_endpoints.lock().expect("gauged endpoints");
        for gone in before.difference(&gauged) {
            m.queue_depth.remove(&vec![("endpoint", gone.clone())]);
        }
        for gone in before.difference(&names) {
            m.circuit_open.remove(&vec![("endpoint", gone.clone())]);
        }
        *before = gauged;
    }
    let waiting = |ep: &str| {
        counts
            .get(&(ep.to_string(), crate::model::DeliveryStatus::Pending))
            .is_some_and(|n| *n > 0)
    };
    m.forget_gone_endpoints(
        app.endpoints.take_departed(),
        |ep| names.contains(ep),
        waiting,
    );
    // Every endpoint keeps its series, so that a drained queue reads 0; its circuit is read
    // from its health now (one made again under a deleted name starts closed, whatever the
    // old one's series last read).
    for ep in names {
        let depth = app.store.pending_count(&ep) as i64;
        let open = app.scheduler.health(&ep).circuit_open;
        m.queue_depth
            .get_or_create(&vec![("endpoint", ep.clone())])
            .set(depth);
        m.circuit_open
            .get_or_create(&vec![("endpoint", ep)])
            .set(open as i64);
    }
    for ((ep, status), n) in counts {
        let labels = vec![
            ("endpoint", ep.clone()),
            ("status", status.as_str().to_string()),
        ];
        // A gone endpoint's stored deliveries keep their series until retention has
        // purged them all.
        if n == 0 && app.endpoints.get(&ep).is_none() {
            m.deliveries.remove(&labels);
            // Its series is gone: so can its zero be (endpoints made and deleted through the
            // API would otherwise leave one for every name ever used).
            app.store.forget_zero_count(&ep, status);
            continue;
        }
        m.deliveries.get_or_create(&labels).set(n as i64);
        if status == crate::model::DeliveryStatus::Pending
            && n > 0
            && app.endpoints.get(&ep).is_none()
        {
            m.queue_depth
                .get_or_create(&vec![("endpoint", ep.clone())])
                .set(n as i64);
        }
    }
    // A failed read leaves the last value: a 0 would clear the very alert it should keep.
    match app.store.oldest_pending_ms() {
        Ok(Some(created)) => {
            m.oldest_pending_age
                .set(now_ms().saturating_sub(created) as f64 / 1000.0);
        }
        Ok(None) => {
            m.oldest_pending_age.set(0.0);
        }
        Err(e) => tracing::error!(error = %e, "metrics: cannot read the oldest pending delivery"),
    };
    m.channel_subscribers.set(app.hub.subscribers() as i64);
    let app2 = app.clone();
    tokio::task::spawn_blocking(move || app2.metrics.encode())
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "metrics: encoding failed");
            String::new()
        })
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition: a counter's
/// family is named with its `_total` suffix, as its samples are, and there is no `# EOF` or
/// `# UNIT` line. Samples, labels, gauges and histograms read the same in both.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                out.push_str(p);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push_str(&rest[name.len()..]);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    /// A journal that cannot be written (a full disk) takes no event: `/readyz` says so, and
    /// is ready again once a write succeeds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_reports_a_journal_that_cannot_be_written() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[keys]]\ntoken = \"test-token-0123456789\"\nscopes = [\"ingest\", \"admin\"]\n[[endpoints]]\nname = \"app\"\nurl = \"http://192.0.2.1/\"\n",
            dir.path().join("data").display()
        );
        let config = crate::config::Config::parse(&text, dir.path(), None, "test.toml").unwrap();
        let running = crate::server::start(config).await.unwrap();
        let http = reqwest::Client::new();
        let base = format!("http://{}", running.addr);
        let send = || {
            http.post(format!("{base}/v1/events"))
                .bearer_auth("test-token-0123456789")
                .header("content-type", "application/json")
                .body(r#"{"event_type": "t", "payload": {}}"#)
                .send()
        };
        let ready = || async {
            let r = http.get(format!("{base}/readyz")).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        assert_eq!(ready().await.0, 200);
        running.app.store.fail_journal_writes(true);
        assert_eq!(send().await.unwrap().status(), 503);
        let (status, body) = ready().await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("ingest journal"), "{body}");
        running.app.store.fail_journal_writes(false);
        assert_eq!(send().await.unwrap().status(), 202);
        assert_eq!(ready().await.0, 200);
    }

    #[test]
    fn counters_are_named_with_their_total_and_the_openmetrics_only_lines_go() {
        let om = "# HELP a_events Events.\n# TYPE a_events counter\na_events_total 3\n\
                  # HELP b_depth Depth.\n# TYPE b_depth gauge\nb_depth{endpoint=\"x\"} 2\n\
                  # HELP c_seconds Latency.\n# TYPE c_seconds histogram\n# UNIT c_seconds seconds\n\
                  c_seconds_sum 0.5\nc_seconds_count 1\nc_seconds_bucket{le=\"+Inf\"} 1\n# EOF\n";
        assert_eq!(
            super::prometheus_text(om),
            "# HELP a_events_total Events.\n# TYPE a_events_total counter\na_events_total 3\n\
             # HELP b_depth Depth.\n# TYPE b_depth gauge\nb_depth{endpoint=\"x\"} 2\n\
             # HELP c_seconds Latency.\n# TYPE c_seconds histogram\n\
             c_seconds_sum 0.5\nc_seconds_count 1\nc_seconds_bucket{le=\"+Inf\"} 1\n"
        );
    }
}
