//! The WIT `change-event` records, borrowed from [`ChangeEvent`]s, for lowering a batch into
//! guest memory without building owned copies first.
//!
//! The bindgen-generated `ChangeEvent` owns a `String` per column name and value; building it
//! would copy every column twice (into the owned record, then into the guest). These records
//! hold `&str`s pointing into the relation and into the replication frames' `Bytes`, so the
//! only copy of column data is the one into guest memory. Per batch, [`BatchRecords`] makes two
//! allocations (one array of events, one array of all their columns), none per event or column.
//!
//! The field and case names are the WIT names; wasmtime checks them against the component's
//! `handle` export when the typed function is looked up, so a drift between this file and
//! `wit/handler.wit` fails at instantiation, not silently.

use wasmtime::component::{ComponentType, Lift, Lower};

use crate::event::{ChangeEvent, Column, Operation, Value};

/// WIT `operation`.
#[derive(ComponentType, Lower, Clone, Copy, Debug)]
#[component(enum)]
#[repr(u8)]
pub(crate) enum OperationRecord {
    #[component(name = "insert")]
    Insert,
    #[component(name = "update")]
    Update,
    #[component(name = "delete")]
    Delete,
    #[component(name = "truncate")]
    Truncate,
}

/// WIT `value`.
#[derive(ComponentType, Lower, Clone, Copy, Debug)]
#[component(variant)]
pub(crate) enum ValueRecord<'a> {
    #[component(name = "null")]
    Null,
    #[component(name = "unchanged")]
    Unchanged,
    #[component(name = "text")]
    Text(&'a str),
}

/// WIT `column`.
#[derive(ComponentType, Lower, Clone, Copy, Debug)]
#[component(record)]
pub(crate) struct ColumnRecord<'a> {
    name: &'a str,
    #[component(name = "type-oid")]
    type_oid: u32,
    value: ValueRecord<'a>,
}

/// WIT `change-event`.
#[derive(ComponentType, Lower, Clone, Copy, Debug)]
#[component(record)]
pub(crate) struct EventRecord<'a> {
    operation: OperationRecord,
    schema: &'a str,
    table: &'a str,
    row: &'a [ColumnRecord<'a>],
    #[component(name = "old-row")]
    old_row: Option<&'a [ColumnRecord<'a>]>,
    #[component(name = "key-columns")]
    key_columns: &'a [String],
    lsn: u64,
    #[component(name = "commit-time")]
    commit_time: i64,
    xid: u32,
}

/// WIT `error`, as returned by the guest.
#[derive(ComponentType, Lift, Debug)]
#[component(record)]
pub(crate) struct ErrorRecord {
    pub(crate) message: String,
}

/// The parameters of the `handle` export.
pub(crate) type HandleParams<'a> = (&'a [EventRecord<'a>],);
/// The results of the `handle` export.
pub(crate) type HandleResults = (Result<(), ErrorRecord>,);

/// The column records of a batch, in one array; events are built as slices of it.
pub(crate) struct BatchRecords<'a> {
    columns: Vec<ColumnRecord<'a>>,
}

impl<'a> BatchRecords<'a> {
    /// Builds the column records of every row and old row of `events`.
    pub(crate) fn new(events: &'a [ChangeEvent]) -> BatchRecords<'a> {
        let count = events
            .iter()
            .map(|event| {
                let columns = &event.relation.columns;
                row_len(columns, &event.row)
                    + event
                        .old_row
                        .as_ref()
                        .map_or(0, |old| row_len(columns, old))
            })
            .sum();
        let mut columns = Vec::with_capacity(count);
        for event in events {
            push_row(&mut columns, &event.relation.columns, &event.row);
            if let Some(old_row) = &event.old_row {
                push_row(&mut columns, &event.relation.columns, old_row);
            }
        }
        BatchRecords { columns }
    }

    /// The event records, borrowing from `self` and from `events` (which must be the slice
    /// `self` was built from).
    pub(crate) fn events(&'a self, events: &'a [ChangeEvent]) -> Vec<EventRecord<'a>> {
        let mut remaining = self.columns.as_slice();
        let mut take = |len: usize| {
            let (row, rest) = remaining.split_at(len.min(remaining.len()));
            remaining = rest;
            row
        };
        events
            .iter()
            .map(|event| {
                let relation = &*event.relation;
                let row = take(row_len(&relation.columns, &event.row));
                let old_row = event
                    .old_row
                    .as_ref()
                    .map(|old_row| take(row_len(&relation.columns, old_row)));
                EventRecord {
                    operation: match event.operation {
                        // The handler@0.1.0 world has no `read`; a backfilled row is an
                        // insert to it.
                        Operation::Insert | Operation::Read => OperationRecord::Insert,
                        Operation::Update => OperationRecord::Update,
                        Operation::Delete => OperationRecord::Delete,
                        Operation::Truncate => OperationRecord::Truncate,
                    },
                    schema: &relation.schema,
                    table: &relation.table,
                    row,
                    old_row,
                    key_columns: &relation.key_columns,
                    lsn: event.lsn.0,
                    commit_time: event.commit_time_us,
                    xid: event.xid,
                }
            })
            .collect()
    }
}

/// How many columns of `row` are passed on: values are aligned with the relation's columns,
/// and a row that is longer or shorter than its relation (which a correct decoder never
/// produces) is cut to the shorter of the two rather than misaligned.
fn row_len(relation_columns: &[Column], row: &[Value]) -> usize {
    relation_columns.len().min(row.len())
}

fn push_row<'a>(out: &mut Vec<ColumnRecord<'a>>, relation_columns: &'a [Column], row: &'a [Value]) {
    for (column, value) in relation_columns.iter().zip(row) {
        let value = match value {
            Value::Null => ValueRecord::Null,
            Value::Unchanged => ValueRecord::Unchanged,
            Value::Text(text) => ValueRecord::Text(text),
        };
        out.push(ColumnRecord {
            name: &column.name,
            type_oid: column.type_oid,
            value,
        });
    }
}
