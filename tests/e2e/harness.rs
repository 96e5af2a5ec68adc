#![allow(dead_code)]
//! Test harness: a real courier on port 0 with a temporary data dir, a fake receiver that
//! records what it got and answers what the test tells it, and a small HTTP client.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::Value;

pub const ADMIN: &str = "test-admin-token-0000001";
pub const INGEST_ONLY: &str = "test-ingest-token-000001";
pub const ADMIN_ONLY: &str = "test-adminonly-token-001";
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    pub at: Instant,
    pub peer: SocketAddr,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

/// What the receiver answers.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
    pub body: String,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            delay: Duration::ZERO,
            body: String::new(),
        }
    }
    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
    pub fn body(mut self, b: &str) -> Reply {
        self.body = b.into();
        self
    }
}

#[derive(Default)]
struct ReceiverState {
    got: Mutex<Vec<Received>>,
    /// Requests being answered right now, and the most ever at once.
    active: Mutex<(usize, usize)>,
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Option<Reply>>,
}

/// A fake webhook receiver on 127.0.0.1.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(st): State<Arc<ReceiverState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    st.got.lock().unwrap().push(Received {
        path: uri.path().to_string(),
        headers,
        body: body.to_vec(),
        at: Instant::now(),
        peer,
    });
    let reply = st
        .script
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| st.default.lock().unwrap().clone())
        .unwrap_or_else(|| Reply::status(200));
    {
        let mut a = st.active.lock().unwrap();
        a.0 += 1;
        a.1 = a.1.max(a.0);
    }
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    st.active.lock().unwrap().0 -= 1;
    let mut resp = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Receiver {
        let state = Arc::new(ReceiverState::default());
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
        Receiver { addr, state, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Queue replies for the next requests, in order.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    /// The reply once the script is used up.
    pub fn set_default(&self, reply: Reply) {
        *self.state.default.lock().unwrap() = Some(reply);
    }

    /// The most requests this receiver was answering at the same time.
    pub fn max_concurrent(&self) -> usize {
        self.state.active.lock().unwrap().1
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.got.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived (or panics after `timeout`).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            if Instant::now() > deadline {
                panic!(
                    "receiver got {} requests, expected {n}: {:?}",
                    got.len(),
                    got.iter().map(|r| &r.path).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A courier running in this process.
pub struct Courier {
    pub running: Option<courier::server::Running>,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
}

/// The config every test starts from; `extra` is appended (endpoints etc.).
pub fn base_config(data_dir: &Path, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
data_dir = "{dir}"
max_body_bytes = 65536

[[keys]]
token = "{ADMIN}"
scopes = ["ingest", "admin", "callback"]

[[keys]]
token = "{INGEST_ONLY}"
scopes = ["ingest"]

[[keys]]
token = "{ADMIN_ONLY}"
scopes = ["admin"]

{extra}
"#,
        dir = data_dir.display()
    )
}

/// What a fake upstream answers: a chat-completion body.
pub const AI: &str =
    r#"{"choices": [{"message": {"content": "Watch Arrival"}}], "model": "fake-1"}"#;

/// `[delivery]` with private networks allowed (the receiver is on loopback).
pub const DELIVERY_FAST: &str = r#"
[delivery]
allow_private_networks = true
schedule = ["0s", "100ms", "100ms", "100ms"]
jitter = 0.0
timeout = "5s"
"#;

pub fn endpoint(name: &str, url: &str, extra: &str) -> String {
    format!(
        "[[endpoints]]\nname = \"{name}\"\nurl = \"{url}\"\nsecrets = [\"{SECRET}\"]\n{extra}\n"
    )
}

impl Courier {
    /// A courier with the fast delivery schedule and one endpoint (see [`endpoint`]): what
    /// most tests need.
    pub async fn with_endpoint(name: &str, url: &str, extra: &str) -> Courier {
        Self::start(&format!("{DELIVERY_FAST}{}", endpoint(name, url, extra))).await
    }

    pub async fn start(extra: &str) -> Courier {
        let dir = tempfile::tempdir().unwrap();
        let text = base_config(&dir.path().join("data"), extra);
        let config = courier::config::Config::parse(&text, dir.path(), None, "test.toml")
            .unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"));
        let running = courier::server::start(config).await.expect("start courier");
        let base = format!("http://{}", running.addr);
        Courier {
            running: Some(running),
            base,
            dir,
            http: reqwest::Client::new(),
        }
    }

    /// Starts from a config file on disk, so that hot reload can be exercised.
    pub async fn start_file(extra: &str) -> Courier {
        let dir = tempfile::tempdir().unwrap();
        let path = write_config(dir.path(), extra);
        let config = courier::config::Config::load(&path).expect("test config valid");
        Self::start_loaded(config, dir).await
    }

    /// Starts from `config`, loaded from a file in `dir` (laid out as the test needs).
    pub async fn start_loaded(config: courier::config::Config, dir: tempfile::TempDir) -> Courier {
        let running = courier::server::start(config).await.expect("start courier");
        let base = format!("http://{}", running.addr);
        Courier {
            running: Some(running),
            base,
            dir,
            http: reqwest::Client::new(),
        }
    }

    /// Replaces the config file the way editors do (write a temporary file, rename it over).
    pub fn rewrite_config(&self, extra: &str) {
        self.rewrite_config_text(&base_config(&self.dir.path().join("data"), extra));
    }

    pub fn rewrite_config_text(&self, text: &str) {
        let tmp = self.dir.path().join(".courier.toml.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("courier.toml")).unwrap();
    }

    /// Waits until the config status reports `version` (or an error count of `failed`).
    pub async fn wait_config(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, st) = self.get("/v1/config/status").await;
            if pred(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "config status never matched: {st:#}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn app(&self) -> &std::sync::Arc<courier::app::App> {
        &self.running.as_ref().unwrap().app
    }

    /// One API request; returns the status and the JSON body (`Null` when not JSON).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<reqwest::Body>,
    ) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.expect("request");
        (resp.status().as_u16(), resp.json_value().await)
    }

    pub async fn post(
        &self,
        path: &str,
        token: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body.into()))
            .await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post(path, Some(ADMIN), body.to_string()).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.get_as(path, Some(ADMIN)).await
    }

    pub async fn get_as(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    pub async fn text(&self, path: &str) -> String {
        self.http
            .get(format!("{}{}", self.base, path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Scrapes `/metrics` until it holds `line` (an attempt is counted just after its outcome
    /// is on disk, so a moment after the API shows it); the scrape.
    pub async fn metrics_with(&self, line: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.text("/metrics").await;
            if m.lines().any(|l| l == line) {
                return m;
            }
            assert!(Instant::now() < deadline, "never `{line}`: {m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `courier_channel_subscribers` as `/metrics` shows it now.
    pub async fn subscribers(&self) -> i64 {
        let m = self.text("/metrics").await;
        m.lines()
            .find_map(|l| l.strip_prefix("courier_channel_subscribers "))
            .unwrap_or_else(|| panic!("no subscriber gauge in {m}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits until `courier_channel_subscribers` reads `n` (or panics after 30 s): a socket
    /// lets go of its subscription a moment after its connection.
    pub async fn wait_subscribers(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.subscribers().await != n {
            assert!(Instant::now() < deadline, "subscribers never {n}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends an event and returns its reply (asserting 202).
    pub async fn send(&self, body: Value) -> Value {
        let (status, reply) = self.post_json("/v1/events", &body).await;
        assert_eq!(status, 202, "ingest failed: {reply}");
        reply
    }

    /// Polls a delivery until `pred` holds.
    pub async fn wait_delivery(
        &self,
        id: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, d) = self.get(&format!("/v1/deliveries/{id}")).await;
            assert_eq!(status, 200, "{d}");
            if pred(&d) {
                return d;
            }
            if Instant::now() > deadline {
                panic!("delivery never reached the expected state: {d:#}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn wait_status(&self, id: &str, status: &str, timeout: Duration) -> Value {
        self.wait_delivery(id, timeout, |d| d["status"] == status)
            .await
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// A courier binary running as a child process (for signal and crash tests).
pub struct Process {
    pub child: Child,
    pub base: String,
}

impl Process {
    pub fn spawn(config: &Path) -> Process {
        Self::spawn_with_env(config, &[])
    }

    /// With `env` added to its environment.
    pub fn spawn_with_env(config: &Path, env: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
        cmd.args(["serve", "--config"]).arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::start(cmd)
    }

    /// `courier serve` on its embedded defaults, in `dir` (its data goes to
    /// `dir/courier-data`).
    pub fn spawn_defaults(dir: &Path) -> Process {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_courier"));
        cmd.arg("serve").current_dir(dir);
        Self::start(cmd)
    }

    fn start(mut cmd: Command) -> Process {
        use std::io::{BufRead, BufReader};
        let mut child = cmd
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("COURIER_TEST_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("spawn courier");
        let stdout = child.stdout.take().unwrap();
        // Read on a thread of its own (which then drains the rest): a courier that never
        // prints its listening line fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("courier listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(base) => base,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                match e {
                    std::sync::mpsc::RecvTimeoutError::Timeout => {
                        panic!("courier did not print its listening line within 60 s")
                    }
                    std::sync::mpsc::RecvTimeoutError::Disconnected => {
                        panic!("courier exited before listening")
                    }
                }
            }
        };
        Process { child, base }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, returning its status (panics after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!("courier did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `request` (a whole HTTP request) on a new connection to courier at `base`, then
/// resets the connection `after` later: a client that gives up while courier works.
pub async fn send_then_reset(base: &str, request: &str, after: Duration) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(after).await;
    s.set_zero_linger().unwrap();
    drop(s);
}

/// Writes a config file for a child process into `dir`.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("courier.toml");
    std::fs::write(&path, base_config(&dir.join("data"), extra)).unwrap();
    path
}

/// A `[[plugins]]` entry for the component built from `plugins/{file}`, with `extra` lines.
pub fn plugin_entry(name: &str, file: &str, kind: &str, extra: &str) -> String {
    format!(
        "[[plugins]]\nname = \"{name}\"\npath = \"{}\"\nkind = \"{kind}\"\n{extra}\n",
        plugin(file).display()
    )
}

/// The compiled example plugin `name` (e.g. "redact"), building the plugins workspace once
/// per test run (`cargo build --release --target wasm32-wasip2`).
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
    BUILT.get_or_init(|| {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--target", "wasm32-wasip2", "--quiet"])
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", root.join("target"))
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .status()
            .expect("run cargo to build the plugins");
        assert!(status.success(), "building plugins/ failed (is the wasm32-wasip2 target installed? rustup target add wasm32-wasip2)");
    });
    let path = root
        .join("target/wasm32-wasip2/release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.exists(), "{} missing", path.display());
    path
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Posts a `/v1/events` body with the admin key to the server at `base`, asserts the 202 and
/// returns its reply.
pub async fn post_event(http: &reqwest::Client, base: &str, body: String) -> Value {
    let r = http
        .post(format!("{base}/v1/events"))
        .bearer_auth(ADMIN)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

pub async fn get_json(http: &reqwest::Client, url: &str) -> (u16, Value) {
    let resp = http
        .get(url)
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json_value().await)
}

pub async fn post_json(http: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let resp = http
        .post(url)
        .bearer_auth(ADMIN)
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.json_value().await)
}

/// The JSON body of a response (`Null` when it is not JSON).
pub trait JsonValue {
    async fn json_value(self) -> Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> Value {
        let b = self.bytes().await.unwrap();
        serde_json::from_slice(&b).unwrap_or(Value::Null)
    }
}

/// Waits until workflow channel `id` matches `pred` (or panics after 30 s).
pub async fn wait_channel(c: &Courier, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, ch) = c.get(&format!("/v1/channels/{id}")).await;
        if pred(&ch) {
            return ch;
        }
        assert!(Instant::now() < deadline, "channel never matched: {ch:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
