//! The shipped examples work: the receivers verify real deliveries, the example config passes
//! `courier check`, and the CLI's offline commands behave.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::harness::*;

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether a tool the test needs is present; in CI it must be (CI installs it).
fn available(program: &str, args: &[&str]) -> bool {
    let ok = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} {args:?} must work in CI (.ci/run installs it)"
        );
        eprintln!("skipping: {program} {args:?} is not available here; run .ci/run to install it");
    }
    ok
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn receiver_verifies(program: &str, script: &str) {
    let port = free_port();
    let mut child = Child(
        Command::new(program)
            .arg(root().join("examples").join(script))
            .args(["--port", &port.to_string()])
            .env("WEBHOOK_SECRET", SECRET)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("receiver listening"), "{first}");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let url = format!("http://127.0.0.1:{port}/hook");
    let other = courier::deliver::sign::generate_secret();
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}[[endpoints]]\nname = \"wrong\"\nurl = \"{url}\"\nsecrets = [\"{other}\"]\nschedule = [\"0s\"]\n",
        endpoint("good", &url, "schedule = [\"0s\"]")
    ))
    .await;
    let good = c
        .send(json!({"event_type": "t", "payload": {"hello": "world"}, "endpoint": "good"}))
        .await;
    let wrong = c
        .send(json!({"event_type": "t", "payload": {"hello": "world"}, "endpoint": "wrong"}))
        .await;
    let t = Duration::from_secs(15);
    let d = c
        .wait_status(
            good["deliveries"][0]["id"].as_str().unwrap(),
            "delivered",
            t,
        )
        .await;
    assert_eq!(d["attempts"][0]["status_code"], 204);
    let d = c
        .wait_status(wrong["deliveries"][0]["id"].as_str().unwrap(), "dead", t)
        .await;
    assert_eq!(
        d["attempts"][0]["status_code"], 400,
        "a wrong secret is rejected"
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let line = tokio::time::timeout(t, rx.recv()).await.unwrap().unwrap();
        seen.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    assert_eq!(
        seen.iter().filter(|v| v["verified"] == true).count(),
        1,
        "{seen:?}"
    );
    c.stop().await;
}

#[tokio::test]
async fn python_receiver_verifies_with_the_official_library() {
    if available("python3", &["-c", "import standardwebhooks"]) {
        receiver_verifies("python3", "receiver.py").await;
    }
}

#[tokio::test]
async fn node_receiver_verifies_with_builtin_crypto() {
    if available("node", &["--version"]) {
        receiver_verifies("node", "receiver.mjs").await;
    }
}

fn courier(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn example_config_passes_check() {
    let path = root().join("examples/courier.toml");
    let out = courier(
        &["check", "--config", path.to_str().unwrap()],
        &[
            ("COURIER_KEY", "an-example-key-0123456789"),
            ("APP_SECRET", SECRET),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn check_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[endpoints]]\nname = \"a\"\nurl = \"not a url\"\n",
            "endpoints[0].url",
        ),
        (
            "[delivery]\nschedule = [\"0s\", \"often\"]\n",
            "delivery.schedule[1]",
        ),
        ("[delivery]\nretries = 3\n", "retries"),
        (
            "[[keys]]\ntoken = \"env:COURIER_TEST_UNSET_VARIABLE\"\nscopes = [\"admin\"]\n",
            "keys[0].token",
        ),
        ("[server\n", "courier.toml"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("courier.toml");
        std::fs::write(&path, text).unwrap();
        let out = courier(&["check", "--config", path.to_str().unwrap()], &[]);
        assert!(!out.status.success(), "{text} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(key),
            "{text}: stderr does not name {key}: {err}"
        );
    }
    let out = courier(&["check", "--config", "/nonexistent/courier.toml"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/courier.toml"));
}

#[test]
fn secret_prints_a_fresh_whsec_secret() {
    let a = courier(&["secret"], &[]);
    let b = courier(&["secret"], &[]);
    let (a, b) = (
        String::from_utf8(a.stdout).unwrap(),
        String::from_utf8(b.stdout).unwrap(),
    );
    assert!(a.trim().starts_with("whsec_"));
    assert_ne!(a, b);
    courier::deliver::sign::decode_secret(a.trim()).unwrap();
}
