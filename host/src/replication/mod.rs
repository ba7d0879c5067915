//! The Postgres side of the pipeline: a replication-protocol client that streams raw pgoutput
//! frames out of a logical slot, and the SQL that prepares and checks the source.
//!
//! * [`SourceConfig`] parses the DSN once (libpq URL or `key=value`, all five `sslmode`s) and
//!   opens both kinds of connection with the same TLS rules.
//! * [`ReplicationStream`] runs `START_REPLICATION ... LOGICAL` on our own small client
//!   (`connection.rs` explains why tokio-postgres cannot) and hands out chunks of
//!   [`WalMessage`]s whose payloads are zero-copy `Bytes`; the pgoutput decoder lives elsewhere.
//! * [`setup`], [`teardown`], [`preflight`] and [`slot_confirmed_flush_lsn`] run over a regular
//!   tokio-postgres connection.
//!
//! Why not tokio-postgres for the stream: it cannot speak the replication protocol. It has no
//! way to send the `replication=database` startup parameter and no CopyBoth sub-protocol (its
//! COPY support is one-directional), while logical replication reads WAL frames and writes
//! standby status updates on one connection at the same time. So the replication connection is
//! built from `postgres-protocol`'s message codecs and SCRAM/MD5 helpers on tokio and
//! tokio-rustls; owning the socket also lets the stream hand out WAL payloads as slices of its
//! read buffer. The regular SQL connection does use tokio-postgres (+ tokio-postgres-rustls)
//! with the same TLS rules.
//!
//! Errors are [`ReplicationError`]s (with [`ReplicationError::is_retryable`]) and, for the
//! preflight checks, [`PreflightError`]s that say how to fix the source.

mod config;
mod connection;
mod error;
mod pool;
mod setup;
mod stream;
mod tls;

pub use config::{SourceConfig, SslMode};
pub use error::{ReplicationError, ServerError};
pub use setup::{
    InvalidNameError, ParseTableNameError, PreflightError, SetupReport, SlotWal, TableName,
    TeardownReport, preflight, setup, slot_confirmed_flush_lsn, slot_wal, teardown,
    validate_publication_name, validate_slot_name,
};
pub(crate) use stream::quote_identifier;
pub use stream::{ReplicationStream, StreamOptions, WalMessage};
