//! `GET /console`: the operator console, one hand-written HTML page (inline CSS and
//! JavaScript, no build step, no CDN) compiled into the binary. It talks to the same API as
//! everything else with an admin token it asks for once and keeps for the tab.

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;

use super::AppState;

const PAGE: &str = include_str!("../console/index.html");

pub fn router() -> Router<AppState> {
    Router::new().route("/console", get(page)).route(
        "/console/",
        get(|| async { Redirect::permanent("/console") }),
    )
}

/// The `sha256-…` source of the page's one inline script, for its Content-Security-Policy:
/// that script runs, no other inline script or handler would.
fn script_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        use base64::Engine;
        use sha2::Digest;
        let start = PAGE.find("<script>").expect("the page has its script") + "<script>".len();
        let end = PAGE[start..].find("</script>").expect("closed") + start;
        let digest = sha2::Sha256::digest(&PAGE.as_bytes()[start..end]);
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    })
}

async fn page(headers: axum::http::HeaderMap) -> impl IntoResponse {
    // WebSockets to this host only (`'self'` does not cover ws: in every browser).
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(c))
        })
        .map(|h| format!(" ws://{h} wss://{h}"))
        .unwrap_or_default();
    let csp = format!(
        "default-src 'self'; script-src {}; style-src 'unsafe-inline'; connect-src 'self'{host}; \
         img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        script_hash()
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8".to_string()),
            (header::CONTENT_SECURITY_POLICY, csp),
            (header::CACHE_CONTROL, "no-store".to_string()),
            (header::X_FRAME_OPTIONS, "DENY".to_string()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
            (header::REFERRER_POLICY, "no-referrer".to_string()),
        ],
        PAGE,
    )
}
