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

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the page needs is inline or same-origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:; img-src 'self' data:",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}
