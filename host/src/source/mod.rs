//! Change sources: what a pipeline reads row changes from, and confirms them to.
//!
//! A [`ChangeSource`] yields [`SourceItem`]s (changes, the commits that end their transactions,
//! idle positions) and takes confirmations of positions whose every change was handled. The
//! pipeline above it only batches, calls the handler, retries and confirms; it knows neither
//! the replication protocol nor `pgoutput`. Below it:
//!
//! - [`PostgresSource`]: a logical replication slot streamed with `pgoutput`, decoded into
//!   events by [`WalEvents`] (pure and synchronous, so it is unit-tested without a server);
//! - whatever a test scripts, so the pipeline's retry, reconnect and shutdown logic can be
//!   driven in-process; and the place where a backfill merges existing rows into the stream.

pub mod backfill;
mod postgres;
mod slot_guard;
mod wal_events;

use async_trait::async_trait;

use crate::event::ChangeEvent;
use crate::lsn::Lsn;
use crate::replication::{PreflightError, ReplicationError};

pub use postgres::{BackfillSettings, PostgresSource};
pub use wal_events::{PROTOCOL_VERSION, WalEventError, WalEvents};

/// One thing a source has to say, in stream order.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceItem {
    /// A row change of the transaction being received. Its `lsn` is the transaction's commit
    /// LSN; it is not complete until the [`SourceItem::Commit`] that follows it.
    Change(ChangeEvent),
    /// The transaction whose changes came before has committed: once they are all handled,
    /// everything up to `end_lsn` may be confirmed. Sent for transactions without changes too.
    Commit {
        /// The commit's end LSN: the position to confirm.
        end_lsn: Lsn,
    },
    /// No transaction is in flight and nothing up to `position` concerns this source (a
    /// keepalive while the watched tables are quiet). Confirming it lets the source release
    /// WAL it retains for nothing. Never sent between a transaction's changes and its commit.
    Idle {
        /// The position the source has seen all of.
        position: Lsn,
    },
    /// A transactional logical message (`pg_logical_emit_message(true, ...)`) of the
    /// transaction being received. The backfill's watermarks are such messages; they are
    /// consumed below the pipeline, which ignores any that reach it.
    Message(LogicalMessage),
}

/// A transactional logical decoding message, with the transaction it was committed in.
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalMessage {
    /// The prefix the emitter chose.
    pub prefix: String,
    /// The content, a slice of the replication frame.
    pub content: bytes::Bytes,
    /// Commit LSN of the transaction that emitted it.
    pub commit_lsn: Lsn,
    /// Commit time of that transaction, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// Its transaction id.
    pub xid: u32,
}

/// Why a source failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// Talking to the database failed; [`SourceError::is_retryable`] says whether a reconnect
    /// may help.
    #[error(transparent)]
    Replication(Box<ReplicationError>),
    /// The database is not ready for replication (settings, privileges, tables, keys).
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// The stream held something that cannot become events.
    #[error(transparent)]
    Events(#[from] WalEventError),
    /// Postgres invalidated the slot: it removed WAL the slot still needed, so changes since
    /// the last confirmed position are gone. Never retried, and the slot is never silently
    /// replaced: only an operator can decide how to refill what was missed.
    #[error(
        "replication slot {slot:?} was invalidated by Postgres (wal_status = lost), most often \
         because it held back more WAL than max_slot_wal_keep_size allows, so the changes after \
         its last confirmed position are gone. Drop it with `pgstream-host teardown` (same source \
         settings), start the pipeline again to make a new slot, and re-sync the sink from the \
         tables, since rows changed meanwhile were not delivered; raise \
         max_slot_wal_keep_size or fix what kept the pipeline from confirming"
    )]
    SlotLost {
        /// The slot's name.
        slot: String,
    },
    /// The initial backfill could not be recorded or cannot run on this server.
    #[error("cannot prepare the initial backfill of {table}")]
    Backfill {
        /// The table.
        table: crate::replication::TableName,
        /// Why.
        #[source]
        source: backfill::BackfillError,
    },
}

// Boxed: a replication error is large and every source result would carry its size.
impl From<ReplicationError> for SourceError {
    fn from(error: ReplicationError) -> Self {
        SourceError::Replication(Box::new(error))
    }
}

impl SourceError {
    /// Whether starting the source again (from the last confirmed position) may succeed: a
    /// dropped connection or an unreachable server, not a bad setting or a malformed stream.
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Replication(error) => error.is_retryable(),
            SourceError::Preflight(_)
            | SourceError::Events(_)
            | SourceError::SlotLost { .. }
            | SourceError::Backfill { .. } => false,
        }
    }
}

/// Where a pipeline's changes come from.
///
/// Contract, in call order:
/// 1. [`prepare`](ChangeSource::prepare) once, before anything else: checks and creates what
///    the source needs (idempotent: a restarted pipeline calls it again) and returns the last
///    confirmed position, from which delivery resumes.
/// 2. [`start`](ChangeSource::start) with the position to resume after; called again after a
///    retryable [`recv`](ChangeSource::recv) error, always with the last confirmed position.
///    Whatever the previous session delivered beyond it is delivered again, so the caller
///    drops what it had not confirmed.
/// 3. [`recv`](ChangeSource::recv) repeatedly; [`confirm`](ChangeSource::confirm) in between,
///    only with positions of [`SourceItem::Commit`] or [`SourceItem::Idle`] items whose
///    changes were all handled, in increasing order.
/// 4. [`stop`](ChangeSource::stop) at the end, which reports the last confirmation.
///
/// Delivery is at least once: nothing unconfirmed is forgotten by the source, and after a
/// crash everything after the last confirmed position comes again.
#[async_trait]
pub trait ChangeSource: Send + Sync {
    /// A short description for logs and errors (never a password).
    fn describe(&self) -> String;

    /// Checks and creates what the source needs; returns the last confirmed position.
    async fn prepare(&mut self) -> Result<Lsn, SourceError>;

    /// Starts delivering what comes after `from`.
    async fn start(&mut self, from: Lsn) -> Result<(), SourceError>;

    /// Appends the next items to `items` (at least one) and returns; waits until there is
    /// one. Must be cancel-safe: dropped before it returned, it loses nothing.
    async fn recv(&mut self, items: &mut Vec<SourceItem>) -> Result<(), SourceError>;

    /// Confirms every change up to `lsn` as handled. Never moves backwards; cheap, and
    /// reported to the database in the background.
    fn confirm(&mut self, lsn: Lsn);

    /// Ends the session politely, so the database sees the last confirmation.
    async fn stop(&mut self);

    /// Where to report what the source learns about itself (a slot's lag and hold on WAL)
    /// for status and metrics. Called before [`prepare`](ChangeSource::prepare), again when
    /// the pipeline's status handle changes; a source with nothing to report ignores it.
    fn report_to(&mut self, _status: &crate::pipeline::StatusHandle) {}
}
