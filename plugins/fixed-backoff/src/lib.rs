//! `fixed-backoff`: waits config `delay_ms` (default 1000) between attempts and gives up
//! after config `max_attempts` (default 5) attempts.

wit_bindgen::generate!({ path: "../../wit", world: "backoff-policy" });

use courier::plugin::host::config_get;

struct FixedBackoff;

fn setting(key: &str, default: u64) -> u64 {
    config_get(key)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

impl Guest for FixedBackoff {
    fn next_delay(info: AttemptInfo) -> BackoffDecision {
        let max = setting("max_attempts", 5);
        if u64::from(info.attempt) >= max {
            return BackoffDecision::GiveUp(format!("fixed-backoff: gave up after {max} attempts"));
        }
        BackoffDecision::RetryAfterMs(setting("delay_ms", 1000))
    }
}

export!(FixedBackoff);
