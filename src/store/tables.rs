//! The redb tables and the record codec.
//!
//! Ids are ULID-based and sort by creation time, so `DELIVERIES` and `EVENTS` are also time
//! indexes; every other table is an index kept in step by the single writer.

use redb::TableDefinition;
use serde::{Serialize, de::DeserializeOwned};

use super::StoreError;

/// event id → postcard [`crate::model::Event`]
pub const EVENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("events");
/// delivery id → postcard [`crate::model::Delivery`]
pub const DELIVERIES: TableDefinition<&str, &[u8]> = TableDefinition::new("deliveries");
/// (delivery id, attempt number) → postcard [`crate::model::Attempt`]
pub const ATTEMPTS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("attempts");
/// The due-time index: (endpoint, due ms, delivery id) for every pending delivery. Read in
/// pages per endpoint, so a backlog never has to fit in memory and a stuck endpoint's backlog
/// never sits in front of another endpoint's work.
pub const QUEUE: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("queue");
/// Pending deliveries in ingest order per endpoint: (endpoint, delivery id) → due ms. FIFO
/// endpoints take their head from here; it also answers "what is queued for X".
pub const PENDING: TableDefinition<(&str, &str), u64> = TableDefinition::new("pending");
/// (status, delivery id) for every delivery that is not pending: status filters, the DLQ and
/// retention without full scans. Pending deliveries are indexed by [`PENDING`] alone (per
/// endpoint; a listing of all of them merges the endpoints), which spares every ingest and
/// every first successful attempt one index update each.
pub const BY_STATUS: TableDefinition<(&str, &str), ()> = TableDefinition::new("by_status");
/// (endpoint, delivery id) for every dead delivery: one endpoint's dead-letter queue (list,
/// bulk replay) without reading every other endpoint's. Only the dead are indexed per
/// endpoint: deliveries seldom die, so it costs the hot path nothing.
pub const DEAD_BY_ENDPOINT: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("dead_by_endpoint");
/// (endpoint, status) → number of deliveries, kept exact by the writer.
pub const COUNTS: TableDefinition<(&str, &str), u64> = TableDefinition::new("counts");
/// (created ms, event id) for every event stored with no deliveries (no endpoint subscribed
/// to its type): retention deletes the old ones; every other event goes with its last
/// delivery.
pub const UNROUTED: TableDefinition<(u64, &str), ()> = TableDefinition::new("unrouted_events");
/// (key id, idempotency key) → (created ms, stored reply)
pub const IDEMPOTENCY: TableDefinition<(&str, &str), (u64, &[u8])> =
    TableDefinition::new("idempotency");
/// (created ms, key id, idempotency key): the same keys in age order, so that expiring them
/// reads only the expired ones.
pub const IDEMPOTENCY_AGE: TableDefinition<(u64, &str, &str), ()> =
    TableDefinition::new("idempotency_age");
/// (started ms, delivery id, attempt number) → postcard [`AttemptLogEntry`]: the attempt log
/// that statistics were computed from before [`ROLLUPS`]; read once, to build the rollups of
/// a database made before them, and then deleted.
pub const ATTEMPT_LOG: TableDefinition<(u64, &str, u32), &[u8]> =
    TableDefinition::new("attempt_log");
/// (endpoint, minute) → postcard [`super::rollup::Rollup`]: the attempts an endpoint made in
/// that minute, which statistics are computed from.
pub const ROLLUPS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("attempt_rollups");

/// channel id → postcard [`crate::model::Channel`]
pub const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("channels");
/// (finished ms, channel id) for every channel in a final state: retention deletes the old
/// ones without reading the others (channel ids are random, so [`CHANNELS`] is no time index).
pub const CHANNELS_DONE: TableDefinition<(u64, &str), ()> = TableDefinition::new("channels_done");
/// Workflow timers but upstream calls: (due ms, channel id, kind code). Durable, so a restart
/// neither loses nor double-fires them (a fired timer is removed in the same transaction as
/// its effect).
pub const TIMERS: TableDefinition<(u64, &str, u8), ()> = TableDefinition::new("timers");
/// Upstream-call timers, a queue per workflow: (workflow, due ms, channel id). Apart from
/// [`TIMERS`] because a workflow whose upstream is backed up may have any number of calls due
/// that cannot run yet; with a range of its own, the timer loop takes each workflow's next
/// calls as its slots free up without reading past another workflow's backlog (since format 2).
pub const UPSTREAM_TIMERS: TableDefinition<(&str, u64, &str), ()> =
    TableDefinition::new("upstream_timers");

/// API-made endpoints: name → JSON [`crate::endpoints::StoredEndpoint`].
pub const ENDPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("endpoints");

/// Store bookkeeping: name → number.
pub const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// [`META`] key prefix: `dropping:NAME` (→ when it was deleted) while endpoint NAME's pending
/// deliveries are still to be dropped after its delete.
pub const DROPPING: &str = "dropping:";
/// [`META`] key prefix: `config_paused:NAME` (→ when it was paused) while the config-file
/// endpoint NAME is paused through the API (the file defines it; the pause is courier's).
pub const CONFIG_PAUSED: &str = "config_paused:";
/// [`META`] key: the sequence number of the last ingest-journal record the database holds.
pub const JOURNAL_SEQ: &str = "journal_seq";
/// [`META`] key, set once [`DEAD_BY_ENDPOINT`] holds every dead delivery (databases made
/// before it get it built when opened).
pub const DEAD_BY_ENDPOINT_BUILT: &str = "dead_by_endpoint_built";
/// [`META`] key, set once [`CHANNELS_DONE`] holds every finished channel (databases made
/// before it get it built when opened).
pub const CHANNELS_DONE_BUILT: &str = "channels_done_built";
/// [`META`] key, set once [`IDEMPOTENCY_AGE`] indexes every key of [`IDEMPOTENCY`]: keys
/// written before the age index existed would otherwise never expire.
pub const IDEMPOTENCY_AGE_BUILT: &str = "idempotency_age_built";
/// [`META`] key, set once [`BY_STATUS`] holds no pending deliveries (databases made before it
/// stopped indexing them are cleared of them when first opened).
pub const BY_STATUS_NO_PENDING: &str = "by_status_no_pending";
/// [`META`] key, set once [`ROLLUPS`] holds every attempt of [`ATTEMPT_LOG`] and that log is
/// gone.
pub const ROLLUPS_BUILT: &str = "attempt_rollups_built";
/// [`META`] key: the format the database's records and its ingest journal's records are in
/// ([`FORMAT_VERSION`] when this build wrote them).
pub const FORMAT: &str = "format";
/// The record format this build reads and writes. Records are postcard (not self-describing:
/// a field added to a record type changes its encoding), so any change to a stored type, a
/// table's key or value, or the journal record raises this number and comes with a migration
/// in [`super::Store::open`] — one for a changed journal record must also convert the records
/// a crash left pending in the journal, which are decoded after the format is raised (or
/// refuse to upgrade until a clean stop has emptied it); a build meeting a higher number refuses the data dir instead of
/// misreading it, and a database made before the number existed is format 1.
///
/// - 2: upstream-call timers moved from [`TIMERS`] to [`UPSTREAM_TIMERS`].
pub const FORMAT_VERSION: u64 = 2;
/// [`META`] key: a random number, made when the database is, that every journal record's
/// checksum covers (a journal belongs to one database file).
pub const JOURNAL_ID: &str = "journal_id";

/// A record of [`ATTEMPT_LOG`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AttemptLogEntry {
    pub endpoint: String,
    pub duration_ms: u64,
    pub success: bool,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("records always serialize")
}

/// Appends the encoding of `value` to `buf` (no allocation of its own when `buf` has room).
pub fn encode_onto<T: Serialize>(value: &T, buf: &mut Vec<u8>) {
    postcard::to_io(value, buf).expect("records always serialize");
}

/// The encoding of `value`, in `scratch` (cleared first): for the writer, which inserts a
/// record and is done with its bytes, so one buffer serves every insert.
pub fn encode_in<'b, T: Serialize>(value: &T, scratch: &'b mut Vec<u8>) -> &'b [u8] {
    scratch.clear();
    encode_onto(value, scratch);
    scratch
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}
