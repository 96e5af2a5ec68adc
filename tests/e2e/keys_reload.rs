//! `[[keys]]` under config hot reload: a token taken out of the file stops working once the
//! new file is live, a token put in starts working, and a key's scopes change with it.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

/// A key that the first config file has and the second does not.
const OLD: &str = "test-old-rotating-token-01";
/// A key that only the second config file has.
const NEW: &str = "test-new-rotating-token-02";
/// A key that is ingest-only in the first file and admin-only in the second.
const CHANGED: &str = "test-scope-changing-token3";

fn key(token: &str, scopes: &str) -> String {
    format!("[[keys]]\ntoken = \"{token}\"\nscopes = [{scopes}]\n")
}

fn event(n: u32) -> String {
    json!({"event_type": "t", "payload": {"n": n}, "endpoint": "app"}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_key_stops_working_and_an_added_key_works_after_a_reload() {
    let rx = Receiver::start().await;
    let ep = endpoint("app", &rx.url("/hook"), "");
    let c = Courier::start_file(&format!(
        "{DELIVERY_FAST}{ep}{}{}",
        key(OLD, "\"ingest\", \"admin\""),
        key(CHANGED, "\"ingest\"")
    ))
    .await;

    // Before the reload: OLD works on ingest and admin routes, NEW is unknown, CHANGED may
    // ingest but not read the admin API.
    let (s, r) = c.post("/v1/events", Some(OLD), event(1)).await;
    assert_eq!(s, 202, "{r}");
    assert_eq!(c.get_as("/v1/deliveries", Some(OLD)).await.0, 200);
    let (s, e) = c.post("/v1/events", Some(NEW), event(0)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(c.post("/v1/events", Some(CHANGED), event(2)).await.0, 202);
    assert_eq!(c.get_as("/v1/deliveries", Some(CHANGED)).await.0, 403);

    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{ep}{}{}",
        key(NEW, "\"ingest\", \"admin\""),
        key(CHANGED, "\"admin\"")
    ));
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert_eq!(st["reloads_failed"], 0, "{st:#}");

    // After it: OLD is refused everywhere as an unknown token (401, not 403).
    let (s, e) = c.post("/v1/events", Some(OLD), event(0)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{e}"
    );
    let (s, e) = c.get_as("/v1/deliveries", Some(OLD)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    // NEW ingests and reads.
    let (s, r) = c.post("/v1/events", Some(NEW), event(3)).await;
    assert_eq!(s, 202, "{r}");
    let new_delivery = r["deliveries"][0]["id"].as_str().unwrap().to_string();
    let (s, d) = c
        .get_as(&format!("/v1/deliveries/{new_delivery}"), Some(NEW))
        .await;
    assert_eq!(s, 200, "{d}");
    // CHANGED lost ingest and gained admin.
    let (s, e) = c.post("/v1/events", Some(CHANGED), event(0)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{e}"
    );
    assert_eq!(c.get_as("/v1/deliveries", Some(CHANGED)).await.0, 200);

    // Only the accepted events (1, 2, 3) were delivered; the refused ones (0) never were.
    let got = rx.wait_for(3, T).await;
    let mut ns: Vec<u64> = got
        .iter()
        .map(|r| r.json()["n"].as_u64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, [1, 2, 3]);
    let (_, list) = c.get("/v1/deliveries?endpoint=app").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 3, "{list:#}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_removed_from_the_whole_file_text_is_refused_after_the_reload() {
    // The same through rewrite_config_text: the file's own key list loses INGEST_ONLY.
    let rx = Receiver::start().await;
    let ep = endpoint("app", &rx.url("/"), "");
    let c = Courier::start_file(&format!("{DELIVERY_FAST}{ep}")).await;
    assert_eq!(
        c.post("/v1/events", Some(INGEST_ONLY), event(1)).await.0,
        202
    );
    let data = c.dir.path().join("data");
    c.rewrite_config_text(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmax_body_bytes = 65536\n\n[[keys]]\ntoken = \"{ADMIN}\"\nscopes = [\"ingest\", \"admin\", \"callback\"]\n\n{DELIVERY_FAST}{ep}",
        data.display()
    ));
    c.wait_config(|st| st["version"] == 2).await;
    let (s, e) = c.post("/v1/events", Some(INGEST_ONLY), event(2)).await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{e}"
    );
    // ADMIN_ONLY went too.
    assert_eq!(c.get_as("/v1/deliveries", Some(ADMIN_ONLY)).await.0, 401);
    // The key that stayed still works.
    assert_eq!(c.post("/v1/events", Some(ADMIN), event(3)).await.0, 202);
    let got = rx.wait_for(2, T).await;
    let mut ns: Vec<u64> = got
        .iter()
        .map(|r| r.json()["n"].as_u64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, [1, 3]);
    c.stop().await;
}
