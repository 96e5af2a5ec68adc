//! `GET /v1/stats`: counts by status, success rate, attempt latency percentiles, attempts per
//! delivery, and endpoint health.

use std::collections::{BTreeMap, HashSet};

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, require, time_param};
use crate::model::{DeliveryStatus, Scope, now_ms, rfc3339};

/// Most attempts one stats request reads from the log.
const STATS_CAP: usize = 500_000;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/stats", get(stats))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Params {
    endpoint: Option<String>,
    since: Option<String>,
}

/// The value at quantile `q` of sorted `v`.
pub fn percentile(v: &[u64], q: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let idx = ((v.len() as f64 - 1.0) * q).round() as usize;
    Some(v[idx.min(v.len() - 1)])
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
    let (log, capped) =
        tokio::task::spawn_blocking(move || store.attempt_log(since, u64::MAX, STATS_CAP))
            .await
            .map_err(ApiError::internal)??;
    let mut durations = Vec::new();
    let mut delivered_ids = HashSet::new();
    let mut ok = 0u64;
    for (id, entry) in &log {
        if endpoint.as_deref().is_some_and(|e| e != entry.endpoint) {
            continue;
        }
        durations.push(entry.duration_ms);
        delivered_ids.insert(id.as_str());
        ok += entry.success as u64;
    }
    durations.sort_unstable();
    let attempts = durations.len() as u64;

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
        "attempts": attempts,
        "attempt_success_rate": (attempts > 0).then(|| ok as f64 / attempts as f64),
        "attempts_per_delivery": (!delivered_ids.is_empty()).then(|| attempts as f64 / delivered_ids.len() as f64),
        "latency_ms": {
            "p50": percentile(&durations, 0.50),
            "p95": percentile(&durations, 0.95),
            "p99": percentile(&durations, 0.99),
        },
        "sampled": capped,
        "endpoints": endpoints,
    })))
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(51));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7], 0.95), Some(7));
    }
}
