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
    // A raw ingest delivers any bytes: a body that is not JSON (nor UTF-8) verifies too.
    let (s, raw) = c
        .post(
            "/v1/ingest/good?event_type=raw.text",
            Some(ADMIN),
            b"plain text, not JSON \xff".to_vec(),
        )
        .await;
    assert_eq!(s, 202, "{raw}");
    let t = Duration::from_secs(15);
    for accepted in [&good, &raw] {
        let d = c
            .wait_status(
                accepted["deliveries"][0]["id"].as_str().unwrap(),
                "delivered",
                t,
            )
            .await;
        assert_eq!(d["attempts"][0]["status_code"], 204, "{d}");
    }
    let d = c
        .wait_status(wrong["deliveries"][0]["id"].as_str().unwrap(), "dead", t)
        .await;
    assert_eq!(
        d["attempts"][0]["status_code"], 400,
        "a wrong secret is rejected"
    );
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let line = tokio::time::timeout(t, rx.recv()).await.unwrap().unwrap();
        seen.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
    }
    assert_eq!(
        seen.iter().filter(|v| v["verified"] == true).count(),
        2,
        "{seen:?}"
    );
    c.stop().await;
}

/// A receiver started without WEBHOOK_SECRET exits at once, saying what is missing, rather
/// than failing on its first request.
fn receiver_needs_a_secret(program: &str, script: &str) {
    let mut child = Child(
        Command::new(program)
            .arg(root().join("examples").join(script))
            .args(["--port", &free_port().to_string()])
            .env_remove("WEBHOOK_SECRET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{script} started without a secret"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{script} exited 0 without a secret");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("WEBHOOK_SECRET"), "{script}: {err}");
}

#[test]
fn receivers_refuse_to_start_without_a_secret() {
    if available("python3", &["-c", "import standardwebhooks"]) {
        receiver_needs_a_secret("python3", "receiver.py");
    }
    if available("node", &["--version"]) {
        receiver_needs_a_secret("node", "receiver.mjs");
    }
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

/// `courier check` on an example config, with the environment variables it names set: it
/// must pass.
fn check_example(file: &str, secret_var: &str) -> std::process::Output {
    let path = root().join(file);
    let out = courier(
        &["check", "--config", path.to_str().unwrap()],
        &[
            ("COURIER_KEY", "an-example-key-0123456789"),
            (secret_var, SECRET),
        ],
    );
    assert!(
        out.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn example_config_passes_check() {
    let out = check_example("examples/courier.toml", "APP_SECRET");
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
        (
            "[[keys]]\ntoken = \"\"\nscopes = [\"admin\"]\n",
            "keys[0].token: is empty",
        ),
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
        assert!(
            err.contains(path.to_str().unwrap()),
            "{text}: stderr does not name the file: {err}"
        );
    }
    // An endpoint without secrets is valid but sends unsigned webhooks: a warning says so.
    let path = dir.path().join("courier.toml");
    std::fs::write(
        &path,
        "[[endpoints]]\nname = \"bare\"\nurl = \"https://example.com/h\"\n",
    )
    .unwrap();
    let out = courier(&["check", "--config", path.to_str().unwrap()], &[]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("endpoints[0].secrets") && err.contains("unsigned"),
        "{err}"
    );
    // So is a short token (easy to guess, but the operator's choice): a warning says so.
    std::fs::write(
        &path,
        "[[keys]]\ntoken = \"test-key\"\nscopes = [\"admin\", \"ingest\"]\n",
    )
    .unwrap();
    let out = courier(&["check", "--config", path.to_str().unwrap()], &[]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("keys[0].token is shorter than 16 characters"),
        "{err}"
    );
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

/// examples/ws_watch.py watching `url`: its printed messages and its stderr lines as they
/// come. With `token`, the key goes in an Authorization header (COURIER_TOKEN).
struct Watcher {
    child: Child,
    frames: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    errors: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Watcher {
    fn start(url: &str, token: Option<&str>) -> Watcher {
        let mut cmd = Command::new("python3");
        cmd.arg(root().join("examples/ws_watch.py"))
            .arg(url)
            .env_remove("COURIER_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(token) = token {
            cmd.env("COURIER_TOKEN", token);
        }
        let mut child = Child(cmd.spawn().unwrap());
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        let out = child.0.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(serde_json::from_str(&l).unwrap());
            }
        });
        let (tx, errors) = tokio::sync::mpsc::unbounded_channel();
        let err = child.0.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("ws_watch: {l}");
                let _ = tx.send(l);
            }
        });
        Watcher {
            child,
            frames,
            errors,
        }
    }

    /// The next message it prints (panics after 20 s).
    async fn frame(&mut self) -> serde_json::Value {
        tokio::time::timeout(Duration::from_secs(20), self.frames.recv())
            .await
            .expect("a message from ws_watch in time")
            .expect("ws_watch ended without it")
    }

    /// Its next stderr line that contains `text`; panics after 20 s.
    async fn error_with(&mut self, text: &str) -> String {
        loop {
            let l = tokio::time::timeout(Duration::from_secs(20), self.errors.recv())
                .await
                .unwrap_or_else(|_| panic!("ws_watch never said `{text}`"))
                .unwrap_or_else(|| panic!("ws_watch ended without saying `{text}`"));
            if l.contains(text) {
                return l;
            }
        }
    }

    /// Waits (20 s at most) for it to exit; its status.
    async fn exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ws_watch did not exit in time"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Config for an event-driven workflow `wf` (endpoint `app` on `rx`, `upstream` answering
/// at once), then `keys`.
fn watched_workflow(rx: &Receiver, upstream: &Receiver, keys: &str) -> String {
    format!(
        "{DELIVERY_FAST}{}[[workflows]]\nname = \"wf\"\nupstream = {{ url = \"{}\" }}\nendpoint = \"app\"\nevent_name = \"e\"\ncallback_timeout = \"60s\"\n{keys}",
        endpoint("app", &rx.url("/hooks"), ""),
        upstream.url("/v1/chat/completions"),
    )
}

/// Opens a request on `wf` and waits until its channel waits for the callback; the channel
/// id and its socket's URL without a token.
async fn channel_awaiting_callback(c: &Courier) -> (String, String) {
    let (s, r) = c
        .post_json("/v1/ai/async", &json!({"workflow": "wf"}))
        .await;
    assert_eq!(s, 202, "{r}");
    let id = r["channel_id"].as_str().unwrap().to_string();
    wait_channel(c, &id, |ch| ch["status"] == "ai_generated").await;
    let url = format!(
        "{}{}",
        c.base.replace("http://", "ws://"),
        r["ws_url"].as_str().unwrap()
    );
    (id, url)
}

/// Courier going away (1001, at shutdown) is not the end of the channel: ws_watch says so,
/// reconnects once courier is back, skips the latest state it already printed, and exits
/// 0 after the final message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_watch_reconnects_across_a_restart() {
    if !available("python3", &["--version"]) {
        return;
    }
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let extra = watched_workflow(&rx, &upstream, "");
    let mut c = Courier::start(&extra).await;
    let (id, url) = channel_awaiting_callback(&c).await;
    let mut w = Watcher::start(&format!("{url}?token={ADMIN}"), None);
    assert_eq!(w.frame().await["status"], "ai_generated");

    // Stop courier; start it again on the same address and data.
    let addr = c.base.trim_start_matches("http://").to_string();
    c.running.take().unwrap().shutdown().await;
    w.error_with("1001").await;
    let text = base_config(&c.dir.path().join("data"), &extra)
        .replace("\"127.0.0.1:0\"", &format!("\"{addr}\""));
    let config = courier::config::Config::parse(&text, c.dir.path(), None, "test.toml").unwrap();
    c.running = Some(courier::server::start(config).await.unwrap());
    c.wait_subscribers(1).await;

    let (s, e) = c
        .post_json(
            &format!("/v1/callback/{id}"),
            &json!({"data": {"saved": true}}),
        )
        .await;
    assert_eq!(s, 200, "{e}");
    // The latest state, sent first on the new socket, is not printed twice.
    let done = w.frame().await;
    assert_eq!(done["status"], "success", "{done}");
    assert!(w.exit().await.success());
    c.stop().await;
}

/// A socket whose key a reload removed is closed with 1008: ws_watch does not reconnect (the
/// key would be refused) and exits non-zero, saying why. (The key goes in a header here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_watch_stops_with_an_error_when_its_key_is_revoked() {
    if !available("python3", &["--version"]) {
        return;
    }
    const LEAVING: &str = "test-leaving-ingest-token1";
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body(AI));
    let rx = Receiver::start().await;
    let c = Courier::start_file(&watched_workflow(
        &rx,
        &upstream,
        &format!("[[keys]]\ntoken = \"{LEAVING}\"\nscopes = [\"ingest\"]\n"),
    ))
    .await;
    let (id, url) = channel_awaiting_callback(&c).await;
    let mut w = Watcher::start(&url, Some(LEAVING));
    assert_eq!(w.frame().await["status"], "ai_generated");

    c.rewrite_config(&watched_workflow(&rx, &upstream, ""));
    c.wait_config(|st| st["version"] == 2).await;
    // The next message is the socket's cue to check its key.
    let (s, e) = c
        .post_json(
            &format!("/v1/callback/{id}"),
            &json!({"data": {"saved": true}}),
        )
        .await;
    assert_eq!(s, 200, "{e}");
    w.error_with("1008").await;
    let status = w.exit().await;
    assert!(!status.success(), "ws_watch claimed success: {status}");
    assert_eq!(w.frames.recv().await, None, "a revoked socket printed more");
    c.stop().await;
}

#[tokio::test]
async fn workflow_walkthrough_with_the_example_upstream_and_ws_client() {
    if !available("python3", &["--version"]) {
        return;
    }
    let port = free_port();
    let mut upstream = Child(
        Command::new("python3")
            .arg(root().join("examples/fake_upstream.py"))
            .args(["--port", &port.to_string(), "--delay", "0.2"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(upstream.0.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().contains("listening"));
    let rx = Receiver::start().await;
    let c = Courier::start(&format!(
        "{DELIVERY_FAST}{}[[workflows]]\nname = \"movie_suggestion\"\nupstream = {{ url = \"http://127.0.0.1:{port}/v1/chat/completions\" }}\nendpoint = \"app\"\nevent_name = \"new_movie_suggestion\"\n",
        endpoint("app", &rx.url("/hooks/ai"), "")
    ))
    .await;
    let (s, r) = c
        .post_json("/v1/ai/async", &json!({"workflow": "movie_suggestion", "messages": [{"role": "user", "content": "a film?"}]}))
        .await;
    assert_eq!(s, 202);
    let id = r["channel_id"].as_str().unwrap().to_string();
    let ws_url = format!(
        "{}{}?token={ADMIN}",
        c.base.replace("http://", "ws://"),
        r["ws_url"].as_str().unwrap()
    );
    let mut w = Watcher::start(&ws_url, None);
    let t = Duration::from_secs(15);
    let hook = rx.wait_for(1, t).await[0].json();
    assert_eq!(hook["ai_response"]["suggestion"]["title"], "Arrival");
    assert_eq!(hook["ai_response"]["prompt_echo"], "a film?");
    // The watcher shows ai_generated (as the latest state when it connects, or live).
    loop {
        let f = w.frame().await;
        if f["status"] == "ai_generated" {
            break;
        }
        assert_eq!(f["status"], "pending", "{f}");
    }
    let (s, _) = c
        .post_json(
            &format!("/v1/callback/{id}"),
            &json!({"data": {"saved": true}, "task_id": "t1", "metadata": {}}),
        )
        .await;
    assert_eq!(s, 200);
    let done = w.frame().await;
    assert_eq!(done["status"], "success", "{done}");
    assert_eq!(done["data"], json!({"saved": true}));
    // The watcher exits by itself once the channel is final.
    assert!(w.exit().await.success());
    c.stop().await;
}

#[test]
fn workflow_example_config_passes_check() {
    check_example("examples/workflow.toml", "WEBHOOK_SECRET");
}

#[test]
fn deployment_example_config_passes_check() {
    check_example("examples/behind-proxy.toml", "APP_SECRET");
    assert!(root().join("examples/courier.service").exists());
    assert!(root().join("examples/nginx.conf").exists());
}

/// The nginx example keeps every URL that may carry `?token=` out of its access log: the
/// channel's state (`GET /v1/channels/{id}`) as well as its socket.
#[test]
fn the_nginx_example_logs_no_channel_url() {
    let conf = std::fs::read_to_string(root().join("examples/nginx.conf")).unwrap();
    // The literal prefixes of the regex locations that turn the access log off (the
    // example's patterns are `^` and a literal prefix; anything else fails here).
    let mut unlogged = Vec::new();
    for block in conf.split("location ").skip(1) {
        let (head, body) = block.split_once('{').unwrap();
        let body = body.split('}').next().unwrap();
        if !body.lines().any(|l| l.trim() == "access_log off;") {
            continue;
        }
        let pattern = head.trim().strip_prefix("~ ^").expect("a `~ ^…` location");
        assert!(
            !pattern.contains(['[', ']', '(', ')', '$', '*', '+', '?', '|', '\\', '.']),
            "not a literal prefix: {pattern}"
        );
        unlogged.push(pattern.to_string());
    }
    for path in [
        "/v1/channels/3f1c0000-0000-4000-8000-000000000000?token=t",
        "/v1/channels/3f1c0000-0000-4000-8000-000000000000/ws?token=t",
    ] {
        assert!(
            unlogged.iter().any(|p| path.starts_with(p.as_str())),
            "{path} is logged (unlogged: {unlogged:?})"
        );
    }
}

/// Where nginx is installed (it need not be, even in CI), the example passes `nginx -t`:
/// in a scratch prefix, with a throwaway certificate and loopback ports in place of 443/80.
#[test]
fn the_nginx_example_passes_nginx_t() {
    if !available("nginx", &["-v"]) {
        return;
    }
    let v = Command::new("nginx").arg("-v").output().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=hooks.example.com", "-keyout"])
        .arg(d.join("key.pem"))
        .arg("-out")
        .arg(d.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !made.is_ok_and(|s| s.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "openssl must make a certificate in CI (.ci/run installs it)"
        );
        eprintln!("skipping: openssl cannot make a certificate here");
        return;
    }
    let conf = std::fs::read_to_string(root().join("examples/nginx.conf")).unwrap();
    let mut site = conf.clone();
    for (from, to) in [
        (
            "/etc/letsencrypt/live/hooks.example.com/fullchain.pem",
            d.join("cert.pem").display().to_string(),
        ),
        (
            "/etc/letsencrypt/live/hooks.example.com/privkey.pem",
            d.join("key.pem").display().to_string(),
        ),
        (
            "listen 443 ssl;",
            format!("listen 127.0.0.1:{} ssl;", free_port()),
        ),
        ("listen 80;", format!("listen 127.0.0.1:{};", free_port())),
    ] {
        assert!(site.contains(from), "nginx.conf has no `{from}`");
        site = site.replace(from, &to);
    }
    // `http2 on;` came with nginx 1.25.1; an older nginx checks the rest.
    let version = String::from_utf8_lossy(&v.stderr);
    let version: Vec<u32> = version
        .split("nginx/")
        .nth(1)
        .unwrap_or("0")
        .split(|c: char| !c.is_ascii_digit() && c != '.')
        .next()
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    if version < vec![1, 25, 1] {
        site = site.replace("http2 on;", "# http2 on;");
    }
    std::fs::write(d.join("site.conf"), site).unwrap();
    let p = d.display();
    std::fs::write(
        d.join("main.conf"),
        format!(
            "pid {p}/nginx.pid;\nerror_log {p}/error.log;\nevents {{}}\nhttp {{\n  access_log {p}/access.log;\n  client_body_temp_path {p}/tmp;\n  proxy_temp_path {p}/tmp;\n  fastcgi_temp_path {p}/tmp;\n  uwsgi_temp_path {p}/tmp;\n  scgi_temp_path {p}/tmp;\n  include {p}/site.conf;\n}}\n"
        ),
    )
    .unwrap();
    let out = Command::new("nginx")
        .arg("-t")
        .arg("-p")
        .arg(d)
        .arg("-e")
        .arg(d.join("error.log"))
        .arg("-c")
        .arg(d.join("main.conf"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
