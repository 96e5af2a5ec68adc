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

const AI: &str = r#"{"choices": [{"message": {"content": "Watch Arrival"}}], "model": "fake-1"}"#;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_takes_the_bearer_header_of_an_ingest_or_admin_key_only() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}[[workflows]]\nname = \"wf\"\nupstream = {{ url = \"{}\" }}\nendpoint = \"app\"\n\n[[keys]]\ntoken = \"{CALLBACK_ONLY}\"\nscopes = [\"callback\"]\n",
        endpoint("app", &rx.url("/"), ""),
        upstream.url("/v1/chat/completions"),
    ))
    .await;
    let (s, r) = c
        .post_json("/v1/ai/async", &json!({"workflow": "wf"}))
        .await;
    assert_eq!(s, 202, "{r}");
    let id = r["channel_id"].as_str().unwrap().to_string();
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
    }
    c.stop().await;
}
