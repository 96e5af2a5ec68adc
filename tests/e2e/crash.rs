//! Process-level behaviour of the real binary: SIGKILL recovery, graceful shutdown, first
//! start without keys.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_nothing_that_was_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(
        dir.path(),
        &format!(
            r#"
[delivery]
allow_private_networks = true
schedule = ["0s", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms", "100ms"]
jitter = 0.0
circuit_probe_interval = "100ms"
{}"#,
            endpoint("app", &format!("http://127.0.0.1:{port}/h"), "")
        ),
    );
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();

    // Producers keep sending while the process is killed; only 202s count as accepted.
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_at = Instant::now() + Duration::from_millis(700);
    let mut producers = Vec::new();
    for w in 0..8 {
        let (http, url, accepted, killed) = (
            http.clone(),
            format!("{}/v1/events", p.base),
            accepted.clone(),
            killed.clone(),
        );
        producers.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < stop_at + Duration::from_secs(1) {
                i += 1;
                let body = json!({"event_type": "t", "payload": {"w": w, "i": i}}).to_string();
                match http.post(&url).bearer_auth(ADMIN).body(body).send().await {
                    Ok(r) if r.status() == 202 => {
                        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                        accepted
                            .lock()
                            .unwrap()
                            .push(v["id"].as_str().unwrap().to_string());
                    }
                    _ if killed.load(std::sync::atomic::Ordering::SeqCst) => break,
                    other => panic!("refused before the kill: {other:?}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    p.kill9();
    for t in producers {
        t.await.unwrap();
    }
    let accepted: HashSet<String> = accepted.lock().unwrap().iter().cloned().collect();
    assert!(
        accepted.len() >= 20,
        "only {} events accepted before the kill",
        accepted.len()
    );

    // Restart on the same data dir, then bring the receiver up.
    let p2 = Process::spawn(&cfg);
    let rx = Receiver::start_on(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: HashSet<String> = rx
            .received()
            .iter()
            .map(|r| r.header("webhook-id").to_string())
            .collect();
        if accepted.is_subset(&got) {
            break;
        }
        if Instant::now() > deadline {
            let missing = accepted.difference(&got).count();
            panic!(
                "{missing} of {} accepted events were never delivered",
                accepted.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The audit trail agrees: nothing accepted is missing or dead.
    let (_, stats) = get_json(&http, &format!("{}/v1/stats", p2.base)).await;
    assert_eq!(stats["counts"]["dead"], 0, "{stats}");
    drop(p2);
}

/// Creates the endpoint `app` (a receiver that is never reached) and pauses it, so that
/// nothing but appends reaches the writer.
async fn paused_endpoint(http: &reqwest::Client, base: &str) {
    for (path, body) in [
        (
            "/v1/endpoints",
            Some(json!({"name": "app", "url": "http://127.0.0.1:9/h"})),
        ),
        ("/v1/endpoints/app/pause", None),
    ] {
        let mut r = http.post(format!("{base}{path}")).bearer_auth(ADMIN);
        if let Some(b) = body {
            r = r.body(b.to_string());
        }
        let r = r.send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
}

/// Posts the event `payload` (with event type `t`) to the courier at `base`, which must
/// accept it; its 202 body.
async fn accepted(http: &reqwest::Client, base: &str, payload: Value) -> Value {
    let r = http
        .post(format!("{base}/v1/events"))
        .bearer_auth(ADMIN)
        .body(json!({"event_type": "t", "payload": payload}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

/// The delivery of the acknowledged event `reply` (its 202 body) is there, pending.
async fn assert_pending(http: &reqwest::Client, base: &str, reply: &Value, what: &str) {
    let id = reply["deliveries"][0]["id"].as_str().unwrap();
    let (status, d) = get_json(http, &format!("{base}/v1/deliveries/{id}")).await;
    assert_eq!(
        status, 200,
        "acknowledged event {what}: delivery {id} lost: {d}"
    );
    assert_eq!(d["status"], "pending", "{d}");
    assert_eq!(d["event_id"], reply["id"], "{d}");
}

/// One pending delivery per acknowledged event: at least `accepted`, and at most `slack` more
/// (those in flight at the kill may have been written without their producer hearing back).
async fn assert_pending_count(http: &reqwest::Client, base: &str, accepted: usize, slack: usize) {
    let (_, stats) = get_json(http, &format!("{base}/v1/stats")).await;
    let pending = stats["counts"]["pending"].as_u64().unwrap() as usize;
    assert!(
        (accepted..=accepted + slack).contains(&pending),
        "{pending} pending for {accepted} accepted: {stats}"
    );
}

/// With the endpoint paused nothing but appends reaches the writer, so every acknowledged
/// event is durable through the ingest journal alone when the process is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_appends_alone_keeps_every_acknowledged_event_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[delivery]\nallow_private_networks = true\n");
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    paused_endpoint(&http, &p.base).await;
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Value)>::new()));
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut producers = Vec::new();
    for w in 0..8 {
        let (http, url, accepted, killed) = (
            http.clone(),
            format!("{}/v1/events", p.base),
            accepted.clone(),
            killed.clone(),
        );
        producers.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("w{w}-{i}");
                let body = json!({"event_type": "t", "payload": {"i": i}, "idempotency_key": key})
                    .to_string();
                match http.post(&url).bearer_auth(ADMIN).body(body).send().await {
                    Ok(r) if r.status() == 202 => {
                        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                        accepted.lock().unwrap().push((key, v));
                    }
                    _ if killed.load(std::sync::atomic::Ordering::SeqCst) => break,
                    other => panic!("refused before the kill: {other:?}"),
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = http
        .get(format!("{}/metrics", p.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    let (commits, durable) = (
        metric("courier_store_commits_total "),
        metric("courier_store_durable_commits_total "),
    );
    assert!(
        commits > durable + 5.0,
        "appends should commit through the journal: {commits} commits, {durable} durable"
    );
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    p.kill9();
    for t in producers {
        t.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= 50, "only {} accepted", accepted.len());

    let p2 = Process::spawn(&cfg);
    for (key, first) in &accepted {
        assert_pending(&http, &p2.base, first, key).await;
    }
    // Their idempotency keys survived with them: a producer's retry gets the first answer.
    for (key, first) in accepted.iter().rev().take(20) {
        let r = http
            .post(format!("{}/v1/events", p2.base))
            .bearer_auth(ADMIN)
            .body(json!({"event_type": "t", "payload": {}, "idempotency_key": key}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let again: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(&again, first, "retry of {key} after the crash");
    }
    // And the counts agree: one pending delivery per event.
    assert_pending_count(&http, &p2.base, accepted.len(), 8).await;
    drop(p2);
}

/// Events without an idempotency key or a chosen id are answered as soon as the journal has
/// them, before the database does. Killed mid-ingest, with events big enough that the
/// journal's two files take several turns, courier must come back with every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_answers_from_the_journal_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[delivery]\nallow_private_networks = true\n");
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    paused_endpoint(&http, &p.base).await;
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // 48 KiB each: an 8 MiB lap every ~170 events.
    let filler = "x".repeat(48 * 1024);
    let mut producers = Vec::new();
    for _ in 0..16 {
        let (http, url, accepted, killed, filler) = (
            http.clone(),
            format!("{}/v1/events", p.base),
            accepted.clone(),
            killed.clone(),
            filler.clone(),
        );
        producers.push(tokio::spawn(async move {
            for i in 0.. {
                let body =
                    json!({"event_type": "t", "payload": {"i": i, "filler": filler}}).to_string();
                match http.post(&url).bearer_auth(ADMIN).body(body).send().await {
                    Ok(r) if r.status() == 202 => {
                        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
                        accepted.lock().unwrap().push(v);
                    }
                    _ if killed.load(std::sync::atomic::Ordering::SeqCst) => break,
                    other => panic!("refused before the kill: {other:?}"),
                }
            }
        }));
    }
    // Until the journal has gone round its two files at least once.
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted.lock().unwrap().len() < 600 {
        assert!(Instant::now() < deadline, "ingest too slow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    p.kill9();
    for t in producers {
        t.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let second = dir.path().join("data").join("courier.journal2");
    assert!(
        std::fs::metadata(&second).is_ok_and(|m| m.len() > 0),
        "the second journal file was never written"
    );

    let p2 = Process::spawn(&cfg);
    for first in &accepted {
        assert_pending(&http, &p2.base, first, "without a key").await;
    }
    // The start says it re-applied acknowledged events (the last run did not stop cleanly).
    assert!(replayed_records(&http, &p2.base).await > 0);
    // One pending delivery per event.
    assert_pending_count(&http, &p2.base, accepted.len(), 16).await;
    drop(p2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_attempt_finish() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    rx.script([Reply::status(200).delay(Duration::from_millis(1500))]);
    let cfg = write_config(
        dir.path(),
        &format!("{DELIVERY_FAST}{}", endpoint("app", &rx.url("/h"), "")),
    );
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/events", p.base))
        .bearer_auth(ADMIN)
        .body(json!({"event_type": "t", "payload": {}}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let id = v["deliveries"][0]["id"].as_str().unwrap().to_string();
    rx.wait_for(1, Duration::from_secs(10)).await;
    p.signal("TERM");
    let status = tokio::task::block_in_place(|| p.wait_exit(Duration::from_secs(15)));
    assert!(status.success(), "graceful exit: {status:?}");

    // After a restart the attempt is on record as delivered and was not repeated.
    let p2 = Process::spawn(&cfg);
    let (s, d) = get_json(&http, &format!("{}/v1/deliveries/{id}", p2.base)).await;
    assert_eq!(s, 200);
    assert_eq!(d["status"], "delivered", "{d:#}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 1);
    drop(p2);
}

/// Runs `courier serve --config cfg` until it prints its listening line (or exits), then
/// kills it: how it ended, and every line it printed.
fn serve_until_listening(cfg: &std::path::Path) -> (std::process::ExitStatus, Vec<String>) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut printed = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let done = line.starts_with("courier listening on ");
        printed.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    (child.wait().unwrap(), printed)
}

#[tokio::test]
async fn first_start_without_keys_creates_and_prints_one_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("courier.toml");
    std::fs::write(
        &cfg,
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\n",
    )
    .unwrap();
    let run = |cfg: &std::path::Path| serve_until_listening(cfg).1;
    let first = run(&cfg);
    let key = std::fs::read_to_string(dir.path().join("data/admin.key")).unwrap();
    assert!(
        first.iter().any(|l| l.contains(key.trim())),
        "first start prints the key: {first:?}"
    );
    // The data dir and what courier keeps in it are for courier's user only.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("data"), 0o700);
        for f in [
            "data/admin.key",
            "data/watch.key",
            "data/courier.redb",
            "data/courier.journal",
            "data/courier.journal2",
        ] {
            assert_eq!(mode(f), 0o600, "{f}");
        }
    }
    let second = run(&cfg);
    assert!(
        !second.iter().any(|l| l.contains(key.trim())),
        "the key is printed only once"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("data/admin.key")).unwrap(),
        key
    );
}

#[test]
fn a_first_start_that_fails_keeps_no_unshown_key_and_later_starts_say_where_the_key_is() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("courier.toml");
    let serve = |listen: &str| {
        std::fs::write(
            &cfg,
            format!("[server]\nlisten = \"{listen}\"\ndata_dir = \"data\"\n"),
        )
        .unwrap();
        serve_until_listening(&cfg)
    };
    // The port is taken: the first start fails after making its key, and takes it back.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (status, printed) = serve(&taken.local_addr().unwrap().to_string());
    assert!(!status.success(), "{printed:?}");
    let key_file = dir.path().join("data/admin.key");
    assert!(!key_file.exists(), "a key never shown is not kept");
    drop(taken);
    // The next start makes one and shows it; later ones say where it is.
    let (_, first) = serve("127.0.0.1:0");
    let key = std::fs::read_to_string(&key_file).unwrap();
    assert!(first.iter().any(|l| l.contains(key.trim())), "{first:?}");
    let (_, second) = serve("127.0.0.1:0");
    assert!(!second.iter().any(|l| l.contains(key.trim())), "{second:?}");
    assert!(
        second
            .iter()
            .any(|l| l.contains("using the all-scopes API key saved in") && l.contains("admin.key")),
        "{second:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    let cfg = write_config(
        dir.path(),
        &format!("{DELIVERY_FAST}{}", endpoint("app", &rx.url("/h"), "")),
    );
    let http = reqwest::Client::new();
    let body =
        json!({"event_type": "t", "payload": {"n": 1}, "idempotency_key": "once"}).to_string();
    let send = |base: String| {
        let (http, body) = (http.clone(), body.clone());
        async move { post_event(&http, &base, body).await }
    };
    let mut p = Process::spawn(&cfg);
    let first = send(p.base.clone()).await;
    rx.wait_for(1, Duration::from_secs(10)).await;
    // Kill only once the attempt's outcome is committed: a crash between the receiver's 204
    // and that commit rightly sends the delivery again after the restart (at least once),
    // which is not what this test is about.
    let id = first["deliveries"][0]["id"].as_str().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, d) = get_json(&http, &format!("{}/v1/deliveries/{id}", p.base)).await;
        if d["status"] == "delivered" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never delivered: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    p.kill9();
    let p2 = Process::spawn(&cfg);
    let again = send(p2.base.clone()).await;
    assert_eq!(first, again);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 1);
    drop(p2);
}

/// Opens a request to `base` that stops halfway through its body, and keeps it open; returns
/// once courier is reading that body (it answers the `expect: 100-continue` then), so that
/// the request is under way, however slowly this machine runs.
fn stalled_request(base: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(base.trim_start_matches("http://")).unwrap();
    s.write_all(
        format!(
            "POST /v1/events HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ADMIN}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\nexpect: 100-continue\r\n\r\n{{\"event_type\""
        )
        .as_bytes(),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).expect("courier answers 100 Continue");
        assert!(n > 0, "courier closed the stalled request");
        got.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&got);
    assert!(head.starts_with("HTTP/1.1 100"), "{head}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_stalls_does_not_hold_shutdown_and_a_second_signal_ends_it_at_once() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut patient = Process::spawn(&write_config(d1.path(), DELIVERY_FAST));
    let mut hurried = Process::spawn(&write_config(d2.path(), DELIVERY_FAST));
    let _s1 = stalled_request(&patient.base);
    let _s2 = stalled_request(&hurried.base);
    let started = Instant::now();
    patient.signal("TERM");
    hurried.signal("TERM");
    // A second signal ends it at once, with 130 (README). Sent once courier has taken the
    // first (it no longer accepts connections), so the two cannot be merged into one.
    let addr = hurried.base.trim_start_matches("http://").to_string();
    while std::net::TcpStream::connect(&addr).is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "courier still accepts connections after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hurried.signal("TERM");
    // The stalled request alone would hold it for its 10 s.
    let status = hurried.wait_exit(Duration::from_secs(8));
    assert_eq!(status.code(), Some(130), "second signal: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // One signal: the stalled request is given a while, then cut off, and courier exits as
    // a graceful stop does.
    let status = patient.wait_exit(Duration::from_secs(45));
    assert!(status.success(), "graceful exit: {status:?}");
}

/// The database's record format, as courier keeps it (`meta` table, key `format`).
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

fn set_format(db: &std::path::Path, format: Option<u64>) -> Option<u64> {
    use redb::ReadableTable;
    let db = redb::Database::create(db).unwrap();
    let txn = db.begin_write().unwrap();
    let before;
    {
        let mut meta = txn.open_table(META).unwrap();
        before = meta.get("format").unwrap().map(|v| v.value());
        if let Some(f) = format {
            meta.insert("format", f).unwrap();
        }
    }
    txn.commit().unwrap();
    before
}

/// Runs `courier serve` on `cfg`, which must exit with a failure before it serves; its
/// standard error.
fn refused_start(cfg: &std::path::Path) -> String {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["serve", "--config"])
        .arg(cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("courier started");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_from_a_newer_courier_is_refused_at_start_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let mut p = Process::spawn(&cfg);
    p.signal("TERM");
    assert!(p.wait_exit(Duration::from_secs(30)).success());
    let db = dir.path().join("data").join("courier.redb");
    let current = set_format(&db, None).expect("a new data dir records its format");
    // A later courier moved the data dir on to the next format.
    set_format(&db, Some(current + 1));

    let stderr = refused_start(&cfg);
    assert!(
        stderr.contains("written by a newer courier")
            && stderr.contains(&format!("record format {}", current + 1))
            && stderr.contains(&db.display().to_string()),
        "{stderr}"
    );
    assert_eq!(
        set_format(&db, None),
        Some(current + 1),
        "the format was changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_breaks_an_api_endpoint_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    let with_plugin = format!(
        "{DELIVERY_FAST}[[plugins]]\nname = \"redact\"\npath = \"{}\"\nkind = \"transform\"\nconfig = {{ fields = \"secret\" }}\n",
        plugin("redact").display()
    );
    let cfg = write_config(dir.path(), &with_plugin);
    let http = reqwest::Client::new();
    let p = Process::spawn(&cfg);
    let made = http
        .post(format!("{}/v1/endpoints", p.base))
        .bearer_auth(ADMIN)
        .body(json!({"name": "api-ep", "url": rx.url("/"), "transforms": ["redact"]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 201);
    p.signal("TERM");
    let mut p = p;
    assert!(p.wait_exit(Duration::from_secs(30)).success());

    // The plugin is gone from the file while courier was stopped.
    write_config(dir.path(), DELIVERY_FAST);
    let stderr = refused_start(&cfg);
    assert!(
        stderr.contains("api-ep") && stderr.contains("redact"),
        "{stderr}"
    );

    // Back with the plugin, it starts, and the endpoint delivers through its transform.
    write_config(dir.path(), &with_plugin);
    let p = Process::spawn(&cfg);
    post_event(
        &http,
        &p.base,
        json!({"event_type": "t", "payload": {"keep": 1, "secret": "x"}, "endpoint": "api-ep"})
            .to_string(),
    )
    .await;
    assert_eq!(
        rx.wait_for(1, Duration::from_secs(20)).await[0].json(),
        json!({"keep": 1})
    );
    drop(p);
}

/// When a start re-applying the journal is killed, counted from its start line.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// This long after it.
    After(Duration),
    /// Once the start has written this many bytes since (`wchar` in `/proc/<pid>/io`). The
    /// replay applies the journal's records in memory and writes nothing until its commit,
    /// so this lands in the commit's writes. At once where the count cannot be read.
    Written(u64),
}

/// What a start of `courier serve` killed during its journal replay printed before it died.
struct KilledStart {
    kill: Kill,
    /// How many records it said it was re-applying (`None`: it had nothing to re-apply).
    replaying: Option<u64>,
    /// Whether it said the replay was done (or that it listened) before it died.
    finished: bool,
    /// From reading its start line to the kill.
    killed_after: Duration,
    /// How many bytes it had written since its start line (at least) when it was killed, if
    /// known.
    written: Option<u64>,
    /// Every line it printed, for the failure messages.
    printed: Vec<String>,
}

/// Bytes the process `pid` has written so far (to files and pipes alike), if readable.
fn written_by(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))?
        .trim()
        .parse()
        .ok()
}

/// Starts `courier serve --config cfg` and kills it (SIGKILL) at `kill` after it logs that it
/// is re-applying the journal, or as soon as it listens should it have nothing to re-apply.
/// What it printed before the kill comes from the pipes it wrote to, read to their end.
fn start_killed_during_replay(cfg: &std::path::Path, kill: Kill) -> KilledStart {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // One thread per pipe, each sending every line: the log (JSON) and the listening line.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let readers: Vec<_> = [
        Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stdout.take().unwrap()),
    ]
    .into_iter()
    .map(|pipe| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        })
    })
    .collect();
    drop(tx);
    let message = |line: &str| -> Option<Value> {
        let v: Value = serde_json::from_str(line).ok()?;
        v["fields"]["message"]
            .is_string()
            .then(|| v["fields"].clone())
    };
    let starts_replay = |line: &str| {
        message(line).filter(|f| {
            f["message"]
                .as_str()
                .unwrap()
                .starts_with("re-applying acknowledged events from the ingest journal")
        })
    };
    let finishes = |line: &str| {
        line.starts_with("courier listening on ")
            || message(line).is_some_and(|f| {
                f["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("re-applied acknowledged events from the ingest journal")
            })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut printed = Vec::new();
    let mut replaying = None;
    let (mut seen, mut before) = (Instant::now(), None);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let (start, end) = (starts_replay(&line), finishes(&line));
                printed.push(line);
                if let Some(fields) = start {
                    replaying = Some(fields["records"].as_u64().unwrap_or_else(|| {
                        panic!("no record count in the start line: {printed:?}")
                    }));
                    (seen, before) = (Instant::now(), written_by(pid));
                    match kill {
                        Kill::After(delay) if !delay.is_zero() => std::thread::sleep(delay),
                        Kill::After(_) => {}
                        Kill::Written(bytes) => {
                            while let (Some(from), Some(now)) = (before, written_by(pid))
                                && now - from < bytes
                                && Instant::now() < deadline
                            {
                                std::thread::sleep(Duration::from_micros(100));
                            }
                        }
                    }
                    break;
                }
                if end {
                    break;
                }
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the start neither re-applied the journal nor listened ({e:?}): {printed:?}"
                );
            }
        }
    }
    let written = before.zip(written_by(pid)).map(|(from, now)| now - from);
    let _ = child.kill();
    let killed_after = seen.elapsed();
    let status = child.wait().unwrap();
    for r in readers {
        r.join().unwrap();
    }
    printed.extend(rx.try_iter());
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the start ended before it was killed ({status:?}): {printed:?}"
    );
    let finished = printed.iter().any(|l| finishes(l));
    KilledStart {
        kill,
        replaying,
        finished,
        killed_after,
        written,
        printed,
    }
}

/// A courier killed while it re-applies the journal after a crash, again and again at
/// different moments of the replay (applying the records, writing them out in its commit),
/// loses and duplicates nothing: the start after them has every acknowledged event once.
///
/// Each start is killed after it logs that it is re-applying the journal. A kill landed
/// mid-replay when the start died without saying the replay was done (nor listening) and the
/// next start had the same records to re-apply: the replay's commit had not happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_during_recovery_lose_and_duplicate_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[delivery]\nallow_private_networks = true\n");
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    paused_endpoint(&http, &p.base).await;
    // 5,000 events of ~1 KiB: ~6 MiB of journal, under one lap (8 MiB), so that all of it
    // is re-applied. The replay's cost goes by records more than bytes: ~200 ms in a debug
    // build, the last ~25 ms its commit (400 events of 16 KiB took ~70 ms), far more than the
    // time between the start's line and the kill, however loaded the machine (which slows
    // the replay as much).
    let filler = "x".repeat(1024);
    let sends = (0..5000).map(|i| accepted(&http, &p.base, json!({"i": i, "filler": filler})));
    let replies: Vec<Value> = futures_util::stream::iter(sends)
        .buffer_unordered(16)
        .collect()
        .await;
    p.kill9();

    let starts = tokio::task::block_in_place(|| {
        let begun = Instant::now();
        let mut starts: Vec<KilledStart> = Vec::new();
        let mut mid_replay = 0;
        // After two kills at once known to have landed mid-replay, these, later into it (a
        // kill past the replay's commit ends the series: nothing is left to re-apply).
        let ms = Duration::from_millis;
        let mut later = [
            Kill::Written(64 << 10),
            Kill::Written(4 << 20),
            Kill::After(ms(5)),
            Kill::After(ms(20)),
            Kill::After(ms(50)),
            Kill::After(ms(100)),
        ]
        .into_iter()
        .peekable();
        while starts.len() < 12 {
            let kill = match mid_replay {
                0 | 1 => Kill::After(Duration::ZERO),
                _ => later.next().unwrap_or(Kill::After(Duration::ZERO)),
            };
            let start = start_killed_during_replay(&cfg, kill);
            let records = start.replaying;
            if let Some(first) = starts.first() {
                // A kill changes nothing in the database: a replay is all or nothing.
                assert!(
                    records.is_none() || records == first.replaying,
                    "a start re-applies {records:?} records where the first had {:?}: {:?}",
                    first.replaying,
                    start.printed
                );
            } else {
                assert!(
                    records.is_some(),
                    "the first start after the crash had nothing to re-apply: {:?}",
                    start.printed
                );
            }
            if let Some(before) = starts.last()
                && !before.finished
                && records.is_some()
            {
                mid_replay += 1;
            }
            let done = records.is_none() || start.finished;
            starts.push(start);
            let enough = mid_replay >= 2
                && (later.peek().is_none() || begun.elapsed() > Duration::from_secs(120));
            if done || enough {
                break;
            }
        }
        starts
    });
    let records = starts[0].replaying.unwrap();
    let p2 = Process::spawn(&cfg);
    // Where the last kill landed: whether this start had the journal to re-apply still.
    let replayed = replayed_records(&http, &p2.base).await;
    // Everything the last killed start had to do, or nothing if it died past its commit.
    let last = starts.last().unwrap();
    let cut_short = last.replaying.is_some() && !last.finished;
    assert!(
        replayed == 0 || (cut_short && replayed == records),
        "the final start re-applied {replayed} records (the others {records}): {:?}",
        last.printed
    );
    // Kill i landed mid-replay when start i + 1 (or the final one) re-applied again.
    let landed: Vec<bool> = starts
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let next_replays = match starts.get(i + 1) {
                Some(next) => next.replaying.is_some(),
                None => replayed > 0,
            };
            s.replaying.is_some() && !s.finished && next_replays
        })
        .collect();
    let summary: Vec<String> = starts
        .iter()
        .zip(&landed)
        .map(|(s, landed)| {
            format!(
                "{:?}: killed {:.1?} after the start line, {} bytes written since: {}",
                s.kill,
                s.killed_after,
                s.written.map_or("?".to_string(), |w| w.to_string()),
                match (s.replaying, s.finished, landed) {
                    (None, _, _) => "nothing to re-apply",
                    (Some(_), _, true) => "killed mid-replay",
                    (Some(_), true, _) => "killed after the replay was done",
                    (Some(_), false, false) => "killed after the replay's commit",
                }
            )
        })
        .collect();
    eprintln!(
        "{records} records ({} events acknowledged) re-applied by each start; kills after its start line: {summary:#?}",
        replies.len()
    );
    assert!(
        landed.iter().filter(|l| **l).count() >= 2,
        "fewer than 2 kills landed mid-replay: {summary:#?}"
    );

    let checks = replies
        .iter()
        .map(|reply| assert_pending(&http, &p2.base, reply, "before the kills"));
    futures_util::stream::iter(checks)
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    assert_pending_count(&http, &p2.base, replies.len(), 0).await;
    drop(p2);
}

/// A second courier started on a data dir another one has open is refused before it
/// touches anything there, saying why; the first goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_courier_on_the_same_data_dir_is_refused_and_the_first_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[delivery]\nallow_private_networks = true\n");
    let p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    paused_endpoint(&http, &p.base).await;
    let send = || accepted(&http, &p.base, json!({}));
    let first = send().await;
    let data = dir.path().join("data");
    let journal = std::fs::read(data.join("courier.journal")).unwrap();
    let err = refused_start(&cfg);
    assert!(err.to_lowercase().contains("already open"), "{err}");
    assert_eq!(
        std::fs::read(data.join("courier.journal")).unwrap(),
        journal,
        "the second courier wrote to the first one's journal"
    );
    let second = send().await;
    for reply in [&first, &second] {
        assert_pending(&http, &p.base, reply, "with a second courier refused").await;
    }
}

/// A journal damaged in the middle (one byte flipped in an acknowledged record) costs that
/// record only: the next start re-applies every intact record after it and keeps copies of
/// the journal files for inspection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_damaged_in_the_middle_loses_only_the_damaged_event() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[delivery]\nallow_private_networks = true\n");
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    paused_endpoint(&http, &p.base).await;
    let filler = "x".repeat(16 * 1024);
    let mut replies = Vec::new();
    for i in 0..50 {
        replies.push(accepted(&http, &p.base, json!({"i": i, "filler": filler})).await);
    }
    p.kill9();
    let data = dir.path().join("data");
    let path = data.join("courier.journal");
    let mut bytes = std::fs::read(&path).unwrap();
    // Inside the 25th event's filler (50 records of ~16.5 KiB each, back to back).
    bytes[24 * 16_700 + 8_000] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();

    let p2 = Process::spawn(&cfg);
    let mut lost = 0;
    for reply in &replies {
        let id = reply["deliveries"][0]["id"].as_str().unwrap();
        let (status, _) = get_json(&http, &format!("{}/v1/deliveries/{id}", p2.base)).await;
        if status == 404 {
            lost += 1;
        }
    }
    assert_eq!(lost, 1, "only the damaged event is lost");
    assert_pending_count(&http, &p2.base, replies.len() - 1, 0).await;
    let copies: Vec<String> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".damaged-"))
        .collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    drop(p2);
}

/// How many acknowledged events the start of the courier at `base` re-applied from the
/// journal (`courier_store_journal_replayed_records`).
async fn replayed_records(http: &reqwest::Client, base: &str) -> u64 {
    let m = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix("courier_store_journal_replayed_records "))
        .unwrap_or_else(|| panic!("{m}"))
        .trim()
        .parse()
        .unwrap()
}
