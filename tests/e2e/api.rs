//! The admin API: listing with filters and cursors, stats, metrics, health.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const T: Duration = Duration::from_secs(15);

/// Statistics count every attempt of the window, per endpoint: retries in
/// `attempts_per_delivery`, failures in `attempt_success_rate`, and a slow endpoint's
/// latency without the others' in its view.
#[tokio::test]
async fn stats_count_each_endpoints_attempts_and_its_slow_tail() {
    let fast = Receiver::start().await;
    let slow = Receiver::start().await;
    slow.set_default(Reply::status(200).delay(Duration::from_millis(1500)));
    let flaky = Receiver::start().await;
    flaky.script([Reply::status(500), Reply::status(500)]);
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}{}",
        endpoint("fast", &fast.url("/"), ""),
        endpoint("slow", &slow.url("/"), ""),
        endpoint("flaky", &flaky.url("/"), ""),
    ))
    .await;
    let mut ids = Vec::new();
    for (ep, n) in [("fast", 30), ("slow", 3), ("flaky", 2)] {
        for i in 0..n {
            let r = c
                .send(json!({"event_type": "t", "payload": {"i": i}, "endpoint": ep}))
                .await;
            ids.push(r["deliveries"][0]["id"].as_str().unwrap().to_string());
        }
    }
    for id in &ids {
        c.wait_status(id, "delivered", T).await;
    }

    let (s, all) = c.get("/v1/stats").await;
    assert_eq!(s, 200, "{all}");
    assert_eq!(all["attempts"], 30 + 3 + 4, "{all}");
    assert_eq!(all["sampled"], false);
    let rate = all["attempt_success_rate"].as_f64().unwrap();
    assert!((rate - 35.0 / 37.0).abs() < 1e-9, "{rate}");

    // The slow endpoint: every attempt took 1.5 s or more (and in milliseconds: an attempt
    // over 5 s would have timed out).
    let (_, st) = c.get("/v1/stats?endpoint=slow").await;
    assert_eq!(st["attempts"], 3, "{st}");
    for q in ["p50", "p99"] {
        let ms = st["latency_ms"][q].as_u64().unwrap();
        assert!((1500..10_000).contains(&ms), "{q} = {ms}: {st}");
    }
    // The fast one is not slowed down by it in its own view (with the slow attempts in it,
    // its p99 would be one of them), nor in the endpoint's page.
    let (_, st) = c.get("/v1/stats?endpoint=fast").await;
    assert_eq!(st["attempts"], 30);
    assert!(st["latency_ms"]["p99"].as_u64().unwrap() < 1500, "{st}");
    let (_, page) = c.get("/v1/endpoints/fast/stats").await;
    assert_eq!(page["attempts"], 30, "{page}");
    assert_eq!(page["attempts_per_delivery"], 1.0);
    // Two deliveries, four attempts: two failed, then each succeeded.
    let (_, page) = c.get("/v1/endpoints/flaky/stats").await;
    assert_eq!(page["attempts"], 4, "{page}");
    assert_eq!(page["attempts_per_delivery"], 2.0);
    assert_eq!(page["attempt_success_rate"], 0.5);
    // A window that starts after everything holds no attempts.
    let (_, later) = c.get("/v1/stats?since=2999-01-01T00:00:00Z").await;
    assert_eq!(later["attempts"], 0, "{later}");
    assert!(later["latency_ms"]["p50"].is_null());
}

#[tokio::test]
async fn listing_filters_and_pages() {
    let ok = Receiver::start().await;
    let bad = Receiver::start().await;
    bad.set_default(Reply::status(500));
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        endpoint("ok", &ok.url("/"), ""),
        endpoint("bad", &bad.url("/"), "schedule = [\"0s\"]"),
    ))
    .await;
    let mut ok_ids = Vec::new();
    for i in 0..5 {
        let r = c
            .send(json!({"event_type": "t", "payload": {"i": i}, "endpoint": "ok"}))
            .await;
        ok_ids.push(r["deliveries"][0]["id"].as_str().unwrap().to_string());
    }
    let dead = c
        .send(json!({"event_type": "t", "payload": {}, "endpoint": "bad"}))
        .await;
    let dead_id = dead["deliveries"][0]["id"].as_str().unwrap().to_string();
    c.wait_status(&dead_id, "dead", T).await;
    for id in &ok_ids {
        c.wait_status(id, "delivered", T).await;
    }

    let (_, all) = c.get("/v1/deliveries").await;
    let data = all["data"].as_array().unwrap();
    assert_eq!(data.len(), 6);
    assert_eq!(data[0]["id"], dead_id.as_str(), "newest first");
    let (_, delivered) = c.get("/v1/deliveries?status=delivered").await;
    assert_eq!(delivered["data"].as_array().unwrap().len(), 5);
    let (_, by_ep) = c.get("/v1/deliveries?endpoint=bad").await;
    assert_eq!(by_ep["data"].as_array().unwrap().len(), 1);
    assert_eq!(by_ep["data"][0]["status"], "dead");

    // Pages of two, following the cursor, cover everything once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cur) => format!("/v1/deliveries?limit=2&cursor={cur}"),
            None => "/v1/deliveries?limit=2".to_string(),
        };
        let (_, page) = c.get(&path).await;
        for d in page["data"].as_array().unwrap() {
            seen.push(d["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(n) => cursor = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 6);
    let seen: std::collections::HashSet<String> = seen.into_iter().collect();
    let created: std::collections::HashSet<String> =
        ok_ids.iter().cloned().chain([dead_id.clone()]).collect();
    assert_eq!(
        seen, created,
        "each delivery once, and only those made here"
    );

    // Time windows.
    let future = "2999-01-01T00:00:00Z";
    let (_, none) = c.get(&format!("/v1/deliveries?since={future}")).await;
    assert_eq!(none["data"].as_array().unwrap().len(), 0);
    let (_, all2) = c
        .get(&format!(
            "/v1/deliveries?until={future}&since=2000-01-01T00:00:00Z"
        ))
        .await;
    assert_eq!(all2["data"].as_array().unwrap().len(), 6);
    // Empty parameters, as a URL template leaves them, are absent ones.
    let (s, blank) = c
        .get("/v1/deliveries?status=&endpoint=&since=&until=&limit=&cursor=")
        .await;
    assert_eq!(s, 200, "{blank}");
    assert_eq!(blank["data"].as_array().unwrap().len(), 6);
    let (s, blank) = c.get("/v1/dlq?endpoint=&limit=&cursor=").await;
    assert_eq!(s, 200, "{blank}");
    assert_eq!(blank["data"].as_array().unwrap().len(), 1);
    let (s, e) = c.get("/v1/deliveries?since=yesterday").await;
    assert_eq!(s, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("since"));
    // Unix seconds are not taken for milliseconds (or anything else).
    let (s, e) = c.get("/v1/deliveries?until=1700000000").await;
    assert_eq!(s, 400, "{e}");
    assert!(e["error"]["message"].as_str().unwrap().contains("until"));
    // A cursor no page gave would start the listing at an arbitrary place.
    for bad in ["abc", "zzz", "dlv_nope"] {
        let (s, e) = c.get(&format!("/v1/deliveries?cursor={bad}")).await;
        assert_eq!(s, 400, "{bad}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("cursor"));
    }
    let (s, _) = c.get("/v1/deliveries?status=lost").await;
    assert_eq!(s, 400);
    let (s, _) = c.get("/v1/deliveries/dlv_missing").await;
    assert_eq!(s, 404);

    // A delivery's page shows the stored request.
    let (_, one) = c.get(&format!("/v1/deliveries/{}", ok_ids[0])).await;
    assert_eq!(one["request"]["body"], "{\"i\":0}");
    assert_eq!(one["request"]["content_type"], "application/json");

    // Stats.
    let (s, st) = c.get("/v1/stats").await;
    assert_eq!(s, 200, "{st}");
    assert_eq!(st["counts"]["delivered"], 5);
    assert_eq!(st["counts"]["dead"], 1);
    assert_eq!(st["counts"]["pending"], 0);
    let rate = st["success_rate"].as_f64().unwrap();
    assert!((rate - 5.0 / 6.0).abs() < 1e-9, "{rate}");
    assert_eq!(st["attempts"], 6);
    assert!(st["latency_ms"]["p50"].is_u64());
    assert!(st["latency_ms"]["p99"].is_u64());
    assert_eq!(st["attempts_per_delivery"], 1.0);
    let (_, st_bad) = c.get("/v1/stats?endpoint=bad").await;
    assert_eq!(st_bad["counts"]["dead"], 1);
    assert_eq!(st_bad["counts"]["delivered"], 0);
    assert_eq!(st_bad["success_rate"], 0.0);

    // Metrics.
    let m = c.text("/metrics").await;
    assert!(m.contains("courier_events_ingested_total 6"), "{m}");
    assert!(
        m.contains("courier_attempts_total{endpoint=\"ok\",outcome=\"delivered\"} 5"),
        "{m}"
    );
    assert!(
        m.contains("courier_attempts_total{endpoint=\"bad\",outcome=\"dead\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("courier_deliveries_final_total{endpoint=\"bad\",state=\"dead\"} 1"),
        "{m}"
    );
    assert!(m.contains("courier_queue_depth{endpoint=\"ok\"} 0"), "{m}");
    assert!(m.contains("courier_store_damaged_records_total 0"), "{m}");
    assert!(
        m.contains("courier_store_journal_replayed_records 0"),
        "{m}"
    );
    assert!(
        m.contains("courier_attempt_duration_seconds_count{endpoint=\"ok\"} 5"),
        "{m}"
    );
    c.stop().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let c = Courier::start(DELIVERY_FAST).await;
    let (s, h) = c.get_as("/healthz", None).await;
    assert_eq!((s, h["status"].as_str()), (200, Some("ok")));
    let (s, r) = c.get_as("/readyz", None).await;
    assert_eq!((s, r["status"].as_str()), (200, Some("ready")));
    let (s, e) = c.get_as("/nope", None).await;
    assert_eq!(s, 404);
    assert_eq!(e["error"]["code"], "not_found");
    c.stop().await;
}

#[tokio::test]
async fn queue_depth_reports_a_backlog() {
    let port = free_port();
    let c = Courier::with_endpoint(
        "down",
        &format!("http://127.0.0.1:{port}/"),
        "schedule = [\"1h\"]",
    )
    .await;
    for i in 0..10 {
        c.send(json!({"event_type": "t", "payload": {"i": i}}))
            .await;
    }
    let m = c.text("/metrics").await;
    assert!(
        m.contains("courier_queue_depth{endpoint=\"down\"} 10"),
        "{m}"
    );
    let (_, st) = c.get("/v1/stats").await;
    assert_eq!(st["counts"]["pending"], 10);
    assert_eq!(st["endpoints"][0]["queue_depth"], 10);
    let (_, p) = c.get("/v1/deliveries?status=pending").await;
    assert_eq!(p["data"].as_array().unwrap().len(), 10);
    assert!(p["data"][0]["next_attempt_at"].is_string());
    c.stop().await;
}

#[tokio::test]
async fn the_console_page_and_the_workflow_list_are_served() {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}[[workflows]]\nname = \"wf\"\nupstream = {{ url = \"{}\" }}\nendpoint = \"app\"\nevent_name = \"e\"\n",
        endpoint("app", &rx.url("/"), ""),
        rx.url("/up")
    ))
    .await;
    let resp = c
        .http
        .get(format!("{}/console", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'self'")
            && csp.contains("script-src 'sha256-")
            && !csp.contains("script-src 'unsafe-inline'")
            && csp.contains("frame-ancestors 'none'")
            && !csp.contains(" ws: "),
        "{csp}"
    );
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    let html = resp.text().await.unwrap();
    assert!(
        html.contains("<title>courier console</title>")
            && !html.contains("http://")
            && !html.contains("https://"),
        "no external assets"
    );
    let (s, w) = c.get("/v1/workflows").await;
    assert_eq!(s, 200);
    assert_eq!(w["data"][0]["name"], "wf");
    assert_eq!(w["data"][0]["event_name"], "e");
    assert!(w["data"][0]["upstream"].is_string(), "{w}");
    // An ingest-only key sees the workflow, not where its upstream is.
    let (s, w) = c.get_as("/v1/workflows", Some(INGEST_ONLY)).await;
    assert_eq!((s, w["data"][0]["name"].as_str()), (200, Some("wf")), "{w}");
    assert!(w["data"][0]["upstream"].is_null(), "{w}");
    let (s, _) = c.get_as("/v1/workflows", None).await;
    assert_eq!(s, 401);
    c.stop().await;
}

#[tokio::test]
async fn errors_the_framework_answers_have_the_json_shape_too() {
    let c = Courier::start("").await;
    let shape = |what: &str, s: u16, v: &serde_json::Value, status: u16, code: &str| {
        assert_eq!(s, status, "{what}: {v}");
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
        assert!(
            !v["error"]["message"].as_str().unwrap().is_empty(),
            "{what}: {v}"
        );
    };
    let (s, v) = c
        .call(reqwest::Method::PUT, "/v1/endpoints/app", Some(ADMIN), None)
        .await;
    shape("wrong method", s, &v, 405, "method_not_allowed");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("PUT"),
        "{v}"
    );
    let (s, v) = c.get("/v1/deliveries/%FF").await;
    shape("a path that is not UTF-8", s, &v, 400, "bad_request");
    // The ingest routes too.
    let (s, v) = c.get("/v1/events").await;
    shape("GET on the ingest route", s, &v, 405, "method_not_allowed");
    let (s, v) = c.post("/v1/ingest/%FF", Some(ADMIN), "x".to_string()).await;
    shape(
        "an ingest path that is not UTF-8",
        s,
        &v,
        400,
        "bad_request",
    );
    // A WebSocket route asked without a token is refused for the token, whatever else.
    let (s, v) = c.get_as("/v1/channels/x/ws", None).await;
    shape("ws without token", s, &v, 401, "unauthorized");
    let (s, v) = c.get("/v1/channels/x/ws").await;
    shape("ws without upgrade", s, &v, 400, "bad_request");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("WebSocket"),
        "{v}"
    );
    let (s, v) = c.get("/v1/channels/x/ws?token=a&token=b").await;
    shape("ws with two tokens", s, &v, 400, "bad_request");
    c.stop().await;
}

#[tokio::test]
async fn metrics_come_as_prometheus_text_or_as_openmetrics_to_a_scraper_that_asks() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/"), "").await;
    c.send(json!({"event_type": "t", "payload": {}})).await;
    let get = |accept: Option<&'static str>| {
        let mut r = reqwest::Client::new().get(format!("{}/metrics", c.base));
        if let Some(a) = accept {
            r = r.header("accept", a);
        }
        async move {
            let resp = r.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
            (ct, resp.text().await.unwrap())
        }
    };
    let (ct, plain) = get(None).await;
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(
        plain.contains(
            "# TYPE courier_events_ingested_total counter\ncourier_events_ingested_total 1\n"
        ),
        "{plain}"
    );
    assert!(!plain.contains("# EOF"), "{plain}");
    // What Prometheus sends.
    let (ct, om) = get(Some(
        "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ))
    .await;
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ct}"
    );
    assert!(
        om.contains("# TYPE courier_events_ingested counter\ncourier_events_ingested_total 1\n"),
        "{om}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    c.stop().await;
}

#[tokio::test]
async fn a_short_token_is_accepted_with_a_warning_not_refused() {
    let c = Courier::start("[[keys]]\ntoken = \"test-key\"\nscopes = [\"admin\"]\n").await;
    let (s, v) = c.get_as("/v1/deliveries", Some("test-key")).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = c.get_as("/v1/deliveries", Some("test-kez")).await;
    assert_eq!(s, 401);
    c.stop().await;
}

#[tokio::test]
async fn a_next_cursor_is_given_only_when_there_is_a_next_page() {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        endpoint("a", &rx.url("/"), ""),
        endpoint("b", &rx.url("/"), "")
    ))
    .await;
    c.send(json!({"event_type": "t", "payload": {"n": 1}, "endpoint": "a"}))
        .await;
    c.send(json!({"event_type": "t", "payload": {"n": 2}, "endpoint": "a"}))
        .await;
    rx.wait_for(2, Duration::from_secs(10)).await;
    // Exactly a page's worth: no next page.
    let (_, page) = c.get("/v1/deliveries?limit=2").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert!(page["next_cursor"].is_null(), "{page}");
    // One fewer: a next page, and it is the last.
    let (_, page) = c.get("/v1/deliveries?limit=1").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let (_, rest) = c
        .get(&format!("/v1/deliveries?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert!(rest["next_cursor"].is_null(), "{rest}");
    assert_ne!(rest["data"][0]["id"], page["data"][0]["id"]);
    // The same for endpoints.
    let (_, eps) = c.get("/v1/endpoints?limit=2").await;
    assert_eq!(eps["data"].as_array().unwrap().len(), 2);
    assert!(eps["next_cursor"].is_null(), "{eps}");
    let (_, eps) = c.get("/v1/endpoints?limit=1").await;
    assert_eq!(eps["next_cursor"], "a", "{eps}");
    c.stop().await;
}
