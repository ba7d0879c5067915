//! Sinks store points in a vector store. The pipeline reaches them only through the [`Sink`]
//! trait; each store is its own module.

mod jsonl;
mod merge_fold;
mod pgvector;
mod qdrant;

use async_trait::async_trait;

use crate::point::{Point, PointKey};

pub use jsonl::JsonLinesSink;
pub use pgvector::{PgVectorSink, SearchHit};
pub use qdrant::{
    API_KEY_VAR as QDRANT_API_KEY_VAR, POINT_ID_NAMESPACE as QDRANT_POINT_ID_NAMESPACE,
    QdrantOptions, QdrantSink, QdrantUnavailable, point_id as qdrant_point_id,
};
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
}
