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

/// Splits an HTTP message into headers and body (CRLF or LF line ends) at the first empty
/// line, whatever the body holds after it.
pub fn parse(input: &[u8]) -> Result<Webhook, String> {
    let (head, body) = split_head(input)
        .ok_or_else(|| "expected headers, an empty line, then the body".to_string())?;
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

/// The head (without its last line end) and the body after the first empty line.
fn split_head(input: &[u8]) -> Option<(&[u8], &[u8])> {
    input
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .find_map(|(i, _)| {
            let rest = &input[i + 1..];
            let head = &input[..i];
            if rest.starts_with(b"\n") {
                Some((head, &rest[1..]))
            } else if rest.starts_with(b"\r\n") {
                Some((head, &rest[2..]))
            } else {
                None
            }
        })
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

    /// The head ends at the first empty line, in either line-end style, whatever empty
    /// lines of the other style the body holds.
    #[test]
    fn the_body_starts_after_the_first_empty_line() {
        let body = b"line one\r\n\r\nline three\n\nend";
        for eol in ["\n", "\r\n"] {
            let mut msg = format!("POST /hook HTTP/1.1{eol}webhook-id: msg_1{eol}x-a: b{eol}{eol}")
                .into_bytes();
            msg.extend_from_slice(body);
            let w = parse(&msg).unwrap();
            assert_eq!(w.body, body, "line ends {eol:?}");
            assert_eq!(w.header("webhook-id"), Some("msg_1"));
            assert_eq!(w.header("x-a"), Some("b"));
        }
        assert!(parse(b"webhook-id: x\nno empty line").is_err());
    }
}
