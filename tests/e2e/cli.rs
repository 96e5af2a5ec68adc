//! The operator CLI against a running courier, and `courier verify` on a captured webhook.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

const T: Duration = Duration::from_secs(15);

pub(crate) async fn run(
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    stdin: Option<Vec<u8>>,
) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
        cmd.args(&args)
            .env_remove("COURIER_URL")
            .env_remove("COURIER_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(data) = stdin {
            input.write_all(&data).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

pub(crate) fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

pub(crate) fn out(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// A courier with the endpoint `ok` on a receiver that answers 204 and `bad`, tried once,
/// on one that answers 500 "nope".
pub(crate) async fn ok_and_bad() -> (Receiver, Receiver, Courier) {
    let ok = Receiver::start().await;
    let bad = Receiver::start().await;
    bad.set_default(Reply::status(500).body("nope"));
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        endpoint("ok", &ok.url("/"), ""),
        endpoint("bad", &bad.url("/"), "schedule = [\"0s\"]")
    ))
    .await;
    (ok, bad, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_against_a_running_server() {
    let (ok, bad, c) = ok_and_bad().await;
    let env = vec![
        ("COURIER_URL", c.base.clone()),
        ("COURIER_KEY", ADMIN.to_string()),
    ];

    // send: payload from stdin, and from a file.
    let sent = out(&run(
        args(&["send", "--event-type", "order.created", "--endpoint", "ok"]),
        env.clone(),
        Some(br#"{"order": 1}"#.to_vec()),
    )
    .await);
    assert!(sent.starts_with("accepted event evt_"), "{sent}");
    assert!(sent.contains("-> ok"));
    let file = c.dir.path().join("payload.json");
    std::fs::write(&file, br#"{"order": 2}"#).unwrap();
    let sent = out(&run(
        args(&[
            "send",
            "--json",
            "--event-type",
            "order.created",
            "--endpoint",
            "bad",
            file.to_str().unwrap(),
        ]),
        env.clone(),
        None,
    )
    .await);
    let v: Value = serde_json::from_str(&sent).unwrap();
    let dead_id = v["deliveries"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(ok.wait_for(1, T).await[0].json(), json!({"order": 1}));
    c.wait_status(&dead_id, "dead", T).await;

    // deliveries list: table and JSON.
    let table = out(&run(args(&["deliveries", "list"]), env.clone(), None).await);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains(&dead_id) && table.contains("dead") && table.contains("delivered"),
        "{table}"
    );
    let js: Value = serde_json::from_str(&out(&run(
        args(&["deliveries", "list", "--json", "--status", "dead"]),
        env.clone(),
        None,
    )
    .await))
    .unwrap();
    assert_eq!(js["data"].as_array().unwrap().len(), 1);

    // deliveries show: the attempt timeline.
    let show = out(&run(args(&["deliveries", "show", &dead_id]), env.clone(), None).await);
    assert!(
        show.contains("500") && show.contains("nope") && show.contains(r#"{"order": 2}"#),
        "{show}"
    );

    // dlq list and replay.
    let dlq = out(&run(args(&["dlq", "list"]), env.clone(), None).await);
    assert!(dlq.contains(&dead_id), "{dlq}");
    bad.set_default(Reply::status(200));
    let replay = out(&run(
        args(&["dlq", "replay", "--endpoint", "bad"]),
        env.clone(),
        None,
    )
    .await);
    assert_eq!(replay.trim(), "requeued 1 dead deliveries");
    c.wait_status(&dead_id, "delivered", T).await;

    // stats.
    let stats = out(&run(args(&["stats"]), env.clone(), None).await);
    assert!(
        stats.contains("delivered 2") && stats.contains("ENDPOINT"),
        "{stats}"
    );
    let js: Value = serde_json::from_str(&out(&run(
        args(&["stats", "--json", "--endpoint", "ok"]),
        env.clone(),
        None,
    )
    .await))
    .unwrap();
    assert_eq!(js["counts"]["delivered"], 1);

    // Flags work as well as the environment; errors are clear and non-zero.
    let flagged = out(&run(
        args(&[
            "deliveries",
            "list",
            "--url",
            &c.base,
            "--token",
            ADMIN,
            "--json",
        ]),
        vec![],
        None,
    )
    .await);
    assert!(serde_json::from_str::<Value>(&flagged).is_ok());
    let denied = run(
        args(&["deliveries", "list", "--url", &c.base]),
        vec![],
        None,
    )
    .await;
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("COURIER_KEY"));
    let missing = run(
        args(&["deliveries", "show", "dlv_missing"]),
        env.clone(),
        None,
    )
    .await;
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    let bad_json = run(
        args(&["send", "--event-type", "t"]),
        env.clone(),
        Some(b"{oops".to_vec()),
    )
    .await;
    assert!(!bad_json.status.success());
    assert!(String::from_utf8_lossy(&bad_json.stderr).contains("not valid JSON"));
    c.stop().await;
}

#[tokio::test]
async fn verify_checks_a_captured_webhook() {
    let rx = Receiver::start().await;
    let c = Courier::with_endpoint("app", &rx.url("/hook"), "").await;
    c.send(json!({"event_type": "t", "payload": {"a": [1, 2]}}))
        .await;
    let r = &rx.wait_for(1, T).await[0];
    let mut capture = b"POST /hook HTTP/1.1\r\n".to_vec();
    for (k, v) in r.headers.iter() {
        capture.extend_from_slice(format!("{}: {}\r\n", k, v.to_str().unwrap()).as_bytes());
    }
    capture.extend_from_slice(b"\r\n");
    capture.extend_from_slice(&r.body);
    let good = run(
        args(&["verify", "--secret", SECRET]),
        vec![],
        Some(capture.clone()),
    )
    .await;
    let text = out(&good);
    assert!(
        text.contains("webhook-signature: valid") && text.contains("mr-signature: valid"),
        "{text}"
    );
    let other = courier::deliver::sign::generate_secret();
    let wrong = run(
        args(&["verify", "--secret", &other]),
        vec![],
        Some(capture.clone()),
    )
    .await;
    assert_eq!(wrong.status.code(), Some(1), "does not verify: exit 1");
    let text = String::from_utf8_lossy(&wrong.stdout);
    assert!(text.contains("INVALID"), "{text}");
    // Input that is not a webhook at all, or a file that is not there: exit 2.
    let junk = run(
        args(&["verify", "--secret", SECRET]),
        vec![],
        Some(b"no headers here".to_vec()),
    )
    .await;
    assert_eq!(junk.status.code(), Some(2), "{junk:?}");
    let missing = run(
        args(&["verify", "--secret", SECRET, "/nonexistent/capture.txt"]),
        vec![],
        None,
    )
    .await;
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    // A secret that cannot be one is a mistake in the command: exit 2, saying so.
    let bad_secret = run(
        args(&["verify", "--secret", "whsec_not!base64"]),
        vec![],
        Some(capture.clone()),
    )
    .await;
    assert_eq!(bad_secret.status.code(), Some(2), "{bad_secret:?}");
    assert!(
        String::from_utf8_lossy(&bad_secret.stderr).contains("--secret"),
        "{bad_secret:?}"
    );
    // A capture signed an hour ago: stale unless the timestamp check is off (a capture
    // verified later); the secret may come from the environment.
    let (id, ts, body) = ("msg_1", chrono::Utc::now().timestamp() - 3600, b"{\"a\":1}");
    let sigs = courier::deliver::sign::sign_all(&[SECRET.to_string()], id, ts, body);
    let mut old = format!(
        "webhook-id: {id}\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {}\r\nmr-signature: {}\r\n\r\n",
        sigs.webhook_signature, sigs.mr_signature
    )
    .into_bytes();
    old.extend_from_slice(body);
    let env = || vec![("COURIER_VERIFY_SECRET", SECRET.to_string())];
    let stale = run(args(&["verify"]), env(), Some(old.clone())).await;
    assert_eq!(stale.status.code(), Some(1), "{stale:?}");
    assert!(
        String::from_utf8_lossy(&stale.stdout).contains("seconds away from now"),
        "{stale:?}"
    );
    let later = run(args(&["verify", "--no-timestamp-check"]), env(), Some(old)).await;
    assert_eq!(later.status.code(), Some(0), "{later:?}");
    assert!(
        out(&later).contains("webhook-signature: valid"),
        "{later:?}"
    );
    let mut tampered = capture;
    tampered.extend_from_slice(b" ");
    let t = run(
        args(&["verify", "--secret", SECRET]),
        vec![],
        Some(tampered),
    )
    .await;
    assert!(!t.status.success());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_when_watching_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    let base = "[server]\nwatch = false\n";
    let first = format!("{DELIVERY_FAST}{}", endpoint("a", &rx.url("/"), ""));
    let path = dir.path().join("courier.toml");
    let text =
        |extra: &str| base_config(&dir.path().join("data"), extra).replacen("[server]\n", base, 1);
    std::fs::write(&path, text(&first)).unwrap();
    let p = Process::spawn(&path);
    let http = reqwest::Client::new();
    std::fs::write(
        &path,
        text(&format!("{first}{}", endpoint("b", &rx.url("/"), ""))),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, st) = get_json(&http, &format!("{}/v1/config/status", p.base)).await;
    assert_eq!(st["version"], 1, "not watched: nothing changes by itself");
    p.signal("HUP");
    let deadline = std::time::Instant::now() + T;
    loop {
        let (_, st) = get_json(&http, &format!("{}/v1/config/status", p.base)).await;
        if st["version"] == 2 {
            assert_eq!(st["endpoints"], json!(["a", "b"]));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn json_logs_are_one_object_per_line() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), DELIVERY_FAST);
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(
        stdout
            .next()
            .unwrap()
            .unwrap()
            .starts_with("courier listening on ")
    );
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    let mut lines = 0;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{v}"
        );
        lines += 1;
    }
    assert!(lines >= 2, "start and stop are logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_smoke_run_delivers_every_event() {
    let c = Courier::start(DELIVERY_FAST).await;
    let env = vec![
        ("COURIER_URL", c.base.clone()),
        ("COURIER_KEY", ADMIN.to_string()),
    ];
    let durable_dir = tempfile::tempdir().unwrap();
    let o = run(
        args(&[
            "bench",
            "--json",
            "-n",
            "300",
            "-c",
            "8",
            "-s",
            "512",
            "--durable-dir",
            durable_dir.path().to_str().unwrap(),
        ]),
        env.clone(),
        None,
    )
    .await;
    let r: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(r["accepted"], 300, "{r:#}");
    assert_eq!(r["errors"], 0);
    assert_eq!(r["errors_by_status"], json!({}), "{r:#}");
    assert!(r["first_error"].is_null(), "{r:#}");
    assert_eq!(r["delivered"], 300, "every event sent was delivered: {r:#}");
    assert_eq!(
        (&r["dead"], &r["missing"], &r["duplicates"]),
        (&json!(0), &json!(0), &json!(0)),
        "{r:#}"
    );
    assert_eq!(r["problems"], json!([]), "{r:#}");
    // No --pid: no memory figure (not this tool's own).
    assert!(r["peak_rss_kib"].is_null(), "{r:#}");
    // The client→receiver baseline has as many senders as producers (up to courier's
    // in-flight cap for the bench endpoint, 256).
    assert_eq!(r["baseline_send_concurrency"], 8, "{r:#}");
    assert!(r["accepted_per_sec"].as_f64().unwrap() > 0.0);
    assert!(r["delivered_per_sec"].as_f64().unwrap() > 0.0);
    assert!(r["latency"]["p99_ms"].as_f64().unwrap() >= r["latency"]["p50_ms"].as_f64().unwrap());
    assert!(
        r["baseline_202_per_sec"].as_f64().unwrap() > 0.0
            && r["baseline_send_per_sec"].as_f64().unwrap() > 0.0
    );
    assert!(r["accepted_vs_baseline"].as_f64().unwrap() > 0.0);
    // CPU figures: the tool's own always; courier's only for a process given with --pid
    // (none here); the bare server process's per request it answered.
    assert!(r["tool_cpu_us_per_event"].as_f64().unwrap() >= 0.0, "{r:#}");
    assert!(
        r["courier_cpu_us_per_event"].is_null()
            && r["courier_cpu_by_thread_us_per_event"].is_null(),
        "{r:#}"
    );
    assert!(
        r["baseline_202_process_cpu_us_per_request"]
            .as_f64()
            .unwrap()
            >= 0.0,
        "{r:#}"
    );
    assert!(
        r["baseline_durable_202_cpu_us_per_request"]
            .as_f64()
            .unwrap()
            >= 0.0,
        "{r:#}"
    );
    // The durable baseline kept its journal under --durable-dir, and removed it when done.
    assert_eq!(std::fs::read_dir(durable_dir.path()).unwrap().count(), 0);
    assert_eq!(r["backlog"], false);
    // Each 202 baseline — in the tool's process, in a process of its own
    // (`courier bench-server`) like courier, and that process made durable — is the mean of
    // a run before and a run after courier's, and courier's ratio is taken against that mean.
    let accepted = r["accepted_per_sec"].as_f64().unwrap();
    for (runs, mean, ratio) in [
        (
            "baseline_202_runs",
            "baseline_202_per_sec",
            "accepted_vs_baseline",
        ),
        (
            "baseline_202_process_runs",
            "baseline_202_process_per_sec",
            "accepted_vs_process_baseline",
        ),
        (
            "baseline_durable_202_runs",
            "baseline_durable_202_per_sec",
            "accepted_vs_durable_baseline",
        ),
    ] {
        let runs: Vec<f64> = r[runs]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert!(runs.len() == 2 && runs.iter().all(|&x| x > 0.0), "{r:#}");
        let mean = r[mean].as_f64().unwrap();
        assert!((mean - (runs[0] + runs[1]) / 2.0).abs() < 1e-6, "{r:#}");
        assert!(
            (r[ratio].as_f64().unwrap() - accepted / mean).abs() < 1e-9,
            "{r:#}"
        );
    }
    // The temporary endpoint is gone afterwards.
    let (_, eps) = c.get("/v1/endpoints").await;
    assert_eq!(eps["data"].as_array().unwrap().len(), 0, "{eps}");
    let (_, st) = c.get("/v1/stats").await;
    assert_eq!(st["counts"]["delivered"], 300);

    // A durable baseline kept in memory is not what durability costs on a disk: said so.
    if std::path::Path::new("/dev/shm").is_dir() {
        let o = run(
            args(&["bench", "-n", "50", "-c", "4", "--durable-dir", "/dev/shm"]),
            env.clone(),
            None,
        )
        .await;
        let text = out(&o);
        assert!(
            text.contains("durable 202 server") && text.contains("is in memory (tmpfs)"),
            "{text}"
        );
        // Without --pid, says how to get courier's memory instead of reporting its own.
        assert!(
            text.contains("peak RSS            not measured: give --pid"),
            "{text}"
        );
    }

    // Backlog mode: held, then drained; human output, with the CPU of the process given
    // (courier runs in this test's process).
    let pid = std::process::id().to_string();
    let o = run(
        args(&[
            "bench",
            "-n",
            "200",
            "-c",
            "8",
            "--backlog",
            "--no-baselines",
            "--pid",
            &pid,
        ]),
        env,
        None,
    )
    .await;
    let text = out(&o);
    assert!(
        text.contains("(200 accepted, 0 errors)")
            && text.contains("(200 delivered, 0 dead, 0 missing)")
            && text.contains("RSS with the backlog")
            && text.contains("MiB")
            && !text.contains("not measured")
            && text.contains("drained at")
            && text.contains("courier CPU ")
            && text.contains("courier CPU, drain")
            && text.contains("load tool CPU")
            && !text.contains("baseline"),
        "{text}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_with_a_durable_dir_that_is_not_a_directory_stops_before_sending() {
    let c = Courier::start(DELIVERY_FAST).await;
    let env = vec![
        ("COURIER_URL", c.base.clone()),
        ("COURIER_KEY", ADMIN.to_string()),
    ];
    let missing = tempfile::tempdir().unwrap().path().join("nowhere");
    let o = run(
        args(&[
            "bench",
            "-n",
            "5",
            "--durable-dir",
            missing.to_str().unwrap(),
        ]),
        env,
        None,
    )
    .await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--durable-dir") && err.contains("not a directory"),
        "{err}"
    );
    // Nothing was made on courier: no bench endpoint, no event.
    let (_, eps) = c.get("/v1/endpoints").await;
    assert_eq!(eps["data"].as_array().unwrap().len(), 0, "{eps}");
    // A directory no one can make anything in (/proc): stopped as early.
    let o = run(
        args(&["bench", "-n", "5", "--durable-dir", "/proc"]),
        vec![
            ("COURIER_URL", c.base.clone()),
            ("COURIER_KEY", ADMIN.to_string()),
        ],
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--durable-dir /proc: not writable"), "{err}");
    let (_, eps) = c.get("/v1/endpoints").await;
    assert_eq!(eps["data"].as_array().unwrap().len(), 0, "{eps}");
    let (_, st) = c.get("/v1/stats").await;
    assert_eq!(st["counts"]["pending"], 0, "{st}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_against_a_courier_that_refuses_loopback_says_why_at_once() {
    // The default delivery settings: private and loopback destinations are refused.
    let c = Courier::start("").await;
    let env = vec![
        ("COURIER_URL", c.base.clone()),
        ("COURIER_KEY", ADMIN.to_string()),
    ];
    let started = std::time::Instant::now();
    let o = run(
        args(&["bench", "-n", "5", "-c", "2", "--no-baselines"]),
        env,
        None,
    )
    .await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("allow_private_networks"), "{err}");
    // Not the default drain timeout of 300 s.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // The bench endpoint made before is gone all the same.
    let (_, eps) = c.get("/v1/endpoints").await;
    assert_eq!(eps["data"].as_array().unwrap().len(), 0, "{eps}");
    c.stop().await;
}

/// Runs `courier bench …` as [`run`] does, but kills it and fails the test if it has not
/// ended within `limit` (a tool that hangs must not hang the test suite).
pub(crate) async fn run_within(
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    limit: Duration,
) -> Output {
    tokio::task::spawn_blocking(move || {
        let child = bench_child(&args, env);
        wait_within(child, limit)
    })
    .await
    .unwrap()
}

fn bench_child(args: &[String], env: Vec<(&'static str, String)>) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
    cmd.args(args)
        .env_remove("COURIER_URL")
        .env_remove("COURIER_KEY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for `child` (its output read on threads of their own), killing it after `limit`.
fn wait_within(mut child: std::process::Child, limit: Duration) -> Output {
    use std::io::Read;
    let read = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "courier bench did not end within {limit:?}: {}",
                String::from_utf8_lossy(&stderr.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// A stand-in for courier's API, doing on demand what a real courier does only by accident:
/// never answer an ingest or its stats, deliver an event twice or never, report deliveries
/// dead. It makes the bench endpoint, delivers each accepted event's payload to its URL
/// `deliveries(seq)` times, and records the endpoints deleted.
struct FakeCourier {
    base: String,
    st: std::sync::Arc<Fake>,
    task: tokio::task::JoinHandle<()>,
}

struct Fake {
    ingest_hangs: bool,
    stats_hang: bool,
    dead: u64,
    deliveries: fn(u64) -> usize,
    endpoint: std::sync::Mutex<Option<(String, String)>>,
    ingests: std::sync::atomic::AtomicUsize,
    /// Accepted events never delivered: still queued, as courier's delete reports them.
    queued: std::sync::atomic::AtomicUsize,
    deleted: std::sync::Mutex<Vec<String>>,
}

impl Drop for FakeCourier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeCourier {
    async fn start(
        ingest_hangs: bool,
        stats_hang: bool,
        dead: u64,
        deliveries: fn(u64) -> usize,
    ) -> FakeCourier {
        use axum::http::{Method, StatusCode, Uri};
        use std::sync::atomic::Ordering;
        let st = std::sync::Arc::new(Fake {
            ingest_hangs,
            stats_hang,
            dead,
            deliveries,
            endpoint: Default::default(),
            ingests: Default::default(),
            queued: Default::default(),
            deleted: Default::default(),
        });
        let fake = st.clone();
        let http = reqwest::Client::new();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, body: axum::body::Bytes| {
                let (st, http) = (fake.clone(), http.clone());
                async move {
                    let path = uri.path().to_string();
                    let text = String::from_utf8_lossy(&body).to_string();
                    match (method, path.as_str()) {
                        (Method::POST, "/v1/endpoints") => {
                            let v: Value = serde_json::from_str(&text).unwrap();
                            *st.endpoint.lock().unwrap() = Some((
                                v["name"].as_str().unwrap().to_string(),
                                v["url"].as_str().unwrap().to_string(),
                            ));
                            (StatusCode::CREATED, v.to_string())
                        }
                        (Method::POST, "/v1/events") => {
                            st.ingests.fetch_add(1, Ordering::SeqCst);
                            if st.ingest_hangs {
                                std::future::pending::<()>().await;
                            }
                            // {"event_type":…,"endpoint":…,"payload":{…}}: the payload as sent.
                            let payload = text
                                .split_once("\"payload\":")
                                .unwrap()
                                .1
                                .strip_suffix('}')
                                .unwrap()
                                .to_string();
                            let seq: u64 = payload
                                .split_once("\"seq\":")
                                .unwrap()
                                .1
                                .chars()
                                .take_while(char::is_ascii_digit)
                                .collect::<String>()
                                .parse()
                                .unwrap();
                            let url = st.endpoint.lock().unwrap().clone().unwrap().1;
                            let times = (st.deliveries)(seq);
                            if times == 0 {
                                st.queued.fetch_add(1, Ordering::SeqCst);
                            }
                            tokio::spawn(async move {
                                for _ in 0..times {
                                    http.post(&url).body(payload.clone()).send().await.unwrap();
                                }
                            });
                            (StatusCode::ACCEPTED, json!({"id": "evt_fake"}).to_string())
                        }
                        (Method::GET, p) if p.ends_with("/stats") => {
                            if st.stats_hang {
                                std::future::pending::<()>().await;
                            }
                            (
                                StatusCode::OK,
                                json!({"counts": {"dead": st.dead}}).to_string(),
                            )
                        }
                        (Method::DELETE, p) => {
                            let name = p.trim_start_matches("/v1/endpoints/").to_string();
                            st.deleted.lock().unwrap().push(name.clone());
                            let queued = st.queued.load(Ordering::SeqCst);
                            (
                                StatusCode::OK,
                                json!({"deleted": name, "pending_dropped": queued}).to_string(),
                            )
                        }
                        _ => (StatusCode::NOT_FOUND, "{}".to_string()),
                    }
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeCourier { base, st, task }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("COURIER_URL", self.base.clone()),
            ("COURIER_KEY", ADMIN.to_string()),
        ]
    }

    /// The bench endpoint's name, once made.
    fn endpoint(&self) -> String {
        self.st
            .endpoint
            .lock()
            .unwrap()
            .clone()
            .expect("the bench endpoint was made")
            .0
    }

    fn deleted(&self) -> Vec<String> {
        self.st.deleted.lock().unwrap().clone()
    }
}

const BENCH_LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_each_event_once_and_fails_when_some_are_lost_or_dead() {
    // Event 0 comes three times (redeliveries), event 1 never, events 2 and 3 went dead
    // (courier's stats say 2), the rest once.
    let fake = FakeCourier::start(false, false, 2, |seq| match seq {
        0 => 3,
        1..=3 => 0,
        _ => 1,
    })
    .await;
    let o = run_within(
        args(&[
            "bench",
            "--json",
            "-n",
            "20",
            "-c",
            "2",
            "--no-baselines",
            "--drain-timeout",
            "2",
        ]),
        fake.env(),
        BENCH_LIMIT,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["accepted"], 20, "{r:#}");
    // Each event counted once: the redeliveries do not stand in for the lost one.
    assert_eq!(r["delivered"], 17, "{r:#}");
    assert_eq!(r["duplicates"], 2, "{r:#}");
    assert_eq!(r["dead"], 2, "{r:#}");
    assert_eq!(r["missing"], 1, "{r:#}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("3 of 20 accepted events were not delivered: 2 dead, 1 missing"),
        "{err}"
    );
    assert_eq!(r["problems"].as_array().unwrap().len(), 1, "{r:#}");
    assert_eq!(fake.deleted(), vec![fake.endpoint()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_ends_at_the_drain_timeout_with_nothing_delivered_and_stats_that_hang() {
    // Events accepted, never delivered, and the endpoint's stats never answer.
    let fake = FakeCourier::start(false, true, 0, |_| 0).await;
    let o = run_within(
        args(&[
            "bench",
            "-n",
            "5",
            "-c",
            "1",
            "--no-baselines",
            "--drain-timeout",
            "1",
        ]),
        fake.env(),
        BENCH_LIMIT,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("(5 accepted, 0 errors)")
            && text.contains("(0 delivered, ? dead, 5 missing)"),
        "{text}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("5 of 5 accepted events were not delivered")
            && err.contains("5 missing when the wait for deliveries ended (--drain-timeout 1 s)"),
        "{err}"
    );
    assert_eq!(fake.deleted(), vec![fake.endpoint()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_times_out_ingests_that_courier_never_answers() {
    let fake = FakeCourier::start(true, false, 0, |_| 1).await;
    let o = run_within(
        args(&[
            "bench",
            "--json",
            "-n",
            "3",
            "-c",
            "1",
            "--no-baselines",
            "--request-timeout",
            "1",
        ]),
        fake.env(),
        BENCH_LIMIT,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (&r["accepted"], &r["errors"]),
        (&json!(0), &json!(3)),
        "{r:#}"
    );
    assert_eq!(r["errors_by_status"], json!({"timeout": 3}), "{r:#}");
    assert!(
        r["first_error"].as_str().unwrap().contains("timed out"),
        "{r:#}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("3 of 3 events were not accepted (3 × timeout)"),
        "{err}"
    );
    assert_eq!(fake.deleted(), vec![fake.endpoint()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_removes_its_endpoint_when_interrupted() {
    for (signal, code) in [("INT", 130), ("TERM", 143)] {
        // Ingests that never end: the run is still going when the signal comes.
        let fake = FakeCourier::start(true, false, 0, |_| 1).await;
        let mut child = bench_child(
            &args(&["bench", "-n", "10", "-c", "2", "--no-baselines"]),
            fake.env(),
        );
        let started = std::time::Instant::now();
        while fake.st.ingests.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("courier bench ended before sending: {status:?}");
            }
            assert!(started.elapsed() < BENCH_LIMIT, "no event was ever sent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let kill = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let o = tokio::task::spawn_blocking(move || wait_within(child, BENCH_LIMIT))
            .await
            .unwrap();
        assert_eq!(o.status.code(), Some(code), "SIG{signal}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(&format!("interrupted by SIG{signal}")),
            "{err}"
        );
        assert_eq!(fake.deleted(), vec![fake.endpoint()], "SIG{signal}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_no_wait_deletes_its_endpoint_and_says_what_was_dropped_with_it() {
    // Nothing is delivered: every accepted event is still queued when the run ends.
    let fake = FakeCourier::start(false, false, 0, |_| 0).await;
    let o = run_within(
        args(&["bench", "-n", "5", "-c", "1", "--no-baselines", "--no-wait"]),
        fake.env(),
        BENCH_LIMIT,
    )
    .await;
    let text = out(&o);
    assert!(
        text.contains("(5 accepted, 0 errors)")
            && text.contains(
                "  dropped at exit     5 deliveries still queued, deleted with the bench endpoint"
            ),
        "{text}"
    );
    assert_eq!(fake.deleted(), vec![fake.endpoint()]);
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("stays"),
        "{o:?}"
    );

    // Against courier: nothing left behind that would fail and retry for hours.
    let c = Courier::start(DELIVERY_FAST).await;
    let o = run_within(
        args(&[
            "bench",
            "--json",
            "-n",
            "200",
            "-c",
            "8",
            "--no-baselines",
            "--no-wait",
        ]),
        vec![
            ("COURIER_URL", c.base.clone()),
            ("COURIER_KEY", ADMIN.to_string()),
        ],
        BENCH_LIMIT,
    )
    .await;
    let r: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(r["accepted"], 200, "{r:#}");
    assert!(r["delivered"].is_null(), "not awaited: {r:#}");
    let dropped = r["dropped_at_exit"].as_u64().expect("counted");
    let (_, eps) = c.get("/v1/endpoints").await;
    assert_eq!(eps["data"].as_array().unwrap().len(), 0, "{eps}");
    // An attempt in flight at the delete finishes (a success counts as delivered).
    let deadline = std::time::Instant::now() + T;
    let st = loop {
        let (_, st) = c.get("/v1/stats").await;
        let n = |s: &str| st["counts"][s].as_u64().unwrap();
        if n("delivered") + n("dropped") == 200 {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(st["counts"]["pending"], 0, "{st}");
    assert!(
        st["counts"]["dropped"].as_u64().unwrap() <= dropped,
        "{st} {r:#}"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_refused_events_by_status_and_fails() {
    let c = Courier::start(DELIVERY_FAST).await;
    // A token without the ingest scope: the endpoint is made, every event refused.
    let o = run_within(
        args(&["bench", "-n", "10", "-c", "2", "--no-baselines"]),
        vec![
            ("COURIER_URL", c.base.clone()),
            ("COURIER_KEY", ADMIN_ONLY.to_string()),
        ],
        BENCH_LIMIT,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("(0 accepted, 10 errors)")
            && text.contains("10 × 403; first: 403 Forbidden:")
            && text.contains("`ingest` scope"),
        "{text}"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("10 of 10 events were not accepted (10 × 403)"),
        "{err}"
    );
    // Bodies over max_body_bytes (65536 here).
    let o = run_within(
        args(&[
            "bench",
            "--json",
            "-n",
            "4",
            "-c",
            "2",
            "-s",
            "70000",
            "--no-baselines",
        ]),
        vec![
            ("COURIER_URL", c.base.clone()),
            ("COURIER_KEY", ADMIN.to_string()),
        ],
        BENCH_LIMIT,
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    // Refused with 413; courier may close the connection after that answer, and a request
    // that was going out on it then fails without one.
    assert_eq!(r["errors"], 4, "{r:#}");
    let causes = r["errors_by_status"].as_object().unwrap();
    assert!(
        causes["413"].as_u64().unwrap() >= 1
            && causes.keys().all(|k| k == "413" || k == "transport"),
        "{r:#}"
    );
    assert!(
        r["first_error"]
            .as_str()
            .unwrap()
            .starts_with("413 Payload Too Large"),
        "{r:#}"
    );
    // Nothing left behind on courier.
    let (_, eps) = c.get("/v1/endpoints").await;
    assert_eq!(eps["data"].as_array().unwrap().len(), 0, "{eps}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_refuses_runs_of_nothing_and_sizes_below_the_payload_s_own_fields() {
    let c = Courier::start(DELIVERY_FAST).await;
    let env = vec![
        ("COURIER_URL", c.base.clone()),
        ("COURIER_KEY", ADMIN.to_string()),
    ];
    for (flags, says) in [
        (vec!["-n", "0"], "'--events <EVENTS>': must be at least 1"),
        (
            vec!["-c", "0"],
            "'--concurrency <CONCURRENCY>': must be at least 1",
        ),
    ] {
        let mut a = vec!["bench", "--no-baselines"];
        a.extend(flags);
        let o = run_within(args(&a), env.clone(), BENCH_LIMIT).await;
        assert_eq!(o.status.code(), Some(2), "usage error: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{err}");
    }
    let min = courier::bench::min_size(100);
    let o = run_within(
        args(&[
            "bench",
            "--no-baselines",
            "-n",
            "100",
            "-s",
            &(min - 1).to_string(),
        ]),
        env.clone(),
        BENCH_LIMIT,
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "usage error: {o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "take {min} bytes with -n 100; give -s {min} or more"
        )),
        "{err}"
    );
    // Nothing was made on courier.
    let (_, eps) = c.get("/v1/endpoints").await;
    assert_eq!(eps["data"].as_array().unwrap().len(), 0, "{eps}");
    // The minimum itself runs, every payload that size.
    let o = run_within(
        args(&[
            "bench",
            "--json",
            "--no-baselines",
            "-n",
            "100",
            "-c",
            "4",
            "-s",
            &min.to_string(),
        ]),
        env,
        BENCH_LIMIT,
    )
    .await;
    let r: Value = serde_json::from_str(&out(&o)).unwrap();
    assert_eq!(
        (&r["size_bytes"], &r["delivered"]),
        (&json!(min), &json!(100)),
        "{r:#}"
    );
    c.stop().await;
}

#[tokio::test]
async fn serve_on_its_embedded_defaults_takes_sighup_without_ending() {
    assert!(
        std::net::TcpListener::bind("127.0.0.1:8080").is_ok(),
        "port 8080 is in use: this test runs courier on its embedded defaults, which listen there"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut p = Process::spawn_defaults(dir.path());
    assert_eq!(p.base, "http://127.0.0.1:8080");
    assert!(dir.path().join("courier-data").is_dir());
    let http = reqwest::Client::new();
    let ready = || async {
        http.get(format!("{}/readyz", p.base))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(ready().await, 200);
    // There is no config file to reload; the signal must not end the process either.
    p.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "SIGHUP ended courier"
    );
    assert_eq!(ready().await, 200);
    p.signal("TERM");
    assert!(p.wait_exit(Duration::from_secs(20)).success());
}

#[tokio::test]
async fn client_commands_refuse_an_empty_filter_and_an_answer_that_is_not_courier_s() {
    // Not courier: a web server that answers 200 with a page.
    let other = Receiver::start().await;
    other.set_default(Reply::status(200).body("<html>login</html>"));
    let env = vec![
        ("COURIER_URL", other.url("")),
        ("COURIER_KEY", ADMIN.to_string()),
    ];
    let o = run(args(&["deliveries", "list"]), env.clone(), None).await;
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not courier's JSON answer"), "{err}");
    // An unset variable must not widen a replay to every dead delivery.
    let o = run(args(&["dlq", "replay", "--endpoint", ""]), env, None).await;
    assert_eq!(o.status.code(), Some(2), "a usage error: {o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--endpoint is empty"), "{err}");
    assert!(other.received().len() == 1, "the replay was never sent");
}

/// A plugin file that failed to load is not compiled again while it stays the same, but
/// SIGHUP, which reloads every plugin file, tries it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_tries_again_a_plugin_file_that_failed_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("live.wasm");
    std::fs::copy(plugin("redact"), &wasm).unwrap();
    let cfg = write_config(
        dir.path(),
        &format!(
            "{DELIVERY_FAST}[[plugins]]\nname = \"live\"\npath = \"{}\"\nkind = \"transform\"\n",
            wasm.display()
        ),
    );
    let p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    let failed = || async {
        let (_, st) = get_json(&http, &format!("{}/v1/plugins", p.base)).await;
        st["data"][0]["loads_failed"].as_u64().unwrap_or(0)
    };
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"\0asm\x0d\0\x01\0 not a component").unwrap();
    std::fs::rename(&junk, &wasm).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while failed().await < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the bad file was never loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Looked at again (the poll, more events): not compiled again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(failed().await, 1);
    p.signal("HUP");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while failed().await < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not try the file again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
