//! Workflow routes: `POST /v1/ai/async`, `POST /v1/callback/{id}`, and a channel's state
//! (`GET /v1/channels/{id}`) and live updates (`GET /v1/channels/{id}/ws`).

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, AppState, read_json, require, require_any};
use crate::model::Scope;
use crate::workflows::{self, WorkflowError};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/ai/async", post(open))
        .route("/v1/callback/{id}", post(callback))
        .route("/v1/channels/{id}", get(show))
        .route("/v1/channels/{id}/ws", get(ws))
}

impl From<WorkflowError> for ApiError {
    fn from(e: WorkflowError) -> Self {
        let (status, code) = match &e {
            WorkflowError::UnknownWorkflow(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "unknown_workflow")
            }
            WorkflowError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            // A channel that timed out has had its final message, as one that completed has:
            // a callback after either is a conflict (DESIGN.md: "a second callback gets 409").
            WorkflowError::AlreadyCompleted(_)
            | WorkflowError::NotWaiting(..)
            | WorkflowError::TimedOut(_) => (StatusCode::CONFLICT, "conflict"),
            WorkflowError::Invalid(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            WorkflowError::Store(s) => return ApiError::from(s.clone()),
        };
        ApiError::new(status, code, e.to_string())
    }
}

async fn open(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    require(&app, &headers, Scope::Ingest)?;
    let (limit, timeout) = super::body_limits(&app);
    let bytes = super::read_body(body, &headers, limit, timeout).await?;
    let (workflow, request) = workflows::split_request(&bytes)?;
    let ch = workflows::open(&app, &workflow, request).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "channel_id": ch.id,
            "status": "pending",
            "ws_url": format!("/v1/channels/{}/ws", ch.id),
        })),
    )
        .into_response())
}

async fn callback(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    require(&app, &headers, Scope::Callback)?;
    let value = read_json(&app, &headers, body)
        .await?
        .unwrap_or(Value::Null);
    // (On a task of its own, as every change is: a backend that hangs up while the
    // completion is being committed does not cut it off before the final message to the
    // channel's subscribers.)
    let ch = workflows::callback(&app, &id, value).await?;
    Ok(Json(
        json!({"channel_id": ch.id, "status": ch.state.as_str()}),
    ))
}

#[derive(Deserialize, Default)]
struct TokenQuery {
    token: Option<String>,
}

const CHANNEL_SCOPES: &[Scope] = &[Scope::Ingest, Scope::Admin];

async fn show(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Result<Json<Value>, ApiError> {
    require_any(&app, &headers, q.token.as_deref(), CHANNEL_SCOPES)?;
    let ch = app
        .store
        .channel(&id)?
        .ok_or_else(|| ApiError::not_found(format!("no channel `{id}`")))?;
    Ok(Json(workflows::view(&ch)))
}

async fn ws(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    q: Result<Query<TokenQuery>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Who is asking comes first: a request without a valid token learns nothing else.
    let offered = OfferedProtocols::of(&headers);
    let token = q
        .as_ref()
        .ok()
        .and_then(|Query(q)| q.token.as_deref())
        .or(offered.token.as_deref());
    require_any(&app, &headers, token, CHANNEL_SCOPES)?;
    // The token that let the socket open: it must keep doing so (see `stream`).
    let opened_with = super::bearer(&headers).or(token).map(str::to_string);
    if let Err(e) = q {
        return Err(ApiError::bad_request(e.body_text()));
    }
    if offered.token.is_some() && !offered.courier {
        // A browser fails a connection whose answer names none of the protocols it offered,
        // and the one holding the token is never named back.
        return Err(ApiError::bad_request(format!(
            "a token sent as a WebSocket protocol needs `{PROTOCOL}` offered with it"
        )));
    }
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(format!(
            "this route is a WebSocket: connect with an upgrade request ({})",
            e.body_text()
        ))
    })?;
    // Held for the socket's life: upgraded, it no longer counts as a connection.
    let Ok(socket_permit) = app.sockets.clone().try_acquire_owned() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "too many channel sockets are open (server.max_connections); try again later",
        ));
    };
    // Answers `courier.v1` when it was offered (browsers require one of theirs back).
    // Subscribers have nothing to say but pongs and a close: a larger message ends the
    // socket instead of being buffered (the library's default would take 64 MiB).
    let upgrade = upgrade
        .protocols([PROTOCOL])
        .max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING);
    // Subscribe before reading the stored state, so nothing published in between is missed.
    let sub = Subscription {
        rx: Some(app.hub.subscribe(&id)),
        app: app.clone(),
        id: id.clone(),
    };
    let Some(ch) = app.store.channel(&id)? else {
        return Err(ApiError::not_found(format!("no channel `{id}`")));
    };
    // If the upgrade fails the closure is dropped, and the subscription with it.
    Ok(upgrade.on_upgrade(move |socket| async move {
        stream(sub, ch, socket, opened_with).await;
        drop(socket_permit);
    }))
}

/// The largest message a subscriber may send (it is read and ignored).
const MAX_INCOMING: usize = 4096;

/// The WebSocket protocol a channel's socket speaks, named back to a client that offers it.
pub const PROTOCOL: &str = "courier.v1";

/// Offered with [`PROTOCOL`], `courier.bearer.` followed by the token in unpadded base64url
/// carries the token for a browser, which cannot set headers on a WebSocket: unlike
/// `?token=`, it stays out of URLs, and so out of proxies' access logs and browser history.
pub const BEARER_PROTOCOL_PREFIX: &str = "courier.bearer.";

/// What a WebSocket request offers in `Sec-WebSocket-Protocol`.
pub(super) struct OfferedProtocols {
    /// Whether [`PROTOCOL`] is among them.
    courier: bool,
    /// The token of a `courier.bearer.…` protocol, decoded (none if it does not decode).
    pub(super) token: Option<String>,
}

impl OfferedProtocols {
    pub(super) fn of(headers: &HeaderMap) -> OfferedProtocols {
        use base64::Engine;
        let mut offered = OfferedProtocols {
            courier: false,
            token: None,
        };
        let values = headers.get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL);
        for p in values
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
        {
            if p == PROTOCOL {
                offered.courier = true;
            } else if let Some(encoded) = p.strip_prefix(BEARER_PROTOCOL_PREFIX) {
                offered.token = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(encoded)
                    .ok()
                    .and_then(|t| String::from_utf8(t).ok());
            }
        }
        offered
    }
}

/// A socket's subscription to a channel; dropping it frees the hub's entry once nobody
/// listens any more (on every path: a finished stream, a failed upgrade, an unknown channel).
struct Subscription {
    app: AppState,
    id: String,
    rx: Option<tokio::sync::broadcast::Receiver<crate::hub::Published>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The receiver goes first: the hub keeps an entry while it has receivers.
        drop(self.rx.take());
        self.app.hub.release(&self.id);
    }
}

/// How often an idle socket is pinged: proxies (nginx, load balancers) close connections
/// that carry nothing for a minute or so, and a channel may wait minutes for its callback.
pub const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(20);

/// How long one frame may take to go out: a subscriber that stops reading is dropped rather
/// than holding its task, its socket and its subscription for good.
const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends one frame within [`SEND_TIMEOUT`]; `false` if it did not go out.
async fn send(socket: &mut WebSocket, msg: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, socket.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Sends `history[from..]` of the stored channel; returns the next index and whether the
/// channel is final, or `None` if the socket or the store failed.
async fn catch_up(
    app: &AppState,
    id: &str,
    socket: &mut WebSocket,
    from: usize,
) -> Option<(usize, bool)> {
    let Ok(Some(ch)) = app.store.channel(id) else {
        return None;
    };
    for m in ch.history.iter().skip(from) {
        let text = workflows::message_text(&ch, m).into_owned();
        if !send(socket, Message::Text(text.into())).await {
            return None;
        }
    }
    Some((ch.history.len().max(from), ch.state.is_final()))
}

/// Whether `token` still opens channel sockets under the running configuration.
fn still_allowed(app: &AppState, token: Option<&str>) -> bool {
    let keys = &app.config.load().keys;
    CHANNEL_SCOPES
        .iter()
        .any(|s| crate::app::authorize(keys, token, *s).is_ok())
}

/// The close code for a policy violation (RFC 6455): the socket's key no longer admits it.
const CLOSE_POLICY: u16 = 1008;

/// Sends the latest state, then every later message in order; closes after the final one.
/// A key removed (or stripped of its scopes) by a reload ends its sockets at their next
/// message or ping, with close code 1008: what the key could read stops with it, as for
/// every later request.
async fn stream(
    mut sub: Subscription,
    ch: crate::model::Channel,
    mut socket: WebSocket,
    opened_with: Option<String>,
) {
    let app = sub.app.clone();
    let id = sub.id.clone();
    let Some(rx) = sub.rx.as_mut() else { return };
    let revoked = || !still_allowed(&app, opened_with.as_deref());
    let mut next = ch.history.len();
    let mut done = ch.state.is_final();
    if let Some(latest) = ch.history.last()
        && !send(
            &mut socket,
            Message::Text(workflows::message_text(&ch, latest).into_owned().into()),
        )
        .await
    {
        return;
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.reset(); // the first tick a whole interval from now
    while !done {
        let event = tokio::select! {
            msg = rx.recv() => Some(msg),
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                _ => continue,
            },
            _ = ping.tick() => None,
            _ = app.shutdown.cancelled() => break,
        };
        if revoked() {
            let close = axum::extract::ws::CloseFrame {
                code: CLOSE_POLICY,
                reason: "the key this socket was opened with no longer admits it".into(),
            };
            let _ = send(&mut socket, Message::Close(Some(close))).await;
            return;
        }
        match event {
            None => {
                if !send(&mut socket, Message::Ping(Default::default())).await {
                    break;
                }
            }
            Some(msg) => match msg {
                Ok(p) if p.seq < next => {}
                Ok(p) if p.seq == next => {
                    next = p.seq + 1;
                    done = p.last;
                    if !send(&mut socket, Message::Text(p.text.clone())).await {
                        break;
                    }
                }
                // A later message was published before an earlier one (their publishers
                // committed in order but ran out of order), or this receiver lagged: the
                // durable history has everything, in order.
                Ok(_) | Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {
                    let Some((n, d)) = catch_up(&app, &id, &mut socket, next).await else {
                        break;
                    };
                    next = n;
                    done = d;
                    if !done && matches!(msg, Err(RecvError::Closed)) {
                        break;
                    }
                }
            },
        }
    }
    if done {
        let _ = send(&mut socket, Message::Close(None)).await;
    }
}
