//! Workflow routes: `POST /v1/ai/async`, `POST /v1/callback/{id}`, and a channel's state
//! (`GET /v1/channels/{id}`) and live updates (`GET /v1/channels/{id}/ws`).

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{FutureExt, SinkExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

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
    let caller = require(&app, &headers, Scope::Ingest)?;
    let (limit, timeout) = super::body_limits(&app);
    let bytes = super::read_body(body, &headers, limit, timeout).await?;
    let (workflow, request) = workflows::split_request(&bytes)?;
    if !caller.may_use_workflow(&app.config.load(), &workflow) {
        return Err(workflow_forbidden(&workflow));
    }
    let ch = workflows::open(&app, &workflow, request).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "channel_id": ch.id,
            "status": "pending",
            "ws_url": format!("/v1/channels/{}/ws", ch.id),
            "watch_token": crate::app::watch_token(&app.watch_secret, &ch.id),
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
    let caller = require(&app, &headers, Scope::Callback)?;
    if caller.reach.is_some()
        && let Some(ch) = app.store.channel(&id)?
        && !caller.may_use_workflow(&app.config.load(), &ch.workflow)
    {
        return Err(workflow_forbidden(&ch.workflow));
    }
    let value = read_json(&app, &headers, body)
        .await?
        .unwrap_or(Value::Null);
    // (On a task of its own, as every change is: a backend that hangs up while the
    // completion is being committed does not cut it off before the final message to the
    // channel's subscribers.)
    let state = workflows::callback(&app, &id, value).await?;
    Ok(Json(json!({"channel_id": id, "status": state.as_str()})))
}

#[derive(Deserialize, Default)]
struct TokenQuery {
    token: Option<String>,
}

const CHANNEL_SCOPES: &[Scope] = &[Scope::Ingest, Scope::Admin];

/// A key limited by its `workflows` list asked for a workflow (or a channel of one) beyond
/// it. The same answer whether or not the workflow exists.
fn workflow_forbidden(workflow: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "this key may not use workflow `{workflow}` (it is limited by its `workflows` list)"
        ),
    )
    .with_field("workflow")
}

async fn show(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Result<Json<Value>, ApiError> {
    let token = super::bearer(&headers).or(q.token.as_deref());
    let caller = if crate::app::is_watch_token(&app.watch_secret, &id, token) {
        None
    } else {
        Some(require_any(
            &app,
            &headers,
            q.token.as_deref(),
            CHANNEL_SCOPES,
        )?)
    };
    let ch = app
        .store
        .channel(&id)?
        .ok_or_else(|| ApiError::not_found(format!("no channel `{id}`")))?;
    if let Some(c) = &caller
        && !c.may_use_workflow(&app.config.load(), &ch.workflow)
    {
        return Err(workflow_forbidden(&ch.workflow));
    }
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
    let watching = super::bearer(&headers).or(token);
    let caller = if crate::app::is_watch_token(&app.watch_secret, &id, watching) {
        None
    } else {
        Some(require_any(&app, &headers, token, CHANNEL_SCOPES)?)
    };
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
    // socket instead of being buffered (the library's default would take 64 MiB), and the
    // read buffer, allocated up front for every socket, is sized for that (not the
    // library's 128 KiB).
    // The write buffer is left as the library has it: it holds the frame being sent (the
    // library copies a whole frame in before writing it out), so a cap below the largest
    // message (an upstream answer of up to `upstream.max_response`, or a callback body)
    // would refuse that message; and as every send waits for its frame to be written out,
    // it never holds more than one message and the small control frames.
    let upgrade = upgrade
        .protocols([PROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING);
    // Subscribe before reading the stored state, so nothing published in between is missed.
    let max = app.config.load().server.max_channel_subscribers;
    let Some(rx) = app.hub.subscribe_within(&id, max) else {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_subscribers",
            format!(
                "channel `{id}` has {max} subscribers already, the most one channel takes (server.max_channel_subscribers)"
            ),
        ));
    };
    let sub = Subscription {
        rx: Some(rx),
        app: app.clone(),
        id: id.clone(),
    };
    let Some(ch) = app.store.channel(&id)? else {
        return Err(ApiError::not_found(format!("no channel `{id}`")));
    };
    if let Some(c) = &caller
        && !c.may_use_workflow(&app.config.load(), &ch.workflow)
    {
        return Err(workflow_forbidden(&ch.workflow));
    }
    // Of the stored channel only its latest message is needed: the first frame is built now
    // and the channel (its request, its upstream answer of up to `upstream.max_response`,
    // its whole history) is dropped before the socket opens, not kept for the socket's life.
    let start = Start {
        first: ch
            .history
            .last()
            .map(|m| workflows::message_text(&ch, m).into_owned()),
        next: ch.history.len(),
        done: ch.state.is_final(),
        workflow: ch.workflow.clone(),
    };
    drop(ch);
    // Tracked with courier's tasks, so that shutdown waits for the socket's close frame
    // (bounded: see `stream`) instead of exiting under it.
    let tasks = app.tasks.clone();
    // If the upgrade fails the closure is dropped, and the subscription with it.
    Ok(upgrade.on_upgrade(move |socket| {
        tasks.track_future(async move {
            stream(sub, start, socket, opened_with).await;
            drop(socket_permit);
        })
    }))
}

/// What a socket starts from: the first frame (the channel's latest message, if any), the
/// index of the next message, and whether the channel had finished.
struct Start {
    first: Option<String>,
    next: usize,
    done: bool,
    /// The channel's workflow, for keys limited by a `workflows` list.
    workflow: String,
}

/// The largest message a subscriber may send (it is read and ignored).
const MAX_INCOMING: usize = 4096;

/// A socket's read buffer: room for the largest message a subscriber may send, with its
/// frame header.
const READ_BUFFER: usize = MAX_INCOMING + 16;

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
pub const PING_EVERY: Duration = Duration::from_secs(20);

/// How long a ping may go unanswered (by its pong or any other frame) before the socket is
/// closed with [`CLOSE_ERROR`]: a peer that vanished (a laptop closed, a network gone)
/// would otherwise keep its socket, its subscription and its place under
/// `server.max_connections` until the channel ends. With a ping every [`PING_EVERY`], a
/// silent peer is closed within 35 s, near twice the ping interval. The wait counts from
/// when the client can have read the ping: behind a large frame, from when that frame
/// could have been read at [`SEND_FLOOR_RATE`].
const PONG_WAIT: Duration = Duration::from_secs(15);

/// How long a frame may take to go out, at least: a subscriber that stops reading is
/// dropped rather than holding its task, its socket and its subscription for good. A frame
/// gets this plus the time to send it at [`SEND_FLOOR_RATE`] (see [`send_limit`]).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The slowest reading (bytes a second) a subscriber is owed: a multi-MiB final message to
/// a slow but progressing client (a phone on a poor link) goes out in full.
const SEND_FLOOR_RATE: f64 = 64.0 * 1024.0;

/// How long a close handshake may take: for the close frame to go out and the client to
/// answer it (RFC 6455 §5.5.1), and for the answer to a client's close to go out.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Close codes (RFC 6455 §7.4.1). After the final message: a normal closure.
const CLOSE_NORMAL: u16 = 1000;
/// Courier is shutting down ("going away"); the client may reconnect to a courier that is
/// up again, and catch up from the latest state.
const CLOSE_GOING_AWAY: u16 = 1001;
/// The key the socket was opened with no longer admits it (a policy violation).
const CLOSE_POLICY: u16 = 1008;
/// Something unexpected ("internal error"): the peer answered no ping within [`PONG_WAIT`]
/// (the code Python's `websockets` closes with on a keepalive timeout), or courier could
/// not read the channel's history.
const CLOSE_ERROR: u16 = 1011;

/// How long a frame of `len` bytes may take to go out: [`SEND_TIMEOUT`] plus `len` at
/// [`SEND_FLOOR_RATE`] (4 MiB: 74 s).
fn send_limit(len: usize) -> Duration {
    SEND_TIMEOUT + Duration::from_secs_f64(len as f64 / SEND_FLOOR_RATE)
}

/// A subscriber's socket.
struct Peer {
    socket: WebSocket,
    shutdown: tokio_util::sync::CancellationToken,
    /// Until when the client may still be reading frames already sent, at
    /// [`SEND_FLOOR_RATE`]: a frame handed to the kernel is not yet read.
    busy_until: Instant,
}

impl Peer {
    /// Sends one frame within its [`send_limit`]; `false` if it did not go out (the socket
    /// is then unusable: a frame cut short cannot be followed by a close frame). Shutdown
    /// gives a frame under way [`CLOSE_GRACE`] more, not its whole limit.
    async fn send(&mut self, msg: Message) -> bool {
        let len = match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
            Message::Close(_) => 0,
        };
        let shutdown = self.shutdown.clone();
        let cut = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(CLOSE_GRACE).await;
        };
        // Counted from when the frame starts out: a send of a large frame ends once the
        // client has read most of it, so counting from the end would give it that time twice.
        let started = Instant::now();
        let sent = tokio::select! {
            r = tokio::time::timeout(send_limit(len), self.socket.send(msg)) => {
                matches!(r, Ok(Ok(())))
            }
            _ = cut => false,
        };
        self.busy_until =
            self.busy_until.max(started) + Duration::from_secs_f64(len as f64 / SEND_FLOOR_RATE);
        sent
    }

    /// Closes with `code` and `reason`, waiting [`CLOSE_GRACE`] at most for the client's
    /// answering close (what it sends before that is ignored), then drops the connection.
    async fn close(mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            if self.socket.send(Message::Close(Some(frame))).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = self.socket.recv().await {
                if let Message::Close(_) = m {
                    break;
                }
            }
        })
        .await;
    }

    /// Answers a close the client sent. The library queues the answer when it reads the
    /// client's close, but it goes out only with the next write: without this flush the
    /// client sees the connection dropped (a browser reports 1006) instead of a close.
    async fn answer_close(mut self) {
        let _ = tokio::time::timeout(CLOSE_GRACE, self.socket.flush()).await;
    }
}

/// Why [`catch_up`] failed.
enum CatchUpFailed {
    /// The store could not give the channel (the socket can still be closed cleanly).
    Store,
    /// A frame did not go out (the socket is unusable).
    Socket,
}

/// Sends `history[from..]` of the stored channel; returns the next index and whether the
/// channel is final.
async fn catch_up(
    app: &AppState,
    id: &str,
    peer: &mut Peer,
    from: usize,
) -> Result<(usize, bool), CatchUpFailed> {
    let Ok(Some(ch)) = app.store.channel(id) else {
        return Err(CatchUpFailed::Store);
    };
    for m in ch.history.iter().skip(from) {
        let text = workflows::message_text(&ch, m).into_owned();
        if !peer.send(Message::Text(text.into())).await {
            return Err(CatchUpFailed::Socket);
        }
    }
    Ok((ch.history.len().max(from), ch.state.is_final()))
}

/// Whether `token` still opens channel sockets under the running configuration.
fn still_allowed(app: &AppState, channel: &str, workflow: &str, token: Option<&str>) -> bool {
    // A watch token is the channel's own, not a key's: no reload revokes it.
    if crate::app::is_watch_token(&app.watch_secret, channel, token) {
        return true;
    }
    let config = app.config.load();
    CHANNEL_SCOPES.iter().any(|s| {
        crate::app::authorize(&config.keys, token, *s)
            .is_ok_and(|c| c.may_use_workflow(&config, workflow))
    })
}

/// What the socket's loop waits for.
enum Event {
    Published(Result<crate::hub::Published, RecvError>),
    Incoming(Option<Result<Message, axum::Error>>),
    Ping,
    NoAnswer,
    Shutdown,
}

/// Sends the latest state, then every later message in order; closes after the final one
/// (code 1000). A key removed (or stripped of its scopes) by a reload ends its sockets at
/// their next message or ping, with close code 1008: what the key could read stops with it,
/// as for every later request. A ping unanswered for [`PONG_WAIT`] closes with 1011, and
/// shutdown with 1001. A close from the client is answered.
async fn stream(
    mut sub: Subscription,
    start: Start,
    socket: WebSocket,
    opened_with: Option<String>,
) {
    let app = sub.app.clone();
    let id = sub.id.clone();
    let Some(rx) = sub.rx.as_mut() else { return };
    let workflow = start.workflow.clone();
    let revoked = || !still_allowed(&app, &id, &workflow, opened_with.as_deref());
    let mut peer = Peer {
        socket,
        shutdown: app.shutdown.clone(),
        busy_until: Instant::now(),
    };
    let Start {
        first,
        mut next,
        mut done,
        ..
    } = start;
    if let Some(text) = first
        && !peer.send(Message::Text(text.into())).await
    {
        return;
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    // After a long send, one ping, not a burst of those missed meanwhile.
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.reset(); // the first tick a whole interval from now
    // When the ping nothing has answered yet went out.
    let mut unanswered: Option<Instant> = None;
    while !done {
        let answer_due = unanswered.map(|at| at.max(peer.busy_until) + PONG_WAIT);
        let mut event = tokio::select! {
            msg = rx.recv() => Event::Published(msg),
            incoming = peer.socket.recv() => Event::Incoming(incoming),
            _ = ping.tick() => Event::Ping,
            _ = tokio::time::sleep_until(answer_due.unwrap_or_else(Instant::now)),
                if answer_due.is_some() => Event::NoAnswer,
            _ = app.shutdown.cancelled() => Event::Shutdown,
        };
        if let Event::NoAnswer = event
            && let Some(incoming) = peer.socket.recv().now_or_never()
        {
            // An answer already there (read late, as a long frame went out) still counts.
            event = Event::Incoming(incoming);
        }
        let msg = match event {
            Event::Incoming(Some(Ok(Message::Close(_)))) => return peer.answer_close().await,
            Event::Incoming(None | Some(Err(_))) => return,
            // Any frame (a pong, most likely) shows the peer is there; what it says is
            // ignored.
            Event::Incoming(Some(Ok(_))) => {
                unanswered = None;
                continue;
            }
            Event::NoAnswer => {
                return peer.close(CLOSE_ERROR, "no answer to ping").await;
            }
            Event::Shutdown => {
                return peer
                    .close(CLOSE_GOING_AWAY, "courier is shutting down")
                    .await;
            }
            Event::Ping => None,
            Event::Published(msg) => Some(msg),
        };
        if revoked() {
            return peer
                .close(
                    CLOSE_POLICY,
                    "the key this socket was opened with no longer admits it",
                )
                .await;
        }
        match msg {
            None => {
                if !peer.send(Message::Ping(Default::default())).await {
                    return;
                }
                unanswered.get_or_insert_with(Instant::now);
            }
            Some(msg) => match msg {
                Ok(p) if p.seq < next => {}
                Ok(p) if p.seq == next => {
                    next = p.seq + 1;
                    done = p.last;
                    if !peer.send(Message::Text(p.text.clone())).await {
                        return;
                    }
                }
                // A later message was published before an earlier one (their publishers
                // committed in order but ran out of order), or this receiver lagged: the
                // durable history has everything, in order.
                Ok(_) | Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => {
                    match catch_up(&app, &id, &mut peer, next).await {
                        Ok((n, d)) => {
                            next = n;
                            done = d;
                        }
                        Err(CatchUpFailed::Store) => {
                            return peer.close(CLOSE_ERROR, "cannot read the channel").await;
                        }
                        Err(CatchUpFailed::Socket) => return,
                    }
                    if !done && matches!(msg, Err(RecvError::Closed)) {
                        return peer.close(CLOSE_ERROR, "the channel's updates ended").await;
                    }
                }
            },
        }
    }
    peer.close(CLOSE_NORMAL, "channel finished").await;
}
