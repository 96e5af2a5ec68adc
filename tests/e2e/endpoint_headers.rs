//! An endpoint's configured `headers` cannot override courier's own headers, nor describe
//! the connection, the body's framing or its encoding: a config (at `courier check`, at start, on reload)
//! or an API endpoint that tries is refused, naming the key; headers of its own go out as
//! configured.

use std::time::Duration;

use serde_json::json;

use crate::harness::*;

const T: Duration = Duration::from_secs(20);

/// Courier's own headers, spelt as an operator might.
const RESERVED: &[&str] = &[
    "webhook-id",
    "Webhook-Timestamp",
    "WEBHOOK-SIGNATURE",
    "mr-signature",
    "mr-timestamp",
    "mr-channel-id",
    "Content-Type",
    "user-agent",
];

fn with_headers(rx: &Receiver, headers: &str) -> String {
    format!(
        "{DELIVERY_FAST}{}",
        endpoint(
            "app",
            &rx.url("/hook"),
            &format!("headers = {{ {headers} }}")
        )
    )
}

/// `courier check` on a config whose endpoint has `headers`: whether it passed, and what it
/// said.
async fn check_with_headers(rx: &Receiver, headers: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &with_headers(rx, headers));
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn courier_check_refuses_a_reserved_header_naming_the_key() {
    let rx = Receiver::start().await;
    for name in RESERVED {
        let (ok, text) = check_with_headers(
            &rx,
            &format!("\"x-tenant\" = \"t1\", \"{name}\" = \"mine\""),
        )
        .await;
        assert!(!ok, "{name}: accepted: {text}");
        assert!(
            text.contains(&format!("endpoints[0].headers.{name}")),
            "{name}: {text}"
        );
        assert!(text.contains("cannot be overridden"), "{name}: {text}");
    }
    // The same file without the reserved header passes.
    let (ok, text) = check_with_headers(&rx, "\"x-tenant\" = \"t1\"").await;
    assert!(ok, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_reserved_header_is_rejected_and_the_wire_keeps_couriers_headers() {
    let rx = Receiver::start().await;
    let c = Courier::start_file(&with_headers(&rx, "\"X-Tenant\" = \"t1\"")).await;
    let first = c
        .send(json!({"event_type": "t", "payload": {"n": 1}}))
        .await;
    let got = rx.wait_for(1, T).await;
    // A header of the endpoint's own goes out (its name in lower case, as HTTP/1 allows).
    assert_eq!(got[0].header("x-tenant"), "t1");
    assert_eq!(got[0].header("webhook-id"), first["id"].as_str().unwrap());

    c.rewrite_config(&with_headers(
        &rx,
        "\"X-Tenant\" = \"t2\", \"webhook-id\" = \"forged\", \"user-agent\" = \"evil/1\"",
    ));
    let st = c.wait_config(|st| st["reloads_failed"] == 1).await;
    assert_eq!(st["version"], 1, "the invalid file changed nothing: {st:#}");
    let msg = st["last_error"]["message"].as_str().unwrap();
    assert!(msg.contains("endpoints[0].headers."), "{msg}");
    assert!(msg.contains("cannot be overridden"), "{msg}");

    // Deliveries go on under the file that runs: courier's own headers, the old x-tenant.
    let second = c
        .send(json!({"event_type": "t", "payload": {"n": 2}}))
        .await;
    let got = rx.wait_for(2, T).await;
    let r = got.iter().find(|r| r.json()["n"] == 2).unwrap();
    assert_eq!(r.header("webhook-id"), second["id"].as_str().unwrap());
    assert!(r.header("user-agent").starts_with("courier/"), "{r:?}");
    assert_eq!(r.header("x-tenant"), "t1");
    courier::deliver::sign::verify_mr(SECRET, &r.body, r.header("mr-signature")).unwrap();
    c.stop().await;
}

#[tokio::test]
async fn an_api_endpoint_with_a_reserved_header_is_refused_naming_the_field() {
    let rx = Receiver::start().await;
    let c = Courier::start(DELIVERY_FAST).await;
    for name in ["webhook-signature", "Mr-Signature", "content-type"] {
        let (s, e) = c
            .post_json(
                "/v1/endpoints",
                &json!({"name": "shop", "url": rx.url("/h"), "headers": {name: "mine"}}),
            )
            .await;
        assert_eq!(s, 422, "{name}: {e}");
        assert_eq!(e["error"]["field"], "headers", "{name}: {e}");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("headers.{name}")) && msg.contains("cannot be overridden"),
            "{name}: {msg}"
        );
        // Nothing was written.
        assert_eq!(c.get("/v1/endpoints/shop").await.0, 404);
    }
    // A header of its own is fine, and goes out with the deliveries.
    let (s, e) = c
        .post_json(
            "/v1/endpoints",
            &json!({"name": "shop", "url": rx.url("/h"), "headers": {"x-tenant": "acme"}}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    c.send(json!({"event_type": "t", "payload": {}, "endpoint": "shop"}))
        .await;
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].header("x-tenant"), "acme");
    assert!(got[0].header("user-agent").starts_with("courier/"));
    c.stop().await;
}

/// Headers that describe the connection or how the body is framed, spelt as an operator
/// might: the HTTP client sets them from what it sends.
const FRAMING: &[&str] = &["Transfer-Encoding", "connection", "expect", "te", "Upgrade"];

#[tokio::test]
async fn framing_headers_are_refused_in_the_config_and_the_api_and_left_out_of_requests() {
    let rx = Receiver::start().await;
    for name in FRAMING {
        let (ok, text) = check_with_headers(
            &rx,
            &format!("\"x-tenant\" = \"t1\", \"{name}\" = \"chunked\""),
        )
        .await;
        assert!(!ok, "{name}: accepted: {text}");
        assert!(
            text.contains(&format!("endpoints[0].headers.{name}"))
                && text.contains("how the body is framed"),
            "{name}: {text}"
        );
    }

    // A transform that adds them anyway: its body goes out as it is, framed by the client.
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}{}",
        plugin_entry(
            "framing",
            "misbehave",
            "transform",
            "config = { mode = \"framing\" }\nlimits = { timeout = \"5s\" }"
        ),
        endpoint("app", &rx.url("/hook"), "transforms = [\"framing\"]"),
    ))
    .await;
    for name in FRAMING {
        let (s, e) = c
            .post_json(
                "/v1/endpoints",
                &json!({"name": "shop", "url": rx.url("/h"), "headers": {*name: "chunked"}}),
            )
            .await;
        assert_eq!(s, 422, "{name}: {e}");
        assert_eq!(e["error"]["field"], "headers", "{name}: {e}");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("headers.{name}")),
            "{name}: {e}"
        );
        assert_eq!(c.get("/v1/endpoints/shop").await.0, 404);
    }
    let sent = c
        .send(json!({"event_type": "t", "payload": {"n": 1}, "endpoint": "app"}))
        .await;
    let got = rx.wait_for(1, T).await;
    assert_eq!(got[0].json()["n"], 1);
    assert_eq!(got[0].header("transfer-encoding"), "");
    assert_eq!(got[0].header("expect"), "");
    assert_ne!(got[0].header("connection"), "close");
    assert_eq!(
        got[0].header("content-length"),
        got[0].body.len().to_string()
    );
    let id = sent["deliveries"][0]["id"].as_str().unwrap();
    c.wait_status(id, "delivered", T).await;
    c.stop().await;
}

/// `content-encoding` describes the body, which courier sends as it was ingested: given for
/// an endpoint, every delivery would claim an encoding its body does not have. It is refused
/// in the config and the API, naming the key; a raw ingest's own still goes with its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_encoding_header_is_refused_and_a_raw_ingests_own_still_goes_out() {
    let rx = Receiver::start().await;
    for name in ["content-encoding", "Content-Encoding"] {
        let (ok, text) = check_with_headers(
            &rx,
            &format!("\"x-tenant\" = \"t1\", \"{name}\" = \"gzip\""),
        )
        .await;
        assert!(!ok, "{name}: accepted: {text}");
        assert!(
            text.contains(&format!("endpoints[0].headers.{name}"))
                && text.contains("describes the body"),
            "{name}: {text}"
        );
    }
    let c = Courier::start(&with_headers(&rx, "\"x-tenant\" = \"t1\"")).await;
    let (s, e) = c
        .post_json(
            "/v1/endpoints",
            &json!({"name": "shop", "url": rx.url("/h"), "headers": {"Content-Encoding": "gzip"}}),
        )
        .await;
    assert_eq!(s, 422, "{e}");
    assert_eq!(e["error"]["field"], "headers", "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("headers.Content-Encoding"),
        "{e}"
    );
    assert_eq!(c.get("/v1/endpoints/shop").await.0, 404);
    // Nor through a PATCH.
    let (s, e) = c
        .post_json(
            "/v1/endpoints",
            &json!({"name": "shop", "url": rx.url("/h")}),
        )
        .await;
    assert_eq!(s, 201, "{e}");
    let (s, e) = c
        .call(
            reqwest::Method::PATCH,
            "/v1/endpoints/shop",
            Some(ADMIN),
            Some(
                json!({"headers": {"content-encoding": "br"}})
                    .to_string()
                    .into(),
            ),
        )
        .await;
    assert_eq!((s, &e["error"]["field"]), (422, &json!("headers")), "{e}");
    // A raw ingest's gzipped body goes out gzipped and says so; a JSON event says nothing.
    let resp = c
        .http
        .post(format!("{}/v1/ingest/app", c.base))
        .bearer_auth(ADMIN)
        .header("content-encoding", "gzip")
        .body("\u{1f}\u{8b} packed")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    c.send(json!({"event_type": "t", "payload": {"n": 1}, "endpoint": "app"}))
        .await;
    let got = rx.wait_for(2, T).await;
    let packed = got.iter().find(|r| r.body.starts_with(b"\x1f")).unwrap();
    assert_eq!(packed.header("content-encoding"), "gzip");
    assert_eq!(packed.header("x-tenant"), "t1");
    let plain = got.iter().find(|r| r.body.starts_with(b"{")).unwrap();
    assert_eq!(plain.header("content-encoding"), "");
    c.stop().await;
}
