//! Dead-letter queue routes: list dead deliveries, bulk-replay them by filter.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::deliveries::{ListParams, listing};
use super::{ApiError, AppState, read_body, require, time_param};
use crate::model::{DeliveryStatus, Scope};
use crate::scheduler::Scheduler;
use crate::store::{Filter, ReplayTarget};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/dlq", get(list))
        .route("/v1/dlq/replay", post(replay))
}

async fn list(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let p: ListParams = super::query(q.as_deref())?;
    if p.status.as_deref().is_some_and(|s| s != "dead") {
        return Err(ApiError::bad_request(
            "status: the DLQ holds only dead deliveries",
        ));
    }
    let mut filter = p.filter()?;
    filter.status = Some(DeliveryStatus::Dead);
    Ok(Json(listing(&app, &filter, &p)?))
}

/// The bulk-replay filter; given as query parameters or as a JSON body.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplayFilter {
    endpoint: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

async fn replay(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let mut f: ReplayFilter = super::query(q.as_deref())?;
    let bytes = read_body(body, &headers, 64 * 1024).await?;
    if !bytes.iter().all(u8::is_ascii_whitespace) {
        let b: ReplayFilter = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("malformed filter: {e}")))?;
        f.endpoint = b.endpoint.or(f.endpoint);
        f.since = b.since.or(f.since);
        f.until = b.until.or(f.until);
    }
    let filter = Filter {
        status: Some(DeliveryStatus::Dead),
        endpoint: f.endpoint.filter(|e| !e.is_empty()),
        since_ms: time_param("since", f.since.as_deref())?,
        until_ms: time_param("until", f.until.as_deref())?,
    };
    let result = app.store.replay(ReplayTarget::Dead(filter)).await?;
    let n = result.requeued.len();
    app.metrics.replays.inc_by(n as u64);
    let endpoints: BTreeSet<&str> = result
        .requeued
        .iter()
        .map(|d| d.endpoint.as_str())
        .collect();
    for e in &endpoints {
        Scheduler::wake(&app, e);
    }
    tracing::info!(requeued = n, "DLQ bulk replay");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "requeued": n,
            "deliveries": result.requeued.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        })),
    ))
}
