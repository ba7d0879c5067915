//! Points: what a handler writes to a vector store. The plugin runtime builds them from the
//! guest's `upsert` and `delete` calls and the sinks store them; neither knows the other.

/// Identifies a point: the source row it was made from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PointKey {
    /// Schema of the source table.
    pub schema: String,
    /// Name of the source table.
    pub table: String,
    /// The source row's key column values as text, in key order.
    pub key: Vec<String>,
}

/// A point to insert or replace.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Which point.
    pub key: PointKey,
    /// The embedding; `None` keeps the stored vector and replaces only the payload (a sink
    /// skips such a point, with a warning, when it has no stored vector for it).
    pub vector: Option<Vec<f32>>,
    /// The payload, a JSON document as text.
    pub payload: String,
}
