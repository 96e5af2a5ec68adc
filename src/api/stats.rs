//! `GET /v1/stats`: counts by status, success rate, attempt latency percentiles, attempts per
//! delivery, and endpoint health.

use std::collections::BTreeMap;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, require, time_param};
use crate::model::{DeliveryStatus, Scope, now_ms, rfc3339};
use crate::store::Rollup;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/stats", get(stats))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Params {
    endpoint: Option<String>,
    since: Option<String>,
}

/// `a ÷ b`, or `None` when `b` is zero.
pub fn rate(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// The `latency_ms` object: attempt duration percentiles (see [`Rollup::percentile`]).
pub fn latency(r: &Rollup) -> Value {
    json!({
        "p50": r.percentile(0.50),
        "p95": r.percentile(0.95),
        "p99": r.percentile(0.99),
    })
}

async fn stats(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let p: Params = super::query(q.as_deref())?;
    let endpoint = p.endpoint.filter(|e| !e.is_empty());
    let now = now_ms();
    let since =
        time_param("since", p.since.as_deref())?.unwrap_or(now.saturating_sub(24 * 3600 * 1000));

    let mut counts: BTreeMap<&str, u64> = DeliveryStatus::ALL
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
    for ((ep, status), n) in app.store.counts() {
        if endpoint.as_deref().is_none_or(|e| e == ep) {
            *counts.entry(status.as_str()).or_default() += n;
        }
    }
    let finished = counts["delivered"] + counts["dead"];
    let success_rate = (finished > 0).then(|| counts["delivered"] as f64 / finished as f64);

    let store = app.store.clone();
    let ep = endpoint.clone();
    let attempts = tokio::task::spawn_blocking(move || store.attempt_stats(since, ep.as_deref()))
        .await
        .map_err(ApiError::internal)??;

    // Endpoints with something to show: the one asked for, or those with deliveries waiting
    // or attempts made (not every idle endpoint of thousands).
    let mut names: std::collections::BTreeSet<String> = match &endpoint {
        Some(e) => [e.clone()].into(),
        None => app
            .scheduler
            .all_health()
            .into_iter()
            .map(|(n, _)| n)
            .collect(),
    };
    if endpoint.is_none() {
        for ((ep, status), n) in app.store.counts() {
            if status == DeliveryStatus::Pending && n > 0 {
                names.insert(ep);
            }
        }
    }
    let endpoints: Vec<Value> = names
        .iter()
        .map(|name| {
            let h = app.scheduler.health(name);
            json!({
                "name": name,
                "circuit": h.state(),
                "consecutive_failures": h.consecutive_failures,
                "held_until": h.held_until_ms.filter(|t| *t > crate::model::now_ms()).map(rfc3339),
                "next_probe_at": h.next_probe_ms(app.config.load().delivery.circuit_probe_interval).map(rfc3339),
                "queue_depth": app.store.pending_count(name),
                "last_attempt_at": h.last_attempt_ms.map(rfc3339),
                "last_success_at": h.last_success_ms.map(rfc3339),
                "endpoint_missing": app.endpoints.get(name).is_none(),
            })
        })
        .collect();
    Ok(Json(json!({
        "since": rfc3339(since),
        "endpoint": endpoint,
        "counts": counts,
        "success_rate": success_rate,
        "attempts": attempts.attempts,
        "attempt_success_rate": rate(attempts.successes, attempts.attempts),
        "attempts_per_delivery": rate(attempts.attempts, attempts.first_attempts),
        "latency_ms": latency(&attempts),
        "sampled": false,
        "endpoints": endpoints,
    })))
}
