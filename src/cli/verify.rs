//! `courier verify`: checks a received webhook's signatures, for receivers debugging their
//! verification code.
//!
//! Input is the webhook as an HTTP message: an optional request line (`POST /hook HTTP/1.1`),
//! header lines, an empty line, then the body exactly as received.

use crate::deliver::sign;

/// A parsed webhook.
#[derive(Debug, PartialEq)]
pub struct Webhook {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Webhook {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Splits an HTTP message into headers and body (CRLF or LF line ends).
pub fn parse(input: &[u8]) -> Result<Webhook, String> {
    let (head, body) = match find(input, b"\r\n\r\n") {
        Some(i) => (&input[..i], &input[i + 4..]),
        None => match find(input, b"\n\n") {
            Some(i) => (&input[..i], &input[i + 2..]),
            None => return Err("expected headers, an empty line, then the body".into()),
        },
    };
    let head = std::str::from_utf8(head).map_err(|_| "headers are not UTF-8".to_string())?;
    let mut headers = Vec::new();
    for (n, line) in head.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if n == 0 && (line.contains(" HTTP/") || line.starts_with("POST ")) {
            continue;
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| format!("line {}: `{line}` is not a header", n + 1))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok(Webhook {
        headers,
        body: body.to_vec(),
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The verdict on each signature.
#[derive(Debug)]
pub struct Report {
    pub lines: Vec<String>,
    pub valid: bool,
}

/// Verifies both signatures with `secret`; `now` (unix seconds) enables the 5-minute
/// timestamp check.
pub fn verify(w: &Webhook, secret: &str, now: Option<i64>) -> Report {
    let mut lines = Vec::new();
    let mut valid = true;
    if let Err(e) = sign::decode_secret(secret) {
        return Report {
            lines: vec![format!("secret: {e}")],
            valid: false,
        };
    }
    match (
        w.header("webhook-id"),
        w.header("webhook-timestamp"),
        w.header("webhook-signature"),
    ) {
        (Some(id), Some(ts), Some(sig)) => match ts.parse::<i64>() {
            Ok(ts) => match sign::verify_standard(secret, id, ts, &w.body, sig, now) {
                Ok(()) => lines.push(format!("webhook-signature: valid (webhook-id {id})")),
                Err(e) => {
                    valid = false;
                    lines.push(format!("webhook-signature: INVALID: {e}"));
                }
            },
            Err(_) => {
                valid = false;
                lines.push(format!("webhook-timestamp: `{ts}` is not unix seconds"));
            }
        },
        _ => {
            valid = false;
            lines.push("webhook-signature: missing webhook-id, webhook-timestamp or webhook-signature header".into());
        }
    }
    match w.header("mr-signature") {
        Some(sig) => match sign::verify_mr(secret, &w.body, sig) {
            Ok(()) => lines.push("mr-signature: valid".into()),
            Err(e) => {
                valid = false;
                lines.push(format!("mr-signature: INVALID: {e}"));
            }
        },
        None => {
            valid = false;
            lines.push("mr-signature: missing header".into());
        }
    }
    if !valid {
        lines.push(format!(
            "hint: the signatures cover the raw body bytes ({} bytes here); verify before parsing or re-serialising it",
            w.body.len()
        ));
    }
    Report { lines, valid }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_a_vector_as_an_http_message() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let msg = format!(
            "POST /hook HTTP/1.1\r\nwebhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek\r\nwebhook-timestamp: 1614265330\r\nwebhook-signature: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=\r\nmr-signature: {}\r\n\r\n{}",
            sign::mr_signature(secret, body),
            std::str::from_utf8(body).unwrap()
        );
        let w = parse(msg.as_bytes()).unwrap();
        let r = verify(&w, secret, None);
        assert!(r.valid, "{:?}", r.lines);
        let stale = verify(&w, secret, Some(1614265330 + 3600));
        assert!(!stale.valid);
        let mut tampered = w;
        tampered.body.push(b' ');
        assert!(!verify(&tampered, secret, None).valid);
    }
}
