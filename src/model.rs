//! The shared vocabulary: Event, Delivery, Attempt, and the small value types every stage uses.
//!
//! An **event** is what a producer sent; a **delivery** is one event bound for one endpoint,
//! with a status; an **attempt** is one HTTP try of a delivery. These types are what the store
//! persists, so they change only with care: postcard is not self-describing, so any change to
//! a stored type raises the store's record format ([`crate::store`]'s `FORMAT_VERSION`) and
//! migrates older data dirs.

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, the one clock every record uses.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// RFC 3339 text for a millisecond timestamp, as the API shows times.
pub fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Parses RFC 3339 into milliseconds since the epoch. Bare numbers are refused: seconds
/// taken for milliseconds (or the reverse) would filter silently by the wrong time.
pub fn parse_time(text: &str) -> Option<u64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis().max(0) as u64)
}

/// A new time-ordered identifier with a prefix, e.g. `evt_01J…`. Ids sort by creation time, so
/// the store's primary tables double as time indexes, and FIFO endpoints rely on that order.
/// One process-wide generator makes ids strictly increasing even within one millisecond.
pub fn new_id(prefix: &str) -> String {
    static GENERATOR: std::sync::Mutex<ulid::Generator> =
        std::sync::Mutex::new(ulid::Generator::new());
    let id = GENERATOR
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .generate()
        .unwrap_or_else(|_| ulid::Ulid::new());
    format!("{prefix}_{id}")
}

/// The last millisecond an id can carry (ULIDs hold 48 bits of time: the year 10889).
const ID_MAX_MS: u64 = u64::MAX >> 16;

/// The smallest id with `prefix` created at or after `ms`, for time-range scans. A time past
/// the last one an id can carry stands for that last one (ULIDs would silently keep only the
/// low 48 bits and land at an arbitrary time).
pub fn id_floor(prefix: &str, ms: u64) -> String {
    format!("{prefix}_{}", ulid::Ulid::from_parts(ms.min(ID_MAX_MS), 0))
}

/// The ids with `prefix` created from `since_ms` to `until_ms`, both inclusive and either
/// open, as a half-open range `lo..hi` for time-range scans.
pub fn id_range(prefix: &str, since_ms: Option<u64>, until_ms: Option<u64>) -> (String, String) {
    let lo = id_floor(prefix, since_ms.unwrap_or(0));
    let hi = id_floor(prefix, until_ms.map_or(ID_MAX_MS, |u| u.saturating_add(1)));
    (lo, hi)
}

/// What a producer sent, stored once however many endpoints it fans out to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub content_type: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub created_ms: u64,
    /// The deliveries made from this event (one per endpoint), so that retention can tell
    /// when the event is no longer referenced.
    pub delivery_ids: Vec<String>,
    /// Extra headers every attempt carries (e.g. `mr-channel-id` on workflow deliveries).
    pub headers: Vec<(String, String)>,
}

/// Where a workflow channel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelState {
    /// Accepted; the upstream call has not completed.
    Pending,
    /// The upstream answered and the webhook went out; waiting for the backend's callback.
    AwaitingCallback,
    /// Finished successfully.
    Succeeded,
    /// Finished with an error (upstream failure, simulation failure).
    Failed,
    /// No callback arrived within `callback_timeout`.
    TimedOut,
}

impl ChannelState {
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelState::Pending => "pending",
            ChannelState::AwaitingCallback => "ai_generated",
            ChannelState::Succeeded => "success",
            ChannelState::Failed => "error",
            ChannelState::TimedOut => "error",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            ChannelState::Succeeded | ChannelState::Failed | ChannelState::TimedOut
        )
    }
}

/// What a workflow timer does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimerKind {
    /// Call the upstream (new channel, or after a restart mid-call).
    Upstream,
    /// End the channel with `callback_timeout`.
    CallbackTimeout,
    /// Run the simulator plugin in place of the backend.
    Simulate,
}

impl TimerKind {
    pub fn code(self) -> u8 {
        match self {
            TimerKind::Upstream => 0,
            TimerKind::CallbackTimeout => 1,
            TimerKind::Simulate => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<TimerKind> {
        match c {
            0 => Some(TimerKind::Upstream),
            1 => Some(TimerKind::CallbackTimeout),
            2 => Some(TimerKind::Simulate),
            _ => None,
        }
    }
}

/// One message a channel published (what WebSocket subscribers receive), with its time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelMessage {
    pub at_ms: u64,
    /// JSON text.
    pub message: String,
}

/// A workflow run: an async request, its upstream result, and its callback.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Channel {
    pub id: String,
    pub workflow: String,
    pub state: ChannelState,
    /// Increases with every change; changes are made only against the version read, so a
    /// callback and a timeout can never both win.
    pub version: u64,
    /// The request body sent upstream (JSON text).
    pub request: String,
    /// The upstream's answer (JSON text), once there is one.
    pub ai_response: Option<String>,
    /// Every message published, oldest first; the last is the current state.
    pub history: Vec<ChannelMessage>,
    /// Pending timers: (due ms, kind).
    pub timers: Vec<(u64, TimerKind)>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub delivery_ids: Vec<String>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DeliveryStatus {
    /// Waiting for its next attempt (or in one).
    Pending,
    /// A 2xx was received.
    Delivered,
    /// Gave up: schedule exhausted or a final answer; sits in the DLQ.
    Dead,
    /// A transform plugin chose not to send it.
    Dropped,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 4] = [
        DeliveryStatus::Pending,
        DeliveryStatus::Delivered,
        DeliveryStatus::Dead,
        DeliveryStatus::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Dead => "dead",
            DeliveryStatus::Dropped => "dropped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// One event bound for one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub id: String,
    pub event_id: String,
    pub endpoint: String,
    pub event_type: String,
    pub status: DeliveryStatus,
    /// Attempts made over the delivery's whole life (replays included): the next attempt's
    /// number is `attempts + 1`.
    pub attempts: u32,
    /// Attempts made in the current round; a replay starts a new round, and the retry
    /// schedule is indexed by this.
    pub round_attempts: u32,
    /// When the next attempt is due, while pending.
    pub next_due_ms: Option<u64>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Why the delivery is dead or dropped, or what the last failure was.
    pub last_error: Option<String>,
}

/// One HTTP try of a delivery, as the audit trail keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub number: u32,
    pub started_ms: u64,
    pub duration_ms: u64,
    /// The response status, when there was a response.
    pub status_code: Option<u16>,
    /// The error class when there was no usable response (`timeout`, `connect`, …).
    pub error: Option<String>,
    /// A human-readable detail of the error.
    pub error_detail: Option<String>,
    /// The first 4 KiB of the response body (lossy UTF-8).
    pub response_body: String,
    /// The outcome this attempt led to: `delivered`, `retry`, `dead`.
    pub outcome: String,
}

/// Bearer token scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    Ingest,
    Admin,
    Callback,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Ingest, Scope::Admin, Scope::Callback];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ingest" => Some(Scope::Ingest),
            "admin" => Some(Scope::Admin),
            "callback" => Some(Scope::Callback),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Admin => "admin",
            Scope::Callback => "callback",
        }
    }
}

/// A rate limit such as `100/s` or `600/m`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub count: u32,
    pub per: std::time::Duration,
}

impl RateLimit {
    pub fn parse(text: &str) -> Result<RateLimit, String> {
        let err = || format!("`{text}` is not a rate like \"100/s\", \"600/m\" or \"1000/h\"");
        let (n, unit) = text.trim().split_once('/').ok_or_else(err)?;
        let count: u32 = n.trim().parse().map_err(|_| err())?;
        if count == 0 {
            return Err(err());
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => std::time::Duration::from_secs(1),
            "m" | "min" | "minute" => std::time::Duration::from_secs(60),
            "h" | "hour" => std::time::Duration::from_secs(3600),
            _ => return Err(err()),
        };
        Ok(RateLimit { count, per })
    }

    /// Tokens per second.
    pub fn per_second(&self) -> f64 {
        self.count as f64 / self.per.as_secs_f64()
    }
}

impl std::fmt::Display for RateLimit {
    /// The canonical form (`100/s`, `600/m`, `1000/h`), which [`RateLimit::parse`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_parse() {
        assert_eq!(RateLimit::parse("100/s").unwrap().per_second(), 100.0);
        assert_eq!(RateLimit::parse("600/m").unwrap().per_second(), 10.0);
        assert!(RateLimit::parse("0/s").is_err());
        assert!(RateLimit::parse("fast").is_err());
        assert!(RateLimit::parse("10/d").is_err());
        for text in ["100/s", "600/m", "1000/h"] {
            assert_eq!(RateLimit::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(RateLimit::parse("5 / minute").unwrap().to_string(), "5/m");
    }

    #[test]
    fn ids_sort_by_time() {
        let floor = id_floor("dlv", 1_000);
        let later = id_floor("dlv", 2_000);
        assert!(floor < later);
        let now = new_id("dlv");
        assert!(now > later);
        // Times past what an id can carry clamp to its end, never wrap or overflow.
        let (lo, hi) = id_range("dlv", Some(1_000), Some(u64::MAX));
        assert_eq!(lo, floor);
        assert!(hi > now && hi == id_range("dlv", None, None).1);
        assert_eq!(id_range("dlv", Some(1 << 50), None).0, hi);
        let ids: Vec<String> = (0..1000).map(|_| new_id("dlv")).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        assert_eq!(
            parse_time(&rfc3339(1_700_000_000_123)),
            Some(1_700_000_000_123)
        );
        assert_eq!(
            parse_time("2023-11-14T22:13:20+01:00"),
            Some(1_699_996_400_000)
        );
        assert_eq!(parse_time("1700000000"), None);
    }
}
