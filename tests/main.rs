//! End-to-end tests: real PostgreSQL servers, the real `pgstream-host` binary, real guest
//! components. One module per area; the harness lives in `support/` (crate `pgstream_e2e`).
//!
//! Run with `make test`, which installs Postgres and the model, builds the guests and the host,
//! and exports the paths the harness reads.

mod backfill;
mod cli;
mod dead_letters;
mod embed_cache;
mod faults;
mod harness;
mod languages;
mod metrics;
mod openai;
mod pipeline;
mod qdrant;
mod reload;
mod scaffold;
mod serve;
mod wal_guard;
mod webhook;
