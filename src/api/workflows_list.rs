//! `GET /v1/workflows`: the configured workflows (for the console's playground and for
//! clients choosing one).

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, AppState, require_any};
use crate::model::Scope;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/workflows", get(list))
}

async fn list(State(app): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    require_any(&app, &headers, None, &[Scope::Admin, Scope::Ingest])?;
    let config = app.config.load();
    let data: Vec<Value> = config
        .workflows
        .iter()
        .map(|w| {
            json!({
                "name": w.name,
                "endpoint": w.endpoint,
                "upstream": w.upstream_url.as_str(),
                "event_name": w.event_name,
                "callback_timeout_ms": w.callback_timeout.as_millis() as u64,
                "simulate": w.simulate,
                "simulate_delay_ms": w.simulate_delay.as_millis() as u64,
            })
        })
        .collect();
    Ok(Json(json!({"data": data})))
}
