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

/// Dead-letter entries one replay command examines.
const REPLAY_PAGE: usize = 500;
/// Requeued ids listed in a bulk replay's reply (the count covers all of them).
const SHOWN_IDS: usize = 1000;

/// The bulk-replay filter; given as query parameters or as a JSON body.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplayFilter {
    endpoint: Option<String>,
    since: Option<String>,
    until: Option<String>,
}

/// The largest bulk-replay filter body, whatever `server.max_body_bytes` is: a filter is a
/// few short fields.
const FILTER_MAX_BYTES: usize = 64 * 1024;

async fn replay(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let mut f: ReplayFilter = super::query(q.as_deref())?;
    let (_, timeout) = super::body_limits(&app);
    let bytes = read_body(body, &headers, FILTER_MAX_BYTES, timeout)
        .await
        .map_err(|e| {
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("a replay filter is at most {FILTER_MAX_BYTES} bytes"),
                )
            } else {
                e
            }
        })?;
    if !bytes.iter().all(u8::is_ascii_whitespace) {
        super::unique_keys(&bytes)?;
        let body: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::bad_request(format!("malformed filter: {e}")))?;
        // `null` is what a script sends for an unset variable (`{"endpoint": env.EP}`):
        // read as absent, it would requeue every dead delivery.
        if let Some(name) = body
            .as_object()
            .and_then(|m| m.iter().find(|(_, v)| v.is_null()))
            .map(|(k, _)| k.clone())
        {
            return Err(ApiError::bad_request(format!(
                "`{name}` is null: a bulk replay refuses a null filter value rather than replay every dead delivery; leave `{name}` out to mean all"
            ))
            .with_field(name));
        }
        let b: ReplayFilter = serde_json::from_value(body)
            .map_err(|e| ApiError::bad_request(format!("malformed filter: {e}")))?;
        f.endpoint = b.endpoint.or(f.endpoint);
        f.since = b.since.or(f.since);
        f.until = b.until.or(f.until);
    }
    // An empty value is what a script sends with an unset variable (`?endpoint=$EP`,
    // `"endpoint": "$EP"`): read as absent, as other routes read an empty query parameter,
    // it would requeue the whole dead-letter queue, so it is refused. Only leaving the key
    // out means "all".
    let in_query = url::form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes())
        .filter(|(_, v)| v.trim().is_empty())
        .map(|(k, _)| k.into_owned());
    let in_filter = [
        ("endpoint", &f.endpoint),
        ("since", &f.since),
        ("until", &f.until),
    ]
    .into_iter()
    .filter(|(_, v)| v.as_deref().is_some_and(|v| v.trim().is_empty()))
    .map(|(k, _)| k.to_string());
    if let Some(name) = in_query
        .chain(in_filter)
        .find(|k| matches!(k.as_str(), "endpoint" | "since" | "until"))
    {
        return Err(ApiError::bad_request(format!(
            "`{name}` is empty: a bulk replay refuses an empty filter value rather than replay every dead delivery; leave `{name}` out to mean all"
        ))
        .with_field(name));
    }
    let filter = Filter {
        status: Some(DeliveryStatus::Dead),
        endpoint: f.endpoint,
        since_ms: time_param("since", f.since.as_deref())?,
        until_ms: time_param("until", f.until.as_deref())?,
    };
    // Page by page: each page is one short writer command, so ingest, outcomes and other
    // admin calls go on between pages however large the dead-letter queue is.
    let mut after = String::new();
    let started = crate::model::now_ms();
    let mut n = 0usize;
    let mut skipped = 0usize;
    let mut unreadable = 0usize;
    let mut shown: Vec<String> = Vec::new();
    loop {
        if app.shutdown.is_cancelled() {
            // Stopping: what was requeued stays requeued; the rest is for another call.
            tracing::warn!(requeued = n, "DLQ bulk replay interrupted by shutdown");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!(
                    "courier is shutting down: {n} dead deliveries were requeued before it began; replay again after the restart for the rest"
                ),
            ));
        }
        // Each page against the endpoints as they are now, and with no endpoint deleted or
        // made meanwhile: a delete (which drops its endpoint's pending deliveries) and a
        // page cannot interleave, and an endpoint deleted, or made again under its name,
        // while the replay runs gets none of the old one's deliveries.
        let page = {
            let _no_endpoint_changes = app.endpoints.changes.lock().await;
            app.store
                .replay(
                    ReplayTarget::Dead {
                        filter: filter.clone(),
                        after,
                        limit: REPLAY_PAGE,
                        dead_before_ms: started + 1,
                    },
                    app.endpoints.births(),
                )
                .await
        };
        let page = match page {
            Ok(page) => page,
            // Earlier pages are requeued for good: the answer says so, since "this request
            // changed nothing" is what an error from the store would otherwise mean.
            Err(e) if n > 0 => {
                let mut err = ApiError::from(e);
                tracing::warn!(requeued = n, error = %err.message, "DLQ bulk replay stopped part way");
                err.message = format!(
                    "{}: {n} dead deliveries were requeued before it; replay again for the rest",
                    err.message
                );
                return Err(err);
            }
            Err(e) => return Err(e.into()),
        };
        n += page.requeued.len();
        skipped += page.earlier_endpoint.len();
        unreadable += page.unreadable.len();
        app.metrics.replays.inc_by(page.requeued.len() as u64);
        let endpoints: BTreeSet<&str> = page.requeued.iter().map(|d| d.endpoint.as_str()).collect();
        for e in &endpoints {
            Scheduler::wake(&app, e);
        }
        for d in &page.requeued {
            if shown.len() < SHOWN_IDS {
                shown.push(d.id.clone());
            }
        }
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    tracing::info!(
        requeued = n,
        skipped_deleted_endpoint = skipped,
        skipped_unreadable = unreadable,
        "DLQ bulk replay"
    );
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "requeued": n,
            "deliveries": shown,
            "deliveries_truncated": n > shown.len(),
            "skipped_deleted_endpoint": skipped,
            "skipped_unreadable": unreadable,
        })),
    ))
}
