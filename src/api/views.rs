//! JSON views of the vocabulary types, as the API shows them (RFC 3339 times, status names).

use base64::Engine;
use serde_json::{Value, json};

use crate::model::{Attempt, Delivery, Event, rfc3339};

pub fn delivery(d: &Delivery, endpoint_missing: bool) -> Value {
    json!({
        "id": d.id,
        "event_id": d.event_id,
        "endpoint": d.endpoint,
        "event_type": d.event_type,
        "status": d.status.as_str(),
        "attempt_count": d.attempts,
        "next_attempt_at": d.next_due_ms.filter(|_| d.status == crate::model::DeliveryStatus::Pending).map(rfc3339),
        "created_at": rfc3339(d.created_ms),
        "updated_at": rfc3339(d.updated_ms),
        "last_error": d.last_error,
        "endpoint_missing": endpoint_missing,
    })
}

pub fn attempt(a: &Attempt) -> Value {
    json!({
        "number": a.number,
        "started_at": rfc3339(a.started_ms),
        "duration_ms": a.duration_ms,
        "status_code": a.status_code,
        "error": a.error,
        "error_detail": a.error_detail,
        "response_body": a.response_body,
        "outcome": a.outcome,
    })
}

/// The stored request: content type and body (as text when it is UTF-8, else base64).
pub fn request(e: &Event) -> Value {
    match std::str::from_utf8(&e.payload) {
        Ok(text) => json!({"content_type": e.content_type, "body": text}),
        Err(_) => json!({
            "content_type": e.content_type,
            "body_base64": base64::engine::general_purpose::STANDARD.encode(&e.payload),
        }),
    }
}
