//! Delivery routes: list, inspect (with every attempt), replay.

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, AppState, require, time_param, views};
use crate::model::{DeliveryStatus, Scope};
use crate::scheduler::Scheduler;
use crate::store::{Filter, ReplayTarget};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/deliveries", get(list))
        .route("/v1/deliveries/{id}", get(show))
        .route("/v1/deliveries/{id}/replay", post(replay))
}

/// Query parameters shared by the delivery and DLQ listings.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub status: Option<String>,
    pub endpoint: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

impl ListParams {
    pub fn filter(&self) -> Result<Filter, ApiError> {
        let status = match self.status.as_deref() {
            None | Some("") => None,
            Some(s) => Some(DeliveryStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "status: `{s}` is not one of pending, delivered, dead, dropped"
                ))
            })?),
        };
        Ok(Filter {
            status,
            endpoint: self.endpoint.clone().filter(|e| !e.is_empty()),
            since_ms: time_param("since", self.since.as_deref())?,
            until_ms: time_param("until", self.until.as_deref())?,
        })
    }

    pub fn limit(&self) -> Result<usize, ApiError> {
        super::limit_param(self.limit, 50)
    }

    /// The `next_cursor` of an earlier page: a delivery id. Anything else is refused, since
    /// the listing would otherwise start at an arbitrary place and look like a real page.
    pub fn cursor(&self) -> Result<Option<&str>, ApiError> {
        match self.cursor.as_deref() {
            None | Some("") => Ok(None),
            Some(c)
                if c.strip_prefix("dlv_")
                    .is_some_and(|u| ulid::Ulid::from_string(u).is_ok()) =>
            {
                Ok(Some(c))
            }
            Some(c) => Err(ApiError::bad_request(format!(
                "cursor: `{c}` is not a next_cursor this listing gave"
            ))),
        }
    }
}

/// Whether `d` has no endpoint to go to: a pending one whose endpoint is not configured (it
/// waits for it), or a finished one whose name no endpoint has, or only one made after it
/// finished (someone else's, perhaps: a replay refuses it, as [`crate::store::Births`] says).
fn endpoint_missing(app: &AppState, d: &crate::model::Delivery) -> bool {
    let born = app.endpoints.born(&d.endpoint);
    if d.status == crate::model::DeliveryStatus::Pending {
        born.is_none()
    } else {
        crate::store::orphaned(d.updated_ms, born)
    }
}

/// Lists deliveries for a filter, marking those whose endpoint is not configured.
pub fn listing(app: &AppState, filter: &Filter, p: &ListParams) -> Result<Value, ApiError> {
    let (items, next) = app.store.list(filter, p.limit()?, p.cursor()?)?;
    let data: Vec<Value> = items
        .iter()
        .map(|d| views::delivery(d, endpoint_missing(app, d)))
        .collect();
    Ok(json!({"data": data, "next_cursor": next}))
}

async fn list(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let p: ListParams = super::query(q.as_deref())?;
    let filter = p.filter()?;
    Ok(Json(listing(&app, &filter, &p)?))
}

async fn show(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let d = app
        .store
        .delivery(&id)?
        .ok_or_else(|| ApiError::not_found(format!("no delivery `{id}`")))?;
    let attempts = app.store.attempts(&id)?;
    let event = app.store.event(&d.event_id)?;
    let mut v = views::delivery(&d, endpoint_missing(&app, &d));
    v["attempts"] = attempts.iter().map(views::attempt).collect();
    v["request"] = event.as_ref().map(views::request).unwrap_or(Value::Null);
    Ok(Json(v))
}

async fn replay(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require(&app, &headers, Scope::Admin)?;
    // Against the endpoints as they are, none deleted or made meanwhile (see the bulk
    // replay).
    let result = {
        let _no_endpoint_changes = app.endpoints.changes.lock().await;
        app.store
            .replay(ReplayTarget::Ids(vec![id.clone()]), app.endpoints.births())
            .await?
    };
    if !result.not_found.is_empty() {
        return Err(ApiError::not_found(format!("no delivery `{id}`")));
    }
    if !result.unreadable.is_empty() {
        return Err(ApiError::internal(format!(
            "delivery `{id}` cannot be read (a damaged record): not replayed"
        )));
    }
    if !result.earlier_endpoint.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "delivery `{id}` went to an endpoint that was deleted (or is no longer \
                 configured); any endpoint made since under its name is not its destination, so \
                 it is not replayed"
            ),
        ));
    }
    if !result.already_pending.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "delivery `{id}` is pending; only delivered, dead or dropped deliveries can be replayed"
            ),
        ));
    }
    app.metrics.replays.inc_by(result.requeued.len() as u64);
    let d = &result.requeued[0];
    Scheduler::wake(&app, &d.endpoint);
    tracing::info!(delivery = %d.id, endpoint = %d.endpoint, "delivery replayed");
    Ok((
        StatusCode::ACCEPTED,
        Json(views::delivery(d, endpoint_missing(&app, d))),
    ))
}
