//! `GET /v1/config/status`: which configuration is active and what the last reload did.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{ApiError, AppState, require};
use crate::model::{Scope, rfc3339};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/config/status", get(status))
}

async fn status(State(app): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let st = app.reload_status.lock().expect("status lock").clone();
    let config = app.config.load();
    Ok(Json(json!({
        "version": st.version,
        "restart_needed": st.restart_needed,
        "loaded_at": rfc3339(st.loaded_at_ms),
        "source": st.source.map(|p| p.display().to_string()),
        "sha256": st.sha256,
        "reloads_ok": st.reloads_ok,
        "reloads_failed": st.reloads_failed,
        "last_error": st.last_error.map(|message| json!({
            "message": message,
            "at": st.last_error_at_ms.map(rfc3339),
        })),
        "endpoints": config.endpoints.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
    })))
}
