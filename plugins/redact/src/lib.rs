//! `redact`: removes the top-level JSON fields named in config `fields` (comma-separated)
//! from the body. A body that is not a JSON object passes through unchanged.

wit_bindgen::generate!({ path: "../../wit", world: "transformer" });

use courier::plugin::host::{Level, config_get, log};

struct Redact;

impl Guest for Redact {
    fn transform(mut req: Request) -> Result<TransformOutcome, String> {
        let fields = config_get("fields").unwrap_or_default();
        let Ok(serde_json::Value::Object(mut body)) = serde_json::from_slice(&req.body) else {
            log(Level::Debug, "body is not a JSON object; nothing to redact");
            return Ok(TransformOutcome::Send(req));
        };
        let mut removed = 0;
        for field in fields.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            removed += body.remove(field).is_some() as usize;
        }
        if removed > 0 {
            req.body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        }
        Ok(TransformOutcome::Send(req))
    }
}

export!(Redact);
