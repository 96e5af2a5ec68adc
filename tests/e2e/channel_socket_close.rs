//! How a channel's socket ends: with a close frame and a code in every case courier ends
//! it (1000 after the final message, 1001 at shutdown, 1011 for a peer that answers no
//! ping), with its answer when the client closes, and not before a large frame has reached
//! a slow but progressing reader.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Courier with the endpoint `app` and the workflow `wf` on `upstream` (`settings`: more
/// `upstream` keys), then `extra` lines for the workflow.
async fn courier(upstream: &Receiver, settings: &str, extra: &str) -> (Receiver, Courier) {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}[[workflows]]\nname = \"wf\"\nupstream = {{ url = \"{}\"{settings} }}\nendpoint = \"app\"\n{extra}\n",
        endpoint("app", &rx.url("/"), ""),
        upstream.url("/v1/chat/completions"),
    ))
    .await;
    (rx, c)
}

/// Courier with an event-driven workflow and a channel on it waiting for its callback.
async fn waiting_channel() -> (Receiver, Receiver, Courier, String) {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let (rx, c) = courier(
        &upstream,
        "",
        "event_name = \"e\"\ncallback_timeout = \"60s\"",
    )
    .await;
    let id = open(&c).await;
    let ch = wait_channel(&c, &id, |ch| ch["status"] == "ai_generated").await;
    assert_eq!(ch["status"], "ai_generated", "{ch}");
    (upstream, rx, c, id)
}

/// Opens an async request on `wf`; its channel id.
async fn open(c: &Courier) -> String {
    let (s, r) = c
        .post_json("/v1/ai/async", &json!({"workflow": "wf"}))
        .await;
    assert_eq!(s, 202, "{r}");
    r["channel_id"].as_str().unwrap().to_string()
}

/// A socket subscribed to channel `id`.
async fn subscribe(c: &Courier, id: &str) -> Socket {
    let url = format!(
        "{}/v1/channels/{id}/ws?token={ADMIN}",
        c.base.replace("http://", "ws://")
    );
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The next text frame, as JSON (pings skipped).
async fn next_text(ws: &mut Socket) -> Value {
    loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("no text frame: {other:?}"),
        }
    }
}

/// The close frame courier sends next (pings skipped; no text may come before it).
async fn close_frame(ws: &mut Socket) -> CloseFrame {
    loop {
        match tokio::time::timeout(T, ws.next())
            .await
            .expect("a frame in time")
        {
            Some(Ok(Message::Close(Some(frame)))) => return frame,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("no close frame with a code: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_final_message_the_socket_closes_with_1000() {
    let (_upstream, _rx, c, id) = waiting_channel().await;
    let mut ws = subscribe(&c, &id).await;
    assert_eq!(next_text(&mut ws).await["status"], "ai_generated");
    let (s, e) = c
        .post_json(&format!("/v1/callback/{id}"), &json!({"data": {"ok": 1}}))
        .await;
    assert_eq!(s, 200, "{e}");
    assert_eq!(next_text(&mut ws).await["status"], "success");
    // A normal closure, not a close without a code (which browsers report as 1005).
    let frame = close_frame(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Normal, "{frame:?}");
    assert!(!frame.reason.is_empty());
    // Our answer ends the handshake; courier then closes the connection.
    assert!(
        matches!(
            tokio::time::timeout(T, ws.next()).await.unwrap(),
            None | Some(Err(_))
        ),
        "the connection stays open"
    );
    // A subscriber that connects after the end gets the final message, then the same close.
    let mut late = subscribe(&c, &id).await;
    assert_eq!(next_text(&mut late).await["status"], "success");
    assert_eq!(close_frame(&mut late).await.code, CloseCode::Normal);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_the_client_is_answered() {
    let (_upstream, _rx, c, id) = waiting_channel().await;
    let mut ws = subscribe(&c, &id).await;
    assert_eq!(next_text(&mut ws).await["status"], "ai_generated");
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    // Courier answers with a close of its own (echoing the code), rather than dropping the
    // connection (which a browser reports as 1006).
    match tokio::time::timeout(T, ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("no close answered: {other:?}"),
    }
    // And lets go of the subscription.
    c.wait_subscribers(0).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_subscribed_sockets_with_1001() {
    let (_upstream, _rx, c, id) = waiting_channel().await;
    let mut ws = subscribe(&c, &id).await;
    assert_eq!(next_text(&mut ws).await["status"], "ai_generated");
    let stopping = tokio::spawn(c.stop());
    // "Going away": the client may come back to a courier that is up again.
    let frame = close_frame(&mut ws).await;
    assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
    tokio::time::timeout(T, stopping)
        .await
        .expect("shutdown finishes")
        .unwrap();
}

/// A socket made by hand, so that it can leave pings unanswered and read at a set pace.
struct RawWs {
    stream: tokio::net::TcpStream,
}

impl RawWs {
    /// Connects to channel `id` with a receive buffer of `rcvbuf` bytes.
    async fn connect(c: &Courier, id: &str, rcvbuf: u32) -> RawWs {
        let addr = c.base.trim_start_matches("http://").parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(rcvbuf).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        let request = format!(
            "GET /v1/channels/{id}/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {ADMIN}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        // The answer's head, a byte at a time so as to read nothing past it.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.unwrap());
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        RawWs { stream }
    }

    /// The next frame (opcode, payload), its payload read at `rate` bytes a second at most
    /// (as fast as it comes without one).
    async fn frame(&mut self, rate: Option<usize>) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        self.stream.read_exact(&mut head).await?;
        let len = match head[1] & 0x7f {
            126 => self.stream.read_u16().await? as usize,
            127 => self.stream.read_u64().await? as usize,
            n => n as usize,
        };
        assert_eq!(head[1] & 0x80, 0, "a server's frames are not masked");
        let mut payload = vec![0u8; len];
        let started = Instant::now();
        let mut read = 0;
        while read < len {
            let chunk = rate.map_or(len - read, |r| (r / 20).min(len - read));
            self.stream
                .read_exact(&mut payload[read..read + chunk])
                .await?;
            read += chunk;
            if let Some(r) = rate {
                let due = started + Duration::from_secs_f64(read as f64 / r as f64);
                tokio::time::sleep_until(due.into()).await;
            }
        }
        Ok((head[0] & 0x0f, payload))
    }
}

const TEXT: u8 = 1;
const CLOSE: u8 = 8;
const PING: u8 = 9;

/// The close code of a close frame's payload.
fn close_code(payload: &[u8]) -> u16 {
    assert!(payload.len() >= 2, "a close frame without a code");
    u16::from_be_bytes([payload[0], payload[1]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_answers_no_ping_is_closed_with_1011() {
    let (_upstream, _rx, c, id) = waiting_channel().await;
    let mut raw = RawWs::connect(&c, &id, 64 << 10).await;
    let opened = Instant::now();
    let (op, first) = raw.frame(None).await.unwrap();
    assert_eq!(op, TEXT);
    assert_eq!(
        serde_json::from_slice::<Value>(&first).unwrap()["status"],
        "ai_generated"
    );
    assert_eq!(c.subscribers().await, 1);
    // Frames are read, but no ping is ever answered: pinged after 20 s, the socket is
    // closed 15 s later (`PONG_WAIT` in src/api/channels.rs).
    let limit = courier::api::PING_EVERY + Duration::from_secs(15);
    let mut pinged = false;
    let code = loop {
        let (op, payload) = tokio::time::timeout(limit + Duration::from_secs(5), raw.frame(None))
            .await
            .expect("a close in time")
            .expect("a frame");
        match op {
            PING => pinged = true,
            CLOSE => break close_code(&payload),
            other => panic!("an unexpected frame: {other}"),
        }
    };
    assert!(pinged);
    assert_eq!(code, 1011);
    let took = opened.elapsed();
    assert!(
        took >= limit - Duration::from_secs(1) && took < limit + Duration::from_secs(5),
        "closed after {took:?}"
    );
    // Courier lets go of the connection and the subscription without our answer.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(T, raw.stream.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    c.wait_subscribers(0).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_final_message_reaches_a_slow_but_steady_reader() {
    // 12 MiB, read at 512 KiB/s: 24 s, far beyond the 10 s a frame was once given whole
    // even after the 4 MiB or so the connection's buffers take at once; within the 10 s
    // plus a second a 64 KiB it is given now.
    let answer = json!({"text": "z".repeat(12 << 20)});
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(&answer.to_string()));
    let (_rx, c) = courier(&upstream, ", max_response = \"16MiB\"", "").await;
    let id = open(&c).await;
    wait_channel(&c, &id, |ch| ch["status"] == "success").await;

    let mut raw = RawWs::connect(&c, &id, 64 << 10).await;
    let (op, text) = raw.frame(Some(512 << 10)).await.expect("the whole frame");
    assert_eq!(op, TEXT);
    let last: Value = serde_json::from_slice(&text).unwrap();
    assert_eq!(last["status"], "success");
    assert_eq!(last["data"], answer);
    let (op, payload) = raw.frame(None).await.expect("a close frame");
    assert_eq!((op, close_code(&payload)), (CLOSE, 1000));
    c.stop().await;
}

/// One channel takes at most `server.max_channel_subscribers` sockets: the next is refused
/// with 429 (and its connection counted no more), and a place freed is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_refuses_subscribers_past_its_limit() {
    let (_upstream, _rx, c, id) = waiting_channel().await;
    // Read per request: set as a reload would.
    let mut config = (*c.app().config.load_full()).clone();
    config.server.max_channel_subscribers = 2;
    c.app().config.store(std::sync::Arc::new(config));
    let first = subscribe(&c, &id).await;
    let _second = subscribe(&c, &id).await;
    let url = format!(
        "{}/v1/channels/{id}/ws?token={ADMIN}",
        c.base.replace("http://", "ws://")
    );
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 429);
            let body: Value = serde_json::from_slice(r.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "too_many_subscribers", "{body}");
        }
        other => panic!("a third subscriber was not refused: {other:?}"),
    }
    drop(first);
    c.wait_subscribers(1).await;
    let _third = subscribe(&c, &id).await;
    c.wait_subscribers(2).await;
    c.stop().await;
}
