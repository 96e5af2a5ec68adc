//! Transform-plugin overhead: the added latency per delivery of a transform on a 1 KiB JSON
//! body (instantiate + call), against the same path with no plugin.
//!
//!     cargo bench --bench plugins
//!
//! Prints median, p90, p99 per case and writes nothing; results go into BENCHMARKS.md by hand.
//! Run by `cargo test` (no `--bench` argument) it makes a short run as a smoke test.

use std::path::{Path, PathBuf};
use std::time::Instant;

use courier::config::{PluginConfig, PluginKind};
use courier::deliver::Outgoing;
use courier::observe::Metrics;
use courier::plugins::{Plugins, TransformContext, Transformed};

fn build_plugins() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", root.join("target"))
            .status()
            .expect("cargo");
    assert!(status.success());
    root.join("target/wasm32-wasip2/release")
}

fn body_1k() -> Vec<u8> {
    let mut fields = serde_json::Map::new();
    fields.insert("email".into(), "someone@example.com".into());
    fields.insert("phone".into(), "+1 555 0100".into());
    let mut i = 0;
    while serde_json::to_vec(&fields).unwrap().len() < 1000 {
        fields.insert(format!("field_{i:03}"), format!("value number {i}").into());
        i += 1;
    }
    serde_json::to_vec(&fields).unwrap()
}

fn percentile(sorted: &[u128], q: f64) -> u128 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn run(plugins: &Plugins, metrics: &Metrics, chain: &[String], body: &[u8], n: usize) -> Vec<u128> {
    let ctx = TransformContext {
        endpoint: "bench".into(),
        event_type: "order.created".into(),
        event_id: "evt_bench".into(),
        timestamp: "2026-01-01T00:00:00Z".into(),
        max_body: 2 << 20,
    };
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let out = Outgoing {
            url: url::Url::parse("http://127.0.0.1/").unwrap(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_vec(),
        };
        let t = Instant::now();
        let r = plugins
            .run_transforms(metrics, chain, out, &ctx)
            .expect("transform");
        samples.push(t.elapsed().as_nanos());
        assert!(matches!(r, Transformed::Send(_)));
    }
    samples.sort_unstable();
    samples
}

fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let (warm, n) = if smoke { (10, 50) } else { (500, 5000) };
    let dir = build_plugins();
    let metrics = Metrics::new();
    let plugins = Plugins::default();
    let cfg = |name: &str, file: &str, config: &[(&str, &str)]| PluginConfig {
        name: name.into(),
        path: dir.join(file),
        kind: PluginKind::Transform,
        config: config
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        fuel: None,
        memory_bytes: None,
        timeout: None,
    };
    plugins
        .load_all(
            &[
                cfg("redact", "redact.wasm", &[("fields", "email,phone")]),
                cfg("envelope", "envelope.wasm", &[]),
                cfg("passthrough", "misbehave.wasm", &[("mode", "none")]),
            ],
            &metrics,
        )
        .expect("load plugins");
    let body = body_1k();
    println!(
        "body: {} bytes of JSON; {n} iterations per case after {warm} warm-up calls{}",
        body.len(),
        if smoke { " (smoke run)" } else { "" }
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10}",
        "case", "median µs", "p90 µs", "p99 µs"
    );
    for (label, chain) in [
        ("no plugin (baseline)", vec![]),
        ("pass-through", vec!["passthrough".to_string()]),
        ("redact", vec!["redact".to_string()]),
        ("envelope", vec!["envelope".to_string()]),
        (
            "redact + envelope",
            vec!["redact".to_string(), "envelope".to_string()],
        ),
    ] {
        run(&plugins, &metrics, &chain, &body, warm);
        let s = run(&plugins, &metrics, &chain, &body, n);
        println!(
            "{:<22} {:>10.1} {:>10.1} {:>10.1}",
            label,
            percentile(&s, 0.5) as f64 / 1000.0,
            percentile(&s, 0.9) as f64 / 1000.0,
            percentile(&s, 0.99) as f64 / 1000.0
        );
    }
}
