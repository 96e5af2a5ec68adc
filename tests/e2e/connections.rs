//! The limits every API connection lives under: the time to send a request's headers (and to
//! stay idle between requests), the size of those headers, and how many connections are
//! served at once.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Courier with `server` settings added to the test config's `[server]` table, and `extra`
/// after it.
async fn with_server(settings: &str, extra: &str) -> (tempfile::TempDir, courier::server::Running) {
    let dir = tempfile::tempdir().unwrap();
    let text = base_config(&dir.path().join("data"), extra).replace(
        "max_body_bytes = 65536",
        &format!("max_body_bytes = 65536\n{settings}"),
    );
    let config = courier::config::Config::parse(&text, dir.path(), None, "test.toml").unwrap();
    (dir, courier::server::start(config).await.unwrap())
}

/// Reads from `s` until the server closes it (or `limit` passes); what was read, and
/// whether it closed.
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), true),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_slow_to_send_its_headers_or_idle_too_long_is_closed() {
    let (_dir, running) = with_server("header_timeout = \"1s\"", "").await;
    let addr = running.addr;
    tokio::task::spawn_blocking(move || {
        // A connection that never sends a byte, and one that stops after the first byte of
        // an HTTP/2 preface.
        for first in [&b""[..], &b"P"[..]] {
            let mut silent = TcpStream::connect(addr).unwrap();
            silent.write_all(first).unwrap();
            let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(20));
            assert!(closed, "a connection that sent {first:?} was kept open");
        }
        // Headers begun and never finished.
        let mut slow = TcpStream::connect(addr).unwrap();
        let opened = Instant::now();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(20));
        assert!(closed, "a connection trickling its headers was kept open");
        assert!(opened.elapsed() >= Duration::from_millis(900));

        // A keep-alive connection: answered, then closed once idle for the timeout.
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let (got, closed) = read_until_closed(&mut idle, Duration::from_secs(20));
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(closed, "an idle connection was kept open");

        // Headers far larger than the read buffer (64 KiB; what one read brings in may go
        // somewhat past it) are refused.
        let mut big = TcpStream::connect(addr).unwrap();
        let filler = "a".repeat(1024 * 1024);
        let _ = big.write_all(
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {filler}\r\n\r\n").as_bytes(),
        );
        let (got, _) = read_until_closed(&mut big, Duration::from_secs(20));
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    })
    .await
    .unwrap();
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_wait_for_one_to_close() {
    let (_dir, running) = with_server("max_connections = 2", "").await;
    let addr = running.addr;
    tokio::task::spawn_blocking(move || {
        let ask = |s: &mut TcpStream| {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
        };
        let answered = |s: &mut TcpStream, within: Duration| {
            s.set_read_timeout(Some(within)).unwrap();
            let mut buf = [0u8; 64];
            matches!(s.read(&mut buf), Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
        };
        // Two connections, each answered and kept open.
        let mut first = TcpStream::connect(addr).unwrap();
        let mut second = TcpStream::connect(addr).unwrap();
        for s in [&mut first, &mut second] {
            ask(s);
            assert!(answered(s, Duration::from_secs(20)));
        }
        // A third is queued by the kernel, not served...
        let mut third = TcpStream::connect(addr).unwrap();
        ask(&mut third);
        assert!(
            !answered(&mut third, Duration::from_secs(1)),
            "a connection past the limit was served"
        );
        // ...until one of the two closes.
        drop(first);
        assert!(answered(&mut third, Duration::from_secs(20)));
    })
    .await
    .unwrap();
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_sockets_count_against_max_connections_once_upgraded() {
    use futures_util::StreamExt;
    let upstream = Receiver::start().await;
    upstream.set_default(Reply::status(200).body("{}").delay(Duration::from_secs(60)));
    let rx = Receiver::start().await;
    let extra = format!(
        "{DELIVERY_FAST}{}[[workflows]]\nname = \"w\"\nupstream = {{ url = \"{}\", timeout = \"120s\" }}\nendpoint = \"app\"\n",
        endpoint("app", &rx.url("/"), ""),
        upstream.url("/")
    );
    let (_dir, running) = with_server("max_connections = 1", &extra).await;
    let base = format!("http://{}", running.addr);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let (s, r) = post_json(
        &http,
        &format!("{base}/v1/ai/async"),
        &serde_json::json!({"workflow": "w"}),
    )
    .await;
    assert_eq!(s, 202, "{r}");
    let url = format!(
        "{}{}?token={ADMIN}",
        base.replace("http://", "ws://"),
        r["ws_url"].as_str().unwrap()
    );
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    assert!(first.next().await.unwrap().is_ok());
    // The one socket allowed is open: another is refused with a 503, not queued.
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("a second socket: {other:?}"),
    }
    // Once it closes, a socket is taken again.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match tokio_tungstenite::connect_async(&url).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "never reopened: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await;
}

/// A request whose body does not arrive within `server.body_timeout` is answered 408 and
/// nothing of it is kept; one that arrives in time is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_is_a_408() {
    let (_dir, running) = with_server("body_timeout = \"1s\"", "").await;
    let addr = running.addr;
    tokio::task::spawn_blocking(move || {
        let body = r#"{"event_type": "t", "payload": {"n": 1}}"#;
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        // Half the body, then nothing.
        let mut slow = TcpStream::connect(addr).unwrap();
        let sent = Instant::now();
        slow.write_all(head.as_bytes()).unwrap();
        slow.write_all(&body.as_bytes()[..10]).unwrap();
        let (got, _) = read_until_closed(&mut slow, Duration::from_secs(20));
        assert!(got.starts_with("HTTP/1.1 408"), "{got}");
        assert!(got.contains("body_timeout"), "{got}");
        assert!(sent.elapsed() >= Duration::from_millis(900));
        // The whole body in time: accepted.
        let mut whole = TcpStream::connect(addr).unwrap();
        whole.write_all(head.as_bytes()).unwrap();
        whole.write_all(body.as_bytes()).unwrap();
        let mut buf = [0u8; 1024];
        let n = whole.read(&mut buf).unwrap();
        let got = String::from_utf8_lossy(&buf[..n]);
        assert!(got.starts_with("HTTP/1.1 202"), "{got}");
    })
    .await
    .unwrap();
    // Only the event whose body arrived was taken.
    let m = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("courier_events_ingested_total 1"), "{m}");
    running.shutdown().await;
}

/// Under an open-file limit too low for `server.max_connections`, courier serves fewer
/// connections: a crowd of idle ones cannot take the descriptors a delivery needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_take_the_descriptors_deliveries_need() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = base_config(
        &dir.path().join("data"),
        &format!(
            "{DELIVERY_FAST}{}",
            endpoint("app", &rx.url("/"), "schedule = [\"3s\"]")
        ),
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    let path = dir.path().join("courier.toml");
    std::fs::write(&path, text).unwrap();
    // A hard limit of 600 open files: 172 connections fit beside the room kept for the rest.
    let mut child = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -n 600 && exec {} serve --config {}",
            env!("CARGO_BIN_EXE_courier"),
            path.display()
        ))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/readyz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "courier did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An event whose first attempt is due in 3 s, then 700 idle connections.
    let r = http
        .post(format!("{base}/v1/events"))
        .bearer_auth(ADMIN)
        .body(r#"{"event_type": "t", "payload": {"n": 1}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let idle: Vec<TcpStream> = (0..700)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // The delivery still goes out.
    let got = rx.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(got[0].json()["n"], 1);
    drop(idle);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("open-file limit is too low"), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
}
