//! Endpoints as data: create, list, inspect, change, delete, pause and resume endpoints,
//! rotate their secrets, send them a test event, and see their numbers.
//!
//! API-made endpoints live in redb and survive restarts; config-file endpoints are shown but
//! read-only here (409), and win on a name clash (the API endpoint is then listed as
//! shadowed, and can still be deleted).

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState, require, time_param};
use crate::config::{ConfigError, EndpointConfig, RawEndpoint};
use crate::endpoints::{Listed, Source, StoredEndpoint};
use crate::ingest::{IngestRequest, ingest};
use crate::model::{Scope, now_ms, rfc3339};
use crate::scheduler::Scheduler;
use crate::store::EndpointWrite;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/endpoints", post(create).get(list))
        .route(
            "/v1/endpoints/{name}",
            get(show).patch(patch).delete(delete),
        )
        .route("/v1/endpoints/{name}/pause", post(pause))
        .route("/v1/endpoints/{name}/resume", post(resume))
        .route("/v1/endpoints/{name}/secret/rotate", post(rotate))
        .route("/v1/endpoints/{name}/test", post(test_send))
        .route("/v1/endpoints/{name}/stats", get(stats))
}

/// Default overlap of an old secret after a rotation.
const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 3600);

fn fingerprint(secret: &str) -> String {
    hex::encode(&Sha256::digest(secret.as_bytes())[..6])
}

fn view(l: &Listed) -> Value {
    let ep = &l.endpoint;
    let now = now_ms();
    let mut secrets: Vec<Value> = ep
        .secrets
        .iter()
        .map(|s| json!({"fingerprint": fingerprint(s), "expires_at": null}))
        .collect();
    secrets.extend(
        ep.retiring_secrets
            .iter()
            .filter(|(_, until)| *until > now)
            .map(
                |(s, until)| json!({"fingerprint": fingerprint(s), "expires_at": rfc3339(*until)}),
            ),
    );
    let mut v = json!({
        "name": ep.name,
        "source": match l.source { Source::Config => "config", Source::Api => "api" },
        "url": shown_url(&ep.url),
        "event_types": ep.event_types,
        "ordering": match ep.ordering { crate::config::Ordering::Fifo => "fifo", crate::config::Ordering::Unordered => "unordered" },
        "max_in_flight": ep.max_in_flight,
        "rate_limit": ep.rate_limit.map(|r| r.to_string()),
        "timeout_ms": ep.timeout.as_millis() as u64,
        "schedule_ms": ep.schedule.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
        "headers": shown_headers(&ep.headers),
        "transforms": ep.transforms,
        "backoff": ep.backoff,
        "paused": ep.paused,
        "secrets": secrets,
        "tenant": l.stored.as_ref().and_then(|s| s.tenant.clone()),
        "description": l.stored.as_ref().and_then(|s| s.description.clone()),
        "created_at": l.stored.as_ref().map(|s| rfc3339(s.created_ms)),
        "updated_at": l.stored.as_ref().map(|s| rfc3339(s.updated_ms)),
    });
    if l.shadowed {
        v["shadowed"] = true.into();
        v["shadowed_by"] = "config".into();
    }
    v
}

/// What an endpoint URL's password is shown as.
const REDACTED: &str = "redacted";

/// An endpoint URL with its password (sent as Basic auth) replaced: shown, like a secret's
/// fingerprint, without giving the credential away.
fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some(REDACTED));
    }
    shown.to_string()
}

/// Whether an extra header's value is a credential (by its name), shown as [`REDACTED`].
fn sensitive_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    matches!(
        n.as_str(),
        "authorization" | "proxy-authorization" | "cookie"
    ) || [
        "token",
        "secret",
        "key",
        "auth",
        "password",
        "session",
        "signature",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// An endpoint's extra headers with the credentials among them redacted.
fn shown_headers(headers: &std::collections::BTreeMap<String, String>) -> Value {
    headers
        .iter()
        .map(|(k, v)| {
            let v = if sensitive_header(k) { REDACTED } else { v };
            (k.clone(), Value::String(v.to_string()))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn listed(app: &AppState, name: &str) -> Option<Listed> {
    let endpoint = app.endpoints.get(name)?;
    let source = app.endpoints.source(name)?;
    Some(Listed {
        endpoint,
        source,
        stored: if source == Source::Api {
            app.endpoints.stored(name)
        } else {
            None
        },
        shadowed: false,
    })
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("no endpoint `{name}`"))
}

fn read_only(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "read_only",
        format!(
            "endpoint `{name}` is defined in the config file; change it there (the file hot-reloads)"
        ),
    )
}

/// The API endpoint `name`, or why it cannot be changed here.
fn api_endpoint(app: &AppState, name: &str) -> Result<StoredEndpoint, ApiError> {
    match app.endpoints.source(name) {
        Some(Source::Config) => Err(read_only(name)),
        _ => app.endpoints.stored(name).ok_or_else(|| not_found(name)),
    }
}

fn invalid(e: ConfigError) -> ApiError {
    match e {
        ConfigError::Invalid { key, message } => {
            let field = key.split(['.', '[']).next().unwrap_or(&key).to_string();
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_endpoint",
                format!("{key}: {message}"),
            )
            .with_field(field)
        }
        other => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_endpoint",
            other.to_string(),
        ),
    }
}

/// Fields an endpoint's listing shows that a request cannot set, with what to do instead:
/// a body edited from a listing is told what to change rather than only that the field is
/// unknown.
const SHOWN_ONLY: &[(&str, &str)] = &[
    (
        "timeout_ms",
        "is how listings show `timeout`; set `timeout`, a duration such as \"10s\"",
    ),
    (
        "schedule_ms",
        "is how listings show `schedule`; set `schedule`, durations such as [\"0s\", \"5s\"]",
    ),
    ("source", "is read-only (where the endpoint was made)"),
    (
        "paused",
        "is read-only here: use POST /v1/endpoints/{name}/pause or /resume",
    ),
    ("created_at", "is read-only"),
    ("updated_at", "is read-only"),
    ("shadowed", "is read-only"),
    ("shadowed_by", "is read-only"),
    ("warnings", "is read-only"),
];

/// Splits a request body into the endpoint spec and the API-only fields.
fn parse_spec(
    obj: Map<String, Value>,
) -> Result<(RawEndpoint, Option<String>, Option<String>), ApiError> {
    let mut obj = obj;
    if let Some((k, why)) = SHOWN_ONLY.iter().find(|(k, _)| obj.contains_key(*k)) {
        return Err(ApiError::bad_request(format!("{k}: {why}")).with_field(*k));
    }
    // Listings show each secret as its fingerprint: sent back, they are not secrets.
    if obj
        .get("secrets")
        .and_then(Value::as_array)
        .is_some_and(|l| l.iter().any(|s| s.get("fingerprint").is_some()))
    {
        return Err(ApiError::bad_request(
            "secrets: listings show fingerprints, not secrets; give `whsec_` secrets, leave `secrets` out to keep the endpoint's, or rotate with POST /v1/endpoints/{name}/secret/rotate",
        )
        .with_field("secrets"));
    }
    let take_str = |obj: &mut Map<String, Value>, k: &str| -> Result<Option<String>, ApiError> {
        match obj.remove(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::bad_request(format!("{k}: must be a string")).with_field(k)),
        }
    };
    let tenant = take_str(&mut obj, "tenant")?;
    let description = take_str(&mut obj, "description")?;
    crate::config::check_labels(tenant.as_deref(), description.as_deref()).map_err(invalid)?;
    let spec: RawEndpoint = serde_path_to_error::deserialize(Value::Object(obj)).map_err(|e| {
        let path = e.path().to_string();
        let field = path.split(['.', '[']).next().unwrap_or("").to_string();
        // Without the value at fault, which may be a secret or a credential header, as the
        // config file's errors are.
        let msg = crate::config::structural_error(&e.into_inner().to_string());
        let err = ApiError::bad_request(if path == "." {
            msg.clone()
        } else {
            format!("{path}: {msg}")
        });
        if field.is_empty() || field == "." {
            // serde names an unknown or missing field inside the message.
            let named = msg.split('`').nth(1).unwrap_or("").to_string();
            if named.is_empty() {
                err
            } else {
                err.with_field(named)
            }
        } else {
            err.with_field(field)
        }
    })?;
    crate::config::check_limits(&spec, "").map_err(invalid)?;
    Ok((spec, tenant, description))
}

async fn body_object(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Map<String, Value>, ApiError> {
    match super::read_json(app, headers, body).await? {
        None => Ok(Map::new()),
        Some(Value::Object(o)) => Ok(o),
        Some(_) => Err(ApiError::bad_request("the body must be a JSON object")),
    }
}

/// Validates, stores and installs an API endpoint.
async fn save(
    app: &AppState,
    stored: StoredEndpoint,
    create: bool,
) -> Result<EndpointConfig, ApiError> {
    let built = stored.build(&app.config.load()).map_err(invalid)?;
    let name = stored.spec.name.clone();
    let written = app
        .store
        .write_endpoint(EndpointWrite {
            name: name.clone(),
            value: Some(serde_json::to_vec(&stored).expect("json")),
            create,
            drop_pending: false,
        })
        .await?;
    if !written {
        return Err(if create {
            ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("an endpoint named `{name}` already exists"),
            )
            .with_field("name")
        } else {
            not_found(&name)
        });
    }
    app.endpoints.put_api(stored, built.clone());
    // Definition changed: let its worker pick it up (or start one for waiting deliveries).
    Scheduler::wake(app, &name);
    Ok(built)
}

async fn create(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let obj = body_object(&app, &headers, body).await?;
    let (mut spec, tenant, description) = parse_spec(obj)?;
    crate::config::check_header_names(&spec.headers, "headers").map_err(invalid)?;
    let _one_change_at_a_time = app.endpoints.changes.lock().await;
    if app.endpoints.source(&spec.name) == Some(Source::Config) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "`{}` is a config-file endpoint; choose another name",
                spec.name
            ),
        )
        .with_field("name"));
    }
    let generated = spec
        .secrets
        .is_empty()
        .then(crate::deliver::sign::generate_secret);
    if let Some(s) = &generated {
        spec.secrets.push(s.clone());
    }
    let now = now_ms();
    let stored = StoredEndpoint {
        spec,
        tenant,
        description,
        paused: false,
        retiring: Vec::new(),
        created_ms: now,
        updated_ms: now,
    };
    let name = stored.spec.name.clone();
    // A delete of this name whose drop did not finish: what it left must not go to the new
    // endpoint.
    if app.store.unfinished_drops()?.contains(&name) {
        finish_drop(&app, &name, &mut 0).await?;
    }
    // A pause left by a config endpoint the file no longer defines is that endpoint's, not
    // the new one's (made perhaps for someone else): it goes, so the new endpoint is not
    // created paused without a word.
    if app.endpoints.config_paused(&name) {
        set_config_paused(&app, &name, false).await?;
    }
    let built = save(&app, stored, true).await?;
    tracing::info!(endpoint = %name, "endpoint created through the API");
    let mut v = view(&listed(&app, &name).ok_or_else(|| not_found(&name))?);
    add_warnings(&app, &built, &mut v);
    if let Some(s) = generated {
        // Shown once: courier keeps it but never displays it again.
        v["secret"] = s.into();
    }
    Ok((StatusCode::CREATED, Json(v)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListParams {
    tenant: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

async fn list(
    State(app): State<AppState>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let p: ListParams = super::query(q.as_deref())?;
    let limit = super::limit_param(p.limit, 100)?;
    let (items, next) = app.endpoints.list(
        p.tenant.as_deref().filter(|t| !t.is_empty()),
        p.cursor.as_deref(),
        limit,
    );
    Ok(Json(
        json!({"data": items.iter().map(view).collect::<Vec<_>>(), "next_cursor": next}),
    ))
}

async fn show(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let l = listed(&app, &name).ok_or_else(|| not_found(&name))?;
    Ok(Json(view(&l)))
}

async fn patch(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let changes = body_object(&app, &headers, body).await?;
    let fields: Vec<String> = changes.keys().cloned().collect();
    let _one_change_at_a_time = app.endpoints.changes.lock().await;
    let current = api_endpoint(&app, &name)?;
    if changes
        .get("name")
        .is_some_and(|n| n.as_str() != Some(name.as_str()))
    {
        return Err(
            ApiError::bad_request("name: an endpoint cannot be renamed; create a new one")
                .with_field("name"),
        );
    }
    let mut merged = match serde_json::to_value(&current.spec).expect("json") {
        Value::Object(o) => o,
        _ => unreachable!("a spec is an object"),
    };
    merged.insert(
        "tenant".into(),
        current.tenant.clone().map_or(Value::Null, Value::String),
    );
    merged.insert(
        "description".into(),
        current
            .description
            .clone()
            .map_or(Value::Null, Value::String),
    );
    let given_headers = changes.get("headers").and_then(Value::as_object).cloned();
    for (k, v) in changes {
        if v.is_null() {
            merged.remove(&k);
        } else {
            merged.insert(k, v);
        }
    }
    // `headers` replaces the endpoint's headers but for its credentials: those are shown
    // redacted, so an edit of what was shown may leave them out without meaning to remove
    // them; one left out keeps its value, and `"name": null` removes one (as `"headers":
    // null` removes them all).
    if let Some(given) = &given_headers {
        let mut headers: Map<String, Value> = given
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in &current.spec.headers {
            if sensitive_header(k) && !given.keys().any(|g| g.eq_ignore_ascii_case(k)) {
                headers.insert(k.clone(), Value::String(v.clone()));
            }
        }
        merged.insert("headers".into(), Value::Object(headers));
    }
    // Credentials kept from before (a URL password, credential headers: shown redacted) go
    // on to the same server only: moved elsewhere, they would reach a host their owner never
    // gave them to, on the word of someone who was only shown them redacted.
    let old_url = url::Url::parse(&current.spec.url).ok();
    let new_url = merged
        .get("url")
        .and_then(Value::as_str)
        .and_then(|u| url::Url::parse(u).ok());
    let same_server = match (&new_url, &old_url) {
        (Some(n), Some(o)) => {
            n.scheme() == o.scheme()
                && n.host() == o.host()
                && n.port_or_known_default() == o.port_or_known_default()
        }
        _ => false,
    };
    // A URL sent back as it was shown (its password redacted) keeps the password it has.
    if let (Some(mut new_url), Some(old_url)) = (new_url, old_url)
        && new_url.password() == Some(REDACTED)
        && new_url.username() == old_url.username()
        && old_url.password().is_some()
    {
        if !same_server {
            return Err(ApiError::bad_request(
                "url: the password is shown redacted and is kept only for the same scheme, host and port; give it again to use it elsewhere",
            )
            .with_field("url"));
        }
        let _ = new_url.set_password(old_url.password());
        merged.insert("url".into(), Value::String(new_url.to_string()));
    }
    // Credential headers sent back as shown, or not sent, keep their values — for the same
    // server only. (Names are matched in any case: they are shown lowercased.)
    if let Some(Value::Object(sent)) = merged.get_mut("headers") {
        for (k, v) in sent.iter_mut() {
            let redacted = v.as_str() == Some(REDACTED);
            let given_again =
                !redacted && given_headers.as_ref().is_some_and(|g| g.contains_key(k));
            if !sensitive_header(k) || given_again {
                continue;
            }
            if !same_server {
                return Err(ApiError::bad_request(format!(
                    "headers.{k}: a credential header is kept only for the same scheme, host and port; give it again, or remove it with `\"{k}\": null`, to point the endpoint elsewhere"
                ))
                .with_field("headers"));
            }
            if redacted {
                let stored = current
                    .spec
                    .headers
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(k))
                    .map(|(_, value)| value.clone());
                match stored {
                    Some(value) => *v = Value::String(value),
                    None => {
                        return Err(ApiError::bad_request(format!(
                            "headers.{k}: `{REDACTED}` stands for the value the endpoint has, and it has none; give the value"
                        ))
                        .with_field("headers"));
                    }
                }
            }
        }
    }
    let (spec, tenant, description) = parse_spec(merged)?;
    // Headers given now are checked as at creation; those stored before the check existed
    // are kept as they are.
    if given_headers.as_ref().is_some_and(|g| !g.is_empty()) {
        crate::config::check_header_names(&spec.headers, "headers").map_err(invalid)?;
    }
    // Every endpoint made through the API signs what it sends: a PATCH may replace the
    // secrets, not remove them (unsigned webhooks could not be told from forged ones).
    if spec.secrets.is_empty() {
        return Err(ApiError::bad_request(format!(
            "secrets: an endpoint made through the API always has a signing secret; send new ones to replace it, or use POST /v1/endpoints/{name}/secret/rotate"
        ))
        .with_field("secrets"));
    }
    let secrets_changed = spec.secrets != current.spec.secrets;
    let stored = StoredEndpoint {
        spec,
        tenant,
        description,
        paused: current.paused,
        // Secrets replaced by hand replace the rotation overlap too.
        retiring: if secrets_changed {
            Vec::new()
        } else {
            current.retiring.clone()
        },
        created_ms: current.created_ms,
        updated_ms: now_ms(),
    };
    let built = save(&app, stored, false).await?;
    // The fields named, not their values (a URL, a header or a secret may be a credential).
    tracing::info!(endpoint = %name, fields = %fields.join(","), "endpoint changed through the API");
    let mut v = view(&listed(&app, &name).ok_or_else(|| not_found(&name))?);
    add_warnings(&app, &built, &mut v);
    Ok(Json(v))
}

/// Says, in the reply's `warnings`, what the endpoint as made cannot do under the running
/// configuration (a private address that `allow_private_networks = false` refuses: every
/// delivery would die at once), as the config file's endpoints get a log line. Not refused:
/// a reload may allow it.
fn add_warnings(app: &AppState, ep: &EndpointConfig, v: &mut Value) {
    let allow = app.config.load().delivery.allow_private_networks;
    if let Some(w) = ep.unreachable_warning(allow) {
        v["warnings"] = json!([w]);
    }
}

/// `DELETE /v1/endpoints/{name}?pending=drop|keep`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    pending: Option<String>,
}

/// Pending deliveries one store command drops.
const DROP_PAGE: usize = 1000;

/// Drops every pending delivery of the deleted endpoint `name`, page by page, keeping the
/// delete's promise (see [`EndpointWrite::drop_pending`]), counting them in `dropped` (which
/// holds how many were dropped before a page that failed).
async fn finish_drop(app: &AppState, name: &str, dropped: &mut usize) -> Result<(), ApiError> {
    let reason = format!("endpoint `{name}` was deleted");
    loop {
        let n = app.store.drop_pending(name, &reason, DROP_PAGE).await?;
        crate::observe::finished(&app.metrics, name, "dropped", n as u64);
        *dropped += n;
        if n < DROP_PAGE {
            return Ok(());
        }
    }
}

/// Keeps the promise of a delete of `name` whose drop did not finish, if it still stands:
/// drops what is left, or, when a config endpoint of the name serves it now, lets the
/// promise go and leaves its queue to it (as a delete would have); how many it dropped.
async fn resume_drop(app: &AppState, name: &str) -> Result<usize, ApiError> {
    let _one_change_at_a_time = app.endpoints.changes.lock().await;
    // Kept meanwhile (at a start, by making the name again): nothing is left to do.
    if !app.store.unfinished_drops()?.iter().any(|n| n == name) {
        return Ok(0);
    }
    if app.endpoints.get(name).is_some() {
        return Ok(app.store.drop_pending(name, "", 0).await?);
    }
    let mut dropped = 0;
    finish_drop(app, name, &mut dropped).await?;
    Ok(dropped)
}

/// First wait before a failed drop is tried again, and the longest.
const DROP_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// Tries the unfinished drop of `name` again in the background, waiting longer each time (up
/// to a minute), until it is done or courier stops (the next start finishes it then).
fn retry_drop(app: &AppState, name: String) {
    let app2 = app.clone();
    app.tasks.spawn(async move {
        let mut wait = DROP_RETRY.0;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = app2.shutdown.cancelled() => return,
            }
            match resume_drop(&app2, &name).await {
                Ok(n) => {
                    tracing::info!(endpoint = %name, pending_dropped = n, "finished an endpoint delete's drop");
                    return;
                }
                Err(e) => {
                    tracing::warn!(endpoint = %name, error = %e.message, "cannot finish an endpoint delete's drop yet; trying again");
                    wait = (wait * 2).min(DROP_RETRY.1);
                }
            }
        }
    });
}

/// At start-up: finishes the drops of deletes that courier stopped (or failed) in the
/// middle of. A name a config endpoint serves now keeps its queue, as a delete would have.
pub async fn finish_unfinished_drops(app: &AppState) {
    let names = match app.store.unfinished_drops() {
        Ok(n) => n,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the unfinished endpoint deletes");
            return;
        }
    };
    for name in names {
        match resume_drop(app, &name).await {
            Ok(n) => {
                tracing::info!(endpoint = %name, pending_dropped = n, "finished an interrupted endpoint delete")
            }
            Err(e) => {
                tracing::error!(endpoint = %name, error = %e.message, "cannot finish an interrupted endpoint delete; trying again in the background");
                retry_drop(app, name);
            }
        }
    }
}

async fn delete(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let params: DeleteParams = super::query(q.as_deref())?;
    let drop_pending = match params.pending.as_deref() {
        None | Some("drop") => true,
        Some("keep") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "pending: `{other}` is neither `drop` nor `keep`"
            )));
        }
    };
    // A stored API endpoint can be deleted even while a config endpoint of the same name
    // shadows it (that is how the clash is cleared from the API side; the config endpoint
    // stays). Without one, say why: read-only config endpoint, or no such endpoint.
    let _one_change_at_a_time = app.endpoints.changes.lock().await;
    if app.endpoints.stored(&name).is_none() {
        api_endpoint(&app, &name)?;
    }
    let config_stays = app.endpoints.source(&name) == Some(Source::Config);
    // A pause belongs to the name: the API endpoint's pause, holding the queue the config
    // endpoint of the name took over, stays with the name (the config endpoint's) until a
    // resume, rather than going with the definition.
    if config_stays
        && app.endpoints.stored(&name).is_some_and(|s| s.paused)
        && !app.endpoints.config_paused(&name)
    {
        set_config_paused(&app, &name, true).await?;
    }
    if !app
        .store
        .write_endpoint(EndpointWrite {
            name: name.clone(),
            value: None,
            create: false,
            drop_pending: drop_pending && !config_stays,
        })
        .await?
    {
        return Err(not_found(&name));
    }
    app.endpoints.remove_api(&name);
    Ok(Json(after_delete(&app, &name, drop_pending).await))
}

/// The rest of a delete of the API endpoint `name` once it is committed and gone from the
/// registry: drops what was queued for it (unless kept); the reply.
async fn after_delete(app: &AppState, name: &str, drop_pending: bool) -> Value {
    // Events that found it before it went are in the journal's queue once their ingests
    // have given back their passes (or never will be: a producer that hung up before its
    // event was handed over), and in the writer's once the journal has passed them on, even
    // if their producers hung up since; the drop below comes after them.
    app.endpoints.ingest_gate.wait_out().await;
    app.store.journal_barrier().await;
    // Its worker stops. What was queued for it is dropped (an endpoint made later under the
    // same name, perhaps for someone else, must not receive it) unless the caller keeps it,
    // or a config endpoint of that name still serves it.
    app.scheduler.notify_all();
    let mut dropped = 0;
    let gone = app.endpoints.get(name).is_none();
    if gone {
        app.scheduler.forget(name);
    }
    if drop_pending
        && gone
        && let Err(e) = finish_drop(app, name, &mut dropped).await
    {
        // The delete is committed, and with it the promise to drop the rest: a retried
        // DELETE would find nothing to delete, so the answer says what happened.
        tracing::warn!(endpoint = %name, pending_dropped = dropped, error = %e.message, "endpoint deleted through the API; the rest of its queue is dropped later");
        retry_drop(app, name.to_string());
        return json!({
            "deleted": name,
            "pending_dropped": dropped,
            "pending_drop_unfinished": true,
            "note": format!(
                "the endpoint is deleted and sends nothing more; dropping its queue failed after {dropped} ({}): the rest is dropped in the background, at the next start, or before the name is made again",
                e.message
            ),
        });
    }
    tracing::info!(endpoint = %name, pending_dropped = dropped, "endpoint deleted through the API");
    json!({"deleted": name, "pending_dropped": dropped})
}

/// Pauses or resumes the name's config-file definition: durably first (courier's to hold
/// across restarts and reloads), then in the registry.
async fn set_config_paused(app: &AppState, name: &str, paused: bool) -> Result<(), ApiError> {
    app.store.set_config_paused(name, paused).await?;
    app.endpoints.set_config_paused(name, paused);
    Ok(())
}

async fn set_paused(
    app: AppState,
    headers: HeaderMap,
    name: String,
    paused: bool,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let _one_change_at_a_time = app.endpoints.changes.lock().await;
    let source = app.endpoints.source(&name);
    if !paused {
        // A pause belongs to the name (see `endpoints::Inner::refresh`): a resume lifts it
        // from both definitions the name may have, the file's and the API's, whichever
        // was paused and whichever is in effect now.
        if source.is_none() {
            return Err(not_found(&name));
        }
        if source == Some(Source::Config) || app.endpoints.config_paused(&name) {
            set_config_paused(&app, &name, false).await?;
        }
        if let Some(mut stored) = app.endpoints.stored(&name)
            && stored.paused
        {
            stored.paused = false;
            stored.updated_ms = now_ms();
            save(&app, stored, false).await?;
        }
        Scheduler::wake(&app, &name);
    } else if source == Some(Source::Config) {
        // The file defines the endpoint; whether it sends is courier's to hold, durably,
        // across restarts and reloads, until it is resumed.
        set_config_paused(&app, &name, paused).await?;
        Scheduler::wake(&app, &name);
    } else {
        let mut stored = api_endpoint(&app, &name)?;
        stored.paused = paused;
        stored.updated_ms = now_ms();
        save(&app, stored, false).await?;
    }
    tracing::info!(endpoint = %name, paused, "endpoint {}", if paused { "paused" } else { "resumed" });
    Ok(Json(view(
        &listed(&app, &name).ok_or_else(|| not_found(&name))?,
    )))
}

async fn pause(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_paused(app, headers, name, true).await
}

async fn resume(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_paused(app, headers, name, false).await
}

async fn rotate(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let opts = body_object(&app, &headers, body).await?;
    let _one_change_at_a_time = app.endpoints.changes.lock().await;
    let mut stored = api_endpoint(&app, &name)?;
    // A misspelt option (`grace_period`) would otherwise rotate with the default grace,
    // keeping the old secret signing for a day after the leak it was meant to close.
    if let Some(k) = opts
        .keys()
        .find(|k| !matches!(k.as_str(), "grace" | "secret"))
    {
        return Err(ApiError::bad_request(format!(
            "unknown field `{k}`, expected `grace` or `secret`"
        ))
        .with_field(k.clone()));
    }
    let grace = match opts.get("grace") {
        None | Some(Value::Null) => DEFAULT_GRACE,
        Some(Value::String(g)) => crate::config::parse_duration(g)
            .map_err(|m| ApiError::bad_request(format!("grace: {m}")).with_field("grace"))?,
        Some(_) => {
            return Err(
                ApiError::bad_request("grace: must be a duration like \"24h\"").with_field("grace"),
            );
        }
    };
    let secret = match opts.get("secret") {
        None | Some(Value::Null) => crate::deliver::sign::generate_secret(),
        Some(Value::String(s)) => {
            crate::deliver::sign::decode_secret(s).map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_endpoint",
                    format!("secret: {e}"),
                )
                .with_field("secret")
            })?;
            s.clone()
        }
        Some(_) => {
            return Err(
                ApiError::bad_request("secret: must be a whsec_ string").with_field("secret")
            );
        }
    };
    let now = now_ms();
    let until = now.saturating_add(grace.as_millis().try_into().unwrap_or(u64::MAX));
    // Every secret signed with before now retires by `until` at the latest: a zero grace
    // (the step after a leak) drops them all at once, earlier rotations' overlaps included.
    stored
        .retiring
        .retain(|(_, u)| *u > now && !grace.is_zero());
    // Every attempt is signed with each secret still valid: rotations in quick succession
    // must not pile them up without bound.
    let kept = stored.retiring.len() + stored.spec.secrets.len();
    if !grace.is_zero() && kept + 1 > crate::config::MAX_SECRETS {
        let first_free = stored.retiring.iter().map(|(_, u)| *u).min().unwrap_or(now);
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_secrets",
            format!(
                "{kept} secrets are still valid (at most {} at once): rotate with a grace of 0s, or after {}",
                crate::config::MAX_SECRETS,
                rfc3339(first_free)
            ),
        ));
    }
    for (_, u) in &mut stored.retiring {
        *u = (*u).min(until);
    }
    for old in std::mem::replace(&mut stored.spec.secrets, vec![secret.clone()]) {
        if !grace.is_zero() {
            stored.retiring.push((old, until));
        }
    }
    stored.updated_ms = now;
    save(&app, stored, false).await?;
    tracing::info!(endpoint = %name, grace_s = grace.as_secs(), "endpoint secret rotated");
    Ok(Json(json!({
        "name": name,
        "secret": secret,
        "previous_secrets_expire_at": (!grace.is_zero()).then(|| rfc3339(until)),
    })))
}

async fn test_send(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let caller = require(&app, &headers, Scope::Admin)?;
    let ep = app.endpoints.get(&name).ok_or_else(|| not_found(&name))?;
    if ep.paused {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "paused",
            format!("endpoint `{name}` is paused; resume it first"),
        ));
    }
    let payload = json!({
        "type": "courier.test",
        "endpoint": name,
        "timestamp": rfc3339(now_ms()),
        "message": "a test event sent from courier",
    });
    let accepted = ingest(
        &app,
        &caller,
        IngestRequest {
            event_type: "courier.test".into(),
            payload: payload.to_string().into_bytes(),
            content_type: "application/json".into(),
            endpoint: Some(name.clone()),
            id: None,
            idempotency_key: None,
            headers: Vec::new(),
        },
    )
    .await
    .map_err(|e| match e {
        // Deleted (or paused away) between the look-up above and the ingest.
        crate::ingest::IngestError::UnknownEndpoint(_) => not_found(&name),
        e => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            e.to_string(),
        ),
    })?;
    let reply: crate::ingest::IngestReply = serde_json::from_slice(&accepted.body).expect("reply");
    let id = reply.deliveries[0].id.clone();
    // Wait for the first attempt (bounded by the endpoint's timeout, and a minute at most:
    // the attempt goes on, and the delivery shows how it ended).
    let deadline =
        Instant::now() + ep.timeout.min(Duration::from_secs(60)) + Duration::from_secs(5);
    loop {
        let attempts = app.store.attempts(&id)?;
        if let Some(a) = attempts.first() {
            let d = app.store.delivery(&id)?;
            return Ok(Json(json!({
                "event_id": reply.id,
                "delivery_id": id,
                "status": d.map(|d| d.status.as_str()),
                "success": a.status_code.is_some_and(|s| (200..300).contains(&s)),
                "attempt": super::views::attempt(a),
            })));
        }
        if Instant::now() > deadline {
            return Ok(Json(
                json!({"event_id": reply.id, "delivery_id": id, "status": "pending", "attempt": null}),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StatsParams {
    since: Option<String>,
}

async fn stats(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Admin)?;
    let p: StatsParams = super::query(q.as_deref())?;
    let l = listed(&app, &name).ok_or_else(|| not_found(&name))?;
    let since = time_param("since", p.since.as_deref())?
        .unwrap_or(now_ms().saturating_sub(24 * 3600 * 1000));
    let store = app.store.clone();
    let ep = name.clone();
    let attempts = tokio::task::spawn_blocking(move || store.attempt_stats(since, Some(&ep)))
        .await
        .map_err(ApiError::internal)??;
    let h = app.scheduler.health(&name);
    let counts = app.store.counts();
    let count =
        |s: crate::model::DeliveryStatus| counts.get(&(name.clone(), s)).copied().unwrap_or(0);
    use crate::model::DeliveryStatus as S;
    let (delivered, dead) = (count(S::Delivered), count(S::Dead));
    Ok(Json(json!({
        "name": name,
        "source": match l.source { Source::Config => "config", Source::Api => "api" },
        "paused": l.endpoint.paused,
        "since": rfc3339(since),
        "circuit": h.state(),
        "consecutive_failures": h.consecutive_failures,
        "held_until": h.held_until_ms.filter(|t| *t > crate::model::now_ms()).map(rfc3339),
        "next_probe_at": h.next_probe_ms(app.config.load().delivery.circuit_probe_interval).map(rfc3339),
        "queue_depth": count(S::Pending),
        "counts": {"pending": count(S::Pending), "delivered": delivered, "dead": dead, "dropped": count(S::Dropped)},
        "success_rate": (delivered + dead > 0).then(|| delivered as f64 / (delivered + dead) as f64),
        "attempts": attempts.attempts,
        "attempt_success_rate": super::stats::rate(attempts.successes, attempts.attempts),
        "attempts_per_delivery": super::stats::rate(attempts.attempts, attempts.first_attempts),
        "latency_ms": super::stats::latency(&attempts),
        "last_attempt_at": h.last_attempt_ms.map(rfc3339),
        "last_success_at": h.last_success_ms.map(rfc3339),
        "sampled": false,
    })))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::model::DeliveryStatus;
    use crate::store::EndpointWrite;

    const TOKEN: &str = "test-token-0123456789";
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    /// A delete is committed before its queue is dropped: a drop that fails then answers
    /// what was done (the endpoint is gone, a retried DELETE would be a 404) rather than an
    /// error, and the rest is dropped in the background once the database writes again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delete_whose_drop_fails_says_so_and_the_rest_is_dropped_later() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[keys]]\ntoken = \"{TOKEN}\"\nscopes = [\"ingest\", \"admin\"]\n",
            dir.path().join("data").display()
        );
        let config = crate::config::Config::parse(&text, dir.path(), None, "test.toml").unwrap();
        let running = crate::server::start(config).await.unwrap();
        let app = running.app.clone();
        let http = reqwest::Client::new();
        let base = format!("http://{}", running.addr);
        let call = |method: reqwest::Method, path: &str, body: serde_json::Value| {
            http.request(method, format!("{base}{path}"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
        };
        let r = call(
            reqwest::Method::POST,
            "/v1/endpoints",
            serde_json::json!({"name": "shop", "url": "https://example.com/h", "secrets": [SECRET]}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 201);
        let r = call(
            reqwest::Method::POST,
            "/v1/endpoints/shop/pause",
            serde_json::json!({}),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 200);
        let mut queued = Vec::new();
        for n in 0..3 {
            let r = call(
                reqwest::Method::POST,
                "/v1/events",
                serde_json::json!({"event_type": "t", "payload": {"n": n}, "endpoint": "shop"}),
            )
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
            let r: serde_json::Value = serde_json::from_str(&r).unwrap();
            queued.push(r["deliveries"][0]["id"].as_str().unwrap().to_string());
        }
        app.store.settle().await.unwrap();
        // The delete handler's commit, then its drop with the database failing.
        let committed = app
            .store
            .write_endpoint(EndpointWrite {
                name: "shop".into(),
                value: None,
                create: false,
                drop_pending: true,
            })
            .await
            .unwrap();
        assert!(committed);
        app.endpoints.remove_api("shop");
        app.store.fail_writes(true);
        let reply = super::after_delete(&app, "shop", true).await;
        app.store.fail_writes(false);
        assert_eq!(reply["deleted"], "shop", "{reply}");
        assert_eq!(reply["pending_dropped"], 0, "{reply}");
        assert_eq!(reply["pending_drop_unfinished"], true, "{reply}");
        assert!(
            reply["note"]
                .as_str()
                .unwrap()
                .contains("dropped in the background"),
            "{reply}"
        );
        // Nothing of it went anywhere meanwhile, and it is dropped without a restart.
        let deadline = Instant::now() + Duration::from_secs(20);
        for id in &queued {
            loop {
                let d = app.store.delivery(id).unwrap().unwrap();
                if d.status == DeliveryStatus::Dropped {
                    break;
                }
                assert_eq!(d.status, DeliveryStatus::Pending);
                assert!(Instant::now() < deadline, "never dropped: {id}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(app.store.unfinished_drops().unwrap().is_empty());
        drop(app);
        running.shutdown().await;
    }
}
