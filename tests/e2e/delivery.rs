//! Delivery behaviour: retries, the DLQ and replay, final answers, timeouts, redirects,
//! connection reuse.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const T: Duration = Duration::from_secs(15);

fn first_delivery(reply: &serde_json::Value) -> String {
    reply["deliveries"][0]["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn fails_twice_then_succeeds_with_the_same_webhook_id() {
    let rx = Receiver::start().await;
    rx.script([
        Reply::status(500).body("boom"),
        Reply::status(502),
        Reply::status(200).body("thanks"),
    ]);
    let c = Courier::with_endpoint("app", &rx.url("/h"), "").await;
    let reply = c
        .send(json!({"event_type": "order.created", "payload": {"a": 1}}))
        .await;
    let id = first_delivery(&reply);
    let d = c.wait_status(&id, "delivered", T).await;
    let got = rx.received();
    assert_eq!(got.len(), 3);
    let ids: HashSet<&str> = got.iter().map(|r| r.header("webhook-id")).collect();
    assert_eq!(ids.len(), 1, "every attempt has the same webhook-id");
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3);
    let codes: Vec<u64> = attempts
        .iter()
        .map(|a| a["status_code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, vec![500, 502, 200]);
    let numbers: Vec<u64> = attempts
        .iter()
        .map(|a| a["number"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, vec![1, 2, 3]);
    assert_eq!(attempts[0]["response_body"], "boom");
    assert_eq!(attempts[2]["response_body"], "thanks");
    assert_eq!(attempts[0]["outcome"], "retry");
    assert_eq!(attempts[2]["outcome"], "delivered");
    assert!(attempts[0]["started_at"].as_str().unwrap().ends_with('Z'));
    assert!(attempts[0]["duration_ms"].is_u64());
    assert_eq!(d["attempt_count"], 3);
    // The gaps follow the schedule (100ms) at least.
    assert!(got[1].at - got[0].at >= Duration::from_millis(90));
    c.stop().await;
}

#[tokio::test]
async fn exhaustion_goes_to_the_dlq_and_bulk_replay_delivers() {
    let rx = Receiver::start().await;
    rx.set_default(Reply::status(500));
    let c = Courier::with_endpoint(
        "app",
        &rx.url("/h"),
        "schedule = [\"0s\", \"50ms\", \"50ms\"]",
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(first_delivery(
            &c.send(json!({"event_type": "t", "payload": {"i": i}}))
                .await,
        ));
    }
    for id in &ids {
        let d = c.wait_status(id, "dead", T).await;
        assert_eq!(d["attempts"].as_array().unwrap().len(), 3);
        assert!(
            d["last_error"].as_str().unwrap().contains("HTTP 500"),
            "{d}"
        );
    }
    assert_eq!(rx.received().len(), 9);
    let (s, dlq) = c.get("/v1/dlq?endpoint=app").await;
    assert_eq!(s, 200);
    assert_eq!(dlq["data"].as_array().unwrap().len(), 3);
    let (_, none) = c.get("/v1/dlq?endpoint=other").await;
    assert_eq!(none["data"].as_array().unwrap().len(), 0);

    // The receiver recovers; replay everything dead for the endpoint.
    rx.set_default(Reply::status(204));
    // An empty filter value (a script's unset variable) is refused, not read as "all".
    for (path, body) in [
        ("/v1/dlq/replay", json!({"endpoint": ""})),
        ("/v1/dlq/replay", json!({"since": " "})),
        ("/v1/dlq/replay?endpoint=", json!({})),
        ("/v1/dlq/replay?until=&endpoint=app", json!({})),
        // What `{"endpoint": env.EP}` and the like send for an unset variable.
        ("/v1/dlq/replay", json!({"endpoint": null})),
        ("/v1/dlq/replay?endpoint=app", json!({"until": null})),
    ] {
        let (s, r) = c.post_json(path, &body).await;
        assert_eq!(s, 400, "{path} {body}: {r}");
        let message = r["error"]["message"].as_str().unwrap();
        assert!(message.contains("empty") || message.contains("null"), "{r}");
        assert!(r["error"]["field"].is_string(), "{r}");
    }
    // A filter key given twice is refused too (the last one would silently win).
    let (s, r) = c
        .post(
            "/v1/dlq/replay",
            Some(ADMIN),
            r#"{"endpoint": null, "endpoint": "app"}"#.to_string(),
        )
        .await;
    assert_eq!(s, 400, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("duplicate field `endpoint`"),
        "{r}"
    );
    let (_, dlq) = c.get("/v1/dlq?endpoint=app").await;
    assert_eq!(
        dlq["data"].as_array().unwrap().len(),
        3,
        "nothing was requeued"
    );
    let (s, r) = c
        .post_json("/v1/dlq/replay", &json!({"endpoint": "app"}))
        .await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(r["requeued"], 3);
    for id in &ids {
        let d = c.wait_status(id, "delivered", T).await;
        assert_eq!(
            d["attempts"].as_array().unwrap().len(),
            4,
            "the replay adds one attempt"
        );
    }
    let (_, dlq) = c.get("/v1/dlq").await;
    assert_eq!(dlq["data"].as_array().unwrap().len(), 0);
    // Replaying again finds nothing dead.
    let (_, r) = c.post_json("/v1/dlq/replay", &json!({})).await;
    assert_eq!(r["requeued"], 0);
    c.stop().await;
}

#[tokio::test]
async fn single_replay_of_a_delivered_delivery_sends_it_again() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/h"), "").await;
    let id = first_delivery(&c.send(json!({"event_type": "t", "payload": {}})).await);
    c.wait_status(&id, "delivered", T).await;
    let (s, _) = c
        .post_json(&format!("/v1/deliveries/{id}/replay"), &json!({}))
        .await;
    assert_eq!(s, 202);
    let got = rx.wait_for(2, T).await;
    assert_eq!(got[0].header("webhook-id"), got[1].header("webhook-id"));
    c.wait_delivery(&id, T, |d| {
        d["status"] == "delivered" && d["attempt_count"] == 2
    })
    .await;
    let (s, e) = c
        .post_json("/v1/deliveries/dlv_nope/replay", &json!({}))
        .await;
    assert_eq!(s, 404, "{e}");
    c.stop().await;
}

#[tokio::test]
async fn gone_and_abort_are_final_at_once() {
    let rx = Receiver::start().await;
    rx.script([
        Reply::status(410),
        Reply::status(500).header("webhook-delivery", "abort"),
    ]);
    let c = Courier::with_endpoint("app", &rx.url("/h"), "ordering = \"fifo\"").await;
    let a = first_delivery(&c.send(json!({"event_type": "t", "payload": 1})).await);
    let b = first_delivery(&c.send(json!({"event_type": "t", "payload": 2})).await);
    let da = c.wait_status(&a, "dead", T).await;
    let db = c.wait_status(&b, "dead", T).await;
    assert_eq!(da["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(db["attempts"].as_array().unwrap().len(), 1);
    assert!(da["last_error"].as_str().unwrap().contains("410"));
    assert!(db["last_error"].as_str().unwrap().contains("abort"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(rx.received().len(), 2, "no retries after a final answer");
    c.stop().await;
}

/// A 429 with `Retry-After` holds back the whole endpoint, not only the delivery that got
/// it: events sent meanwhile wait for the time the receiver named instead of each spending an
/// attempt on the same refusal; then all go out. A `Retry-After: 0` holds nothing and never
/// shortens the schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_holds_back_the_endpoint() {
    let rx = Receiver::start().await;
    rx.script([Reply::status(429).header("retry-after", "3")]);
    rx.set_default(Reply::status(200));
    // The schedule's 1 s is shorter than the Retry-After: the longer wait wins.
    let c = Courier::with_endpoint("app", &rx.url("/h"), r#"schedule = ["0s", "1s", "10s"]"#).await;
    let first = first_delivery(
        &c.send(json!({"event_type": "t", "payload": {"n": 0}}))
            .await,
    );
    let refused = rx.wait_for(1, T).await[0].at;
    // Held once the refusal is recorded.
    let mut stats = serde_json::Value::Null;
    for _ in 0..100 {
        stats = c.get("/v1/endpoints/app/stats").await.1;
        if stats["last_attempt_at"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stats["held_until"].is_string(), "{stats}");
    let mut ids = vec![first];
    for n in 1..=5 {
        ids.push(first_delivery(
            &c.send(json!({"event_type": "t", "payload": {"n": n}}))
                .await,
        ));
    }
    for id in &ids {
        c.wait_status(id, "delivered", T).await;
    }
    let got = rx.received();
    assert_eq!(
        got.len(),
        7,
        "one refusal and six deliveries, no more refusals"
    );
    for r in &got[1..] {
        let waited = r.at - refused;
        assert!(
            waited >= Duration::from_millis(2900),
            "sent {waited:?} after the refusal, before its Retry-After of 3 s"
        );
    }
    let (_, stats) = c.get("/v1/endpoints/app/stats").await;
    assert!(stats["held_until"].is_null(), "{stats}");

    // `Retry-After: 0` (a load balancer mid-deploy): the schedule's delays still apply (1 s,
    // then 10 s).
    rx.script([
        Reply::status(503).header("retry-after", "0"),
        Reply::status(503).header("retry-after", "0"),
    ]);
    let id = first_delivery(&c.send(json!({"event_type": "t", "payload": {}})).await);
    let got = rx.wait_for(9, T).await;
    let gap = got[8].at - got[7].at;
    assert!(
        gap >= Duration::from_millis(900),
        "retried {gap:?} after a Retry-After: 0, before the schedule's 1 s"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rx.received().len(), 9, "retried before the schedule's 10 s");
    let (_, d) = c
        .call(
            reqwest::Method::GET,
            &format!("/v1/deliveries/{id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(d["status"], "pending", "{d}");
    c.stop().await;
}

/// An attempt picked before its endpoint was held by a `Retry-After`, and still waiting for
/// an attempt slot when the hold began, is not sent into the hold: it waits for it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_waiting_for_a_slot_is_not_sent_into_a_hold() {
    let (slow, rx) = (Receiver::start().await, Receiver::start().await);
    slow.set_default(Reply::status(200).delay(Duration::from_secs(4)));
    rx.script([Reply::status(429)
        .header("retry-after", "5")
        .delay(Duration::from_secs(2))]);
    rx.set_default(Reply::status(200));
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}max_attempts_in_flight = 4\n{}{}{}",
        endpoint("slow", &slow.url("/"), "max_in_flight = 100"),
        endpoint("slow2", &slow.url("/"), ""),
        endpoint("b", &rx.url("/"), "")
    ))
    .await;
    let send_b = |n: u32| c.send(json!({"event_type": "t", "payload": {"n": n}, "endpoint": "b"}));
    send_b(0).await;
    let first_sent = rx.wait_for(1, T).await[0].at; // answered 429 two seconds later
    for ep in ["slow", "slow", "slow2"] {
        c.send(json!({"event_type": "t", "payload": {}, "endpoint": ep}))
            .await;
    }
    slow.wait_for(3, T).await; // every slot taken
    // Picked at once; it waits for a slot, which the 429 frees.
    let second = first_delivery(&send_b(1).await);
    c.wait_status(&second, "delivered", T).await;
    let got = rx.received();
    let sent = got
        .iter()
        .find(|r| r.json()["n"] == 1)
        .expect("the second delivery was sent")
        .at;
    let waited = sent - first_sent;
    assert!(
        waited >= Duration::from_millis(6_500),
        "sent {waited:?} after the first, into the 5 s hold its 429 began 2 s after it"
    );
    c.stop().await;
}

/// A receiver that never completes the connection (a firewall dropping packets; here a
/// listener whose accept queue is full, so the kernel drops the connection attempts) fails
/// the attempt after `connect_timeout`, as `connect`, not after the endpoint's whole timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_never_made_fails_after_the_connect_timeout() {
    use socket2::{Domain, Socket, Type};
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    listener
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    // Fill its accept queue (nothing accepts): the next connection attempt goes unanswered
    // (unless the kernel is set to refuse it instead: `tcp_abort_on_overflow`).
    let refuses = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_abort_on_overflow")
        .is_ok_and(|v| v.trim() == "1");
    let mut held = Vec::new();
    while let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
        held.push(s);
        assert!(held.len() < 64, "the accept queue does not fill");
    }
    let c = Courier::start(&format!(
        "{}connect_timeout = \"1s\"\n{}",
        DELIVERY_FAST.replace("timeout = \"5s\"", "timeout = \"30s\""),
        endpoint(
            "app",
            &format!("http://{addr}/h"),
            r#"schedule = ["0s", "1h"]"#
        )
    ))
    .await;
    let id = first_delivery(&c.send(json!({"event_type": "t", "payload": {}})).await);
    let d = c
        .wait_delivery(&id, Duration::from_secs(10), |d| {
            d["attempt_count"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(d["status"], "pending", "{d}");
    let attempt = &d["attempts"][0];
    assert_eq!(attempt["error"], "connect", "{d}");
    let took = attempt["duration_ms"].as_u64().unwrap();
    let least = if refuses { 0 } else { 900 };
    assert!(
        (least..5_000).contains(&took),
        "the attempt took {took} ms: {d}"
    );
    drop(held);
    c.stop().await;
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let rx = Receiver::start().await;
    rx.script([
        Reply::status(429).header("retry-after", "2"),
        Reply::status(200),
    ]);
    let c = Courier::with_endpoint("app", &rx.url("/h"), "").await;
    let id = first_delivery(&c.send(json!({"event_type": "t", "payload": {}})).await);
    c.wait_status(&id, "delivered", T).await;
    let got = rx.received();
    assert_eq!(got.len(), 2);
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "waited {gap:?}, schedule says 100ms, Retry-After 2s"
    );
    c.stop().await;
}

#[tokio::test]
async fn slow_receivers_time_out_and_are_retried() {
    let rx = Receiver::start().await;
    // Answers after 10 s, within the 30 s default: only the endpoint's own timeout cuts it
    // short.
    rx.script([
        Reply::status(200).delay(Duration::from_secs(10)),
        Reply::status(200),
    ]);
    let c = Courier::start(&format!(
        "{}{}",
        DELIVERY_FAST.replace("timeout = \"5s\"", "timeout = \"30s\""),
        endpoint("app", &rx.url("/h"), "timeout = \"300ms\"")
    ))
    .await;
    let id = first_delivery(&c.send(json!({"event_type": "t", "payload": {}})).await);
    let d = c.wait_status(&id, "delivered", T).await;
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["error"], "timeout");
    assert!(attempts[0]["status_code"].is_null());
    let ms = attempts[0]["duration_ms"].as_u64().unwrap();
    // Not waiting for the answer (10 s): half that is left for a loaded machine.
    assert!((250..5000).contains(&ms), "timed out after {ms} ms");
    c.stop().await;
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let rx = Receiver::start().await;
    rx.set_default(Reply::status(302).header("location", &rx.url("/elsewhere")));
    let c = Courier::with_endpoint("app", &rx.url("/h"), "schedule = [\"0s\", \"50ms\"]").await;
    let id = first_delivery(&c.send(json!({"event_type": "t", "payload": {}})).await);
    let d = c.wait_status(&id, "dead", T).await;
    assert_eq!(d["attempts"][0]["status_code"], 302);
    assert!(
        rx.received().iter().all(|r| r.path == "/h"),
        "the redirect target was never called"
    );
    c.stop().await;
}

#[tokio::test]
async fn connection_errors_are_retried_with_a_class() {
    let port = free_port();
    let c = Courier::with_endpoint(
        "app",
        &format!("http://127.0.0.1:{port}/h"),
        "schedule = [\"0s\", \"50ms\"]",
    )
    .await;
    let id = first_delivery(&c.send(json!({"event_type": "t", "payload": {}})).await);
    let d = c.wait_status(&id, "dead", T).await;
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["error"], "connect", "{d:#}");
    c.stop().await;
}

#[tokio::test]
async fn keep_alive_connections_are_reused() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/h"), "ordering = \"fifo\"").await;
    for i in 0..20 {
        c.send(json!({"event_type": "t", "payload": {"i": i}}))
            .await;
    }
    let got = rx.wait_for(20, T).await;
    let peers: HashSet<_> = got.iter().map(|r| r.peer).collect();
    assert!(
        peers.len() <= 2,
        "20 sequential deliveries used {} connections",
        peers.len()
    );
    c.stop().await;
}

#[tokio::test]
async fn raw_ingest_is_delivered_byte_for_byte() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/raw"), "").await;
    let body: Vec<u8> = vec![0, 159, 146, 150, b'\n', b'x'];
    let resp = c
        .http
        .post(format!("{}/v1/ingest/app?event_type=blob.uploaded", c.base))
        .bearer_auth(INGEST_ONLY)
        .header("content-type", "application/x-custom")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].body, body);
    assert_eq!(got[0].header("content-type"), "application/x-custom");
    let sig = got[0].header("mr-signature");
    courier::deliver::sign::verify_mr(SECRET, &body, sig).unwrap();
    c.stop().await;
}

/// A raw ingest's content type goes out as given, parameters in any UTF-8 included, and so
/// does its content encoding; a content type or event type header that is not text is
/// refused, not replaced by a default.
#[tokio::test]
async fn raw_ingest_keeps_a_utf8_content_type_and_refuses_one_that_is_not_text() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/raw"), "").await;
    let post = |name: &'static str, value: Vec<u8>, body: &'static str| {
        c.http
            .post(format!("{}/v1/ingest/app", c.base))
            .bearer_auth(INGEST_ONLY)
            .header(
                name,
                reqwest::header::HeaderValue::from_bytes(&value).unwrap(),
            )
            .body(body)
            .send()
    };
    let utf8 = "text/plain; name=\"caf\u{e9}\"".as_bytes().to_vec();
    let resp = post("content-type", utf8.clone(), "kept").await.unwrap();
    assert_eq!(resp.status(), 202);
    for (name, field) in [
        ("content-type", "content_type"),
        ("x-event-type", "event_type"),
    ] {
        // "café" in Latin-1: not UTF-8.
        let resp = post(name, b"caf\xe9".to_vec(), "refused").await.unwrap();
        assert_eq!(resp.status(), 400, "{name}");
        let e = resp.json_value().await;
        assert_eq!(e["error"]["field"], field, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(name),
            "{e}"
        );
    }
    // A compressed body goes out as it came, with its content-encoding.
    let resp = post(
        "content-encoding",
        b"gzip".to_vec(),
        "\u{1f}\u{8b} not really",
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 202);
    let got = rx.wait_for(2, T).await;
    let kept = got.iter().find(|r| r.body == b"kept").unwrap();
    assert_eq!(kept.headers["content-type"].as_bytes(), utf8.as_slice());
    assert_eq!(kept.header("content-encoding"), "");
    let packed = got.iter().find(|r| r.body != b"kept").unwrap();
    assert_eq!(packed.body, "\u{1f}\u{8b} not really".as_bytes());
    assert_eq!(packed.header("content-encoding"), "gzip");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 2, "a refused event was delivered");
    c.stop().await;
}

/// A failed attempt's detail (kept in the audit trail, and logged) does not repeat the
/// endpoint's URL, whose path and query may be its credential.
#[tokio::test]
async fn a_failed_attempt_does_not_repeat_the_url_in_its_detail() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = Courier::start(&format!(
        "[delivery]\nallow_private_networks = true\nschedule = [\"0s\"]\n{}",
        endpoint(
            "app",
            &format!("http://127.0.0.1:{port}/services/PATHSECRET?token=QUERYSECRET"),
            ""
        )
    ))
    .await;
    let id = first_delivery(&c.send(json!({"event_type": "t", "payload": {}})).await);
    let d = c.wait_status(&id, "dead", T).await;
    let a = &d["attempts"][0];
    assert_eq!(a["error"], "connect", "{d:#}");
    let text = format!("{} {}", a["error_detail"], d["last_error"]);
    assert!(
        !text.contains("PATHSECRET") && !text.contains("QUERYSECRET"),
        "{text}"
    );
    assert!(!a["error_detail"].as_str().unwrap().is_empty(), "{d:#}");
    c.stop().await;
}

#[tokio::test]
async fn ssrf_guard_refuses_private_destinations_permanently() {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "[delivery]\nallow_private_networks = false\nschedule = [\"0s\", \"50ms\", \"50ms\"]\n{}{}",
        endpoint("literal", &rx.url("/h"), ""),
        endpoint(
            "named",
            &format!("http://localhost:{}/h", rx.addr.port()),
            ""
        )
    ))
    .await;
    let a = first_delivery(
        &c.send(json!({"event_type": "t", "payload": {}, "endpoint": "literal"}))
            .await,
    );
    let b = first_delivery(
        &c.send(json!({"event_type": "t", "payload": {}, "endpoint": "named"}))
            .await,
    );
    for (id, named) in [(a, false), (b, true)] {
        let d = c.wait_status(&id, "dead", T).await;
        let attempts = d["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 1, "refusals are permanent: {d:#}");
        assert_eq!(attempts[0]["error"], "ssrf_blocked");
        // The detail says why, without the addresses a name resolved to.
        let detail = attempts[0]["error_detail"].as_str().unwrap();
        assert!(detail.contains("not a public address"), "{detail}");
        if named {
            assert!(detail.contains("localhost"), "{detail}");
            assert!(
                !detail.contains("127.0.0.1") && !detail.contains("::1"),
                "{detail}"
            );
        }
    }
    assert!(rx.received().is_empty());
    c.stop().await;
}

#[tokio::test]
async fn https_goes_through_rustls_and_refuses_an_untrusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status();
    if !made.is_ok_and(|s| s.success()) {
        assert!(std::env::var_os("CI").is_none(), "openssl is needed in CI");
        eprintln!("skipping: openssl not available");
        return;
    }
    let port = free_port();
    let script = format!(
        "import http.server, ssl\n\
         class H(http.server.BaseHTTPRequestHandler):\n\
         \x20   def do_POST(self):\n\
         \x20       self.rfile.read(int(self.headers['content-length']))\n\
         \x20       self.send_response(200); self.end_headers()\n\
         \x20   def log_message(self, *a): pass\n\
         s = http.server.HTTPServer(('127.0.0.1', {port}), H)\n\
         ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain('{}', '{}')\n\
         s.socket = ctx.wrap_socket(s.socket, server_side=True)\n\
         print('ready', flush=True)\n\
         s.serve_forever()\n",
        cert.display(),
        key.display()
    );
    let mut server = std::process::Command::new("python3")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready");
    let c = Courier::with_endpoint(
        "tls",
        &format!("https://localhost:{port}/h"),
        "schedule = [\"0s\"]",
    )
    .await;
    let id = first_delivery(&c.send(json!({"event_type": "t", "payload": {}})).await);
    let d = c.wait_status(&id, "dead", T).await;
    assert_eq!(d["attempts"][0]["error"], "tls", "{d:#}");
    assert!(
        d["attempts"][0]["error_detail"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("certificate"),
        "{d:#}"
    );
    let _ = server.kill();
    let _ = server.wait();
    c.stop().await;
}

#[tokio::test]
async fn a_receiver_that_stalls_after_its_status_does_not_hold_the_attempt_until_the_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers 200 with the start of a body it never finishes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = vec![0u8; 64 * 1024];
            let _ = sock.read(&mut buf).await;
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nthanks, and")
                .await;
            held.push(sock); // open, silent
        }
    });
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("app", &url, "timeout = \"20s\"\nordering = \"fifo\"")
    ))
    .await;
    let first = first_delivery(
        &c.send(json!({"event_type": "t", "payload": {"n": 1}}))
            .await,
    );
    let second = first_delivery(
        &c.send(json!({"event_type": "t", "payload": {"n": 2}}))
            .await,
    );
    let started = std::time::Instant::now();
    let d = c.wait_status(&second, "delivered", T).await;
    // Held until the first attempt's timeout, it would wait 20 s.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the FIFO queue was held: {:?}",
        started.elapsed()
    );
    let first = c.wait_status(&first, "delivered", T).await;
    for d in [&first, &d] {
        let a = &d["attempts"][0];
        assert_eq!(a["status_code"], 200, "{d}");
        assert!(a["duration_ms"].as_u64().unwrap() < 10_000, "{d}");
        assert_eq!(a["response_body"], "thanks, and", "{d}");
    }
    server.abort();
    c.stop().await;
}

/// One event fanned out to many endpoints makes at most `delivery.max_attempts_in_flight`
/// attempts at once (each endpoint's own cap is far above it here), and every delivery
/// still goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_across_endpoints_are_capped_by_max_attempts_in_flight() {
    let rx = Receiver::start().await;
    rx.set_default(Reply::status(200).delay(Duration::from_millis(300)));
    let endpoints: String = (0..30)
        .map(|i| endpoint(&format!("e{i}"), &rx.url(&format!("/{i}")), ""))
        .collect();
    let c = Courier::start(&format!(
        "{}max_attempts_in_flight = 5\n{endpoints}",
        DELIVERY_FAST
    ))
    .await;
    let r = c.send(json!({"event_type": "t", "payload": {}})).await;
    assert_eq!(r["deliveries"].as_array().unwrap().len(), 30);
    rx.wait_for(30, Duration::from_secs(30)).await;
    assert!(rx.max_concurrent() <= 5, "{} at once", rx.max_concurrent());
    assert!(rx.max_concurrent() >= 2, "{} at once", rx.max_concurrent());
    for d in r["deliveries"].as_array().unwrap() {
        c.wait_status(d["id"].as_str().unwrap(), "delivered", T)
            .await;
    }
    c.stop().await;
}

/// Courier with `slots` attempt slots in all and two endpoints: `slow` (with `slow_extra`)
/// on a receiver that answers after `delay`, and `b` on one that answers at once.
async fn sharing_slots(
    slots: usize,
    delay: Duration,
    slow_extra: &str,
) -> (Receiver, Receiver, Courier) {
    let (slow, rx) = (Receiver::start().await, Receiver::start().await);
    slow.set_default(Reply::status(200).delay(delay));
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}max_attempts_in_flight = {slots}\n{}{}",
        endpoint("slow", &slow.url("/"), slow_extra),
        endpoint("b", &rx.url("/"), "")
    ))
    .await;
    (slow, rx, c)
}

/// An attempt that waited for one of the process-wide slots is made only if what it was
/// picked with still holds: an endpoint paused meanwhile sends nothing until resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_waited_for_a_slot_respects_a_pause_made_meanwhile() {
    let (slow, rx, c) = sharing_slots(1, Duration::from_secs(2), "").await;
    c.send(json!({"event_type": "t", "payload": {}, "endpoint": "slow"}))
        .await;
    slow.wait_for(1, T).await; // the only slot is taken for 2 s
    let r = c
        .send(json!({"event_type": "t", "payload": {"n": 1}, "endpoint": "b"}))
        .await;
    let id = r["deliveries"][0]["id"].as_str().unwrap().to_string();
    let (s, p) = c
        .call(
            reqwest::Method::POST,
            "/v1/endpoints/b/pause",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{p}");
    // The slot frees; nothing goes to the paused endpoint.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(rx.received().is_empty(), "sent to a paused endpoint");
    let (s, p) = c
        .call(
            reqwest::Method::POST,
            "/v1/endpoints/b/resume",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{p}");
    c.wait_status(&id, "delivered", T).await;
    assert_eq!(rx.received().len(), 1);
    c.stop().await;
}

/// An attempt that waited for a slot and found its endpoint changed meanwhile hands its
/// delivery back, and the worker finds it again at once, though the endpoint has other
/// attempts in flight all along (its scan had moved past the delivery, and used to move
/// back only once the endpoint had nothing in flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_handed_back_after_waiting_for_a_slot_is_not_passed_over() {
    let (slow, rx) = (Receiver::start().await, Receiver::start().await);
    slow.set_default(Reply::status(200).delay(Duration::from_secs(3)));
    // b's first request hangs for 9 s; the rest are answered at once.
    rx.script([Reply::status(200).delay(Duration::from_secs(9))]);
    rx.set_default(Reply::status(200));
    // Six slots: no endpoint takes more than three.
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}max_attempts_in_flight = 6\n{}{}",
        endpoint("slow", &slow.url("/"), "max_in_flight = 100"),
        endpoint("slow2", &slow.url("/"), "")
    ))
    .await;
    let body = |v: serde_json::Value| Some(v.to_string().into());
    let (s, p) = c
        .call(
            reqwest::Method::POST,
            "/v1/endpoints",
            Some(ADMIN),
            body(json!({"name": "b", "url": rx.url("/"), "timeout": "20s"})),
        )
        .await;
    assert_eq!(s, 201, "{p}");
    let id = |r: &serde_json::Value| r["deliveries"][0]["id"].as_str().unwrap().to_string();
    let send_b = |n: u32| c.send(json!({"event_type": "t", "payload": {"n": n}, "endpoint": "b"}));
    let first = id(&send_b(0).await);
    rx.wait_for(1, T).await; // one slot held by b for 9 s
    for ep in ["slow", "slow", "slow", "slow2", "slow2"] {
        c.send(json!({"event_type": "t", "payload": {}, "endpoint": ep}))
            .await;
    }
    slow.wait_for(5, T).await; // the other five held for 3 s
    // b's worker picks this one; it waits for a slot.
    let second = id(&send_b(1).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // b changes: the waiting attempt will not be made as picked.
    let (s, p) = c
        .call(
            reqwest::Method::PATCH,
            "/v1/endpoints/b",
            Some(ADMIN),
            body(json!({"headers": {"x-changed": "1"}})),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    // Picked after the change (the scan moves past the second); waits for a slot too.
    let third = id(&send_b(2).await);
    // The slow attempts end about 3 s after they began: the second and third go out then,
    // not once b's first attempt is over, 9 s after it began.
    c.wait_status(&third, "delivered", Duration::from_secs(5))
        .await;
    c.wait_status(&second, "delivered", Duration::from_secs(2))
        .await;
    let (_, d) = c
        .call(
            reqwest::Method::GET,
            &format!("/v1/deliveries/{first}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(d["status"], "pending", "the first attempt still hangs: {d}");
    assert!(
        rx.received()[1..]
            .iter()
            .all(|r| r.header("x-changed") == "1")
    );
    c.stop().await;
}

/// A delivery handed back unsent (its endpoint changed while it waited for a slot) gives
/// back the rate-limit token it took: at `1/m` a lost token was a minute's delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_handed_back_keeps_its_rate_limit_token() {
    let (slow, rx, c) = sharing_slots(2, Duration::from_secs(3), "").await;
    let body = |v: serde_json::Value| Some(v.to_string().into());
    for (name, v) in [
        ("slow2", json!({"name": "slow2", "url": slow.url("/")})),
        (
            "r",
            json!({"name": "r", "url": rx.url("/"), "rate_limit": "1/m"}),
        ),
    ] {
        let (s, p) = c
            .call(reqwest::Method::POST, "/v1/endpoints", Some(ADMIN), body(v))
            .await;
        assert_eq!(s, 201, "{name}: {p}");
    }
    // Both slots held for 3 s.
    for ep in ["slow", "slow2"] {
        c.send(json!({"event_type": "t", "payload": {}, "endpoint": ep}))
            .await;
    }
    slow.wait_for(2, T).await;
    // r's worker picks this one with its only token; it waits for a slot.
    let r = c
        .send(json!({"event_type": "t", "payload": {}, "endpoint": "r"}))
        .await;
    let id = r["deliveries"][0]["id"].as_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, p) = c
        .call(
            reqwest::Method::PATCH,
            "/v1/endpoints/r",
            Some(ADMIN),
            body(json!({"headers": {"x-changed": "1"}})),
        )
        .await;
    assert_eq!(s, 200, "{p}");
    // Handed back when a slot frees (~3 s), then sent with the same token, not a minute on.
    c.wait_status(&id, "delivered", Duration::from_secs(8))
        .await;
    assert_eq!(rx.received().len(), 1);
    assert_eq!(rx.received()[0].header("x-changed"), "1");
    c.stop().await;
}

/// No endpoint takes more than half of the shared attempt slots: a slow receiver behind an
/// endpoint with a large `max_in_flight` leaves room for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_with_a_large_cap_leaves_slots_for_the_others() {
    let (slow, _rx, c) = sharing_slots(4, Duration::from_secs(5), "max_in_flight = 100").await;
    for _ in 0..10 {
        c.send(json!({"event_type": "t", "payload": {}, "endpoint": "slow"}))
            .await;
    }
    slow.wait_for(2, T).await;
    let r = c
        .send(json!({"event_type": "t", "payload": {}, "endpoint": "b"}))
        .await;
    // Delivered while the slow endpoint's attempts (two at a time: half the slots) wait.
    c.wait_status(r["deliveries"][0]["id"].as_str().unwrap(), "delivered", T)
        .await;
    assert_eq!(slow.max_concurrent(), 2);
    c.stop().await;
}
