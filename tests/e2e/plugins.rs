//! WebAssembly plugins end to end: real components compiled from plugins/, run by wasmtime
//! inside a real courier, changing what the receiver sees.

use std::time::{Duration, Instant};

use courier::deliver::sign;
use serde_json::json;

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn redact_and_envelope_change_the_body_and_the_signature_covers_it() {
    let (a, b, chain) = (
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    );
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}{}{}{}",
        plugin_entry(
            "redact",
            "redact",
            "transform",
            "config = { fields = \"email, phone\" }"
        ),
        plugin_entry("envelope", "envelope", "transform", ""),
        endpoint("a", &a.url("/"), "transforms = [\"redact\"]"),
        endpoint("b", &b.url("/"), "transforms = [\"envelope\"]"),
        endpoint(
            "chain",
            &chain.url("/"),
            "transforms = [\"redact\", \"envelope\"]"
        ),
    ))
    .await;
    let reply = c
        .send(json!({"event_type": "user.created", "payload": {"name": "Ada", "email": "ada@example.com", "phone": "1", "age": 36}}))
        .await;
    assert_eq!(reply["deliveries"].as_array().unwrap().len(), 3);

    let got = a.wait_for(1, T).await;
    assert_eq!(got[0].json(), json!({"name": "Ada", "age": 36}));
    sign::verify_mr(SECRET, &got[0].body, got[0].header("mr-signature"))
        .expect("signature covers the transformed body");
    let ts: i64 = got[0].header("webhook-timestamp").parse().unwrap();
    sign::verify_standard(
        SECRET,
        got[0].header("webhook-id"),
        ts,
        &got[0].body,
        got[0].header("webhook-signature"),
        None,
    )
    .unwrap();

    let got = b.wait_for(1, T).await;
    let env = got[0].json();
    assert_eq!(env["type"], "user.created");
    assert_eq!(env["data"]["email"], "ada@example.com");
    assert!(
        courier::model::parse_time(env["timestamp"].as_str().unwrap()).is_some(),
        "{env}"
    );
    sign::verify_mr(SECRET, &got[0].body, got[0].header("mr-signature")).unwrap();

    let got = chain.wait_for(1, T).await;
    let env = got[0].json();
    assert_eq!(env["type"], "user.created");
    assert_eq!(
        env["data"],
        json!({"name": "Ada", "age": 36}),
        "redact ran before envelope"
    );

    let m = c.text("/metrics").await;
    assert!(
        m.contains("courier_plugin_calls_total{plugin=\"redact\",result=\"ok\"} 2"),
        "{m}"
    );
    // Error series are there before the first error, at 0.
    assert!(
        m.contains("courier_plugin_calls_total{plugin=\"redact\",result=\"error\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("courier_plugin_loads_total{plugin=\"redact\",result=\"error\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("courier_config_reloads_total{result=\"error\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("courier_plugin_call_duration_seconds_count{plugin=\"envelope\"} 2"),
        "{m}"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_backoff_plugin_replaces_the_schedule() {
    let rx = Receiver::start().await;
    rx.set_default(Reply::status(500));
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        plugin_entry(
            "fixed",
            "fixed-backoff",
            "backoff",
            "config = { delay_ms = 300, max_attempts = 3 }"
        ),
        endpoint(
            "app",
            &rx.url("/"),
            "backoff = \"fixed\"\nschedule = [\"0s\", \"1ms\"]"
        ),
    ))
    .await;
    let r = c.send(json!({"event_type": "t", "payload": {}})).await;
    let d = c
        .wait_status(r["deliveries"][0]["id"].as_str().unwrap(), "dead", T)
        .await;
    assert_eq!(
        d["attempts"].as_array().unwrap().len(),
        3,
        "max_attempts from the plugin, not the schedule's 2"
    );
    assert!(
        d["last_error"].as_str().unwrap().contains("fixed-backoff"),
        "{d}"
    );
    let got = rx.received();
    for w in got.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(
            gap >= Duration::from_millis(280),
            "delay_ms 300 honoured, got {gap:?}"
        );
    }
    c.stop().await;
}

/// A configuration that names a byte-identical copy of a loaded plugin keeps it loaded as it
/// is (no new version) and shows the path it now names.
#[test]
fn a_plugin_moved_to_an_identical_file_shows_its_new_path() {
    use courier::config::{PluginConfig, PluginKind};
    let metrics = courier::observe::Metrics::new();
    let plugins = courier::plugins::Plugins::default();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.wasm");
    std::fs::copy(plugin("fixed-backoff"), &copy).unwrap();
    let cfg = |path: std::path::PathBuf| PluginConfig {
        name: "p".into(),
        path,
        kind: PluginKind::Backoff,
        config: Default::default(),
        fuel: None,
        memory_bytes: None,
        timeout: None,
    };
    plugins
        .load_all(&[cfg(plugin("fixed-backoff"))], &metrics)
        .unwrap();
    plugins.load_all(&[cfg(copy.clone())], &metrics).unwrap();
    let st = plugins.status();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].path, copy);
    assert_eq!(st[0].version, 1, "the same bytes: not loaded again");
}

/// An attempt takes its endpoint's backoff plugin when it starts: a reload that retires that
/// plugin while the attempt waits for its answer (up to the endpoint's timeout) does not
/// take the retry decision from it.
#[test]
fn a_backoff_plugin_retired_during_an_attempt_still_decides_its_retry() {
    use courier::config::{PluginConfig, PluginKind};
    let metrics = courier::observe::Metrics::new();
    let plugins = courier::plugins::Plugins::default();
    let cfg = PluginConfig {
        name: "p".into(),
        path: plugin("fixed-backoff"),
        kind: PluginKind::Backoff,
        config: [("delay_ms".to_string(), "1234".to_string())].into(),
        fuel: None,
        memory_bytes: None,
        timeout: None,
    };
    plugins.load_all(&[cfg], &metrics).unwrap();
    let taken = plugins.backoff("p"); // the attempt starts
    plugins.retire_unconfigured(&[]); // a reload dropped it, and its grace ran out
    assert!(plugins.get("p").is_none());
    let info = first_failed_attempt();
    assert!(matches!(
        plugins.next_delay(&metrics, "p", taken, &info),
        Ok(courier::plugins::BackoffDecision::RetryAfterMs(1234))
    ));
    // Looked up only now, it is gone: the failure is counted like any other.
    assert!(
        plugins
            .next_delay(&metrics, "p", plugins.backoff("p"), &info)
            .is_err()
    );
    assert!(
        metrics
            .encode()
            .contains("courier_plugin_calls_total{plugin=\"p\",result=\"error\"} 1"),
        "{}",
        metrics.encode()
    );
}

/// What a backoff plugin is told of a first attempt answered 500.
fn first_failed_attempt() -> courier::plugins::AttemptInfo {
    courier::plugins::AttemptInfo {
        endpoint: "app".into(),
        event_type: "t".into(),
        attempt: 1,
        status: Some(500),
        error: None,
        retry_after_ms: None,
    }
}

/// The least fuel with which the backoff plugin `file` still loads (each call instantiates
/// it afresh within its fuel, so a call with this much runs out), checked by calling it.
fn just_enough_fuel_to_load(file: &str) -> u64 {
    use courier::config::{PluginConfig, PluginKind};
    let metrics = courier::observe::Metrics::new();
    let with = |fuel: u64| {
        let plugins = courier::plugins::Plugins::default();
        let cfg = PluginConfig {
            name: "p".into(),
            path: plugin(file),
            kind: PluginKind::Backoff,
            config: Default::default(),
            fuel: Some(fuel),
            memory_bytes: None,
            timeout: None,
        };
        plugins.load_all(&[cfg], &metrics).ok().map(|()| plugins)
    };
    let (mut lo, mut hi) = (1u64, 1u64 << 32); // fails at lo, loads at hi
    assert!(with(lo).is_none() && with(hi).is_some());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if with(mid).is_some() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let info = first_failed_attempt();
    let plugins = with(hi).unwrap();
    assert!(
        plugins
            .next_delay(&metrics, "p", plugins.backoff("p"), &info)
            .is_err(),
        "a call needs more fuel than loading"
    );
    hi
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backoff_plugin_failing_past_the_schedule_does_not_end_its_round() {
    let rx = Receiver::start().await;
    rx.set_default(Reply::status(500));
    let config = |limits: &str| {
        format!(
            // Many failures in a row: the circuit must not open and slow the test down.
            "{DELIVERY_FAST}circuit_failures = 1000\n{}{}",
            plugin_entry(
                "fixed",
                "fixed-backoff",
                "backoff",
                &format!("config = {{ delay_ms = 100, max_attempts = 1000 }}\n{limits}")
            ),
            endpoint(
                "app",
                &rx.url("/"),
                "backoff = \"fixed\"\nschedule = [\"0s\", \"1ms\"]"
            ),
        )
    };
    let starved = just_enough_fuel_to_load("fixed-backoff");
    let c = Courier::start_file(&config("")).await;
    let r = c.send(json!({"event_type": "t", "payload": {}})).await;
    let id = r["deliveries"][0]["id"].as_str().unwrap().to_string();
    // The plugin runs the round past the schedule's two attempts...
    c.wait_delivery(&id, T, |d| d["attempt_count"].as_u64().unwrap() >= 4)
        .await;
    // ...and then fails on every call: it loads, but runs out of fuel when asked.
    c.rewrite_config(&config(&format!("limits = {{ fuel = {starved} }}")));
    c.wait_config(|st| st["version"] == 2).await;
    let failed_calls = || async {
        let m = c.text("/metrics").await;
        m.lines()
            .find(|l| {
                l.starts_with("courier_plugin_calls_total{plugin=\"fixed\",result=\"error\"}")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Asked twice more, failing both times: the delivery is still pending after each.
    let deadline = std::time::Instant::now() + T;
    while failed_calls().await < 2 {
        let (_, d) = c.get(&format!("/v1/deliveries/{id}")).await;
        assert_eq!(d["status"], "pending", "{d:#}");
        assert!(
            std::time::Instant::now() < deadline,
            "the plugin never failed twice"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, d) = c.get(&format!("/v1/deliveries/{id}")).await;
    assert_eq!(d["status"], "pending", "{d:#}");
    // Once the receiver is back, the delivery goes through.
    rx.set_default(Reply::status(200));
    let d = c.wait_status(&id, "delivered", T).await;
    assert!(d["attempt_count"].as_u64().unwrap() >= 6, "{d}");
    c.stop().await;
}

#[tokio::test]
async fn a_transform_can_drop_a_delivery() {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        plugin_entry(
            "dropper",
            "misbehave",
            "transform",
            "config = { mode = \"drop\" }"
        ),
        endpoint("app", &rx.url("/"), "transforms = [\"dropper\"]"),
    ))
    .await;
    let r = c.send(json!({"event_type": "t", "payload": {}})).await;
    let id = r["deliveries"][0]["id"].as_str().unwrap();
    let d = c.wait_status(id, "dropped", T).await;
    assert!(
        d["last_error"]
            .as_str()
            .unwrap()
            .contains("not for this endpoint"),
        "{d}"
    );
    assert_eq!(d["attempt_count"], 0);
    let (_, list) = c.get("/v1/deliveries?status=dropped").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.received().is_empty());
    c.stop().await;
}

/// Plugin calls waiting for one of the host's call slots hold no blocking thread: 600
/// attempts stuck in a slow transform leave tokio's blocking pool (512 threads) to what else
/// needs it — here the DNS lookup of another endpoint's host name, which would otherwise
/// queue behind the plugin calls for their whole time limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_with_hundreds_of_calls_waiting_does_not_hold_up_other_endpoints() {
    let (slow_rx, ok_rx) = (Receiver::start().await, Receiver::start().await);
    // By name, so that sending needs a lookup on the blocking pool.
    let by_name = ok_rx.url("/").replace("127.0.0.1", "localhost");
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}{}",
        plugin_entry(
            "sleepy",
            "misbehave",
            "transform",
            "config = { mode = \"sleep\" }\nlimits = { timeout = \"6s\" }"
        ),
        endpoint(
            "slow",
            &slow_rx.url("/"),
            "transforms = [\"sleepy\"]\nschedule = [\"0s\", \"1h\"]\nmax_in_flight = 1000"
        ),
        endpoint("ok", &by_name, ""),
    ))
    .await;
    for n in 0..600 {
        c.send(json!({"event_type": "t", "payload": {"n": n}, "endpoint": "slow"}))
            .await;
    }
    // Every call has started or is waiting for a slot.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let app = c.app();
        let running = app.attempt_slots - app.attempts.available_permits();
        if running >= 600 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "attempts never all started: {running}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sent = Instant::now();
    c.send(json!({"event_type": "t", "payload": {}, "endpoint": "ok"}))
        .await;
    ok_rx.wait_for(1, Duration::from_secs(20)).await;
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the other endpoint waited {took:?}, as long as the slow plugin's calls"
    );
    assert!(slow_rx.received().is_empty());
    c.stop().await;
}

#[tokio::test]
async fn trapping_looping_and_hungry_plugins_fail_only_their_call() {
    let (bad, good) = (Receiver::start().await, Receiver::start().await);
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}{}{}{}{}{}{}{}{}{}{}{}{}{}{}{}",
        plugin_entry(
            "many",
            "misbehave",
            "transform",
            "config = { mode = \"headers\" }\nlimits = { timeout = \"5s\" }"
        ),
        plugin_entry(
            "badhdr",
            "misbehave",
            "transform",
            "config = { mode = \"badheader\" }\nlimits = { timeout = \"5s\" }"
        ),
        endpoint(
            "many",
            &bad.url("/"),
            "transforms = [\"many\"]\nschedule = [\"0s\"]"
        ),
        endpoint(
            "badhdr",
            &bad.url("/"),
            "transforms = [\"badhdr\"]\nschedule = [\"0s\"]"
        ),
        plugin_entry(
            "trap",
            "misbehave",
            "transform",
            "config = { mode = \"trap\" }\nlimits = { timeout = \"5s\" }"
        ),
        plugin_entry(
            "loop",
            "misbehave",
            "transform",
            "config = { mode = \"loop\" }\nlimits = { timeout = \"50ms\", fuel = 1000000000000 }"
        ),
        plugin_entry(
            "sleep",
            "misbehave",
            "transform",
            "config = { mode = \"sleep\" }\nlimits = { timeout = \"50ms\" }"
        ),
        endpoint(
            "sleep",
            &bad.url("/"),
            "transforms = [\"sleep\"]\nschedule = [\"0s\"]"
        ),
        plugin_entry(
            "burn",
            "misbehave",
            "transform",
            "config = { mode = \"loop\" }\nlimits = { fuel = 1000000, timeout = \"5s\" }"
        ),
        plugin_entry(
            "hog",
            "misbehave",
            "transform",
            "config = { mode = \"hog\" }\nlimits = { memory = \"16MiB\", timeout = \"5s\" }"
        ),
        plugin_entry(
            "fail",
            "misbehave",
            "transform",
            "config = { mode = \"error\" }\nlimits = { timeout = \"5s\" }"
        ),
        endpoint(
            "trap",
            &bad.url("/"),
            "transforms = [\"trap\"]\nschedule = [\"0s\"]"
        ),
        endpoint(
            "loop",
            &bad.url("/"),
            "transforms = [\"loop\"]\nschedule = [\"0s\"]"
        ),
        endpoint(
            "burn",
            &bad.url("/"),
            "transforms = [\"burn\"]\nschedule = [\"0s\"]"
        ),
        endpoint(
            "hog",
            &bad.url("/"),
            "transforms = [\"hog\"]\nschedule = [\"0s\"]"
        ),
        endpoint(
            "fail",
            &bad.url("/"),
            "transforms = [\"fail\"]\nschedule = [\"0s\", \"50ms\"]"
        ),
        endpoint("ok", &good.url("/"), ""),
    ))
    .await;
    // Each with its time limit: 5 s for those whose failure is not a timeout, so that a
    // call held up by a loaded machine still fails its own way.
    let cases = [
        ("trap", "plugin_trap", 5_000),
        ("loop", "plugin_timeout", 50),
        // Sleeping on the WASI clock does not outlast the deadline either.
        ("sleep", "plugin_timeout", 50),
        ("burn", "plugin_fuel", 5_000),
        ("hog", "plugin_memory", 5_000),
        ("fail", "plugin_error", 5_000),
        // Headers a transform returns must be few and valid HTTP.
        ("many", "plugin_error", 5_000),
        ("badhdr", "plugin_error", 5_000),
    ];
    let mut ids = Vec::new();
    for (ep, _, _) in cases {
        // A healthy endpoint's delivery goes through meanwhile.
        c.send(json!({"event_type": "t", "payload": {"during": ep}, "endpoint": "ok"}))
            .await;
        let r = c
            .send(json!({"event_type": "t", "payload": {}, "endpoint": ep}))
            .await;
        ids.push(r["deliveries"][0]["id"].as_str().unwrap().to_string());
    }
    for ((ep, class, limit_ms), id) in cases.iter().zip(&ids) {
        let d = c.wait_status(id, "dead", T).await;
        let attempts = d["attempts"].as_array().unwrap();
        assert_eq!(attempts[0]["error"], *class, "{ep}: {d:#}");
        assert!(attempts[0]["status_code"].is_null());
        // Every failure, the sleeping plugin's included, ends the call within its limits
        // (with room for a loaded machine: the looping and sleeping plugins would run for
        // ever and for an hour).
        assert!(
            attempts[0]["duration_ms"].as_u64().unwrap() < limit_ms + 5_000,
            "{ep}: {d:#}"
        );
        assert!(
            attempts[0]["error_detail"].as_str().unwrap().contains(ep),
            "{d:#}"
        );
    }
    // The plugin that returned an error was retried on the schedule.
    let fail = &ids[cases.iter().position(|(ep, _, _)| *ep == "fail").unwrap()];
    let (_, fail) = c.get(&format!("/v1/deliveries/{fail}")).await;
    assert_eq!(fail["attempts"].as_array().unwrap().len(), 2);
    // Nothing was sent by the failing chains; the healthy endpoint got everything.
    assert!(bad.received().is_empty());
    assert_eq!(good.wait_for(cases.len(), T).await.len(), cases.len());
    let m = c.text("/metrics").await;
    for (ep, _, _) in cases {
        assert!(
            m.contains(&format!(
                "courier_plugin_calls_total{{plugin=\"{ep}\",result=\"error\"}}"
            )),
            "{ep}: {m}"
        );
    }
    c.stop().await;
}

/// A plugin that sets up a timer beyond its time limit and returns without waiting on it
/// has not run out of time: only a sleep cut short at the deadline, and waited out, is a
/// timeout.
#[tokio::test]
async fn a_timer_a_plugin_never_waits_on_is_no_timeout() {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        plugin_entry(
            "timer",
            "misbehave",
            "transform",
            "config = { mode = \"timer\" }\nlimits = { timeout = \"5s\" }"
        ),
        endpoint(
            "app",
            &rx.url("/"),
            "transforms = [\"timer\"]\nschedule = [\"0s\"]"
        ),
    ))
    .await;
    let r = c
        .send(json!({"event_type": "t", "payload": {"n": 1}}))
        .await;
    let d = c
        .wait_status(r["deliveries"][0]["id"].as_str().unwrap(), "delivered", T)
        .await;
    assert_eq!(d["attempts"][0]["error"], serde_json::Value::Null, "{d:#}");
    assert_eq!(rx.received()[0].json()["n"], 1);
    c.stop().await;
}

#[tokio::test]
async fn hot_reload_swaps_the_plugin_and_keeps_the_old_one_on_a_bad_file() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("live.wasm");
    std::fs::copy(plugin("redact"), &wasm).unwrap();
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}[[plugins]]\nname = \"live\"\npath = \"{}\"\nkind = \"transform\"\nconfig = {{ fields = \"secret\" }}\n{}",
        wasm.display(),
        endpoint("app", &rx.url("/"), "transforms = [\"live\"]"),
    ))
    .await;
    let send = |n: i64| c.send(json!({"event_type": "t.x", "payload": {"n": n, "secret": "s"}}));
    send(1).await;
    assert_eq!(rx.wait_for(1, T).await[0].json(), json!({"n": 1}));

    let replace = |from: &std::path::Path| {
        let tmp = dir.path().join("live.wasm.tmp");
        std::fs::copy(from, &tmp).unwrap();
        std::fs::rename(&tmp, &wasm).unwrap();
    };
    // Swap in a different component: the next delivery is enveloped instead of redacted.
    replace(&plugin("envelope"));
    let st = wait_plugin(&c, |p| p["version"] == 2).await;
    assert_eq!(st["loads_ok"], 2);
    send(2).await;
    let got = rx.wait_for(2, T).await;
    assert_eq!(got[1].json()["data"], json!({"n": 2, "secret": "s"}));
    assert_eq!(got[1].json()["type"], "t.x");

    // A corrupt file is refused; the previous version keeps serving.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"\0asm\x0d\0\x01\0 definitely not a component").unwrap();
    replace(&junk);
    let st = wait_plugin(&c, |p| p["loads_failed"] == 1).await;
    assert_eq!(st["version"], 2);
    assert!(
        st["last_error"].as_str().unwrap().contains("live.wasm"),
        "{st}"
    );
    send(3).await;
    assert_eq!(
        rx.wait_for(3, T).await[2].json()["data"],
        json!({"n": 3, "secret": "s"})
    );
    // Reported once: courier's own reads of the file are not taken for changes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, p) = c.get("/v1/plugins").await;
    assert_eq!(p["data"][0]["loads_failed"], 1, "{p}");
    let metrics = c.text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "courier_plugin_loads_total{plugin=\"live\",result=\"error\"} 1"),
        "{metrics}"
    );
    // The serving version put back: the error is over, nothing is reloaded.
    replace(&plugin("envelope"));
    let st = wait_plugin(&c, |p| p["last_error"].is_null()).await;
    assert_eq!(
        (st["version"].as_u64(), st["loads_failed"].as_u64()),
        (Some(2), Some(1))
    );

    // Removed: still serving the last good version. Re-added: loaded again.
    std::fs::remove_file(&wasm).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    send(4).await;
    assert_eq!(rx.wait_for(4, T).await[3].json()["type"], "t.x");
    std::fs::copy(plugin("redact"), dir.path().join("staging")).unwrap();
    std::fs::rename(dir.path().join("staging"), &wasm).unwrap();
    wait_plugin(&c, |p| p["version"] == 3).await;
    send(5).await;
    assert_eq!(rx.wait_for(5, T).await[4].json(), json!({"n": 5}));
    c.stop().await;
}

async fn wait_plugin(c: &Courier, pred: fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        let (_, p) = c.get("/v1/plugins").await;
        if pred(&p["data"][0]) {
            return p["data"][0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "plugin status never matched: {p:#}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_config_naming_a_broken_plugin_is_refused_whole() {
    let rx = Receiver::start().await;
    let good = format!("{DELIVERY_FAST}{}", endpoint("app", &rx.url("/"), ""));
    let c = Courier::start_file(&good).await;
    let junk = c.dir.path().join("broken.wasm");
    std::fs::write(&junk, b"not wasm").unwrap();
    c.rewrite_config(&format!(
        "{good}[[plugins]]\nname = \"broken\"\npath = \"{}\"\nkind = \"transform\"\n[[endpoints]]\nname = \"new\"\nurl = \"{}\"\ntransforms = [\"broken\"]\n",
        junk.display(),
        rx.url("/")
    ));
    let st = c.wait_config(|st| st["reloads_failed"] == 1).await;
    assert!(
        st["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("broken.wasm"),
        "{st}"
    );
    assert_eq!(
        st["endpoints"],
        json!(["app"]),
        "nothing of the new file was applied"
    );
    c.stop().await;
}

#[test]
fn check_loads_every_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("courier.toml");
    let run = |text: String| {
        std::fs::write(&cfg, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let ok = run(plugin_entry("redact", "redact", "transform", ""));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let wrong_kind = run(plugin_entry("r", "redact", "backoff", ""));
    assert!(!wrong_kind.status.success());
    assert!(
        String::from_utf8_lossy(&wrong_kind.stderr).contains("backoff-policy"),
        "{}",
        String::from_utf8_lossy(&wrong_kind.stderr)
    );
    std::fs::write(dir.path().join("bad.wasm"), b"garbage").unwrap();
    let bad =
        run("[[plugins]]\nname = \"bad\"\npath = \"bad.wasm\"\nkind = \"transform\"\n".into());
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad.wasm"));
    let missing =
        run("[[plugins]]\nname = \"gone\"\npath = \"gone.wasm\"\nkind = \"transform\"\n".into());
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("gone.wasm"));
}

#[tokio::test]
async fn the_readme_walkthrough_plugin_adds_a_header_and_a_field() {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        plugin_entry("uppercase", "uppercase-type", "transform", ""),
        endpoint("app", &rx.url("/"), "transforms = [\"uppercase\"]"),
    ))
    .await;
    c.send(json!({"event_type": "order.created", "payload": {"n": 1}}))
        .await;
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].header("x-event-type"), "order.created");
    assert_eq!(got[0].json(), json!({"n": 1, "kind": "ORDER.CREATED"}));
    sign::verify_mr(SECRET, &got[0].body, got[0].header("mr-signature")).unwrap();
    // A body that is not an object fails the attempt with the plugin's own error, not a trap.
    let r = c
        .send(json!({"event_type": "order.created", "payload": [1, 2]}))
        .await;
    let id = r["deliveries"][0]["id"].as_str().unwrap();
    let d = c
        .wait_delivery(id, T, |d| {
            d["attempts"].as_array().is_some_and(|a| !a.is_empty())
        })
        .await;
    let a = &d["attempts"][0];
    assert_eq!(a["error"], "plugin_error", "{d}");
    assert!(
        a["error_detail"]
            .as_str()
            .unwrap()
            .contains("the body is not a JSON object"),
        "{d}"
    );
    c.stop().await;
}

/// Courier with the endpoint `app` on `rx`, retried by `fixed-backoff` every `delay_ms`.
async fn with_fixed_backoff(rx: &Receiver, delay_ms: u64) -> Courier {
    Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        plugin_entry(
            "fixed",
            "fixed-backoff",
            "backoff",
            &format!("config = {{ delay_ms = {delay_ms}, max_attempts = 5 }}")
        ),
        endpoint("app", &rx.url("/"), "backoff = \"fixed\""),
    ))
    .await
}

#[tokio::test]
async fn a_backoff_plugin_never_retries_sooner_than_retry_after() {
    let rx = Receiver::start().await;
    rx.script([Reply::status(429).header("retry-after", "2")]);
    let c = with_fixed_backoff(&rx, 10).await;
    let r = c.send(json!({"event_type": "t", "payload": {}})).await;
    c.wait_status(r["deliveries"][0]["id"].as_str().unwrap(), "delivered", T)
        .await;
    let got = rx.received();
    assert_eq!(got.len(), 2);
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "Retry-After: 2 honoured, got {gap:?}"
    );
    c.stop().await;
}

/// A backoff plugin that answers "retry at once" after an attempt that sent nothing (its
/// transform failed: no circuit breaker counts that) is held to a second between attempts,
/// instead of looping as fast as plugin calls and commits go.
#[tokio::test]
async fn a_backoff_plugin_cannot_make_a_failing_transform_loop() {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}{}",
        plugin_entry(
            "fixed",
            "fixed-backoff",
            "backoff",
            "config = { delay_ms = 0, max_attempts = 3 }"
        ),
        plugin_entry(
            "fail",
            "misbehave",
            "transform",
            "config = { mode = \"error\" }"
        ),
        endpoint(
            "app",
            &rx.url("/"),
            "backoff = \"fixed\"\ntransforms = [\"fail\"]"
        ),
    ))
    .await;
    let r = c.send(json!({"event_type": "t", "payload": {}})).await;
    let d = c
        .wait_status(r["deliveries"][0]["id"].as_str().unwrap(), "dead", T)
        .await;
    let started: Vec<chrono::DateTime<chrono::FixedOffset>> = d["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| chrono::DateTime::parse_from_rfc3339(a["started_at"].as_str().unwrap()).unwrap())
        .collect();
    assert_eq!(started.len(), 3, "{d}");
    for w in started.windows(2) {
        let gap = (w[1] - w[0]).abs();
        assert!(
            gap >= chrono::Duration::milliseconds(990),
            "attempts {gap} apart: {d}"
        );
    }
    assert!(rx.received().is_empty());
    c.stop().await;
}

/// What a transform hands back is held to what configuration input is held to: a header
/// value over 8 KiB or a body over twice `server.max_body_bytes` fails the attempt as a
/// `plugin_error` instead of being sent (and retried) as it is; and its error text is kept
/// (in every attempt and the log) as one line of at most 4 KiB.
#[tokio::test]
async fn a_transforms_oversized_output_and_error_text_are_refused_or_cut() {
    let rx = Receiver::start().await;
    let mut config = DELIVERY_FAST.to_string();
    for mode in ["bigheader", "bigbody", "bigerror"] {
        config.push_str(&plugin_entry(
            mode,
            "misbehave",
            "transform",
            &format!("config = {{ mode = \"{mode}\" }}\nlimits = {{ timeout = \"5s\" }}"),
        ));
        config.push_str(&endpoint(
            mode,
            &rx.url("/"),
            &format!("transforms = [\"{mode}\"]\nschedule = [\"0s\"]"),
        ));
    }
    let c = Courier::start(&config).await;
    for (mode, says) in [
        (
            "bigheader",
            "`x-big` with a value of 16384 bytes; at most 8192",
        ),
        // 65,536 in the tests' configuration.
        ("bigbody", "a body of 200000 bytes; at most 131072"),
        (
            "bigerror",
            "misbehave: failing\\r\\nlevel=ERROR forged line xxx",
        ),
    ] {
        let r = c
            .send(json!({"event_type": "t", "payload": {}, "endpoint": mode}))
            .await;
        let d = c
            .wait_status(r["deliveries"][0]["id"].as_str().unwrap(), "dead", T)
            .await;
        let a = &d["attempts"][0];
        assert_eq!(a["error"], "plugin_error", "{mode}: {a}");
        let detail = a["error_detail"].as_str().unwrap();
        assert!(
            detail.contains(says),
            "{mode}: {}",
            &detail[..detail.len().min(300)]
        );
        assert!(!detail.contains(['\r', '\n']), "{mode}: one line");
        assert!(detail.len() < 5_000, "{mode}: {} bytes kept", detail.len());
    }
    assert!(rx.received().is_empty(), "nothing was sent");
    c.stop().await;
}

#[tokio::test]
async fn an_absurd_retry_after_holds_a_backoff_plugin_back_a_day() {
    let rx = Receiver::start().await;
    // Seconds whose milliseconds overflow 64 bits.
    rx.script([Reply::status(429).header("retry-after", "18446744073709552")]);
    let c = with_fixed_backoff(&rx, 1000).await;
    let r = c.send(json!({"event_type": "t", "payload": {}})).await;
    let id = r["deliveries"][0]["id"].as_str().unwrap().to_string();
    rx.wait_for(1, T).await;
    let deadline = std::time::Instant::now() + T;
    let next = loop {
        let (_, d) = c.get(&format!("/v1/deliveries/{id}")).await;
        if d["attempts"].as_array().is_some_and(|a| !a.is_empty()) {
            break d["next_attempt_at"].as_str().unwrap().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "{d}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let next = chrono::DateTime::parse_from_rfc3339(&next).unwrap();
    let wait = next.signed_duration_since(chrono::Utc::now());
    assert!(
        wait > chrono::Duration::hours(23) && wait <= chrono::Duration::hours(24),
        "next attempt in {wait}"
    );
    assert_eq!(rx.received().len(), 1);
    c.stop().await;
}

#[test]
fn more_calls_at_once_than_the_instance_pool_holds_wait_their_turn() {
    use courier::config::{PluginConfig, PluginKind};
    let metrics = std::sync::Arc::new(courier::observe::Metrics::new());
    let plugins = std::sync::Arc::new(courier::plugins::Plugins::default());
    let cfg = PluginConfig {
        name: "slow".into(),
        path: plugin("misbehave"),
        kind: PluginKind::Transform,
        config: [("mode".to_string(), "sleep".to_string())].into(),
        fuel: None,
        memory_bytes: None,
        timeout: Some(Duration::from_millis(300)),
    };
    plugins.load_all(&[cfg], &metrics).unwrap();
    // Each call sleeps until its time limit; 300 of them at once are more than the 256
    // instances the pool has.
    let calls: Vec<_> = (0..300)
        .map(|n| {
            let (plugins, metrics) = (plugins.clone(), metrics.clone());
            std::thread::spawn(move || {
                let out = courier::deliver::Outgoing {
                    url: "http://127.0.0.1/".parse().unwrap(),
                    headers: vec![],
                    body: b"{}".to_vec(),
                };
                let ctx = courier::plugins::TransformContext {
                    endpoint: "app".into(),
                    event_type: "t".into(),
                    event_id: format!("evt_{n}"),
                    timestamp: "0".into(),
                    max_body: 1 << 20,
                };
                plugins
                    .run_transforms(&metrics, &["slow".to_string()], out, &ctx)
                    .map(|_| ())
                    .map_err(|e| format!("{}: {e}", e.class()))
            })
        })
        .collect();
    for c in calls {
        let err = c.join().unwrap().unwrap_err();
        assert!(err.starts_with("plugin_timeout"), "{err}");
    }
}

#[test]
fn plugins_a_new_configuration_drops_stay_callable_until_it_is_live() {
    use courier::config::{PluginConfig, PluginKind};
    let entry = |name: &str, file: &str| PluginConfig {
        name: name.into(),
        path: plugin(file),
        kind: PluginKind::Transform,
        config: Default::default(),
        fuel: None,
        memory_bytes: None,
        timeout: None,
    };
    let metrics = courier::observe::Metrics::new();
    let plugins = courier::plugins::Plugins::default();
    let old = [entry("a", "redact")];
    let new = [entry("b", "envelope")];
    plugins.load_all(&old, &metrics).unwrap();
    // Loading the new set (before the new configuration is swapped in) keeps "a", which
    // the running configuration's endpoints still call.
    plugins.load_all(&new, &metrics).unwrap();
    assert!(plugins.get("a").is_some() && plugins.get("b").is_some());
    // Once the new configuration is live, "a" is no longer reported, but an attempt begun
    // under the old one may still call it for a while.
    plugins.forget_unconfigured(&new);
    let names: Vec<String> = plugins.status().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["b"]);
    assert!(plugins.get("a").is_some() && plugins.get("b").is_some());
    // Named again before it is unloaded: listed again, as it was.
    let both = [entry("a", "redact"), entry("b", "envelope")];
    plugins.load_all(&both, &metrics).unwrap();
    let listed: Vec<(String, u64)> = plugins
        .status()
        .into_iter()
        .map(|s| (s.name, s.loads_ok))
        .collect();
    assert_eq!(listed, [("a".to_string(), 1), ("b".to_string(), 1)]);
    plugins.retire_unconfigured(&both);
    assert!(plugins.get("a").is_some());
    // Dropped again.
    plugins.load_all(&new, &metrics).unwrap();
    plugins.forget_unconfigured(&new);
    // Then it is unloaded.
    plugins.retire_unconfigured(&new);
    assert!(plugins.get("a").is_none() && plugins.get("b").is_some());
    let names: Vec<String> = plugins.status().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["b"]);
}

/// Attempts a failing transform stopped before any request was made count as attempts, but
/// not in the latency figures, where their zero time would read as the fastest of all.
#[tokio::test]
async fn attempts_a_failing_plugin_stopped_stay_out_of_the_latency_figures() {
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        plugin_entry(
            "fail",
            "misbehave",
            "transform",
            "config = { mode = \"error\" }\nlimits = { timeout = \"5s\" }"
        ),
        endpoint(
            "errep",
            &rx.url("/"),
            "transforms = [\"fail\"]\nschedule = [\"0s\", \"10ms\", \"10ms\"]"
        ),
    ))
    .await;
    let r = c.send(json!({"event_type": "t", "payload": {}})).await;
    let id = r["deliveries"][0]["id"].as_str().unwrap();
    let d = c.wait_status(id, "dead", T).await;
    assert_eq!(d["attempt_count"], 3, "{d:#}");
    let (_, st) = c.get("/v1/stats?endpoint=errep").await;
    assert_eq!(st["attempts"], 3, "{st:#}");
    assert!(st["latency_ms"]["p50"].is_null(), "{st:#}");
    let m = c
        .metrics_with("courier_attempts_total{endpoint=\"errep\",outcome=\"dead\"} 1")
        .await;
    assert!(
        !m.contains("courier_attempt_duration_seconds_count{endpoint=\"errep\"}"),
        "{m}"
    );
    assert!(rx.received().is_empty());
    c.stop().await;
}
