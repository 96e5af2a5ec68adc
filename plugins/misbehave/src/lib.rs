//! `misbehave`: a transform that fails on purpose, for testing courier's sandbox. Config
//! `mode`: `trap` (panics), `loop` (never returns), `sleep` (sleeps for an hour on the WASI
//! clock), `timer` (sets a timer an hour ahead and returns without waiting on it, passing the
//! request through), `hog` (allocates without bound),
//! `error` (returns an error), `drop` (drops the delivery), `headers` (returns 25,000
//! headers), `badheader` (returns a header name HTTP does not allow), `framing` (adds
//! `transfer-encoding: gzip`, `connection: close` and `expect: 100-continue` to a body it
//! leaves as it is), `bigerror` (returns a 1 MiB error whose first line break would start a
//! forged log line), `bigheader` (adds a 16 KiB header value), `bigbody` (returns a
//! 200,000-byte body); anything else passes the request through.

wit_bindgen::generate!({ path: "../../wit", world: "transformer" });

use courier::plugin::host::config_get;
use courier::plugin::types::Header;

struct Misbehave;

impl Guest for Misbehave {
    fn transform(req: Request) -> Result<TransformOutcome, String> {
        match config_get("mode").as_deref() {
            Some("trap") => panic!("misbehave: trapping on purpose"),
            Some("loop") => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            Some("sleep") => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Ok(TransformOutcome::Send(req))
            }
            Some("timer") => {
                // A timer set an hour ahead, far past the call's time limit, and never
                // waited on: the call returns at once and is not a timeout.
                let timer = wasip2::clocks::monotonic_clock::subscribe_duration(3_600_000_000_000);
                drop(timer);
                Ok(TransformOutcome::Send(req))
            }
            Some("hog") => {
                let mut chunks: Vec<Vec<u8>> = Vec::new();
                loop {
                    chunks.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&chunks);
                }
            }
            Some("error") => Err("misbehave: failing on purpose".into()),
            Some("drop") => Ok(TransformOutcome::Drop(
                "misbehave: not for this endpoint".into(),
            )),
            Some("headers") => {
                let mut req = req;
                for i in 0..25_000 {
                    req.headers.push(Header {
                        name: format!("x-n{i}"),
                        value: "1".into(),
                    });
                }
                Ok(TransformOutcome::Send(req))
            }
            Some("badheader") => {
                let mut req = req;
                req.headers.push(Header {
                    name: "bad name".into(),
                    value: "1".into(),
                });
                Ok(TransformOutcome::Send(req))
            }
            Some("framing") => {
                let mut req = req;
                for (name, value) in [
                    ("transfer-encoding", "gzip"),
                    ("connection", "close"),
                    ("expect", "100-continue"),
                ] {
                    req.headers.push(Header {
                        name: name.into(),
                        value: value.into(),
                    });
                }
                Ok(TransformOutcome::Send(req))
            }
            Some("bigerror") => Err(format!(
                "misbehave: failing\r\nlevel=ERROR forged line {}",
                "x".repeat(1 << 20)
            )),
            Some("bigheader") => {
                let mut req = req;
                req.headers.push(Header {
                    name: "x-big".into(),
                    value: "v".repeat(16 << 10),
                });
                Ok(TransformOutcome::Send(req))
            }
            Some("bigbody") => {
                let mut req = req;
                req.body = vec![b'a'; 200_000];
                Ok(TransformOutcome::Send(req))
            }
            _ => Ok(TransformOutcome::Send(req)),
        }
    }
}

export!(Misbehave);
