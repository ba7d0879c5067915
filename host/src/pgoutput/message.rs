//! The messages of the `pgoutput` logical replication protocol, versions 1 to 4, as plain data.
//!
//! Every body struct mirrors one wire message field for field (see the Postgres docs,
//! "Logical Replication Message Formats"). Timestamps stay as the wire carries them,
//! microseconds since the Postgres epoch 2000-01-01 UTC; [`pg_micros_to_unix_micros`] converts.
//! Column data are [`Bytes`] slices of the decoded frame, so decoding copies no row data.

use bytes::Bytes;

use crate::lsn::Lsn;

/// Microseconds from the Unix epoch (1970-01-01 UTC) to the Postgres epoch (2000-01-01 UTC).
pub const POSTGRES_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Converts a Postgres timestamp (microseconds since 2000-01-01 UTC, as on the wire) to
/// microseconds since the Unix epoch. Saturates instead of overflowing on absurd values.
pub fn pg_micros_to_unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(POSTGRES_EPOCH_OFFSET_MICROS)
}

/// One decoded `pgoutput` message (the payload of one XLogData frame).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogicalMessage {
    /// Start of a transaction (`B`).
    Begin(BeginBody),
    /// End of a transaction (`C`).
    Commit(CommitBody),
    /// The transaction came from another node through replication origin (`O`).
    Origin(OriginBody),
    /// Schema of a table, sent before its first row change in a session and after DDL (`R`).
    Relation(RelationBody),
    /// Name of a non-builtin data type used by a following Relation (`Y`).
    Type(TypeBody),
    /// A new row (`I`).
    Insert(InsertBody),
    /// A changed row (`U`).
    Update(UpdateBody),
    /// A removed row (`D`).
    Delete(DeleteBody),
    /// One or more tables were truncated (`T`).
    Truncate(TruncateBody),
    /// A `pg_logical_emit_message` call (`M`).
    Message(MessageBody),
    /// A block of a large in-progress transaction begins (`S`, protocol 2+).
    StreamStart(StreamStartBody),
    /// The current block of a streamed transaction ends (`E`, protocol 2+).
    StreamStop,
    /// A streamed transaction committed (`c`, protocol 2+).
    StreamCommit(StreamCommitBody),
    /// A streamed transaction or subtransaction aborted (`A`, protocol 2+).
    StreamAbort(StreamAbortBody),
    /// Start of a prepared (two-phase) transaction (`b`, protocol 3+).
    BeginPrepare(BeginPrepareBody),
    /// `PREPARE TRANSACTION` ended the transaction started by BeginPrepare (`P`, protocol 3+).
    Prepare(PrepareBody),
    /// `COMMIT PREPARED` (`K`, protocol 3+).
    CommitPrepared(CommitPreparedBody),
    /// `ROLLBACK PREPARED` (`r`, protocol 3+).
    RollbackPrepared(RollbackPreparedBody),
    /// A streamed transaction was prepared (`p`, protocol 3+).
    StreamPrepare(StreamPrepareBody),
}

/// `Begin`: the rows up to the matching `Commit` belong to transaction `xid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginBody {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
}

/// `Commit`: the transaction begun by the last `Begin` is complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitBody {
    /// Currently unused by Postgres (always 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once the transaction is processed.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// `Origin`: the current transaction was replicated here from another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginBody {
    /// Commit LSN on the origin server.
    pub commit_lsn: Lsn,
    /// Name of the replication origin.
    pub name: String,
}

/// `Relation`: the schema of a table as the following row messages lay it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationBody {
    /// Transaction id, present only inside a streamed transaction block.
    pub xid: Option<u32>,
    /// Table OID; row messages refer to the table by it.
    pub rel_id: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// `REPLICA IDENTITY` setting: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Published columns, in the order tuples carry them.
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`RelationBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Bit 1 ([`RelationColumn::KEY_FLAG`]) marks a replica identity (key) column.
    pub flags: u8,
    /// Column name.
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// Type modifier (`atttypmod`), -1 when none.
    pub type_modifier: i32,
}

impl RelationColumn {
    /// The `flags` bit marking a column as part of the replica identity key.
    pub const KEY_FLAG: u8 = 1;

    /// Whether the column is part of the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & Self::KEY_FLAG != 0
    }
}

/// `Type`: names a data type so the receiver can interpret a column's OID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeBody {
    /// Transaction id, present only inside a streamed transaction block.
    pub xid: Option<u32>,
    /// Type OID.
    pub type_oid: u32,
    /// Schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// Type name.
    pub name: String,
}

/// `Insert`: a new row of table `rel_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertBody {
    /// Transaction id, present only inside a streamed transaction block.
    pub xid: Option<u32>,
    /// OID of the table, as announced by a `Relation` message.
    pub rel_id: u32,
    /// The new row.
    pub new: TupleData,
}

/// `Update`: a changed row. At most one of `key` and `old` is present: `key` when the replica
/// identity columns changed (identity default or index), `old` with `REPLICA IDENTITY FULL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateBody {
    /// Transaction id, present only inside a streamed transaction block.
    pub xid: Option<u32>,
    /// OID of the table.
    pub rel_id: u32,
    /// Old values of the key columns (`K`); other columns are null.
    pub key: Option<TupleData>,
    /// The whole old row (`O`).
    pub old: Option<TupleData>,
    /// The new row (`N`).
    pub new: TupleData,
}

/// `Delete`: a removed row, identified by its key (`K`) or, with `REPLICA IDENTITY FULL`, the
/// whole old row (`O`). Exactly one of the two is present on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteBody {
    /// Transaction id, present only inside a streamed transaction block.
    pub xid: Option<u32>,
    /// OID of the table.
    pub rel_id: u32,
    /// Old values of the key columns (`K`).
    pub key: Option<TupleData>,
    /// The whole old row (`O`).
    pub old: Option<TupleData>,
}

/// `Truncate`: the listed tables were emptied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncateBody {
    /// Transaction id, present only inside a streamed transaction block.
    pub xid: Option<u32>,
    /// Bit 1 ([`TruncateBody::CASCADE`]) and bit 2 ([`TruncateBody::RESTART_IDENTITY`]).
    pub options: u8,
    /// OIDs of the truncated tables.
    pub rel_ids: Vec<u32>,
}

impl TruncateBody {
    /// `options` bit for `TRUNCATE ... CASCADE`.
    pub const CASCADE: u8 = 1;
    /// `options` bit for `TRUNCATE ... RESTART IDENTITY`.
    pub const RESTART_IDENTITY: u8 = 2;
}

/// `Message`: a logical decoding message from `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageBody {
    /// Transaction id, present only inside a streamed transaction block.
    pub xid: Option<u32>,
    /// Whether the message was emitted transactionally (flag bit 1).
    pub transactional: bool,
    /// LSN of the message.
    pub lsn: Lsn,
    /// The message prefix chosen by the emitter.
    pub prefix: String,
    /// The message content, a slice of the frame.
    pub content: Bytes,
}

/// `Stream Start`: the following messages, up to `Stream Stop`, belong to streamed
/// transaction `xid` and each carries that xid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStartBody {
    /// Transaction id of the streamed transaction.
    pub xid: u32,
    /// Whether this is the first block of the transaction.
    pub first_segment: bool,
}

/// `Stream Commit`: the streamed transaction `xid` committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommitBody {
    /// Transaction id.
    pub xid: u32,
    /// Currently unused by Postgres (always 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
}

/// `Stream Abort`: the streamed (sub)transaction `subxid` of `xid` aborted; when
/// `subxid == xid` the whole transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbortBody {
    /// Top-level transaction id.
    pub xid: u32,
    /// Aborted subtransaction id (equal to `xid` for the top-level transaction).
    pub subxid: u32,
    /// Abort position and time, sent only with protocol 4 and `streaming = parallel`.
    pub abort_info: Option<StreamAbortInfo>,
}

/// The part of a `Stream Abort` only sent for parallel streaming (protocol 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAbortInfo {
    /// LSN of the abort record.
    pub abort_lsn: Lsn,
    /// Abort time, microseconds since 2000-01-01 UTC.
    pub abort_time: i64,
}

/// `Begin Prepare`: start of a transaction that will end with `PREPARE TRANSACTION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepareBody {
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// End LSN of the prepared transaction.
    pub end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier given to `PREPARE TRANSACTION`.
    pub gid: String,
}

/// The fields shared by `Prepare` and `Stream Prepare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareBody {
    /// Currently unused by Postgres (always 0).
    pub flags: u8,
    /// LSN of the prepare record.
    pub prepare_lsn: Lsn,
    /// End LSN of the prepared transaction.
    pub end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}

/// `Stream Prepare` has exactly the layout of `Prepare`.
pub type StreamPrepareBody = PrepareBody;

/// `Commit Prepared`: a prepared transaction committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPreparedBody {
    /// Currently unused by Postgres (always 0).
    pub flags: u8,
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// End of the commit record.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since 2000-01-01 UTC.
    pub commit_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}

/// `Rollback Prepared`: a prepared transaction was rolled back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPreparedBody {
    /// Currently unused by Postgres (always 0).
    pub flags: u8,
    /// End LSN of the prepared transaction.
    pub prepare_end_lsn: Lsn,
    /// End LSN of the rollback record.
    pub rollback_end_lsn: Lsn,
    /// Prepare time, microseconds since 2000-01-01 UTC.
    pub prepare_time: i64,
    /// Rollback time, microseconds since 2000-01-01 UTC.
    pub rollback_time: i64,
    /// Transaction id.
    pub xid: u32,
    /// Global transaction identifier.
    pub gid: String,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// SQL `NULL` (`n`).
    Null,
    /// A TOASTed value that did not change; Postgres does not resend it (`u`).
    UnchangedToast,
    /// The value in the type's text output format (`t`), a slice of the frame.
    Text(Bytes),
    /// The value in the type's binary format (`b`, with `binary = true`), a slice of the frame.
    Binary(Bytes),
}

/// The column values of one row, in the column order of the table's `Relation` message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData {
    values: Vec<TupleValue>,
}

impl TupleData {
    /// Wraps column values, in relation column order.
    pub fn new(values: Vec<TupleValue>) -> TupleData {
        TupleData { values }
    }

    /// The column values.
    pub fn values(&self) -> &[TupleValue] {
        &self.values
    }

    /// Takes the column values out.
    pub fn into_values(self) -> Vec<TupleValue> {
        self.values
    }
}

impl From<Vec<TupleValue>> for TupleData {
    fn from(values: Vec<TupleValue>) -> Self {
        TupleData::new(values)
    }
}
