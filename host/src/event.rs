//! The change events the pipeline hands to a handler: one row change with the relation it
//! belongs to and the commit it is part of.
//!
//! Column values stay `Bytes` slices of the replication frame they arrived in, so building an
//! event copies no column data; the plugin runtime lowers them straight into guest memory.

use std::sync::Arc;

use bytes::Bytes;
use bytestring::ByteString;

use crate::lsn::Lsn;

/// What happened to a row. Mirrors the WIT `operation` enum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A new row.
    Insert,
    /// A changed row.
    Update,
    /// A removed row.
    Delete,
    /// The whole table was emptied.
    Truncate,
    /// A row as a backfill read it from the table, to be treated as an upsert. It may come
    /// after an update of the same row that was already delivered, and a delete may come
    /// for a row that was never read.
    Read,
}

/// The value of one column, aligned by position with [`Relation::columns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A TOASTed value the UPDATE did not touch; Postgres did not send it.
    Unchanged,
    /// The value in Postgres' text format: still a slice of the replication frame, checked
    /// as UTF-8 once when the event was built.
    Text(ByteString),
}

impl Value {
    /// A text value, if `bytes` is valid UTF-8 (Postgres sends text in the database encoding,
    /// which logical replication requires to be UTF-8 for the `pgoutput` text format to reach
    /// us intact; anything else is reported, never passed on garbled).
    pub fn text(bytes: Bytes) -> Result<Value, std::str::Utf8Error> {
        ByteString::try_from(bytes).map(Value::Text)
    }

    /// The text, if this is a text value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(text) => Some(text),
            Value::Null | Value::Unchanged => None,
        }
    }
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name as declared.
    pub name: String,
    /// Postgres type OID.
    pub type_oid: u32,
    /// Whether the column is part of the replica identity (the key).
    pub is_key: bool,
}

/// A table as described by the last `Relation` message Postgres sent for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The relation's OID.
    pub id: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Columns in table order; row values are aligned with them.
    pub columns: Vec<Column>,
    /// Names of the key columns, in table order.
    pub key_columns: Vec<String>,
}

impl Relation {
    /// Builds a relation and derives its key column names.
    pub fn new(id: u32, schema: String, table: String, columns: Vec<Column>) -> Relation {
        let key_columns = columns
            .iter()
            .filter(|column| column.is_key)
            .map(|column| column.name.clone())
            .collect();
        Relation {
            id,
            schema,
            table,
            columns,
            key_columns,
        }
    }
}

/// One row change, ready for a handler.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEvent {
    /// What happened.
    pub operation: Operation,
    /// The table, shared by every event of it.
    pub relation: Arc<Relation>,
    /// The new row (insert, update), the key or old row (delete), empty for truncate.
    pub row: Vec<Value>,
    /// The old row of an update, when Postgres sent one.
    pub old_row: Option<Vec<Value>>,
    /// Commit LSN of the transaction.
    pub lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// Transaction id.
    pub xid: u32,
}
