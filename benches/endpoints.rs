//! Memory per registered endpoint: RSS of a courier process before and after 10,000
//! endpoints are created through the API (idle, then after one delivery each).
//!
//!     cargo bench --bench endpoints
//!
//! The server runs in this process; RSS is read from /proc/self/status. Run by `cargo test`
//! (no `--bench` argument) it makes a short run of 200 endpoints as a smoke test.

use std::time::Duration;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").parse().unwrap())
        })
        .unwrap()
}

const TOKEN: &str = "bench-admin-token-000001";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = if smoke { 200 } else { 10_000 };
    let dir = tempfile::tempdir().unwrap();
    // A receiver that answers 204 to everything.
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raddr = receiver.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().fallback(|| async { axum::http::StatusCode::NO_CONTENT });
        axum::serve(receiver, app).await.unwrap();
    });
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[[keys]]\ntoken = \"{TOKEN}\"\nscopes = [\"ingest\", \"admin\"]\n[delivery]\nallow_private_networks = true\n",
        dir.path().join("data").display()
    );
    let config = courier::config::Config::parse(&text, dir.path(), None, "bench").unwrap();
    let running = courier::server::start(config).await.unwrap();
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::new();
    // Warm up the HTTP path and allocator with a few endpoints, then measure.
    let (http2, base2) = (http.clone(), base.clone());
    let create = move |i: usize| {
        let (http, base) = (http2.clone(), base2.clone());
        async move {
            let body = serde_json::json!({
                "name": format!("ep-{i:05}"),
                "url": format!("http://{raddr}/ep/{i}"),
                "event_types": [format!("tenant{}.*", i % 100)],
                "tenant": format!("t{}", i % 100),
            });
            let r = http
                .post(format!("{base}/v1/endpoints"))
                .bearer_auth(TOKEN)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
    };
    for i in n..n + 100 {
        create(i).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib();
    let t = std::time::Instant::now();
    let mut tasks = Vec::new();
    for chunk in 0..32 {
        let create = create.clone();
        tasks.push(tokio::spawn(async move {
            for i in (chunk..n).step_by(32) {
                create(i).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib();
    // One delivery to each endpoint; then wait for the queues to drain.
    for i in 0..n {
        let body = serde_json::json!({"event_type": "direct", "payload": {"i": i}, "endpoint": format!("ep-{i:05}")});
        let r = http
            .post(format!("{base}/v1/events"))
            .bearer_auth(TOKEN)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the deliveries did not drain in 10 minutes"
        );
        let st: serde_json::Value = http
            .get(format!("{base}/v1/stats"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json_value()
            .await;
        if st["counts"]["pending"] == 0 && st["counts"]["delivered"] == n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let used = rss_kib();
    println!(
        "created {n} endpoints through the API in {:.2} s ({:.0}/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    println!(
        "RSS before: {before} KiB, after creating: {idle} KiB, after one delivery each: {used} KiB"
    );
    println!(
        "per idle endpoint: {:.2} KiB; per endpoint after traffic: {:.2} KiB",
        (idle.saturating_sub(before)) as f64 / n as f64,
        (used.saturating_sub(before)) as f64 / n as f64
    );
    running.shutdown().await;
}

trait JsonValue {
    async fn json_value(self) -> serde_json::Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}
