//! End-to-end tests: a real courier over real sockets, a fake receiver, real redb files.

mod harness;

mod api;
mod cli;
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
