//! courier: a durable, self-hosted webhook delivery proxy.
//!
//! The flow of one event, and the module that owns each step:
//!
//! ```text
//!  producer ─POST─▶ api::events ─▶ ingest ─▶ store (ingest journal by store::journaler, then redb by store::writer)
//!                                                 │ due-time index, per endpoint
//!                                                 ▼
//!  DLQ ◀─ store ◀─ outcome (retry rules) ◀─ deliver (sign, client) ◀─ scheduler (worker per endpoint)
//! ```
//!
//! - [`config`]: the TOML file, parsed and validated once; everything else trusts it.
//! - [`model`]: the vocabulary (Event, Delivery, Attempt, statuses, scopes).
//! - [`endpoints`]: the effective endpoints (config file + endpoint API), indexed by name and
//!   by subscribed event type.
//! - [`store`]: the one narrow interface to durable state: a journal thread makes batches of
//!   new events durable with one sequential write and answers their producers, and a single
//!   writer thread applies them and every other change to redb behind it (attempt
//!   statistics included, as per-minute rollups per endpoint).
//! - [`ingest`]: producer requests become an event plus deliveries, on disk before the 202.
//! - [`gate`]: lets an endpoint's delete wait out the ingests that may have found it.
//! - [`scheduler`]: one worker per endpoint reads due deliveries in pages and starts attempts
//!   within `max_in_flight`, `rate_limit`, ordering and the circuit breaker.
//! - [`deliver`]: builds, signs ([`deliver::sign`]) and sends ([`deliver::client`], with the
//!   SSRF guard) one attempt.
//! - [`outcome`]: pure rules deciding what follows an attempt (delivered, retry when, dead).
//! - [`plugins`]: WebAssembly components (wasmtime) that transform payloads, choose backoff or
//!   simulate a callback; sandboxed per call, hot-reloaded when their files change.
//! - [`watch`]: the directory watching that config and plugin hot reload share.
//! - [`workflows`]: async requests (upstream call → webhook → callback → final result) as
//!   durable channels driven by durable timers.
//! - [`hub`]: fans channel messages out to WebSocket subscribers.
//! - [`observe`]: metrics and the log lines emitted with them.
//! - [`api`]: the HTTP API, one router per resource.
//! - [`app`]: the shared application state and bearer-token authentication.
//! - [`reload`]: configuration hot reload (file watch and SIGHUP), validated, swapped atomically.
//! - [`server`]: start-up, the retention sweeper and graceful shutdown.
//! - [`listener`]: the HTTP accept loop, with a limit on connections and on the time to send
//!   a request's headers.
//! - [`cli`]: the `courier` command line.
//! - [`bench`]: `courier bench`, the load tool with its own receiver and baselines.

pub mod api;
pub mod app;
pub mod bench;
pub mod cli;
pub mod config;
pub mod deliver;
pub mod endpoints;
pub mod gate;
pub mod hub;
pub mod ingest;
pub mod listener;
pub mod model;
pub mod observe;
pub mod outcome;
pub mod plugins;
pub mod reload;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod watch;
pub mod workflows;
