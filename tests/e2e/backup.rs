//! Online backup (`GET /v1/backup`, `courier backup`): taken from a running courier, it
//! restores to exactly what courier held when it was taken — endpoints, pending, delivered
//! and dead deliveries, idempotency keys — and nothing acknowledged after it.

use std::time::Duration;

use serde_json::{Value, json};

use crate::cli::{args, out, run};
use crate::harness::*;

const T: Duration = Duration::from_secs(20);

fn env_for(base: &str, token: &str) -> Vec<(&'static str, String)> {
    vec![
        ("COURIER_URL", base.to_string()),
        ("COURIER_KEY", token.to_string()),
    ]
}

async fn ingest(http: &reqwest::Client, base: &str, body: Value) -> (u16, Value, bool) {
    let resp = http
        .post(format!("{base}/v1/events"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let replayed = resp.headers().get("idempotent-replayed").is_some();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap(), replayed)
}

fn delivery_of(reply: &Value) -> String {
    reply["deliveries"][0]["id"].as_str().unwrap().to_string()
}

async fn status_of(http: &reqwest::Client, base: &str, id: &str) -> (u16, String) {
    let (s, d) = get_json(http, &format!("{base}/v1/deliveries/{id}")).await;
    (s, d["status"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_courier_runs_restores_what_it_held_then() {
    let rx = Receiver::start().await;
    rx.set_default(Reply::status(204));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        "[delivery]\nallow_private_networks = true\nschedule = [\"0s\"]\njitter = 0.0\n",
    );
    let mut p = Process::spawn(&cfg);
    let http = reqwest::Client::new();
    let base = p.base.clone();

    // An endpoint made through the API (kept in the database, not the file), a delivered
    // event, a dead one (the receiver says 410 Gone) and two held by a pause, one of them
    // with an idempotency key.
    let (s, e) = post_json(
        &http,
        &format!("{base}/v1/endpoints"),
        &json!({"name": "app", "url": rx.url("/hook")}),
    )
    .await;
    assert_eq!(s, 201, "{e}");
    let event = |n: u32| json!({"event_type": "t", "payload": {"n": n}, "endpoint": "app"});
    let (_, delivered, _) = ingest(&http, &base, event(1)).await;
    rx.wait_for(1, T).await;
    rx.script([Reply::status(410)]);
    let (_, dead, _) = ingest(&http, &base, event(2)).await;
    for (id, want) in [
        (delivery_of(&delivered), "delivered"),
        (delivery_of(&dead), "dead"),
    ] {
        let deadline = std::time::Instant::now() + T;
        while status_of(&http, &base, &id).await.1 != want {
            assert!(std::time::Instant::now() < deadline, "{id} never {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (s, e) = post_json(&http, &format!("{base}/v1/endpoints/app/pause"), &json!({})).await;
    assert_eq!(s, 200, "{e}");
    ingest(&http, &base, event(3)).await;
    let mut keyed_body = event(4);
    keyed_body["idempotency_key"] = "order-4".into();
    let (_, keyed, _) = ingest(&http, &base, keyed_body.clone()).await;

    // The backup, through the CLI, as an operator takes it.
    let saved = dir.path().join("saved.redb");
    let o = run(
        args(&["backup", "--out", saved.to_str().unwrap()]),
        env_for(&base, ADMIN),
        None,
    )
    .await;
    let said = out(&o);
    assert!(said.starts_with("backup saved to "), "{said}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the backup holds secrets");
    }
    let names = |d: &std::path::Path| -> Vec<String> {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert!(
        !names(dir.path()).iter().any(|n| n.ends_with(".part")),
        "{:?}",
        names(dir.path())
    );
    assert!(
        !names(&dir.path().join("data"))
            .iter()
            .any(|n| n.starts_with("courier.backup-")),
        "the data dir keeps no copy"
    );
    // Never over an existing file; never without an admin key.
    let o = run(
        args(&["backup", "--out", saved.to_str().unwrap()]),
        env_for(&base, ADMIN),
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists"));
    let o = run(
        args(&[
            "backup",
            "--out",
            dir.path().join("x.redb").to_str().unwrap(),
        ]),
        env_for(&base, INGEST_ONLY),
        None,
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("403"));
    assert!(!dir.path().join("x.redb").exists());
    assert!(!dir.path().join("x.redb.part").exists());

    // Acknowledged after the backup: not in it.
    let (_, after, _) = ingest(&http, &base, event(5)).await;
    let data = dir.path().join("data");
    let restore = |file: &std::path::Path| {
        args(&[
            "restore",
            "--data-dir",
            data.to_str().unwrap(),
            file.to_str().unwrap(),
        ])
    };
    // Not while courier runs; not from a file that is not a database.
    let o = run(restore(&saved), vec![], None).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already open"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A crash, so that the event after the backup is in the journal beside the database.
    p.kill9();
    let before = names(&data);
    let junk = dir.path().join("junk.redb");
    std::fs::write(&junk, b"not a database").unwrap();
    let o = run(restore(&junk), vec![], None).await;
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        names(&data),
        before,
        "a refused restore changed the data dir"
    );

    // Restore: the backup in place of the database file; what it replaces is kept aside.
    let said = out(&run(restore(&saved), vec![], None).await);
    assert!(said.starts_with("restored "), "{said}");
    let kept: Vec<String> = names(&data)
        .into_iter()
        .filter(|n| n.contains(".before-restore-"))
        .collect();
    assert_eq!(kept.len(), 3, "{kept:?}");
    for n in ["courier.redb", "courier.journal", "courier.journal2"] {
        assert!(
            kept.iter().any(|k| k.starts_with(&format!("{n}.before-"))),
            "{kept:?}"
        );
    }
    let p2 = Process::spawn(&cfg);
    let base = p2.base.clone();
    // Nothing was taken for a damaged journal.
    assert!(
        !names(&data).iter().any(|n| n.contains(".damaged-")),
        "{:?}",
        names(&data)
    );
    assert_eq!(
        status_of(&http, &base, &delivery_of(&delivered)).await,
        (200, "delivered".into())
    );
    assert_eq!(
        status_of(&http, &base, &delivery_of(&dead)).await,
        (200, "dead".into())
    );
    assert_eq!(
        status_of(&http, &base, &delivery_of(&after)).await.0,
        404,
        "an event acknowledged after the backup came back from the old journal"
    );
    // The idempotency key is kept: a retry gets the first answer and queues nothing.
    let (s, again, replayed) = ingest(&http, &base, keyed_body).await;
    assert_eq!((s, replayed), (202, true), "{again}");
    assert_eq!(again["id"], keyed["id"]);
    // The endpoint is back, still paused, with the two held deliveries; resumed, they go.
    let (s, ep) = get_json(&http, &format!("{base}/v1/endpoints/app")).await;
    assert_eq!((s, &ep["paused"]), (200, &json!(true)), "{ep}");
    let (s, e) = post_json(
        &http,
        &format!("{base}/v1/endpoints/app/resume"),
        &json!({}),
    )
    .await;
    assert_eq!(s, 200, "{e}");
    let got = rx.wait_for(4, T).await;
    let mut ns: Vec<u64> = got[2..]
        .iter()
        .map(|r| r.json()["n"].as_u64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, [3, 4]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rx.received().len(),
        4,
        "event 5 was delivered after the restore"
    );
}

/// The backup route takes an admin key and no parameters, and one backup at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backup_route_answers_a_database_file_to_admin_keys_only() {
    let c = Courier::start("").await;
    let (s, e) = c.get_as("/v1/backup", Some(INGEST_ONLY)).await;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, e) = c.get("/v1/backup?since=1").await;
    assert_eq!(s, 400, "{e}");
    let resp = c
        .http
        .get(format!("{}/v1/backup", c.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/octet-stream"
    );
    assert!(
        resp.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .contains(".redb")
    );
    let bytes = resp.bytes().await.unwrap();
    // A redb file starts with its magic number.
    assert!(bytes.starts_with(b"redb"), "{:?}", &bytes[..16]);
}

/// A backup holds the one-at-a-time lock until its download ends, however it ends: a second
/// is refused (`409`) while the first is being read, and taken once its client hung up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_backup_at_a_time_until_its_download_ends() {
    use futures_util::StreamExt;
    let c =
        Courier::start("[[endpoints]]\nname = \"held\"\nurl = \"https://example.com/h\"\n").await;
    let (s, e) = c.post_json("/v1/endpoints/held/pause", &json!({})).await;
    assert_eq!(s, 200, "{e}");
    // ~36 MiB of events: far more than the sockets between the two ends buffer, so the
    // first download cannot be over before the test has read it.
    let filler = "x".repeat(60_000);
    let sends = (0..600).map(|i| {
        let c = &c;
        let body = json!({"event_type": "t", "payload": {"i": i, "f": filler}, "endpoint": "held"});
        async move { c.post_json("/v1/events", &body).await.0 }
    });
    let statuses: Vec<u16> = futures_util::stream::iter(sends)
        .buffer_unordered(8)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    let get = || {
        c.http
            .get(format!("{}/v1/backup", c.base))
            .bearer_auth(ADMIN)
            .send()
    };
    let mut first = get().await.unwrap();
    assert_eq!(first.status().as_u16(), 200);
    // A little of it read, the rest not yet.
    assert!(!first.chunk().await.unwrap().unwrap().is_empty());
    let second = get().await.unwrap();
    assert_eq!(second.status().as_u16(), 409);
    // The first client hangs up: the lock goes with its download.
    drop(first);
    let deadline = std::time::Instant::now() + T;
    loop {
        let third = get().await.unwrap();
        if third.status().as_u16() == 200 {
            let bytes = third.bytes().await.unwrap();
            assert!(bytes.len() > 30_000_000, "{}", bytes.len());
            break;
        }
        assert_eq!(third.status().as_u16(), 409);
        assert!(
            std::time::Instant::now() < deadline,
            "the lock was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
