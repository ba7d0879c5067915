//! Harness for the end-to-end tests: real PostgreSQL servers, the real `pgstream-host` binary
//! and real guest components.
//!
//! - [`PgServer`] starts a throwaway PostgreSQL ([`PgVersion::Pg18`] with pgvector, or Debian's
//!   [`PgVersion::Pg15`]) configured for logical replication; [`PgServer::shared`] keeps one per
//!   version for the test binary and [`PgServer::create_database`] gives each test a
//!   [`TestDb`] of its own.
//! - [`HostProcess`] runs `pgstream-host` with its output captured, and stops or kills it.
//! - [`TestPipeline`] holds the host's arguments for one pipeline on a [`TestDb`] and runs the
//!   host with them (setup, up to the current WAL position, or until stopped).
//! - [`wait_until`] and [`wait_for`] poll for eventual outcomes.
//! - [`OpenAiServer`] is a fake OpenAI embeddings endpoint on a local port, with deterministic
//!   vectors, a record of every request, and failures on demand.
//! - [`FakeQdrant`] serves Qdrant's gRPC API in process, for the Qdrant sink's tests and
//!   benchmarks.
//! - [`tenants`] writes config files of several pipelines and reads their jsonl sinks.
//! - [`host_binary`], [`plugin_path`] and [`model_dir`] find what `make setup`, `make guests`
//!   and cargo built or installed.

mod artifacts;
pub mod drain;
mod host_process;
mod installation;
pub mod metrics_endpoint;
mod openai_server;
mod postgres;
mod qdrant_server;
pub mod tenants;
mod test_pipeline;
mod wait;
mod watchdog;
pub mod webhook_server;

pub use artifacts::{
    HOST_BIN_VAR, MODEL_DIR_VAR, PG15_BIN_VAR, PG18_BIN_VAR, PLUGIN_DIR_VAR, fixture_path,
    host_binary, model_dir, plugin_dir, plugin_path, setting, workspace_root,
};
pub use host_process::HostProcess;
pub use openai_server::{OpenAiServer, RecordedRequest};
pub use postgres::{PgServer, PgVersion, SUPERUSER, TestDb};
pub use qdrant_server::{CollectionSummary, FakeQdrant, StoredPoint};
pub use test_pipeline::{HOST_RUN_TIMEOUT, TestPipeline};
pub use wait::{wait_for, wait_until};
