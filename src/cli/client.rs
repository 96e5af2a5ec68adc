//! The operator commands that talk to a running courier over its API: `deliveries`, `dlq`,
//! `endpoints`, `stats`, `send`. Human-readable tables by default, the API's JSON with
//! `--json`.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use reqwest::Url;
use reqwest::header::HeaderMap;
use serde_json::Value;

use super::table::{self, id, text};

/// Where and how to reach courier.
pub struct Api {
    base: Url,
    token: Option<String>,
    timeout: Duration,
    connect_timeout: Duration,
    http: reqwest::Client,
}

/// The longest a connection to courier may take to open (within `--timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of an answer that is not courier's JSON an error shows.
const EXCERPT: usize = 200;

/// A successful answer: courier's JSON and the response headers.
pub struct Answer {
    pub value: Value,
    pub headers: HeaderMap,
}

/// `url` as an error may show it: without a password, query or fragment.
fn shown(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// The first [`EXCERPT`] characters of `text`, marked when cut.
fn excerpt(text: &str) -> String {
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".into();
    }
    if text.chars().count() > EXCERPT {
        format!("{}…", text.chars().take(EXCERPT).collect::<String>())
    } else {
        text.to_string()
    }
}

impl Api {
    /// `url` is courier's base URL (a path prefix is kept); every request gives up after
    /// `timeout` in all, connecting after at most 10 s of it.
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> anyhow::Result<Api> {
        let base = Url::parse(url.trim())
            .map_err(|e| anyhow!("--url (or COURIER_URL) is not a URL: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            bail!(
                "--url (or COURIER_URL) must be an http:// or https:// URL, not {}",
                shown(&base)
            );
        }
        let connect_timeout = timeout.min(CONNECT_TIMEOUT);
        Ok(Api {
            base,
            token,
            timeout,
            connect_timeout,
            http: reqwest::Client::builder()
                .user_agent(concat!("courier-cli/", env!("CARGO_PKG_VERSION")))
                // A redirect (to a login page, say) is not courier's answer.
                .redirect(reqwest::redirect::Policy::none())
                // A server that accepts and never answers must not hang the command.
                .connect_timeout(connect_timeout)
                .timeout(timeout)
                .build()
                .context("cannot set up the HTTP client")?,
        })
    }

    /// The URL of `segments` under the base URL, each one percent-encoded as a path segment
    /// (a space is `%20`, a `/` is `%2F`: an id or name arrives as it was given).
    fn url(&self, segments: &[&str]) -> anyhow::Result<Url> {
        if let Some(dots) = segments.iter().find(|s| matches!(**s, "." | "..")) {
            // URLs read these as "this" and "the parent" directory, whatever the encoding.
            bail!("`{dots}` cannot be named in a URL path");
        }
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        url.path_segments_mut()
            .map_err(|_| anyhow!("--url cannot be a base URL"))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    /// What a request that failed on the way says: which URL, and whether it timed out.
    fn transport_error(&self, e: reqwest::Error, url: &Url, reading: bool) -> anyhow::Error {
        let at = shown(url);
        let msg = if e.is_timeout() && e.is_connect() {
            format!(
                "cannot connect to courier at {at} within {}",
                humantime::format_duration(self.connect_timeout)
            )
        } else if e.is_timeout() {
            format!(
                "no answer from courier at {at} within {} (--timeout)",
                humantime::format_duration(self.timeout)
            )
        } else if reading {
            format!("cannot read courier's answer from {at}")
        } else {
            format!("cannot reach courier at {at}")
        };
        // The error's own text without its URL, which carries the query.
        anyhow::Error::new(e.without_url()).context(msg)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        query: &[(&str, Option<String>)],
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Answer> {
        let url = self.url(segments)?;
        let query: Vec<(&str, String)> = query
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (*k, v)))
            .collect();
        let mut req = self.http.request(method, url.clone()).query(&query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(e, &url, false))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.transport_error(e, &url, true))?;
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return match json {
                Some(value) if !value.is_string() => Ok(Answer { value, headers }),
                _ => bail!(
                    "{status} but not courier's JSON answer (is --url pointing at courier?): {}",
                    excerpt(&String::from_utf8_lossy(&bytes))
                ),
            };
        }
        Err(self.refusal(status, &bytes))
    }

    /// What courier's answer `status` with `bytes` says went wrong.
    fn refusal(&self, status: reqwest::StatusCode, bytes: &[u8]) -> anyhow::Error {
        let json: Option<Value> = serde_json::from_slice(bytes).ok();
        let err = json.as_ref().map(|v| &v["error"]);
        let msg = match err.and_then(|e| e["message"].as_str()) {
            Some(message) => {
                let err = err.expect("an error object");
                let mut about = Vec::new();
                if let Some(code) = err["code"].as_str() {
                    about.push(format!("code {code}"));
                }
                if let Some(field) = err["field"].as_str() {
                    about.push(format!("field {field}"));
                }
                if about.is_empty() {
                    message.to_string()
                } else {
                    format!("{message} ({})", about.join(", "))
                }
            }
            None => excerpt(&String::from_utf8_lossy(bytes)),
        };
        if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
            return anyhow!("{status}: {msg} (pass --token or set COURIER_KEY)");
        }
        anyhow!("{status}: {msg}")
    }

    /// A GET whose successful answer is a file: written to `out` as it arrives. Returns
    /// its length and the answer's headers; an answer cut short (fewer bytes than its
    /// `content-length`) is an error.
    pub async fn download(
        &self,
        segments: &[&str],
        out: &mut (dyn tokio::io::AsyncWrite + Unpin + Send),
    ) -> anyhow::Result<(u64, reqwest::header::HeaderMap)> {
        use tokio::io::AsyncWriteExt;
        let url = self.url(segments)?;
        let mut req = self.http.get(url.clone());
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(e, &url, false))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| self.transport_error(e, &url, true))?;
            return Err(self.refusal(status, &bytes));
        }
        let headers = resp.headers().clone();
        let expected = resp.content_length();
        let mut written = 0u64;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| self.transport_error(e, &url, true))?
        {
            out.write_all(&chunk)
                .await
                .context("cannot write the download")?;
            written += chunk.len() as u64;
        }
        out.flush().await.context("cannot write the download")?;
        if let Some(n) = expected
            && n != written
        {
            bail!(
                "courier's answer from {} broke off after {written} of {n} bytes",
                shown(&url)
            );
        }
        Ok((written, headers))
    }

    pub async fn get(
        &self,
        segments: &[&str],
        query: &[(&str, Option<String>)],
    ) -> anyhow::Result<Value> {
        Ok(self
            .call(reqwest::Method::GET, segments, query, None)
            .await?
            .value)
    }

    pub async fn post(&self, segments: &[&str], body: &Value) -> anyhow::Result<Value> {
        Ok(self
            .post_raw(segments, Some(body.to_string().into_bytes()))
            .await?
            .value)
    }

    /// A POST with `body` (JSON) or none; the answer with its headers.
    pub async fn post_raw(
        &self,
        segments: &[&str],
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Answer> {
        self.call(reqwest::Method::POST, segments, &[], body).await
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints the API's JSON, pretty.
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

/// The line that shows how to get the next page: `more` is the command that listed this
/// one, with its filters.
fn next_page(page: &Value, more: &str) -> String {
    match page["next_cursor"].as_str() {
        Some(c) => format!("more: {more} --cursor {}\n", super::shell_word(c)),
        None => String::new(),
    }
}

/// A page of deliveries; `more` is the command that lists the next one (less its cursor).
pub fn deliveries_table(page: &Value, more: &str) -> String {
    let rows: Vec<Vec<String>> = page["data"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|d| {
            let mut status = s(&d["status"]);
            if d["endpoint_missing"] == true {
                status.push_str(" (endpoint missing)");
            }
            vec![
                s(&d["id"]),
                s(&d["endpoint"]),
                s(&d["event_type"]),
                status,
                s(&d["attempt_count"]),
                s(&d["created_at"]),
                s(&d["last_error"]),
            ]
        })
        .collect();
    let mut out = table::render(
        &[
            id("ID"),
            id("ENDPOINT"),
            id("EVENT TYPE"),
            id("STATUS"),
            id("ATTEMPTS"),
            id("CREATED"),
            text("LAST ERROR"),
        ],
        &rows,
    );
    out.push_str(&next_page(page, more));
    out
}

/// What holds a pending delivery back beyond its own next-attempt time, from its endpoint's
/// `GET /v1/endpoints/{name}/stats` answer: paused, a `Retry-After` hold, an open circuit.
fn holds(d: &Value, health: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if health["paused"] == true {
        out.push(format!(
            "held: its endpoint is paused, until `courier endpoints resume {}`",
            super::shell_word(&s(&d["endpoint"]))
        ));
    }
    if let Some(until) = health["held_until"].as_str() {
        out.push(format!(
            "held until {until}: its endpoint answered 429 or 503 with Retry-After, and nothing goes to it before then"
        ));
    }
    if health["circuit"] == "open" {
        let next = match health["next_probe_at"].as_str() {
            Some(at) => format!(" (the next probe may go at {at})"),
            None => String::new(),
        };
        out.push(format!(
            "held: its endpoint's circuit is open ({} failures in a row): courier sends it one probe attempt at a time, a probe interval apart, until one succeeds{next}; this delivery waits its turn, whatever its next-attempt time",
            s(&health["consecutive_failures"])
        ));
    }
    out
}

/// `GET /v1/deliveries/{id}`'s answer. `health` is, for a pending delivery, its endpoint's
/// stats (or why they could not be read): what holds the delivery back, if anything.
pub fn delivery_detail(d: &Value, health: Option<&Result<Value, String>>) -> String {
    let pending = d["status"] == "pending";
    let held = match health {
        Some(Ok(h)) if pending => holds(d, h),
        _ => Vec::new(),
    };
    let mut out = String::new();
    for (k, label) in [
        ("id", "delivery"),
        ("event_id", "event (webhook-id)"),
        ("endpoint", "endpoint"),
        ("event_type", "event type"),
        ("status", "status"),
        ("attempt_count", "attempts"),
        ("next_attempt_at", "next attempt"),
        ("created_at", "created"),
        ("updated_at", "updated"),
        ("last_error", "last error"),
    ] {
        let mut value = s(&d[k]);
        if k == "next_attempt_at" && !held.is_empty() {
            value.push_str(" (held: see below)");
        }
        out.push_str(&format!("{label:<19} {value}\n"));
    }
    let note = |out: &mut String, text: &str| out.push_str(&format!("{:<19} ({text})\n", ""));
    if d["endpoint_missing"] == true {
        if pending {
            note(
                &mut out,
                "its endpoint is not configured: the delivery waits for it",
            );
        } else {
            // What `POST /v1/deliveries/{id}/replay` does with it: an endpoint made through
            // the API later under the name is not its destination; a config-file endpoint,
            // whose name is its identity, is.
            note(
                &mut out,
                "its endpoint no longer exists: `courier deliveries replay` refuses it (409) unless the config file names an endpoint of that name again; an endpoint made later through the API under the name is not its destination",
            );
        }
    }
    for h in &held {
        note(&mut out, h);
    }
    if pending && let Some(Err(e)) = health {
        note(
            &mut out,
            &format!(
                "its endpoint's health could not be read, so whether it is held is not known: {e}"
            ),
        );
    }
    let rows: Vec<Vec<String>> = d["attempts"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|a| {
            let result = if a["status_code"].is_null() {
                s(&a["error"])
            } else {
                s(&a["status_code"])
            };
            let detail = if a["error_detail"].is_null() {
                s(&a["response_body"])
            } else {
                s(&a["error_detail"])
            };
            vec![
                s(&a["number"]),
                s(&a["started_at"]),
                format!("{} ms", s(&a["duration_ms"])),
                result,
                s(&a["outcome"]),
                detail,
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table::render(
        &[
            id("#"),
            id("STARTED"),
            id("DURATION"),
            id("RESULT"),
            id("OUTCOME"),
            text("RESPONSE / ERROR"),
        ],
        &rows,
    ));
    if let Some(body) = d["request"]["body"].as_str() {
        out.push_str(&format!(
            "\nrequest body ({}):\n{body}\n",
            s(&d["request"]["content_type"])
        ));
    } else if let Some(b64) = d["request"]["body_base64"].as_str() {
        out.push_str(&format!(
            "\nrequest body ({}, not text, in base64):\n{b64}\n",
            s(&d["request"]["content_type"])
        ));
    }
    out
}

/// `POST /v1/deliveries/{id}/replay`'s answer (the delivery, pending again).
pub fn replayed(d: &Value) -> String {
    format!(
        "replayed delivery {} to {}: a new round of attempts starts\n",
        s(&d["id"]),
        s(&d["endpoint"])
    )
}

/// `POST /v1/dlq/replay`'s answer: what was requeued, and what was not and why.
pub fn dlq_replayed(v: &Value) -> String {
    let mut out = format!("requeued {} dead deliveries\n", s(&v["requeued"]));
    let skipped = v["skipped_deleted_endpoint"].as_u64().unwrap_or(0);
    if skipped > 0 {
        out.push_str(&format!(
            "skipped {skipped} whose endpoint was deleted (an endpoint made since under the same name is not their destination)\n"
        ));
    }
    let unreadable = v["skipped_unreadable"].as_u64().unwrap_or(0);
    if unreadable > 0 {
        out.push_str(&format!(
            "skipped {unreadable} whose records cannot be read (damaged; see courier's log)\n"
        ));
    }
    if v["deliveries_truncated"] == true {
        out.push_str(&format!(
            "the answer names only the first {} requeued deliveries (--json lists them)\n",
            v["deliveries"].as_array().map_or(0, Vec::len)
        ));
    }
    out
}

/// `POST /v1/events`' answer; `replayed` when courier answered an earlier request with the
/// same idempotency key (nothing new was queued).
pub fn sent(v: &Value, replayed: bool) -> String {
    let id = v["id"].as_str().unwrap_or("?");
    let mut out = if replayed {
        format!("already accepted (idempotent replay): {id}\n")
    } else {
        format!("accepted event {id}\n")
    };
    for d in v["deliveries"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
    {
        out.push_str(&format!(
            "  delivery {} -> {}\n",
            d["id"].as_str().unwrap_or("?"),
            d["endpoint"].as_str().unwrap_or("?")
        ));
    }
    out
}

/// A page of endpoints; `more` is the command that lists the next one (less its cursor).
pub fn endpoints_table(page: &Value, more: &str) -> String {
    let rows: Vec<Vec<String>> = page["data"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let mut state = if e["paused"] == true {
                "paused".to_string()
            } else {
                "active".to_string()
            };
            if e["shadowed"] == true {
                state.push_str(" (shadowed by config)");
            }
            // `null` subscribes to every type; an empty list to none.
            let types = match e["event_types"].as_array() {
                Some(t) if t.is_empty() => "(none)".into(),
                Some(t) => t.iter().map(s).collect::<Vec<_>>().join(","),
                None => "*".into(),
            };
            vec![
                s(&e["name"]),
                s(&e["source"]),
                state,
                s(&e["tenant"]),
                types,
                s(&e["url"]),
            ]
        })
        .collect();
    let mut out = table::render(
        &[
            id("NAME"),
            id("SOURCE"),
            id("STATE"),
            id("TENANT"),
            id("EVENT TYPES"),
            text("URL"),
        ],
        &rows,
    );
    out.push_str(&next_page(page, more));
    out
}

/// `POST /v1/endpoints/{name}/pause|resume`'s answer (the endpoint).
pub fn paused(e: &Value) -> String {
    let name = s(&e["name"]);
    if e["paused"] == true {
        format!(
            "paused endpoint {name}: its deliveries wait until `courier endpoints resume {}`\n",
            super::shell_word(&name)
        )
    } else {
        format!("resumed endpoint {name}\n")
    }
}

/// `POST /v1/endpoints/{name}/test`'s answer: the test delivery's first attempt.
pub fn tested(v: &Value) -> String {
    let mut out = format!(
        "test event {} -> delivery {} ({})\n",
        s(&v["event_id"]),
        s(&v["delivery_id"]),
        s(&v["status"])
    );
    let a = &v["attempt"];
    if a.is_null() {
        out.push_str("no attempt was made while courier waited for one\n");
        return out;
    }
    let result = if a["status_code"].is_null() {
        s(&a["error"])
    } else {
        s(&a["status_code"])
    };
    out.push_str(&format!(
        "attempt {}: {result} in {} ms{}\n",
        s(&a["number"]),
        s(&a["duration_ms"]),
        if v["success"] == true {
            ", accepted"
        } else {
            ", not accepted"
        }
    ));
    let detail = if a["error_detail"].is_null() {
        &a["response_body"]
    } else {
        &a["error_detail"]
    };
    if let Some(d) = detail.as_str().filter(|d| !d.is_empty()) {
        out.push_str(&format!("response: {}\n", excerpt(d)));
    }
    out
}

/// Whether `GET /v1/stats?endpoint=` was asked about a name that is no endpoint now.
pub fn stats_endpoint_missing(st: &Value) -> bool {
    st["endpoint"].as_str().is_some_and(|name| {
        st["endpoints"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or_default()
            .iter()
            .any(|e| e["name"] == name && e["endpoint_missing"] == true)
    })
}

pub fn stats_text(st: &Value) -> String {
    let c = &st["counts"];
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("-".into(), |f| format!("{:.1}%", f * 100.0))
    };
    // Deliveries are counted over all that courier holds; attempts over the window.
    let mut out = String::new();
    if let Some(e) = st["endpoint"].as_str() {
        if stats_endpoint_missing(st) {
            out.push_str(&format!(
                "endpoint {e}: no such endpoint (never made, or deleted; the figures are of the deliveries courier still holds for that name)\n\n"
            ));
        } else {
            out.push_str(&format!("endpoint {e}\n\n"));
        }
    }
    out.push_str(&format!(
        "deliveries (all time)     pending {}   delivered {}   dead {}   dropped {}\nsuccess rate (all time)   {}   (delivered of delivered and dead)\n\nattempts since {}\n  made {}   succeeded {}   per delivery {}\n  latency p50 {} ms   p95 {} ms   p99 {} ms\n\n",
        s(&c["pending"]),
        s(&c["delivered"]),
        s(&c["dead"]),
        s(&c["dropped"]),
        pct(&st["success_rate"]),
        s(&st["since"]),
        s(&st["attempts"]),
        pct(&st["attempt_success_rate"]),
        st["attempts_per_delivery"]
            .as_f64()
            .map_or("-".into(), |f| format!("{f:.2}")),
        s(&st["latency_ms"]["p50"]),
        s(&st["latency_ms"]["p95"]),
        s(&st["latency_ms"]["p99"]),
    ));
    let rows: Vec<Vec<String>> = st["endpoints"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            // A name with deliveries and no endpoint has no circuit to speak of.
            let circuit = if e["endpoint_missing"] == true {
                "(no such endpoint)".to_string()
            } else {
                s(&e["circuit"])
            };
            vec![
                s(&e["name"]),
                circuit,
                s(&e["queue_depth"]),
                s(&e["consecutive_failures"]),
                s(&e["last_success_at"]),
            ]
        })
        .collect();
    out.push_str(&table::render(
        &[
            id("ENDPOINT"),
            id("CIRCUIT"),
            id("QUEUED"),
            id("FAILURES IN A ROW"),
            id("LAST SUCCESS"),
        ],
        &rows,
    ));
    out
}

/// Builds the `POST /v1/events` body for `courier send` from a payload read from a file or
/// stdin. The payload is kept byte for byte (it is what the endpoint will receive).
pub fn event_body(
    payload: &[u8],
    event_type: &str,
    endpoint: Option<&str>,
    id: Option<&str>,
    idempotency_key: Option<&str>,
) -> anyhow::Result<Vec<u8>> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        event_type: &'a str,
        payload: &'a serde_json::value::RawValue,
        #[serde(skip_serializing_if = "Option::is_none")]
        endpoint: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<&'a str>,
    }
    let text = std::str::from_utf8(payload).context("the payload is not valid JSON (not UTF-8)")?;
    let raw: &serde_json::value::RawValue =
        serde_json::from_str(text.trim()).context("the payload is not valid JSON")?;
    Ok(serde_json::to_vec(&Body {
        event_type,
        payload: raw,
        endpoint,
        id,
        idempotency_key,
    })?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_held_pending_delivery_says_what_holds_it() {
        let d = json!({
            "id": "dlv_1", "status": "pending", "endpoint": "app", "attempts": [],
            "next_attempt_at": "2020-01-01T00:00:00Z", "endpoint_missing": false,
        });
        let health = Ok(json!({
            "paused": true, "circuit": "open", "consecutive_failures": 5,
            "held_until": "2999-01-01T00:00:00Z", "next_probe_at": "2999-01-01T00:00:05Z",
        }));
        let text = super::delivery_detail(&d, Some(&health));
        assert!(
            text.contains("next attempt        2020-01-01T00:00:00Z (held: see below)\n")
                && text.contains("\n                    (held: its endpoint is paused, until `courier endpoints resume app`)\n")
                && text.contains("\n                    (held until 2999-01-01T00:00:00Z: ")
                && text.contains("circuit is open (5 failures in a row)")
                && text.contains("the next probe may go at 2999-01-01T00:00:05Z"),
            "{text}"
        );
        // Not held: nothing said; health that could not be read: said so.
        let free = Ok(json!({"paused": false, "circuit": "closed", "held_until": null}));
        let text = super::delivery_detail(&d, Some(&free));
        assert!(!text.contains("held"), "{text}");
        let text = super::delivery_detail(&d, Some(&Err("503 Service Unavailable".into())));
        assert!(
            text.contains("could not be read") && text.contains("503"),
            "{text}"
        );
    }

    #[test]
    fn a_request_body_that_is_not_text_is_shown_in_base64() {
        let d = json!({
            "id": "dlv_1", "status": "delivered", "endpoint": "app", "attempts": [],
            "request": {"content_type": "application/octet-stream", "body_base64": "AP8="},
        });
        let text = super::delivery_detail(&d, None);
        assert!(
            text.contains("request body (application/octet-stream, not text, in base64):\nAP8="),
            "{text}"
        );
    }
}
