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
    let caller = require_any(&app, &headers, None, &[Scope::Admin, Scope::Ingest])?;
    let config = app.config.load();
    // Where the upstream is (an internal host, say) is the operator's business: an
    // ingest-only key, often in producers' hands, sees `null`.
    let admin = crate::app::authorize(&config.keys, super::bearer(&headers), Scope::Admin).is_ok();
    let data: Vec<Value> = config
        .workflows
        .iter()
        // A key limited by a `workflows` list sees the workflows it may use.
        .filter(|w| caller.may_use_workflow(&config, &w.name))
        .map(|w| {
            json!({
                "name": w.name,
                "endpoint": w.endpoint,
                "upstream": admin.then(|| shown_url(&w.upstream_url)),
                "event_name": w.event_name,
                "callback_timeout_ms": w.callback_timeout.as_millis() as u64,
                "simulate": w.simulate,
                "simulate_delay_ms": w.simulate_delay.as_millis() as u64,
            })
        })
        .collect();
    Ok(Json(json!({"data": data})))
}

/// The upstream URL without what may be a credential (user info, query string): ingest keys
/// can read this list, and they are often in producers' and browsers' hands.
fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    if shown.query().is_some() {
        shown.set_query(Some("…"));
    }
    shown.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_in_the_upstream_url_are_not_shown() {
        let url = url::Url::parse("https://user:pw@ai.example.com/v1/chat?key=sk-123").unwrap();
        let shown = super::shown_url(&url);
        assert!(!shown.contains("pw") && !shown.contains("user") && !shown.contains("sk-123"));
        assert!(
            shown.starts_with("https://ai.example.com/v1/chat?"),
            "{shown}"
        );
    }
}
