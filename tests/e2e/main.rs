//! End-to-end tests: a real courier over real sockets, a fake receiver, real redb files.

mod harness;

mod api;
mod backup;
mod cli;
mod cli_operator;
mod controls;
mod crash;
mod delivery;
mod endpoints;
mod examples;
mod ingest;
mod plugins;
mod reload;
mod signing;
mod workflows;

mod channel_socket_auth;
mod channel_socket_close;
mod connections;
mod dlq_time_filters;
mod endpoint_headers;
mod idempotency_headers;
mod key_reach;
mod keys_reload;
mod retry_after_date;
mod workflow_outcomes;
