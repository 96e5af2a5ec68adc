//! Async requests and event-driven workflows: a fake upstream, the fake receiver and a real
//! WebSocket client.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

fn workflow(upstream: &Receiver, extra: &str) -> String {
    format!(
        "[[workflows]]\nname = \"movie_suggestion\"\nupstream = {{ url = \"{}\", timeout = \"5s\", retries = 1, retry_delay = \"50ms\" }}\nendpoint = \"app\"\n{extra}\n",
        upstream.url("/v1/chat/completions")
    )
}

/// An upstream answering `AI` after `delay`.
async fn answering_after(delay: Duration) -> Receiver {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI).delay(delay));
    upstream
}

/// An upstream answering `AI` at once, a receiver, and courier with the endpoint `app` on
/// that receiver and the workflow (with `extra`).
async fn started(extra: &str) -> (Receiver, Receiver, Courier) {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    started_with(upstream, extra).await
}

/// [`started`] with an upstream the test has set up.
async fn started_with(upstream: Receiver, extra: &str) -> (Receiver, Receiver, Courier) {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        endpoint("app", &rx.url("/"), ""),
        workflow(&upstream, extra)
    ))
    .await;
    (upstream, rx, c)
}

/// Courier's config with the endpoint `app` on `rx` and the workflow `movie_suggestion`
/// whose upstream is `upstream_url` with `settings` (more `upstream` keys), then `extra`.
fn with_workflow(rx: &Receiver, upstream_url: &str, settings: &str, extra: &str) -> String {
    format!(
        "{DELIVERY_FAST}{}[[workflows]]\nname = \"movie_suggestion\"\nupstream = {{ url = \"{upstream_url}\", {settings} }}\nendpoint = \"app\"\n{extra}\n",
        endpoint("app", &rx.url("/"), ""),
    )
}

/// A WebSocket subscriber collecting frames until the server closes (or `T` passes).
struct Ws {
    frames: tokio::sync::mpsc::UnboundedReceiver<Value>,
    /// Owns the socket: dropping a `Ws` drops the connection without a close frame.
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Ws {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Ws {
    async fn connect(c: &Courier, channel: &str) -> Ws {
        let url = format!(
            "{}/v1/channels/{channel}/ws?token={ADMIN}",
            c.base.replace("http://", "ws://")
        );
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        let (_, mut read) = stream.split();
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = read.next().await {
                if let Message::Text(t) = msg {
                    let _ = tx.send(serde_json::from_str::<Value>(&t).unwrap());
                }
            }
        });
        Ws { frames, reader }
    }

    async fn next(&mut self) -> Value {
        tokio::time::timeout(T, self.frames.recv())
            .await
            .expect("a frame in time")
            .expect("socket open")
    }

    /// Frames until the server closes the socket.
    async fn rest(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(Some(v)) = tokio::time::timeout(T, self.frames.recv()).await {
            out.push(v);
        }
        out
    }
}

/// A config file in `dir` for a courier run as a process of its own (to be killed and
/// restarted): the endpoint `app` on `rx` and the workflow with a callback timeout.
fn restartable(
    dir: &std::path::Path,
    upstream: &Receiver,
    rx: &Receiver,
    timeout: &str,
) -> std::path::PathBuf {
    write_config(
        dir,
        &format!(
            "{DELIVERY_FAST}{}{}",
            endpoint("app", &rx.url("/"), ""),
            workflow(
                upstream,
                &format!("event_name = \"e\"\ncallback_timeout = \"{timeout}\"")
            )
        ),
    )
}

/// Opens an async request on the courier process at `base`; its channel id.
async fn open_at(http: &reqwest::Client, base: &str) -> String {
    open_workflow_at(http, base, "movie_suggestion").await
}

/// Opens an async request of `workflow` on the courier at `base`; its channel id.
async fn open_workflow_at(http: &reqwest::Client, base: &str, workflow: &str) -> String {
    let (s, r) = post_json(
        http,
        &format!("{base}/v1/ai/async"),
        &json!({"workflow": workflow}),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    r["channel_id"].as_str().unwrap().to_string()
}

async fn open(c: &Courier, body: Value) -> String {
    let (s, r) = c.post_json("/v1/ai/async", &body).await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(r["status"], "pending");
    let id = r["channel_id"].as_str().unwrap().to_string();
    assert_eq!(r["ws_url"], format!("/v1/channels/{id}/ws"));
    id
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

#[tokio::test]
async fn a_transform_on_the_workflow_endpoint_keeps_the_channel_header() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}[[plugins]]\nname = \"redact\"\npath = \"{}\"\nkind = \"transform\"\nconfig = {{ fields = \"meta\" }}\n{}{}",
        plugin("redact").display(),
        endpoint("app", &rx.url("/hook"), "transforms = [\"redact\"]"),
        workflow(&upstream, "")
    ))
    .await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    let got = rx.wait_for(1, T).await;
    // The plugin ran (it removed `meta`), and the header courier owns is still there.
    let body = got[0].json();
    assert_eq!(body["channel_id"], id.as_str(), "{body}");
    assert!(body.get("meta").is_none(), "{body}");
    assert_eq!(got[0].header("mr-channel-id"), id);
    courier::deliver::sign::verify_mr(SECRET, &got[0].body, got[0].header("mr-signature")).unwrap();
    c.stop().await;
}

#[tokio::test]
async fn plain_async_success_reaches_the_endpoint_and_the_socket() {
    // Slow enough that the socket, however late it opens, sees the request still pending
    // (and well within the upstream timeout of 5 s).
    let upstream = answering_after(Duration::from_secs(3)).await;
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        endpoint("app", &rx.url("/hook"), ""),
        workflow(&upstream, "")
    ))
    .await;
    let id = open(&c, json!({"workflow": "movie_suggestion", "messages": [{"role": "user", "content": "a film?"}]})).await;
    assert!(is_uuid(&id), "{id}");
    let mut ws = Ws::connect(&c, &id).await;
    assert_eq!(ws.next().await["status"], "pending");
    let done = ws.next().await;
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(done["channel_id"], id.as_str());
    assert_eq!(done["data"], serde_json::from_str::<Value>(AI).unwrap());
    assert_eq!(done["meta"]["workflow"], "movie_suggestion");
    assert!(
        done["meta"]["duration_ms"].as_u64().unwrap() >= 2900,
        "{done}"
    );
    assert!(
        ws.rest().await.is_empty(),
        "the socket closes after the final message"
    );

    // The upstream got the request minus `workflow`.
    let up = upstream.received();
    assert_eq!(up.len(), 1);
    assert_eq!(
        up[0].json(),
        json!({"messages": [{"role": "user", "content": "a film?"}]})
    );
    // The endpoint got the same message as a signed webhook with mr-channel-id.
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].json(), done);
    assert_eq!(got[0].header("mr-channel-id"), id);
    courier::deliver::sign::verify_mr(SECRET, &got[0].body, got[0].header("mr-signature")).unwrap();
    // The channel's state and history.
    let (s, ch) = c.get(&format!("/v1/channels/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(ch["status"], "success");
    assert_eq!(ch["history"].as_array().unwrap().len(), 2);
    assert_eq!(ch["latest"], done);
    c.stop().await;
}

#[tokio::test]
async fn the_upstream_gets_the_request_as_written_minus_workflow() {
    let (upstream, _rx, c) = started("").await;
    // Members out of alphabetical order, a number no 64-bit type holds, an exponent.
    let raw = r#"{"zeta": 1, "workflow": "movie_suggestion", "seed": 123456789012345678901234567890, "alpha": [1e2, {"b": 2, "a": 1}]}"#;
    let (s, r) = c.post("/v1/ai/async", Some(ADMIN), raw.to_string()).await;
    assert_eq!(s, 202, "{r}");
    let got = upstream.wait_for(1, T).await;
    assert_eq!(
        String::from_utf8_lossy(&got[0].body),
        r#"{"zeta":1,"seed":123456789012345678901234567890,"alpha":[1e2, {"b": 2, "a": 1}]}"#
    );
    for (bad, says) in [
        ("[1]", "JSON object"),
        (r#"{"messages": []}"#, "workflow: required"),
        (r#"{"workflow": 7}"#, "workflow: required"),
        ("{", "JSON object"),
    ] {
        let (s, e) = c.post("/v1/ai/async", Some(ADMIN), bad.to_string()).await;
        assert_eq!(s, 400, "{bad}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{bad}: {e}"
        );
    }
    c.stop().await;
}

#[tokio::test]
async fn a_failing_upstream_ends_in_an_error_message() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(502).body("bad gateway"));
    let (upstream, rx, c) = started_with(upstream, "").await;
    let id = open(&c, json!({"workflow": "movie_suggestion", "prompt": "x"})).await;
    let got = rx.wait_for(1, T).await;
    let body = got[0].json();
    assert_eq!(body["status"], "error");
    assert!(body["error"].as_str().unwrap().contains("502"), "{body}");
    assert_eq!(
        upstream.received().len(),
        2,
        "one retry (retries = 1) on a 5xx"
    );
    let (_, ch) = c.get(&format!("/v1/channels/{id}")).await;
    assert_eq!(ch["status"], "error");
    let (s, e) = c
        .post_json("/v1/ai/async", &json!({"workflow": "nope"}))
        .await;
    assert_eq!(s, 422, "{e}");
    let (s, _) = c
        .post_json("/v1/ai/async", &json!({"prompt": "no workflow"}))
        .await;
    assert_eq!(s, 400);
    c.stop().await;
}

#[tokio::test]
async fn a_rate_limited_upstream_is_tried_again_after_its_retry_after() {
    let upstream = Receiver::start().await;
    upstream.script([Reply::status(429)
        .header("retry-after", "1")
        .body("slow down")]);
    upstream.set_default(Reply::status(200).body(AI));
    let (upstream, rx, c) = started_with(upstream, "").await;
    open(&c, json!({"workflow": "movie_suggestion"})).await;
    let body = rx.wait_for(1, T).await[0].json();
    assert_eq!(body["status"], "success", "{body}");
    assert_eq!(body["meta"]["attempts"], 2, "{body}");
    // The second try waited for the upstream's Retry-After, not the 50 ms retry_delay.
    let took = body["meta"]["duration_ms"].as_u64().unwrap();
    assert!(took >= 950, "{body}");
    assert_eq!(upstream.received().len(), 2);
    c.stop().await;
}

#[tokio::test]
async fn event_driven_flow_completes_with_the_callback() {
    let (_upstream, rx, c) = started("event_name = \"new_movie_suggestion\"").await;
    let id = open(&c, json!({"workflow": "movie_suggestion", "messages": []})).await;
    let mut ws = Ws::connect(&c, &id).await;
    let mut first = ws.next().await;
    if first["status"] == "pending" {
        first = ws.next().await;
    }
    assert_eq!(first["status"], "ai_generated", "{first}");
    assert_eq!(first["ai_response"]["model"], "fake-1");

    let hook = rx.wait_for(1, T).await[0].json();
    assert_eq!(hook["type"], "task.ai_generated");
    assert_eq!(hook["event"], "new_movie_suggestion");
    assert_eq!(hook["channel_id"], id.as_str());
    assert_eq!(hook["callback_required"], true);
    assert_eq!(hook["ai_response"]["model"], "fake-1");
    let callback_url = hook["callback_url"].as_str().unwrap();
    // A URL the backend can call: the port actually bound, not the `:0` of the config.
    assert_eq!(callback_url, format!("{}/v1/callback/{id}", c.base));

    // A second subscriber, joining now, gets the latest state first.
    let mut ws2 = Ws::connect(&c, &id).await;
    assert_eq!(ws2.next().await["status"], "ai_generated");
    // A subscriber that goes away without closing properly holds nobody up.
    let gone = Ws::connect(&c, &id).await;
    drop(gone);

    // Numbers beyond a double's precision reach the subscribers to the last digit.
    let cb: Value = serde_json::from_str(
        r#"{"data": {"movie": "Arrival", "id": 123456789012345678901234567890, "score": 0.1000000000000000055511151231257827}, "task_id": "task-1", "metadata": {"by": "backend"}}"#,
    )
    .unwrap();
    let (s, _) = c
        .post(
            &format!("/v1/callback/{id}"),
            Some(INGEST_ONLY),
            cb.to_string(),
        )
        .await;
    assert_eq!(s, 403, "the callback needs the callback scope");
    // A body that is not a callback's is refused, and the channel goes on waiting.
    for (bad, says) in [
        (
            json!({"result": {"movie": "Arrival"}}),
            "unknown field `result`",
        ),
        (json!({"task_id": "task-1"}), "needs `data`"),
        (json!({"data": 1, "metadata": "by backend"}), "`metadata`"),
        (json!({"data": 1, "task_id": {"n": 1}}), "`task_id`"),
    ] {
        let (s, e) = c.post_json(&format!("/v1/callback/{id}"), &bad).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (400, Some("bad_request")),
            "{bad}: {e}"
        );
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{e}"
        );
    }
    // A request naming `workflow` twice is refused, not read as the last one.
    let (s, e) = c
        .post(
            "/v1/ai/async",
            Some(ADMIN),
            r#"{"workflow": "movie_suggestion", "workflow": "other", "messages": []}"#.to_string(),
        )
        .await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("duplicate field `workflow`"),
        "{e}"
    );
    // A key given twice is refused, not read as the last one.
    let (s, e) = c
        .post(
            &format!("/v1/callback/{id}"),
            Some(ADMIN),
            r#"{"data": 1, "data": 2}"#.to_string(),
        )
        .await;
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("duplicate field `data`"),
        "{e}"
    );
    let (s, r) = c.post_json(&format!("/v1/callback/{id}"), &cb).await;
    assert_eq!(s, 200, "{r}");
    // The answer is the state the callback committed.
    assert_eq!(r, json!({"channel_id": id, "status": "success"}));
    let done = ws.next().await;
    assert_eq!(done["status"], "success");
    assert_eq!(done["data"], cb["data"]);
    assert_eq!(
        done["data"]["id"].to_string(),
        "123456789012345678901234567890"
    );
    assert_eq!(
        done["data"]["score"].to_string(),
        "0.1000000000000000055511151231257827"
    );
    // Its members in the order the backend gave them, not sorted.
    assert!(
        done["data"]
            .to_string()
            .starts_with(r#"{"movie":"Arrival","id":"#),
        "{}",
        done["data"]
    );
    let (_, shown) = c.get(&format!("/v1/channels/{id}")).await;
    assert!(
        shown.to_string().contains("123456789012345678901234567890"),
        "{shown}"
    );
    assert_eq!(done["ai_response"]["model"], "fake-1");
    assert_eq!(done["task_id"], "task-1");
    assert_eq!(done["metadata"]["by"], "backend");
    assert_eq!(
        ws2.next().await,
        done,
        "every subscriber receives every message"
    );

    let (s, e) = c.post_json(&format!("/v1/callback/{id}"), &cb).await;
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("conflict")));
    let (s, _) = c
        .post_json("/v1/callback/00000000-0000-4000-8000-000000000000", &cb)
        .await;
    assert_eq!(s, 404);
    let (s, _) = c
        .post(
            &format!("/v1/callback/{id}"),
            Some(ADMIN),
            "not json".to_string(),
        )
        .await;
    assert_eq!(s, 400);

    // A late subscriber gets the final state and the socket closes.
    let late = Ws::connect(&c, &id).await.rest().await;
    assert_eq!(late, vec![done]);
    c.stop().await;
}

#[tokio::test]
async fn a_large_answer_is_kept_once_per_channel_and_shown_in_every_message_that_carries_it() {
    let answer = json!({"text": format!("answer-{}", "x".repeat(200_000))});
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(&answer.to_string()));
    let (_upstream, _rx, c) = started_with(upstream, "event_name = \"e\"").await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    wait_channel(&c, &id, |ch| ch["status"] == "ai_generated").await;
    let (s, _) = c
        .post_json(&format!("/v1/callback/{id}"), &json!({"data": {"ok": 1}}))
        .await;
    assert_eq!(s, 200);
    // Shown in full wherever it was published: the channel's history and a late socket.
    let ch = wait_channel(&c, &id, |ch| ch["final"] == true).await;
    let carried: Vec<&Value> = ch["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["message"].get("ai_response"))
        .collect();
    assert_eq!(
        carried,
        vec![&answer, &answer],
        "{:?}",
        ch["latest"]["status"]
    );
    let late = Ws::connect(&c, &id).await.rest().await;
    assert_eq!(late.len(), 1);
    assert_eq!(late[0]["ai_response"], answer);
    assert_eq!(late[0], ch["latest"]);
    // Stored once in the channel (the webhook's event has its own copy).
    let stored = c.app().store.channel(&id).unwrap().unwrap();
    let copies = stored
        .ai_response
        .iter()
        .filter(|a| a.contains("answer-"))
        .count()
        + stored
            .history
            .iter()
            .filter(|m| m.message.contains("answer-"))
            .count();
    assert_eq!(copies, 1);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_takes_no_frames_is_cut_off_and_holds_nobody_up() {
    // Two answers of 3 MiB (the `ai_generated` and the final message) are more than the
    // connection's buffers hold for a client that reads nothing.
    let answer = json!({"text": "y".repeat(3 << 20)});
    let upstream = Receiver::start().await;
    upstream.set_default(
        Reply::status(200)
            .body(&answer.to_string())
            .delay(Duration::from_millis(500)),
    );
    let (_upstream, _rx, c) = started_with(upstream, "event_name = \"e\"").await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    let url = format!(
        "{}/v1/channels/{id}/ws?token={ADMIN}",
        c.base.replace("http://", "ws://")
    );
    // Connected, and never read from again.
    let (stuck, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut reader = Ws::connect(&c, &id).await;
    assert_eq!(c.subscribers().await, 2);
    while reader.next().await["status"] != "ai_generated" {}
    let (s, _) = c
        .post_json(&format!("/v1/callback/{id}"), &json!({"data": {"ok": 1}}))
        .await;
    assert_eq!(s, 200);
    // The reading subscriber gets the end at once, and its socket is closed.
    let rest = reader.rest().await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["status"], "success");
    assert_eq!(rest[0]["ai_response"], answer);
    // The other is dropped once a frame has waited for it 10 s plus the time to send it
    // at 64 KiB/s (3 MiB: 48 s).
    let started = std::time::Instant::now();
    while c.subscribers().await != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10 + 48 + 12),
            "the stuck subscriber is still subscribed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() > Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    drop(stuck);
    c.stop().await;
}

#[tokio::test]
async fn no_callback_in_time_ends_with_callback_timeout() {
    let (_upstream, _rx, c) = started("event_name = \"e\"\ncallback_timeout = \"600ms\"").await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    let ws = Ws::connect(&c, &id).await;
    let frames = ws.rest().await;
    let last = frames.last().unwrap();
    assert_eq!(
        last,
        &json!({"channel_id": id, "status": "error", "error": "callback_timeout"})
    );
    let (s, e) = c
        .post_json(&format!("/v1/callback/{id}"), &json!({"data": {}}))
        .await;
    // Too late: the channel's final message was the timeout, so this is a second answer.
    assert_eq!((s, e["error"]["code"].as_str()), (409, Some("conflict")));
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(msg.contains("timed out"), "{msg}");
    // And it changed nothing: the channel still ends with the timeout.
    let (s, ch) = c.get(&format!("/v1/channels/{id}")).await;
    assert_eq!(s, 200);
    assert_eq!(ch["latest"]["error"], "callback_timeout", "{ch}");
    c.stop().await;
}

#[tokio::test]
async fn simulation_plays_the_backend_with_inject_id() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(r#"{"title": "Arrival", "year": 2016}"#));
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}[[plugins]]\nname = \"inject-id\"\npath = \"{}\"\nkind = \"simulator\"\n",
        endpoint("app", &rx.url("/"), ""),
        // The simulated backend calls back 3 s after `ai_generated`: time for the socket,
        // however late it opens, to see that state before the last.
        workflow(&upstream, "event_name = \"e\"\nsimulate = \"inject-id\"\nsimulate_delay = \"3s\""),
        plugin("inject-id").display()
    ))
    .await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    let frames = Ws::connect(&c, &id).await.rest().await;
    let statuses: Vec<&str> = frames
        .iter()
        .map(|f| f["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.last(), Some(&"success"), "{frames:?}");
    assert!(statuses.contains(&"ai_generated"), "{frames:?}");
    let done = frames.last().unwrap();
    assert_eq!(
        done["data"],
        json!({"title": "Arrival", "year": 2016, "id": format!("sim_{id}")})
    );
    assert_eq!(
        done["ai_response"],
        json!({"title": "Arrival", "year": 2016})
    );
    assert_eq!(done["task_id"], id.as_str());
    // The webhook still went to the endpoint.
    assert_eq!(
        rx.wait_for(1, T).await[0].json()["type"],
        "task.ai_generated"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_whose_client_hangs_up_at_once_still_reaches_the_subscribers() {
    let (_upstream, rx, c) = started("event_name = \"e\"\ncallback_timeout = \"60s\"").await;
    // The backend sends the whole callback and resets the connection a moment later (its
    // own timeout, say), at a different moment for each channel, so that some resets land
    // while courier is committing the completion.
    for (n, reset_after_us) in (0..=3000).step_by(200).enumerate() {
        let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
        rx.wait_for(n + 1, T).await;
        let mut ws = Ws::connect(&c, &id).await;
        while ws.next().await["status"] != "ai_generated" {}
        let body = format!(r#"{{"data": {{"n": {n}}}}}"#);
        let request = format!(
            "POST /v1/callback/{id} HTTP/1.1\r\nhost: courier\r\nauthorization: Bearer {ADMIN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        // Again if the reset came before courier read the request (then nothing happened).
        for _ in 0..20 {
            send_then_reset(&c.base, &request, Duration::from_micros(reset_after_us)).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (_, ch) = c.get(&format!("/v1/channels/{id}")).await;
            if ch["status"] != "ai_generated" {
                break;
            }
        }
        // The channel completed (the callback was committed), and its subscriber hears it.
        let (_, ch) = c.get(&format!("/v1/channels/{id}")).await;
        assert_eq!(ch["status"], "success", "{ch}");
        let last = tokio::time::timeout(Duration::from_secs(5), ws.frames.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("reset after {reset_after_us} µs: the subscriber never heard the end")
            })
            .expect("socket open");
        assert_eq!(last["status"], "success", "{last}");
        assert_eq!(last["data"], json!({"n": n}));
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_past_the_deadline_is_too_late_even_before_the_timer_has_run() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = restartable(dir.path(), &upstream, &rx, "1s");
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    // Many channels, so that after the restart their overdue timers take a while to run:
    // the last one opened has the latest deadline and its timer runs last.
    const N: usize = 300;
    let mut id = String::new();
    for _ in 0..N {
        id = open_at(&http, &p.base).await;
    }
    rx.wait_for(N, T).await; // every ai_generated webhook went out: the deadlines are set
    // courier is down when the deadlines pass; the backend calls back the moment it is up
    // again, racing the timers that are now overdue.
    p.kill9();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let p2 = Process::spawn(&cfg);
    let (s, e) = post_json(
        &http,
        &format!("{}/v1/callback/{id}", p2.base),
        &json!({"data": {"late": true}}),
    )
    .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{e}"
    );
    let (_, ch) = get_json(&http, &format!("{}/v1/channels/{id}", p2.base)).await;
    assert_eq!(ch["final"], true, "{ch}");
    assert_eq!(ch["latest"]["error"], "callback_timeout", "{ch}");
    let statuses: Vec<&str> = ch["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["message"]["status"].as_str().unwrap())
        .collect();
    assert!(!statuses.contains(&"success"), "{ch:#}");
    assert_eq!(
        statuses.iter().filter(|s| **s == "error").count(),
        1,
        "{ch:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_timer_survives_a_restart_and_fires_once() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = restartable(dir.path(), &upstream, &rx, "2s");
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    let id = open_at(&http, &p.base).await;
    rx.wait_for(1, T).await; // the ai_generated webhook went out: the timer is armed
    p.kill9();
    let p2 = Process::spawn(&cfg);
    let deadline = std::time::Instant::now() + T;
    let ch = loop {
        let (_, ch) = get_json(&http, &format!("{}/v1/channels/{id}", p2.base)).await;
        if ch["final"] == true {
            break ch;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timer never fired after restart: {ch}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ch["latest"]["error"], "callback_timeout");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, ch) = get_json(&http, &format!("{}/v1/channels/{id}", p2.base)).await;
    let timeouts = ch["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["message"]["error"] == "callback_timeout")
        .count();
    assert_eq!(timeouts, 1, "fired exactly once: {ch:#}");
    assert_eq!(
        upstream.received().len(),
        1,
        "the upstream was not called again"
    );
    drop(p2);
}

#[tokio::test]
async fn a_simulator_removed_while_a_channel_waits_leaves_it_to_the_callback_timeout() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let config = |extra: &str| {
        format!(
            "{DELIVERY_FAST}{}{}[[plugins]]\nname = \"inject-id\"\npath = \"{}\"\nkind = \"simulator\"\n",
            endpoint("app", &rx.url("/"), ""),
            workflow(
                &upstream,
                &format!("event_name = \"e\"\ncallback_timeout = \"10s\"\n{extra}")
            ),
            plugin("inject-id").display()
        )
    };
    // The simulator would call back 8 s after `ai_generated`, which leaves the reload below
    // plenty of time to land first, and the callback timeout (10 s) comes after it.
    let c = Courier::start_file(&config("simulate = \"inject-id\"\nsimulate_delay = \"8s\"")).await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    let mut ws = Ws::connect(&c, &id).await;
    loop {
        if ws.next().await["status"] == "ai_generated" {
            break;
        }
    }
    // The simulator is dropped before its timer is due; nobody calls back.
    c.rewrite_config(&config(""));
    c.wait_config(|st| st["version"] == 2).await;
    let frames = ws.rest().await;
    assert_eq!(
        frames.last(),
        Some(&json!({"channel_id": id, "status": "error", "error": "callback_timeout"})),
        "{frames:?}"
    );
    let (_, ch) = c.get(&format!("/v1/channels/{id}")).await;
    assert_eq!(ch["final"], true, "{ch}");
    assert_eq!(ch["latest"]["error"], "callback_timeout", "{ch}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_calls_wait_for_one_of_the_workflows_slots() {
    // Calls of 2 s each, opened all at once: they overlap however slowly this machine runs,
    // unless courier keeps them apart.
    let upstream = answering_after(Duration::from_secs(2)).await;
    let rx = Receiver::start().await;
    let c = Courier::start(&with_workflow(
        &rx,
        &upstream.url("/"),
        "max_in_flight = 2",
        "",
    ))
    .await;
    let ids = futures_util::future::join_all(
        (0..8).map(|_| open(&c, json!({"workflow": "movie_suggestion"}))),
    )
    .await;
    // Every request is answered, two at a time (four rounds of 2 s).
    let got = rx.wait_for(8, Duration::from_secs(40)).await;
    assert!(got.iter().all(|r| r.json()["status"] == "success"));
    assert_eq!(upstream.received().len(), 8);
    assert_eq!(upstream.max_concurrent(), 2);
    for id in ids {
        let (_, ch) = c.get(&format!("/v1/channels/{id}")).await;
        assert_eq!(ch["status"], "success", "{ch}");
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_due_upstream_calls_than_courier_runs_at_once_all_complete() {
    let upstream = answering_after(Duration::from_millis(50)).await;
    let rx = Receiver::start().await;
    let c = Courier::start(&with_workflow(
        &rx,
        &upstream.url("/"),
        "max_in_flight = 8",
        "",
    ))
    .await;
    // More than the timers courier handles at once (1024), opened faster than the
    // upstream calls finish (8 at a time, 50 ms each), so the timer loop reaches its cap
    // and has to come back.
    const N: usize = 1500;
    let http = c.http.clone();
    let base = c.base.clone();
    let opened: Vec<String> = futures_util::stream::iter(0..N)
        .map(|_| open_at(&http, &base))
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(opened.len(), N);
    // Until every channel's result is in (a channel delivered twice would make N requests
    // arrive before all of them).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let got = loop {
        let got = rx.received();
        let channels: std::collections::HashSet<&str> =
            got.iter().map(|r| r.header("mr-channel-id")).collect();
        if channels.len() == N {
            break got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {N} channels' results delivered",
            channels.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(upstream.received().len(), N);
    // One delivery (webhook id) per channel: none made twice. (An attempt sent again after
    // a timeout keeps its webhook id: at least once is not what this is about.)
    let mut deliveries: std::collections::HashMap<&str, std::collections::HashSet<&str>> =
        Default::default();
    for r in &got {
        deliveries
            .entry(r.header("mr-channel-id"))
            .or_default()
            .insert(r.header("webhook-id"));
    }
    let twice: Vec<_> = deliveries.iter().filter(|(_, d)| d.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "channels delivered more than once: {twice:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backed_up_upstream_holds_back_only_its_own_workflow() {
    // `slow`'s upstream never answers while the test runs and takes one call at a time, so
    // every other call of `slow` waits; there are more of them than courier handles timers
    // of other kinds at once.
    let slow = Receiver::start().await;
    slow.set_default(Reply::status(200).body(AI).delay(Duration::from_secs(120)));
    let fast = Receiver::start().await;
    fast.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}[[workflows]]\nname = \"slow\"\nupstream = {{ url = \"{}\", timeout = \"120s\", max_in_flight = 1 }}\nendpoint = \"app\"\nevent_name = \"e\"\ncallback_timeout = \"1s\"\n[[workflows]]\nname = \"fast\"\nupstream = {{ url = \"{}\" }}\nendpoint = \"app\"\nevent_name = \"e\"\ncallback_timeout = \"1s\"\n",
        endpoint("app", &rx.url("/"), ""),
        slow.url("/"),
        fast.url("/"),
    ))
    .await;
    const N: usize = 1100;
    let http = c.http.clone();
    let base = c.base.clone();
    let opened: Vec<String> = futures_util::stream::iter(0..N)
        .map(|_| open_workflow_at(&http, &base, "slow"))
        .buffer_unordered(32)
        .collect()
        .await;
    // `fast`'s request, opened behind all of those, gets its upstream call, its webhook
    // and, with no callback, its callback timeout.
    let id = open(&c, json!({"workflow": "fast"})).await;
    let ch = wait_channel(&c, &id, |ch| ch["final"] == true).await;
    assert_eq!(ch["latest"]["error"], "callback_timeout", "{ch}");
    let got = rx.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].header("mr-channel-id"), id);
    // `slow` got one call, and the rest of its requests still wait.
    assert_eq!(slow.received().len(), 1);
    let (_, ch) = c.get(&format!("/v1/channels/{}", opened[N - 1])).await;
    assert_eq!(ch["status"], "pending", "{ch}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_left_by_a_removed_workflow_are_named_at_start_and_made_once_it_is_back() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    // The upstream holds its one call, so the other two wait in the workflow's queue.
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI).delay(Duration::from_secs(120)));
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let app = endpoint("app", &rx.url("/"), "");
    let with = format!(
        "{DELIVERY_FAST}{app}[[workflows]]\nname = \"movie_suggestion\"\nupstream = {{ url = \"{}\", timeout = \"120s\", max_in_flight = 1 }}\nendpoint = \"app\"\n",
        upstream.url("/")
    );
    let cfg = write_config(dir.path(), &with);
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(open_at(&http, &p.base).await);
    }
    let deadline = std::time::Instant::now() + T;
    while upstream.received().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no upstream call");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.kill9();

    // Started without the workflow: a warning names it and the calls waiting for it.
    let cfg = write_config(dir.path(), &format!("{DELIVERY_FAST}{app}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = stdout.next().unwrap().unwrap();
    let base = listening
        .strip_prefix("courier listening on ")
        .unwrap()
        .trim()
        .to_string();
    let (_, ch) = get_json(&http, &format!("{base}/v1/channels/{}", ids[2])).await;
    assert_eq!(ch["status"], "pending", "{ch}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let warned: Vec<Value> = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
        .filter(|v| v["fields"]["workflow"] == "movie_suggestion")
        .collect();
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(warned[0]["fields"]["calls"], "3", "{warned:?}");
    let message = warned[0]["fields"]["message"].as_str().unwrap();
    assert!(message.contains("not configured"), "{message}");

    // With the workflow back (and its upstream answering), every call is made.
    upstream.set_default(Reply::status(200).body(AI));
    let cfg = write_config(dir.path(), &with);
    let p = Process::spawn(&cfg);
    let got = rx.wait_for(3, T).await;
    let mut channels: Vec<&str> = got.iter().map(|r| r.header("mr-channel-id")).collect();
    channels.sort();
    ids.sort();
    assert_eq!(channels, ids);
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulation_due_after_the_callback_deadline_is_too_late() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "{DELIVERY_FAST}{}{}[[plugins]]\nname = \"inject-id\"\npath = \"{}\"\nkind = \"simulator\"\n",
            endpoint("app", &rx.url("/"), ""),
            workflow(
                &upstream,
                "event_name = \"e\"\nsimulate = \"inject-id\"\nsimulate_delay = \"1s\"\ncallback_timeout = \"2s\""
            ),
            plugin("inject-id").display()
        ),
    );
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    let id = open_at(&http, &p.base).await;
    // The webhook went out, so both timers are set; courier is down past both.
    rx.wait_for(1, T).await;
    p.kill9();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let p = Process::spawn(&cfg);
    let deadline = std::time::Instant::now() + T;
    let ch = loop {
        let (_, ch) = get_json(&http, &format!("{}/v1/channels/{id}", p.base)).await;
        if ch["final"] == true {
            break ch;
        }
        assert!(std::time::Instant::now() < deadline, "never ended: {ch}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ch["latest"]["error"], "callback_timeout", "{ch:#}");
    drop(p);
}

#[tokio::test]
async fn an_upstream_answer_over_max_response_fails_the_channel_without_a_retry() {
    let upstream = Receiver::start().await;
    let big = format!("{{\"text\": \"{}\"}}", "x".repeat(2000));
    upstream.script([Reply::status(200).body(&big)]);
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let c = Courier::start(&with_workflow(
        &rx,
        &upstream.url("/"),
        "max_response = \"1KiB\", retries = 2, retry_delay = \"50ms\"",
        "",
    ))
    .await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    let body = rx.wait_for(1, T).await[0].json();
    assert_eq!(body["channel_id"], id.as_str());
    assert_eq!(body["status"], "error", "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("upstream.max_response (1024 bytes)"),
        "{error}"
    );
    assert_eq!(
        upstream.received().len(),
        1,
        "the same answer is not asked for again"
    );
    // An answer within the limit still gets through.
    open(&c, json!({"workflow": "movie_suggestion"})).await;
    let body = rx.wait_for(2, T).await[1].json();
    assert_eq!(body["status"], "success", "{body}");
    c.stop().await;
}

/// An upstream that answers 200 with a chunked body (no `content-length`) of `total` bytes,
/// sent 4 KiB at a time, to every request.
async fn chunked_upstream(total: usize) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v1/chat/completions",
        listener.local_addr().unwrap()
    );
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _ = sock.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("1000\r\n{}\r\n", "y".repeat(4096));
                for _ in 0..total / 4096 {
                    if sock.write_all(chunk.as_bytes()).await.is_err() {
                        return; // courier hung up: what the test wants
                    }
                }
                let _ = sock.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (url, task)
}

#[tokio::test]
async fn a_chunked_upstream_answer_is_cut_off_at_max_response() {
    // 256 MiB if it were read to the end; courier stops after the first 64 KiB.
    let (url, task) = chunked_upstream(256 * 1024 * 1024).await;
    let rx = Receiver::start().await;
    let c = Courier::start(&with_workflow(&rx, &url, "max_response = \"64KiB\"", "")).await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    let body = rx.wait_for(1, T).await[0].json();
    assert_eq!(body["channel_id"], id.as_str());
    assert_eq!(body["status"], "error", "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("upstream.max_response (65536 bytes)"),
        "{body}"
    );
    task.abort();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_call_under_way_at_shutdown_is_given_up_and_made_after_the_restart() {
    let upstream = Receiver::start().await;
    upstream.script([Reply::status(200).body(AI).delay(Duration::from_secs(60))]);
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let mut c = Courier::start_file(&with_workflow(
        &rx,
        &upstream.url("/"),
        "timeout = \"120s\"",
        "",
    ))
    .await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    upstream.wait_for(1, T).await; // the call is under way
    let started = std::time::Instant::now();
    c.running.take().unwrap().shutdown().await;
    // Waiting for the upstream would take its 60 s.
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "shutdown waited for the upstream: {:?}",
        started.elapsed()
    );
    let config = courier::config::Config::load(&c.dir.path().join("courier.toml")).unwrap();
    let running = courier::server::start(config).await.unwrap();
    c.base = format!("http://{}", running.addr);
    c.running = Some(running);
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].json()["status"], "success");
    assert_eq!(got[0].json()["channel_id"], id.as_str());
    assert_eq!(
        upstream.received().len(),
        2,
        "asked again after the restart"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_outlive_a_reload_that_removes_their_workflow() {
    let upstream = Receiver::start().await;
    // The second upstream call holds the workflow's only slot for 8 s, so that the third
    // is still waiting for it when the reload below lands, however slowly it does; the
    // first channel's callback timeout (12 s) comes after the second's answer.
    upstream.script([
        Reply::status(200).body(AI),
        Reply::status(200).body(AI).delay(Duration::from_secs(8)),
    ]);
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let with = with_workflow(
        &rx,
        &upstream.url("/"),
        "max_in_flight = 1",
        "event_name = \"e\"\ncallback_timeout = \"12s\"",
    );
    let without = format!("{DELIVERY_FAST}{}", endpoint("app", &rx.url("/"), ""));
    let c = Courier::start_file(&with).await;
    let body = json!({"workflow": "movie_suggestion"});
    let waits = open(&c, body.clone()).await; // will get no callback
    rx.wait_for(1, T).await;
    let answered = open(&c, body.clone()).await; // its upstream call takes 8 s
    let queued = open(&c, body.clone()).await; // waits for the upstream slot
    c.rewrite_config(&without);
    c.wait_config(|st| st["version"] == 2).await;
    // The deadline still holds, and says so.
    let ch = wait_channel(&c, &waits, |ch| ch["final"] == true).await;
    assert_eq!(ch["latest"]["error"], "callback_timeout", "{ch}");
    // A backend holding a callback_url can still use it.
    rx.wait_for(2, T).await;
    wait_channel(&c, &answered, |ch| ch["status"] == "ai_generated").await;
    let (s, r) = c
        .post_json(
            &format!("/v1/callback/{answered}"),
            &json!({"data": {"ok": 1}}),
        )
        .await;
    assert_eq!(s, 200, "{r}");
    // The upstream call still to make waits for the workflow to come back, and then is made.
    let (_, ch) = c.get(&format!("/v1/channels/{queued}")).await;
    assert_eq!(ch["status"], "pending", "{ch}");
    c.rewrite_config(&with);
    c.wait_config(|st| st["version"] == 3).await;
    let ch = wait_channel(&c, &queued, |ch| ch["status"] == "ai_generated").await;
    assert_eq!(ch["latest"]["status"], "ai_generated", "{ch}");
    c.stop().await;
}

/// Courier with a workflow whose upstream takes a minute to answer, a channel opened on it
/// (so it stays pending), and a socket subscribed to that channel.
async fn pending_channel_socket() -> (
    Receiver,
    Receiver,
    Courier,
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
) {
    let upstream = answering_after(Duration::from_secs(60)).await;
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        endpoint("app", &rx.url("/"), ""),
        workflow(&upstream, "").replace("timeout = \"5s\"", "timeout = \"120s\"")
    ))
    .await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    let url = format!(
        "{}/v1/channels/{id}/ws?token={ADMIN}",
        c.base.replace("http://", "ws://")
    );
    let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    (upstream, rx, c, socket)
}

#[tokio::test]
async fn an_idle_channel_socket_is_pinged_so_proxies_keep_it_open() {
    let (_upstream, _rx, c, stream) = pending_channel_socket().await;
    let (_, mut read) = stream.split();
    let started = std::time::Instant::now();
    let limit = courier::api::PING_EVERY + Duration::from_secs(5);
    let mut pinged = false;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(limit, read.next()).await {
        if let Message::Ping(_) = frame {
            pinged = true;
            break;
        }
    }
    assert!(pinged, "no ping within {limit:?}");
    assert!(started.elapsed() >= courier::api::PING_EVERY - Duration::from_secs(1));
    c.stop().await;
}

/// A socket request for channel `id` offering `protocols` (none: no header).
fn ws_request(
    c: &Courier,
    id: &str,
    protocols: &[String],
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}/v1/channels/{id}/ws", c.base.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    if !protocols.is_empty() {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            protocols.join(", ").parse().unwrap(),
        );
    }
    req
}

fn bearer_protocol(token: &str) -> String {
    use base64::Engine;
    format!(
        "{}{}",
        courier::api::BEARER_PROTOCOL_PREFIX,
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
    )
}

/// The HTTP status a refused socket request got.
async fn refused(req: tokio_tungstenite::tungstenite::handshake::client::Request) -> u16 {
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("not an HTTP refusal: {e}"),
        Ok(_) => panic!("the socket was accepted"),
    }
}

#[tokio::test]
async fn a_browser_can_send_the_token_as_a_websocket_protocol_instead_of_in_the_url() {
    let (_upstream, _rx, c) = started("").await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    wait_channel(&c, &id, |ch| ch["status"] == "success").await;
    let proto = courier::api::WS_PROTOCOL.to_string();

    let req = ws_request(&c, &id, &[proto.clone(), bearer_protocol(INGEST_ONLY)]);
    let (stream, answer) = tokio_tungstenite::connect_async(req)
        .await
        .expect("the socket is accepted");
    // The protocol named back is courier's, never the one holding the token.
    assert_eq!(
        answer.headers()["sec-websocket-protocol"],
        courier::api::WS_PROTOCOL
    );
    let (_, mut read) = stream.split();
    let first = tokio::time::timeout(T, read.next())
        .await
        .expect("a frame in time")
        .expect("socket open")
        .unwrap();
    let Message::Text(text) = first else {
        panic!("{first:?}")
    };
    let latest: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(latest["status"], "success", "{latest}");

    // A wrong token, a token that is not base64url, no token at all: refused.
    assert_eq!(
        refused(ws_request(
            &c,
            &id,
            &[proto.clone(), bearer_protocol("nope")]
        ))
        .await,
        401
    );
    let garbled = format!("{}!!", courier::api::BEARER_PROTOCOL_PREFIX);
    assert_eq!(
        refused(ws_request(&c, &id, &[proto.clone(), garbled])).await,
        401
    );
    assert_eq!(
        refused(ws_request(&c, &id, std::slice::from_ref(&proto))).await,
        401
    );
    // A token protocol offered alone: a browser would fail the answer, so it is refused
    // with a message saying what to offer.
    let resp = c
        .http
        .get(format!("{}/v1/channels/{id}/ws", c.base))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-protocol", bearer_protocol(ADMIN))
        .send()
        .await
        .unwrap();
    let s = resp.status().as_u16();
    let body: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(courier::api::WS_PROTOCOL),
        "{body}"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_failed_upstream_call_does_not_show_the_upstream_url_or_its_key() {
    let rx = Receiver::start().await;
    // Nothing listens there: the call fails to connect.
    let upstream = format!(
        "http://127.0.0.1:{}/v1/chat?key=sk-upstream-secret",
        free_port()
    );
    let c = Courier::start(&with_workflow(
        &rx,
        &upstream,
        "retries = 0, timeout = \"5s\"",
        "",
    ))
    .await;
    let id = open(&c, json!({"workflow": "movie_suggestion"})).await;
    let ch = wait_channel(&c, &id, |ch| ch["final"] == true).await;
    let error = ch["latest"]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("upstream connect"), "{ch:#}");
    assert!(!ch.to_string().contains("sk-upstream-secret"), "{ch:#}");
    let hook = rx.wait_for(1, T).await;
    let body = String::from_utf8_lossy(&hook[0].body).into_owned();
    assert!(body.contains("upstream connect"), "{body}");
    assert!(!body.contains("sk-upstream-secret"), "{body}");
    c.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_sends_a_large_message_is_disconnected() {
    use futures_util::SinkExt;
    let (_upstream, _rx, c, mut socket) = pending_channel_socket().await;
    let first = tokio::time::timeout(T, socket.next()).await.unwrap();
    assert!(matches!(first, Some(Ok(Message::Text(_)))), "{first:?}");
    // A small message is read and ignored: the socket still answers a ping.
    socket.send(Message::Text("hello".into())).await.unwrap();
    socket
        .send(Message::Ping(b"p".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(T, socket.next()).await.unwrap();
    assert!(matches!(pong, Some(Ok(Message::Pong(_)))), "{pong:?}");
    // A large one ends it.
    let big = "x".repeat(1 << 20);
    let _ = socket.send(Message::Text(big.into())).await;
    let ended = loop {
        match tokio::time::timeout(T, socket.next()).await {
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => break true,
            Ok(Some(Ok(_))) => continue,
            Err(_) => break false,
        }
    };
    assert!(ended, "the socket stayed open after a 1 MiB message");
    c.stop().await;
}
