//! Delivery controls: FIFO ordering, concurrency caps, rate limits, endpoint isolation, the
//! circuit breaker, retention.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

fn ids(replies: &[Value]) -> Vec<String> {
    replies
        .iter()
        .map(|r| r["deliveries"][0]["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn fifo_head_failing_twice_blocks_those_behind_it() {
    let rx = Receiver::start().await;
    rx.script([Reply::status(500), Reply::status(503)]);
    let c = Courier::with_endpoint(
        "ordered",
        &rx.url("/"),
        "ordering = \"fifo\"\nschedule = [\"0s\", \"150ms\", \"150ms\", \"150ms\"]",
    )
    .await;
    let mut replies = Vec::new();
    for i in 0..6 {
        replies.push(
            c.send(json!({"event_type": "t", "payload": {"i": i}}))
                .await,
        );
    }
    for id in ids(&replies) {
        c.wait_status(&id, "delivered", T).await;
    }
    let order: Vec<i64> = rx
        .received()
        .iter()
        .map(|r| r.json()["i"].as_i64().unwrap())
        .collect();
    assert_eq!(
        order,
        vec![0, 0, 0, 1, 2, 3, 4, 5],
        "head retried in place, the rest in ingest order"
    );
    assert_eq!(rx.max_concurrent(), 1);
    c.stop().await;
}

#[tokio::test]
async fn fifo_dead_head_lets_the_next_proceed() {
    let rx = Receiver::start().await;
    rx.script([Reply::status(500), Reply::status(500)]);
    let c = Courier::with_endpoint(
        "ordered",
        &rx.url("/"),
        "ordering = \"fifo\"\nschedule = [\"0s\", \"100ms\"]",
    )
    .await;
    let a = c
        .send(json!({"event_type": "t", "payload": {"i": 0}}))
        .await;
    let b = c
        .send(json!({"event_type": "t", "payload": {"i": 1}}))
        .await;
    c.wait_status(&ids(&[a])[0], "dead", T).await;
    c.wait_status(&ids(&[b])[0], "delivered", T).await;
    let order: Vec<i64> = rx
        .received()
        .iter()
        .map(|r| r.json()["i"].as_i64().unwrap())
        .collect();
    assert_eq!(order, vec![0, 0, 1]);
    c.stop().await;
}

#[tokio::test]
async fn unordered_endpoints_deliver_concurrently_up_to_max_in_flight() {
    let rx = Receiver::start().await;
    // Each attempt takes 2 s, and the events are sent at once: however slowly this machine
    // sends and schedules, attempts overlap unless courier keeps them apart.
    rx.set_default(Reply::status(200).delay(Duration::from_secs(2)));
    let c = Courier::with_endpoint("par", &rx.url("/"), "max_in_flight = 4").await;
    let replies = futures_util::future::join_all(
        (0..12).map(|i| c.send(json!({"event_type": "t", "payload": {"i": i}}))),
    )
    .await;
    for id in ids(&replies) {
        c.wait_status(&id, "delivered", T).await;
    }
    assert_eq!(
        rx.max_concurrent(),
        4,
        "concurrent, and never more than max_in_flight"
    );
    c.stop().await;
}

#[tokio::test]
async fn rate_limit_paces_attempts_without_consuming_the_schedule() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint(
        "slow",
        &rx.url("/"),
        "rate_limit = \"5/s\"\nschedule = [\"0s\"]",
    )
    .await;
    let mut replies = Vec::new();
    for i in 0..15 {
        replies.push(
            c.send(json!({"event_type": "t", "payload": {"i": i}}))
                .await,
        );
    }
    let got = rx.wait_for(15, T).await;
    let span = got[14].at - got[0].at;
    // A bucket of 5 goes at once, the other 10 at 5/s.
    assert!(
        span >= Duration::from_millis(1700),
        "15 sends at 5/s took only {span:?}"
    );
    // After the initial burst of 5, no second holds more than a bucket refilled meanwhile
    // (a worker held up by a loaded machine finds it full again) and the second's own 5.
    for (i, r) in got.iter().enumerate().skip(5) {
        let in_window = got[i..]
            .iter()
            .filter(|o| o.at - r.at < Duration::from_secs(1))
            .count();
        assert!(in_window <= 10, "{in_window} sends within one second");
    }
    // Waiting for a token is not an attempt: every delivery succeeded on its only attempt.
    for id in ids(&replies) {
        let d = c.wait_status(&id, "delivered", T).await;
        assert_eq!(d["attempt_count"], 1);
    }
    c.stop().await;
}

#[tokio::test]
async fn a_rate_limit_holds_across_idle_moments_and_an_idle_endpoint_keeps_no_worker() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("slow", &rx.url("/"), "rate_limit = \"2/s\"").await;
    // One event at a time, each sent once the one before is delivered: the endpoint goes
    // idle in between, and must not get a fresh burst of tokens each time.
    for i in 0..6 {
        let r = c
            .send(json!({"event_type": "t", "payload": {"i": i}}))
            .await;
        c.wait_status(&ids(&[r])[0], "delivered", T).await;
    }
    let got = rx.received();
    assert_eq!(got.len(), 6);
    // Two tokens at once, then one every 500 ms.
    let span = got[5].at - got[0].at;
    assert!(
        span >= Duration::from_millis(1700),
        "6 sends at 2/s took only {span:?}"
    );
    // With nothing left to send, the endpoint's worker goes away (it does not spin waiting
    // for tokens it has no use for).
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.app().scheduler.workers() > 0 {
        assert!(
            Instant::now() < deadline,
            "the idle endpoint kept its worker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_due_at_once_is_not_passed_over_while_the_endpoint_stays_busy() {
    let rx = Receiver::start().await;
    let slow = || Reply::status(200).delay(Duration::from_millis(100));
    rx.set_default(slow());
    // Every tenth request is refused with `Retry-After: 0`: its retry is due after the
    // schedule's 100 ms, and events keep arriving meanwhile, so the scan may pass its due
    // time before it is stored.
    rx.script((0..1000).map(|i| match i % 10 {
        9 => Reply::status(503).header("retry-after", "0"),
        _ => slow(),
    }));
    let c = Courier::with_endpoint("busy", &rx.url("/"), "max_in_flight = 8").await;
    // 50 events/s against room for 80/s: attempts are always in flight, for 10 s.
    let sent = 500;
    let start = Instant::now();
    let mut sent_at = Vec::with_capacity(sent);
    for i in 0..sent {
        tokio::time::sleep_until((start + Duration::from_millis(20 * i as u64)).into()).await;
        sent_at.push(Instant::now());
        c.send(json!({"event_type": "t", "payload": {"i": i}}))
            .await;
    }
    let got = rx.wait_for(sent + sent / 10, T).await;
    // A retry is due once its refusal is recorded, moments after the refusal; events sent
    // 3 s after that were made later, so due later, and are attempted after it. A retry the
    // scan passed over is attempted only once nothing is in flight — after everything sent
    // meanwhile. (Its wait alone says nothing: on a loaded machine a backlog forms, which
    // the retry rightly waits behind.)
    let events: Vec<usize> = got
        .iter()
        .map(|r| r.json()["i"].as_u64().unwrap() as usize)
        .collect();
    let mut previous: std::collections::HashMap<String, Instant> = Default::default();
    let mut overtaken = Vec::new();
    for (n, r) in got.iter().enumerate() {
        if let Some(refused) = previous.insert(r.header("webhook-id").to_string(), r.at) {
            let newer = events[..n]
                .iter()
                .filter(|&&i| sent_at[i] >= refused + Duration::from_secs(3))
                .count();
            if newer > 0 {
                overtaken.push((events[n], r.at - refused, newer));
            }
        }
    }
    assert!(
        overtaken.is_empty(),
        "retries (event, wait, attempts of events sent 3 s after it was due) passed over: {overtaken:?}"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_hanging_endpoint_never_delays_a_healthy_one() {
    let hang = Receiver::start().await;
    hang.set_default(Reply::status(200).delay(Duration::from_secs(20)));
    let ok = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        endpoint(
            "hang",
            &hang.url("/"),
            "max_in_flight = 2\ntimeout = \"30s\""
        ),
        endpoint("ok", &ok.url("/"), ""),
    ))
    .await;
    for i in 0..20 {
        c.send(json!({"event_type": "t", "payload": {"i": i}, "endpoint": "hang"}))
            .await;
    }
    hang.wait_for(2, T).await;
    let start = Instant::now();
    for i in 0..20 {
        c.send(json!({"event_type": "t", "payload": {"i": i}, "endpoint": "ok"}))
            .await;
    }
    // Held behind the hanging endpoint, they would wait its 20 s.
    ok.wait_for(20, Duration::from_secs(10)).await;
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(
        hang.received().len(),
        2,
        "the hanging endpoint holds only its own two slots"
    );
    let m = c.text("/metrics").await;
    assert!(
        m.contains("courier_queue_depth{endpoint=\"hang\"} 20"),
        "{m}"
    );
    // No graceful stop: it would rightly wait for the two hanging attempts.
    drop(c);
}

#[tokio::test]
async fn circuit_opens_after_consecutive_failures_and_closes_on_success() {
    let rx = Receiver::start().await;
    rx.set_default(Reply::status(500));
    let c = Courier::start(&format!(
        r#"
[delivery]
allow_private_networks = true
jitter = 0.0
circuit_failures = 3
circuit_probe_interval = "600ms"
{}"#,
        endpoint("flaky", &rx.url("/"), "max_in_flight = 1\nschedule = [\"0s\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\", \"10ms\"]")
    ))
    .await;
    let mut replies = Vec::new();
    for i in 0..5 {
        replies.push(
            c.send(json!({"event_type": "t", "payload": {"i": i}}))
                .await,
        );
    }
    rx.wait_for(3, T).await;
    let deadline = Instant::now() + T;
    loop {
        let (_, st) = c.get("/v1/stats?endpoint=flaky").await;
        if st["endpoints"][0]["circuit"] == "open" {
            break;
        }
        assert!(Instant::now() < deadline, "circuit never opened: {st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        c.text("/metrics")
            .await
            .contains("courier_endpoint_circuit_open{endpoint=\"flaky\"} 1")
    );
    // The endpoint's stats say when the next probe may go: within a probe interval.
    let (_, st) = c.get("/v1/endpoints/flaky/stats").await;
    let at = st["next_probe_at"]
        .as_str()
        .and_then(courier::model::parse_time)
        .unwrap_or_else(|| panic!("no next_probe_at while open: {st}"));
    let now = courier::model::now_ms();
    assert!(
        at + 100 >= now && at <= now + 700,
        "next probe at {at}, now {now}: {st}"
    );
    // One attempt at a time: the circuit opens at the third failure, and the first probe
    // waits a probe interval after it.
    let got = rx.wait_for(4, T).await;
    let first_probe = got[3].at - got[2].at;
    assert!(
        first_probe >= Duration::from_millis(550),
        "first probe {first_probe:?} after the circuit opened"
    );
    // While open, the endpoint is only probed: about one attempt per 600ms, not every 10ms.
    let before = rx.received().len();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let probes = rx.received().len() - before;
    assert!(
        probes <= 4,
        "{probes} attempts in 1.5s while the circuit was open"
    );
    // Recovery: the next probe succeeds, the circuit closes and everything flows.
    rx.set_default(Reply::status(200));
    for id in ids(&replies) {
        c.wait_status(&id, "delivered", T).await;
    }
    let (_, st) = c.get("/v1/stats?endpoint=flaky").await;
    assert_eq!(st["endpoints"][0]["circuit"], "closed");
    assert_eq!(st["endpoints"][0]["next_probe_at"], Value::Null, "{st}");
    assert!(
        c.text("/metrics")
            .await
            .contains("courier_endpoint_circuit_open{endpoint=\"flaky\"} 0")
    );
    c.stop().await;
}

#[tokio::test]
async fn retention_purges_finished_deliveries() {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "[delivery]\nallow_private_networks = true\nretention = \"1s\"\n{}{}",
        endpoint("app", &rx.url("/"), ""),
        endpoint(
            "down",
            &format!("http://127.0.0.1:{}/", free_port()),
            "schedule = [\"1h\"]"
        )
    ))
    .await;
    let done = c
        .send(json!({"event_type": "t", "payload": {}, "endpoint": "app"}))
        .await;
    let waiting = c
        .send(json!({"event_type": "t", "payload": {}, "endpoint": "down"}))
        .await;
    let done_id = ids(&[done])[0].clone();
    c.wait_status(&done_id, "delivered", T).await;
    let deadline = Instant::now() + T;
    loop {
        let (s, _) = c.get(&format!("/v1/deliveries/{done_id}")).await;
        if s == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "delivered delivery was never purged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Pending work is never purged.
    let (s, d) = c
        .get(&format!("/v1/deliveries/{}", ids(&[waiting])[0]))
        .await;
    assert_eq!((s, d["status"].as_str()), (200, Some("pending")));
    assert!(
        c.text("/metrics")
            .await
            .contains("courier_retention_purged_total 1")
    );
    c.stop().await;
}

#[tokio::test]
async fn deliberate_never_retry_answers_do_not_open_the_circuit() {
    let rx = Receiver::start().await;
    rx.script([
        Reply::status(410),
        Reply::status(503).header("webhook-delivery", "abort"),
        Reply::status(410),
        Reply::status(410),
    ]);
    let c = Courier::start(&format!(
        r#"
[delivery]
allow_private_networks = true
jitter = 0.0
circuit_failures = 3
circuit_probe_interval = "60s"
{}"#,
        endpoint("app", &rx.url("/"), "max_in_flight = 1")
    ))
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = c
            .send(json!({"event_type": "t", "payload": {"i": i}}))
            .await;
        ids.push(r["deliveries"][0]["id"].as_str().unwrap().to_string());
    }
    // Four answered "never retry" (dead at once); the fifth goes through without waiting a
    // probe interval, because the endpoint never failed.
    assert_eq!(
        c.wait_status(&ids[4], "delivered", T).await["attempt_count"],
        1
    );
    for id in &ids[..4] {
        c.wait_status(id, "dead", T).await;
    }
    let (_, st) = c.get("/v1/stats?endpoint=app").await;
    assert_eq!(st["endpoints"][0]["circuit"], "closed", "{st}");
    c.stop().await;
}

/// What an operator's alerts read: how long the oldest pending delivery has waited, and
/// how many dead deliveries were replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_pending_age_and_replays_show_in_the_metrics() {
    let rx = Receiver::start().await;
    rx.script([Reply::status(500)]);
    let c = Courier::with_endpoint("app", &rx.url("/"), "schedule = [\"0s\"]").await;
    let gauge = |m: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix("courier_oldest_pending_age_seconds "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no oldest-pending gauge: {m}"))
    };
    assert_eq!(gauge(&c.text("/metrics").await), 0.0, "nothing pending");
    // One attempt, answered 500: dead.
    let r = c.send(json!({"event_type": "t", "payload": {}})).await;
    let id = ids(&[r])[0].clone();
    c.wait_status(&id, "dead", T).await;
    // Paused, a new event waits.
    let (s, _) = c
        .call(
            reqwest::Method::POST,
            "/v1/endpoints/app/pause",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 200);
    c.send(json!({"event_type": "t", "payload": {}})).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let waited = gauge(&c.text("/metrics").await);
    assert!((1.4..60.0).contains(&waited), "waited {waited} s");
    // Replayed: counted (and, once resumed, delivered with the waiting one).
    let (s, r) = c
        .post_json(&format!("/v1/deliveries/{id}/replay"), &json!({}))
        .await;
    assert_eq!(s, 202, "{r}");
    c.metrics_with("courier_replays_total 1").await;
    c.call(
        reqwest::Method::POST,
        "/v1/endpoints/app/resume",
        Some(ADMIN),
        None,
    )
    .await;
    c.wait_status(&id, "delivered", T).await;
    rx.wait_for(3, T).await;
    let deadline = Instant::now() + T;
    while gauge(&c.text("/metrics").await) != 0.0 {
        assert!(Instant::now() < deadline, "the gauge never went back to 0");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.stop().await;
}

/// A deleted endpoint whose deliveries retention has purged leaves nothing behind: not its
/// series in the metrics, nor a zero count in memory (an endpoint made and deleted through
/// the API for every customer that comes and goes would otherwise grow both for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_endpoint_purged_by_retention_leaves_no_counts_behind() {
    let rx = Receiver::start().await;
    let c = Courier::start("[delivery]\nallow_private_networks = true\nretention = \"1s\"\n").await;
    let (s, r) = c
        .post_json(
            "/v1/endpoints",
            &json!({"name": "gone", "url": rx.url("/")}),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let r = c
        .send(json!({"event_type": "t", "payload": {}, "endpoint": "gone"}))
        .await;
    let id = ids(&[r])[0].clone();
    c.wait_status(&id, "delivered", T).await;
    c.metrics_with("courier_deliveries{endpoint=\"gone\",status=\"delivered\"} 1")
        .await;
    let (s, _) = c
        .call(
            reqwest::Method::DELETE,
            "/v1/endpoints/gone",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let deadline = Instant::now() + T;
    loop {
        let m = c.text("/metrics").await;
        let counted = c.app().store.counts().keys().any(|(ep, _)| ep == "gone");
        if !m.contains("endpoint=\"gone\"") && !counted {
            break;
        }
        assert!(Instant::now() < deadline, "still counted ({counted}): {m}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.stop().await;
}
