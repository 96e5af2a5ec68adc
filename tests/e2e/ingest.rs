//! Ingest: bad input is refused with the documented error and stores nothing; fan-out;
//! idempotency; producer ids.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::harness::*;

async fn assert_error(
    c: &Courier,
    path: &str,
    token: Option<&str>,
    body: &str,
    status: u16,
    code: &str,
) {
    let (s, v) = c.post(path, token, body.to_string()).await;
    assert_eq!(s, status, "{path} {body:.60}: {v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(!v["error"]["message"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_stores_nothing() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/h"), "event_types = [\"order.*\"]").await;
    let ok = r#"{"event_type": "order.created", "payload": {}}"#;
    assert_error(
        &c,
        "/v1/events",
        Some(ADMIN),
        "{not json",
        400,
        "bad_request",
    )
    .await;
    assert_error(
        &c,
        "/v1/events",
        Some(ADMIN),
        r#"{"payload": {}}"#,
        400,
        "bad_request",
    )
    .await;
    assert_error(
        &c,
        "/v1/events",
        Some(ADMIN),
        r#"{"event_type": "order.created"}"#,
        400,
        "bad_request",
    )
    .await;
    assert_error(
        &c,
        "/v1/events",
        Some(ADMIN),
        r#"{"event_type": "", "payload": 1}"#,
        400,
        "bad_request",
    )
    .await;
    assert_error(
        &c,
        "/v1/events",
        Some(ADMIN),
        r#"{"event_type": "order.created", "payload": {}, "endpoint": "nope"}"#,
        422,
        "unknown_endpoint",
    )
    .await;
    assert_error(
        &c,
        "/v1/ingest/nope",
        Some(ADMIN),
        "raw",
        422,
        "unknown_endpoint",
    )
    .await;
    let big = format!(
        r#"{{"event_type": "order.created", "payload": "{}"}}"#,
        "x".repeat(70_000)
    );
    assert_error(
        &c,
        "/v1/events",
        Some(ADMIN),
        &big,
        413,
        "payload_too_large",
    )
    .await;
    assert_error(
        &c,
        "/v1/ingest/app",
        Some(ADMIN),
        &"y".repeat(70_000),
        413,
        "payload_too_large",
    )
    .await;
    assert_error(&c, "/v1/events", None, ok, 401, "unauthorized").await;
    assert_error(
        &c,
        "/v1/events",
        Some("wrong-token-000000000000"),
        ok,
        401,
        "unauthorized",
    )
    .await;
    assert_error(&c, "/v1/events", Some(ADMIN_ONLY), ok, 403, "forbidden").await;
    let (s, v) = c.get_as("/v1/deliveries", Some(INGEST_ONLY)).await;
    assert_eq!((s, &v["error"]["code"]), (403, &json!("forbidden")));
    let (s, _) = c.get_as("/v1/deliveries", None).await;
    assert_eq!(s, 401);

    // Nothing was stored, nothing was sent.
    let (_, list) = c.get("/v1/deliveries").await;
    assert_eq!(list["data"], json!([]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.received().is_empty());
    let metrics = c.text("/metrics").await;
    assert!(
        metrics.contains("courier_events_ingested_total 0"),
        "{metrics}"
    );
    // Both oversized bodies (JSON and raw ingest) are counted.
    assert!(
        metrics
            .lines()
            .any(|l| l == "courier_ingest_rejected_total{reason=\"too_large\"} 2"),
        "{metrics}"
    );

    // The valid request still works after all that.
    let (s, _) = c
        .post("/v1/events", Some(INGEST_ONLY), ok.to_string())
        .await;
    assert_eq!(s, 202);
    rx.wait_for(1, Duration::from_secs(10)).await;
    c.stop().await;
}

#[tokio::test]
async fn an_event_no_endpoint_subscribes_to_is_accepted_with_no_deliveries() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/h"), "event_types = [\"order.*\"]").await;
    let body = json!({"event_type": "user.created", "payload": {"u": 1}, "idempotency_key": "k-1"});
    let (s, first) = c
        .post("/v1/events", Some(INGEST_ONLY), body.to_string())
        .await;
    assert_eq!(s, 202, "{first}");
    assert!(first["id"].as_str().unwrap().starts_with("evt_"), "{first}");
    assert_eq!(first["deliveries"], json!([]), "{first}");
    // It is stored: the same key answers the same, and its id cannot be taken by another.
    let (s, again) = c
        .post("/v1/events", Some(INGEST_ONLY), body.to_string())
        .await;
    assert_eq!((s, &again), (202, &first));
    let (s, _) = c
        .post(
            "/v1/events",
            Some(INGEST_ONLY),
            json!({"event_type": "user.created", "payload": {}, "id": "user-7"}).to_string(),
        )
        .await;
    assert_eq!(s, 202);
    assert_error(
        &c,
        "/v1/events",
        Some(INGEST_ONLY),
        &json!({"event_type": "user.deleted", "payload": {}, "id": "user-7"}).to_string(),
        409,
        "conflict",
    )
    .await;
    // Nothing is delivered, and the operator can see such events in the metrics.
    let (_, sent) = c
        .post(
            "/v1/events",
            Some(INGEST_ONLY),
            json!({"event_type": "order.paid", "payload": {}}).to_string(),
        )
        .await;
    assert_eq!(sent["deliveries"].as_array().unwrap().len(), 1, "{sent}");
    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].header("webhook-id"), sent["id"].as_str().unwrap());
    let metrics = c.text("/metrics").await;
    assert!(
        metrics.contains("courier_events_unrouted_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("courier_events_ingested_total 3"),
        "{metrics}"
    );
    let (_, list) = c.get("/v1/deliveries").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1, "{list}");
    c.stop().await;
}

#[tokio::test]
async fn fan_out_creates_one_delivery_per_subscribed_endpoint() {
    let (a, b, all) = (
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    );
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}{}",
        endpoint("orders", &a.url("/a"), "event_types = [\"order.*\"]"),
        endpoint(
            "exact",
            &b.url("/b"),
            "event_types = [\"order.created\", \"user.deleted\"]"
        ),
        endpoint("everything", &all.url("/c"), ""),
    ))
    .await;
    let r = c
        .send(json!({"event_type": "order.created", "payload": {"x": 1}}))
        .await;
    let mut names: Vec<&str> = r["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["endpoint"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["everything", "exact", "orders"]);
    let r2 = c
        .send(json!({"event_type": "order.shipped", "payload": {"x": 2}}))
        .await;
    assert_eq!(r2["deliveries"].as_array().unwrap().len(), 2);
    let r3 = c
        .send(json!({"event_type": "user.deleted", "payload": {"x": 3}}))
        .await;
    assert_eq!(r3["deliveries"].as_array().unwrap().len(), 2);
    // An explicit endpoint bypasses subscriptions.
    let r4 = c
        .send(json!({"event_type": "misc", "payload": {"x": 4}, "endpoint": "orders"}))
        .await;
    assert_eq!(r4["deliveries"][0]["endpoint"], "orders");

    let t = Duration::from_secs(10);
    assert_eq!(a.wait_for(3, t).await.len(), 3);
    assert_eq!(b.wait_for(2, t).await.len(), 2);
    assert_eq!(all.wait_for(3, t).await.len(), 3);
    // Each delivery has its own status.
    for d in r["deliveries"].as_array().unwrap() {
        c.wait_status(d["id"].as_str().unwrap(), "delivered", t)
            .await;
    }
    c.stop().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_first_reply_even_when_racing() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/h"), "").await;
    let body =
        json!({"event_type": "t", "payload": {"n": 1}, "idempotency_key": "order-42"}).to_string();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (http, url, body) = (
            c.http.clone(),
            format!("{}/v1/events", c.base),
            body.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(ADMIN)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            r.json_value().await
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    assert!(
        replies.iter().all(|r| r == &replies[0]),
        "every racer got the first reply"
    );
    rx.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 1, "one delivery for 32 requests");
    let (_, list) = c.get("/v1/deliveries").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    // Another key is a different event; the same key from another ingest key is too.
    let other = c
        .send(json!({"event_type": "t", "payload": {}, "idempotency_key": "order-43"}))
        .await;
    assert_ne!(other["id"], replies[0]["id"]);
    let (s, v) = c.post("/v1/events", Some(INGEST_ONLY), body).await;
    assert_eq!(s, 202);
    assert_ne!(v["id"], replies[0]["id"]);
    c.stop().await;
}

#[tokio::test]
async fn a_retry_after_its_endpoint_was_deleted_still_gets_the_first_reply() {
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    let (s, e) = c
        .post_json(
            "/v1/endpoints",
            &json!({"name": "shop", "url": rx.url("/h")}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let body =
        json!({"event_type": "t", "payload": {}, "endpoint": "shop", "idempotency_key": "k1"})
            .to_string();
    let send = || {
        c.http
            .post(format!("{}/v1/events", c.base))
            .bearer_auth(ADMIN)
            .body(body.clone())
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), 202);
    let first = first.json_value().await;
    let (s, _) = c
        .call(
            reqwest::Method::DELETE,
            "/v1/endpoints/shop",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 200);
    // The producer's retry (its first answer was lost, say) learns the event was accepted.
    let again = send().await.unwrap();
    assert_eq!(again.status(), 202);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json_value().await, first);
    // A new key for the deleted endpoint is still refused.
    let (s, e) = c
        .post_json(
            "/v1/events",
            &json!({"event_type": "t", "payload": {}, "endpoint": "shop", "idempotency_key": "k2"}),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (422, Some("unknown_endpoint")),
        "{e}"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_reused_producer_id_is_a_conflict() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/h"), "").await;
    let r = c
        .send(json!({"event_type": "t", "payload": {}, "id": "msg_order_1"}))
        .await;
    assert_eq!(r["id"], "msg_order_1");
    let (s, v) = c
        .post_json(
            "/v1/events",
            &json!({"event_type": "t", "payload": {}, "id": "msg_order_1"}),
        )
        .await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"]["code"], "conflict");
    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(got[0].header("webhook-id"), "msg_order_1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.received().len(), 1);
    // An id in the form courier generates could be taken by a later event: refused.
    let (s, v) = c
        .post_json(
            "/v1/events",
            &json!({"event_type": "t", "payload": {}, "id": "evt_01M8GV5GSH1YE8J0QWQCM9MNZX"}),
        )
        .await;
    assert_eq!((s, v["error"]["field"].as_str()), (400, Some("id")), "{v}");
    c.stop().await;
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("{name} not in metrics"))
}

/// A courier whose one endpoint, `later`, subscribes to everything and is never reached (its
/// first attempt fails, the next is an hour away): ingested events stay pending.
async fn start_with_a_silent_endpoint() -> Courier {
    Courier::with_endpoint(
        "later",
        &format!("http://127.0.0.1:{}/", free_port()),
        "schedule = [\"1h\"]",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ingests_share_group_commits() {
    let c = start_with_a_silent_endpoint().await;
    let before = c.text("/metrics").await;
    let (writes0, commits0, commands0) = (
        metric(&before, "courier_store_journal_writes_total"),
        metric(&before, "courier_store_commits_total"),
        metric(&before, "courier_store_commands_total"),
    );
    // Open the connections first and release the producers together, so that the 200
    // ingests arrive at once rather than spread over 200 TCP handshakes on a busy machine.
    let warm: Vec<_> = (0..200)
        .map(|_| c.http.get(format!("{}/healthz", c.base)).send())
        .collect();
    for r in futures_util::future::join_all(warm).await {
        assert!(r.unwrap().status().is_success());
    }
    let go = Arc::new(tokio::sync::Barrier::new(200));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (http, url) = (c.http.clone(), format!("{}/v1/events", c.base));
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"event_type": "t", "payload": {"i": i}}).to_string();
            go.wait().await;
            http.post(url)
                .bearer_auth(ADMIN)
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 202);
    }
    // The API waits for the database to catch up with the journal: every acknowledged event
    // is there.
    let (_, st) = c.get("/v1/stats").await;
    assert_eq!(
        st["counts"]["pending"], 200,
        "every acknowledged event is stored"
    );
    let after = c.text("/metrics").await;
    let writes = metric(&after, "courier_store_journal_writes_total") - writes0;
    let commits = metric(&after, "courier_store_commits_total") - commits0;
    let commands = metric(&after, "courier_store_commands_total") - commands0;
    assert!(commands >= 200.0, "{commands}");
    assert!(
        writes < 100.0,
        "200 concurrent ingests took {writes} journal writes: no batching"
    );
    assert!(
        commits < commands / 2.0,
        "200 concurrent ingests took {commits} commits: no batching"
    );
    c.stop().await;
}

/// An event body whose payload carries `i` and `filler`.
fn filler_event(i: usize, filler: &str) -> String {
    json!({"event_type": "t", "payload": {"i": i, "filler": filler}}).to_string()
}

/// Posts an event body to `/v1/events` until it is accepted; its 202 reply. A 503 means the
/// event was not accepted (the database fell further behind the journal than the journal
/// waits for, as it may on a loaded machine): it is sent again, for up to 30 s.
async fn post_until_accepted(
    http: &reqwest::Client,
    base: &str,
    body: String,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = http
            .post(format!("{base}/v1/events"))
            .bearer_auth(ADMIN)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let reply = r.json_value().await;
        match status {
            202 => return reply,
            503 if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            _ => panic!("ingest answered {status}: {reply}"),
        }
    }
}

/// A 202 is answered as soon as the event is on disk in the ingest journal, a moment before
/// the database has it: every API read made after the 202 must still find it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_event_is_visible_to_the_next_request() {
    let c = start_with_a_silent_endpoint().await;
    // Events of 60 KiB (the limit here is 64): the journal's files turn over every ~135 of
    // them, and the writer's checkpoints (and the failed first attempts' outcomes) keep it
    // busy behind the journal.
    let filler = "x".repeat(60 * 1024);
    for _round in 0..3 {
        let mut tasks = Vec::new();
        for i in 0..400 {
            let (http, base, filler) = (c.http.clone(), c.base.clone(), filler.clone());
            tasks.push(tokio::spawn(async move {
                let reply = post_until_accepted(&http, &base, filler_event(i, &filler)).await;
                let id = reply["deliveries"][0]["id"].as_str().unwrap().to_string();
                // A 503 says the database is still behind after the read's wait (a loaded
                // machine), not that the event is missing: asked again. A 404 fails.
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                let status = loop {
                    let got = http
                        .get(format!("{base}/v1/deliveries/{id}"))
                        .bearer_auth(ADMIN)
                        .send()
                        .await
                        .unwrap();
                    let status = got.status().as_u16();
                    if status != 503 || std::time::Instant::now() > deadline {
                        break status;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                (id, status)
            }));
        }
        for t in tasks {
            let (id, status) = t.await.unwrap();
            assert_eq!(status, 200, "{id} not found right after its 202");
        }
    }
    // Then 400 more with nothing read in between: a metrics scrape right after the last 202
    // waits for the database to count every delivery acknowledged. It waits a second at most
    // (a stuck database is when metrics matter), which a loaded machine may need more than:
    // a scrape that came back short must have waited that second, and is asked again.
    let mut tasks = Vec::new();
    for i in 0..400 {
        let (http, base, filler) = (c.http.clone(), c.base.clone(), filler.clone());
        tasks.push(tokio::spawn(async move {
            post_until_accepted(&http, &base, filler_event(i, &filler)).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let scraped = std::time::Instant::now();
        let m = c.text("/metrics").await;
        let took = scraped.elapsed();
        let deliveries: u64 = m
            .lines()
            .filter(|l| l.starts_with("courier_deliveries{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        if deliveries == 4 * 400 {
            break;
        }
        assert!(
            took >= Duration::from_millis(900),
            "a scrape answered in {took:?} without waiting for the database: {deliveries} deliveries\n{m}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{deliveries} deliveries of {}\n{m}",
            4 * 400
        );
    }
    c.stop().await;
}

#[tokio::test]
async fn a_raw_ingest_takes_its_idempotency_key_in_the_query_and_refuses_what_it_cannot_read() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/"), "").await;
    let raw = |path: &'static str, key_header: Option<&'static [u8]>| {
        let mut req = c
            .http
            .post(format!("{}{path}", c.base))
            .bearer_auth(ADMIN)
            .body("hello");
        if let Some(k) = key_header {
            req = req.header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(k).unwrap(),
            );
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json_value().await)
        }
    };
    // The key in the query: the second request gets the first answer, nothing more is queued.
    let (s1, first) = raw("/v1/ingest/app?idempotency_key=k-1", None).await;
    let (s2, again) = raw("/v1/ingest/app?idempotency_key=k-1", None).await;
    assert_eq!((s1, s2), (202, 202), "{first} {again}");
    assert_eq!(first["id"], again["id"]);
    // A misspelt parameter, or a key header that is not text: refused, nothing stored.
    let (s, e) = raw("/v1/ingest/app?event-type=x", None).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("event-type"),
        "{e}"
    );
    // An empty parameter (a script's unset `$KEY`) is refused, naming it: read as absent,
    // a retry would be delivered twice.
    for (path, field) in [
        ("/v1/ingest/app?idempotency_key=", "idempotency_key"),
        ("/v1/ingest/app?id=%20", "id"),
        ("/v1/ingest/app?event_type=", "event_type"),
    ] {
        let (s, e) = raw(path, None).await;
        assert_eq!((s, e["error"]["field"].as_str()), (400, Some(field)), "{e}");
    }
    for path in ["/v1/ingest/app", "/v1/events"] {
        let mut req = c
            .http
            .post(format!("{}{path}", c.base))
            .bearer_auth(ADMIN)
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(b"k\xe9y").unwrap(),
            );
        if path == "/v1/events" {
            req = req.body(json!({"event_type": "t", "payload": {}}).to_string());
        } else {
            req = req.body("hello");
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{path}");
        let e = r.json_value().await;
        assert_eq!(e["error"]["field"], "idempotency_key", "{path}: {e}");
    }
    rx.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.received().len(), 1);
    // Each refusal is counted: the misspelt parameter, the three empty ones and the two
    // unreadable keys.
    let m = c.text("/metrics").await;
    assert!(
        m.contains("courier_ingest_rejected_total{reason=\"malformed\"} 6"),
        "{m}"
    );
    c.stop().await;
}
