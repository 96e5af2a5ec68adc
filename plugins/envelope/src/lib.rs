//! `envelope`: wraps the body as `{"type": <event type>, "timestamp": <RFC 3339>, "data":
//! <original JSON body>}`. A body that is not JSON is wrapped as a JSON string.

wit_bindgen::generate!({ path: "../../wit", world: "transformer" });

struct Envelope;

impl Guest for Envelope {
    fn transform(mut req: Request) -> Result<TransformOutcome, String> {
        let data = serde_json::from_slice::<serde_json::Value>(&req.body).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&req.body).into_owned())
        });
        let wrapped = serde_json::json!({
            "type": req.event_type,
            "timestamp": req.timestamp,
            "data": data,
        });
        req.body = serde_json::to_vec(&wrapped).map_err(|e| e.to_string())?;
        for h in req.headers.iter_mut() {
            if h.name == "content-type" {
                h.value = "application/json".into();
            }
        }
        Ok(TransformOutcome::Send(req))
    }
}

export!(Envelope);
