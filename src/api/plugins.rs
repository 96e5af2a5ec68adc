//! `GET /v1/plugins`: every configured plugin's loaded version and last load error.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, AppState, require};
use crate::model::{Scope, rfc3339};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/plugins", get(list))
}

async fn list(State(app): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let data: Vec<Value> = app
        .plugins
        .status()
        .into_iter()
        .map(|s| {
            json!({
                "name": s.name,
                "kind": s.kind,
                "path": s.path.display().to_string(),
                "version": s.version,
                "sha256": s.sha256,
                "loaded_at": s.loaded_at_ms.map(rfc3339),
                "loads_ok": s.loads_ok,
                "loads_failed": s.loads_failed,
                "last_error": s.last_error,
            })
        })
        .collect();
    Ok(Json(json!({"data": data})))
}
