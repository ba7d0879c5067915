//! Turns decoded `pgoutput` messages into batches of [`ChangeEvent`]s and keeps the books on
//! which WAL positions a batch makes safe to confirm.
//!
//! The rule the whole pipeline rests on: a commit's end LSN may be confirmed only once every
//! event of that transaction has been handled. A batch can end in the middle of a transaction
//! (large transactions are cut so memory stays flat); such a batch confirms only the
//! transactions it completed, and the rest is confirmed by the batch that holds their commit.
//! This type is synchronous and owns no I/O, so the rule is unit-tested here directly.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::event::{ChangeEvent, Column, Operation, Relation, Value};
use crate::lsn::Lsn;
use crate::pgoutput::{
    DecodeError, Decoder, LogicalMessage, TupleData, TupleValue, pg_micros_to_unix_micros,
};

/// The protocol version requested in `START_REPLICATION`: version 1 sends a transaction only
/// once it committed, which keeps the confirm rule simple; large transactions are still cut
/// into bounded batches here.
pub const PROTOCOL_VERSION: u32 = 1;

/// `pg_class.relreplident` of a REPLICA IDENTITY FULL table, as the Relation message sends it.
const REPLICA_IDENTITY_FULL: u8 = b'f';

/// What the caller should do after feeding a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do.
    Continue,
    /// Nothing is pending: confirm this position right away.
    Confirm(Lsn),
    /// The batch reached its size limit: hand it to the handler now.
    BatchFull,
}

/// The WAL stream held something that cannot become events.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// A frame could not be decoded.
    #[error("malformed pgoutput message: {0}")]
    Decode(#[from] DecodeError),
    /// A change referred to a relation Postgres had not described.
    #[error("change for relation OID {0} arrived before its Relation message")]
    UnknownRelation(u32),
    /// A change arrived outside a transaction.
    #[error("{0} message outside a transaction")]
    OutsideTransaction(&'static str),
    /// A text value was not valid UTF-8.
    #[error(
        "column {column} of {schema}.{table} is not valid UTF-8; the source database must use UTF8 encoding"
    )]
    NotUtf8 {
        /// Schema of the table.
        schema: String,
        /// The table.
        table: String,
        /// The column.
        column: String,
    },
    /// A message that protocol version 1 never sends (streaming or two-phase).
    #[error("unexpected {0} message: the host asks for protocol version 1, which never sends it")]
    Unexpected(&'static str),
}

/// The transaction being received.
#[derive(Debug, Clone, Copy)]
struct OpenTransaction {
    xid: u32,
    commit_lsn: Lsn,
    commit_time_us: i64,
}

/// Builds batches of events from pgoutput frames.
pub struct BatchBuilder {
    decoder: Decoder,
    /// Primary key columns of the watched tables, by (schema, table). Postgres flags every
    /// column as key for REPLICA IDENTITY FULL tables; handlers need the real key to address
    /// points, so it comes from here for those.
    primary_keys: HashMap<(String, String), Vec<String>>,
    relations: HashMap<u32, Arc<Relation>>,
    max_events: usize,
    events: Vec<ChangeEvent>,
    open: Option<OpenTransaction>,
    /// End LSN of the last commit whose events are all in `events` (or were handled).
    completes: Option<Lsn>,
    /// Highest position known to be fully received: the last commit's end LSN, or an idle
    /// keepalive's WAL end.
    position: Lsn,
}

impl BatchBuilder {
    /// A builder cutting batches at `max_events`, with the primary keys of the watched tables
    /// (see [`primary_keys`](crate::pipeline::primary_keys)).
    pub fn new(
        max_events: usize,
        primary_keys: HashMap<(String, String), Vec<String>>,
    ) -> BatchBuilder {
        BatchBuilder {
            decoder: Decoder::new(PROTOCOL_VERSION),
            primary_keys,
            relations: HashMap::new(),
            max_events: max_events.max(1),
            events: Vec::with_capacity(max_events.max(1)),
            open: None,
            completes: None,
            position: Lsn::ZERO,
        }
    }

    /// Whether no event is waiting for the handler.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Whether everything up to `lsn` has been received and no transaction is open.
    pub fn reached(&self, lsn: Lsn) -> bool {
        self.open.is_none() && self.position >= lsn
    }

    /// Takes the pending events and the position that handling them completes.
    pub fn take(&mut self) -> (Vec<ChangeEvent>, Option<Lsn>) {
        let events = std::mem::take(&mut self.events);
        (events, self.completes.take())
    }

    /// Gives back a handled batch's vector so its allocation serves the next batch.
    pub fn recycle(&mut self, mut events: Vec<ChangeEvent>) {
        if self.events.is_empty() {
            events.clear();
            self.events = events;
        }
    }

    /// A keepalive: when nothing is pending, everything up to `wal_end` can be confirmed (this
    /// is what lets the slot advance while the watched tables are quiet).
    pub fn keepalive(&mut self, wal_end: Lsn) -> Step {
        if self.open.is_none() && self.events.is_empty() && self.completes.is_none() {
            self.position = self.position.max(wal_end);
            Step::Confirm(wal_end)
        } else {
            Step::Continue
        }
    }

    /// Feeds one XLogData payload.
    pub fn push(&mut self, frame: Bytes) -> Result<Step, BatchError> {
        match self.decoder.decode(frame)? {
            LogicalMessage::Begin(begin) => {
                self.open = Some(OpenTransaction {
                    xid: begin.xid,
                    commit_lsn: begin.final_lsn,
                    commit_time_us: pg_micros_to_unix_micros(begin.commit_time),
                });
                Ok(Step::Continue)
            }
            LogicalMessage::Commit(commit) => {
                self.open = None;
                self.position = self.position.max(commit.end_lsn);
                if self.events.is_empty() {
                    // Every event of this transaction was handled already (or it had none).
                    self.completes = None;
                    Ok(Step::Confirm(commit.end_lsn))
                } else {
                    self.completes = Some(commit.end_lsn);
                    Ok(Step::Continue)
                }
            }
            LogicalMessage::Relation(body) => {
                let primary_key = (body.replica_identity == REPLICA_IDENTITY_FULL)
                    .then(|| {
                        self.primary_keys
                            .get(&(body.namespace.clone(), body.name.clone()))
                    })
                    .flatten();
                let columns = body
                    .columns
                    .into_iter()
                    .map(|column| Column {
                        is_key: match primary_key {
                            Some(key) => key.contains(&column.name),
                            None => column.is_key(),
                        },
                        name: column.name,
                        type_oid: column.type_oid,
                    })
                    .collect();
                let relation = Relation::new(body.rel_id, body.namespace, body.name, columns);
                self.relations.insert(body.rel_id, Arc::new(relation));
                Ok(Step::Continue)
            }
            LogicalMessage::Insert(body) => {
                let row = Some(body.new);
                self.change(Operation::Insert, body.rel_id, row, None)
            }
            LogicalMessage::Update(body) => {
                let old = body.old.or(body.key);
                self.change(Operation::Update, body.rel_id, Some(body.new), old)
            }
            LogicalMessage::Delete(body) => {
                let row = body.old.or(body.key);
                self.change(Operation::Delete, body.rel_id, row, None)
            }
            LogicalMessage::Truncate(body) => {
                let mut step = Step::Continue;
                for rel_id in body.rel_ids {
                    step = self.change(Operation::Truncate, rel_id, None, None)?;
                }
                Ok(step)
            }
            LogicalMessage::Origin(_) | LogicalMessage::Type(_) | LogicalMessage::Message(_) => {
                Ok(Step::Continue)
            }
            LogicalMessage::StreamStart(_) => Err(BatchError::Unexpected("Stream Start")),
            LogicalMessage::StreamStop => Err(BatchError::Unexpected("Stream Stop")),
            LogicalMessage::StreamCommit(_) => Err(BatchError::Unexpected("Stream Commit")),
            LogicalMessage::StreamAbort(_) => Err(BatchError::Unexpected("Stream Abort")),
            LogicalMessage::StreamPrepare(_) => Err(BatchError::Unexpected("Stream Prepare")),
            LogicalMessage::BeginPrepare(_) => Err(BatchError::Unexpected("Begin Prepare")),
            LogicalMessage::Prepare(_) => Err(BatchError::Unexpected("Prepare")),
            LogicalMessage::CommitPrepared(_) => Err(BatchError::Unexpected("Commit Prepared")),
            LogicalMessage::RollbackPrepared(_) => Err(BatchError::Unexpected("Rollback Prepared")),
        }
    }

    fn change(
        &mut self,
        operation: Operation,
        rel_id: u32,
        row: Option<TupleData>,
        old_row: Option<TupleData>,
    ) -> Result<Step, BatchError> {
        let open = self.open.ok_or(BatchError::OutsideTransaction("change"))?;
        let relation = self
            .relations
            .get(&rel_id)
            .ok_or(BatchError::UnknownRelation(rel_id))?
            .clone();
        let row = match row {
            Some(tuple) => values(&relation, tuple)?,
            None => Vec::new(),
        };
        let old_row = old_row.map(|tuple| values(&relation, tuple)).transpose()?;
        self.events.push(ChangeEvent {
            operation,
            relation,
            row,
            old_row,
            lsn: open.commit_lsn,
            commit_time_us: open.commit_time_us,
            xid: open.xid,
        });
        if self.events.len() >= self.max_events {
            Ok(Step::BatchFull)
        } else {
            Ok(Step::Continue)
        }
    }
}

/// Converts a tuple's values into event values in place: the vector is reused, the column data
/// stay slices of the frame.
fn values(relation: &Relation, tuple: TupleData) -> Result<Vec<Value>, BatchError> {
    let not_utf8 = |index: usize| BatchError::NotUtf8 {
        schema: relation.schema.clone(),
        table: relation.table.clone(),
        column: relation
            .columns
            .get(index)
            .map_or_else(|| format!("#{index}"), |column| column.name.clone()),
    };
    tuple
        .into_values()
        .into_iter()
        .enumerate()
        .map(|(index, value)| match value {
            TupleValue::Null => Ok(Value::Null),
            TupleValue::UnchangedToast => Ok(Value::Unchanged),
            TupleValue::Text(bytes) => Value::text(bytes).map_err(|_| not_utf8(index)),
            // Binary values only arrive when `binary 'true'` is requested, which the host
            // never does.
            TupleValue::Binary(_) => Err(not_utf8(index)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::pgoutput::{
        BeginBody, CommitBody, DeleteBody, InsertBody, RelationBody, RelationColumn, TruncateBody,
        UpdateBody,
    };

    const REL: u32 = 16_384;

    fn frame(message: LogicalMessage) -> Bytes {
        let mut buf = BytesMut::new();
        message.encode(PROTOCOL_VERSION, &mut buf).expect("encodes");
        buf.freeze()
    }

    fn relation(rel_id: u32) -> Bytes {
        frame(LogicalMessage::Relation(RelationBody {
            xid: None,
            rel_id,
            namespace: "Shop Data".into(),
            name: "Orders".into(),
            replica_identity: b'd',
            columns: vec![
                RelationColumn {
                    flags: 1,
                    name: "id".into(),
                    type_oid: 20,
                    type_modifier: -1,
                },
                RelationColumn {
                    flags: 0,
                    name: "content".into(),
                    type_oid: 25,
                    type_modifier: -1,
                },
            ],
        }))
    }

    fn begin(xid: u32, final_lsn: u64) -> Bytes {
        frame(LogicalMessage::Begin(BeginBody {
            final_lsn: Lsn(final_lsn),
            commit_time: 1_000_000,
            xid,
        }))
    }

    fn commit(commit_lsn: u64, end_lsn: u64) -> Bytes {
        frame(LogicalMessage::Commit(CommitBody {
            flags: 0,
            commit_lsn: Lsn(commit_lsn),
            end_lsn: Lsn(end_lsn),
            commit_time: 1_000_000,
        }))
    }

    fn text(value: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(value.as_bytes()))
    }

    fn insert(id: &str, content: TupleValue) -> Bytes {
        frame(LogicalMessage::Insert(InsertBody {
            xid: None,
            rel_id: REL,
            new: TupleData::new(vec![text(id), content]),
        }))
    }

    fn feed(builder: &mut BatchBuilder, frames: &[Bytes]) -> Vec<Step> {
        frames
            .iter()
            .map(|frame| builder.push(frame.clone()).expect("valid frame"))
            .collect()
    }

    #[test]
    fn a_committed_transaction_becomes_events_and_completes_its_end_lsn() {
        let mut builder = BatchBuilder::new(100, HashMap::new());
        let steps = feed(
            &mut builder,
            &[
                relation(REL),
                begin(7, 0x100),
                insert("1", text("héllo")),
                insert("2", TupleValue::Null),
                commit(0x100, 0x140),
            ],
        );
        assert!(steps.iter().all(|step| *step == Step::Continue));
        let (events, completes) = builder.take();
        assert_eq!(completes, Some(Lsn(0x140)));
        assert_eq!(events.len(), 2);
        let first = &events[0];
        assert_eq!(first.operation, Operation::Insert);
        assert_eq!(first.relation.schema, "Shop Data");
        assert_eq!(first.relation.table, "Orders");
        assert_eq!(first.relation.key_columns, vec!["id".to_owned()]);
        assert_eq!(first.lsn, Lsn(0x100));
        assert_eq!(first.xid, 7);
        assert_eq!(first.commit_time_us, pg_micros_to_unix_micros(1_000_000));
        assert_eq!(first.row[1].as_str(), Some("héllo"));
        assert_eq!(events[1].row[1], Value::Null);
        assert!(builder.is_empty());
    }

    #[test]
    fn keepalives_confirm_only_when_nothing_is_pending() {
        let mut builder = BatchBuilder::new(100, HashMap::new());
        assert_eq!(builder.keepalive(Lsn(0x50)), Step::Confirm(Lsn(0x50)));
        feed(&mut builder, &[relation(REL), begin(1, 0x100)]);
        assert_eq!(builder.keepalive(Lsn(0x90)), Step::Continue);
        feed(
            &mut builder,
            &[insert("1", text("a")), commit(0x100, 0x140)],
        );
        // The commit is received but its event is not handled yet.
        assert_eq!(builder.keepalive(Lsn(0x200)), Step::Continue);
        assert!(!builder.reached(Lsn(0x200)));
        assert!(builder.reached(Lsn(0x140)));
        builder.take();
        assert_eq!(builder.keepalive(Lsn(0x200)), Step::Confirm(Lsn(0x200)));
        assert!(builder.reached(Lsn(0x200)));
    }

    #[test]
    fn a_large_transaction_is_cut_and_confirmed_only_by_its_commit() {
        let mut builder = BatchBuilder::new(2, HashMap::new());
        feed(&mut builder, &[relation(REL), begin(1, 0x100)]);
        assert_eq!(
            builder.push(insert("1", text("a"))).unwrap(),
            Step::Continue
        );
        assert_eq!(
            builder.push(insert("2", text("b"))).unwrap(),
            Step::BatchFull
        );
        let (events, completes) = builder.take();
        assert_eq!((events.len(), completes), (2, None));
        builder.recycle(events);
        assert_eq!(
            builder.push(insert("3", text("c"))).unwrap(),
            Step::Continue
        );
        assert_eq!(
            builder.push(insert("4", text("d"))).unwrap(),
            Step::BatchFull
        );
        let (events, completes) = builder.take();
        assert_eq!((events.len(), completes), (2, None));
        // Every event was handled before the commit arrived: confirm at once.
        assert_eq!(
            builder.push(commit(0x100, 0x140)).unwrap(),
            Step::Confirm(Lsn(0x140))
        );
    }

    #[test]
    fn updates_deletes_and_truncates_keep_old_rows_and_unchanged_values() {
        let mut builder = BatchBuilder::new(100, HashMap::new());
        let update = frame(LogicalMessage::Update(UpdateBody {
            xid: None,
            rel_id: REL,
            key: None,
            old: Some(TupleData::new(vec![text("1"), text("old")])),
            new: TupleData::new(vec![text("1"), TupleValue::UnchangedToast]),
        }));
        let delete = frame(LogicalMessage::Delete(DeleteBody {
            xid: None,
            rel_id: REL,
            key: Some(TupleData::new(vec![text("1"), TupleValue::Null])),
            old: None,
        }));
        let truncate = frame(LogicalMessage::Truncate(TruncateBody {
            xid: None,
            options: 0,
            rel_ids: vec![REL, REL + 1],
        }));
        feed(
            &mut builder,
            &[
                relation(REL),
                relation(REL + 1),
                begin(1, 0x100),
                update,
                delete,
                truncate,
                commit(0x100, 0x140),
            ],
        );
        let (events, _) = builder.take();
        let operations: Vec<Operation> = events.iter().map(|event| event.operation).collect();
        assert_eq!(
            operations,
            [
                Operation::Update,
                Operation::Delete,
                Operation::Truncate,
                Operation::Truncate
            ]
        );
        assert_eq!(events[0].row[1], Value::Unchanged);
        assert_eq!(events[0].old_row.as_ref().unwrap()[1].as_str(), Some("old"));
        assert_eq!(events[1].row[0].as_str(), Some("1"));
        assert!(events[2].row.is_empty());
        assert_eq!(events[3].relation.id, REL + 1);
    }

    #[test]
    fn malformed_streams_are_typed_errors() {
        let mut builder = BatchBuilder::new(100, HashMap::new());
        assert!(matches!(
            builder.push(insert("1", text("a"))),
            Err(BatchError::OutsideTransaction(_))
        ));
        builder.push(begin(1, 0x100)).unwrap();
        assert!(matches!(
            builder.push(insert("1", text("a"))),
            Err(BatchError::UnknownRelation(REL))
        ));
        builder.push(relation(REL)).unwrap();
        let bad = insert("1", TupleValue::Text(Bytes::from_static(&[0xff, 0xfe])));
        assert!(matches!(builder.push(bad), Err(BatchError::NotUtf8 { .. })));
        assert!(matches!(
            builder.push(Bytes::from_static(b"\xff")),
            Err(BatchError::Decode(_))
        ));
    }
}
