//! The operator commands that talk to a running courier over its API: `deliveries`, `dlq`,
//! `stats`, `send`. Human-readable tables by default, the API's JSON with `--json`.

use anyhow::{Context, bail};
use serde_json::Value;

use super::table;

/// Where and how to reach courier.
pub struct Api {
    pub url: String,
    pub token: Option<String>,
    http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str, token: Option<String>) -> Api {
        Api {
            url: url.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .user_agent(concat!("courier-cli/", env!("CARGO_PKG_VERSION")))
                // A redirect (to a login page, say) is not courier's answer.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("http client"),
        }
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, Option<String>)],
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Value> {
        let query: Vec<(&str, String)> = query
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (*k, v)))
            .collect();
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .query(&query);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach courier at {}", self.url))?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if status.is_success() && value.is_string() {
            bail!(
                "{status} but not courier's JSON answer (is --url pointing at courier?): {}",
                value
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect::<String>()
            );
        }
        if !status.is_success() {
            let msg = value["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            if status == reqwest::StatusCode::UNAUTHORIZED && self.token.is_none() {
                bail!("{status}: {msg} (pass --token or set COURIER_KEY)");
            }
            bail!("{status}: {msg}");
        }
        Ok(value)
    }

    pub async fn get(&self, path: &str, query: &[(&str, Option<String>)]) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, path, query, None).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.post_raw(path, body.to_string().into_bytes()).await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, path, &[], Some(body))
            .await
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

pub fn deliveries_table(page: &Value) -> String {
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
            "ID",
            "ENDPOINT",
            "EVENT TYPE",
            "STATUS",
            "ATTEMPTS",
            "CREATED",
            "LAST ERROR",
        ],
        &rows,
    );
    if let Some(c) = page["next_cursor"].as_str() {
        out.push_str(&format!("more: --cursor {c}\n"));
    }
    out
}

pub fn delivery_detail(d: &Value) -> String {
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
        out.push_str(&format!("{label:<19} {}\n", s(&d[k])));
    }
    if d["endpoint_missing"] == true {
        out.push_str(
            "                    (its endpoint is not configured: the delivery waits for it)\n",
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
            "#",
            "STARTED",
            "DURATION",
            "RESULT",
            "OUTCOME",
            "RESPONSE / ERROR",
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

pub fn stats_text(st: &Value) -> String {
    let c = &st["counts"];
    let pct = |v: &Value| {
        v.as_f64()
            .map_or("-".into(), |f| format!("{:.1}%", f * 100.0))
    };
    let mut out = format!(
        "since {}{}\n\ndeliveries   pending {}   delivered {}   dead {}   dropped {}\nsuccess rate {}   (attempts since: {}, {} succeeded, {} per delivery)\nlatency      p50 {} ms   p95 {} ms   p99 {} ms\n\n",
        s(&st["since"]),
        st["endpoint"]
            .as_str()
            .map(|e| format!(", endpoint {e}"))
            .unwrap_or_default(),
        s(&c["pending"]),
        s(&c["delivered"]),
        s(&c["dead"]),
        s(&c["dropped"]),
        pct(&st["success_rate"]),
        s(&st["attempts"]),
        pct(&st["attempt_success_rate"]),
        st["attempts_per_delivery"]
            .as_f64()
            .map_or("-".into(), |f| format!("{f:.2}")),
        s(&st["latency_ms"]["p50"]),
        s(&st["latency_ms"]["p95"]),
        s(&st["latency_ms"]["p99"]),
    );
    let rows: Vec<Vec<String>> = st["endpoints"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            vec![
                s(&e["name"]),
                s(&e["circuit"]),
                s(&e["queue_depth"]),
                s(&e["consecutive_failures"]),
                s(&e["last_success_at"]),
            ]
        })
        .collect();
    out.push_str(&table::render(
        &[
            "ENDPOINT",
            "CIRCUIT",
            "QUEUED",
            "FAILURES IN A ROW",
            "LAST SUCCESS",
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
    fn a_request_body_that_is_not_text_is_shown_in_base64() {
        let d = json!({
            "id": "dlv_1", "status": "delivered", "endpoint": "app", "attempts": [],
            "request": {"content_type": "application/octet-stream", "body_base64": "AP8="},
        });
        let text = super::delivery_detail(&d);
        assert!(
            text.contains("request body (application/octet-stream, not text, in base64):\nAP8="),
            "{text}"
        );
    }
}
