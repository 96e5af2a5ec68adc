//! The operator CLI's edges against a running courier (or a server that is not one): timeouts,
//! what reaches the terminal, usage errors, replays, endpoints, idempotent sends, paging.

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::{args, out, run, run_within};
use crate::harness::*;

const T: Duration = Duration::from_secs(15);
const LIMIT: Duration = Duration::from_secs(30);

fn env_for(base: &str) -> Vec<(&'static str, String)> {
    vec![
        ("COURIER_URL", base.to_string()),
        ("COURIER_KEY", ADMIN.to_string()),
    ]
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A TCP server on 127.0.0.1 that accepts connections and, with `reply`, writes it once the
/// request has come and closes; without, never answers at all.
async fn raw_server(reply: Option<&'static [u8]>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            match reply {
                Some(r) => {
                    let mut buf = [0u8; 8192];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(r).await;
                    let _ = s.shutdown().await;
                }
                None => held.push(s),
            }
        }
    });
    (base, task)
}

/// The id of the (only) delivery of an ingest reply.
fn delivery_id(reply: &Value) -> String {
    reply["deliveries"][0]["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_answers_is_given_up_on_at_the_timeout() {
    let (base, task) = raw_server(None).await;
    let dir = tempfile::tempdir().unwrap();
    let payload = dir.path().join("payload.json");
    std::fs::write(&payload, b"{}").unwrap();
    let payload = payload.to_str().unwrap();
    for (cmd, path) in [
        (vec!["deliveries", "list"], "/v1/deliveries"),
        (vec!["deliveries", "show", "dlv_x"], "/v1/deliveries/dlv_x"),
        (vec!["dlq", "list", "--endpoint", "app"], "/v1/dlq"),
        (vec!["stats"], "/v1/stats"),
        (vec!["send", "--event-type", "t", payload], "/v1/events"),
    ] {
        let mut a = cmd.clone();
        a.extend(["--timeout", "1s"]);
        let started = Instant::now();
        let o = run_within(args(&a), env_for(&base), LIMIT).await;
        assert_eq!(o.status.code(), Some(1), "{cmd:?}: {o:?}");
        let err = stderr(&o);
        assert!(
            err.contains(&format!(
                "no answer from courier at {base}{path} within 1s (--timeout)"
            )),
            "{cmd:?}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{cmd:?}: {:?}",
            started.elapsed()
        );
    }
    // A timeout that cannot be one is a usage error.
    for t in ["0s", "soon"] {
        let o = run_within(args(&["stats", "--timeout", t]), env_for(&base), LIMIT).await;
        assert_eq!(o.status.code(), Some(2), "--timeout {t}: {o:?}");
        assert!(stderr(&o).contains("--timeout <DURATION>"), "{o:?}");
    }
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_from_a_receiver_or_a_server_reach_the_terminal_escaped() {
    let rx = Receiver::start().await;
    rx.set_default(Reply::status(500).body("boom\x1b[2J\there"));
    let c = Courier::with_endpoint("app", &rx.url("/"), "schedule = [\"0s\"]").await;
    let env = env_for(&c.base);
    let id = delivery_id(
        &c.send(json!({"event_type": "t", "payload": {"a": 1}, "endpoint": "app"}))
            .await,
    );
    c.wait_status(&id, "dead", T).await;
    let text = out(&run(args(&["deliveries", "show", &id]), env.clone(), None).await);
    assert!(!text.contains('\x1b') && !text.contains('\t'), "{text:?}");
    assert!(text.contains(r"boom\u{1b}[2J\u{9}here"), "{text}");

    // A request body with control characters in it (a raw ingest keeps it byte for byte).
    let (status, reply) = c
        .post(
            "/v1/ingest/app",
            Some(ADMIN),
            "hi\x1b]0;owned\x07\tthere\r\nnext line",
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    let id = delivery_id(&reply);
    c.wait_status(&id, "dead", T).await;
    let text = out(&run(args(&["deliveries", "show", &id]), env.clone(), None).await);
    assert!(!text.contains(['\x1b', '\x07', '\t', '\r']), "{text:?}");
    assert!(
        text.contains("hi\\u{1b}]0;owned\\u{7}\\u{9}there\\u{d}\nnext line"),
        "{text}"
    );
    // The JSON keeps the text as it is (escaped the JSON way).
    let js: Value = serde_json::from_str(&out(&run(
        args(&["deliveries", "show", "--json", &id]),
        env,
        None,
    )
    .await))
    .unwrap();
    assert_eq!(
        js["request"]["body"],
        "hi\x1b]0;owned\x07\tthere\r\nnext line"
    );

    // An error page from a server that is not courier: escaped, and cut at 200 characters.
    let other = Receiver::start().await;
    other.set_default(Reply::status(502).body(&format!("\x1b[31m{}", "x".repeat(1000))));
    let o = run(args(&["deliveries", "list"]), env_for(&other.url("")), None).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = stderr(&o);
    assert!(!err.contains('\x1b'), "{err:?}");
    assert!(
        err.contains(&format!(
            "502 Bad Gateway: \\u{{1b}}[31m{}…",
            "x".repeat(195)
        )) && !err.contains(&"x".repeat(196)),
        "{err}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_before_any_request_and_network_failures_1() {
    let other = Receiver::start().await;
    let env = env_for(&other.url(""));
    for (a, says) in [
        (
            vec!["deliveries", "list", "--status", "bogus"],
            "[possible values: pending, delivered, dead, dropped]",
        ),
        (vec!["deliveries", "list", "--limit", "0"], "1..=1000"),
        (vec!["dlq", "list", "--limit", "1001"], "1..=1000"),
        (vec!["endpoints", "list", "--limit", "0"], "1..=1000"),
        (
            vec!["dlq", "replay", "--endpoint", ""],
            "--endpoint is empty",
        ),
        (vec!["dlq", "replay", "--since", " "], "--since is empty"),
        (vec!["dlq", "replay"], "--all"),
        (
            vec!["dlq", "replay", "--all", "--endpoint", "app"],
            "cannot be used",
        ),
    ] {
        let o = run(args(&a), env.clone(), None).await;
        assert_eq!(o.status.code(), Some(2), "{a:?}: {o:?}");
        let err = stderr(&o);
        assert!(err.contains(says), "{a:?}: {err}");
    }
    assert_eq!(other.received().len(), 0, "no request was sent");
    // A valid status goes out as the API spells it.
    let o = run(
        args(&["deliveries", "list", "--status", "dropped"]),
        env,
        None,
    )
    .await;
    assert!(!o.status.success());
    assert!(other.received()[0].path.starts_with("/v1/deliveries"));
    // Nothing listening: a failure, not a usage error.
    let o = run(
        args(&["stats"]),
        env_for(&format!("http://127.0.0.1:{}", free_port())),
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains("cannot reach courier at"), "{o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_need_a_filter_or_all_and_say_what_they_skipped() {
    let bad = Receiver::start().await;
    bad.set_default(Reply::status(500));
    let c = Courier::with_endpoint("bad", &bad.url("/"), "schedule = [\"0s\"]").await;
    let env = env_for(&c.base);
    let (status, made) = c
        .post_json(
            "/v1/endpoints",
            &json!({"name": "gone", "url": bad.url("/"), "schedule": ["0s"]}),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let bad_id = delivery_id(
        &c.send(json!({"event_type": "t", "payload": {}, "endpoint": "bad"}))
            .await,
    );
    let gone_id = delivery_id(
        &c.send(json!({"event_type": "t", "payload": {}, "endpoint": "gone"}))
            .await,
    );
    c.wait_status(&bad_id, "dead", T).await;
    c.wait_status(&gone_id, "dead", T).await;
    let (status, _) = c
        .call(
            reqwest::Method::DELETE,
            "/v1/endpoints/gone",
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 200);

    // No filter: refused, nothing requeued.
    let o = run(args(&["dlq", "replay"]), env.clone(), None).await;
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains("no filter given") && err.contains("--all to requeue every one"),
        "{err}"
    );
    let (_, dlq) = c.get("/v1/dlq").await;
    assert_eq!(dlq["data"].as_array().unwrap().len(), 2, "{dlq}");

    // One delivery whose endpoint was deleted: a conflict, said so.
    let o = run(args(&["deliveries", "replay", &gone_id]), env.clone(), None).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains("409 Conflict: delivery")
            && err.contains("was deleted")
            && err.contains("(code conflict)"),
        "{err}"
    );

    // --all: the one that can go goes; the other is reported skipped.
    bad.set_default(Reply::status(200));
    let text = out(&run(args(&["dlq", "replay", "--all"]), env.clone(), None).await);
    assert_eq!(
        text,
        "requeued 1 dead deliveries\nskipped 1 whose endpoint was deleted (an endpoint made since under the same name is not their destination)\n"
    );
    c.wait_status(&bad_id, "delivered", T).await;
    // The JSON is the API's, untouched.
    let js: Value = serde_json::from_str(&out(&run(
        args(&["dlq", "replay", "--all", "--json"]),
        env,
        None,
    )
    .await))
    .unwrap();
    assert_eq!(
        js,
        json!({"requeued": 0, "deliveries": [], "deliveries_truncated": false, "skipped_deleted_endpoint": 1, "skipped_unreadable": 0})
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_replay_and_the_endpoints_commands() {
    let (ok, _bad, c) = crate::cli::ok_and_bad().await;
    let (status, made) = c
        .post_json(
            "/v1/endpoints",
            &json!({"name": "api-one", "url": ok.url("/"), "tenant": "acme", "event_types": ["order.*"]}),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let env = env_for(&c.base);
    let id = delivery_id(
        &c.send(json!({"event_type": "t", "payload": {}, "endpoint": "ok"}))
            .await,
    );
    c.wait_status(&id, "delivered", T).await;

    // endpoints list: table and JSON.
    let text = out(&run(args(&["endpoints", "list"]), env.clone(), None).await);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("URL"),
        "{text}"
    );
    let row = |name: &str| -> Vec<String> {
        let text = text.clone();
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row {name}: {text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        row("api-one")[..5],
        ["api-one", "api", "active", "acme", "order.*"]
    );
    assert_eq!(row("ok")[..5], ["ok", "config", "active", "-", "*"]);
    assert_eq!(row("bad")[1], "config");
    let js: Value = serde_json::from_str(&out(&run(
        args(&["endpoints", "list", "--json", "--tenant", "acme"]),
        env.clone(),
        None,
    )
    .await))
    .unwrap();
    assert_eq!(js["data"].as_array().unwrap().len(), 1, "{js}");
    assert_eq!(js["data"][0]["name"], "api-one");

    // pause: held, shown as paused; a replay then stays pending, and a second one conflicts.
    let text = out(&run(args(&["endpoints", "pause", "ok"]), env.clone(), None).await);
    assert_eq!(
        text,
        "paused endpoint ok: its deliveries wait until `courier endpoints resume ok`\n"
    );
    let text = out(&run(args(&["endpoints", "list"]), env.clone(), None).await);
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().take(3).eq(["ok", "config", "paused"])),
        "{text}"
    );
    let text = out(&run(args(&["deliveries", "replay", &id]), env.clone(), None).await);
    assert_eq!(
        text,
        format!("replayed delivery {id} to ok: a new round of attempts starts\n")
    );
    c.wait_status(&id, "pending", T).await;
    let o = run(args(&["deliveries", "replay", &id]), env.clone(), None).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains(&format!("409 Conflict: delivery `{id}` is pending"))
            && err.contains("(code conflict)"),
        "{err}"
    );
    let o = run(args(&["endpoints", "test", "ok"]), env.clone(), None).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        stderr(&o).contains("409 Conflict: endpoint `ok` is paused; resume it first (code paused)"),
        "{o:?}"
    );

    // resume: the replayed delivery goes.
    let text = out(&run(args(&["endpoints", "resume", "ok"]), env.clone(), None).await);
    assert_eq!(text, "resumed endpoint ok\n");
    c.wait_status(&id, "delivered", T).await;
    let (_, d) = c.get(&format!("/v1/deliveries/{id}")).await;
    assert_eq!(d["attempt_count"], 2, "{d}");

    // test: the first attempt, and whether the endpoint took it.
    let o = run(args(&["endpoints", "test", "ok"]), env.clone(), None).await;
    let text = out(&o);
    assert!(
        text.starts_with("test event evt_")
            && text.contains("(delivered)")
            && text.contains("attempt 1: 200 in ")
            && text.contains(", accepted"),
        "{text}"
    );
    let js: Value = serde_json::from_str(&out(&run(
        args(&["endpoints", "test", "ok", "--json"]),
        env.clone(),
        None,
    )
    .await))
    .unwrap();
    assert_eq!(js["success"], true, "{js}");
    assert_eq!(ok.received().len(), 4);
    let o = run(args(&["endpoints", "test", "bad"]), env.clone(), None).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("attempt 1: 500 in ")
            && text.contains(", not accepted")
            && text.contains("response: nope"),
        "{text}"
    );
    assert!(
        stderr(&o).contains("endpoint `bad` did not accept the test event"),
        "{o:?}"
    );

    // An endpoint that is not there.
    let o = run(args(&["endpoints", "pause", "nosuch"]), env, None).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        stderr(&o).contains("404 Not Found: no endpoint `nosuch` (code not_found)"),
        "{o:?}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_tells_an_idempotent_repeat() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/"), "").await;
    let env = env_for(&c.base);
    let send = |extra: &'static [&'static str]| {
        let env = env.clone();
        async move {
            let mut a = vec!["send", "--event-type", "t", "--idempotency-key", "order-42"];
            a.extend(extra);
            run(args(&a), env, Some(br#"{"n": 1}"#.to_vec())).await
        }
    };
    let first = out(&send(&[]).await);
    assert!(first.starts_with("accepted event evt_"), "{first}");
    let evt = first.lines().next().unwrap().rsplit(' ').next().unwrap();
    let again = out(&send(&[]).await);
    assert!(
        again.starts_with(&format!("already accepted (idempotent replay): {evt}\n")),
        "{again}"
    );
    assert!(again.contains("-> app"), "{again}");
    let js: Value = serde_json::from_str(&out(&send(&["--json"]).await)).unwrap();
    assert_eq!(
        (&js["id"], &js["idempotent_replayed"]),
        (&json!(evt), &json!(true))
    );
    // A first acceptance has no such field.
    let o = run(
        args(&["send", "--json", "--event-type", "t"]),
        env,
        Some(b"{}".to_vec()),
    )
    .await;
    let js: Value = serde_json::from_str(&out(&o)).unwrap();
    assert!(js.get("idempotent_replayed").is_none(), "{js}");
    rx.wait_for(2, T).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identifiers_are_shown_whole_and_sent_back_as_given() {
    let rx = Receiver::start().await;
    let long = format!("{}-{}", "e".repeat(50), "f".repeat(49));
    assert_eq!(long.len(), 100);
    let c = Courier::with_endpoint(&long, &rx.url("/"), "").await;
    let env = env_for(&c.base);
    let id = delivery_id(
        &c.send(json!({"event_type": "t", "payload": {}, "endpoint": long}))
            .await,
    );
    c.wait_status(&id, "delivered", T).await;
    let text = out(&run(args(&["deliveries", "list"]), env.clone(), None).await);
    let shown = text
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap();
    assert_eq!(shown, long, "{text}");
    // What is shown can be pasted back.
    let text = out(&run(
        args(&["deliveries", "list", "--endpoint", shown]),
        env.clone(),
        None,
    )
    .await);
    assert!(text.contains(&id), "{text}");

    // An id is one path segment, whatever it holds.
    for weird in ["a b", "a+b", "x/y", "50%"] {
        let o = run(args(&["deliveries", "show", weird]), env.clone(), None).await;
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        let err = stderr(&o);
        assert!(
            err.contains(&format!(
                "404 Not Found: no delivery `{weird}` (code not_found)"
            )),
            "{weird}: {err}"
        );
    }
    let o = run(args(&["endpoints", "pause", "a b"]), env.clone(), None).await;
    assert!(stderr(&o).contains("no endpoint `a b`"), "{o:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_code_the_field_and_where_an_answer_broke_off() {
    let c = Courier::start(DELIVERY_FAST).await;
    let o = run(
        args(&["send", "--event-type", "t", "--id", "has space"]),
        env_for(&c.base),
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains("400 Bad Request: ") && err.contains("(code bad_request, field id)"),
        "{err}"
    );
    c.stop().await;
    // An answer cut short: which URL (without its query) it came from.
    let (base, task) = raw_server(Some(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"data\"",
    ))
    .await;
    let o = run_within(
        args(&["deliveries", "list", "--endpoint", "app"]),
        env_for(&base),
        LIMIT,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "cannot read courier's answer from {base}/v1/deliveries:"
        )) && !err.contains("endpoint=app"),
        "{err}"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_page_hint_keeps_the_filters_and_stats_say_what_the_window_covers() {
    let ok = Receiver::start().await;
    let bad = Receiver::start().await;
    bad.set_default(Reply::status(500));
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        endpoint("ok", &ok.url("/"), ""),
        endpoint("bad", &bad.url("/"), "schedule = [\"0s\"]")
    ))
    .await;
    let env = env_for(&c.base);
    // The oldest is dead; three delivered after it.
    let dead = delivery_id(
        &c.send(json!({"event_type": "t", "payload": {}, "endpoint": "bad"}))
            .await,
    );
    c.wait_status(&dead, "dead", T).await;
    let mut delivered = Vec::new();
    for _ in 0..3 {
        let id = delivery_id(
            &c.send(json!({"event_type": "t", "payload": {}, "endpoint": "ok"}))
                .await,
        );
        c.wait_status(&id, "delivered", T).await;
        delivered.push(id);
    }
    let text = out(&run(
        args(&[
            "deliveries",
            "list",
            "--status",
            "delivered",
            "--limit",
            "2",
        ]),
        env.clone(),
        None,
    )
    .await);
    let more = text
        .lines()
        .find_map(|l| l.strip_prefix("more: "))
        .unwrap_or_else(|| panic!("no hint: {text}"));
    assert_eq!(
        more,
        format!(
            "courier deliveries list --status delivered --limit 2 --cursor {}",
            delivered[1]
        )
    );
    let next: Vec<&str> = more.strip_prefix("courier ").unwrap().split(' ').collect();
    let text = out(&run(args(&next), env.clone(), None).await);
    assert!(
        text.contains(&delivered[0]) && !text.contains(&dead) && !text.contains("more:"),
        "the next page of the same list: {text}"
    );
    assert_eq!(text.lines().count(), 2, "{text}");

    let text = out(&run(args(&["stats"]), env, None).await);
    assert!(!text.starts_with("since"), "{text}");
    assert!(
        text.contains("deliveries (all time)     pending 0   delivered 3   dead 1")
            && text.contains("success rate (all time)   75.0%")
            && text.contains("attempts since ")
            && text.contains("\nattempts since ")
            && text.contains("\n  made 4   succeeded 75.0%   per delivery 1.00\n")
            && text.contains("\n  latency p50 "),
        "{text}"
    );
    c.stop().await;
}

/// Waits until `GET /v1/endpoints/{name}` answers `status`.
async fn wait_endpoint(c: &Courier, name: &str, status: u16) {
    let deadline = Instant::now() + T;
    while c.get(&format!("/v1/endpoints/{name}")).await.0 != status {
        assert!(
            Instant::now() < deadline,
            "`{name}` never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_show_tells_a_waiting_delivery_from_a_finished_one_whose_endpoint_is_gone() {
    let bad = Receiver::start().await;
    bad.set_default(Reply::status(500));
    let config = format!(
        "{DELIVERY_FAST}{}",
        endpoint("cfg", &bad.url("/"), "schedule = [\"0s\"]")
    );
    let c = Courier::start_file(&config).await;
    let env = env_for(&c.base);
    for name in ["api", "kept"] {
        let (status, made) = c
            .post_json(
                "/v1/endpoints",
                &json!({"name": name, "url": bad.url("/"), "schedule": ["0s"]}),
            )
            .await;
        assert_eq!(status, 201, "{made}");
    }
    let (status, v) = c.post_json("/v1/endpoints/kept/pause", &json!({})).await;
    assert_eq!(status, 200, "{v}");
    let send = |ep: &'static str| {
        let c = &c;
        async move {
            delivery_id(
                &c.send(json!({"event_type": "t", "payload": {}, "endpoint": ep}))
                    .await,
            )
        }
    };
    let (cfg_id, api_id, kept_id) = (send("cfg").await, send("api").await, send("kept").await);
    c.wait_status(&cfg_id, "dead", T).await;
    c.wait_status(&api_id, "dead", T).await;
    // Gone: the API endpoint deleted, the paused one deleted keeping its queue, the config one
    // taken out of the file.
    for path in ["/v1/endpoints/api", "/v1/endpoints/kept?pending=keep"] {
        let (status, v) = c
            .call(reqwest::Method::DELETE, path, Some(ADMIN), None)
            .await;
        assert_eq!(status, 200, "{v}");
    }
    c.rewrite_config(DELIVERY_FAST);
    wait_endpoint(&c, "cfg", 404).await;

    // A pending one waits for its endpoint.
    let text = out(&run(args(&["deliveries", "show", &kept_id]), env.clone(), None).await);
    assert!(
        text.contains("(its endpoint is not configured: the delivery waits for it)"),
        "{text}"
    );
    // A dead one does not wait for anything: it is not replayed while its endpoint is gone.
    for id in [&cfg_id, &api_id] {
        let text = out(&run(args(&["deliveries", "show", id]), env.clone(), None).await);
        assert!(
            !text.contains("waits for it")
                && text.contains("(its endpoint no longer exists: `courier deliveries replay` refuses it (409) unless the config file names an endpoint of that name again;"),
            "{text}"
        );
        let o = run(args(&["deliveries", "replay", id]), env.clone(), None).await;
        assert_eq!(o.status.code(), Some(1), "{o:?}");
        assert!(stderr(&o).contains("409 Conflict"), "{o:?}");
    }
    // As it says: the config file naming the endpoint again, the replay goes.
    bad.set_default(Reply::status(200));
    c.rewrite_config(&config);
    wait_endpoint(&c, "cfg", 200).await;
    let text = out(&run(args(&["deliveries", "replay", &cfg_id]), env.clone(), None).await);
    assert!(text.starts_with("replayed delivery"), "{text}");
    c.wait_status(&cfg_id, "delivered", T).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_list_tells_all_event_types_from_none() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("all", &rx.url("/"), "").await;
    let (status, made) = c
        .post_json(
            "/v1/endpoints",
            &json!({"name": "nothing", "url": rx.url("/"), "event_types": []}),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let env = env_for(&c.base);
    let text = out(&run(args(&["endpoints", "list"]), env.clone(), None).await);
    let types = |name: &str| -> String {
        text.lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row {name}: {text}"))
            .split_whitespace()
            .nth(4)
            .unwrap()
            .to_string()
    };
    assert_eq!(types("all"), "*", "{text}");
    assert_eq!(types("nothing"), "(none)", "{text}");
    let js: Value = serde_json::from_str(&out(&run(
        args(&["endpoints", "list", "--json"]),
        env,
        None,
    )
    .await))
    .unwrap();
    let of = |name: &str| {
        js["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap()["event_types"]
            .clone()
    };
    assert_eq!((of("all"), of("nothing")), (Value::Null, json!([])), "{js}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_for_a_name_that_is_no_endpoint_say_so_and_exit_1() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("ok", &rx.url("/"), "").await;
    let env = env_for(&c.base);
    let o = run(args(&["stats", "--endpoint", "nope"]), env.clone(), None).await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("endpoint nope: no such endpoint (never made, or deleted;")
            && text.contains("deliveries (all time)     pending 0")
            && text.lines().any(|l| l.split_whitespace().take(4).eq([
                "nope",
                "(no",
                "such",
                "endpoint)"
            ])),
        "{text}"
    );
    assert!(stderr(&o).contains("no endpoint `nope`"), "{o:?}");
    // --json: the API's answer as it is, and the same exit status.
    let o = run(
        args(&["stats", "--json", "--endpoint", "nope"]),
        env.clone(),
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let js: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(js["endpoints"][0]["endpoint_missing"], true, "{js}");
    // An endpoint that is there.
    let text = out(&run(args(&["stats", "--endpoint", "ok"]), env, None).await);
    assert!(
        text.starts_with("endpoint ok\n") && !text.contains("no such endpoint"),
        "{text}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_show_says_what_holds_a_pending_delivery_back() {
    let failing = Receiver::start().await;
    failing.set_default(Reply::status(500));
    let busy = Receiver::start().await;
    busy.set_default(Reply::status(503).header("retry-after", "600"));
    let c = Courier::start(&format!(
        r#"
[delivery]
allow_private_networks = true
jitter = 0.0
circuit_failures = 2
circuit_probe_interval = "10m"
{}{}"#,
        endpoint(
            "flaky",
            &failing.url("/"),
            "max_in_flight = 1\nschedule = [\"0s\", \"10ms\", \"10ms\", \"10ms\"]"
        ),
        endpoint(
            "busy",
            &busy.url("/"),
            "schedule = [\"0s\", \"1s\", \"1s\"]"
        ),
    ))
    .await;
    let env = env_for(&c.base);
    let flaky = delivery_id(
        &c.send(json!({"event_type": "t", "payload": {}, "endpoint": "flaky"}))
            .await,
    );
    let busy_id = delivery_id(
        &c.send(json!({"event_type": "t", "payload": {}, "endpoint": "busy"}))
            .await,
    );
    // Two failures open the circuit: the next attempt's time (10 ms later) passes, and the
    // delivery waits for the probe, ten minutes on.
    c.wait_delivery(&flaky, T, |d| d["attempt_count"] == 2)
        .await;
    let deadline = Instant::now() + T;
    while c.get("/v1/endpoints/flaky/stats").await.1["circuit"] != "open" {
        assert!(Instant::now() < deadline, "the circuit never opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let text = out(&run(args(&["deliveries", "show", &flaky]), env.clone(), None).await);
    assert!(
        text.lines()
            .any(|l| l.starts_with("next attempt ") && l.ends_with(" (held: see below)"))
            && text.contains("(held: its endpoint's circuit is open (2 failures in a row): courier sends it one probe attempt at a time"),
        "{text}"
    );
    // --json is the API's delivery, nothing added.
    let js: Value = serde_json::from_str(&out(&run(
        args(&["deliveries", "show", "--json", &flaky]),
        env.clone(),
        None,
    )
    .await))
    .unwrap();
    let (_, api) = c.get(&format!("/v1/deliveries/{flaky}")).await;
    assert_eq!(js, api);

    // A Retry-After hold, and a pause.
    c.wait_delivery(&busy_id, T, |d| d["attempt_count"] == 1)
        .await;
    let (_, st) = c.get("/v1/endpoints/busy/stats").await;
    let until = st["held_until"].as_str().expect("held").to_string();
    let text = out(&run(args(&["deliveries", "show", &busy_id]), env.clone(), None).await);
    assert!(
        text.contains(&format!(
            "(held until {until}: its endpoint answered 429 or 503 with Retry-After"
        )) && !text.contains("circuit is open")
            && !text.contains("paused"),
        "{text}"
    );
    out(&run(args(&["endpoints", "pause", "busy"]), env.clone(), None).await);
    let text = out(&run(args(&["deliveries", "show", &busy_id]), env.clone(), None).await);
    assert!(
        text.contains("(held: its endpoint is paused, until `courier endpoints resume busy`)"),
        "{text}"
    );
    c.stop().await;
}
