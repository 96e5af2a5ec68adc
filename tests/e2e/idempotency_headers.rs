//! The `Idempotency-Key` header on `POST /v1/events` and `POST /v1/ingest/{endpoint}`, and
//! the event id (`?id=`) and type (`?event_type=`, `x-event-type`) of a raw ingest.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

/// A FIFO endpoint: deliveries arrive in ingest order, so once a marker sent last has
/// arrived, anything queued before it has too.
async fn fifo() -> (Receiver, Courier) {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/hook"), "ordering = \"fifo\"").await;
    (rx, c)
}

/// Posts `body` to `path` with the admin key and `headers`; status, headers and JSON body.
async fn post(
    c: &Courier,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = c
        .http
        .post(format!("{}{path}", c.base))
        .bearer_auth(ADMIN)
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    (status, h, resp.json_value().await)
}

/// Sends a marker event, waits for it, and returns everything the receiver got.
async fn through_marker(c: &Courier, rx: &Receiver) -> Vec<Received> {
    let m = c
        .send(json!({"event_type": "marker", "payload": {"marker": true}, "endpoint": "app"}))
        .await;
    let id = m["id"].as_str().unwrap().to_string();
    let deadline = std::time::Instant::now() + T;
    loop {
        let got = rx.received();
        if got.iter().any(|r| r.header("webhook-id") == id) {
            return got;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the marker never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_key_header_on_events_replays_the_first_reply_and_queues_once() {
    let (rx, c) = fifo().await;
    let body = json!({"event_type": "order.created", "payload": {"order": 1}}).to_string();
    let key = [("Idempotency-Key", "order-1-created")];
    let (s, h, first) = post(&c, "/v1/events", &key, &body).await;
    assert_eq!(s, 202, "{first}");
    assert!(h.get("idempotent-replayed").is_none(), "{h:?}");
    // The same key again, then with another body: the first reply each time, marked.
    let other = json!({"event_type": "order.created", "payload": {"order": 2}}).to_string();
    for b in [&body, &other] {
        let (s, h, again) = post(&c, "/v1/events", &key, b).await;
        assert_eq!(s, 202, "{again}");
        assert_eq!(h["idempotent-replayed"], "true");
        assert_eq!(again, first);
    }
    // Another key is another event.
    let (s, h, third) = post(&c, "/v1/events", &[("Idempotency-Key", "order-3")], &other).await;
    assert_eq!(s, 202);
    assert!(h.get("idempotent-replayed").is_none());
    assert_ne!(third["id"], first["id"]);

    let got = through_marker(&c, &rx).await;
    let payloads: Vec<Value> = got.iter().map(|r| r.json()).collect();
    assert_eq!(
        payloads,
        [
            json!({"order": 1}),
            json!({"order": 2}),
            json!({"marker": true})
        ],
        "one delivery per key"
    );
    assert_eq!(got[0].header("webhook-id"), first["id"].as_str().unwrap());
    let (_, list) = c.get("/v1/deliveries?endpoint=app").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 3, "{list:#}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_key_header_on_raw_ingest_replays_the_first_reply_and_queues_once() {
    let (rx, c) = fifo().await;
    let key = [
        ("Idempotency-Key", "upload-77"),
        ("content-type", "text/plain"),
    ];
    let (s, h, first) = post(&c, "/v1/ingest/app", &key, "first body").await;
    assert_eq!(s, 202, "{first}");
    assert!(h.get("idempotent-replayed").is_none());
    assert_eq!(first["deliveries"][0]["endpoint"], "app");
    let (s, h, again) = post(&c, "/v1/ingest/app", &key, "second body").await;
    assert_eq!(s, 202, "{again}");
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(again, first);
    // The key is scoped to the ingest key that used it: another key's is its own event.
    let resp = c
        .http
        .post(format!("{}/v1/ingest/app", c.base))
        .bearer_auth(INGEST_ONLY)
        .header("Idempotency-Key", "upload-77")
        .body("from another key")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    assert!(resp.headers().get("idempotent-replayed").is_none());
    let theirs = resp.json_value().await;
    assert_ne!(theirs["id"], first["id"]);

    let got = through_marker(&c, &rx).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(
        bodies,
        ["first body", "from another key", r#"{"marker":true}"#],
        "one delivery per key and ingest key"
    );
    assert_eq!(got[0].header("content-type"), "text/plain");
    assert_eq!(got[0].header("webhook-id"), first["id"].as_str().unwrap());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_ingest_takes_the_event_id_from_the_query_and_the_type_from_x_event_type() {
    let (rx, c) = fifo().await;
    let (s, _, r) = post(
        &c,
        "/v1/ingest/app?id=upload_42",
        &[("x-event-type", "blob.uploaded")],
        "bytes",
    )
    .await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(r["id"], "upload_42");
    // `?event_type=` wins over the header; no type at all is `ingest`.
    let (s, _, r2) = post(
        &c,
        "/v1/ingest/app?event_type=from.query",
        &[("x-event-type", "from.header")],
        "two",
    )
    .await;
    assert_eq!(s, 202, "{r2}");
    let (s, _, r3) = post(&c, "/v1/ingest/app", &[], "three").await;
    assert_eq!(s, 202, "{r3}");
    // The id is taken: a second use is a conflict and queues nothing.
    let (s, _, e) = post(&c, "/v1/ingest/app?id=upload_42", &[], "again").await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{e}"
    );

    let got = through_marker(&c, &rx).await;
    assert_eq!(
        got.len(),
        4,
        "{:?}",
        got.iter().map(|r| &r.body).collect::<Vec<_>>()
    );
    // On the wire the id is the webhook-id, and it signs with it.
    assert_eq!(got[0].header("webhook-id"), "upload_42");
    assert_eq!(got[0].body, b"bytes");
    assert_eq!(got[0].header("content-type"), "application/octet-stream");
    let mut headers = axum::http::HeaderMap::new();
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        headers.insert(name, got[0].headers[name].clone());
    }
    standardwebhooks::Webhook::new(SECRET)
        .unwrap()
        .verify(&got[0].body, &headers)
        .expect("signed with the chosen id");
    assert_eq!(got[1].header("webhook-id"), r2["id"].as_str().unwrap());
    // The event type shows on the delivery.
    for (reply, ty) in [(&r, "blob.uploaded"), (&r2, "from.query"), (&r3, "ingest")] {
        let dlv = reply["deliveries"][0]["id"].as_str().unwrap();
        let (_, d) = c.get(&format!("/v1/deliveries/{dlv}")).await;
        assert_eq!(d["event_type"], ty, "{d:#}");
        assert_eq!(d["event_id"], reply["id"], "{d:#}");
    }
    c.stop().await;
}

/// A request giving an idempotency key twice, in the header and in the body (or the raw
/// ingest's query), with different keys is refused: taking either would make a retry that
/// sends only the other a second event. The same key in both is one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_idempotency_keys_on_one_request_are_refused() {
    let (rx, c) = fifo().await;
    let body = |key: &str| {
        json!({"event_type": "t", "payload": {"k": key}, "idempotency_key": key}).to_string()
    };
    let (s, _, e) = post(
        &c,
        "/v1/events",
        &[("Idempotency-Key", "k-4")],
        &body("k-5"),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error"]["field"], "idempotency_key", "{e}");
    let (s, _, e) = post(
        &c,
        "/v1/ingest/app?idempotency_key=k-6",
        &[("Idempotency-Key", "k-7")],
        "raw",
    )
    .await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(e["error"]["field"], "idempotency_key", "{e}");
    // The same key in both places: accepted once, then the first reply.
    let same = [("Idempotency-Key", "k-8")];
    let (s, h, first) = post(&c, "/v1/events", &same, &body("k-8")).await;
    assert_eq!(s, 202, "{first}");
    assert!(h.get("idempotent-replayed").is_none());
    let (s, h, again) = post(&c, "/v1/events", &same, &body("k-8")).await;
    assert_eq!((s, &again), (202, &first));
    assert_eq!(h["idempotent-replayed"], "true");
    let got = through_marker(&c, &rx).await;
    assert_eq!(got.len(), 2, "the k-8 event and the marker only");
    c.stop().await;
}

/// Query parameters a route does not have are refused even when empty (`?idempotencyKey=`
/// is a typo, not an absent key), and `POST /v1/events`, whose fields are all in its body,
/// refuses any: `?idempotency_key=k` there made a retry a second event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misplaced_or_misspelt_query_parameters_are_refused_on_ingest() {
    let (rx, c) = fifo().await;
    let body = json!({"event_type": "t", "payload": {}}).to_string();
    for path in [
        "/v1/events?idempotency_key=q1",
        "/v1/events?bogus=1",
        "/v1/ingest/app?idempotencyKey=",
        "/v1/ingest/app?bogus=",
    ] {
        let (s, _, e) = post(&c, path, &[], &body).await;
        assert_eq!(s, 400, "{path}: {e}");
    }
    // Empty values of the route's own parameters still read as absent elsewhere.
    let (s, list) = c.get("/v1/deliveries?endpoint=&limit=").await;
    assert_eq!(s, 200, "{list}");
    let (s, e) = c.get("/v1/deliveries?endpont=").await;
    assert_eq!(s, 400, "{e}");
    let got = through_marker(&c, &rx).await;
    assert_eq!(got.len(), 1, "nothing but the marker was queued");
    c.stop().await;
}
