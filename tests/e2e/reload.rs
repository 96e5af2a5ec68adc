//! Config hot reload under a running server.

use std::time::Duration;

use courier::deliver::sign;
use serde_json::json;

use crate::harness::*;

const T: Duration = Duration::from_secs(15);

#[tokio::test]
async fn adding_an_endpoint_delivers_to_it_without_restart() {
    let a = Receiver::start().await;
    let b = Receiver::start().await;
    let c = Courier::start_file(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("a", &a.url("/"), "")
    ))
    .await;
    let (s, _) = c
        .post_json(
            "/v1/events",
            &json!({"event_type": "t", "payload": {}, "endpoint": "b"}),
        )
        .await;
    assert_eq!(s, 422);
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{}{}",
        endpoint("a", &a.url("/"), ""),
        endpoint("b", &b.url("/"), "")
    ));
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert_eq!(st["endpoints"], json!(["a", "b"]));
    c.send(json!({"event_type": "t", "payload": {"to": "b"}, "endpoint": "b"}))
        .await;
    let got = b.wait_for(1, T).await;
    assert_eq!(got[0].json()["to"], "b");
    c.stop().await;
}

#[tokio::test]
async fn a_replaced_secret_signs_the_next_attempt() {
    let rx = Receiver::start().await;
    // Every attempt fails, retried every 3 s: the reload normally lands before the first
    // retry, and on a slow machine before a later one.
    rx.set_default(Reply::status(500));
    let schedule = "schedule = [\"0s\", \"3s\", \"3s\", \"3s\", \"3s\", \"3s\"]";
    let c = Courier::start_file(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("app", &rx.url("/"), schedule)
    ))
    .await;
    c.send(json!({"event_type": "t", "payload": {"n": 1}}))
        .await;
    let first = rx.wait_for(1, T).await;
    sign::verify_mr(SECRET, &first[0].body, first[0].header("mr-signature")).unwrap();
    // Rotate: the retry already scheduled is signed with the new secret only.
    let new_secret = sign::generate_secret();
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}[[endpoints]]\nname = \"app\"\nurl = \"{}\"\nsecrets = [\"{new_secret}\"]\n{schedule}\n",
        rx.url("/")
    ));
    c.wait_config(|st| st["version"] == 2).await;
    // The first attempt to arrive once the new config is in force.
    let applied = std::time::Instant::now();
    let deadline = applied + Duration::from_secs(20);
    let retry = loop {
        if let Some(r) = rx.received().into_iter().find(|r| r.at > applied) {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no retry after the reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(retry.header("webhook-id"), first[0].header("webhook-id"));
    sign::verify_mr(&new_secret, &retry.body, retry.header("mr-signature")).unwrap();
    assert!(sign::verify_mr(SECRET, &retry.body, retry.header("mr-signature")).is_err());
    let ts: i64 = retry.header("webhook-timestamp").parse().unwrap();
    sign::verify_standard(
        &new_secret,
        retry.header("webhook-id"),
        ts,
        &retry.body,
        retry.header("webhook-signature"),
        None,
    )
    .unwrap();
    c.stop().await;
}

#[tokio::test]
async fn removed_endpoint_keeps_its_queue_and_resumes_when_re_added() {
    let down = format!("http://127.0.0.1:{}/", free_port());
    let slow = "schedule = [\"0s\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\", \"300ms\"]";
    let c = Courier::start_file(&format!("{DELIVERY_FAST}{}", endpoint("app", &down, slow))).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let r = c
            .send(json!({"event_type": "t", "payload": {"i": i}}))
            .await;
        ids.push(r["deliveries"][0]["id"].as_str().unwrap().to_string());
    }
    c.rewrite_config(DELIVERY_FAST);
    c.wait_config(|st| st["version"] == 2).await;
    for id in &ids {
        let d = c
            .wait_delivery(id, T, |d| d["endpoint_missing"] == true)
            .await;
        assert_eq!(d["status"], "pending");
    }
    let (s, _) = c
        .post_json(
            "/v1/events",
            &json!({"event_type": "t", "payload": {}, "endpoint": "app"}),
        )
        .await;
    assert_eq!(s, 422, "a removed endpoint takes no new events");
    let m = c.text("/metrics").await;
    assert!(m.contains("courier_queue_depth{endpoint=\"app\"} 5"), "{m}");
    // Time passes with the endpoint gone: the queued deliveries are not attempted.
    let before: Vec<u64> = futures_attempts(&c, &ids).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        futures_attempts(&c, &ids).await,
        before,
        "no attempts while the endpoint is missing"
    );

    // It comes back, now reachable: everything queued is delivered.
    let rx = Receiver::start().await;
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("app", &rx.url("/"), slow)
    ));
    c.wait_config(|st| st["version"] == 3).await;
    for id in &ids {
        let d = c.wait_status(id, "delivered", T).await;
        assert_eq!(d["endpoint_missing"], false);
    }
    assert_eq!(rx.received().len(), 5);
    c.stop().await;
}

async fn futures_attempts(c: &Courier, ids: &[String]) -> Vec<u64> {
    let mut out = Vec::new();
    for id in ids {
        let (_, d) = c.get(&format!("/v1/deliveries/{id}")).await;
        out.push(d["attempt_count"].as_u64().unwrap());
    }
    out
}

#[tokio::test]
async fn an_invalid_file_changes_nothing_and_is_reported() {
    let rx = Receiver::start().await;
    let good = format!("{DELIVERY_FAST}{}", endpoint("app", &rx.url("/"), ""));
    let c = Courier::start_file(&good).await;
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("app", "ftp://nowhere", "")
    ));
    let st = c.wait_config(|st| st["reloads_failed"] == 1).await;
    assert_eq!(st["version"], 1);
    let msg = st["last_error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("courier.toml") && msg.contains("endpoints[0].url"),
        "{msg}"
    );
    // The old configuration keeps serving.
    c.send(json!({"event_type": "t", "payload": {}})).await;
    rx.wait_for(1, T).await;
    assert!(
        c.text("/metrics")
            .await
            .contains("courier_config_reloads_total{result=\"error\"} 1")
    );

    // A syntax error names the line.
    c.rewrite_config_text("[server\nlisten = 1\n");
    let st = c.wait_config(|st| st["reloads_failed"] == 2).await;
    let msg = st["last_error"]["message"].as_str().unwrap();
    assert!(msg.contains("line 1"), "{msg}");

    // Fixing the file applies it and clears the error.
    c.rewrite_config(&good);
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert!(st["last_error"].is_null());
    assert!(
        c.text("/metrics")
            .await
            .contains("courier_config_reloads_total{result=\"ok\"} 1")
    );
    c.stop().await;
}

#[tokio::test]
async fn plugins_and_workflows_added_by_a_reload_take_effect() {
    let rx = Receiver::start().await;
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(r#"{"answer": 42}"#));
    let first = format!("{DELIVERY_FAST}{}", endpoint("app", &rx.url("/"), ""));
    let c = Courier::start_file(&first).await;
    let (s, _) = c
        .post_json("/v1/ai/async", &json!({"workflow": "ask"}))
        .await;
    assert_eq!(s, 422, "no such workflow yet");
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}[[plugins]]\nname = \"redact\"\npath = \"{}\"\nkind = \"transform\"\nconfig = {{ fields = \"secret\" }}\n{}[[workflows]]\nname = \"ask\"\nupstream = {{ url = \"{}\" }}\nendpoint = \"app\"\n",
        plugin("redact").display(),
        endpoint("app", &rx.url("/"), "transforms = [\"redact\"]"),
        upstream.url("/v1")
    ));
    c.wait_config(|st| st["version"] == 2).await;
    // The new transform applies to the next delivery.
    c.send(json!({"event_type": "t", "payload": {"keep": 1, "secret": "x"}}))
        .await;
    assert_eq!(rx.wait_for(1, T).await[0].json(), json!({"keep": 1}));
    // The new workflow runs.
    let (s, r) = c
        .post_json("/v1/ai/async", &json!({"workflow": "ask", "q": "?"}))
        .await;
    assert_eq!(s, 202, "{r}");
    let got = rx.wait_for(2, T).await;
    assert_eq!(got[1].json()["data"], json!({"answer": 42}));
    // Removing them again: the workflow is gone, deliveries are no longer transformed.
    c.rewrite_config(&first);
    c.wait_config(|st| st["version"] == 3).await;
    let (s, _) = c
        .post_json("/v1/ai/async", &json!({"workflow": "ask"}))
        .await;
    assert_eq!(s, 422);
    c.send(json!({"event_type": "t", "payload": {"keep": 2, "secret": "y"}}))
        .await;
    assert_eq!(
        rx.wait_for(3, T).await[2].json(),
        json!({"keep": 2, "secret": "y"})
    );
    c.stop().await;
}

#[tokio::test]
async fn a_config_rejected_for_a_missing_plugin_file_applies_once_the_file_arrives() {
    let rx = Receiver::start().await;
    let c = Courier::start_file(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("app", &rx.url("/"), "")
    ))
    .await;
    let (_, first) = c.get("/v1/config/status").await;
    let plugins = tempfile::tempdir().unwrap();
    let wasm = plugins.path().join("redact.wasm");
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}[[plugins]]\nname = \"redact\"\npath = \"{}\"\nkind = \"transform\"\nconfig = {{ fields = \"secret\" }}\n{}",
        wasm.display(),
        endpoint("app", &rx.url("/"), "transforms = [\"redact\"]"),
    ));
    let st = c.wait_config(|st| st["reloads_failed"] == 1).await;
    assert_eq!(st["version"], 1);
    // The status keeps describing the configuration that runs.
    assert_eq!(st["sha256"], first["sha256"]);
    assert!(
        st["last_error"]["message"]
            .as_str()
            .unwrap()
            .contains("redact.wasm"),
        "{st}"
    );
    // The plugin file arrives (written aside and renamed in, as a deploy would): the same
    // configuration file is tried again and applies.
    let tmp = plugins.path().join(".redact.wasm.tmp");
    std::fs::copy(plugin("redact"), &tmp).unwrap();
    std::fs::rename(&tmp, &wasm).unwrap();
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert!(st["last_error"].is_null(), "{st}");
    assert_ne!(st["sha256"], first["sha256"]);
    c.send(json!({"event_type": "t", "payload": {"keep": 1, "secret": "x"}}))
        .await;
    assert_eq!(rx.wait_for(1, T).await[0].json(), json!({"keep": 1}));
    c.stop().await;
}

#[tokio::test]
async fn a_config_naming_a_plugin_in_a_directory_not_made_yet_applies_once_it_is() {
    let rx = Receiver::start().await;
    let c = Courier::start_file(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("app", &rx.url("/"), "")
    ))
    .await;
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("v2");
    let wasm = dir.join("redact.wasm");
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}[[plugins]]\nname = \"redact\"\npath = \"{}\"\nkind = \"transform\"\nconfig = {{ fields = \"secret\" }}\n{}",
        wasm.display(),
        endpoint("app", &rx.url("/"), "transforms = [\"redact\"]"),
    ));
    c.wait_config(|st| st["reloads_failed"] == 1).await;
    // The release directory arrives with its plugin.
    let staging = root.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    std::fs::copy(plugin("redact"), staging.join("redact.wasm")).unwrap();
    std::fs::rename(&staging, &dir).unwrap();
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert!(st["last_error"].is_null(), "{st}");
    c.send(json!({"event_type": "t", "payload": {"keep": 1, "secret": "x"}}))
        .await;
    assert_eq!(rx.wait_for(1, T).await[0].json(), json!({"keep": 1}));
    c.stop().await;
}

#[tokio::test]
async fn a_reload_that_would_break_an_api_endpoint_is_rejected() {
    let rx = Receiver::start().await;
    let with_plugin = format!(
        "{DELIVERY_FAST}[[plugins]]\nname = \"redact\"\npath = \"{}\"\nkind = \"transform\"\nconfig = {{ fields = \"secret\" }}\n",
        plugin("redact").display()
    );
    let c = Courier::start_file(&with_plugin).await;
    let (s, ep) = c
        .call(
            reqwest::Method::POST,
            "/v1/endpoints",
            Some(ADMIN),
            Some(
                json!({"name": "api-ep", "url": rx.url("/"), "transforms": ["redact"]})
                    .to_string()
                    .into(),
            ),
        )
        .await;
    assert_eq!(s, 201, "{ep}");
    // Dropping the plugin the API endpoint uses, or making it another kind: both rejected.
    c.rewrite_config(DELIVERY_FAST);
    let st = c.wait_config(|st| st["reloads_failed"] == 1).await;
    let msg = st["last_error"]["message"].as_str().unwrap();
    assert!(msg.contains("api-ep") && msg.contains("redact"), "{msg}");
    c.rewrite_config(&with_plugin.replace("\"transform\"", "\"backoff\""));
    let st = c.wait_config(|st| st["reloads_failed"] == 2).await;
    assert_eq!(st["version"], 1);
    // The endpoint keeps working with its transform.
    c.send(json!({"event_type": "t", "payload": {"keep": 1, "secret": "x"}, "endpoint": "api-ep"}))
        .await;
    assert_eq!(rx.wait_for(1, T).await[0].json(), json!({"keep": 1}));
    let (_, plugins) = c.get("/v1/plugins").await;
    assert_eq!(plugins["data"][0]["kind"], "transform", "{plugins}");
    c.stop().await;
}

#[tokio::test]
async fn settings_only_a_restart_applies_are_kept_and_reported() {
    let rx = Receiver::start().await;
    let extra = format!("{DELIVERY_FAST}{}", endpoint("app", &rx.url("/"), ""));
    let c = Courier::start_file(&extra).await;
    let text = base_config(&c.dir.path().join("data"), &extra);
    c.rewrite_config_text(&text.replace(
        "max_body_bytes = 65536",
        "max_body_bytes = 65536\nquick_repair = false\nwatch = false\nmax_connections = 5",
    ));
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert_eq!(
        st["restart_needed"],
        json!([
            "server.quick_repair",
            "server.watch",
            "server.max_connections"
        ]),
        "{st}"
    );
    // Still watching (the running value): the next edit is applied too.
    c.rewrite_config_text(&text);
    let st = c.wait_config(|st| st["version"] == 3).await;
    assert_eq!(st["restart_needed"], json!([]), "{st}");
    c.stop().await;
}

/// A changed `listen` waits for a restart, and so does the default public URL made from it:
/// callback URLs keep naming the address courier answers on.
#[tokio::test]
async fn a_listen_change_waiting_for_a_restart_leaves_callback_urls_on_the_running_address() {
    let c = Courier::start_file(DELIVERY_FAST).await;
    let before = c.app().config.load().server.public_url.clone();
    assert_eq!(before, c.base, "the default names the bound address");
    let text = base_config(&c.dir.path().join("data"), DELIVERY_FAST);
    c.rewrite_config_text(&text.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""));
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert_eq!(st["restart_needed"], json!(["server.listen"]), "{st}");
    assert_eq!(c.app().config.load().server.public_url, before);
    c.stop().await;
}

/// A plugin a reload drops is unloaded 30 s later; that wait must not keep the database
/// open past a stop, or the data dir could not be opened again (as a restart would).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_right_after_a_reload_closes_the_database() {
    let rx = Receiver::start().await;
    let mut c = Courier::start_file(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("a", &rx.url("/"), "")
    ))
    .await;
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("a", &rx.url("/"), "timeout = \"7s\"")
    ));
    c.wait_config(|st| st["version"] == 2).await;
    c.running.take().unwrap().shutdown().await;
    let config = courier::config::Config::load(&c.dir.path().join("courier.toml")).unwrap();
    let running = courier::server::start(config)
        .await
        .expect("the data dir opens again");
    c.base = format!("http://{}", running.addr);
    c.running = Some(running);
    c.send(json!({"event_type": "t", "payload": {}, "endpoint": "a"}))
        .await;
    rx.wait_for(1, T).await;
    c.stop().await;
}

/// A config file mounted from a Kubernetes ConfigMap: `courier.toml` is a symlink to
/// `..data/courier.toml`, and an update writes a new directory and swaps the `..data`
/// symlink over to it (no event names `courier.toml` itself).
#[tokio::test]
async fn a_configmap_style_symlink_swap_is_reloaded() {
    use std::os::unix::fs::symlink;
    let a = Receiver::start().await;
    let b = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let v1 = dir.path().join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(
        v1.join("courier.toml"),
        base_config(
            &data,
            &format!("{DELIVERY_FAST}{}", endpoint("a", &a.url("/"), "")),
        ),
    )
    .unwrap();
    symlink("..v1", dir.path().join("..data")).unwrap();
    let path = dir.path().join("courier.toml");
    symlink("..data/courier.toml", &path).unwrap();
    let config = courier::config::Config::load(&path).unwrap();
    let c = Courier::start_loaded(config, dir).await;
    // The update, as the kubelet makes it.
    let dir = c.dir.path();
    let v = dir.join("..v2");
    std::fs::create_dir(&v).unwrap();
    std::fs::write(
        v.join("courier.toml"),
        base_config(
            &data,
            &format!(
                "{DELIVERY_FAST}{}{}",
                endpoint("a", &a.url("/"), ""),
                endpoint("b", &b.url("/"), "")
            ),
        ),
    )
    .unwrap();
    let tmp = dir.join("..data_tmp");
    symlink("..v2", &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert_eq!(st["endpoints"], json!(["a", "b"]));
    c.send(json!({"event_type": "t", "payload": {"to": "b"}, "endpoint": "b"}))
        .await;
    assert_eq!(b.wait_for(1, T).await[0].json()["to"], "b");
    c.stop().await;
}

/// The file changed after courier read it and before it watched it (while it opened its
/// database, say): the running configuration is the one read, and the change is applied.
#[tokio::test]
async fn a_config_changed_while_courier_starts_is_applied() {
    let a = Receiver::start().await;
    let b = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("{DELIVERY_FAST}{}", endpoint("a", &a.url("/"), "")),
    );
    let config = courier::config::Config::load(&path).unwrap();
    write_config(
        dir.path(),
        &format!(
            "{DELIVERY_FAST}{}{}",
            endpoint("a", &a.url("/"), ""),
            endpoint("b", &b.url("/"), "")
        ),
    );
    let c = Courier::start_loaded(config, dir).await;
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert_eq!(st["endpoints"], json!(["a", "b"]));
    c.stop().await;
}

/// An admin call that must succeed (2xx); its JSON answer.
async fn admin(
    c: &Courier,
    m: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let (s, v) = c
        .call(m, path, Some(ADMIN), body.map(|b| b.to_string().into()))
        .await;
    assert!((200..300).contains(&s), "{path}: {s} {v}");
    v
}

/// A pause belongs to the endpoint's name: a reload that adds a config endpoint over a
/// paused API endpoint of the same name, or removes a paused config endpoint from over one,
/// keeps the queue held instead of sending it to the other definition's URL; a resume
/// releases it, to the definition in effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_holds_when_a_reload_changes_which_definition_a_name_has() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start_file(DELIVERY_FAST).await;
    let send = |name: &'static str| {
        let c = &c;
        async move {
            let r = c
                .send(json!({"event_type": "t", "payload": {}, "endpoint": name}))
                .await;
            r["deliveries"][0]["id"].as_str().unwrap().to_string()
        }
    };
    // A paused API endpoint with a queue; the file then defines the name too.
    for name in ["mig", "rev"] {
        let url = rx.url(&format!("/{name}-api"));
        admin(
            &c,
            M::POST,
            "/v1/endpoints",
            Some(json!({"name": name, "url": url})),
        )
        .await;
    }
    admin(&c, M::POST, "/v1/endpoints/mig/pause", None).await;
    let mig = send("mig").await;
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{}{}",
        endpoint("mig", &rx.url("/mig-cfg"), ""),
        endpoint("rev", &rx.url("/rev-cfg"), "")
    ));
    c.wait_config(|st| st["version"] == 2).await;
    // The config `rev` paused through the API, with a queue; the file then drops it.
    admin(&c, M::POST, "/v1/endpoints/rev/pause", None).await;
    let rev = send("rev").await;
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("mig", &rx.url("/mig-cfg"), "")
    ));
    c.wait_config(|st| st["version"] == 3).await;
    // Listed as held, both.
    let (_, list) = c.get("/v1/endpoints").await;
    for name in ["mig", "rev"] {
        let held = list["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name && e.get("shadowed") != Some(&json!(true)))
            .unwrap_or_else(|| panic!("{name}: {list}"));
        assert_eq!(held["paused"], true, "{name}: {list}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        rx.received().is_empty(),
        "a paused queue was sent: {:?}",
        rx.received()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    );
    for (name, id, path) in [("mig", &mig, "/mig-cfg"), ("rev", &rev, "/rev-api")] {
        let (_, d) = c.get(&format!("/v1/deliveries/{id}")).await;
        assert_eq!(d["status"], "pending", "{d}");
        let ep = admin(&c, M::POST, &format!("/v1/endpoints/{name}/resume"), None).await;
        assert_eq!(ep["paused"], false, "{ep}");
        c.wait_status(id, "delivered", T).await;
        assert!(rx.received().iter().any(|r| r.path == path), "{name}");
    }
    c.stop().await;
}

/// The pause of an API endpoint a config endpoint took over stays with the name when the
/// hidden API endpoint is deleted (its queue is the config endpoint's now, still held), and
/// a pause left by a config endpoint the file dropped does not fall on an API endpoint made
/// under the name later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_stays_with_the_name_through_a_delete_and_not_onto_a_new_endpoint() {
    use reqwest::Method as M;
    let rx = Receiver::start().await;
    let c = Courier::start_file(DELIVERY_FAST).await;
    let url = rx.url("/mig-api");
    admin(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "mig", "url": url})),
    )
    .await;
    admin(&c, M::POST, "/v1/endpoints/mig/pause", None).await;
    let r = c
        .send(json!({"event_type": "t", "payload": {}, "endpoint": "mig"}))
        .await;
    let id = r["deliveries"][0]["id"].as_str().unwrap().to_string();
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{}",
        endpoint("mig", &rx.url("/mig-cfg"), "")
    ));
    c.wait_config(|st| st["version"] == 2).await;
    // The hidden API endpoint goes; the queue, now the config endpoint's, stays held.
    admin(&c, M::DELETE, "/v1/endpoints/mig", None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rx.received().is_empty(), "the held queue was sent");
    let (_, ep) = c.get("/v1/endpoints/mig").await;
    assert_eq!(ep["paused"], true, "{ep}");
    // The file drops `mig` (its pause waits for the name); an API endpoint made under the
    // name is not paused by it.
    c.rewrite_config(DELIVERY_FAST);
    c.wait_config(|st| st["version"] == 3).await;
    let url = rx.url("/new");
    let made = admin(
        &c,
        M::POST,
        "/v1/endpoints",
        Some(json!({"name": "mig", "url": url})),
    )
    .await;
    assert_eq!(made["paused"], false, "{made}");
    c.wait_status(&id, "delivered", T).await;
    assert_eq!(rx.received()[0].path, "/new");
    c.stop().await;
}
