//! The deliverer: turns one due delivery into one signed HTTP attempt and reports what came
//! back. It decides nothing about retries ([`crate::outcome`] does) and writes nothing.

pub mod client;
pub mod sign;

use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::EndpointConfig;
use crate::model::{Event, now_ms};

/// How much of a response body the audit trail keeps.
pub const RESPONSE_EXCERPT: usize = 4096;

/// What one attempt produced.
#[derive(Debug, Clone)]
pub struct AttemptResult {
    pub started_ms: u64,
    pub duration_ms: u64,
    pub status: Option<u16>,
    /// Error class when there was no response.
    pub error: Option<&'static str>,
    pub error_detail: Option<String>,
    /// A `Retry-After` on the response, as a delay.
    pub retry_after: Option<Duration>,
    /// The receiver sent `webhook-delivery: abort`.
    pub abort: bool,
    pub body_excerpt: String,
    /// Whether `duration_ms` is a request's: false when none was made (a plugin failed, the
    /// SSRF guard refused the address), which latency figures leave out.
    pub measured: bool,
}

impl AttemptResult {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// A short label for logs and the audit trail: the status code or the error class.
    pub fn label(&self) -> String {
        match (self.status, self.error) {
            (Some(s), _) => s.to_string(),
            (None, Some(e)) => e.to_string(),
            (None, None) => "unknown".into(),
        }
    }

    /// An attempt that failed before anything was sent (a plugin failed).
    pub fn not_sent(class: &'static str, detail: String) -> Self {
        AttemptResult {
            measured: false,
            ..Self::failed(Instant::now(), now_ms(), class, detail)
        }
    }

    fn failed(started: Instant, started_ms: u64, class: &'static str, detail: String) -> Self {
        AttemptResult {
            started_ms,
            duration_ms: started.elapsed().as_millis() as u64,
            status: None,
            error: Some(class),
            error_detail: Some(detail),
            retry_after: None,
            abort: false,
            body_excerpt: String::new(),
            measured: true,
        }
    }
}

/// The request as it will go on the wire, before signing.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub url: url::Url,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Builds the outgoing request for `event` to `endpoint` (endpoint headers and content type).
pub fn outgoing(endpoint: &EndpointConfig, event: &Event) -> Outgoing {
    let mut headers: Vec<(String, String)> = endpoint
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    headers.push(("content-type".into(), event.content_type.clone()));
    headers.extend(event.headers.iter().cloned());
    Outgoing {
        url: endpoint.url.clone(),
        headers,
        body: event.payload.clone(),
    }
}

/// Signs and sends one attempt. `webhook_id` is the same for every attempt of a delivery.
pub async fn send(
    client: &reqwest::Client,
    out: Outgoing,
    secrets: &[String],
    webhook_id: &str,
    timeout: Duration,
    allow_private: bool,
    extra: &[(&str, &str)],
) -> AttemptResult {
    let started = Instant::now();
    let started_ms = now_ms();
    if let Err(e) = client::check_literal(&out.url, allow_private) {
        return AttemptResult::not_sent("ssrf_blocked", e.to_string());
    }
    let timestamp = (started_ms / 1000) as i64;
    let sigs = sign::sign_all(secrets, webhook_id, timestamp, &out.body);
    let mut headers = HeaderMap::with_capacity(out.headers.len() + 8);
    for (k, v) in out
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(extra.iter().copied())
        .filter(|(k, _)| !crate::config::is_connection_header(k))
    {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    }
    let ts = timestamp.to_string();
    let fixed = [
        ("webhook-id", webhook_id),
        ("webhook-timestamp", ts.as_str()),
        ("mr-timestamp", ts.as_str()),
    ];
    for (k, v) in fixed {
        if let Ok(v) = HeaderValue::from_str(v) {
            headers.insert(k, v);
        }
    }
    if !sigs.webhook_signature.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&sigs.webhook_signature) {
            headers.insert("webhook-signature", v);
        }
        if let Ok(v) = HeaderValue::from_str(&sigs.mr_signature) {
            headers.insert("mr-signature", v);
        }
    }
    let request = client
        .post(out.url.clone())
        .headers(headers)
        .timeout(timeout)
        .body(out.body);
    let mut response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            // Described without the URL: its path and query may be the credential (a chat
            // service's webhook URL), and the detail goes to the log and the audit trail.
            let class = client::classify(&e);
            let failed = AttemptResult::failed(
                started,
                started_ms,
                class,
                client::describe(&e.without_url()),
            );
            // A name the SSRF guard refused in the resolver made no request either.
            return AttemptResult {
                measured: class != "ssrf_blocked",
                ..failed
            };
        }
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    let abort = response
        .headers()
        .get("webhook-delivery")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("abort"));
    // Read at most the excerpt, within the same timeout and at most BODY_GRACE after the
    // status: a slow body does not fail an attempt whose status already arrived, nor hold
    // it (and a FIFO endpoint's queue behind it) until the timeout.
    let mut excerpt = Vec::new();
    let deadline = (started + timeout).min(Instant::now() + BODY_GRACE);
    while excerpt.len() < RESPONSE_EXCERPT {
        match tokio::time::timeout_at(deadline.into(), response.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                let take = (RESPONSE_EXCERPT - excerpt.len()).min(chunk.len());
                excerpt.extend_from_slice(&chunk[..take]);
            }
            _ => break,
        }
    }
    AttemptResult {
        started_ms,
        duration_ms: started.elapsed().as_millis() as u64,
        status: Some(status),
        error: None,
        error_detail: None,
        retry_after,
        abort,
        body_excerpt: excerpt_text(&excerpt),
        measured: true,
    }
}

/// The response excerpt as text, at most [`RESPONSE_EXCERPT`] bytes: bytes that are not
/// UTF-8 become U+FFFD, three bytes each, so the text is cut again at a character boundary.
fn excerpt_text(bytes: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if text.len() > RESPONSE_EXCERPT {
        let mut end = RESPONSE_EXCERPT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// How long the response body excerpt is waited for once the status is in.
const BODY_GRACE: Duration = Duration::from_secs(1);

/// `Retry-After` as delay-seconds or an HTTP date.
pub fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    // Anything beyond a day counts as a day (the longest courier waits on a receiver's
    // word), so that no later sum or conversion of it can overflow.
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(crate::outcome::MAX_RETRY_AFTER));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(crate::outcome::MAX_RETRY_AFTER),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_excerpt_stays_within_its_4_kib_whatever_the_bytes() {
        let binary = excerpt_text(&[0xff; RESPONSE_EXCERPT]);
        assert!(binary.len() <= RESPONSE_EXCERPT, "{}", binary.len());
        assert!(binary.chars().all(|c| c == char::REPLACEMENT_CHARACTER));
        assert_eq!(excerpt_text(b"ok"), "ok");
        let text = "é".repeat(RESPONSE_EXCERPT / 2);
        assert_eq!(excerpt_text(text.as_bytes()), text);
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        let day = Some(Duration::from_secs(24 * 3600));
        assert_eq!(parse_retry_after("18446744073709552"), day);
        assert_eq!(parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT"), day);
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
