//! How workflow channels end: upstream 4xx (no retry) and timeouts (retried), the event
//! types of the plain async webhooks, a real callback racing the simulator, and a simulator
//! that fails.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

const T: Duration = Duration::from_secs(30);

/// Courier's config: the endpoint `app` on `rx` and the workflow `wf` whose upstream is
/// `upstream` with `settings` (more `upstream` keys), then `extra` (more workflow keys and
/// whatever follows).
fn config(rx: &Receiver, upstream: &Receiver, settings: &str, extra: &str) -> String {
    format!(
        "{DELIVERY_FAST}{}[[workflows]]\nname = \"wf\"\nupstream = {{ url = \"{}\", {settings} }}\nendpoint = \"app\"\n{extra}\n",
        endpoint("app", &rx.url("/hook"), ""),
        upstream.url("/v1/chat/completions"),
    )
}

fn simulator(extra: &str) -> String {
    format!(
        "[[plugins]]\nname = \"inject-id\"\npath = \"{}\"\nkind = \"simulator\"\n{extra}\n",
        plugin("inject-id").display()
    )
}

/// An event-driven workflow whose upstream answers `ai` and whose backend inject-id (with
/// `settings`) plays 100 ms later, with a callback timeout of 10 minutes: the upstream, the
/// endpoint's receiver and the courier.
async fn simulated(ai: &str, settings: &str) -> (Receiver, Receiver, Courier) {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(ai));
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{}{}",
        config(
            &rx,
            &upstream,
            "retries = 0",
            "event_name = \"e\"\nsimulate = \"inject-id\"\nsimulate_delay = \"100ms\"\ncallback_timeout = \"10m\"",
        ),
        simulator(settings)
    ))
    .await;
    (upstream, rx, c)
}

async fn open(c: &Courier) -> String {
    let (s, r) = c
        .post_json("/v1/ai/async", &json!({"workflow": "wf", "q": "a film?"}))
        .await;
    assert_eq!(s, 202, "{r}");
    r["channel_id"].as_str().unwrap().to_string()
}

/// The channel's webhook deliveries as the API shows them.
async fn deliveries(c: &Courier, ch: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for id in ch["deliveries"].as_array().unwrap() {
        let (s, d) = c
            .get(&format!("/v1/deliveries/{}", id.as_str().unwrap()))
            .await;
        assert_eq!(s, 200, "{d}");
        out.push(d);
    }
    out
}

fn statuses(ch: &Value) -> Vec<String> {
    ch["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["message"]["status"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_400_is_not_retried_and_ends_the_channel_with_ai_failed() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(400).body(r#"{"error": "bad prompt"}"#));
    let rx = Receiver::start().await;
    let c = Courier::start(&config(
        &rx,
        &upstream,
        "retries = 3, retry_delay = \"50ms\"",
        "",
    ))
    .await;
    let id = open(&c).await;
    let ch = wait_channel(&c, &id, |ch| ch["final"] == true).await;
    assert_eq!(ch["status"], "error", "{ch:#}");
    let latest = &ch["latest"];
    assert_eq!(latest["status"], "error");
    assert!(
        latest["error"].as_str().unwrap().contains("400"),
        "{latest}"
    );
    assert_eq!(latest["data"], Value::Null);
    assert_eq!(latest["meta"]["attempts"], 1, "{latest}");
    assert_eq!(latest["meta"]["upstream_status"], 400, "{latest}");
    // The upstream's retries all happen before the channel ends: one call is all there was.
    assert_eq!(upstream.received().len(), 1, "a 400 is not retried");

    // The webhook is the error message, sent as an `ai.failed` event.
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].json(), *latest);
    assert_eq!(got[0].header("mr-channel-id"), id);
    let ds = deliveries(&c, &ch).await;
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0]["event_type"], "ai.failed", "{:#}", ds[0]);
    assert_eq!(
        got[0].header("webhook-id"),
        ds[0]["event_id"].as_str().unwrap()
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_times_out_is_retried_retries_times() {
    let upstream = Receiver::start().await;
    // Far longer than the upstream timeout: every call times out.
    upstream.set_default(Reply::status(200).body(AI).delay(Duration::from_secs(30)));
    let rx = Receiver::start().await;
    let c = Courier::start(&config(
        &rx,
        &upstream,
        "timeout = \"1s\", retries = 2, retry_delay = \"50ms\"",
        "",
    ))
    .await;
    let id = open(&c).await;
    let ch = wait_channel(&c, &id, |ch| ch["final"] == true).await;
    assert_eq!(ch["status"], "error", "{ch:#}");
    let latest = &ch["latest"];
    let error = latest["error"].as_str().unwrap();
    assert!(error.contains("timeout"), "{latest}");
    // The first call and `retries` more.
    assert_eq!(latest["meta"]["attempts"], 3, "{latest}");
    assert_eq!(upstream.received().len(), 3);
    // Each waited for its timeout.
    assert!(
        latest["meta"]["duration_ms"].as_u64().unwrap() >= 2900,
        "{latest}"
    );
    let ds = deliveries(&c, &ch).await;
    assert_eq!(ds[0]["event_type"], "ai.failed");
    assert_eq!(rx.wait_for(1, T).await[0].json()["status"], "error");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_times_out_once_succeeds_on_the_retry_with_ai_completed() {
    let upstream = Receiver::start().await;
    upstream.script([Reply::status(200).body(AI).delay(Duration::from_secs(30))]);
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let c = Courier::start(&config(
        &rx,
        &upstream,
        "timeout = \"1s\", retries = 2, retry_delay = \"50ms\"",
        "",
    ))
    .await;
    let id = open(&c).await;
    let ch = wait_channel(&c, &id, |ch| ch["final"] == true).await;
    assert_eq!(ch["status"], "success", "{ch:#}");
    let latest = &ch["latest"];
    assert_eq!(latest["meta"]["attempts"], 2, "{latest}");
    assert_eq!(latest["meta"]["upstream_status"], 200, "{latest}");
    assert_eq!(latest["data"], serde_json::from_str::<Value>(AI).unwrap());
    assert_eq!(upstream.received().len(), 2);
    // Both calls carried the request minus `workflow`.
    for r in upstream.received() {
        assert_eq!(r.json(), json!({"q": "a film?"}));
    }
    // The success webhook is an `ai.completed` event.
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].json(), *latest);
    let ds = deliveries(&c, &ch).await;
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0]["event_type"], "ai.completed", "{:#}", ds[0]);
    assert_eq!(ds[0]["endpoint"], "app");
    assert_eq!(
        got[0].header("webhook-id"),
        ds[0]["event_id"].as_str().unwrap()
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_callback_before_the_simulator_wins_and_the_simulator_changes_nothing_later() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{}{}",
        config(
            &rx,
            &upstream,
            "retries = 0",
            "event_name = \"e\"\nsimulate = \"inject-id\"\nsimulate_delay = \"6s\"\ncallback_timeout = \"5m\"",
        ),
        simulator("")
    ))
    .await;
    let id = open(&c).await;
    wait_channel(&c, &id, |ch| ch["status"] == "ai_generated").await;
    let cb = json!({"data": {"movie": "Arrival", "from": "backend"}, "task_id": "t-1", "metadata": {"by": "backend"}});
    let (s, r) = c.post_json(&format!("/v1/callback/{id}"), &cb).await;
    assert_eq!(s, 200, "{r}");
    let ch = wait_channel(&c, &id, |ch| ch["final"] == true).await;
    assert_eq!(ch["status"], "success");
    assert_eq!(ch["latest"]["data"], cb["data"], "{ch:#}");
    assert_eq!(ch["latest"]["task_id"], "t-1");
    assert!(ch["latest"].get("simulated").is_none(), "{ch:#}");

    // A marker: a channel opened now, left to the simulator. Its simulation is due after
    // the first channel's would have been, so once it has run the first one's time has
    // passed too.
    let marker = open(&c).await;
    let m = wait_channel(&c, &marker, |ch| ch["final"] == true).await;
    assert_eq!(m["status"], "success", "{m:#}");
    assert_eq!(m["latest"]["simulated"], true, "{m:#}");
    assert_eq!(
        m["latest"]["data"]["id"],
        format!("sim_{marker}"),
        "the simulator works: {m:#}"
    );
    // Give a late simulation of the first channel a moment beyond the marker's.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (_, after) = c.get(&format!("/v1/channels/{id}")).await;
    assert_eq!(after["latest"]["data"], cb["data"], "{after:#}");
    assert_eq!(
        statuses(&after),
        ["pending", "ai_generated", "success"],
        "{after:#}"
    );
    // A second callback is too late: the channel is done.
    let (s, _) = c.post_json(&format!("/v1/callback/{id}"), &cb).await;
    assert_eq!(s, 409);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_simulator_ends_the_channel_at_once_with_simulation_failed() {
    // No plugin in plugins/ fails as a simulator; inject-id with a fuel limit too small for
    // its work fails every call ("its fuel ... limit", README).
    let (_upstream, rx, c) = simulated(AI, "limits = { fuel = 1000 }").await;
    let id = open(&c).await;
    // Long before the callback timeout (10 minutes).
    let ch = wait_channel(&c, &id, |ch| ch["final"] == true).await;
    assert_eq!(ch["status"], "error", "{ch:#}");
    let latest = &ch["latest"];
    assert_eq!(latest["channel_id"], id.as_str());
    assert_eq!(latest["status"], "error");
    let error = latest["error"].as_str().unwrap();
    assert!(error.starts_with("simulation_failed: "), "{latest}");
    assert!(error.contains("fuel"), "failed for its fuel: {latest}");
    assert_eq!(
        statuses(&ch),
        ["pending", "ai_generated", "error"],
        "{ch:#}"
    );
    // A callback now finds it completed.
    let (s, _) = c
        .post_json(&format!("/v1/callback/{id}"), &json!({"data": 1}))
        .await;
    assert_eq!(s, 409);
    // The task.ai_generated webhook still went out (simulate_webhook defaults to true).
    assert_eq!(
        rx.wait_for(1, T).await[0].json()["type"],
        "task.ai_generated"
    );
    c.stop().await;
}

/// What a simulator returns completes the channel as a real callback would, so it is held to
/// what a callback is held to: its fields (`metadata` an object) and `server.max_body_bytes`.
/// Anything else ends the channel with `simulation_failed`, naming why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulator_answer_a_real_callback_could_not_give_fails_the_simulation() {
    let big = format!(
        r#"{{"choices": [{{"message": {{"content": "{}"}}}}]}}"#,
        "x".repeat(70_000)
    );
    for (ai, settings, why) in [
        (
            AI.to_string(),
            "config = { metadata = \"[1]\" }",
            "`metadata` must be an object",
        ),
        // 65,536 bytes in the tests' configuration.
        (big, "", "server.max_body_bytes"),
    ] {
        let (_upstream, _rx, c) = simulated(&ai, settings).await;
        let id = open(&c).await;
        let ch = wait_channel(&c, &id, |ch| ch["final"] == true).await;
        assert_eq!(ch["status"], "error", "{ch:#}");
        let error = ch["latest"]["error"].as_str().unwrap();
        assert!(
            error.starts_with("simulation_failed: ") && error.contains(why),
            "{why}: {error}"
        );
        c.stop().await;
    }
}

/// Upstream calls, to the operator's own service, go through the proxy the environment
/// names; deliveries to customers' endpoints never do (a proxy would resolve their names
/// past the guard against private addresses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_calls_honour_http_proxy_and_deliveries_ignore_it() {
    // The proxy answers for the upstream (a plain HTTP proxy is sent the absolute URL).
    let proxy = Receiver::start().await;
    proxy.set_default(Reply::status(200).body(AI));
    let upstream = Receiver::start().await;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("courier.toml");
    std::fs::write(
        &cfg,
        base_config(
            &dir.path().join("data"),
            &config(&rx, &upstream, "retries = 0", ""),
        ),
    )
    .unwrap();
    let proxy_url = proxy.url("");
    let p = Process::spawn_with_env(
        &cfg,
        &[
            ("HTTP_PROXY", &proxy_url),
            ("http_proxy", &proxy_url),
            // Whatever the machine running the tests excludes from proxying.
            ("NO_PROXY", ""),
            ("no_proxy", ""),
        ],
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (s, r) = post_json(
        &http,
        &format!("{}/v1/ai/async", p.base),
        &json!({"workflow": "wf", "q": "a film?"}),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].json()["status"], "success", "{}", got[0].json());
    assert_eq!(
        proxy.received().len(),
        1,
        "the upstream call went through the proxy"
    );
    assert_eq!(proxy.received()[0].path, "/v1/chat/completions");
    assert!(
        upstream.received().is_empty(),
        "not straight to the upstream"
    );
    drop(p);
}

/// A transform may pass on a workflow webhook larger than twice `server.max_body_bytes`: it
/// carries an upstream answer, which `upstream.max_response` bounds, not the ingest limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transform_passes_on_a_workflow_webhook_larger_than_the_ingest_limit() {
    // 200,000 bytes of answer; the tests' max_body_bytes is 65,536.
    let big = format!(
        r#"{{"choices": [{{"message": {{"content": "{}"}}}}]}}"#,
        "x".repeat(200_000)
    );
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(&big));
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}[[workflows]]\nname = \"wf\"\nupstream = {{ url = \"{}\", retries = 0 }}\nendpoint = \"app\"\n",
        plugin_entry("pass", "misbehave", "transform", "config = { mode = \"none\" }"),
        endpoint("app", &rx.url("/hook"), "transforms = [\"pass\"]"),
        upstream.url("/v1/chat/completions"),
    ))
    .await;
    let id = open(&c).await;
    let got = rx.wait_for(1, T).await;
    assert!(got[0].body.len() > 200_000, "{} bytes", got[0].body.len());
    assert_eq!(got[0].json()["channel_id"], id.as_str());
    c.stop().await;
}
