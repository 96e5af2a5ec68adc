//! The DLQ's time filters: `GET /v1/dlq?since=&until=` and `POST /v1/dlq/replay` with
//! `since`/`until` (query or JSON body) select only the dead deliveries created in the window.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

/// Sends an event to `app` and waits for its delivery to be dead; the delivery.
async fn dead_one(c: &Courier, n: u32) -> Value {
    let r = c
        .send(json!({"event_type": "t", "payload": {"n": n}, "endpoint": "app"}))
        .await;
    let id = r["deliveries"][0]["id"].as_str().unwrap().to_string();
    c.wait_status(&id, "dead", T).await
}

fn ids(list: &Value) -> BTreeSet<String> {
    assert!(list["next_cursor"].is_null(), "{list:#}");
    list["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{list:#}"))
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

fn set(list: &[&Value]) -> BTreeSet<String> {
    list.iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

fn ms(t: &Value) -> u64 {
    courier::model::parse_time(t.as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_listing_and_bulk_replay_select_by_since_and_until() {
    let rx = Receiver::start().await;
    // 410 Gone: dead at the first attempt.
    rx.set_default(Reply::status(410));
    let c = Courier::with_endpoint("app", &rx.url("/hook"), "").await;

    let a1 = dead_one(&c, 1).await;
    let a2 = dead_one(&c, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mid_ms = courier::model::now_ms();
    let mid = courier::model::rfc3339(mid_ms);
    assert!(mid.ends_with('Z'), "{mid}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b1 = dead_one(&c, 3).await;
    // The window's edge falls between the two groups.
    assert!(ms(&a2["created_at"]) < mid_ms, "{a2:#} {mid}");
    assert!(ms(&b1["created_at"]) > mid_ms, "{b1:#} {mid}");
    let early = set(&[&a1, &a2]);
    let late = set(&[&b1]);

    // Listing.
    let (s, all) = c.get("/v1/dlq").await;
    assert_eq!(s, 200, "{all}");
    assert_eq!(ids(&all), &early | &late);
    let (_, l) = c.get(&format!("/v1/dlq?until={mid}")).await;
    assert_eq!(ids(&l), early, "until={mid}: {l:#}");
    let (_, l) = c.get(&format!("/v1/dlq?since={mid}")).await;
    assert_eq!(ids(&l), late, "since={mid}: {l:#}");
    let (_, l) = c
        .get(&format!(
            "/v1/dlq?endpoint=app&since=2000-01-01T00:00:00Z&until={mid}"
        ))
        .await;
    assert_eq!(ids(&l), early, "{l:#}");
    let (_, l) = c
        .get(&format!("/v1/dlq?since={mid}&until=2999-01-01T00:00:00Z"))
        .await;
    assert_eq!(ids(&l), late, "{l:#}");
    // The same instant written with an offset (`+` encoded as %2B).
    let offset = chrono::DateTime::from_timestamp_millis(mid_ms as i64)
        .unwrap()
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).unwrap())
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
    assert!(offset.contains("+02:00"), "{offset}");
    let (s, l) = c
        .get(&format!("/v1/dlq?until={}", offset.replace('+', "%2B")))
        .await;
    assert_eq!(s, 200, "{l}");
    assert_eq!(ids(&l), early, "until={offset}: {l:#}");
    // A window with nothing in it.
    let (_, l) = c.get("/v1/dlq?until=2000-01-01T00:00:00Z").await;
    assert!(ids(&l).is_empty(), "{l:#}");

    // Bulk replays. The receiver keeps answering 410, so a replayed delivery dies again
    // and every step runs with dead deliveries on both sides of its window: one the filter
    // failed to apply would requeue them too.
    let attempts = |n: u64| move |d: &Value| d["status"] == "dead" && d["attempt_count"] == n;
    let mut round = [1u64, 1, 1]; // attempts so far of a1, a2, b1
    let all = [&a1, &a2, &b1];
    for (step, (query, body, expect)) in [
        (format!("?until={mid}"), None, &early),
        (String::new(), Some(json!({"since": mid})), &late),
        (format!("?since={mid}"), None, &late),
        (String::new(), Some(json!({"until": mid})), &early),
        (
            String::new(),
            Some(json!({"since": mid, "until": "2999-01-01T00:00:00Z"})),
            &late,
        ),
        (
            format!(
                "?since=2000-01-01T00:00:00Z&until={}",
                offset.replace('+', "%2B")
            ),
            None,
            &early,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let path = format!("/v1/dlq/replay{query}");
        let (s, r) = match &body {
            Some(b) => c.post_json(&path, b).await,
            None => c.post(&path, Some(ADMIN), "").await,
        };
        assert_eq!(s, 202, "step {step}: {r}");
        assert_eq!(
            r["requeued"],
            expect.len(),
            "step {step} {path} {body:?}: {r}"
        );
        let replayed: BTreeSet<String> = r["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(&replayed, expect, "step {step} {path} {body:?}");
        for (i, d) in all.iter().enumerate() {
            if expect.contains(d["id"].as_str().unwrap()) {
                round[i] += 1;
            }
        }
        // Wait until the replayed ones are dead again, and check that the others were not
        // attempted.
        for (i, d) in all.iter().enumerate() {
            let id = d["id"].as_str().unwrap();
            let got = c.wait_delivery(id, T, attempts(round[i])).await;
            assert_eq!(got["attempt_count"], round[i], "step {step}: {got:#}");
        }
    }
    // A window that matches nothing requeues nothing.
    let (s, r) = c
        .post_json("/v1/dlq/replay", &json!({"until": "2000-01-01T00:00:00Z"}))
        .await;
    assert_eq!((s, r["requeued"].as_u64()), (202, Some(0)), "{r}");
    let (s, r) = c
        .post("/v1/dlq/replay?since=2999-01-01T00:00:00Z", Some(ADMIN), "")
        .await;
    assert_eq!((s, r["requeued"].as_u64()), (202, Some(0)), "{r}");

    // The receiver saw exactly those attempts.
    let got = rx.received();
    for (i, n) in [1, 2, 3].into_iter().enumerate() {
        assert_eq!(
            got.iter().filter(|r| r.json()["n"] == n).count() as u64,
            round[i],
            "n={n}"
        );
    }
    assert_eq!(round, [4, 4, 4]);
    c.stop().await;
}

/// A bulk-replay filter has a limit of its own (64 KiB), whatever `server.max_body_bytes`
/// is, and the 413 says so rather than naming `max_body_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_replay_filter_is_refused_naming_its_own_limit() {
    let c = Courier::start(DELIVERY_FAST).await;
    let big = json!({"endpoint": "x".repeat(70 * 1024)}).to_string();
    let (s, e) = c
        .call(
            reqwest::Method::POST,
            "/v1/dlq/replay",
            Some(ADMIN),
            Some(big.into()),
        )
        .await;
    assert_eq!(s, 413, "{e}");
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("replay filter") && msg.contains("65536"),
        "{msg}"
    );
    c.stop().await;
}
