//! Sinks store points in a vector store. The pipeline reaches them only through the [`Sink`]
//! trait; each store is its own module.

mod jsonl;
mod merge_fold;
mod pgvector;
mod qdrant;
mod webhook;

use async_trait::async_trait;

use crate::event::{ChangeEvent, Value};
use crate::lsn::Lsn;
use crate::point::{Point, PointKey};

pub use jsonl::JsonLinesSink;
pub use pgvector::{PgVectorSink, SearchHit};
pub use qdrant::{
    API_KEY_VAR as QDRANT_API_KEY_VAR, POINT_ID_NAMESPACE as QDRANT_POINT_ID_NAMESPACE,
    QdrantOptions, QdrantSink, QdrantUnavailable, point_id as qdrant_point_id,
};
pub use webhook::{SECRET_VAR as WEBHOOK_SECRET_VAR, WebhookOptions, WebhookSink, signature};
/// Why a sink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The store could not be reached or dropped the connection.
    #[error("vector store unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The store refused the request, or the sink's settings cannot work; repeating it will
    /// not help. The message is a whole sentence naming the store and what to change.
    #[error("{0}")]
    Rejected(String),
}

impl SinkError {
    /// Whether trying the same call again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// Which events a handler call covers, for a sink that names its writes (the webhook's
/// `Idempotency-Key`): the same events give the same identity, on a replay after a crash too,
/// and different events (two batches of one large transaction, say) different ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchIdentity {
    /// Commit LSN of the first event.
    pub first_lsn: Lsn,
    /// Commit LSN of the last event.
    pub last_lsn: Lsn,
    /// Number of events.
    pub events: usize,
    /// The first 16 hex digits of a SHA-256 over every event's position, table, operation and
    /// values.
    pub digest: String,
}

impl BatchIdentity {
    /// The identity of `events` (hashed from slices of the events, nothing copied).
    pub fn of(events: &[ChangeEvent]) -> BatchIdentity {
        use sha2::{Digest, Sha256};
        fn values(hash: &mut Sha256, values: &[Value]) {
            for value in values {
                match value {
                    Value::Null => hash.update([0u8]),
                    Value::Unchanged => hash.update([1u8]),
                    Value::Text(text) => {
                        hash.update([2u8]);
                        hash.update((text.len() as u64).to_le_bytes());
                        hash.update(text.as_bytes());
                    }
                }
            }
        }
        let mut hash = Sha256::new();
        for event in events {
            values(&mut hash, &event.row);
            if let Some(old) = &event.old_row {
                values(&mut hash, old);
            }
            let relation = &event.relation;
            hash.update(event.lsn.0.to_le_bytes());
            hash.update(event.xid.to_le_bytes());
            hash.update([event.operation as u8]);
            hash.update(relation.schema.as_bytes());
            hash.update([0u8]);
            hash.update(relation.table.as_bytes());
            hash.update([0u8]);
        }
        let digest: String = hash.finalize()[..8]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        BatchIdentity {
            first_lsn: events.first().map_or(Lsn::ZERO, |event| event.lsn),
            last_lsn: events.last().map_or(Lsn::ZERO, |event| event.lsn),
            events: events.len(),
            digest,
        }
    }
}

/// A vector store.
///
/// Contract: `prepare` is called once before any write, with the embedder's dimension; it
/// creates what is missing (table, collection, index) and checks what exists. The write calls
/// come from handler calls, in commit order, each with a whole batch. Every write is
/// idempotent: upserting the same point twice leaves one point, deleting a missing point is not
/// an error, because after a crash the host replays batches it had not confirmed. A write that
/// returned `Ok` is durable (the pipeline confirms the WAL position to Postgres after it).
#[async_trait]
pub trait Sink: Send + Sync {
    /// Creates or checks the destination for vectors of `dimensions` floats.
    async fn prepare(&self, dimensions: usize) -> Result<(), SinkError>;

    /// Inserts or replaces points. A point without a vector keeps its stored vector.
    async fn upsert(&self, points: &[Point]) -> Result<(), SinkError>;

    /// Writes points like [`upsert`](Sink::upsert), but merges each payload (a JSON object)
    /// into the stored one: its keys replace or add the stored keys of the same name, the
    /// other stored keys stay. A point with a vector replaces the stored vector, or is created
    /// with just these keys; one without keeps the stored vector, and is skipped with a
    /// warning when the store does not have the point. Points apply in slice order (of two
    /// writes of one point, the later one's keys and vector win). A payload that is not a JSON
    /// object is rejected before anything is written. Idempotent.
    async fn merge(&self, points: &[Point]) -> Result<(), SinkError>;

    /// Deletes points by key.
    async fn delete(&self, keys: &[PointKey]) -> Result<(), SinkError>;

    /// Deletes every point made from rows of `schema.table`.
    async fn delete_table(&self, schema: &str, table: &str) -> Result<(), SinkError>;

    /// Called by the pipeline before each handler call (each try of one included) with its
    /// events; the writes that call makes follow, until the next call. A sink that names its
    /// writes derives their [`BatchIdentity`] from them; the others ignore it (the default), so
    /// the events are not hashed for sinks that have no use for it.
    fn begin_batch(&self, _events: &[ChangeEvent]) {}
}
