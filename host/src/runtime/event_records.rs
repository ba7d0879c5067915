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
//!
//! The published versions of the contract differ here only in the `operation` enum (0.2.0
//! adds `read`), so the records are generic over it and [`ContractVersion`] tells, from a
//! component's `handle` export, which one the component was built against.

use wasmtime::Engine;
use wasmtime::component::types::{ComponentItem, Type};
use wasmtime::component::{Component, ComponentType, Lift, Lower};

use crate::event::{ChangeEvent, Column, Operation, Value};

/// The version of `pgstream:handler` a component was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContractVersion {
    /// `pgstream:handler@0.1.0`: no `read`, no `merge`.
    V0_1,
    /// `pgstream:handler@0.2.0`, the current one.
    V0_2,
}

impl ContractVersion {
    /// The version whose `operation` enum the component's `handle` export takes, or `None`
    /// when the export is missing or has a shape no version has (the typed lookup at
    /// instantiation then says what does not match).
    pub(crate) fn of_component(engine: &Engine, component: &Component) -> Option<ContractVersion> {
        let component_type = component.component_type();
        let export = component_type.get_export(engine, "handle")?;
        let ComponentItem::ComponentFunc(handle) = export.ty else {
            return None;
        };
        let (_, Type::List(events)) = handle.params().next()? else {
            return None;
        };
        let Type::Record(event) = events.ty() else {
            return None;
        };
        let operation = event.fields().find(|field| field.name == "operation")?;
        let Type::Enum(operation) = operation.ty else {
            return None;
        };
        let cases: Vec<&str> = operation.names().collect();
        match cases.as_slice() {
            ["insert", "update", "delete", "truncate"] => Some(ContractVersion::V0_1),
            ["insert", "update", "delete", "truncate", "read"] => Some(ContractVersion::V0_2),
            _ => None,
        }
    }

    /// The package version, as WIT writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ContractVersion::V0_1 => "0.1.0",
            ContractVersion::V0_2 => "0.2.0",
        }
    }
}

impl std::fmt::Display for ContractVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pgstream:handler@{}", self.as_str())
    }
}

/// The WIT `operation` enum of one contract version.
pub(crate) trait OperationRecord: ComponentType + Lower + Copy + Send + Sync {
    /// The case a host operation is delivered as.
    fn of(operation: Operation) -> Self;
}

/// WIT `operation` of `pgstream:handler@0.1.0`.
#[derive(ComponentType, Lower, Clone, Copy, Debug)]
#[component(enum)]
#[repr(u8)]
pub(crate) enum OperationV0_1 {
    #[component(name = "insert")]
    Insert,
    #[component(name = "update")]
    Update,
    #[component(name = "delete")]
    Delete,
    #[component(name = "truncate")]
    Truncate,
}

impl OperationRecord for OperationV0_1 {
    fn of(operation: Operation) -> Self {
        match operation {
            // 0.1.0 has no `read`; a backfilled row is an insert to it.
            Operation::Insert | Operation::Read => OperationV0_1::Insert,
            Operation::Update => OperationV0_1::Update,
            Operation::Delete => OperationV0_1::Delete,
            Operation::Truncate => OperationV0_1::Truncate,
        }
    }
}

/// WIT `operation` of `pgstream:handler@0.2.0`.
#[derive(ComponentType, Lower, Clone, Copy, Debug)]
#[component(enum)]
#[repr(u8)]
pub(crate) enum OperationV0_2 {
    #[component(name = "insert")]
    Insert,
    #[component(name = "update")]
    Update,
    #[component(name = "delete")]
    Delete,
    #[component(name = "truncate")]
    Truncate,
    #[component(name = "read")]
    Read,
}

impl OperationRecord for OperationV0_2 {
    fn of(operation: Operation) -> Self {
        match operation {
            Operation::Insert => OperationV0_2::Insert,
            Operation::Update => OperationV0_2::Update,
            Operation::Delete => OperationV0_2::Delete,
            Operation::Truncate => OperationV0_2::Truncate,
            Operation::Read => OperationV0_2::Read,
        }
    }
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

/// WIT `change-event`, with the `operation` enum of contract version `O`.
#[derive(ComponentType, Lower, Clone, Copy, Debug)]
#[component(record)]
pub(crate) struct EventRecord<'a, O> {
    operation: O,
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
pub(crate) type HandleParams<'a, O> = (&'a [EventRecord<'a, O>],);
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
    pub(crate) fn events<O: OperationRecord>(
        &'a self,
        events: &'a [ChangeEvent],
    ) -> Vec<EventRecord<'a, O>> {
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
                    operation: O::of(event.operation),
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
