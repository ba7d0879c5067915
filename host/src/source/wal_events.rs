//! Turns decoded `pgoutput` frames into [`SourceItem`]s: the relation cache, row values as
//! slices of the frames, and the transaction boundaries.
//!
//! This is the protocol half of [`PostgresSource`](super::PostgresSource): synchronous and
//! free of I/O, so every case (a relation arriving late, a malformed frame, text that is not
//! UTF-8) is unit-tested here. What a batch is and what may be confirmed is decided above, by
//! the pipeline.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::SourceItem;
use crate::event::{ChangeEvent, Column, Operation, Relation, Value};
use crate::lsn::Lsn;
use crate::pgoutput::{
    DecodeError, Decoder, LogicalMessage, TupleData, TupleValue, pg_micros_to_unix_micros,
};

/// The protocol version requested in `START_REPLICATION`: version 1 sends a transaction only
/// once it committed, which keeps the confirm rule simple; large transactions are still cut
/// into bounded batches by the pipeline.
pub const PROTOCOL_VERSION: u32 = 1;

/// `pg_class.relreplident` of a REPLICA IDENTITY FULL table, as the Relation message sends it.
const REPLICA_IDENTITY_FULL: u8 = b'f';

/// The WAL stream held something that cannot become events.
#[derive(Debug, thiserror::Error)]
pub enum WalEventError {
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

/// Decodes one replication session's frames into items.
pub struct WalEvents {
    decoder: Decoder,
    /// Primary key columns of the watched tables, by (schema, table). Postgres flags every
    /// column as key for REPLICA IDENTITY FULL tables; handlers need the real key to address
    /// points, so it comes from here for those.
    primary_keys: HashMap<(String, String), Vec<String>>,
    relations: HashMap<u32, Arc<Relation>>,
    open: Option<OpenTransaction>,
}

impl WalEvents {
    /// A decoder for a new session, with the primary keys of the watched tables.
    pub fn new(primary_keys: HashMap<(String, String), Vec<String>>) -> WalEvents {
        WalEvents {
            decoder: Decoder::new(PROTOCOL_VERSION),
            primary_keys,
            relations: HashMap::new(),
            open: None,
        }
    }

    /// Forgets the session: Postgres describes every relation again in a new one, and a
    /// transaction cut off by a lost connection is sent again whole.
    pub fn reset(&mut self) {
        self.relations.clear();
        self.open = None;
    }

    /// A keepalive up to `wal_end`: idle, unless a transaction is being received.
    pub fn keepalive(&mut self, wal_end: Lsn, items: &mut Vec<SourceItem>) {
        if self.open.is_none() {
            items.push(SourceItem::Idle { position: wal_end });
        }
    }

    /// Decodes one XLogData payload, appending what it says to `items`.
    pub fn push(&mut self, frame: Bytes, items: &mut Vec<SourceItem>) -> Result<(), WalEventError> {
        match self.decoder.decode(frame)? {
            LogicalMessage::Begin(begin) => {
                self.open = Some(OpenTransaction {
                    xid: begin.xid,
                    commit_lsn: begin.final_lsn,
                    commit_time_us: pg_micros_to_unix_micros(begin.commit_time),
                });
            }
            LogicalMessage::Commit(commit) => {
                self.open = None;
                items.push(SourceItem::Commit {
                    end_lsn: commit.end_lsn,
                });
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
            }
            LogicalMessage::Insert(body) => {
                let event = self.change(Operation::Insert, body.rel_id, Some(body.new), None)?;
                items.push(SourceItem::Change(event));
            }
            LogicalMessage::Update(body) => {
                let old = body.old.or(body.key);
                let event = self.change(Operation::Update, body.rel_id, Some(body.new), old)?;
                items.push(SourceItem::Change(event));
            }
            LogicalMessage::Delete(body) => {
                let row = body.old.or(body.key);
                let event = self.change(Operation::Delete, body.rel_id, row, None)?;
                items.push(SourceItem::Change(event));
            }
            LogicalMessage::Truncate(body) => {
                for rel_id in body.rel_ids {
                    let event = self.change(Operation::Truncate, rel_id, None, None)?;
                    items.push(SourceItem::Change(event));
                }
            }
            // Only transactional messages have a place in the commit order; a
            // non-transactional one is decoded when written, outside any transaction.
            LogicalMessage::Message(body) if body.transactional => {
                let open = self
                    .open
                    .ok_or(WalEventError::OutsideTransaction("transactional Message"))?;
                items.push(SourceItem::Message(super::LogicalMessage {
                    prefix: body.prefix,
                    content: body.content,
                    commit_lsn: open.commit_lsn,
                    commit_time_us: open.commit_time_us,
                    xid: open.xid,
                }));
            }
            LogicalMessage::Origin(_) | LogicalMessage::Type(_) | LogicalMessage::Message(_) => {}
            LogicalMessage::StreamStart(_) => {
                return Err(WalEventError::Unexpected("Stream Start"));
            }
            LogicalMessage::StreamStop => return Err(WalEventError::Unexpected("Stream Stop")),
            LogicalMessage::StreamCommit(_) => {
                return Err(WalEventError::Unexpected("Stream Commit"));
            }
            LogicalMessage::StreamAbort(_) => {
                return Err(WalEventError::Unexpected("Stream Abort"));
            }
            LogicalMessage::StreamPrepare(_) => {
                return Err(WalEventError::Unexpected("Stream Prepare"));
            }
            LogicalMessage::BeginPrepare(_) => {
                return Err(WalEventError::Unexpected("Begin Prepare"));
            }
            LogicalMessage::Prepare(_) => return Err(WalEventError::Unexpected("Prepare")),
            LogicalMessage::CommitPrepared(_) => {
                return Err(WalEventError::Unexpected("Commit Prepared"));
            }
            LogicalMessage::RollbackPrepared(_) => {
                return Err(WalEventError::Unexpected("Rollback Prepared"));
            }
        }
        Ok(())
    }

    fn change(
        &self,
        operation: Operation,
        rel_id: u32,
        row: Option<TupleData>,
        old_row: Option<TupleData>,
    ) -> Result<ChangeEvent, WalEventError> {
        let open = self
            .open
            .ok_or(WalEventError::OutsideTransaction("change"))?;
        let relation = self
            .relations
            .get(&rel_id)
            .ok_or(WalEventError::UnknownRelation(rel_id))?
            .clone();
        let row = match row {
            Some(tuple) => values(&relation, tuple)?,
            None => Vec::new(),
        };
        let old_row = old_row.map(|tuple| values(&relation, tuple)).transpose()?;
        Ok(ChangeEvent {
            operation,
            relation,
            row,
            old_row,
            lsn: open.commit_lsn,
            commit_time_us: open.commit_time_us,
            xid: open.xid,
        })
    }
}

/// Converts a tuple's values into event values in place: the vector is reused, the column data
/// stay slices of the frame.
fn values(relation: &Relation, tuple: TupleData) -> Result<Vec<Value>, WalEventError> {
    let not_utf8 = |index: usize| WalEventError::NotUtf8 {
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

    fn feed(events: &mut WalEvents, frames: &[Bytes]) -> Vec<SourceItem> {
        let mut items = Vec::new();
        for frame in frames {
            events.push(frame.clone(), &mut items).expect("valid frame");
        }
        items
    }

    fn changes(items: Vec<SourceItem>) -> Vec<ChangeEvent> {
        items
            .into_iter()
            .filter_map(|item| match item {
                SourceItem::Change(event) => Some(event),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_committed_transaction_becomes_changes_then_its_commit() {
        let mut decoder = WalEvents::new(HashMap::new());
        let items = feed(
            &mut decoder,
            &[
                relation(REL),
                begin(7, 0x100),
                insert("1", text("héllo")),
                insert("2", TupleValue::Null),
                commit(0x100, 0x140),
            ],
        );
        assert_eq!(items.len(), 3);
        assert_eq!(
            items[2],
            SourceItem::Commit {
                end_lsn: Lsn(0x140)
            }
        );
        let events = changes(items);
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
    }

    #[test]
    fn keepalives_are_idle_only_outside_a_transaction() {
        let mut decoder = WalEvents::new(HashMap::new());
        let mut items = Vec::new();
        decoder.keepalive(Lsn(0x50), &mut items);
        assert_eq!(
            items,
            [SourceItem::Idle {
                position: Lsn(0x50)
            }]
        );
        items.clear();
        feed(&mut decoder, &[relation(REL), begin(1, 0x100)]);
        decoder.keepalive(Lsn(0x90), &mut items);
        assert!(
            items.is_empty(),
            "a keepalive inside a transaction is not idle"
        );
        feed(
            &mut decoder,
            &[insert("1", text("a")), commit(0x100, 0x140)],
        );
        decoder.keepalive(Lsn(0x200), &mut items);
        assert_eq!(
            items,
            [SourceItem::Idle {
                position: Lsn(0x200)
            }]
        );
    }

    #[test]
    fn an_empty_transaction_still_commits() {
        let mut decoder = WalEvents::new(HashMap::new());
        let items = feed(&mut decoder, &[begin(1, 0x100), commit(0x100, 0x140)]);
        assert_eq!(
            items,
            [SourceItem::Commit {
                end_lsn: Lsn(0x140)
            }]
        );
    }

    #[test]
    fn reset_forgets_the_sessions_relations_and_open_transaction() {
        let mut decoder = WalEvents::new(HashMap::new());
        feed(&mut decoder, &[relation(REL), begin(1, 0x100)]);
        decoder.reset();
        let mut items = Vec::new();
        decoder.keepalive(Lsn(0x90), &mut items);
        assert_eq!(
            items,
            [SourceItem::Idle {
                position: Lsn(0x90)
            }]
        );
        decoder.push(begin(2, 0x200), &mut items).unwrap();
        assert!(matches!(
            decoder.push(insert("1", text("a")), &mut items),
            Err(WalEventError::UnknownRelation(REL))
        ));
    }

    #[test]
    fn updates_deletes_and_truncates_keep_old_rows_and_unchanged_values() {
        let mut decoder = WalEvents::new(HashMap::new());
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
        let events = changes(feed(
            &mut decoder,
            &[
                relation(REL),
                relation(REL + 1),
                begin(1, 0x100),
                update,
                delete,
                truncate,
                commit(0x100, 0x140),
            ],
        ));
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
        let mut decoder = WalEvents::new(HashMap::new());
        let mut items = Vec::new();
        assert!(matches!(
            decoder.push(insert("1", text("a")), &mut items),
            Err(WalEventError::OutsideTransaction(_))
        ));
        decoder.push(begin(1, 0x100), &mut items).unwrap();
        assert!(matches!(
            decoder.push(insert("1", text("a")), &mut items),
            Err(WalEventError::UnknownRelation(REL))
        ));
        decoder.push(relation(REL), &mut items).unwrap();
        let bad = insert("1", TupleValue::Text(Bytes::from_static(&[0xff, 0xfe])));
        assert!(matches!(
            decoder.push(bad, &mut items),
            Err(WalEventError::NotUtf8 { .. })
        ));
        assert!(matches!(
            decoder.push(Bytes::from_static(b"\xff"), &mut items),
            Err(WalEventError::Decode(_))
        ));
        assert!(items.is_empty());
    }
}
