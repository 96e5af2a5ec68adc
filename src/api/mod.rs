//! The HTTP API: one router per resource, merged here, and the pieces they share (the JSON
//! error shape, bearer authentication, bounded body reading).

pub(crate) mod backup;
mod channels;
mod config;
mod console;
mod deliveries;
mod dlq;
pub(crate) mod endpoints;
mod events;
mod health;
mod plugins;
mod stats;
pub(crate) mod views;
mod workflows_list;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::app::{App, AuthError, Caller};
use crate::model::Scope;

pub type AppState = Arc<App>;

pub use channels::{BEARER_PROTOCOL_PREFIX, PING_EVERY, PROTOCOL as WS_PROTOCOL};

/// Every route of the API.
pub fn router(app: AppState) -> Router {
    // Every route that reads or changes what was ingested first waits until the database
    // shows every event acknowledged before the request came in (the writer applies
    // journaled events a moment after their producers got their 202).
    let settled = Router::new()
        .merge(config::router())
        .merge(deliveries::router())
        .merge(endpoints::router())
        .merge(dlq::router())
        .merge(stats::router())
        .merge(plugins::router())
        .merge(channels::router())
        .merge(workflows_list::router())
        .merge(console::router())
        .merge(backup::router())
        .layer(axum::middleware::from_fn_with_state(app.clone(), settle))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            run_to_completion,
        ));
    // The ingest routes, on every producer's round trip, answer every error themselves in
    // the JSON shape and skip the layer that fixes up the framework's own answers.
    let framework_errors_fixed = Router::new()
        .merge(health::router())
        .merge(settled)
        .layer(axum::middleware::from_fn(json_errors));
    Router::new()
        .merge(events::router())
        .merge(framework_errors_fixed)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this route does not take {method}"),
            )
        })
        .with_state(app)
}

/// Gives the errors the framework answers by itself (a wrong method, a path or query that
/// does not parse) the JSON shape of every other error, so clients need one error parser.
async fn json_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    let plain = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v.as_bytes().starts_with(b"text/plain"));
    if !(status.is_client_error() || status.is_server_error()) || !plain {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        _ if status.is_server_error() => "internal",
        _ => "error",
    };
    let message = if !text.is_empty() {
        text
    } else if status == StatusCode::METHOD_NOT_ALLOWED {
        format!("this route does not take {method}")
    } else {
        status.canonical_reason().unwrap_or("error").to_string()
    };
    let body = serde_json::to_vec(&json!({"error": {"code": code, "message": message}}))
        .expect("error body serializes");
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// Runs a request that changes something on a task of its own, to its end. A client that
/// hangs up makes the server drop its request's future; a change whose commit had already
/// been handed to the writer would land all the same, but what follows it would not (an
/// endpoint made in the database but not in memory, a completed channel whose subscribers
/// never hear of it). Reads are simply dropped. (The ingest routes, which are not under
/// this layer, answer for their own: see `ingest`.)
async fn run_to_completion(
    axum::extract::State(app): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method().is_safe() {
        return next.run(req).await;
    }
    match app.tasks.spawn(next.run(req)).await {
        Ok(resp) => resp,
        Err(e) => ApiError::internal(format!("request task failed: {e}")).into_response(),
    }
}

async fn settle(
    axum::extract::State(app): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    if app.store.is_settled() {
        return Ok(next.run(req).await);
    }
    // A request without a valid token is refused by its handler at once: it does not wait
    // for the database first (nor learn, from a 503, that the database is in trouble).
    let query_token = req.uri().query().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    });
    let token = bearer(req.headers())
        .map(str::to_string)
        .or(query_token)
        .or_else(|| channels::OfferedProtocols::of(req.headers()).token);
    let known = !matches!(
        crate::app::authorize(&app.config.load().keys, token.as_deref(), Scope::Admin),
        Err(AuthError::Missing | AuthError::Invalid)
    );
    if known {
        app.store.settle().await?;
    }
    Ok(next.run(req).await)
}

/// The error shape of DESIGN.md: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The request field at fault, when there is one.
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some(f) = self.field {
            body["error"]["field"] = f.into();
        }
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (status, code) = match e {
            AuthError::Missing | AuthError::Invalid => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AuthError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "courier is shutting down",
            ),
            e @ crate::store::StoreError::Behind(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            // The database could not read or write (a full or failing disk, a stopped
            // writer): the request changed nothing and may be sent again later.
            e @ (crate::store::StoreError::Db(_)
            | crate::store::StoreError::Io(_)
            | crate::store::StoreError::Broken) => {
                tracing::error!(error = %e, "request refused: the database failed");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                )
            }
            other => ApiError::internal(other),
        }
    }
}

/// The bearer token of a request, from `Authorization: Bearer …` or, where given, `?token=`.
/// The scheme's name is case-insensitive (RFC 9110 §11.1): `bearer x` is as good as
/// `Bearer x`.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Authenticates with a token from the `Authorization` header or, where browsers cannot set
/// headers (WebSockets), a `token` query parameter; any one of `scopes` suffices.
pub fn require_any(
    app: &App,
    headers: &HeaderMap,
    query_token: Option<&str>,
    scopes: &[Scope],
) -> Result<Caller, ApiError> {
    let config = app.config.load();
    let token = bearer(headers).or(query_token);
    let mut last = AuthError::Missing;
    for scope in scopes {
        match crate::app::authorize(&config.keys, token, *scope) {
            Ok(c) => return Ok(c),
            Err(e) => last = e,
        }
    }
    // A known token with none of them is told every scope that would do, not the last one.
    if let (AuthError::Forbidden(_), [_, _, ..]) = (&last, scopes) {
        let names: Vec<String> = scopes.iter().map(|s| format!("`{}`", s.as_str())).collect();
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this token has none of the scopes this route takes: {}",
                names.join(", ")
            ),
        ));
    }
    Err(last.into())
}

/// Authenticates a request for `scope`.
pub fn require(app: &App, headers: &HeaderMap, scope: Scope) -> Result<Caller, ApiError> {
    let config = app.config.load();
    Ok(crate::app::authorize(&config.keys, bearer(headers), scope)?)
}

/// `server.max_body_bytes` and `server.body_timeout` as they are now (copied out: no
/// configuration guard is held across a body's read).
pub fn body_limits(app: &App) -> (usize, std::time::Duration) {
    let config = app.config.load();
    (config.server.max_body_bytes, config.server.body_timeout)
}

/// How long a request body may take to arrive by default (`server.body_timeout`).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads a request body of at most `limit` bytes within `timeout`: a larger one is a 413 and
/// is not buffered; one that does not arrive in time is a 408.
pub async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than max_body_bytes ({limit} bytes)"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        && len > limit
    {
        return Err(too_large());
    }
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within server.body_timeout ({} s)",
                    timeout.as_secs()
                ),
            )
        })?;
    read.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            source = s.source();
        }
        ApiError::bad_request(format!("cannot read request body: {e}"))
    })
}

/// Reads a JSON request body (bounded by `max_body_bytes`); `None` when the body is empty.
pub async fn read_json(
    app: &App,
    headers: &HeaderMap,
    body: Body,
) -> Result<Option<serde_json::Value>, ApiError> {
    let (limit, timeout) = body_limits(app);
    let bytes = read_body(body, headers, limit, timeout).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    // A key given twice at the top is refused, as `/v1/events` refuses it: read into a map,
    // the last one would silently win.
    unique_keys(&bytes)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))
}

/// Refuses a JSON object that gives a key twice at the top (anything else passes here).
pub fn unique_keys(bytes: &[u8]) -> Result<(), ApiError> {
    if bytes.trim_ascii_start().starts_with(b"{") {
        serde_json::from_slice::<crate::workflows::Members>(bytes)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON: {e}")))?;
    }
    Ok(())
}

/// A listing's page size: `default` when absent, else 1–1000.
pub fn limit_param(limit: Option<usize>, default: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(n) => Err(
            ApiError::bad_request(format!("limit: {n} is not between 1 and 1000"))
                .with_field("limit"),
        ),
    }
}

/// Parses query parameters into `T`, naming the bad parameter in a 400. An empty parameter
/// (`?cursor=&limit=`, as a form or URL template leaves it) counts as absent.
pub fn query<T: serde::de::DeserializeOwned>(raw: Option<&str>) -> Result<T, ApiError> {
    let given: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))?;
    // An empty value reads as absent, but only for a parameter the route has: a misspelt one
    // is refused whatever its value (`?idempotencyKey=` is no more absent than `=k1`). The
    // route's own type tells which names it has: a lone unknown name fails as unknown.
    for (k, _) in given.iter().filter(|(_, v)| v.is_empty()) {
        let alone = serde_urlencoded::to_string([(k.as_str(), "")]).unwrap_or_default();
        if let Err(e) = serde_urlencoded::from_str::<T>(&alone)
            && e.to_string().starts_with("unknown field")
        {
            return Err(ApiError::bad_request(format!("invalid query: {e}")));
        }
    }
    let pairs = given.into_iter().filter(|(_, v)| !v.is_empty());
    serde_urlencoded::from_str(
        &serde_urlencoded::to_string(pairs.collect::<Vec<_>>()).unwrap_or_default(),
    )
    .map_err(|e| ApiError::bad_request(format!("invalid query: {e}")))
}

/// Parses an optional RFC 3339 time parameter.
pub fn time_param(name: &str, value: Option<&str>) -> Result<Option<u64>, ApiError> {
    match value {
        None | Some("") => Ok(None),
        Some(v) => crate::model::parse_time(v)
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("{name}: `{v}` is not an RFC 3339 time"))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    const TOKEN: &str = "admin-token-for-api-tests-0001";

    async fn start(dir: &std::path::Path) -> crate::server::Running {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[keys]]\ntoken = \"{TOKEN}\"\nscopes = [\"ingest\", \"admin\", \"callback\"]\n",
            dir.display()
        );
        let config = crate::config::Config::parse(&text, dir, None, "test.toml").unwrap();
        crate::server::start(config).await.unwrap()
    }

    /// `POST /v1/endpoints` making the endpoint `app`.
    async fn create_app(http: &reqwest::Client, base: &str) -> reqwest::Result<reqwest::Response> {
        http.post(format!("{base}/v1/endpoints"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(json!({"name": "app", "url": "https://example.com/hook"}).to_string())
            .send()
            .await
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let with = |v: &str| {
            let mut h = axum::http::HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, v.parse().unwrap());
            super::bearer(&h).map(str::to_string)
        };
        for v in ["Bearer tok", "bearer tok", "BEARER  tok "] {
            assert_eq!(with(v).as_deref(), Some("tok"), "{v:?}");
        }
        for v in ["Basic tok", "Bearertok", "tok"] {
            assert_eq!(with(v), None, "{v:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_the_database_refuses_is_a_503_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let running = start(dir.path()).await;
        let base = format!("http://{}", running.addr);
        let http = reqwest::Client::new();
        let create = || create_app(&http, &base);
        running.app.store.fail_writes(true);
        let r = create().await.unwrap();
        assert_eq!(r.status(), 503);
        let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no space left on device"),
            "{body}"
        );
        let shown = http
            .get(format!("{base}/v1/endpoints/app"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(shown.status(), 404, "nothing was half made");
        // Once the disk has room again, the same request goes through.
        running.app.store.fail_writes(false);
        assert_eq!(create().await.unwrap().status(), 201);
        running.shutdown().await;
    }

    /// `/readyz`'s 503 has the error object every error has (and its `status`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_refused_at_shutdown_has_the_error_shape() {
        use axum::response::IntoResponse;
        let dir = tempfile::tempdir().unwrap();
        let running = start(dir.path()).await;
        let app = running.app.clone();
        let ready = super::health::readyz(axum::extract::State(app.clone()))
            .await
            .into_response();
        assert_eq!(ready.status(), 200);
        app.shutdown.cancel();
        let r = super::health::readyz(axum::extract::State(app))
            .await
            .into_response();
        assert_eq!(r.status(), 503);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["status"], "shutting_down", "{body}");
        assert_eq!(body["error"]["code"], "shutting_down", "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
        running.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_without_a_valid_token_is_refused_without_waiting_for_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let running = start(dir.path()).await;
        let base = format!("http://{}", running.addr);
        let http = reqwest::Client::new();
        // An event is acknowledged from the journal, and the database cannot apply it: reads
        // wait for it (then answer 503).
        assert_eq!(create_app(&http, &base).await.unwrap().status(), 201);
        running.app.store.fail_writes(true);
        let r = http
            .post(format!("{base}/v1/ingest/app"))
            .bearer_auth(TOKEN)
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        // A request with the token waits for the database, which cannot catch up until
        // writes work again.
        let authorized = tokio::spawn(
            http.get(format!("{base}/v1/deliveries"))
                .bearer_auth(TOKEN)
                .send(),
        );
        for token in [None, Some("not-a-token-0000000000")] {
            let mut req = http.get(format!("{base}/v1/deliveries"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            assert_eq!(req.send().await.unwrap().status(), 401);
        }
        let ws = http
            .get(format!("{base}/v1/channels/x/ws?token=nope"))
            .send()
            .await
            .unwrap();
        assert_eq!(ws.status(), 401);
        // Answered while the one that must wait for the database still waits.
        assert!(
            !authorized.is_finished(),
            "the authorized request did not wait for the database (or the refusals did)"
        );
        running.app.store.fail_writes(false);
        // It gets its answer once the database has caught up (or its wait ran out).
        let status = authorized.await.unwrap().unwrap().status();
        assert!(status == 200 || status == 503, "{status}");
        running.shutdown().await;
    }
}
