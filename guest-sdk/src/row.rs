//! Typed access to the columns of a row: `event.row().get::<i64>("id")`.
//!
//! Values arrive in Postgres' text output format (what `SELECT col::text` prints) with the
//! column's type OID. [`FromPgText`] parses that text into Rust types; [`Field`] keeps the three
//! states of a column apart: SQL NULL, a TOASTed value the update did not send (`Unchanged`:
//! the stored value is still the old one, it is *not* null), and a value.

use std::fmt;

use crate::{ChangeEvent, Column, PointKey, Value};

/// Postgres type OIDs (`pg_type.oid`) of the built-in types the SDK knows.
pub mod type_oid {
    /// `bool`
    pub const BOOL: u32 = 16;
    /// `bytea`
    pub const BYTEA: u32 = 17;
    /// `int8` / `bigint`
    pub const INT8: u32 = 20;
    /// `int2` / `smallint`
    pub const INT2: u32 = 21;
    /// `int4` / `integer`
    pub const INT4: u32 = 23;
    /// `text`
    pub const TEXT: u32 = 25;
    /// `oid`
    pub const OID: u32 = 26;
    /// `json`
    pub const JSON: u32 = 114;
    /// `float4` / `real`
    pub const FLOAT4: u32 = 700;
    /// `float8` / `double precision`
    pub const FLOAT8: u32 = 701;
    /// `varchar`
    pub const VARCHAR: u32 = 1043;
    /// `date`
    pub const DATE: u32 = 1082;
    /// `timestamp` (without time zone)
    pub const TIMESTAMP: u32 = 1114;
    /// `timestamptz`
    pub const TIMESTAMPTZ: u32 = 1184;
    /// `numeric`
    pub const NUMERIC: u32 = 1700;
    /// `uuid`
    pub const UUID: u32 = 2950;
    /// `jsonb`
    pub const JSONB: u32 = 3802;
}

/// One column's value, with NULL and "unchanged" kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<T> {
    /// SQL NULL.
    Null,
    /// A TOASTed value this UPDATE did not change: Postgres did not send it, the stored value
    /// is still the old one.
    Unchanged,
    /// The value.
    Value(T),
}

impl<T> Field<T> {
    /// The value, if there is one (`None` for both NULL and unchanged).
    pub fn value(self) -> Option<T> {
        match self {
            Field::Value(value) => Some(value),
            Field::Null | Field::Unchanged => None,
        }
    }

    /// Whether this is SQL NULL.
    pub fn is_null(&self) -> bool {
        matches!(self, Field::Null)
    }

    /// Whether the update left this (TOASTed) value unchanged and Postgres did not send it.
    pub fn is_unchanged(&self) -> bool {
        matches!(self, Field::Unchanged)
    }

    /// Applies `f` to the value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Field<U> {
        match self {
            Field::Null => Field::Null,
            Field::Unchanged => Field::Unchanged,
            Field::Value(value) => Field::Value(f(value)),
        }
    }
}

/// A column could not be read as the requested type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldError {
    /// The row has no column of that name.
    MissingColumn {
        /// The name asked for.
        column: String,
    },
    /// The column's text does not parse as the requested type.
    Invalid {
        /// The column.
        column: String,
        /// Its type OID.
        type_oid: u32,
        /// What went wrong.
        reason: String,
    },
    /// A key column is NULL or unchanged, so the row cannot be identified.
    MissingKey {
        /// The key column.
        column: String,
    },
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldError::MissingColumn { column } => write!(f, "no column named {column:?}"),
            FieldError::Invalid {
                column,
                type_oid,
                reason,
            } => write!(f, "column {column:?} (type oid {type_oid}): {reason}"),
            FieldError::MissingKey { column } => {
                write!(f, "key column {column:?} has no value in this event")
            }
        }
    }
}

impl std::error::Error for FieldError {}

/// Parses a value from Postgres' text output format.
pub trait FromPgText: Sized {
    /// Parses `text`, the value of a column of type `type_oid`; the error says why not.
    fn from_pg_text(text: &str, type_oid: u32) -> Result<Self, String>;
}

impl FromPgText for String {
    fn from_pg_text(text: &str, _type_oid: u32) -> Result<String, String> {
        Ok(text.to_owned())
    }
}

macro_rules! from_pg_text_via_parse {
    ($($ty:ty),*) => {$(
        impl FromPgText for $ty {
            fn from_pg_text(text: &str, _type_oid: u32) -> Result<$ty, String> {
                text.parse::<$ty>()
                    .map_err(|error| format!("{text:?} is not a {}: {error}", stringify!($ty)))
            }
        }
    )*};
}

// Postgres prints integers in decimal and floats as `1.5`, `1e+20`, `NaN`, `Infinity`,
// `-Infinity`, all of which Rust's `parse` accepts.
from_pg_text_via_parse!(i16, i32, i64, u32, u64, f32, f64);

impl FromPgText for bool {
    fn from_pg_text(text: &str, _type_oid: u32) -> Result<bool, String> {
        match text {
            "t" | "true" => Ok(true),
            "f" | "false" => Ok(false),
            _ => Err(format!("{text:?} is not a bool")),
        }
    }
}

#[cfg(feature = "json")]
impl FromPgText for serde_json::Value {
    /// `json`/`jsonb` columns are parsed as JSON documents; other columns become the JSON
    /// value `row_json` would write for them (a number, a bool or a string).
    fn from_pg_text(text: &str, type_oid: u32) -> Result<serde_json::Value, String> {
        let mut json = String::new();
        crate::json::write_value(&mut json, text, type_oid);
        serde_json::from_str(&json).map_err(|error| format!("invalid JSON: {error}"))
    }
}

/// The columns of one row, by name.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    columns: &'a [Column],
}

impl<'a> Row<'a> {
    /// A row over `columns`.
    pub fn new(columns: &'a [Column]) -> Row<'a> {
        Row { columns }
    }

    /// The columns, in table order.
    pub fn columns(&self) -> &'a [Column] {
        self.columns
    }

    /// The column named `name` (exact, case-sensitive match).
    pub fn column(&self, name: &str) -> Option<&'a Column> {
        self.columns.iter().find(|column| column.name == name)
    }

    /// The column's text without parsing.
    pub fn text(&self, name: &str) -> Result<Field<&'a str>, FieldError> {
        let column = self.column(name).ok_or_else(|| FieldError::MissingColumn {
            column: name.to_owned(),
        })?;
        Ok(match &column.value {
            Value::Null => Field::Null,
            Value::Unchanged => Field::Unchanged,
            Value::Text(text) => Field::Value(text.as_str()),
        })
    }

    /// The column's value parsed as `T`.
    pub fn get<T: FromPgText>(&self, name: &str) -> Result<Field<T>, FieldError> {
        let column = self.column(name).ok_or_else(|| FieldError::MissingColumn {
            column: name.to_owned(),
        })?;
        match &column.value {
            Value::Null => Ok(Field::Null),
            Value::Unchanged => Ok(Field::Unchanged),
            Value::Text(text) => T::from_pg_text(text, column.type_oid)
                .map(Field::Value)
                .map_err(|reason| FieldError::Invalid {
                    column: column.name.clone(),
                    type_oid: column.type_oid,
                    reason,
                }),
        }
    }
}

impl ChangeEvent {
    /// The row after the change (insert, update), or the key / old row (delete).
    pub fn row(&self) -> Row<'_> {
        Row::new(&self.row)
    }

    /// The row before an update, when Postgres sent it.
    pub fn old_row(&self) -> Option<Row<'_>> {
        self.old_row.as_deref().map(Row::new)
    }

    /// The point key of this event's row: schema, table and the key columns' text in
    /// `key-columns` order. Fails if a key column is missing, NULL or unchanged.
    pub fn point_key(&self) -> Result<PointKey, FieldError> {
        key_of(self, self.row())
    }

    /// The point key of the row before an update, when the old row carries the key columns
    /// (REPLICA IDENTITY FULL, or the update changed the key).
    pub fn old_point_key(&self) -> Option<PointKey> {
        self.old_row().and_then(|old| key_of(self, old).ok())
    }

    /// The row as a JSON object: column name to value, unchanged columns omitted. Numbers and
    /// bools become JSON numbers and bools, `json`/`jsonb` columns are embedded as documents,
    /// NULL becomes `null`, everything else a string.
    pub fn row_json(&self) -> String {
        crate::json::row_json(&self.row, None, &[])
    }

    /// Like [`ChangeEvent::row_json`], but an unchanged column takes its value from the old
    /// row when the old row has it (REPLICA IDENTITY FULL), and the columns named in `skip`
    /// are left out.
    pub fn row_json_with(&self, skip: &[&str]) -> String {
        crate::json::row_json(&self.row, self.old_row.as_deref(), skip)
    }

    /// Whether [`ChangeEvent::row_json_with`] leaves a column out for want of its value: the
    /// update left it unchanged (TOASTed, not sent) and the old row does not have it. Such a
    /// row's payload is partial: write it with [`WritePlan::merge`](crate::WritePlan::merge),
    /// so the stored value of the missing column survives.
    pub fn is_partial(&self) -> bool {
        self.row.iter().any(|column| {
            matches!(column.value, Value::Unchanged)
                && !self.old_row.as_deref().is_some_and(|old| {
                    old.iter().any(|old| {
                        old.name == column.name && !matches!(old.value, Value::Unchanged)
                    })
                })
        })
    }
}

fn key_of(event: &ChangeEvent, row: Row<'_>) -> Result<PointKey, FieldError> {
    let key = event
        .key_columns
        .iter()
        .map(|name| match row.text(name)? {
            Field::Value(text) => Ok(text.to_owned()),
            Field::Null | Field::Unchanged => Err(FieldError::MissingKey {
                column: name.clone(),
            }),
        })
        .collect::<Result<Vec<String>, FieldError>>()?;
    Ok(PointKey {
        schema: event.schema.clone(),
        table: event.table.clone(),
        key,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Operation;

    pub(crate) fn column(name: &str, type_oid: u32, value: Value) -> Column {
        Column {
            name: name.to_owned(),
            type_oid,
            value,
        }
    }

    pub(crate) fn text(value: &str) -> Value {
        Value::Text(value.to_owned())
    }

    pub(crate) fn event(operation: Operation, row: Vec<Column>) -> ChangeEvent {
        ChangeEvent {
            operation,
            schema: "public".to_owned(),
            table: "documents".to_owned(),
            row,
            old_row: None,
            key_columns: vec!["id".to_owned()],
            lsn: 1,
            commit_time: 0,
            xid: 7,
        }
    }

    #[test]
    fn typed_getters_parse_postgres_text() {
        let event = event(
            Operation::Insert,
            vec![
                column("id", type_oid::INT8, text("-42")),
                column("score", type_oid::FLOAT8, text("1e+20")),
                column("ok", type_oid::BOOL, text("t")),
                column("title", type_oid::TEXT, text("héllo")),
                column("missing", type_oid::TEXT, Value::Null),
                column("content", type_oid::TEXT, Value::Unchanged),
            ],
        );
        let row = event.row();
        assert_eq!(row.get::<i64>("id"), Ok(Field::Value(-42)));
        assert_eq!(row.get::<f64>("score"), Ok(Field::Value(1e20)));
        assert_eq!(row.get::<bool>("ok"), Ok(Field::Value(true)));
        assert_eq!(
            row.get::<String>("title"),
            Ok(Field::Value("héllo".to_owned()))
        );
        assert_eq!(row.get::<String>("missing"), Ok(Field::Null));
        assert_eq!(row.get::<String>("content"), Ok(Field::Unchanged));
        assert!(matches!(
            row.get::<i32>("title"),
            Err(FieldError::Invalid { type_oid: 25, .. })
        ));
        assert_eq!(
            row.get::<i32>("nope"),
            Err(FieldError::MissingColumn {
                column: "nope".to_owned()
            })
        );
    }

    #[test]
    fn special_floats_parse() {
        assert!(f64::from_pg_text("NaN", type_oid::FLOAT8).unwrap().is_nan());
        assert_eq!(
            f64::from_pg_text("-Infinity", type_oid::FLOAT8),
            Ok(f64::NEG_INFINITY)
        );
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_getter_parses_documents_and_types_scalars() {
        let event = event(
            Operation::Insert,
            vec![
                column("doc", type_oid::JSONB, text(r#"{"a": [1, 2]}"#)),
                column("n", type_oid::INT4, text("7")),
                column("t", type_oid::TEXT, text("x\"y")),
            ],
        );
        let row = event.row();
        assert_eq!(
            row.get::<serde_json::Value>("doc").unwrap().value(),
            Some(serde_json::json!({"a": [1, 2]}))
        );
        assert_eq!(
            row.get::<serde_json::Value>("n").unwrap().value(),
            Some(serde_json::json!(7))
        );
        assert_eq!(
            row.get::<serde_json::Value>("t").unwrap().value(),
            Some(serde_json::json!("x\"y"))
        );
    }

    #[test]
    fn point_key_follows_key_column_order_and_rejects_missing_keys() {
        let mut event = event(
            Operation::Delete,
            vec![
                column("id", type_oid::INT4, text("5")),
                column("tenant", type_oid::TEXT, text("acme")),
            ],
        );
        event.key_columns = vec!["tenant".to_owned(), "id".to_owned()];
        let key = event.point_key().unwrap();
        assert_eq!(
            (key.schema.as_str(), key.table.as_str()),
            ("public", "documents")
        );
        assert_eq!(key.key, vec!["acme".to_owned(), "5".to_owned()]);

        event.row[0].value = Value::Null;
        assert_eq!(
            event.point_key().map(|key| key.key),
            Err(FieldError::MissingKey {
                column: "id".to_owned()
            })
        );
    }

    #[test]
    fn a_row_is_partial_when_an_unchanged_column_has_no_old_value() {
        let mut event = event(
            Operation::Update,
            vec![
                column("id", type_oid::INT4, text("5")),
                column("content", type_oid::TEXT, Value::Unchanged),
            ],
        );
        assert!(event.is_partial());
        event.old_row = Some(vec![column("id", type_oid::INT4, text("5"))]);
        assert!(event.is_partial());
        event.old_row = Some(vec![
            column("id", type_oid::INT4, text("5")),
            column("content", type_oid::TEXT, text("kept")),
        ]);
        assert!(!event.is_partial());
        event.old_row = None;
        event.row[1].value = text("sent");
        assert!(!event.is_partial());
    }
}
