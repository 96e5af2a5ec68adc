//! Endpoints as data: the management API over HTTP with real deliveries.

use std::time::{Duration, Instant};

use courier::deliver::sign;
use serde_json::{Value, json};

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

async fn req(
    c: &Courier,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    c.call(
        method,
        path,
        Some(ADMIN),
        body.map(|b| b.to_string().into()),
    )
    .await
}

async fn send_to(c: &Courier, endpoint: &str, n: i64) -> String {
    let r = c
        .send(json!({"event_type": "t", "payload": {"n": n}, "endpoint": endpoint}))
        .await;
    r["deliveries"][0]["id"].as_str().unwrap().to_string()
}

/// Replays delivery `id`, which must be refused with a 409; the error.
async fn replay_refused(c: &Courier, id: &str) -> Value {
    let path = format!("/v1/deliveries/{id}/replay");
    let (s, e) = req(c, reqwest::Method::POST, &path, None).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{e}"
    );
    e
}

/// Commits the delete of `shared` with its promise to drop what is queued, and nothing
/// more (as a delete interrupted before its drop leaves it); whether it was there.
async fn delete_without_drop(c: &Courier) -> bool {
    c.app()
        .store
        .write_endpoint(courier::store::EndpointWrite {
            name: "shared".into(),
            value: None,
            create: false,
            drop_pending: true,
        })
        .await
        .unwrap()
}

/// Makes the API endpoint `shared` at `url`; the status.
async fn create_shared(c: &Courier, url: String) -> (u16, Value) {
    req(
        c,
        reqwest::Method::POST,
        "/v1/endpoints",
        Some(json!({"name": "shared", "url": url, "secrets": [SECRET]})),
    )
    .await
}

fn sig_count(r: &Received) -> usize {
    r.header("webhook-signature").split(' ').count()
}

#[tokio::test]
async fn the_whole_lifecycle_over_http() {
    let (rx1, rx2) = (Receiver::start().await, Receiver::start().await);
    let c = Courier::start(DELIVERY_FAST).await;
    use reqwest::Method as M;

    // Create without a secret: one is generated and shown once.
    let (s, ep) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({
            "name": "acme", "url": rx1.url("/one"), "ordering": "fifo", "tenant": "t-acme",
            "description": "Acme's webhook", "schedule": ["0s", "100ms", "100ms"],
        })),
    )
    .await;
    assert_eq!(s, 201, "{ep}");
    let secret = ep["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    assert_eq!(ep["source"], "api");
    assert_eq!(ep["tenant"], "t-acme");
    let (_, shown) = req(&c, M::GET, "/v1/endpoints/acme", None).await;
    assert!(
        shown.get("secret").is_none() && !shown.to_string().contains(&secret),
        "secrets are never shown again"
    );

    // Deliver, signed with that secret.
    send_to(&c, "acme", 1).await;
    let got = rx1.wait_for(1, T).await;
    sign::verify_mr(&secret, &got[0].body, got[0].header("mr-signature")).unwrap();

    // Patch the URL: the next delivery goes to the new one.
    let (s, p) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/acme",
        Some(json!({"url": rx2.url("/two")})),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["url"], rx2.url("/two"));
    assert_eq!(p["description"], "Acme's webhook", "untouched fields stay");
    send_to(&c, "acme", 2).await;
    assert_eq!(rx2.wait_for(1, T).await[0].path, "/two");

    // Pause: deliveries queue, nothing is sent, no attempts are used.
    let (s, p) = req(&c, M::POST, "/v1/endpoints/acme/pause", None).await;
    assert_eq!((s, p["paused"].as_bool()), (200, Some(true)));
    let mut queued = Vec::new();
    for n in 10..15 {
        queued.push(send_to(&c, "acme", n).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rx2.received().len(), 1, "nothing sent while paused");
    let (_, st) = req(&c, M::GET, "/v1/endpoints/acme/stats", None).await;
    assert_eq!(st["queue_depth"], 5, "{st}");
    assert_eq!(st["paused"], true);
    let (s, _) = req(&c, M::POST, "/v1/endpoints/acme/test", None).await;
    assert_eq!(s, 409, "a paused endpoint refuses a test send");

    // Resume: all arrive, in order, each on its first attempt.
    let (s, p) = req(&c, M::POST, "/v1/endpoints/acme/resume", None).await;
    assert_eq!((s, p["paused"].as_bool()), (200, Some(false)), "{p}");
    let got = rx2.wait_for(6, T).await;
    let order: Vec<i64> = got[1..]
        .iter()
        .map(|r| r.json()["n"].as_i64().unwrap())
        .collect();
    assert_eq!(order, vec![10, 11, 12, 13, 14]);
    for id in &queued {
        assert_eq!(c.wait_status(id, "delivered", T).await["attempt_count"], 1);
    }

    // Rotate with a short grace: both secrets sign, then only the new one.
    let (s, r) = req(
        &c,
        M::POST,
        "/v1/endpoints/acme/secret/rotate",
        Some(json!({"grace": "5s"})),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let new_secret = r["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, secret);
    // When the old secret stops signing, on this clock (courier's is the same).
    let expires_ms = courier::model::parse_time(r["previous_secrets_expire_at"].as_str().unwrap())
        .expect("an RFC 3339 expiry");
    let unix_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let expires = Instant::now() + Duration::from_millis(expires_ms.saturating_sub(unix_ms()));
    let (_, shown) = req(&c, M::GET, "/v1/endpoints/acme", None).await;
    assert_eq!(shown["secrets"].as_array().unwrap().len(), 2);
    send_to(&c, "acme", 20).await;
    let during = rx2.wait_for(7, T).await[6].clone();
    // Signed before it arrived: within the grace if it arrived within it.
    assert!(
        during.at < expires,
        "the delivery sent during the 5 s grace arrived only after it"
    );
    assert_eq!(sig_count(&during), 2);
    sign::verify_mr(&secret, &during.body, during.header("mr-signature")).unwrap();
    sign::verify_mr(&new_secret, &during.body, during.header("mr-signature")).unwrap();
    // Sent once the grace is over.
    while unix_ms() <= expires_ms {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send_to(&c, "acme", 21).await;
    let after = rx2.wait_for(8, T).await[7].clone();
    assert_eq!(
        sig_count(&after),
        1,
        "the old secret stopped signing after the grace period"
    );
    sign::verify_mr(&new_secret, &after.body, after.header("mr-signature")).unwrap();
    assert!(sign::verify_mr(&secret, &after.body, after.header("mr-signature")).is_err());

    // Test send: a signed courier.test event through the normal path, with its result.
    let (s, t) = req(&c, M::POST, "/v1/endpoints/acme/test", None).await;
    assert_eq!(s, 200, "{t}");
    assert_eq!(t["success"], true);
    assert_eq!(t["attempt"]["status_code"], 200);
    let test_req = rx2.wait_for(9, T).await[8].clone();
    assert_eq!(test_req.json()["type"], "courier.test");
    sign::verify_mr(&new_secret, &test_req.body, test_req.header("mr-signature")).unwrap();

    // Per-endpoint view.
    let (_, st) = req(&c, M::GET, "/v1/endpoints/acme/stats", None).await;
    assert_eq!(st["circuit"], "closed");
    assert_eq!(st["queue_depth"], 0);
    assert!(st["attempts"].as_u64().unwrap() >= 9, "{st}");
    assert_eq!(st["success_rate"], 1.0);
    assert!(st["latency_ms"]["p50"].is_u64() && st["last_attempt_at"].is_string());

    // Delete with deliveries queued, keeping them: they are kept as endpoint_missing and
    // resume when it comes back.
    let (s, p) = req(&c, M::POST, "/v1/endpoints/acme/pause", None).await;
    assert_eq!((s, p["paused"].as_bool()), (200, Some(true)), "{p}");
    let waiting = send_to(&c, "acme", 30).await;
    let (s, r) = req(&c, M::DELETE, "/v1/endpoints/acme?pending=keep", None).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["pending_dropped"], 0);
    let (s, _) = req(&c, M::GET, "/v1/endpoints/acme", None).await;
    assert_eq!(s, 404);
    let d = c
        .wait_delivery(&waiting, T, |d| d["endpoint_missing"] == true)
        .await;
    assert_eq!(d["status"], "pending");
    let (s, _) = c
        .post_json(
            "/v1/events",
            &json!({"event_type": "t", "payload": {}, "endpoint": "acme"}),
        )
        .await;
    assert_eq!(s, 422);
    let (s, _) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "acme", "url": rx1.url("/back"), "secrets": [SECRET]})),
    )
    .await;
    assert_eq!(s, 201);
    c.wait_status(&waiting, "delivered", T).await;
    assert_eq!(rx1.wait_for(2, T).await[1].path, "/back");
    c.stop().await;
}

#[tokio::test]
async fn deleting_an_endpoint_drops_what_was_queued_for_it() {
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    use reqwest::Method as M;
    let create = || {
        req(
            &c,
            M::POST,
            "/v1/endpoints",
            Some(json!({"name": "gone", "url": rx.url("/"), "secrets": [SECRET]})),
        )
    };
    assert_eq!(create().await.0, 201);
    let (s, p) = req(&c, M::POST, "/v1/endpoints/gone/pause", None).await;
    assert_eq!((s, p["paused"].as_bool()), (200, Some(true)), "{p}");
    let mut queued = Vec::new();
    for n in 0..5 {
        queued.push(send_to(&c, "gone", n).await);
    }
    let (s, e) = req(&c, M::DELETE, "/v1/endpoints/gone?pending=later", None).await;
    assert_eq!(s, 400, "{e}");
    let (s, r) = req(&c, M::DELETE, "/v1/endpoints/gone", None).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["pending_dropped"], 5);
    for id in &queued {
        let (_, d) = c.get(&format!("/v1/deliveries/{id}")).await;
        assert_eq!(d["status"], "dropped", "{d}");
        assert!(d["last_error"].as_str().unwrap().contains("deleted"), "{d}");
    }
    let (_, st) = c.get("/v1/stats").await;
    assert_eq!(st["counts"]["pending"], 0, "{st}");
    // An endpoint made later under the same name gets only what is sent to it.
    assert_eq!(create().await.0, 201);
    send_to(&c, "gone", 99).await;
    let got = rx.wait_for(1, T).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 1);
    assert_eq!(got[0].json()["n"], 99);
    c.stop().await;
}

#[tokio::test]
async fn config_endpoints_are_read_only_and_win_clashes() {
    let rx = Receiver::start().await;
    let c =
        Courier::with_endpoint("from-config", &rx.url("/"), "rate_limit = \"600/minute\"").await;
    use reqwest::Method as M;
    // The view shows a config endpoint's settings as they apply.
    let (_, shown) = req(&c, M::GET, "/v1/endpoints/from-config", None).await;
    assert_eq!(shown["rate_limit"], "600/m", "{shown}");
    for (m, path) in [
        (M::PATCH, "/v1/endpoints/from-config"),
        (M::DELETE, "/v1/endpoints/from-config"),
        (M::POST, "/v1/endpoints/from-config/secret/rotate"),
    ] {
        let (s, e) = req(&c, m.clone(), path, Some(json!({"url": rx.url("/x")}))).await;
        assert_eq!(s, 409, "{m} {path}: {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("config file"),
            "{e}"
        );
    }
    let (s, e) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "from-config", "url": rx.url("/")})),
    )
    .await;
    assert_eq!((s, e["error"]["field"].as_str()), (409, Some("name")));
    // A test send works for config endpoints too.
    let (s, t) = req(&c, M::POST, "/v1/endpoints/from-config/test", None).await;
    assert_eq!((s, t["success"].as_bool()), (200, Some(true)), "{t}");

    // Listing: both sources, tenant filter, pages.
    for (name, tenant) in [("a1", "acme"), ("a2", "acme"), ("b1", "beta")] {
        let (s, _) = req(
            &c,
            M::POST,
            "/v1/endpoints",
            Some(json!({"name": name, "url": rx.url("/"), "tenant": tenant})),
        )
        .await;
        assert_eq!(s, 201);
    }
    let (_, all) = req(&c, M::GET, "/v1/endpoints", None).await;
    let names: Vec<&str> = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a1", "a2", "b1", "from-config"]);
    assert_eq!(all["data"][3]["source"], "config");
    let (_, acme) = req(&c, M::GET, "/v1/endpoints?tenant=acme", None).await;
    assert_eq!(acme["data"].as_array().unwrap().len(), 2);
    let (_, page) = req(&c, M::GET, "/v1/endpoints?limit=2", None).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    let (_, page2) = req(
        &c,
        M::GET,
        &format!(
            "/v1/endpoints?limit=2&cursor={}",
            page["next_cursor"].as_str().unwrap()
        ),
        None,
    )
    .await;
    let names: Vec<&str> = page2["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b1", "from-config"]);
    c.stop().await;
}

#[tokio::test]
async fn an_api_endpoint_shadowed_by_the_config_file_is_listed_and_can_be_deleted() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start_file(DELIVERY_FAST).await;
    let (s, e) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "clash", "url": rx.url("/api")})),
    )
    .await;
    assert_eq!(s, 201, "{e}");
    // The config file gains an endpoint of the same name: it wins.
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("clash", &rx.url("/config"), "")
    ));
    c.wait_config(|st| st["version"] == 2).await;
    let rows = |v: &Value| -> Vec<(String, String, bool)> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_string(),
                    e["source"].as_str().unwrap().to_string(),
                    e["shadowed"].as_bool().unwrap_or(false),
                )
            })
            .collect()
    };
    let (_, all) = req(&c, M::GET, "/v1/endpoints", None).await;
    assert_eq!(
        rows(&all),
        [
            ("clash".into(), "config".into(), false),
            ("clash".into(), "api".into(), true)
        ]
    );
    send_to(&c, "clash", 1).await;
    assert_eq!(rx.wait_for(1, T).await[0].path, "/config");
    // Deleting removes the inert API record; the config endpoint stays and keeps delivering.
    let (s, e) = req(&c, M::DELETE, "/v1/endpoints/clash", None).await;
    assert_eq!(s, 200, "{e}");
    assert_eq!(
        e["pending_dropped"], 0,
        "the config endpoint still serves them"
    );
    let (_, all) = req(&c, M::GET, "/v1/endpoints", None).await;
    assert_eq!(rows(&all), [("clash".into(), "config".into(), false)]);
    send_to(&c, "clash", 2).await;
    assert_eq!(rx.wait_for(2, T).await[1].path, "/config");
    // Now the name is the config endpoint's alone: read-only again.
    let (s, e) = req(&c, M::DELETE, "/v1/endpoints/clash", None).await;
    assert_eq!(s, 409, "{e}");
    // The deletion is durable: after the config endpoint goes, nothing of the API one is left.
    c.rewrite_config(DELIVERY_FAST);
    c.wait_config(|st| st["version"] == 3).await;
    let (s, _) = req(&c, M::GET, "/v1/endpoints/clash", None).await;
    assert_eq!(s, 404);
    c.stop().await;
}

#[tokio::test]
async fn invalid_endpoints_are_refused_with_the_field_named_and_nothing_written() {
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    use reqwest::Method as M;
    let url = rx.url("/");
    let cases = [
        (json!({"name": "x", "url": "ftp://nowhere"}), 422, "url"),
        (
            json!({"name": "x", "url": url, "event_types": ["has space"]}),
            422,
            "event_types",
        ),
        (
            json!({"name": "x", "url": url, "transforms": ["no-such-plugin"]}),
            422,
            "transforms",
        ),
        (
            json!({"name": "x", "url": url, "rate_limit": "lots"}),
            422,
            "rate_limit",
        ),
        (
            json!({"name": "x", "url": url, "headers": {"X-Team": "a", "x-team": "b"}}),
            422,
            "headers",
        ),
        (
            json!({"name": "x", "url": url, "secrets": ["not-a-secret"]}),
            422,
            "secrets",
        ),
        (json!({"name": "bad name!", "url": url}), 422, "name"),
        // Made, it could never be addressed: clients read them as directories in a path.
        (json!({"name": "..", "url": url}), 422, "name"),
        (json!({"name": ".", "url": url}), 422, "name"),
        (
            json!({"name": "x", "url": url, "timeout": "300000000000y"}),
            422,
            "timeout",
        ),
        (
            json!({"name": "x", "url": url, "schedule": ["0s", "584000000000y"]}),
            422,
            "schedule",
        ),
        (
            json!({"name": "x", "url": url, "colour": "blue"}),
            400,
            "colour",
        ),
        (
            json!({"name": "x", "url": url, "max_in_flight": "many"}),
            400,
            "max_in_flight",
        ),
        (json!({"url": url}), 400, "name"),
    ];
    for (body, status, field) in cases {
        let (s, e) = req(&c, M::POST, "/v1/endpoints", Some(body.clone())).await;
        assert_eq!(s, status, "{body}: {e}");
        assert_eq!(e["error"]["field"], field, "{body}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(field),
            "{e}"
        );
    }
    let (s, _) = c
        .post("/v1/endpoints", Some(ADMIN), "{nope".to_string())
        .await;
    assert_eq!(s, 400);
    let (s, _) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "ok", "url": url})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, e) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "ok", "url": url})),
    )
    .await;
    assert_eq!((s, e["error"]["field"].as_str()), (409, Some("name")));
    let (s, e) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/ok",
        Some(json!({"url": "not a url"})),
    )
    .await;
    assert_eq!((s, e["error"]["field"].as_str()), (422, Some("url")));
    let (_, ep) = req(&c, M::GET, "/v1/endpoints/ok", None).await;
    assert_eq!(ep["url"], url, "a refused patch changed nothing");
    let (_, all) = req(&c, M::GET, "/v1/endpoints", None).await;
    assert_eq!(
        all["data"].as_array().unwrap().len(),
        1,
        "nothing half-written"
    );
    let (s, _) = req(&c, M::GET, "/v1/endpoints", None).await;
    assert_eq!(s, 200);
    let (s, _) = c.get_as("/v1/endpoints", Some(INGEST_ONLY)).await;
    assert_eq!(s, 403);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_endpoints_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    let cfg = write_config(dir.path(), DELIVERY_FAST);
    let http = reqwest::Client::new();
    let mut p = Process::spawn(&cfg);
    let r = http
        .post(format!("{}/v1/endpoints", p.base))
        .bearer_auth(ADMIN)
        .body(json!({"name": "kept", "url": rx.url("/"), "secrets": [SECRET], "event_types": ["order.*"]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    p.kill9();
    let p2 = Process::spawn(&cfg);
    let (s, ep) = get_json(&http, &format!("{}/v1/endpoints/kept", p2.base)).await;
    assert_eq!((s, ep["source"].as_str()), (200, Some("api")));
    // Its subscription works after the restart (fan-out without naming it).
    let r = http
        .post(format!("{}/v1/events", p2.base))
        .bearer_auth(ADMIN)
        .body(json!({"event_type": "order.created", "payload": {"k": 1}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let got = rx.wait_for(1, T).await;
    sign::verify_mr(SECRET, &got[0].body, got[0].header("mr-signature")).unwrap();
    drop(p2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_endpoints_with_traffic_spread_across_them() {
    const N: usize = 10_000;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    let started = Instant::now();
    // Create them through the API, 32 requests at a time.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..32 {
        let (http, base, url, next) = (c.http.clone(), c.base.clone(), rx.url(""), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= N {
                    return;
                }
                let body = json!({
                    "name": format!("ep-{i:05}"),
                    "url": format!("{url}/ep/{i}"),
                    "secrets": [SECRET],
                    "event_types": [format!("tenant{}.*", i % 100)],
                    "tenant": format!("t{}", i % 100),
                });
                let r = http
                    .post(format!("{base}/v1/endpoints"))
                    .bearer_auth(ADMIN)
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let created = started.elapsed();
    let (_, page) = c.get("/v1/endpoints?tenant=t7&limit=1000").await;
    assert_eq!(page["data"].as_array().unwrap().len(), N / 100);

    // Traffic: 1,000 events to named endpoints spread over all of them, and fan-out events
    // that reach the 100 endpoints of one tenant each.
    let mut expected = std::collections::HashSet::new();
    for k in 0..1000usize {
        let i = (k * 7919) % N;
        c.send(
            json!({"event_type": "direct", "payload": {"k": k}, "endpoint": format!("ep-{i:05}")}),
        )
        .await;
        expected.insert(format!("/ep/{i}"));
    }
    for t in [3usize, 42] {
        let r = c
            .send(json!({"event_type": format!("tenant{t}.created"), "payload": {"t": t}}))
            .await;
        assert_eq!(r["deliveries"].as_array().unwrap().len(), N / 100);
        for i in (t..N).step_by(100) {
            expected.insert(format!("/ep/{i}"));
        }
    }
    let got = rx
        .wait_for(1000 + 2 * N / 100, Duration::from_secs(60))
        .await;
    let paths: std::collections::HashSet<String> = got.iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, expected);
    // Idle endpoints hold no worker once their deliveries are done.
    let deadline = Instant::now() + T;
    while c.app().scheduler.workers() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} workers still running",
            c.app().scheduler.workers()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "created {N} endpoints in {created:?}; delivered {} requests",
        got.len()
    );
    c.stop().await;
}

/// The fingerprint the endpoint view shows for a secret.
fn fingerprint(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(secret.as_bytes())[..6])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_to_one_endpoint_all_take_effect() {
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    use reqwest::Method as M;
    let (s, _) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "e", "url": rx.url("/")})),
    )
    .await;
    assert_eq!(s, 201);
    for round in 0..15 {
        let paused = round % 2 == 0;
        let action = format!(
            "/v1/endpoints/e/{}",
            if paused { "pause" } else { "resume" }
        );
        let ((s1, _), (s2, r), (s3, _)) = tokio::join!(
            req(&c, M::POST, &action, None),
            req(
                &c,
                M::POST,
                "/v1/endpoints/e/secret/rotate",
                Some(json!({"grace": "0s"}))
            ),
            req(
                &c,
                M::PATCH,
                "/v1/endpoints/e",
                Some(json!({"description": format!("round {round}")}))
            ),
        );
        assert_eq!((s1, s2, s3), (200, 200, 200), "{r}");
        let secret = r["secret"].as_str().unwrap();
        let (_, shown) = req(&c, M::GET, "/v1/endpoints/e", None).await;
        assert_eq!(shown["paused"], paused, "round {round}: {shown}");
        assert_eq!(shown["description"], format!("round {round}"), "{shown}");
        let fingerprints: Vec<&str> = shown["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["fingerprint"].as_str().unwrap())
            .collect();
        assert_eq!(
            fingerprints,
            [fingerprint(secret).as_str()],
            "round {round}: the rotated secret is the only one"
        );
    }
    c.stop().await;
}

#[tokio::test]
async fn rotating_with_no_grace_retires_every_earlier_secret_at_once() {
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    use reqwest::Method as M;
    let (_, ep) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "e", "url": rx.url("/")})),
    )
    .await;
    let first = ep["secret"].as_str().unwrap().to_string();
    // A normal rotation (the first secret overlaps for a day), then the leak response.
    let (_, r) = req(&c, M::POST, "/v1/endpoints/e/secret/rotate", None).await;
    let second = r["secret"].as_str().unwrap().to_string();
    let (_, r) = req(
        &c,
        M::POST,
        "/v1/endpoints/e/secret/rotate",
        Some(json!({"grace": "0s"})),
    )
    .await;
    let third = r["secret"].as_str().unwrap().to_string();
    assert!(r["previous_secrets_expire_at"].is_null(), "{r}");
    let (_, shown) = req(&c, M::GET, "/v1/endpoints/e", None).await;
    assert_eq!(shown["secrets"].as_array().unwrap().len(), 1, "{shown}");
    let (s, t) = req(&c, M::POST, "/v1/endpoints/e/test", None).await;
    assert_eq!(s, 200, "{t}");
    let got = rx.wait_for(1, T).await[0].clone();
    assert_eq!(sig_count(&got), 1);
    sign::verify_mr(&third, &got.body, got.header("mr-signature")).unwrap();
    for old in [&first, &second] {
        assert!(sign::verify_mr(old, &got.body, got.header("mr-signature")).is_err());
    }
    c.stop().await;
}

#[tokio::test]
async fn an_endpoint_made_again_under_a_deleted_name_starts_with_a_closed_circuit() {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{}circuit_failures = 2\ncircuit_probe_interval = \"60s\"\n",
        DELIVERY_FAST
    ))
    .await;
    use reqwest::Method as M;
    let create = |url: String| create_shared(&c, url);
    // Nothing listens there: every attempt fails and the circuit opens.
    let down = format!("http://127.0.0.1:{}/", free_port());
    assert_eq!(create(down).await.0, 201);
    send_to(&c, "shared", 1).await;
    let deadline = std::time::Instant::now() + T;
    loop {
        let (_, st) = req(&c, M::GET, "/v1/endpoints/shared/stats", None).await;
        if st["circuit"] == "open" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never opened: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, r) = req(&c, M::DELETE, "/v1/endpoints/shared", None).await;
    assert_eq!(s, 200, "{r}");
    // Its gauges go with it (an open circuit must not read 1 for good).
    let metrics = c.text("/metrics").await;
    assert!(
        !metrics.contains("courier_endpoint_circuit_open{endpoint=\"shared\"}")
            && !metrics.contains("courier_queue_depth{endpoint=\"shared\"}"),
        "{metrics}"
    );
    // Made again, elsewhere: none of the old endpoint's failures hold it back.
    assert_eq!(create(rx.url("/")).await.0, 201);
    let (_, st) = req(&c, M::GET, "/v1/endpoints/shared/stats", None).await;
    assert_eq!(st["circuit"], "closed", "{st}");
    assert!(
        c.text("/metrics")
            .await
            .contains("courier_endpoint_circuit_open{endpoint=\"shared\"} 0")
    );
    for n in 0..3 {
        send_to(&c, "shared", 10 + n).await;
    }
    rx.wait_for(3, T).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_flight_when_an_endpoint_is_deleted_never_reach_one_made_again_under_its_name() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    let rx = Receiver::start().await;
    let c = Arc::new(Courier::start(DELIVERY_FAST).await);
    use reqwest::Method as M;
    // The generation of `x` an event may have been ingested for: set once its create has
    // returned, cleared (-1) only once its delete has returned.
    let live = Arc::new(AtomicI64::new(-1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut producers = Vec::new();
    for p in 0..6i64 {
        let (c, live, stop) = (c.clone(), live.clone(), stop.clone());
        producers.push(tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(Ordering::SeqCst) {
                let seen = live.load(Ordering::SeqCst);
                let body = json!({"event_type": "t", "endpoint": "x",
                    "payload": {"seen": seen, "p": p, "n": n}});
                let (s, _) = c.post_json("/v1/events", &body).await;
                assert!(s == 202 || s == 422, "{s}");
                n += 1;
            }
        }));
    }
    for generation in 0..8i64 {
        let (s, e) = req(
            &c,
            M::POST,
            "/v1/endpoints",
            Some(json!({"name": "x", "url": rx.url(&format!("/g{generation}")), "secrets": [SECRET]})),
        )
        .await;
        assert_eq!(s, 201, "{e}");
        live.store(generation, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (s, e) = req(&c, M::DELETE, "/v1/endpoints/x", None).await;
        assert_eq!(s, 200, "{e}");
        live.store(-1, Ordering::SeqCst);
        // A request that started before the delete returned has long been handled by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for p in producers {
        p.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = rx.received();
    let mut checked = 0;
    for r in &got {
        let seen = r.json()["seen"].as_i64().unwrap();
        // Sent while generation `seen` was live: it may reach that one only.
        if seen >= 0 {
            assert_eq!(r.path, format!("/g{seen}"), "{}", r.json());
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "no event sent while a generation was live arrived"
    );
}

#[tokio::test]
async fn what_a_deleted_endpoint_left_is_not_replayed_to_one_made_again_under_its_name() {
    use reqwest::Method as M;
    let (old_rx, new_rx) = (Receiver::start().await, Receiver::start().await);
    old_rx.set_default(Reply::status(500));
    new_rx.set_default(Reply::status(500));
    let c = Courier::start(DELIVERY_FAST).await;
    let make = |url: String| {
        let c = &c;
        async move {
            let (s, e) = req(
                c,
                M::POST,
                "/v1/endpoints",
                Some(json!({"name": "app", "url": url, "schedule": ["0s"]})),
            )
            .await;
            assert_eq!(s, 201, "{e}");
        }
    };
    make(old_rx.url("/old")).await;
    let old_dead = send_to(&c, "app", 1).await;
    c.wait_status(&old_dead, "dead", T).await;
    let (s, _) = req(&c, M::DELETE, "/v1/endpoints/app", None).await;
    assert_eq!(s, 200);
    // Replayed now, it would wait for whoever takes the name next.
    replay_refused(&c, &old_dead).await;
    let (s, r) = req(&c, M::POST, "/v1/dlq/replay", None).await;
    assert_eq!(
        (s, &r["requeued"], &r["skipped_deleted_endpoint"]),
        (202, &json!(0), &json!(1)),
        "{r}"
    );
    // Someone else's endpoint, under the same name.
    make(new_rx.url("/new")).await;
    let e = replay_refused(&c, &old_dead).await;
    assert!(
        e["error"]["message"].as_str().unwrap().contains("deleted"),
        "{e}"
    );
    // The new endpoint's own dead letters replay; the old one's are skipped and counted.
    let new_dead = send_to(&c, "app", 2).await;
    c.wait_status(&new_dead, "dead", T).await;
    new_rx.set_default(Reply::status(200));
    let (s, r) = req(&c, M::POST, "/v1/dlq/replay", None).await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(r["requeued"], 1, "{r}");
    assert_eq!(r["skipped_deleted_endpoint"], 1, "{r}");
    assert_eq!(r["deliveries"], json!([new_dead]));
    c.wait_status(&new_dead, "delivered", T).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = new_rx.received();
    assert!(
        got.iter().all(|r| r.json()["n"] == 2),
        "only the new endpoint's own event: {:?}",
        got.iter().map(|r| r.json()).collect::<Vec<_>>()
    );
    assert_eq!(
        c.get(&format!("/v1/deliveries/{old_dead}")).await.1["status"],
        "dead"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_a_deleted_endpoint_had_in_flight_do_not_count_against_one_made_again() {
    let (old_rx, new_rx) = (Receiver::start().await, Receiver::start().await);
    old_rx.set_default(Reply::status(500).delay(Duration::from_millis(1000)));
    let c = Courier::start(&format!(
        "{}circuit_failures = 3\ncircuit_probe_interval = \"60s\"\n",
        DELIVERY_FAST
    ))
    .await;
    use reqwest::Method as M;
    let create = |url: String| create_shared(&c, url);
    assert_eq!(create(old_rx.url("/")).await.0, 201);
    let mut old = Vec::new();
    for n in 0..4 {
        old.push(send_to(&c, "shared", n).await);
    }
    old_rx.wait_for(4, T).await; // all four in flight, each to fail in a second
    let (s, r) = req(&c, M::DELETE, "/v1/endpoints/shared", None).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(create(new_rx.url("/")).await.0, 201);
    // The old attempts finish now, failing, after the new endpoint was made.
    for id in &old {
        c.wait_delivery(id, T, |d| d["attempt_count"] == 1).await;
    }
    // Dropped by the delete, they stay the old endpoint's though their attempts ended
    // later: a replay cannot send them to the new one.
    for id in &old {
        let (s, r) = req(&c, M::POST, &format!("/v1/deliveries/{id}/replay"), None).await;
        assert_eq!(s, 409, "{r}");
        // Their attempts decided nothing, and say so.
        let (_, d) = req(&c, M::GET, &format!("/v1/deliveries/{id}"), None).await;
        assert_eq!(d["status"], "dropped", "{d:#}");
        assert_eq!(d["attempts"][0]["outcome"], "superseded", "{d:#}");
    }
    let m = c
        .metrics_with("courier_attempts_total{endpoint=\"shared\",outcome=\"superseded\"} 4")
        .await;
    assert!(
        !m.contains("courier_attempts_total{endpoint=\"shared\",outcome=\"retry\"}"),
        "{m}"
    );
    let (_, st) = req(&c, M::GET, "/v1/endpoints/shared/stats", None).await;
    assert_eq!(st["circuit"], "closed", "{st}");
    let started = std::time::Instant::now();
    send_to(&c, "shared", 10).await;
    // An open circuit would hold it for its 60 s probe interval.
    let got = new_rx.wait_for(1, Duration::from_secs(40)).await;
    assert_eq!(got[0].json()["n"], 10);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "not held by an open circuit"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_interrupted_before_its_drop_finishes_it_at_the_next_start() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let mut c = Courier::start_file(DELIVERY_FAST).await;
    assert_eq!(create_shared(&c, rx.url("/")).await.0, 201);
    let (s, p) = req(&c, M::POST, "/v1/endpoints/shared/pause", None).await;
    assert_eq!((s, p["paused"].as_bool()), (200, Some(true)), "{p}");
    let mut left = Vec::new();
    for n in 0..3 {
        left.push(send_to(&c, "shared", n).await);
    }
    // The delete is committed, with its promise to drop what is queued; courier stops
    // before the drop.
    assert!(delete_without_drop(&c).await);
    c.running.take().unwrap().shutdown().await;
    let config = courier::config::Config::load(&c.dir.path().join("courier.toml")).unwrap();
    let running = courier::server::start(config).await.unwrap();
    c.base = format!("http://{}", running.addr);
    c.running = Some(running);
    for id in &left {
        let d = c.wait_status(id, "dropped", T).await;
        assert!(d["last_error"].as_str().unwrap().contains("deleted"), "{d}");
    }
    // Someone else's endpoint under the name gets none of it.
    assert_eq!(create_shared(&c, rx.url("/")).await.0, 201);
    send_to(&c, "shared", 9).await;
    let got = rx.wait_for(1, T).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 1);
    assert_eq!(got[0].json()["n"], 9);
    // A delete whose drop failed (courier still running): making the name again finishes
    // the drop first.
    let (s, p) = req(&c, M::POST, "/v1/endpoints/shared/pause", None).await;
    assert_eq!((s, p["paused"].as_bool()), (200, Some(true)), "{p}");
    let stranded = send_to(&c, "shared", 10).await;
    delete_without_drop(&c).await;
    c.app().endpoints.remove_api("shared");
    assert_eq!(create_shared(&c, rx.url("/")).await.0, 201);
    assert_eq!(
        c.get(&format!("/v1/deliveries/{stranded}")).await.1["status"],
        "dropped"
    );
    send_to(&c, "shared", 11).await;
    let got = rx.wait_for(2, T).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 2);
    assert_eq!(got[1].json()["n"], 11);
    // Since the restart: 3 dropped at the start, 1 when the name was made again.
    let metrics = c.text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "courier_deliveries_final_total{endpoint=\"shared\",state=\"dropped\"} 4"),
        "{metrics}"
    );
    c.stop().await;
}

#[tokio::test]
async fn an_endpoint_url_password_is_not_shown() {
    use reqwest::Method as M;
    let c = Courier::start(DELIVERY_FAST).await;
    let (s, e) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "basic", "url": "https://user:hunter2@example.com/h"})),
    )
    .await;
    assert_eq!(s, 201, "{e}");
    assert_eq!(e["url"], "https://user:redacted@example.com/h");
    let (_, list) = req(&c, M::GET, "/v1/endpoints", None).await;
    assert!(!list.to_string().contains("hunter2"), "{list}");
    // Sent back as shown (an edit form that changed the path only), the password stays.
    let (s, p) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/basic",
        Some(json!({"url": "https://user:redacted@example.com/h2"})),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    let stored = c.app().endpoints.get("basic").unwrap();
    assert_eq!(stored.url.as_str(), "https://user:hunter2@example.com/h2");
    // Not to another host, nor another port or scheme: the password would go where its
    // owner never sent it.
    for elsewhere in [
        "https://user:redacted@attacker.example/h",
        "https://user:redacted@example.com:8443/h",
        "http://user:redacted@example.com/h",
    ] {
        let (s, e) = req(
            &c,
            M::PATCH,
            "/v1/endpoints/basic",
            Some(json!({"url": elsewhere})),
        )
        .await;
        assert_eq!(
            (s, &e["error"]["field"]),
            (400, &json!("url")),
            "{elsewhere}: {e}"
        );
    }
    let stored = c.app().endpoints.get("basic").unwrap();
    assert_eq!(stored.url.as_str(), "https://user:hunter2@example.com/h2");
    c.stop().await;
}

#[tokio::test]
async fn a_patch_cannot_leave_an_api_endpoint_without_a_signing_secret() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    let (s, made) = create_shared(&c, rx.url("/h")).await;
    assert_eq!(s, 201, "{made}");
    for removal in [json!({"secrets": null}), json!({"secrets": []})] {
        let (s, e) = req(&c, M::PATCH, "/v1/endpoints/shared", Some(removal.clone())).await;
        assert_eq!(s, 400, "{removal}: {e}");
        assert_eq!(e["error"]["field"], "secrets", "{e}");
    }
    let (_, now) = req(&c, M::GET, "/v1/endpoints/shared", None).await;
    assert_eq!(now["secrets"], made["secrets"], "the secret is kept");
    // What it sends is still signed with it.
    send_to(&c, "shared", 1).await;
    let got = rx.wait_for(1, T).await;
    sign::verify_mr(SECRET, &got[0].body, got[0].header("mr-signature")).unwrap();
    c.stop().await;
}

#[tokio::test]
async fn credential_headers_are_shown_redacted_and_kept_when_sent_back() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    let (s, made) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({
            "name": "partner", "url": rx.url("/h"), "secrets": [SECRET],
            "headers": {"Authorization": "Bearer partner-secret-1", "x-api-key": "k-123", "x-tenant": "acme"},
        })),
    )
    .await;
    assert_eq!(s, 201, "{made}");
    let shown = json!({"authorization": "redacted", "x-api-key": "redacted", "x-tenant": "acme"});
    assert_eq!(made["headers"], shown);
    let (_, got) = req(&c, M::GET, "/v1/endpoints/partner", None).await;
    assert_eq!(got["headers"], shown);
    let (_, list) = req(&c, M::GET, "/v1/endpoints", None).await;
    assert!(!list.to_string().contains("partner-secret-1"), "{list}");
    // An edit that sends the headers back as shown, with one changed: the credentials stay.
    let mut edited = shown.clone();
    edited["x-tenant"] = json!("acme-eu");
    let (s, p) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/partner",
        Some(json!({"headers": edited})),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    send_to(&c, "partner", 1).await;
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].header("authorization"), "Bearer partner-secret-1");
    assert_eq!(got[0].header("x-api-key"), "k-123");
    assert_eq!(got[0].header("x-tenant"), "acme-eu");
    // `redacted` for a credential the endpoint does not have is refused, not stored.
    let mut unknown = edited.clone();
    unknown["x-session"] = json!("redacted");
    let (s, e) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/partner",
        Some(json!({"headers": unknown})),
    )
    .await;
    assert_eq!((s, &e["error"]["field"]), (400, &json!("headers")), "{e}");
    // Pointed at another server, the kept credentials must be given again (or removed).
    let elsewhere = rx.url("/h").replace("127.0.0.1", "localhost");
    for body in [
        json!({"url": elsewhere}),
        json!({"url": elsewhere, "headers": edited}),
    ] {
        let (s, e) = req(&c, M::PATCH, "/v1/endpoints/partner", Some(body.clone())).await;
        assert_eq!(
            (s, &e["error"]["field"]),
            (400, &json!("headers")),
            "{body}: {e}"
        );
    }
    // A credential left out is kept, so it too must be given again or removed (`null`).
    let given = json!({"authorization": "Bearer for-the-new-host", "x-tenant": "acme-eu"});
    let (s, e) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/partner",
        Some(json!({"url": elsewhere, "headers": given})),
    )
    .await;
    assert_eq!((s, &e["error"]["field"]), (400, &json!("headers")), "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-api-key"),
        "{e}"
    );
    let mut given = given;
    given["x-api-key"] = Value::Null;
    let (s, p) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/partner",
        Some(json!({"url": elsewhere, "headers": given})),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    let stored = c.app().endpoints.get("partner").unwrap();
    assert_eq!(stored.headers["authorization"], "Bearer for-the-new-host");
    assert!(!stored.headers.contains_key("x-api-key"));
    c.stop().await;
}

/// A PATCH's `headers` replaces the endpoint's own headers, but the credentials it leaves
/// out (shown redacted, so easily left out of an edit) keep their values; `null` removes one,
/// and `"headers": null` removes them all.
#[tokio::test]
async fn a_patch_keeps_the_credential_headers_it_leaves_out_and_null_removes_one() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    let (s, made) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({
            "name": "partner", "url": rx.url("/h"), "secrets": [SECRET],
            "headers": {"Authorization": "Bearer partner-secret-1", "x-api-key": "k-123", "x-tenant": "acme"},
        })),
    )
    .await;
    assert_eq!(s, 201, "{made}");
    let patch = |headers: Value| {
        req(
            &c,
            M::PATCH,
            "/v1/endpoints/partner",
            Some(json!({"headers": headers})),
        )
    };
    // Only a header of its own given: the credentials stay, the other header goes.
    let (s, p) = patch(json!({"x-team": "blue"})).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(
        p["headers"],
        json!({"authorization": "redacted", "x-api-key": "redacted", "x-team": "blue"})
    );
    send_to(&c, "partner", 1).await;
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].header("authorization"), "Bearer partner-secret-1");
    assert_eq!(got[0].header("x-api-key"), "k-123");
    assert_eq!(got[0].header("x-team"), "blue");
    assert_eq!(got[0].header("x-tenant"), "");
    // `null` removes one (in any case), the others stay.
    let (s, p) = patch(json!({"AUTHORIZATION": null, "x-team": "blue"})).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(
        p["headers"],
        json!({"x-api-key": "redacted", "x-team": "blue"})
    );
    send_to(&c, "partner", 2).await;
    let got = rx.wait_for(2, T).await;
    let second = got.iter().find(|r| r.json()["n"] == 2).unwrap();
    assert_eq!(second.header("authorization"), "");
    assert_eq!(second.header("x-api-key"), "k-123");
    // A credential given anew replaces the kept one; `"headers": null` removes all.
    let (s, p) = patch(json!({"X-Api-Key": "k-456"})).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(
        c.app().endpoints.get("partner").unwrap().headers["x-api-key"],
        "k-456"
    );
    let (s, p) = patch(Value::Null).await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["headers"], json!({}));
    assert!(c.app().endpoints.get("partner").unwrap().headers.is_empty());
    c.stop().await;
}

/// A value of the wrong type is named by its kind in the `400`, never shown: it may be a
/// secret or a credential header.
#[tokio::test]
async fn a_value_of_the_wrong_type_is_not_shown_in_the_error() {
    use reqwest::Method as M;
    let c = Courier::start(DELIVERY_FAST).await;
    let url = "https://example.com/h";
    for (method, path, body, field) in [
        (
            M::POST,
            "/v1/endpoints",
            json!({"name": "x", "url": url, "secrets": SECRET}),
            "secrets",
        ),
        (
            M::POST,
            "/v1/endpoints",
            json!({"name": "x", "url": url, "headers": {"Authorization": 987654321}}),
            "headers",
        ),
        (
            M::POST,
            "/v1/endpoints",
            json!({"name": "x", "url": url, "headers": "Bearer 987654321"}),
            "headers",
        ),
    ] {
        let (s, e) = req(&c, method, path, Some(body.clone())).await;
        assert_eq!(
            (s, &e["error"]["field"]),
            (400, &json!(field)),
            "{body}: {e}"
        );
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            !msg.contains("987654321") && !msg.contains(&SECRET[6..]),
            "{msg}"
        );
        assert!(msg.contains("invalid type"), "{msg}");
    }
    let (s, e) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "x", "url": url, "secrets": [SECRET]})),
    )
    .await;
    assert_eq!(s, 201, "{e}");
    let (s, e) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/x",
        Some(json!({"secrets": SECRET})),
    )
    .await;
    assert_eq!((s, &e["error"]["field"]), (400, &json!("secrets")), "{e}");
    assert!(!e.to_string().contains(&SECRET[6..]), "{e}");
    c.stop().await;
}

/// A misspelt rotation option is refused, naming it, rather than read as absent: a
/// `grace_period` of `0s` meant to stop a leaked secret would keep it signing for a day.
#[tokio::test]
async fn a_rotation_with_an_unknown_field_is_refused_and_changes_nothing() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    assert_eq!(create_shared(&c, rx.url("/")).await.0, 201);
    let (_, before) = req(&c, M::GET, "/v1/endpoints/shared", None).await;
    for body in [
        json!({"grace_period": "0s"}),
        json!({"grace": "0s", "secrets": [SECRET]}),
    ] {
        let (s, e) = req(
            &c,
            M::POST,
            "/v1/endpoints/shared/secret/rotate",
            Some(body.clone()),
        )
        .await;
        assert_eq!(s, 400, "{body}: {e}");
        let field = body
            .as_object()
            .unwrap()
            .keys()
            .find(|k| *k != "grace")
            .unwrap();
        assert_eq!(e["error"]["field"], json!(field), "{e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("unknown field `{field}`")),
            "{e}"
        );
    }
    let (_, after) = req(&c, M::GET, "/v1/endpoints/shared", None).await;
    assert_eq!(after["secrets"], before["secrets"]);
    assert_eq!(after["updated_at"], before["updated_at"]);
    // Spelt right, it rotates.
    let (s, r) = req(
        &c,
        M::POST,
        "/v1/endpoints/shared/secret/rotate",
        Some(json!({"grace": "0s"})),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    c.stop().await;
}

#[tokio::test]
async fn an_event_type_pattern_over_256_characters_is_refused() {
    use reqwest::Method as M;
    let c = Courier::start(DELIVERY_FAST).await;
    let long = format!("order.{}", "*".repeat(251));
    let (s, e) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "long", "url": "https://example.com/h", "event_types": [long]})),
    )
    .await;
    assert_eq!(
        (s, &e["error"]["field"]),
        (422, &json!("event_types")),
        "{e}"
    );
    let (s, _) = req(&c, M::GET, "/v1/endpoints/long", None).await;
    assert_eq!(s, 404);
    c.stop().await;
}

#[tokio::test]
async fn a_deleted_endpoints_counter_series_leave_the_scrape() {
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    use reqwest::Method as M;
    let series = |metrics: &str, name: &str| -> Vec<String> {
        let needle = format!("endpoint=\"{name}\"");
        metrics
            .lines()
            .filter(|l| l.contains(&needle))
            .filter(|l| {
                [
                    "created_total",
                    "attempts_total",
                    "duration_seconds",
                    "final_total",
                ]
                .iter()
                .any(|m| l.contains(m))
            })
            .map(str::to_string)
            .collect()
    };
    let create = |name: &'static str| {
        req(
            &c,
            M::POST,
            "/v1/endpoints",
            Some(json!({"name": name, "url": rx.url(&format!("/{name}"))})),
        )
    };
    for name in ["seen", "kept"] {
        let (s, r) = create(name).await;
        assert_eq!(s, 201, "{r}");
        send_to(&c, name, 1).await;
    }
    rx.wait_for(2, T).await;
    // The final state is counted once it is on disk, a moment after the receiver has it.
    let deadline = Instant::now() + T;
    let before = loop {
        let m = c.text("/metrics").await;
        if ["seen", "kept"].iter().all(|n| {
            m.contains(&format!(
                "courier_deliveries_final_total{{endpoint=\"{n}\",state=\"delivered\"}} 1"
            ))
        }) {
            break m;
        }
        assert!(Instant::now() < deadline, "never counted: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        before.contains("courier_attempts_total{endpoint=\"seen\",outcome=\"delivered\"} 1"),
        "{before}"
    );
    assert!(series(&before, "seen").len() >= 4, "{before}");
    // `fleeting` lives and goes between two scrapes; `stuck` goes with deliveries queued.
    let (s, r) = create("fleeting").await;
    assert_eq!(s, 201, "{r}");
    send_to(&c, "fleeting", 1).await;
    rx.wait_for(3, T).await;
    let (s, r) = create("stuck").await;
    assert_eq!(s, 201, "{r}");
    let (s, r) = req(&c, M::POST, "/v1/endpoints/stuck/pause", None).await;
    assert_eq!(s, 200, "{r}");
    for n in 0..3 {
        send_to(&c, "stuck", n).await;
    }
    for name in ["seen", "fleeting", "stuck"] {
        let (s, r) = req(&c, M::DELETE, &format!("/v1/endpoints/{name}"), None).await;
        assert_eq!(s, 200, "{r}");
    }
    // The first scrape after shows their final counts, the delete's drops included...
    let last = c.text("/metrics").await;
    assert!(
        last.contains("courier_deliveries_final_total{endpoint=\"stuck\",state=\"dropped\"} 3"),
        "{last}"
    );
    let shown = series(&last, "seen");
    assert!(
        series(&before, "seen").iter().all(|l| shown.contains(l)),
        "{last}"
    );
    // ...and the next has none of them.
    let after = c.text("/metrics").await;
    assert_eq!(series(&after, "seen"), Vec::<String>::new(), "{after}");
    assert_eq!(series(&after, "stuck"), Vec::<String>::new(), "{after}");
    // `fleeting`'s last attempt may be counted just after that scrape: the next drops it.
    let deadline = Instant::now() + T;
    loop {
        let m = c.text("/metrics").await;
        if series(&m, "fleeting").is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "never dropped: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The endpoint that stays keeps its counts; a gone one's delivered history stays in
    // the stored-deliveries gauge.
    assert_eq!(series(&after, "kept"), series(&before, "kept"));
    assert!(
        after.contains("courier_deliveries{endpoint=\"seen\",status=\"delivered\"} 1"),
        "{after}"
    );
    // Made again under the same name, it counts from nothing.
    let (s, r) = create("seen").await;
    assert_eq!(s, 201, "{r}");
    send_to(&c, "seen", 2).await;
    rx.wait_for(4, T).await;
    let deadline = Instant::now() + T;
    loop {
        let m = c.text("/metrics").await;
        if m.contains("courier_deliveries_final_total{endpoint=\"seen\",state=\"delivered\"} 1") {
            assert!(
                m.contains("courier_deliveries_created_total{endpoint=\"seen\"} 1"),
                "{m}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never counted: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_endpoint_paused_through_the_api_stays_paused_across_reloads_and_restarts() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let file = |timeout: &str| {
        format!(
            "{DELIVERY_FAST}{}",
            endpoint("cfg", &rx.url("/"), &format!("timeout = \"{timeout}\""))
        )
    };
    let mut c = Courier::start_file(&file("5s")).await;
    let (s, p) = req(&c, M::POST, "/v1/endpoints/cfg/pause", None).await;
    assert_eq!((s, p["paused"].as_bool()), (200, Some(true)), "{p}");
    assert_eq!(p["source"], "config", "{p}");
    let first = send_to(&c, "cfg", 1).await;
    // A reload that changes the endpoint keeps the pause.
    c.rewrite_config(&file("7s"));
    c.wait_config(|st| st["version"].as_u64() >= Some(2)).await;
    let (_, shown) = req(&c, M::GET, "/v1/endpoints/cfg", None).await;
    assert_eq!(shown["timeout_ms"], 7000, "the reload applied: {shown}");
    assert_eq!(shown["paused"], true, "{shown}");
    let second = send_to(&c, "cfg", 2).await;
    // So does a restart.
    c.running.take().unwrap().shutdown().await;
    let config = courier::config::Config::load(&c.dir.path().join("courier.toml")).unwrap();
    let running = courier::server::start(config).await.unwrap();
    c.base = format!("http://{}", running.addr);
    c.running = Some(running);
    let (_, st) = req(&c, M::GET, "/v1/endpoints/cfg/stats", None).await;
    assert_eq!(
        (st["paused"].as_bool(), st["queue_depth"].as_u64()),
        (Some(true), Some(2)),
        "{st}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.received().is_empty(), "nothing is sent while paused");
    for id in [&first, &second] {
        let (_, d) = c.get(&format!("/v1/deliveries/{id}")).await;
        assert_eq!(
            (d["status"].as_str(), d["attempt_count"].as_u64()),
            (Some("pending"), Some(0)),
            "{d}"
        );
    }
    // Resumed, both arrive (at once: the endpoint is unordered); and the resume is as
    // durable as the pause was.
    let (s, p) = req(&c, M::POST, "/v1/endpoints/cfg/resume", None).await;
    assert_eq!((s, p["paused"].as_bool()), (200, Some(false)), "{p}");
    let got = rx.wait_for(2, T).await;
    let mut ns: Vec<i64> = got
        .iter()
        .map(|r| r.json()["n"].as_i64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, [1, 2]);
    c.running.take().unwrap().shutdown().await;
    let config = courier::config::Config::load(&c.dir.path().join("courier.toml")).unwrap();
    let running = courier::server::start(config).await.unwrap();
    c.base = format!("http://{}", running.addr);
    c.running = Some(running);
    let (_, shown) = req(&c, M::GET, "/v1/endpoints/cfg", None).await;
    assert_eq!(shown["paused"], false, "{shown}");
    send_to(&c, "cfg", 3).await;
    rx.wait_for(3, T).await;
    c.stop().await;
}

/// Ingests to a paused endpoint start no delivery worker (it would only find the endpoint
/// paused, once per event), and events ingested while it is being resumed are all sent at
/// once, not left for the periodic sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_endpoint_starts_no_worker_and_misses_no_event_ingested_as_it_resumes() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    let (s, p) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "e", "url": rx.url("/")})),
    )
    .await;
    assert_eq!(s, 201, "{p}");
    let mut sent = 0;
    for round in 0..6u64 {
        let (s, _) = req(&c, M::POST, "/v1/endpoints/e/pause", None).await;
        assert_eq!(s, 200);
        let deadline = Instant::now() + T;
        while c.app().scheduler.workers() > 0 {
            assert!(Instant::now() < deadline, "the worker never retired");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for n in 0..10 {
            send_to(&c, "e", n).await;
        }
        sent += 10;
        assert_eq!(
            c.app().scheduler.workers(),
            0,
            "round {round}: ingests to a paused endpoint started its worker"
        );
        // Resume while 64 more are being ingested.
        let producers: Vec<_> = (0..64)
            .map(|n| {
                let (http, url) = (c.http.clone(), format!("{}/v1/events", c.base));
                tokio::spawn(async move {
                    let body = json!({"event_type": "t", "payload": {"n": n}, "endpoint": "e"});
                    let (s, r) = post_json(&http, &url, &body).await;
                    assert_eq!(s, 202, "{r}");
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(round)).await;
        let (s, _) = req(&c, M::POST, "/v1/endpoints/e/resume", None).await;
        assert_eq!(s, 200);
        for p in producers {
            p.await.unwrap();
        }
        sent += 64;
        // Well inside the sweep's interval: an event whose wake-up was missed would wait
        // for it (and is caught about half the time a round).
        assert!(courier::scheduler::SWEEP_INTERVAL >= Duration::from_secs(5));
        rx.wait_for(sent, Duration::from_millis(2_500)).await;
    }
    c.stop().await;
}

#[tokio::test]
async fn a_rate_limited_endpoint_made_again_under_a_deleted_name_starts_with_a_full_bucket() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    let create = || {
        req(
            &c,
            M::POST,
            "/v1/endpoints",
            Some(json!({"name": "lim", "url": rx.url("/"), "rate_limit": "1/minute"})),
        )
    };
    assert_eq!(create().await.0, 201);
    send_to(&c, "lim", 1).await;
    rx.wait_for(1, T).await;
    // Its bucket (one token) is empty now, the next token a minute away; it goes with the
    // endpoint,
    // whether its worker retires before the delete or after.
    let (s, r) = req(&c, M::DELETE, "/v1/endpoints/lim", None).await;
    assert_eq!(s, 200, "{r}");
    let deadline = Instant::now() + T;
    while c.app().scheduler.workers() > 0 {
        assert!(Instant::now() < deadline, "the worker never retired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(create().await.0, 201);
    send_to(&c, "lim", 2).await;
    // A full bucket sends it at once; the old one's would hold it for a minute.
    rx.wait_for(2, Duration::from_secs(15)).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_whose_client_hangs_up_while_it_is_made_is_made_whole_or_not_at_all() {
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    // The client sends the whole request and resets the connection a moment later, at a
    // different moment for each endpoint, so that some resets land while courier commits.
    for (n, reset_after_us) in (0..=3000u64).step_by(200).enumerate() {
        let name = format!("ep{n}");
        let body = json!({"name": name, "url": rx.url("/"), "secrets": [SECRET]}).to_string();
        let request = format!(
            "POST /v1/endpoints HTTP/1.1\r\nhost: courier\r\nauthorization: Bearer {ADMIN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        send_then_reset(&c.base, &request, Duration::from_micros(reset_after_us)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Either it was made, and is listed and used, or it was not, and can be made now.
        let path = format!("/v1/endpoints/{name}");
        let (s, e) = req(&c, reqwest::Method::GET, &path, None).await;
        if s == 404 {
            let made = req(
                &c,
                reqwest::Method::POST,
                "/v1/endpoints",
                Some(json!({"name": name, "url": rx.url("/"), "secrets": [SECRET]})),
            )
            .await;
            // Or the reset request's own commit, still under way when it was looked for,
            // made it first: then it is there whole.
            if made.0 == 409 {
                let (s, e) = req(&c, reqwest::Method::GET, &path, None).await;
                assert_eq!(s, 200, "reset after {reset_after_us} µs: {e}");
            } else {
                assert_eq!(made.0, 201, "reset after {reset_after_us} µs: {}", made.1);
            }
        } else {
            assert_eq!(s, 200, "{e}");
        }
        let id = send_to(&c, &name, n as i64).await;
        c.wait_status(&id, "delivered", T).await;
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrected_url_closes_the_circuit_the_wrong_one_opened() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{}circuit_failures = 2\ncircuit_probe_interval = \"10m\"\n",
        DELIVERY_FAST
    ))
    .await;
    // A typo'd port: every attempt fails and the circuit opens.
    let down = format!("http://127.0.0.1:{}/", free_port());
    assert_eq!(create_shared(&c, down).await.0, 201);
    let id = send_to(&c, "shared", 1).await;
    let deadline = Instant::now() + T;
    loop {
        let (_, st) = req(&c, M::GET, "/v1/endpoints/shared/stats", None).await;
        if st["circuit"] == "open" {
            break;
        }
        assert!(Instant::now() < deadline, "never opened: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Fixed: the waiting delivery goes out now, not at the next probe ten minutes on.
    let (s, p) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/shared",
        Some(json!({"url": rx.url("/")})),
    )
    .await;
    assert_eq!(s, 200, "{p}");
    c.wait_status(&id, "delivered", T).await;
    let (_, st) = req(&c, M::GET, "/v1/endpoints/shared/stats", None).await;
    assert_eq!(st["circuit"], "closed", "{st}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_rate_limit_is_no_occasion_for_a_burst() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    let (s, r) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(
            json!({"name": "paced", "url": rx.url("/"), "secrets": [SECRET], "rate_limit": "2/s"}),
        ),
    )
    .await;
    assert_eq!(s, 201, "{r}");
    for n in 0..20 {
        send_to(&c, "paced", n).await;
    }
    // The bucket's first two went at once; the rest go at 2/s, so the bucket is empty.
    rx.wait_for(4, T).await;
    let changed = Instant::now();
    let (s, r) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/paced",
        Some(json!({"rate_limit": "3/s"})),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // In the 300 ms after the change: the token left over, if any, and one more at most —
    // not a new bucket of three at once.
    let burst = rx
        .received()
        .iter()
        .filter(|r| r.at >= changed && r.at - changed < Duration::from_millis(300))
        .count();
    assert!(burst <= 2, "{burst} sent within 300 ms of the change");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_from_before_a_replay_does_not_decide_the_replayed_round() {
    use reqwest::Method as M;
    // The first receiver answers 200, but only after 3 s.
    let slow = Receiver::start().await;
    slow.set_default(Reply::status(200).delay(Duration::from_secs(3)));
    let fresh = Receiver::start().await;
    let c = Courier::start_file(DELIVERY_FAST).await;
    assert_eq!(create_shared(&c, slow.url("/")).await.0, 201);
    let id = send_to(&c, "shared", 1).await;
    slow.wait_for(1, T).await; // its attempt is in flight
    // Deleted (its queue dropped), made again in the config file elsewhere, and the dropped
    // delivery replayed there, all while that attempt waits for its answer.
    let (s, r) = req(&c, M::DELETE, "/v1/endpoints/shared", None).await;
    assert_eq!(s, 200, "{r}");
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("shared", &fresh.url("/"), "")
    ));
    c.wait_config(|st| st["version"] == 2).await;
    c.wait_status(&id, "dropped", T).await;
    let (s, r) = req(&c, M::POST, &format!("/v1/deliveries/{id}/replay"), None).await;
    assert_eq!(s, 202, "{r}");
    // The old attempt's 200 is in the audit trail, but the new round goes to the new URL.
    let got = fresh.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].json()["n"], 1);
    let d = c.wait_status(&id, "delivered", T).await;
    let attempts = d["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{d:#}");
    let outcomes: Vec<&str> = attempts
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert!(
        outcomes.contains(&"superseded") && outcomes.contains(&"delivered"),
        "{d:#}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_replay_under_way_sends_nothing_to_an_endpoint_made_again_meanwhile() {
    use futures_util::StreamExt;
    use reqwest::Method as M;
    let fresh = Receiver::start().await;
    // (No circuit to slow the failures down.)
    let c = Courier::start(&format!("{DELIVERY_FAST}circuit_failures = 1000000\n")).await;
    // Thousands of dead deliveries: one attempt each, to a port nothing listens on.
    let down = format!("http://127.0.0.1:{}/", free_port());
    let (s, r) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "shared", "url": down, "secrets": [SECRET],
                    "schedule": ["0s"], "max_in_flight": 1000})),
    )
    .await;
    assert_eq!(s, 201, "{r}");
    const N: usize = 10_000;
    let (http, base) = (c.http.clone(), c.base.clone());
    futures_util::stream::iter(0..N)
        .map(|n| {
            let (http, base) = (http.clone(), base.clone());
            async move {
                let body = json!({"event_type": "t", "payload": {"n": n}, "endpoint": "shared"});
                post_event(&http, &base, body.to_string()).await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, st) = req(&c, M::GET, "/v1/endpoints/shared/stats", None).await;
        if st["counts"]["dead"].as_u64() == Some(N as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The replay starts; while it works through its pages the endpoint is deleted and made
    // again by someone else, elsewhere.
    let replay = {
        let c2 = (c.http.clone(), c.base.clone());
        tokio::spawn(async move {
            post_json(&c2.0, &format!("{}/v1/dlq/replay", c2.1), &json!({})).await
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (s, r) = req(&c, M::DELETE, "/v1/endpoints/shared", None).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(create_shared(&c, fresh.url("/")).await.0, 201);
    let (s, r) = replay.await.unwrap();
    assert_eq!(s, 202, "{r}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts = format!(
        "requeued {}, skipped {}",
        r["requeued"], r["skipped_deleted_endpoint"]
    );
    // The delete landed before the replay's last page (10,000 dead deliveries take 20 of
    // them): otherwise this test would have checked nothing.
    assert!(
        r["skipped_deleted_endpoint"].as_u64().unwrap() > 0,
        "the replay ended before the delete: {counts}"
    );
    assert!(
        fresh.received().is_empty(),
        "{} of the old endpoint's deliveries went to the new one ({counts})",
        fresh.received().len()
    );
    let (_, pending) = c
        .get("/v1/deliveries?status=pending&endpoint=shared&limit=5")
        .await;
    assert_eq!(pending["data"], json!([]), "{counts}");
    c.stop().await;
}

/// An endpoint definition past the limits is refused naming the field, and nothing is
/// written: each secret signs every attempt, each pattern is matched on every ingest.
#[tokio::test]
async fn an_endpoint_past_the_limits_is_refused_naming_the_field() {
    use reqwest::Method as M;
    let c = Courier::start(DELIVERY_FAST).await;
    let url = "http://127.0.0.1:9/h".to_string();
    let secrets: Vec<String> = (0..11)
        .map(|_| courier::deliver::sign::generate_secret())
        .collect();
    let patterns: Vec<String> = (0..101).map(|i| format!("t.{i}")).collect();
    let headers: serde_json::Map<String, Value> =
        (0..51).map(|i| (format!("x-h{i}"), json!("v"))).collect();
    let long_url = format!("http://127.0.0.1:9/{}", "a".repeat(8 * 1024));
    for (body, field) in [
        (
            json!({"name": "big", "url": url, "secrets": secrets}),
            "secrets",
        ),
        (
            json!({"name": "big", "url": url, "event_types": patterns}),
            "event_types",
        ),
        (
            json!({"name": "big", "url": url, "headers": headers}),
            "headers",
        ),
        (json!({"name": "big", "url": long_url}), "url"),
        (
            json!({"name": "big", "url": url, "headers": {"x-big": "v".repeat(8 * 1024 + 1)}}),
            "headers",
        ),
        (
            json!({"name": "big", "url": url, "schedule": vec!["1s"; 51]}),
            "schedule",
        ),
        (
            json!({"name": "big", "url": url, "tenant": "t".repeat(257)}),
            "tenant",
        ),
        (
            json!({"name": "big", "url": url, "description": "d".repeat(1025)}),
            "description",
        ),
    ] {
        let (s, e) = req(&c, M::POST, "/v1/endpoints", Some(body)).await;
        assert_eq!(s, 422, "{field}: {e}");
        assert_eq!(e["error"]["field"], field, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains("at most"),
            "{e}"
        );
        assert_eq!(req(&c, M::GET, "/v1/endpoints/big", None).await.0, 404);
    }
    // At the limits, it is made.
    let (s, e) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({
            "name": "big", "url": url, "secrets": secrets[..10], "event_types": patterns[..100],
            "schedule": vec!["1s"; 50], "tenant": "t".repeat(256), "description": "d".repeat(1024),
        })),
    )
    .await;
    assert_eq!(s, 201, "{e}");
    // A PATCH past them changes nothing.
    for (body, field) in [
        (json!({"schedule": vec!["1s"; 51]}), "schedule"),
        (json!({"description": "d".repeat(1025)}), "description"),
    ] {
        let (s, e) = req(&c, M::PATCH, "/v1/endpoints/big", Some(body)).await;
        assert_eq!((s, &e["error"]["field"]), (422, &json!(field)), "{e}");
    }
    let (_, big) = req(&c, M::GET, "/v1/endpoints/big", None).await;
    assert_eq!(big["schedule_ms"].as_array().unwrap().len(), 50);
    assert_eq!(big["description"].as_str().unwrap().len(), 1024);
    c.stop().await;
}

/// Rotations with a grace keep the old secrets valid for a while; they cannot pile up past
/// the limit (every attempt is signed with each), while one with no grace always can.
#[tokio::test]
async fn rotations_cannot_pile_up_more_secrets_than_the_limit() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    assert_eq!(create_shared(&c, rx.url("/")).await.0, 201);
    let rotate = |grace: &'static str| {
        req(
            &c,
            M::POST,
            "/v1/endpoints/shared/secret/rotate",
            Some(json!({"grace": grace})),
        )
    };
    // One secret and nine retiring: ten valid at once.
    for _ in 0..9 {
        let (s, r) = rotate("1h").await;
        assert_eq!(s, 200, "{r}");
    }
    let (s, e) = rotate("1h").await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["error"]["code"], "too_many_secrets", "{e}");
    // Deliveries carry the ten signatures.
    send_to(&c, "shared", 1).await;
    let got = rx.wait_for(1, T).await;
    assert_eq!(sig_count(&got[0]), 10);
    // A rotation with no grace (after a leak) drops them all.
    let (s, r) = rotate("0s").await;
    assert_eq!(s, 200, "{r}");
    send_to(&c, "shared", 2).await;
    let got = rx.wait_for(2, T).await;
    let last = got.iter().find(|r| r.json()["n"] == 2).unwrap();
    assert_eq!(sig_count(last), 1);
    c.stop().await;
}

/// A finished delivery whose endpoint was deleted and whose name was taken again since shows
/// `endpoint_missing: true`, as replay sees it (refused: the new endpoint is not its
/// destination); the new endpoint's own deliveries do not.
#[tokio::test]
async fn a_finished_delivery_of_a_deleted_endpoint_stays_endpoint_missing_when_its_name_is_taken() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    let make = || {
        req(
            &c,
            M::POST,
            "/v1/endpoints",
            Some(json!({"name": "x", "url": rx.url("/"), "secrets": [SECRET]})),
        )
    };
    assert_eq!(make().await.0, 201);
    let old = send_to(&c, "x", 1).await;
    let d = c.wait_status(&old, "delivered", T).await;
    assert_eq!(d["endpoint_missing"], false, "{d}");
    assert_eq!(req(&c, M::DELETE, "/v1/endpoints/x", None).await.0, 200);
    let (_, d) = req(&c, M::GET, &format!("/v1/deliveries/{old}"), None).await;
    assert_eq!(d["endpoint_missing"], true, "{d}");
    // The name is taken again: the old delivery still has no endpoint to go to.
    assert_eq!(make().await.0, 201);
    let (_, d) = req(&c, M::GET, &format!("/v1/deliveries/{old}"), None).await;
    assert_eq!(d["endpoint_missing"], true, "{d}");
    let (_, list) = req(&c, M::GET, "/v1/deliveries?endpoint=x", None).await;
    assert_eq!(list["data"][0]["endpoint_missing"], true, "{list}");
    replay_refused(&c, &old).await;
    let new = send_to(&c, "x", 2).await;
    let d = c.wait_status(&new, "delivered", T).await;
    assert_eq!(d["endpoint_missing"], false, "{d}");
    c.stop().await;
}

/// An endpoint made or changed through the API at a private address that the running
/// configuration refuses (`allow_private_networks = false`) is accepted, since a reload may
/// allow it, but the reply says every delivery would die; a public one has no warning.
#[tokio::test]
async fn an_api_endpoint_at_a_refused_private_address_is_made_with_a_warning() {
    use reqwest::Method as M;
    let c = Courier::start("").await;
    let (s, v) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "inside", "url": "http://10.1.2.3/hook"})),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let w = v["warnings"][0].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(w.contains("ssrf_blocked") && w.contains("10.1.2.3"), "{w}");
    let (s, v) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/inside",
        Some(json!({"url": "https://example.com/hook"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v.get("warnings").is_none(), "{v}");
    let (s, v) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/inside",
        Some(json!({"url": "http://localhost:9/hook"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["warnings"][0].as_str().is_some(), "{v}");
    c.stop().await;
}

/// A body edited from what a listing shows is told what to change: the listing's own fields
/// (`timeout_ms`, read-only ones, secrets as fingerprints) are refused naming what to send
/// instead, and the endpoint is left as it was.
#[tokio::test]
async fn a_body_edited_from_a_listing_is_told_which_fields_to_set_instead() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    let (s, made) = req(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "app", "url": rx.url("/"), "timeout": "7s"})),
    )
    .await;
    assert_eq!(s, 201, "{made}");
    let (_, shown) = req(&c, M::GET, "/v1/endpoints/app", None).await;
    assert_eq!(shown["timeout_ms"], 7000);
    for (change, field, says) in [
        (json!({"timeout_ms": 5000}), "timeout_ms", "set `timeout`"),
        (
            json!({"schedule_ms": [0, 1000]}),
            "schedule_ms",
            "set `schedule`",
        ),
        (json!({"source": "api"}), "source", "read-only"),
        (json!({"paused": true}), "paused", "/pause"),
        (
            json!({"secrets": shown["secrets"].clone()}),
            "secrets",
            "fingerprints",
        ),
    ] {
        let (s, e) = req(&c, M::PATCH, "/v1/endpoints/app", Some(change.clone())).await;
        assert_eq!(
            (s, e["error"]["field"].as_str()),
            (400, Some(field)),
            "{change}: {e}"
        );
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{change}: {msg}");
    }
    // The whole listing sent back to create another is refused the same way.
    let mut copy = shown.clone();
    copy["name"] = "copy".into();
    let (s, e) = req(&c, M::POST, "/v1/endpoints", Some(copy)).await;
    assert_eq!(s, 400, "{e}");
    assert_eq!(req(&c, M::GET, "/v1/endpoints/copy", None).await.0, 404);
    let (_, after) = req(&c, M::GET, "/v1/endpoints/app", None).await;
    assert_eq!(after, shown, "a refused change changed the endpoint");
    // What the messages say to send works.
    let (s, e) = req(
        &c,
        M::PATCH,
        "/v1/endpoints/app",
        Some(json!({"timeout": "5s"})),
    )
    .await;
    assert_eq!((s, &e["timeout_ms"]), (200, &json!(5000)), "{e}");
}
