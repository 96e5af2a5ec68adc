//! Signatures: the shared test vectors, and what a receiver verifies on the wire.

use std::time::Duration;

use courier::deliver::sign;
use serde_json::Value;

use crate::harness::*;

#[test]
fn shared_vectors_both_signatures() {
    let text = include_str!("../fixtures/standard-webhooks.json");
    let v: Value = serde_json::from_str(text).unwrap();
    let vectors = v["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 3);
    for t in vectors {
        let secret = t["secret"].as_str().unwrap();
        let id = t["id"].as_str().unwrap();
        let ts = t["timestamp"].as_i64().unwrap();
        let body = t["body"].as_str().unwrap().as_bytes();
        let key = sign::decode_secret(secret).unwrap();
        assert_eq!(
            sign::standard_signature(&key, id, ts, body),
            t["webhook_signature"].as_str().unwrap()
        );
        assert_eq!(
            sign::mr_signature(secret, body),
            t["mr_signature"].as_str().unwrap()
        );
        let both = sign::sign_all(&[secret.to_string()], id, ts, body);
        assert_eq!(
            both.webhook_signature,
            t["webhook_signature"].as_str().unwrap()
        );
        assert_eq!(both.mr_signature, t["mr_signature"].as_str().unwrap());
    }
}

#[tokio::test]
async fn every_attempt_carries_verifiable_headers() {
    let rx = Receiver::start().await;
    let second = sign::generate_secret();
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}\n[[endpoints]]\nname = \"app\"\nurl = \"{}\"\nsecrets = [\"{SECRET}\", \"{second}\"]\nheaders = {{ \"x-tenant\" = \"acme\" }}\n",
        rx.url("/hooks/ai")
    ))
    .await;
    // The payload is delivered exactly as written, spacing and all.
    let (status, reply) = c
        .post(
            "/v1/events",
            Some(ADMIN),
            r#"{"event_type": "order.created", "payload": {"n": 1, "text": "héllo"}}"#,
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    let got = rx.wait_for(1, Duration::from_secs(10)).await;
    let r = &got[0];
    assert_eq!(r.path, "/hooks/ai");
    assert_eq!(
        String::from_utf8(r.body.clone()).unwrap(),
        r#"{"n": 1, "text": "héllo"}"#
    );
    assert_eq!(r.header("webhook-id"), reply["id"].as_str().unwrap());
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("x-tenant"), "acme");
    assert!(
        r.header("user-agent").starts_with("courier/"),
        "{}",
        r.header("user-agent")
    );
    let ts: i64 = r.header("webhook-timestamp").parse().unwrap();
    assert_eq!(r.header("mr-timestamp"), r.header("webhook-timestamp"));
    let sigs = r.header("webhook-signature");
    assert_eq!(
        sigs.split(' ').count(),
        2,
        "one v1 entry per secret: {sigs}"
    );
    assert_eq!(r.header("mr-signature").split(',').count(), 2);

    // The official Standard Webhooks verifier accepts it, with either secret.
    for s in [SECRET, second.as_str()] {
        let wh = standardwebhooks::Webhook::new(s).unwrap();
        let mut headers = axum::http::HeaderMap::new();
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            headers.insert(name, r.headers[name].clone());
        }
        wh.verify(&r.body, &headers)
            .expect("standardwebhooks verifies");
        sign::verify_mr(s, &r.body, r.header("mr-signature")).expect("mr-signature verifies");
        sign::verify_standard(
            s,
            r.header("webhook-id"),
            ts,
            &r.body,
            sigs,
            Some(courier::model::now_ms() as i64 / 1000),
        )
        .unwrap();
    }
    // A tampered body does not verify.
    let wrong = sign::verify_mr(SECRET, b"{\"n\": 2}", r.header("mr-signature"));
    assert!(wrong.is_err());
    c.stop().await;
}
