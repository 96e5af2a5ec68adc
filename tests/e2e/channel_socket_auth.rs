//! Who may subscribe to `GET /v1/channels/{id}/ws` with the token in the
//! `Authorization: Bearer` header: an ingest or admin key (any of them), not a callback-only
//! key (403) nor an unknown or missing token (401).

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::Request;

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

const CALLBACK_ONLY: &str = "test-callback-only-token1";

/// A socket request for channel `id`, with `Authorization: <auth>` when given.
fn ws_request(c: &Courier, id: &str, auth: Option<&str>) -> Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}/v1/channels/{id}/ws", c.base.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    if let Some(a) = auth {
        req.headers_mut()
            .insert("authorization", a.parse().unwrap());
    }
    req
}

/// The HTTP status a refused socket request got.
async fn refused(req: Request) -> u16 {
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("not an HTTP refusal: {e}"),
        Ok(_) => panic!("the socket was accepted"),
    }
}

/// Connects and returns the first text frame (the channel's latest state).
async fn first_frame(req: Request) -> Value {
    let (stream, answer) = tokio_tungstenite::connect_async(req)
        .await
        .expect("the socket is accepted");
    assert_eq!(answer.status().as_u16(), 101);
    let (_, mut read) = stream.split();
    loop {
        let msg = tokio::time::timeout(T, read.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("a frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// Courier's config: the endpoint `app` on `rx` and the workflow `wf` whose upstream is
/// `upstream`, with `extra` lines.
fn wf_config(rx: &Receiver, upstream: &Receiver, extra: &str) -> String {
    format!(
        "{DELIVERY_FAST}{}[[workflows]]\nname = \"wf\"\nupstream = {{ url = \"{}\" }}\nendpoint = \"app\"\n{extra}",
        endpoint("app", &rx.url("/"), ""),
        upstream.url("/v1/chat/completions"),
    )
}

/// Opens an async request on `wf`; its channel id.
async fn open_wf(c: &Courier) -> String {
    let (s, r) = c
        .post_json("/v1/ai/async", &json!({"workflow": "wf"}))
        .await;
    assert_eq!(s, 202, "{r}");
    r["channel_id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_takes_the_bearer_header_of_an_ingest_or_admin_key_only() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{}\n[[keys]]\ntoken = \"{CALLBACK_ONLY}\"\nscopes = [\"callback\"]\n",
        wf_config(&rx, &upstream, ""),
    ))
    .await;
    let id = open_wf(&c).await;
    // The channel finishes; a subscriber then gets its final message first.
    rx.wait_for(1, T).await;

    for (token, who) in [
        (ADMIN, "all scopes"),
        (INGEST_ONLY, "ingest only"),
        (ADMIN_ONLY, "admin only"),
    ] {
        let frame = first_frame(ws_request(&c, &id, Some(&format!("Bearer {token}")))).await;
        assert_eq!(frame["channel_id"], id.as_str(), "{who}: {frame}");
        assert_eq!(frame["status"], "success", "{who}: {frame}");
    }
    // The scheme's name in any case.
    let frame = first_frame(ws_request(&c, &id, Some(&format!("bearer {INGEST_ONLY}")))).await;
    assert_eq!(frame["status"], "success");

    // A callback-only key is known but lacks the scope: 403.
    assert_eq!(
        refused(ws_request(
            &c,
            &id,
            Some(&format!("Bearer {CALLBACK_ONLY}"))
        ))
        .await,
        403
    );
    // A wrong token, or none: 401.
    assert_eq!(
        refused(ws_request(
            &c,
            &id,
            Some("Bearer not-a-configured-token-00")
        ))
        .await,
        401
    );
    assert_eq!(refused(ws_request(&c, &id, None)).await, 401);
    // The same refusals as JSON errors, seen over plain HTTP.
    for (auth, status, code) in [
        (format!("Bearer {CALLBACK_ONLY}"), 403, "forbidden"),
        (
            "Bearer not-a-configured-token-00".to_string(),
            401,
            "unauthorized",
        ),
    ] {
        let resp = c
            .http
            .get(format!("{}/v1/channels/{id}/ws", c.base))
            .header("authorization", auth)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status);
        let body = resp.json_value().await;
        assert_eq!(body["error"]["code"], code, "{body}");
        if status == 403 {
            // Told every scope that would do.
            let msg = body["error"]["message"].as_str().unwrap();
            assert!(msg.contains("`ingest`, `admin`"), "{msg}");
        }
    }
    c.stop().await;
}

/// A channel's watch token (from the async request's 202) reads that channel, over HTTP and
/// as a socket (header, query or WebSocket protocol), and nothing else: not another channel,
/// not ingest, not a new request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_token_reads_its_own_channel_and_nothing_else() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let c = Courier::start(&wf_config(&rx, &upstream, "")).await;
    let (s, r) = c
        .post_json("/v1/ai/async", &json!({"workflow": "wf"}))
        .await;
    assert_eq!(s, 202, "{r}");
    let id = r["channel_id"].as_str().unwrap().to_string();
    let token = r["watch_token"].as_str().unwrap().to_string();
    let other = open_wf(&c).await;
    rx.wait_for(2, T).await;

    // Its own channel: over HTTP (header or query) and as a socket (header, query, protocol).
    let (s, shown) = c.get_as(&format!("/v1/channels/{id}"), Some(&token)).await;
    assert_eq!(
        (s, shown["channel_id"].as_str()),
        (200, Some(id.as_str())),
        "{shown}"
    );
    let (s, _) = c
        .get_as(&format!("/v1/channels/{id}?token={token}"), None)
        .await;
    assert_eq!(s, 200);
    let frame = first_frame(ws_request(&c, &id, Some(&format!("Bearer {token}")))).await;
    assert_eq!(frame["status"], "success", "{frame}");
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!(
            "{}/v1/channels/{id}/ws?token={token}",
            c.base.replace("http://", "ws://")
        );
        let frame = first_frame(url.into_client_request().unwrap()).await;
        assert_eq!(frame["channel_id"], id.as_str());
        let mut req = ws_request(&c, &id, None);
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&token);
        req.headers_mut().insert(
            "sec-websocket-protocol",
            format!("courier.v1, courier.bearer.{b64}").parse().unwrap(),
        );
        assert_eq!(first_frame(req).await["channel_id"], id.as_str());
    }
    // Another channel: refused.
    let (s, _) = c
        .get_as(&format!("/v1/channels/{other}"), Some(&token))
        .await;
    assert_eq!(s, 401);
    assert_eq!(
        refused(ws_request(&c, &other, Some(&format!("Bearer {token}")))).await,
        401
    );
    // No other route takes it.
    let (s, _) = c
        .post("/v1/ingest/app", Some(&token), "{}".to_string())
        .await;
    assert_eq!(s, 401);
    let (s, _) = c
        .post(
            "/v1/ai/async",
            Some(&token),
            json!({"workflow": "wf"}).to_string(),
        )
        .await;
    assert_eq!(s, 401);
    assert_eq!(
        rx.received().len(),
        2,
        "nothing was ingested with the watch token"
    );
    c.stop().await;
}

/// A socket ends when a reload takes away the key it was opened with: the callback's result
/// does not reach it, while a socket opened with a key that stays gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_ends_when_its_key_is_removed_by_a_reload() {
    const LEAVING: &str = "test-leaving-ingest-token1";
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let config = |extra_key: bool| {
        format!(
            "{}{}",
            wf_config(
                &rx,
                &upstream,
                "event_name = \"e\"\ncallback_timeout = \"60s\"\n"
            ),
            if extra_key {
                format!("[[keys]]\ntoken = \"{LEAVING}\"\nscopes = [\"ingest\"]\n")
            } else {
                String::new()
            }
        )
    };
    let c = Courier::start_file(&config(true)).await;
    let id = open_wf(&c).await;
    // The result went out and the channel waits for the backend's callback.
    rx.wait_for(1, T).await;

    let open = |token: &str| {
        let req = ws_request(&c, &id, Some(&format!("Bearer {token}")));
        async move {
            let (stream, _) = tokio_tungstenite::connect_async(req).await.unwrap();
            let (_, mut read) = stream.split();
            // The latest state first.
            loop {
                match tokio::time::timeout(T, read.next()).await.unwrap() {
                    Some(Ok(Message::Text(_))) => return read,
                    Some(Ok(_)) => {}
                    other => panic!("no first frame: {other:?}"),
                }
            }
        }
    };
    let mut leaving = open(LEAVING).await;
    let mut staying = open(INGEST_ONLY).await;

    c.rewrite_config(&config(false));
    c.wait_config(|st| st["version"] == 2).await;
    let (s, e) = c
        .post_json(&format!("/v1/callback/{id}"), &json!({"data": {"ok": 1}}))
        .await;
    assert_eq!(s, 200, "{e}");

    // The staying socket gets the final message; the leaving one a policy close, and no text.
    let last = loop {
        match tokio::time::timeout(T, staying.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Some(Ok(_)) => {}
            other => panic!("the staying socket ended: {other:?}"),
        }
    };
    assert_eq!(last["status"], "success", "{last}");
    loop {
        match tokio::time::timeout(T, leaving.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
                break;
            }
            Some(Ok(Message::Text(t))) => panic!("a revoked socket got {t}"),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
    // Nor may it open again.
    assert_eq!(
        refused(ws_request(&c, &id, Some(&format!("Bearer {LEAVING}")))).await,
        401
    );
    c.stop().await;
}
