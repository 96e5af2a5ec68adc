//! The plugin of the walk-through in plugins/README.md (kept here so that it is built, and so
//! known to compile, with the others).
// Adds an `x-event-type` header and upper-cases the event type inside the JSON body.
wit_bindgen::generate!({ path: "../../wit", world: "transformer" });

use courier::plugin::host::{Level, log};
use courier::plugin::types::Header;

struct Plugin;

impl Guest for Plugin {
    fn transform(mut req: Request) -> Result<TransformOutcome, String> {
        req.headers.push(Header {
            name: "x-event-type".into(),
            value: req.event_type.clone(),
        });
        let mut body: serde_json::Value =
            serde_json::from_slice(&req.body).map_err(|e| format!("not JSON: {e}"))?;
        // Indexing a JSON array or number with a key panics, and a panic is a trap.
        let Some(fields) = body.as_object_mut() else {
            return Err("the body is not a JSON object".into());
        };
        fields.insert("kind".into(), req.event_type.to_uppercase().into());
        req.body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
        log(Level::Debug, "transformed");
        Ok(TransformOutcome::Send(req))
    }
}

export!(Plugin);
