//! `inject-id`: plays a customer's backend for workflow simulation. Given the
//! `task.ai_generated` message, it returns the AI response's data with an `id` field injected
//! (config `prefix`, default `sim_`, followed by the channel id), as the callback body.
//! Config `metadata`, JSON text, replaces the callback's `metadata` (default
//! `{"simulated": true, "simulator": "inject-id"}`); text that is not JSON is sent as a
//! string (which courier refuses, as it would from a real backend).

wit_bindgen::generate!({ path: "../../wit", world: "callback-simulator" });

use courier::plugin::host::{Level, config_get, log};
use serde_json::{Value, json};

struct InjectId;

impl Guest for InjectId {
    fn simulate(message: String) -> Result<String, String> {
        let msg: Value =
            serde_json::from_str(&message).map_err(|e| format!("message is not JSON: {e}"))?;
        let channel = msg["channel_id"].as_str().unwrap_or_default().to_string();
        let id = format!(
            "{}{channel}",
            config_get("prefix").unwrap_or_else(|| "sim_".into())
        );
        let mut data = msg.get("ai_response").cloned().unwrap_or(Value::Null);
        match &mut data {
            Value::Object(map) => {
                map.insert("id".into(), Value::String(id));
            }
            other => {
                data = json!({"id": id, "value": other.take()});
            }
        }
        log(
            Level::Debug,
            &format!("simulated callback for channel {channel}"),
        );
        let metadata = match config_get("metadata") {
            Some(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
            None => json!({"simulated": true, "simulator": "inject-id"}),
        };
        let body = json!({
            "data": data,
            "task_id": channel,
            "metadata": metadata,
        });
        Ok(body.to_string())
    }
}

export!(InjectId);
