//! Ingest routes: `POST /v1/events` (JSON envelope, fan-out) and `POST /v1/ingest/{endpoint}`
//! (any body, delivered byte for byte).

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{ApiError, AppState, read_body, require};
use crate::ingest::{IngestError, IngestRequest, ingest};
use crate::model::Scope;
use crate::observe;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/events", post(post_event))
        .route("/v1/ingest/{endpoint}", post(post_raw))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody<'a> {
    event_type: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    endpoint: Option<String>,
    id: Option<String>,
    idempotency_key: Option<String>,
}

async fn post_event(
    State(app): State<AppState>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    // The request's own headers, not a copy (the `HeaderMap` extractor clones them): this
    // route is on every producer's round trip.
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let caller = require(&app, headers, Scope::Ingest)?;
    // Everything is in the body (or the Idempotency-Key header): a query parameter here is
    // a mistake, and `?idempotency_key=k` read as nothing would make a retry a second event.
    if let Some(name) = parts.uri.query().filter(|q| !q.is_empty()).map(|q| {
        q.split('&')
            .next()
            .unwrap_or(q)
            .split('=')
            .next()
            .unwrap_or(q)
    }) {
        observe::ingest_rejected(&app.metrics, "malformed");
        return Err(ApiError::bad_request(format!(
            "POST /v1/events takes no query parameters (`{name}` given): its fields go in the JSON body, the idempotency key there or in the Idempotency-Key header"
        )));
    }
    let bytes = read_ingest(&app, headers, body).await?;
    let parsed: EventBody = serde_json::from_slice(&bytes).map_err(|e| {
        observe::ingest_rejected(&app.metrics, "malformed");
        ApiError::bad_request(format!("malformed event: {e}"))
    })?;
    let idempotency_key = idempotency_key(&app, parsed.idempotency_key, headers, "body")?;
    let req = IngestRequest {
        event_type: parsed.event_type,
        payload: parsed.payload.get().as_bytes().to_vec(),
        content_type: "application/json".into(),
        endpoint: parsed.endpoint,
        id: parsed.id,
        idempotency_key,
        headers: Vec::new(),
    };
    respond(&app, &caller, req).await
}

/// A raw ingest's query. Unknown parameters are refused like every other route's, so that a
/// misspelt one (`?event-type=`, `?idempotencyKey=`) is a 400 rather than an event of the
/// default type, or one delivered twice.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawParams {
    event_type: Option<String>,
    id: Option<String>,
    idempotency_key: Option<String>,
}

async fn post_raw(
    State(app): State<AppState>,
    endpoint: Result<Path<String>, axum::extract::rejection::PathRejection>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let caller = require(&app, &headers, Scope::Ingest)?;
    let Path(endpoint) = endpoint.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let params: RawParams = super::query(q.as_deref())
        .inspect_err(|_| observe::ingest_rejected(&app.metrics, "malformed"))?;
    // An empty value is what a script sends with an unset variable
    // (`?idempotency_key=$KEY`): read as absent, as other routes read an empty parameter,
    // a retry would be delivered twice, and an empty header or body field is refused too.
    if let Some(name) = url::form_urlencoded::parse(q.as_deref().unwrap_or("").as_bytes())
        .find(|(k, v)| {
            v.trim().is_empty() && matches!(k.as_ref(), "idempotency_key" | "id" | "event_type")
        })
        .map(|(k, _)| k.into_owned())
    {
        observe::ingest_rejected(&app.metrics, "malformed");
        return Err(ApiError::bad_request(format!(
            "`{name}` is empty: leave the parameter out, or give it a value"
        ))
        .with_field(name));
    }
    let bytes = read_ingest(&app, &headers, body).await?;
    let event_type = match params.event_type {
        Some(t) => Some(t),
        None => header_text(&app, &headers, "x-event-type", "event_type")?,
    };
    let content_type = header_text(
        &app,
        &headers,
        header::CONTENT_TYPE.as_str(),
        "content_type",
    )?;
    // A compressed body is delivered as it came, so it goes with what it is compressed with.
    let encoding = header_text(
        &app,
        &headers,
        header::CONTENT_ENCODING.as_str(),
        "content_encoding",
    )?;
    let req = IngestRequest {
        event_type: event_type.unwrap_or_else(|| "ingest".into()),
        payload: bytes.to_vec(),
        content_type: content_type.unwrap_or_else(|| "application/octet-stream".into()),
        endpoint: Some(endpoint),
        id: params.id,
        idempotency_key: idempotency_key(&app, params.idempotency_key, &headers, "query")?,
        headers: encoding
            .map(|e| vec![(header::CONTENT_ENCODING.as_str().to_string(), e)])
            .unwrap_or_default(),
    };
    respond(&app, &caller, req).await
}

/// The request's idempotency key: `given` in the body or query (`place`), or the
/// `Idempotency-Key` header. Both, with different keys, is a 400: taking either would make
/// a retry that sends only the other a second event.
fn idempotency_key(
    app: &AppState,
    given: Option<String>,
    headers: &HeaderMap,
    place: &str,
) -> Result<Option<String>, ApiError> {
    match (given, idempotency_header(app, headers)?) {
        (Some(given), Some(header)) if given != header => {
            observe::ingest_rejected(&app.metrics, "malformed");
            Err(ApiError::bad_request(format!(
                "the Idempotency-Key header and the {place}'s idempotency_key differ: give one, or the same in both"
            ))
            .with_field("idempotency_key"))
        }
        (given, header) => Ok(given.or(header)),
    }
}

/// The `Idempotency-Key` header, if any. One that is not visible text cannot be read as a
/// key, and ignoring it would deliver a retried request twice: it is refused.
fn idempotency_header(app: &AppState, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(key) => Ok(Some(key.to_string())),
            Err(_) => {
                observe::ingest_rejected(&app.metrics, "malformed");
                Err(
                    ApiError::bad_request("the Idempotency-Key header must be visible ASCII text")
                        .with_field("idempotency_key"),
                )
            }
        },
    }
}

/// An ingest body, within `max_body_bytes` (a larger one is counted as rejected).
async fn read_ingest(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<bytes::Bytes, ApiError> {
    let (limit, timeout) = super::body_limits(app);
    read_body(body, headers, limit, timeout)
        .await
        .inspect_err(|e| {
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                observe::ingest_rejected(&app.metrics, "too_large");
            }
        })
}

/// Header `name` as text (UTF-8: a content type's parameters may hold any), if present. One
/// that is not text is refused rather than read as absent, which would deliver the body
/// under a default type (or event type) the producer did not give.
fn header_text(
    app: &AppState,
    headers: &HeaderMap,
    name: &str,
    field: &'static str,
) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => match std::str::from_utf8(v.as_bytes()) {
            Ok(text) => Ok(Some(text.to_string())),
            Err(_) => {
                observe::ingest_rejected(&app.metrics, "malformed");
                Err(
                    ApiError::bad_request(format!("the {name} header must be UTF-8 text"))
                        .with_field(field),
                )
            }
        },
    }
}

async fn respond(
    app: &AppState,
    caller: &crate::app::Caller,
    req: IngestRequest,
) -> Result<Response, ApiError> {
    match ingest(app, caller, req).await {
        Ok(accepted) => {
            let mut resp = (
                StatusCode::ACCEPTED,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                accepted.body,
            )
                .into_response();
            if accepted.repeated {
                resp.headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
            }
            Ok(resp)
        }
        Err(e) => {
            let (status, code, reason) = match &e {
                IngestError::UnknownEndpoint(_) => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unknown_endpoint",
                    "unknown_endpoint",
                ),
                IngestError::NotAllowed(_) => (StatusCode::FORBIDDEN, "forbidden", "forbidden"),
                IngestError::IdConflict(_) => (StatusCode::CONFLICT, "conflict", "id_conflict"),
                IngestError::Invalid { .. } => (StatusCode::BAD_REQUEST, "bad_request", "invalid"),
                IngestError::ShuttingDown => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "shutting_down",
                ),
                IngestError::Store(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "store"),
            };
            observe::ingest_rejected(&app.metrics, reason);
            if let IngestError::Store(s) = &e {
                tracing::error!(error = %s, "ingest could not be committed");
            }
            let err = ApiError::new(status, code, e.to_string());
            Err(match &e {
                IngestError::Invalid { field, .. } => err.with_field(*field),
                IngestError::NotAllowed(_) => err.with_field("endpoint"),
                _ => err,
            })
        }
    }
}
