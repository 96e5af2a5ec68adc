//! Keys limited by `endpoints` and `workflows` lists: a producer's key reaches its own
//! endpoints and workflows only, whatever it asks for, and a reload changes its reach.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

/// An ingest key limited to the endpoints whose names start with `acme-`.
const ACME: &str = "test-acme-producer-token-1";
/// An ingest and callback key limited to the workflow `other`.
const OTHER_WF: &str = "test-other-workflow-token1";
/// An ingest key limited to the endpoint `app`, which both workflows of the workflow test
/// deliver to.
const APP_ONLY: &str = "test-app-endpoint-token-01";
/// An ingest key limited to an endpoint no workflow delivers to.
const ELSEWHERE: &str = "test-elsewhere-token-00001";

fn limited_key(token: &str, scopes: &str, limits: &str) -> String {
    format!("[[keys]]\ntoken = \"{token}\"\nscopes = [{scopes}]\n{limits}\n")
}

fn event(endpoint: Option<&str>, n: u32) -> String {
    let mut e = json!({"event_type": "order.created", "payload": {"n": n}});
    if let Some(name) = endpoint {
        e["endpoint"] = name.into();
    }
    e.to_string()
}

fn endpoints_of(reply: &Value) -> Vec<&str> {
    reply["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["endpoint"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limited_to_endpoints_reaches_those_only_and_a_reload_moves_its_reach() {
    let acme_rx = Receiver::start().await;
    let globex_rx = Receiver::start().await;
    let endpoints = format!(
        "{}{}",
        endpoint("acme-orders", &acme_rx.url("/"), ""),
        endpoint("globex", &globex_rx.url("/"), "")
    );
    let config = |limits: &str| {
        format!(
            "{DELIVERY_FAST}{endpoints}{}",
            limited_key(ACME, "\"ingest\"", limits)
        )
    };
    let c = Courier::start_file(&config("endpoints = [\"acme-*\"]")).await;

    // Another producer's endpoint, and one that does not exist, get the same answer: the
    // key learns nothing about endpoints beyond its reach.
    for name in ["globex", "no-such-endpoint"] {
        let (s, e) = c.post("/v1/events", Some(ACME), event(Some(name), 0)).await;
        assert_eq!(
            (s, e["error"]["code"].as_str(), e["error"]["field"].as_str()),
            (403, Some("forbidden"), Some("endpoint")),
            "{e}"
        );
        let (s, e) = c
            .post(&format!("/v1/ingest/{name}"), Some(ACME), "raw")
            .await;
        assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    }
    // Its own endpoint by name, and a fan-out that both endpoints subscribe to: only its
    // own gets a delivery.
    let (s, r) = c
        .post("/v1/events", Some(ACME), event(Some("acme-orders"), 1))
        .await;
    assert_eq!((s, endpoints_of(&r)), (202, vec!["acme-orders"]), "{r}");
    let (s, r) = c.post("/v1/events", Some(ACME), event(None, 2)).await;
    assert_eq!((s, endpoints_of(&r)), (202, vec!["acme-orders"]), "{r}");
    // An unlimited key's fan-out still reaches both.
    let (s, r) = c.post("/v1/events", Some(ADMIN), event(None, 3)).await;
    assert_eq!(
        (s, endpoints_of(&r)),
        (202, vec!["acme-orders", "globex"]),
        "{r}"
    );
    let mut got: Vec<u64> = acme_rx
        .wait_for(3, T)
        .await
        .iter()
        .map(|r| r.json()["n"].as_u64().unwrap())
        .collect();
    // (Delivered concurrently: in any order.)
    got.sort();
    assert_eq!(got, [1, 2, 3]);
    // globex received the unlimited key's event and nothing the limited key sent.
    let got = globex_rx.wait_for(1, T).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(globex_rx.received().len(), 1);
    assert_eq!(got[0].json()["n"], 3);
    let (_, listed) = c.get("/v1/deliveries?endpoint=globex").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");

    // A reload gives the key the other endpoint instead.
    c.rewrite_config(&config("endpoints = [\"globex\"]"));
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert_eq!(st["reloads_failed"], 0, "{st:#}");
    let (s, _) = c
        .post("/v1/events", Some(ACME), event(Some("acme-orders"), 4))
        .await;
    assert_eq!(s, 403);
    let (s, r) = c.post("/v1/events", Some(ACME), event(None, 5)).await;
    assert_eq!((s, endpoints_of(&r)), (202, vec!["globex"]), "{r}");
    assert_eq!(globex_rx.wait_for(2, T).await[1].json()["n"], 5);

    // A reload whose list would make no sense is refused and the running one stays.
    c.rewrite_config(&format!(
        "{DELIVERY_FAST}{endpoints}{}",
        limited_key(ACME, "\"ingest\", \"admin\"", "endpoints = [\"globex\"]")
    ));
    let st = c.wait_config(|st| st["reloads_failed"] == 1).await;
    let msg = st["last_error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("endpoints"), "{st:#}");
    assert_eq!(
        c.post("/v1/events", Some(ACME), event(Some("acme-orders"), 6))
            .await
            .0,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_limited_to_workflows_cannot_open_watch_or_complete_another_workflows_channels() {
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let workflow = |name: &str| {
        format!(
            "[[workflows]]\nname = \"{name}\"\nupstream = {{ url = \"{}\" }}\nendpoint = \"app\"\nevent_name = \"suggestion\"\ncallback_timeout = \"1m\"\n",
            upstream.url("/v1/chat/completions")
        )
    };
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}{}{}{}{}",
        endpoint("app", &rx.url("/"), ""),
        workflow("movie_suggestion"),
        workflow("other"),
        limited_key(
            OTHER_WF,
            "\"ingest\", \"callback\"",
            "workflows = [\"other\"]"
        ),
        limited_key(APP_ONLY, "\"ingest\"", "endpoints = [\"app\"]"),
        limited_key(ELSEWHERE, "\"ingest\"", "endpoints = [\"elsewhere-*\"]"),
    ))
    .await;
    let open =
        |name: &str| json!({"workflow": name, "messages": [{"role": "user", "content": "hi"}]});

    let (s, e) = c
        .post(
            "/v1/ai/async",
            Some(OTHER_WF),
            open("movie_suggestion").to_string(),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str(), e["error"]["field"].as_str()),
        (403, Some("forbidden"), Some("workflow")),
        "{e}"
    );
    // A key limited by `workflows` alone sends no event to an endpoint directly.
    let (s, e) = c
        .post("/v1/events", Some(OTHER_WF), event(Some("app"), 0))
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{e}"
    );
    // A key limited by `endpoints` alone may use the workflows that deliver to them, and no
    // other: no list is a way around the other.
    let (s, r) = c
        .post(
            "/v1/ai/async",
            Some(APP_ONLY),
            open("movie_suggestion").to_string(),
        )
        .await;
    assert_eq!(s, 202, "{r}");
    let (s, e) = c
        .post(
            "/v1/ai/async",
            Some(ELSEWHERE),
            open("movie_suggestion").to_string(),
        )
        .await;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{e}"
    );
    let (_, list) = c.get_as("/v1/workflows", Some(ELSEWHERE)).await;
    assert_eq!(list["data"], json!([]), "{list}");
    // The list of workflows shows it only its own.
    let (s, list) = c.get_as("/v1/workflows", Some(OTHER_WF)).await;
    assert_eq!(s, 200);
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["other"]);

    // A channel of the other workflow, opened by the unlimited key, waiting for its callback.
    let (s, r) = c.post_json("/v1/ai/async", &open("movie_suggestion")).await;
    assert_eq!(s, 202, "{r}");
    let id = r["channel_id"].as_str().unwrap().to_string();
    wait_channel(&c, &id, |ch| ch["status"] == "ai_generated").await;

    let (s, e) = c
        .get_as(&format!("/v1/channels/{id}"), Some(OTHER_WF))
        .await;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, _) = c
        .get_as(&format!("/v1/channels/{id}"), Some(ELSEWHERE))
        .await;
    assert_eq!(s, 403);
    assert_eq!(
        c.get_as(&format!("/v1/channels/{id}"), Some(APP_ONLY))
            .await
            .0,
        200
    );
    let ws = format!(
        "{}/v1/channels/{id}/ws?token={OTHER_WF}",
        c.base.replace("http://", "ws://")
    );
    match tokio_tungstenite::connect_async(ws).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status().as_u16(), 403)
        }
        Err(e) => panic!("not an HTTP refusal: {e}"),
        Ok(_) => panic!("the socket was accepted"),
    }
    let callback = json!({"data": {"saved": true}, "task_id": "t-1"}).to_string();
    let (s, e) = c
        .post(
            &format!("/v1/callback/{id}"),
            Some(OTHER_WF),
            callback.clone(),
        )
        .await;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    // The refused callback changed nothing: the channel still waits, and completes for a
    // key that may call it back.
    let (_, ch) = c.get(&format!("/v1/channels/{id}")).await;
    assert_eq!(ch["status"], "ai_generated", "{ch}");
    let (s, r) = c
        .post(&format!("/v1/callback/{id}"), Some(ADMIN), callback.clone())
        .await;
    assert_eq!((s, r["status"].as_str()), (200, Some("success")), "{r}");

    // Its own workflow works end to end for it: open, watch, call back.
    let (s, r) = c
        .post("/v1/ai/async", Some(OTHER_WF), open("other").to_string())
        .await;
    assert_eq!(s, 202, "{r}");
    let own = r["channel_id"].as_str().unwrap().to_string();
    wait_channel(&c, &own, |ch| ch["status"] == "ai_generated").await;
    assert_eq!(
        c.get_as(&format!("/v1/channels/{own}"), Some(OTHER_WF))
            .await
            .0,
        200
    );
    let (s, r) = c
        .post(&format!("/v1/callback/{own}"), Some(OTHER_WF), callback)
        .await;
    assert_eq!((s, r["status"].as_str()), (200, Some("success")), "{r}");
}

/// A socket opened by a limited key is closed (1008) once a reload takes the channel's
/// workflow out of the key's list, before it is sent anything more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_narrows_a_keys_workflows_closes_its_sockets_on_the_others() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let config = |workflows: &str| {
        let mut text = format!("{DELIVERY_FAST}{}", endpoint("app", &rx.url("/"), ""));
        for name in ["movie_suggestion", "other"] {
            text += &format!(
                "[[workflows]]\nname = \"{name}\"\nupstream = {{ url = \"{}\" }}\nendpoint = \"app\"\nevent_name = \"suggestion\"\ncallback_timeout = \"1m\"\n",
                upstream.url("/v1/chat/completions")
            );
        }
        text + &limited_key(OTHER_WF, "\"ingest\"", &format!("workflows = {workflows}"))
    };
    let c = Courier::start_file(&config("[\"movie_suggestion\", \"other\"]")).await;
    let (s, r) = c
        .post(
            "/v1/ai/async",
            Some(OTHER_WF),
            json!({"workflow": "movie_suggestion", "messages": []}).to_string(),
        )
        .await;
    assert_eq!(s, 202, "{r}");
    let id = r["channel_id"].as_str().unwrap().to_string();
    wait_channel(&c, &id, |ch| ch["status"] == "ai_generated").await;
    let ws = format!(
        "{}/v1/channels/{id}/ws?token={OTHER_WF}",
        c.base.replace("http://", "ws://")
    );
    let (stream, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let (_, mut read) = stream.split();
    match tokio::time::timeout(T, read.next()).await.unwrap() {
        Some(Ok(Message::Text(t))) => assert!(t.contains("ai_generated"), "{t}"),
        other => panic!("no first frame: {other:?}"),
    }

    c.rewrite_config(&config("[\"other\"]"));
    let st = c.wait_config(|st| st["version"] == 2).await;
    assert_eq!(st["reloads_failed"], 0, "{st:#}");
    let (s, e) = c
        .post_json(&format!("/v1/callback/{id}"), &json!({"data": {"ok": 1}}))
        .await;
    assert_eq!(s, 200, "{e}");
    loop {
        match tokio::time::timeout(T, read.next()).await.unwrap() {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
                break;
            }
            Some(Ok(Message::Text(t))) => panic!("a socket beyond the key's reach got {t}"),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}
